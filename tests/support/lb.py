"""Fixtures and helpers: real coordinator processes and replica comparisons.

Only one coordinator runs at a time (they share the test databases): starting
one stops the others.  The ``coordinator`` fixture gives the default one (the
settings every test process uses); ``lb_factory(**LOAD_BALANCER overrides)``
starts another on a new port and points this process's client at it.
"""
from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any, Iterator, Optional

import pytest

from tests.support import waiting
from tests.support.waiting import NOT_ANSWERING, wait_until

BACKEND = os.environ.get("LB_TEST_BACKEND", "sqlite")
ALIASES = ("default", "DB1", "DB2")
REPO = Path(__file__).resolve().parents[2]
LAUNCHER = REPO / "bin" / "djangoloadbalancer"

_running: list["CoordinatorHandle"] = []
_default: Optional["CoordinatorHandle"] = None


def base_settings() -> dict:
    return json.loads(Path(os.environ["LB_TEST_CONFIG"]).read_text())


class CoordinatorHandle:
    """A real `djangoloadbalancer run` process (supervisor + coordinator) for the tests."""

    def __init__(self, name: str = "default", databases: Optional[dict] = None, **overrides: Any):
        from tests.support.pg_cluster import free_port

        settings = base_settings()
        for alias, changes in (databases or {}).items():
            settings["DATABASES"][alias] = dict(settings["DATABASES"][alias], **changes)
        lb = settings["LOAD_BALANCER"]
        if name != "default":
            lb["ADDRESS"] = dict(lb["ADDRESS"], PORT=free_port())
        lb.update(overrides)
        self.name = name
        self.database_overrides = dict(databases or {})
        self.settings = settings
        self.lb = lb
        base = Path(os.environ["LB_TEST_CONFIG"]).parent
        tag = lb["ADDRESS"].get("PORT") or "unix"
        self.config_path = base / f"settings-{name}-{tag}.json"
        self.config_path.write_text(json.dumps(settings, indent=1))
        self.log_path = base / f"coordinator-{name}-{tag}.log"
        self.proc: Optional[subprocess.Popen] = None

    # -- processes -------------------------------------------------------------------
    def env(self) -> dict:
        from django_lb_shm.wire.protocol import STOP_WITH_PARENT_ENV

        env = dict(os.environ)
        env["LB_TEST_CONFIG"] = str(self.config_path)
        # A test run that is killed must not leave its coordinators running.
        env[STOP_WITH_PARENT_ENV] = str(os.getpid())
        env["DJANGO_SETTINGS_MODULE"] = "tests.testproject.settings"
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
        return env

    def start(self, wait: bool = True, timeout: float = 60, alongside: bool = False) -> "CoordinatorHandle":
        """Start it; the running ones are stopped first unless ``alongside`` (a test of two at once)."""
        for other in list(_running):
            if other is not self and not alongside:
                other.stop()
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            [sys.executable, str(LAUNCHER), "run"], cwd=str(REPO), env=self.env(),
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )
        log.close()
        _running.append(self)
        if wait:
            self.wait_ready(timeout)
        return self

    def wait_ready(self, timeout: float = 60) -> dict:
        def ready() -> Optional[dict]:
            if self.proc is not None and self.proc.poll() is not None:
                raise AssertionError(f"coordinator exited with {self.proc.returncode}")
            status = self.status(timeout=2)
            return status if status["coordinator"]["state"] == "READY" else None

        try:
            return wait_until(ready, timeout, "the coordinator to be READY", every=0.1, ignoring=NOT_ANSWERING)
        except AssertionError as exc:
            raise AssertionError(f"{exc}:\n{self.log()}") from None

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30) -> Optional[int]:
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        if self in _running:
            _running.remove(self)
        return self.proc.returncode

    @property
    def supervisor_pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def coordinator_pid(self) -> int:
        return int(self.status()["coordinator"]["pid"])

    @property
    def segment_name(self) -> str:
        """Its shared-memory segment's name (in /dev/shm)."""
        from django_lb_shm.settings.config import build_config
        from django_lb_shm.shm.state import segment_name

        return segment_name(build_config(self.lb, self.settings["DATABASES"]).address)

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-6000:]
        except OSError:
            return ""

    # -- the client side ---------------------------------------------------------------
    def client(self):
        from django_lb_shm.client.connection import ClientConnection
        from django_lb_shm.settings.config import build_config

        return ClientConnection(build_config(self.lb, self.settings["DATABASES"]))

    def status(self, timeout: float = 5) -> dict:
        client = self.client()
        try:
            return client.call("status", timeout=timeout)
        finally:
            client.forget_connection()

    @contextlib.contextmanager
    def active(self) -> Iterator["CoordinatorHandle"]:
        """Point this process's load-balanced queries at this coordinator.

        When it reaches some databases another way (a delaying proxy), this process's
        zero-hop reads use the same way: DATABASES is overridden too (Django warns that
        its own connections keep theirs, which is what the tests' direct checks want).
        """
        import warnings

        from django.conf import settings as django_settings
        from django.test import override_settings

        overrides: dict = {"LOAD_BALANCER": self.lb}
        if self.database_overrides:
            databases = {alias: dict(entry) for alias, entry in django_settings.DATABASES.items()}
            for alias, changes in self.database_overrides.items():
                databases[alias].update(changes)
            overrides["DATABASES"] = databases
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Overriding setting DATABASES")
            with override_settings(**overrides):
                yield self

    def wait_drained(self, timeout: float = 30) -> dict:
        """Until every RUNNING database has applied every write."""
        return waiting.wait_drained(self.status, timeout)

    def wait_state(self, name: str, state: str, timeout: float = 30) -> dict:
        seen: dict = {}

        def reached() -> Optional[dict]:
            seen["db"] = next(d for d in self.status()["databases"] if d["name"] == name)
            return seen["db"] if seen["db"]["state"] == state else None

        try:
            return wait_until(reached, timeout, f"{name} to be {state}")
        except AssertionError:
            raise AssertionError(f"{name} is {seen['db']['state']}, not {state}, after {timeout}s:\n{self.log()}") from None


def stop_all_coordinators() -> None:
    for handle in list(_running):
        handle.stop()


def default_coordinator() -> CoordinatorHandle:
    global _default
    if _default is None:
        _default = CoordinatorHandle("default")
    if _default.proc is None or _default.proc.poll() is not None or _default not in _running:
        _default.start()
    return _default


# -- data helpers ----------------------------------------------------------------------------
def app_tables(load_balanced_only: bool = False) -> list[str]:
    from django.apps import apps

    from django_lb_shm.routers import is_load_balanced

    tables = []
    for label in ("testapp", "plainlbapp"):   # plainlbapp: load-balanced by LOAD_BALANCER['MODELS']
        for model in apps.get_app_config(label).get_models(include_auto_created=True):
            if (is_load_balanced(model) or not load_balanced_only) and model._meta.db_table not in tables:
                tables.append(model._meta.db_table)
    return tables


def table_rows(alias: str, table: str) -> list[tuple]:
    from django.db import connections

    with connections[alias].cursor() as cursor:
        cursor.execute(f'SELECT * FROM "{table}" ORDER BY 1')
        return [tuple(row) for row in cursor.fetchall()]


def clear_tables() -> None:
    """Delete the test app's rows on every database directly (children first)."""
    from django.db import connections

    # tests/plainlbapp's tables (load-balanced by LOAD_BALANCER['MODELS']) point at testapp's: first.
    plain = ["plainlbapp_bundleitem", "plainlbapp_plainbundle", "plainlbapp_plainitem_tags",
             "plainlbapp_specialitem", "plainlbapp_plainitem", "plainlbapp_plainowned"]
    order = plain + ["testapp_review", "testapp_book_tags", "testapp_book", "testapp_tag", "testapp_author",
                     "testapp_destination", "testapp_token"]
    for alias in ALIASES:
        with connections[alias].cursor() as cursor:
            for table in order + [t for t in app_tables() if t not in order]:
                cursor.execute(f'DELETE FROM "{table}"')
        connections[alias].close()


class Replicas:
    """Compare what each real database holds."""

    def __init__(self, handle: CoordinatorHandle):
        self.handle = handle

    def rows(self, table: str) -> dict[str, list[tuple]]:
        return {alias: table_rows(alias, table) for alias in ALIASES}

    def assert_identical(self, tables: Optional[list[str]] = None) -> None:
        self.handle.wait_drained()
        for table in tables or app_tables(load_balanced_only=True):
            rows = self.rows(table)
            first = rows[ALIASES[0]]
            for alias in ALIASES[1:]:
                assert rows[alias] == first, f"{table}: {alias} differs from {ALIASES[0]}: only there {sorted(set(rows[alias]) - set(first))[:5]}, missing {sorted(set(first) - set(rows[alias]))[:5]}"


@pytest.fixture
def coordinator() -> Iterator[CoordinatorHandle]:
    handle = default_coordinator()
    handle.wait_drained()
    clear_tables()
    yield handle


@contextlib.contextmanager
def read_path(value: str) -> Iterator[None]:
    """This process's reads take ``value`` ('AUTO': zero-hop where it can; 'COORDINATOR')."""
    from django.conf import settings
    from django.test import override_settings

    with override_settings(LOAD_BALANCER=dict(settings.LOAD_BALANCER, READ_PATH=value)):
        yield


@pytest.fixture
def coordinator_path(coordinator: CoordinatorHandle) -> Iterator[CoordinatorHandle]:
    """The default coordinator, with this process's reads forced through it (READ_PATH='COORDINATOR')."""
    with read_path("COORDINATOR"):
        yield coordinator


@pytest.fixture
def replicas(coordinator: CoordinatorHandle) -> Replicas:
    return Replicas(coordinator)


@pytest.fixture
def lb_factory() -> Iterator[Any]:
    """Start coordinators with LOAD_BALANCER overrides; this process's client follows the last one."""
    started: list[tuple[CoordinatorHandle, Any]] = []

    def make(name: str = "custom", start: bool = True, databases: Optional[dict] = None,
             **overrides: Any) -> CoordinatorHandle:
        handle = CoordinatorHandle(name, databases=databases, **overrides)
        if start:
            handle.start()
        ctx = handle.active()
        ctx.__enter__()
        started.append((handle, ctx))
        return handle

    default = default_coordinator()
    default.wait_drained()
    clear_tables()
    yield make
    for handle, ctx in reversed(started):
        ctx.__exit__(None, None, None)
        handle.stop()

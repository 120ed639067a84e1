"""``manage.py test`` for projects with load-balanced models.

Django's test runner creates test databases and points *this* process at them,
but the coordinator is another process, started with the real settings: it
would run the tests' queries on the real databases.  (The client refuses that:
see ``ClientConnection.check_same_databases``.)  This runner

* creates a test database for every alias in LOAD_BALANCER['DATABASES'] (SQLite:
  a file in a temporary directory, never in-memory, which another process could
  not open), whichever aliases the tests declare;
* starts a private coordinator (``djangoloadbalancer run``) on those test
  databases, on a free 127.0.0.1 port, with its journal in a temporary directory,
  and with the settings this process made at run time (INSTALLED_APPS, MIDDLEWARE...
  as Django's runtests.py sets them), and points the load-balanced connection at it;
* lets every TestCase and TransactionTestCase query the load-balanced alias (adds
  it to ``databases``), and counts its statements in 'default''s ``assertNumQueries`` /
  ``CaptureQueriesContext`` (LOAD_BALANCER['COUNT_QUERIES_ON_DEFAULT'] 'TESTS');
* stops that coordinator when the test databases are destroyed; it also stops by
  itself if the test process dies first.

Use it with ``TEST_RUNNER = "django_lb_shm.testing.LoadBalancerTestRunner"``.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from typing import Any, Optional

from django.conf import settings
from django.db import connections
from django.test import TransactionTestCase
from django.test.runner import DiscoverRunner
from django.test.utils import iter_test_cases

from django_lb_shm import apps
from django_lb_shm.backend.base import count_under_test_runner
from django_lb_shm.client.connection import get_client
from django_lb_shm.client.reads import close_connections
from django_lb_shm.settings.config import LoadBalancerConfig, get_config
from django_lb_shm.settings.overrides import OVERRIDES_ENV, runtime_settings
from django_lb_shm.settings.validation import SETTING_NAME
from django_lb_shm.wire.protocol import STOP_WITH_PARENT_ENV

logger = logging.getLogger("django_lb_shm.testing")
BOOT_TIMEOUT = 60.0
TEST_HOLD_TIMEOUT = 24 * 3600.0   # TRANSACTION_HOLD_TIMEOUT of the test coordinator


class LoadBalancerTestRunner(DiscoverRunner):
    """DiscoverRunner with a coordinator of its own on the test databases."""

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        if self.parallel > 1:
            # Each worker would get cloned databases that the one coordinator does not serve.
            logger.warning("load-balanced tests run in one process: --parallel %d ignored", self.parallel)
            self.parallel = 1
        self._coordinator: Optional[subprocess.Popen] = None
        self._workdir = ""
        self._real_setting: Any = None

    # -- which databases -------------------------------------------------------------------
    def get_databases(self, suite: Any) -> dict:
        """{alias: serialize}: every load-balanced database gets a test database too.

        The virtual alias is never serialized (serialized_rollback): it has no database of
        its own, and the real ones are serialized directly, before its coordinator starts.
        """
        config = get_config()
        databases = dict(super().get_databases(suite))
        for alias in config.databases:
            databases.setdefault(alias, False)
        if config.alias in databases:
            databases[config.alias] = False
        return databases

    def build_suite(self, *args: Any, **kwargs: Any):
        suite = super().build_suite(*args, **kwargs)
        alias = get_config().alias
        for test in iter_test_cases(suite):
            cls = type(test)
            if not issubclass(cls, TransactionTestCase):   # SimpleTestCase: no database at all
                continue
            if cls.databases != "__all__" and alias not in cls.databases:
                cls.databases = set(cls.databases) | {alias}
        return suite

    # -- set-up and tear-down ---------------------------------------------------------------------
    def setup_test_environment(self, **kwargs: Any) -> None:
        super().setup_test_environment(**kwargs)
        count_under_test_runner(True)   # COUNT_QUERIES_ON_DEFAULT 'TESTS'

    def teardown_test_environment(self, **kwargs: Any) -> None:
        count_under_test_runner(False)
        super().teardown_test_environment(**kwargs)

    def setup_databases(self, **kwargs: Any):
        config = get_config()
        self._workdir = tempfile.mkdtemp(prefix="django_lb_shm_tests_")
        self._use_files_for_sqlite_test_databases(config.databases)
        apps.migrating_every_database = True   # every test database is migrated: no "one copy" warning
        try:
            old_config = super().setup_databases(**kwargs)
        except BaseException:
            shutil.rmtree(self._workdir, ignore_errors=True)
            raise
        finally:
            apps.migrating_every_database = False
        try:
            self._start_coordinator(config)
        except BaseException:
            self._stop_coordinator()
            super().teardown_databases(old_config, **kwargs)
            shutil.rmtree(self._workdir, ignore_errors=True)
            raise
        return old_config

    def teardown_databases(self, old_config: Any, **kwargs: Any) -> None:
        self._stop_coordinator()
        close_connections()   # zero-hop reads' own connections: PostgreSQL refuses to drop a database in use
        super().teardown_databases(old_config, **kwargs)
        shutil.rmtree(self._workdir, ignore_errors=True)

    def _use_files_for_sqlite_test_databases(self, aliases: tuple) -> None:
        for alias in aliases:
            conn = connections[alias]
            test = conn.settings_dict.setdefault("TEST", {})
            if conn.vendor == "sqlite" and (not test.get("NAME") or conn.creation.is_in_memory_db(test["NAME"])):
                test["NAME"] = os.path.join(self._workdir, f"test_{alias}.sqlite3")

    def _start_coordinator(self, config: LoadBalancerConfig) -> None:
        real = getattr(settings, SETTING_NAME)
        address = {**real["ADDRESS"], "HOST": "127.0.0.1", "PORT": _free_port()}
        address.pop("PATH", None)
        # No METRICS: the project's port belongs to its real supervisor.
        lb = {"ADDRESS": address, "JOURNAL_DIR": os.path.join(self._workdir, "journal"), "JOURNAL_FSYNC": False,
              "METRICS": None}
        overrides = {
            "DATABASES": {alias: {"NAME": settings.DATABASES[alias]["NAME"]} for alias in config.databases},
            # TestCase runs each test class inside one load-balanced transaction, idle between its
            # statements for as long as the tests take: this coordinator serves this process alone.
            SETTING_NAME: {**lb, "TRANSACTION_HOLD_TIMEOUT": TEST_HOLD_TIMEOUT},
            # Settings made at run time (Django's runtests.py: INSTALLED_APPS of the chosen test apps,
            # MIDDLEWARE, TEMPLATES...): the coordinator must know the same models and pass the same checks.
            "SETTINGS": runtime_settings(settings),
        }
        # This process's import path (the project may not be the working directory).
        path = [p or os.getcwd() for p in sys.path] + [os.environ.get("PYTHONPATH", "")]
        env = dict(os.environ, **{OVERRIDES_ENV: json.dumps(overrides), STOP_WITH_PARENT_ENV: str(os.getpid()),
                                  "PYTHONPATH": os.pathsep.join(p for p in path if p)})
        self._log_path = os.path.join(self._workdir, "coordinator.log")
        with open(self._log_path, "ab") as log:
            # Its own session, so a Ctrl-C meant for the tests does not cut it half-way: the
            # runner stops it, or it stops by itself once this process is gone (STOP_WITH_PARENT_ENV).
            self._coordinator = subprocess.Popen(
                [sys.executable, "-c", "import sys; from django_lb_shm.cli import main; sys.exit(main())", "run"],
                env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
            )
        self._real_setting = real
        setattr(settings, SETTING_NAME, {**real, **lb})
        self._wait_until_ready()
        if self.verbosity >= 2:
            print(f"Load balancer coordinator for the test databases at 127.0.0.1:{address['PORT']} "
                  f"(pid {self._coordinator.pid})")

    def _wait_until_ready(self) -> None:
        deadline = time.monotonic() + BOOT_TIMEOUT
        while True:
            if self._coordinator.poll() is not None:
                raise RuntimeError(f"the test coordinator exited with {self._coordinator.returncode}:\n{self._log()}")
            try:
                if get_client().call("status", timeout=2)["coordinator"]["state"] == "READY":
                    return
            except Exception:
                pass  # not listening yet
            if time.monotonic() > deadline:
                raise RuntimeError(f"the test coordinator was not ready within {BOOT_TIMEOUT:.0f} s:\n{self._log()}")
            time.sleep(0.1)

    def _stop_coordinator(self) -> None:
        process, self._coordinator = self._coordinator, None
        if self._real_setting is not None:
            get_client().forget_connection()
            setattr(settings, SETTING_NAME, self._real_setting)
            self._real_setting = None
        if process is None or process.poll() is not None:
            return
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(10)

    def _log(self) -> str:
        try:
            with open(self._log_path, errors="replace") as f:
                return f.read()[-4000:]
        except OSError:
            return ""


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


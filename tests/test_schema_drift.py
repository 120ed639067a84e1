"""Schema drift (issue 17): a copy that lacks migrations another copy has applied is SCHEMA_BEHIND.

Each scenario runs on databases of its own (fresh SQLite files, or fresh databases on the
suite's PostgreSQL servers) with a journal of its own, migrated by `djangoloadbalancer
migrate`. The new migration is added the way a deployment adds one: a file in the test app's
migrations (a copy of them, named by MIGRATION_MODULES), applied by plain `manage.py migrate`
to one copy only.
"""
from __future__ import annotations

import copy
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any, Iterator

import pytest
from django.db import DEFAULT_DB_ALIAS, connections

from django_lb_shm.backend.alias import lb_alias
from django_lb_shm.databases.schema import behind_copies
from django_lb_shm.shm.state import DbState, SharedState
from tests.support.lb import ALIASES, BACKEND, REPO, CoordinatorHandle, read_path
from tests.support.waiting import NOT_ANSWERING, wait_until
from tests.testapp.models import Destination

MIGRATION = "testapp.0004_destination_extra"
MIGRATION_FILE = '''from django.db import migrations, models


class Migration(migrations.Migration):

    dependencies = [("testapp", "0003_stamp")]

    operations = [migrations.AddField("destination", "extra", models.CharField(max_length=50, null=True))]
'''
RUNNING_AGAIN_WITHIN = 10.0   # seconds after `djangoloadbalancer migrate` (WAIT_TIME is 0.5 s here)


class Drift:
    """A coordinator on databases of its own, and the commands an operator runs on them."""

    def __init__(self, handle: CoordinatorHandle, migrations: Path):
        self.handle = handle
        self.migrations = migrations

    def env(self) -> dict:
        return self.handle.env()

    def cli(self, *args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "bin/djangoloadbalancer", *args], env=self.env(), cwd=str(REPO),
                              capture_output=True, text=True, timeout=240)

    def manage(self, *args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "django", *args], env=self.env(), cwd=str(REPO),
                              capture_output=True, text=True, timeout=240)

    def add_migration(self) -> None:
        (self.migrations / "0004_destination_extra.py").write_text(MIGRATION_FILE)

    def databases(self) -> dict[str, dict]:
        return {db["name"]: db for db in self.handle.status()["databases"]}

    def states(self) -> dict[str, str]:
        return {name: db["state"] for name, db in self.databases().items()}

    def wait_states(self, expected: dict[str, str], timeout: float) -> float:
        """Seconds it took until the states were ``expected``."""
        started = time.monotonic()
        try:
            wait_until(lambda: self.states() == expected, timeout, f"states {expected}", describe=self.states)
        except AssertionError as exc:
            raise AssertionError(f"{exc}:\n{self.handle.log()}") from None
        return time.monotonic() - started

    def restart(self) -> None:
        """SIGHUP to the supervisor, as after a deployment; until the new coordinator is READY."""
        old = self.handle.coordinator_pid()
        os.kill(self.handle.supervisor_pid, signal.SIGHUP)

        def restarted() -> bool:
            coordinator = self.handle.status(timeout=2)["coordinator"]
            return coordinator["pid"] != old and coordinator["state"] == "READY"

        try:
            wait_until(restarted, 60, "a new coordinator after SIGHUP", every=0.1, ignoring=NOT_ANSWERING)
        except AssertionError as exc:
            raise AssertionError(f"{exc}:\n{self.handle.log()}") from None

    def direct(self, alias: str, sql: str, params: Any = ()) -> list[tuple]:
        """A query on this scenario's copy ``alias`` itself (a private connection, not connections[alias])."""
        from django.db.utils import load_backend

        databases = self.handle.settings["DATABASES"]
        entries = {DEFAULT_DB_ALIAS: copy.deepcopy(databases[DEFAULT_DB_ALIAS]),
                   alias: copy.deepcopy(databases[alias])}
        entry = connections.configure_settings(entries)[alias]
        wrapper = load_backend(entry["ENGINE"]).DatabaseWrapper(entry, f"{alias}:drift-test")
        try:
            with wrapper.cursor() as cursor:
                cursor.execute(sql, params)
                return [tuple(row) for row in cursor.fetchall()] if cursor.description else []
        finally:
            wrapper.close()


def _fresh_databases(tmp_path: Path) -> tuple[dict, list]:
    """({alias: settings changes}, PostgreSQL databases to drop afterwards)."""
    if BACKEND != "postgres":
        return {alias: {"NAME": str(tmp_path / f"{alias}.sqlite3")} for alias in ALIASES}, []
    created = []
    for alias in ALIASES:
        name = f"drift_{uuid.uuid4().hex[:12]}"
        with connections[alias].cursor() as cursor:
            cursor.execute(f'CREATE DATABASE "{name}"')
        created.append((alias, name))
    return {alias: {"NAME": name} for alias, name in created}, created


def _drop(created: list) -> None:
    from django_lb_shm.client.reads import close_connections

    close_connections()
    connections[lb_alias()].close()
    for alias, name in created:
        with connections[alias].cursor() as cursor:
            cursor.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture
def drift(request, lb_factory, tmp_path, monkeypatch) -> Iterator[Drift]:
    """A scenario's coordinator, started on fresh copies; LOAD_BALANCER overrides by indirect parameter."""
    modules = tmp_path / "modules"
    migrations = modules / "drift_migrations"
    migrations.mkdir(parents=True)
    for source in (REPO / "tests" / "testapp" / "migrations").glob("*.py"):
        shutil.copy(source, migrations / source.name)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(modules), os.environ.get("PYTHONPATH")])))
    databases, created = _fresh_databases(tmp_path)
    overrides = {"JOURNAL_DIR": str(tmp_path / "journal"), **getattr(request, "param", {})}
    handle = lb_factory("drift", start=False, databases=databases, **overrides)
    try:
        handle.settings["MIGRATION_MODULES"] = {"testapp": "drift_migrations"}
        handle.config_path.write_text(json.dumps(handle.settings, indent=1))
        scenario = Drift(handle, migrations)
        migrated = scenario.cli("migrate", "-v", "0")
        assert migrated.returncode == 0, migrated.stdout + migrated.stderr
        handle.start()
        yield scenario
    finally:
        handle.stop()
        _drop(created)


def read_the_new_column(times: int) -> list[str]:
    """The errors of ``times`` reads of the new column through the load balancer."""
    errors = []
    for _ in range(times):
        try:
            with connections[lb_alias()].cursor() as cursor:
                # As the ORM writes it: qualified, so that SQLite cannot take "extra" for a string.
                cursor.execute('SELECT "testapp_destination"."name", "testapp_destination"."extra" '
                               'FROM "testapp_destination" ORDER BY "testapp_destination"."id"')
                cursor.fetchall()
        except Exception as exc:
            errors.append(f"{type(exc).__name__}: {exc}")
    return errors


def write_the_new_column(name: str, value: str) -> None:
    with connections[lb_alias()].cursor() as cursor:
        cursor.execute('UPDATE "testapp_destination" SET "extra" = %s WHERE "name" = %s', [value, name])


# -- the scenario of issue 17 ------------------------------------------------------------------------
def test_a_copy_migrated_alone_keeps_the_others_out_until_djangoloadbalancer_migrate(drift):
    Destination.objects.create(name="before", desc="-")
    drift.handle.wait_drained()
    drift.add_migration()
    plain = drift.manage("migrate", "testapp")    # plain `manage.py migrate`: 'default' only
    assert plain.returncode == 0, plain.stdout + plain.stderr
    assert "only database 'default' was changed" in plain.stdout
    drift.restart()

    behind = {"default": "RUNNING", "DB1": "SCHEMA_BEHIND", "DB2": "SCHEMA_BEHIND"}
    assert drift.states() == behind, drift.handle.log()
    databases = drift.databases()
    assert {name: db["missing_migrations"] for name, db in databases.items()} == {
        "default": [], "DB1": [MIGRATION], "DB2": [MIGRATION]}

    # No read lands on a copy without the column, on either read path.
    for path in ("AUTO", "COORDINATOR"):
        with read_path(path):
            assert read_the_new_column(12) == [], path
    # Writes go to the copy with the full schema; the others' wait in the journal.
    Destination.objects.create(name="during", desc="-")
    write_the_new_column("during", "new")
    assert Destination.objects.filter(name="during").count() == 1
    databases = drift.databases()
    assert databases["default"]["pending_writes"] == 0
    assert databases["DB1"]["pending_writes"] >= 2 and databases["DB2"]["pending_writes"] >= 2
    assert drift.direct("default", 'SELECT "extra" FROM "testapp_destination" WHERE "name" = %s', ["during"]) == [
        ("new",)]
    assert drift.direct("DB1", 'SELECT "id" FROM "testapp_destination" WHERE "name" = %s', ["during"]) == []

    # The operator's view: status (text and JSON), check, verify.
    text = drift.cli("status")
    assert text.returncode == 3, text.stdout + text.stderr
    lines = text.stdout.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("database"))
    assert {line.split()[0]: line.split()[1] for line in lines[header + 1:header + 4]} == behind
    for alias in ("DB1", "DB2"):
        assert any(line.startswith(f"{alias} is SCHEMA_BEHIND") and MIGRATION in line
                   for line in text.stdout.splitlines()), text.stdout
    as_json = json.loads(drift.cli("status", "--json").stdout)
    assert {db["name"]: (db["state"], db["missing_migrations"]) for db in as_json["databases"]} == {
        "default": ("RUNNING", []), "DB1": ("SCHEMA_BEHIND", [MIGRATION]), "DB2": ("SCHEMA_BEHIND", [MIGRATION])}
    check = drift.cli("check")
    assert check.returncode == 0, check.stderr
    assert "django_lb_shm.W035" in check.stderr and MIGRATION in check.stderr, check.stderr
    assert "DB1" in check.stderr and "DB2" in check.stderr
    # Django runs checks that read databases when the command names one (as `migrate` does).
    assert "django_lb_shm.W035" in drift.manage("check", "--database", "default").stderr
    assert "W035" not in drift.manage("check").stderr
    # The state is in shared memory, for what reads it (zero-hop reads, metrics).
    shared = SharedState.attach_untracked(drift.handle.segment_name)
    try:
        assert [shared.state(i) for i in range(3)] == [DbState.RUNNING, DbState.SCHEMA_BEHIND, DbState.SCHEMA_BEHIND]
        assert int(DbState.SCHEMA_BEHIND) == 9
    finally:
        shared.close()
    verify = drift.cli("verify", "--no-progress")
    assert verify.returncode == 1, verify.stdout + verify.stderr
    schema_line = next(line for line in verify.stdout.splitlines() if line.startswith("testapp_destination"))
    assert "SCHEMA" in schema_line and "DB1: no column extra" in schema_line and "DB2: no column extra" in schema_line
    assert "default:" not in schema_line

    # `djangoloadbalancer migrate` while the coordinator runs: every copy comes back by itself.
    migrated = drift.cli("migrate")
    assert migrated.returncode == 0, migrated.stdout + migrated.stderr
    took = drift.wait_states(dict.fromkeys(ALIASES, "RUNNING"), timeout=30)
    assert took < RUNNING_AGAIN_WITHIN, took
    drift.handle.wait_drained()
    for alias in ALIASES:
        assert drift.direct(alias, 'SELECT "name", "extra" FROM "testapp_destination" ORDER BY "name"') == [
            ("before", None), ("during", "new")], alias
    assert {db["name"]: db["missing_migrations"] for db in drift.handle.status()["databases"]} == dict.fromkeys(
        ALIASES, [])
    assert read_the_new_column(12) == []
    verify = drift.cli("verify", "--no-progress")
    assert verify.returncode == 0, verify.stdout + verify.stderr
    check = drift.cli("check")
    assert check.returncode == 0 and "W035" not in check.stderr, check.stderr

    # verify also names a table that one copy lacks.
    drift.direct("DB2", 'DROP TABLE "testapp_token"')
    verify = drift.cli("verify", "--no-progress")
    assert verify.returncode == 1, verify.stdout + verify.stderr
    token = next(line for line in verify.stdout.splitlines() if line.startswith("testapp_token"))
    assert "SCHEMA" in token and "DB2: no table testapp_token" in token, verify.stdout


# WAIT_TIME 4 s: the write below reaches the other copies before the coordinator's next look.
@pytest.mark.parametrize("drift", [{"WAIT_TIME": 4}], indirect=True)
def test_a_copy_migrated_while_the_coordinator_runs_is_noticed_without_a_restart(drift):
    Destination.objects.create(name="first", desc="-")
    drift.handle.wait_drained()
    drift.add_migration()
    # DB1 is where writes run first: it is migrated alone, and a write of the new column follows at
    # once, before the coordinator's next look at the copies. The others cannot apply it: they
    # must wait for their migration (SCHEMA_BEHIND), not be written off (DIVERGED).
    plain = drift.manage("migrate", "testapp", "--database", "DB1")
    assert plain.returncode == 0, plain.stdout + plain.stderr
    write_the_new_column("first", "at once")
    took = drift.wait_states({"default": "SCHEMA_BEHIND", "DB1": "RUNNING", "DB2": "SCHEMA_BEHIND"}, timeout=10)
    assert took < 2, took   # at once: the failed write made the coordinator look, not its next turn
    assert read_the_new_column(12) == []
    Destination.objects.create(name="second", desc="-")

    migrated = drift.cli("migrate")
    assert migrated.returncode == 0, migrated.stdout + migrated.stderr
    took = drift.wait_states(dict.fromkeys(ALIASES, "RUNNING"), timeout=30)
    assert took < RUNNING_AGAIN_WITHIN, took
    drift.handle.wait_drained()
    for alias in ALIASES:
        assert drift.direct(alias, 'SELECT "name", "extra" FROM "testapp_destination" ORDER BY "name"') == [
            ("first", "at once"), ("second", None)], alias
    verify = drift.cli("verify", "--no-progress")
    assert verify.returncode == 0, verify.stdout + verify.stderr


def test_djangoloadbalancer_migrate_under_writes_neither_blocks_nor_loses_any(drift):
    # A migration that holds its transaction (SQLite: the file's write lock) for a while, on one
    # copy after the other, while an app thread writes: no write fails, nothing waits for good,
    # and the copies end identical.
    slow = MIGRATION_FILE.replace("operations = [", "operations = [migrations.RunPython(lambda apps, editor: "
                                                    "__import__('time').sleep(1.0)), ")
    (drift.migrations / "0004_destination_extra.py").write_text(slow)
    stop, errors, written = threading.Event(), [], []

    def write() -> None:
        while not stop.is_set():
            try:
                written.append(Destination.objects.create(name=f"w{len(written)}", desc="-").pk)
            except Exception as exc:
                errors.append(f"{type(exc).__name__}: {exc}")
            time.sleep(0.005)

    writer = threading.Thread(target=write)
    writer.start()
    try:
        migrated = drift.cli("migrate")
        time.sleep(0.5)
    finally:
        stop.set()
        writer.join(60)
    assert migrated.returncode == 0, migrated.stdout + migrated.stderr
    assert errors == [] and len(written) > 20, errors[:3]
    drift.wait_states(dict.fromkeys(ALIASES, "RUNNING"), timeout=RUNNING_AGAIN_WITHIN)
    drift.handle.wait_drained()
    verify = drift.cli("verify", "--no-progress")
    assert verify.returncode == 0, verify.stdout + verify.stderr
    assert re.search(rf"^testapp_destination\s+{len(written)} rows\s+OK$", verify.stdout, re.M), verify.stdout


# -- what "behind" means ---------------------------------------------------------------------------
def test_behind_means_lacking_migrations_a_copy_with_all_of_its_own_has():
    base = frozenset({"app.0001", "app.0002"})
    ahead = base | {"app.0003"}
    # One copy migrated first: the others are behind it; the one ahead is not behind anyone.
    assert behind_copies({"a": ahead, "b": base, "c": base}) == {"b": ("app.0003",), "c": ("app.0003",)}
    assert behind_copies({"a": ahead, "b": ahead}) == {}
    # Two branches migrated on different copies: neither is older, so neither is behind the
    # other (marking both would leave no copy to serve) ...
    left, right = base | {"app.0003_left"}, base | {"app.0003_right"}
    assert behind_copies({"a": left, "b": right}) == {}
    # ... but a copy with both is ahead of each, and one with neither is behind all.
    assert behind_copies({"a": left, "b": right, "c": left | right, "d": base}) == {
        "a": ("app.0003_right",), "b": ("app.0003_left",), "d": ("app.0003_left", "app.0003_right")}
    assert behind_copies({}) == {}

"""Resync (issue 18), with real processes: a DIVERGED copy refilled while app processes read and
write; a resync killed midway and run again; a coordinator killed during a resync.

The copy under test is a follower (DB2); the leader is DB1, so the default source is 'default'.
"""
from __future__ import annotations

import contextlib
import json
import multiprocessing
import os
import signal
import subprocess
import sys
import time
import uuid
from typing import Optional
from pathlib import Path

import pytest
from django.db import connections

from tests.support.lb import BACKEND, LAUNCHER, REPO, CoordinatorHandle
from tests.support.waiting import NOT_ANSWERING, wait_until
from tests.support.resync_workers import app_loop
from tests.testapp.models import Author, Book, Destination, Review, Tag

pytestmark = pytest.mark.slow

TARGET = "DB2"
STATIC_ROWS = 3000
SPAWN = multiprocessing.get_context("spawn")


# -- helpers ------------------------------------------------------------------------------------
def resync_command(handle: CoordinatorHandle, alias: str, *args: str) -> list[str]:
    return [sys.executable, str(LAUNCHER), "resync", alias, *args]


def run_resync(handle: CoordinatorHandle, alias: str, *args: str, timeout: float = 180) -> tuple[int, str]:
    done = subprocess.run(resync_command(handle, alias, *args), cwd=str(REPO), env=handle.env(),
                          capture_output=True, text=True, timeout=timeout)
    return done.returncode, done.stdout + done.stderr


def start_resync(handle: CoordinatorHandle, alias: str, *args: str, log: Path) -> subprocess.Popen:
    with open(log, "wb") as out:
        return subprocess.Popen(resync_command(handle, alias, *args), cwd=str(REPO), env=handle.env(),
                                stdout=out, stderr=subprocess.STDOUT)


def state_of(handle: CoordinatorHandle, alias: str) -> dict:
    return next(d for d in handle.status()["databases"] if d["name"] == alias)


def wait_copying(handle: CoordinatorHandle, alias: str, proc: subprocess.Popen, timeout: float = 60) -> dict:
    """Until the resync of ``alias`` has copied rows (its command has reported them)."""
    def copying() -> Optional[dict]:
        assert proc.poll() is None, f"the resync ended early ({proc.returncode})"
        db = state_of(handle, alias)
        copied = db["state"] == "RESYNCING" and db.get("resync", {}).get("progress", {}).get("copied_rows", 0) > 0
        return db if copied else None

    return wait_until(copying, timeout, f"{alias} to be copied", every=0.1, describe=lambda: state_of(handle, alias))


def insert_behind_the_back(alias: str, **values) -> None:
    """A row written to one copy directly, as an operator's mistake would."""
    connection = connections[alias]
    author = Author(**values)
    fields = Author._meta.local_concrete_fields
    for field in fields:
        field.pre_save(author, add=True)
    columns = ", ".join(connection.ops.quote_name(f.column) for f in fields)
    params = [f.get_db_prep_save(getattr(author, f.attname), connection) for f in fields]
    with connection.cursor() as cursor:
        cursor.execute(f"INSERT INTO testapp_author ({columns}) VALUES ({', '.join(['%s'] * len(fields))})", params)


def make_diverged(handle: CoordinatorHandle, alias: str) -> None:
    insert_behind_the_back(alias, id=10 ** 9, name="only-once")
    Author.objects.create(name="only-once")        # fine on the leader, refused on ``alias``
    handle.wait_state(alias, "DIVERGED", timeout=20)


def seed_static_rows() -> None:
    Destination.objects.bulk_create([Destination(name=f"static-{i}", desc="x" * 40) for i in range(STATIC_ROWS)],
                                    batch_size=1000)


def seed_related_rows() -> None:
    """Rows with foreign keys and a many-to-many table: loaded with the constraints checked at COMMIT."""
    tags = [Tag.objects.create(label=f"tag-{i}") for i in range(3)]
    for i in range(5):
        book = Book.objects.create(title=f"book-{i}", author=Author.objects.create(name=f"writer-{i}"), price="9.50")
        book.tags.add(*tags[: i % 3 + 1])
        Review.objects.create(book=book, stars=i % 5, text="fine")


def open_raw(entry: dict):
    """A plain DB-API connection to a DATABASES entry (one this process's settings may not name)."""
    if "sqlite" in entry["ENGINE"]:
        import sqlite3

        return sqlite3.connect(entry["NAME"])
    import psycopg

    return psycopg.connect(host=entry["HOST"], port=entry["PORT"], user=entry["USER"], dbname=entry["NAME"],
                           autocommit=True)


def next_keys(entry: dict) -> dict:
    """Where each load-balanced table's generated keys go on (PostgreSQL: its sequence; SQLite: sqlite_sequence)."""
    from django_lb_shm.ops.resync import copy_plan

    found = {}
    with contextlib.closing(open_raw(entry)) as db:
        for spec in copy_plan("default")[0]:
            if "sqlite" in entry["ENGINE"]:
                row = db.execute("SELECT seq FROM sqlite_sequence WHERE name = ?", [spec.table]).fetchone()
                found[spec.table] = row[0] if row else None
                continue
            key = spec.pk_columns[0]
            sequence = db.execute("SELECT pg_get_serial_sequence(%s, %s)", [spec.table, key]).fetchone()[0]
            if sequence:
                last_value, is_called = db.execute(f"SELECT last_value, is_called FROM {sequence}").fetchone()
                top = db.execute(f'SELECT MAX("{key}") FROM "{spec.table}"').fetchone()[0]
                found[spec.table] = (top is None or (last_value >= top and is_called), last_value, top)
    return found


def assert_keys_go_on_past_the_copy(copy: dict, source: dict) -> None:
    """PostgreSQL: every sequence past the copied keys (as sqlsequencereset); SQLite: as on the source."""
    keys = next_keys(copy)
    if "sqlite" in copy["ENGINE"]:
        assert keys == next_keys(source)
    else:
        assert all(past for past, _value, _top in keys.values()), keys


def run_verify(handle: CoordinatorHandle) -> tuple[int, str]:
    done = subprocess.run([sys.executable, str(LAUNCHER), "verify", "--no-progress"], cwd=str(REPO),
                          env=handle.env(), capture_output=True, text=True, timeout=120)
    return done.returncode, done.stdout + done.stderr


class Apps:
    """Three app processes reading and writing (bounded in count and time) until stopped."""

    def __init__(self, handle: CoordinatorHandle, count: int = 3, max_seconds: float = 90, atomic_every: int = 10):
        self.stop = SPAWN.Event()
        self.results = SPAWN.Queue()
        self.procs = [SPAWN.Process(target=app_loop, args=(str(handle.config_path), f"app{n}", 5000, max_seconds,
                                                           STATIC_ROWS, self.stop, self.results, atomic_every))
                      for n in range(count)]

    def __enter__(self) -> "Apps":
        for proc in self.procs:
            proc.start()
        return self

    def finish(self) -> list[dict]:
        self.stop.set()
        outcomes = [self.results.get(timeout=120) for _ in self.procs]
        for proc in self.procs:
            proc.join(30)
        return outcomes

    def __exit__(self, *exc) -> None:
        self.stop.set()
        for proc in self.procs:
            proc.join(30)
            if proc.is_alive():
                proc.kill()


@pytest.fixture
def handle(lb_factory, tmp_path):
    return lb_factory("resync", JOURNAL_DIR=str(tmp_path / "journal"))


@pytest.fixture(autouse=True)
def copies_alike_afterwards():
    """The next tests (other coordinators, other journals) need copies alike, whatever this one left."""
    yield
    from tests.support.lb import ALIASES, clear_tables, stop_all_coordinators

    stop_all_coordinators()
    for alias in ALIASES:
        connections[alias].close()
    clear_tables()
    marker = "django_lb_shm_applied"
    rows = {}
    for alias in ALIASES:
        with connections[alias].cursor() as cursor:
            cursor.execute(f"SELECT seq, tag FROM {marker} WHERE id = 1")
            rows[alias] = cursor.fetchone()
    seq, tag = max(rows.values())
    for alias in ALIASES:
        with connections[alias].cursor() as cursor:
            cursor.execute(f"UPDATE {marker} SET seq = %s, tag = %s WHERE id = 1", [seq, abs(tag)])
        connections[alias].close()


# -- a DIVERGED copy, resynced under load ---------------------------------------------------------
def test_a_diverged_copy_is_resynced_while_apps_read_and_write(handle):
    seed_static_rows()
    seed_related_rows()
    make_diverged(handle, TARGET)
    with Apps(handle) as apps:
        time.sleep(1.5)   # the apps are reading and writing
        # slow enough (6 s) for the journal to be trimmed meanwhile: the resync's pin must hold
        code, out = run_resync(handle, TARGET, "--chunk-size", "300", "--max-rate", "500")
        time.sleep(1.0)   # and go on after it, with the copy back in the reads
        outcomes = apps.finish()
    assert code == 0, out
    assert "RUNNING and identical to default" in out, out
    for outcome in outcomes:
        assert outcome["errors"] == [], outcome
        assert outcome["wrong_count"] == 0, outcome
        assert outcome["ops"] > 5, outcome
    assert state_of(handle, TARGET)["state"] == "RUNNING"
    handle.wait_drained()
    code, out = run_verify(handle)
    assert code == 0, out
    assert Author.objects.filter(name="only-once").count() == 1
    assert_keys_go_on_past_the_copy(connections[TARGET].settings_dict, connections["default"].settings_dict)


def test_the_leader_itself_is_resynced_while_apps_write(handle):
    """A RUNNING copy, and the one every write runs on first: the writes move to the next copy."""
    seed_static_rows()
    with Apps(handle, count=2) as apps:
        time.sleep(1.0)
        code, out = run_resync(handle, "DB1", "--max-rate", "1500")
        outcomes = apps.finish()
    assert code == 0 and "resync of DB1 from default" in out, out   # (DB2 leads meanwhile)
    for outcome in outcomes:
        assert outcome["errors"] == [] and outcome["wrong_count"] == 0, outcome
    handle.wait_drained()
    code, out = run_verify(handle)
    assert code == 0, out


# -- interrupted resyncs ----------------------------------------------------------------------------
def watch_states(handle: CoordinatorHandle, alias: str, seconds: float) -> list[str]:
    seen, deadline = [], time.monotonic() + seconds
    while time.monotonic() < deadline:
        seen.append(state_of(handle, alias)["state"])
        time.sleep(0.1)
    return seen


def assert_reads_whole() -> None:
    for _ in range(12):
        assert Destination.objects.count() == STATIC_ROWS


def test_a_resync_killed_midway_is_run_again(handle, tmp_path):
    seed_static_rows()
    make_diverged(handle, TARGET)
    first = start_resync(handle, TARGET, "--chunk-size", "100", "--max-rate", "400", log=tmp_path / "first.log")
    wait_copying(handle, TARGET, first)
    shown = subprocess.run([sys.executable, str(LAUNCHER), "status"], cwd=str(REPO), env=handle.env(),
                           capture_output=True, text=True, timeout=60)
    assert shown.returncode == 3 and f"{TARGET} is RESYNCING" in shown.stdout, shown.stdout + shown.stderr
    assert f"resync from default by pid {first.pid}" in shown.stdout and "rows copied" in shown.stdout, shown.stdout
    code, out = run_resync(handle, TARGET)   # a second one while the first runs: refused, the first goes on
    assert code == 1 and f"a resync of '{TARGET}' is running (pid {first.pid}" in out, out
    assert first.poll() is None and state_of(handle, TARGET)["state"] == "RESYNCING"
    os.kill(first.pid, signal.SIGKILL)
    first.wait(10)

    states = watch_states(handle, TARGET, 1.0)
    assert "RUNNING" not in states, states
    assert_reads_whole()
    for i in range(20):
        Author.objects.create(name=f"after-the-kill-{i}")

    code, out = run_resync(handle, TARGET)
    assert code == 0, out
    assert "RUNNING and identical to default" in out, out
    assert "taking over from pid" in handle.log(), handle.log()
    handle.wait_drained()
    code, out = run_verify(handle)
    assert code == 0, out


def test_a_coordinator_killed_during_a_resync_keeps_the_copy_out_until_a_resync_completes(handle, tmp_path):
    seed_static_rows()
    make_diverged(handle, TARGET)
    first = start_resync(handle, TARGET, "--chunk-size", "100", "--max-rate", "400", log=tmp_path / "first.log")
    wait_copying(handle, TARGET, first)
    os.kill(handle.coordinator_pid(), signal.SIGKILL)

    assert first.wait(120) == 1, (tmp_path / "first.log").read_text()
    first_log = (tmp_path / "first.log").read_text()
    assert "FAILED" in first_log and "stays out of reads" in first_log, first_log
    handle.wait_ready()
    handle.wait_state(TARGET, "NEW", timeout=30)
    states = watch_states(handle, TARGET, 3.0)
    assert set(states) == {"NEW"}, states
    assert "resync of it did not finish" in state_of(handle, TARGET)["last_error"]
    assert_reads_whole()
    for i in range(20):
        Author.objects.create(name=f"after-the-restart-{i}")

    code, out = run_resync(handle, TARGET)
    assert code == 0, out
    handle.wait_drained()
    code, out = run_verify(handle)
    assert code == 0, out


# -- a copy added, then removed, while the apps run ---------------------------------------------------
def new_database(tmp_path: Path) -> dict:
    """An empty database: a SQLite file made by `djangoloadbalancer migrate` (the coordinator never
    creates a missing file), or a PostgreSQL database the resync migrates itself."""
    if BACKEND == "postgres":
        server = pytest.lb_pg_cluster[0]
        return server.django_settings(server.create_database(f"lb_added_{uuid.uuid4().hex[:8]}"))
    return {"ENGINE": "django.db.backends.sqlite3", "NAME": str(tmp_path / "DB3.sqlite3")}


def change_databases(handle: CoordinatorHandle, aliases: list, extra: dict) -> None:
    """The operator's settings change, then SIGHUP to the djangoloadbalancer process."""
    settings = json.loads(handle.config_path.read_text())   # (this process and its apps keep the first ones)
    settings["DATABASES"].update(extra)
    settings["LOAD_BALANCER"]["DATABASES"] = aliases
    handle.config_path.write_text(json.dumps(settings, indent=1))


def wait_serving(handle: CoordinatorHandle, aliases: list, timeout: float = 60) -> dict:
    def serving() -> Optional[dict]:
        status = handle.status(timeout=2)
        ready = status["coordinator"]["state"] == "READY" and [d["name"] for d in status["databases"]] == aliases
        return status if ready else None

    try:
        return wait_until(serving, timeout, f"the coordinator to serve {aliases}", every=0.2, ignoring=NOT_ANSWERING)
    except AssertionError as exc:
        raise AssertionError(f"{exc}:\n{handle.log()}") from None


def test_a_fourth_copy_is_added_then_removed_while_apps_run(lb_factory, tmp_path):
    handle = lb_factory("grow", JOURNAL_DIR=str(tmp_path / "journal"), CONNECT_TIMEOUT=20)
    supervisor = handle.supervisor_pid
    seed_static_rows()
    seed_related_rows()
    Review.objects.filter(pk=Review.objects.create(book=Book.objects.first(), stars=1).pk).delete()   # keys used up
    three = list(handle.lb["DATABASES"])
    four = three + ["DB3"]
    change_databases(handle, four, {"DB3": new_database(tmp_path)})
    if BACKEND == "sqlite":
        done = subprocess.run([sys.executable, str(LAUNCHER), "migrate"], cwd=str(REPO), env=handle.env(),
                              capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stdout + done.stderr

    with Apps(handle, atomic_every=0) as apps:   # (apps keep the three copies of their settings)
        time.sleep(1.5)
        os.kill(supervisor, signal.SIGHUP)
        wait_serving(handle, four)
        handle.wait_state("DB3", "NEW", timeout=30)
        assert "fill it with `djangoloadbalancer resync DB3`" in state_of(handle, "DB3")["last_error"]
        code, out = run_resync(handle, "DB3")
        time.sleep(1.0)
        outcomes = apps.finish()
    assert code == 0, out
    if BACKEND == "postgres":   # an empty database: the resync migrated it first
        assert "migrate DB3: no migrations" not in out and "migrate DB3: " in out, out
    assert handle.proc.pid == supervisor and handle.proc.poll() is None
    for outcome in outcomes:
        assert outcome["errors"] == [] and outcome["wrong_count"] == 0, outcome
        assert outcome["ops"] > 5, outcome
    handle.wait_drained()
    code, out = run_verify(handle)
    assert code == 0 and "on default, DB1, DB2, DB3" in out, out
    settings = json.loads(handle.config_path.read_text())["DATABASES"]
    assert_keys_go_on_past_the_copy(settings["DB3"], settings["DB2"])   # (a fresh database: nothing there before)

    change_databases(handle, three, {})
    os.kill(supervisor, signal.SIGHUP)
    wait_serving(handle, three)
    for alias in three:
        handle.wait_state(alias, "RUNNING", timeout=30)
    Author.objects.create(name="after-the-removal")
    handle.wait_drained()
    code, out = run_verify(handle)
    assert code == 0 and "on default, DB1, DB2." in out, out


# -- the command's surface -------------------------------------------------------------------------------
def test_resync_refuses_bad_arguments_with_exit_2(handle):
    for args, message in ((["NOPE"], "'NOPE' is not in LOAD_BALANCER['DATABASES']"),
                          ([TARGET, "--from", TARGET], "cannot be resynced from itself"),
                          ([TARGET, "--chunk-size", "0"], "--chunk-size must be at least 1")):
        code, out = run_resync(handle, *args)
        assert code == 2 and message in out, out
    done = subprocess.run([sys.executable, "-m", "django", "loadbalancer", "resync", "NOPE"], cwd=str(REPO),
                          env=handle.env(), capture_output=True, text=True, timeout=60)   # manage.py loadbalancer
    assert done.returncode == 2 and "'NOPE' is not in" in done.stdout, done.stdout + done.stderr
    assert state_of(handle, TARGET)["state"] == "RUNNING"


def test_a_resync_from_a_copy_that_is_not_running_is_refused_and_changes_nothing(handle):
    make_diverged(handle, TARGET)
    code, out = run_resync(handle, "DB1", "--from", TARGET)
    assert code == 1 and "the source 'DB2' is DIVERGED, not RUNNING" in out, out
    assert {d["name"]: d["state"] for d in handle.status()["databases"]} == {
        "default": "RUNNING", "DB1": "RUNNING", TARGET: "DIVERGED"}


def test_tables_are_copied_referenced_ones_first():
    from django_lb_shm.ops.resync import copy_plan

    specs, models = copy_plan("default")
    order = [spec.table for spec in specs]
    for child, parent in (("testapp_book", "testapp_author"), ("testapp_review", "testapp_book"),
                          ("testapp_book_tags", "testapp_book"), ("testapp_book_tags", "testapp_tag")):
        assert order.index(parent) < order.index(child), order
    assert "django_lb_shm_applied" not in order and "testapp_note" not in order   # (not load-balanced)
    assert [m._meta.db_table for m in models] == order

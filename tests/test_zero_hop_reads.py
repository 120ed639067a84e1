"""Issue 15: zero-hop reads.

An app process on the coordinator's host picks the copy from shared memory and
runs the read on its own connection; the coordinator is not on the read path.
Real databases, real coordinator processes, real app processes.
"""
from __future__ import annotations

import logging
import multiprocessing
import os
import signal
import threading
import time

import pytest
from django.db import connections, transaction

import django_lb_shm
from django_lb_shm.client import reads
from django_lb_shm.shm import state as shared_state
from django_lb_shm.settings.validation import find_problems
from django_lb_shm.errors import QueryTimeout
from django_lb_shm.client.reads import zero_hop_reader
from django_lb_shm.shm.state import Reader
from tests.support import workers
from tests.support.delay_proxy import DelayProxy
from tests.support.lb import ALIASES, BACKEND, base_settings, read_path
from tests.support.threads import Workers, run_threads
from tests.support.waiting import wait_until
from tests.testapp.models import Author

SPAWN = multiprocessing.get_context("spawn")


def counters(handle) -> dict:
    """Per database: (reads through the coordinator, zero-hop reads of app processes, all reads)."""
    return {d["name"]: (d["coordinator_reads"], d["zero_hop_reads"], d["reads"]) for d in handle.status()["databases"]}


def delta(before: dict, after: dict, part: int) -> dict:
    return {name: after[name][part] - before[name][part] for name in after}


def do_reads(n: int, pk: int) -> None:
    for _ in range(n):
        assert Author.objects.filter(pk=pk).exists()


def reset_reader() -> None:
    reads._reader, reads._reader_key, reads._next_try = None, (), 0.0


# -- the read goes around the coordinator --------------------------------------------------------
def test_reads_bypass_the_coordinator_and_are_counted_per_copy(coordinator):
    author = Author.objects.create(name="zero")
    coordinator.wait_drained()
    before = counters(coordinator)
    requests_before = coordinator.status()["coordinator"]["requests"]
    do_reads(30, author.pk)
    after = counters(coordinator)
    assert zero_hop_reader() is not None
    assert delta(before, after, 0) == {name: 0 for name in ALIASES}          # none through the coordinator
    assert delta(before, after, 1) == {name: 10 for name in ALIASES}         # round robin, here
    assert delta(before, after, 2) == {name: 10 for name in ALIASES}         # and status counts them
    # the status calls themselves are the only requests the coordinator saw
    assert coordinator.status()["coordinator"]["requests"] - requests_before <= 3
    assert all(d["inflight_reads"] == 0 for d in coordinator.status()["databases"])


def test_reads_go_on_while_the_coordinator_is_stopped_and_writes_wait(lb_factory):
    handle = lb_factory("sigstop", CLIENT_TIMEOUT=10)
    author = Author.objects.create(name="before-stop")
    handle.wait_drained()
    do_reads(3, author.pk)   # connections opened
    pid = handle.coordinator_pid()
    os.kill(pid, signal.SIGSTOP)
    written = threading.Event()

    def write() -> None:
        Author.objects.create(name="while-stopped")
        written.set()

    writer = Workers(write, 1, cleanup=connections.close_all)
    try:
        started = time.monotonic()
        do_reads(200, author.pk)
        assert time.monotonic() - started < 5
        writer.start()
        time.sleep(1.0)
        assert not written.is_set()   # writes need the coordinator
        do_reads(20, author.pk)
    finally:
        os.kill(pid, signal.SIGCONT)
    writer.join(15)   # fails with the write's own error, if it raised
    assert written.is_set()
    assert Author.objects.filter(name="while-stopped").exists()
    assert handle.coordinator_pid() == pid


def test_read_path_coordinator_forces_the_round_trip(coordinator):
    author = Author.objects.create(name="forced")
    coordinator.wait_drained()
    with read_path("COORDINATOR"):
        assert zero_hop_reader() is None
        before = counters(coordinator)
        do_reads(12, author.pk)
        after = counters(coordinator)
    assert delta(before, after, 1) == {name: 0 for name in ALIASES}
    assert delta(before, after, 0) == {name: 4 for name in ALIASES}


@pytest.mark.parametrize("value,ok", [("AUTO", True), ("COORDINATOR", True), ("auto", False), ("DIRECT", False),
                                      (1, False)])
def test_read_path_is_checked(value, ok):
    lb = dict(base_settings()["LOAD_BALANCER"], READ_PATH=value)
    ids = [p.id for p in find_problems(lb, base_settings()["DATABASES"])]
    assert ids == ([] if ok else ["django_lb_shm.E026"])


# -- algorithms on the zero-hop path ---------------------------------------------------------------
@pytest.mark.parametrize("r_algorithm,expected", [
    ({"NAME": "ROUND_ROBIN"}, {"default": 100, "DB1": 100, "DB2": 100}),
    ({"NAME": "ROUND_ROBIN", "WEIGHTS": {"default": 3, "DB2": 0}}, {"default": 225, "DB1": 75, "DB2": 0}),
    ({"NAME": "ROUND_ROBIN", "EXCLUDE": ["default"]}, {"default": 0, "DB1": 150, "DB2": 150}),
    ({"NAME": "tests.test_read_algorithms.PreferLast"}, {"default": 0, "DB1": 0, "DB2": 300}),
])
def test_algorithms_distribute_as_specified_on_the_zero_hop_path(lb_factory, r_algorithm, expected):
    handle = lb_factory("algo", R_ALGORITHM=r_algorithm)
    author = Author.objects.create(name="algo")
    handle.wait_drained()
    before = counters(handle)
    do_reads(300, author.pk)
    after = counters(handle)
    assert delta(before, after, 1) == expected
    assert delta(before, after, 0) == {name: 0 for name in ALIASES}


def test_least_connections_sees_the_in_flight_reads_of_other_processes(lb_factory):
    handle = lb_factory("lc-shared", R_ALGORITHM={"NAME": "LEAST_CONNECTIONS"})
    author = Author.objects.create(name="lc")
    handle.wait_drained()
    do_reads(1, author.pk)
    # Another reader slot, claimed as any app thread claims one (flock), with reads in flight on
    # default and DB1 (as another process would have them): this process must send its reads to DB2.
    other = zero_hop_reader()._claim()
    values = other.values
    shared = zero_hop_reader().shared
    for db, inflight in ((0, 3), (1, 2)):
        values[shared.reader_index(other.slot, db, Reader.INFLIGHT)] = inflight
    try:
        assert [d["inflight_reads"] for d in handle.status()["databases"]] == [3, 2, 0]
        before = counters(handle)
        do_reads(30, author.pk)
        assert delta(before, counters(handle), 1) == {"default": 0, "DB1": 0, "DB2": 30}
    finally:
        for db in (0, 1):
            values[shared.reader_index(other.slot, db, Reader.INFLIGHT)] = 0
        other._finalizer()


def test_latency_of_app_reads_feeds_the_shared_average(lb_factory):
    # ROUND_ROBIN runs no probes: only reads measure latency, and here only this process reads.
    handle = lb_factory("latency", R_ALGORITHM={"NAME": "ROUND_ROBIN"})
    author = Author.objects.create(name="lat")
    handle.wait_drained()
    do_reads(30, author.pk)
    wait_until(lambda: all(d["latency_ms"] > 0 for d in handle.status()["databases"]), 5,
               "a latency measured on every database", every=0.1, describe=lambda: handle.status()["databases"])
    assert delta({n: (0, 0, 0) for n in ALIASES}, counters(handle), 0) == {n: 0 for n in ALIASES}


@pytest.fixture
def slow_db2():
    if BACKEND != "postgres":
        pytest.skip("PostgreSQL-only test; run with LB_TEST_BACKEND=postgres")
    port = int(base_settings()["DATABASES"]["DB2"]["PORT"])
    proxy = DelayProxy(port, delay_s=0.004)
    yield {"DB2": {"PORT": str(proxy.port)}}
    proxy.stop()


@pytest.mark.postgres_only
def test_interval_time_avoids_the_slow_copy_on_the_zero_hop_path(lb_factory, slow_db2):
    handle = lb_factory("interval-zh", databases=slow_db2, R_ALGORITHM={"NAME": "INTERVAL_TIME", "INTERVAL": 0.2})
    author = Author.objects.create(name="it")
    time.sleep(1.0)  # a few probes
    before = counters(handle)
    do_reads(300, author.pk)
    reads_done = delta(before, counters(handle), 1)
    latency = {d["name"]: d["latency_ms"] for d in handle.status()["databases"]}
    assert latency["DB2"] > min(latency["default"], latency["DB1"]), latency
    assert sum(reads_done.values()) == 300
    assert reads_done["DB2"] <= 0.2 * 300, reads_done


@pytest.mark.postgres_only
def test_least_connections_shifts_reads_from_the_slow_copy_on_the_zero_hop_path(lb_factory, slow_db2):
    handle = lb_factory("lc-zh", databases=slow_db2, R_ALGORITHM={"NAME": "LEAST_CONNECTIONS"})
    author = Author.objects.create(name="lc")
    handle.wait_drained()
    before = counters(handle)

    run_threads(lambda: do_reads(60, author.pk), 6, 120, cleanup=connections.close_all)
    reads_done = delta(before, counters(handle), 1)
    assert sum(reads_done.values()) == 360
    assert reads_done["DB2"] < 0.25 * 360, reads_done


# -- copies that cannot serve ----------------------------------------------------------------------
@pytest.mark.postgres_only
def test_a_stopped_copy_gets_no_reads_and_the_coordinator_learns_of_it(lb_factory):
    handle = lb_factory("down-zh", WAIT_TIME=0.5)
    author = Author.objects.create(name="down")
    handle.wait_drained()
    do_reads(6, author.pk)   # this process's connections to every copy are open
    server = pytest.lb_pg_cluster.servers[ALIASES.index("DB2")]
    server.stop(mode="immediate")
    try:
        do_reads(6, author.pk)   # the read that hits DB2 fails on our connection and is retried elsewhere
        handle.wait_state("DB2", "DOWN", timeout=10)   # the coordinator probed it
        before = counters(handle)
        do_reads(60, author.pk)
        reads_done = delta(before, counters(handle), 2)
        assert reads_done["DB2"] == 0 and sum(reads_done.values()) == 60, reads_done
    finally:
        server.start()
    handle.wait_state("DB2", "RUNNING", timeout=30)
    before = counters(handle)
    do_reads(30, author.pk)
    assert delta(before, counters(handle), 1)["DB2"] > 0   # back in the rotation


@pytest.mark.postgres_only
def test_a_kept_connection_the_server_closed_is_reopened_once_and_the_copy_keeps_its_reads(lb_factory):
    """A server restart or an idle-session timeout ends this process's kept connection to a copy that
    is up: the read is tried once more on a new connection there (before: the copy was left out of
    this process's reads for a second, and Django's own tests after a restart saw it get none).
    A copy that does not answer the new connection either is counted and probed (the test above)."""
    handle = lb_factory("failed-conn")
    author = Author.objects.create(name="conn")
    handle.wait_drained()
    do_reads(6, author.pk)
    state = zero_hop_reader()._local.state
    victim = state.wrappers[ALIASES.index("DB1")].connection.info.backend_pid
    with connections["DB1"].cursor() as cursor:   # a direct connection kills ours
        cursor.execute("SELECT pg_terminate_backend(%s)", [victim])
    before = counters(handle)
    failures_before = handle_failures("DB1")
    do_reads(6, author.pk)                          # no error reaches the app
    reads_done = delta(before, counters(handle), 2)
    assert reads_done == {alias: 2 for alias in ALIASES}, reads_done   # DB1 still in the rotation
    assert handle_failures("DB1") == failures_before
    assert state.wrappers[ALIASES.index("DB1")].connection.info.backend_pid != victim
    assert handle.status()["databases"][ALIASES.index("DB1")]["state"] == "RUNNING"


def handle_failures(alias: str) -> float:
    shared = zero_hop_reader().shared
    return shared.reader_sum(ALIASES.index(alias), Reader.FAILURES)


SLOW_READ = {
    "sqlite": "WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c WHERE x < 20000000) SELECT count(*) FROM c",
    "postgresql": "SELECT pg_sleep(6)",
}


def test_read_timeout_bounds_a_read_on_the_apps_connection(lb_factory):
    handle = lb_factory("timeout-zh", READ_TIMEOUT=0.5, WAIT_TIME=0.5)
    Author.objects.create(name="t")
    handle.wait_drained()
    shared = None
    started = time.monotonic()
    from django_lb_shm.backend.alias import lb_alias

    with pytest.raises(QueryTimeout, match="takes longer than READ_TIMEOUT"):
        with connections[lb_alias()].cursor() as cursor:
            cursor.execute(SLOW_READ[connections[lb_alias()].vendor])
    assert time.monotonic() - started < 3
    shared = zero_hop_reader().shared
    # cut once, reported; the coordinator probed that copy, which answered: the query is slow
    assert sum(shared.reader_sum(i, Reader.TIMEOUTS) for i in range(len(ALIASES))) == 1
    assert handle.log().count("did not finish a read within 0.50 s; it was cut (an app process's own "
                              "connection): probing it") == 1
    assert {d["state"] for d in handle.status()["databases"]} == {"RUNNING"}
    assert " is UNRESPONSIVE" not in handle.log() and " is DOWN" not in handle.log(), handle.log()
    assert Author.objects.filter(name="t").exists()


# -- read-your-writes across processes ---------------------------------------------------------
@pytest.fixture
def lagging_db2():
    """PostgreSQL: DB2 behind a proxy that delays its answers (its writes lag); SQLite: as it is."""
    if BACKEND != "postgres":
        yield {}
        return
    port = int(base_settings()["DATABASES"]["DB2"]["PORT"])
    proxy = DelayProxy(port, delay_s=0.01)
    yield {"DB2": {"PORT": str(proxy.port)}}
    proxy.stop()


def test_a_read_after_an_acknowledged_write_of_another_process_sees_it(lb_factory, lagging_db2):
    handle = lb_factory("ryw", databases=lagging_db2, R_ALGORITHM={"NAME": "ROUND_ROBIN"})
    handle.wait_drained()
    before = counters(handle)
    announce, results, done = SPAWN.Queue(), SPAWN.Queue(), SPAWN.Queue()
    settings_json = str(handle.config_path)
    reader = SPAWN.Process(target=workers.read_back_announced, args=(settings_json, announce, results, 60, done))
    writer = SPAWN.Process(target=workers.write_and_announce, args=(settings_json, "ryw", 60, announce, done))
    reader.start()
    writer.start()
    try:
        outcome = results.get(timeout=120)
    finally:
        for proc in (writer, reader):
            proc.join(30)
            if proc.is_alive():
                proc.kill()
    assert outcome["zero_hop"] and outcome["seen"] == 60, outcome
    assert outcome["misses"] == [] and outcome["errors"] == [], outcome
    reads_done = delta(before, counters(handle), 1)
    assert sum(reads_done.values()) >= 60, reads_done   # the read-backs ran in the reading process
    assert sum(delta(before, counters(handle), 0).values()) == 0, "a read-back took the coordinator path"
    if lagging_db2:
        # DB2 lagged behind every write: the read-backs went to copies that had applied it
        assert reads_done["DB2"] < sum(reads_done.values()) / 3, reads_done


# -- transactions ---------------------------------------------------------------------------------
def test_inside_atomic_reads_stay_on_the_leaders_transaction_after_the_first_write(coordinator):
    author = Author.objects.create(name="outside")
    coordinator.wait_drained()
    before = counters(coordinator)
    with django_lb_shm.atomic():
        assert Author.objects.filter(pk=author.pk).exists()          # before any write: zero-hop
        middle = counters(coordinator)
        Author.objects.create(name="inside")
        assert Author.objects.filter(name="inside").exists()         # only the leader's transaction has it
        assert Author.objects.filter(name="inside").count() == 1
        after = counters(coordinator)
    assert sum(delta(before, middle, 1).values()) == 1
    assert sum(delta(middle, after, 1).values()) == 0
    assert Author.objects.filter(name="inside").exists()


def test_a_zero_hop_read_does_not_touch_the_apps_own_connection_to_a_copy(coordinator):
    author = Author.objects.create(name="own")
    coordinator.wait_drained()
    with transaction.atomic(using="default"):
        with connections["default"].cursor() as cursor:
            cursor.execute('SELECT count(*) FROM "testapp_author"')
        do_reads(6, author.pk)   # two of them on 'default': on a private connection, not in this transaction
        assert connections["default"].in_atomic_block
    assert zero_hop_reader()._local.state.wrappers[0] is not connections["default"]


def test_a_cursors_description_is_its_own_statements_after_later_reads(coordinator):
    """The description of a zero-hop read is built when asked (PostgreSQL): still that read's
    columns after later reads ran on the same copy's connection."""
    from django_lb_shm.backend.alias import lb_alias

    author = Author.objects.create(name="described")
    coordinator.wait_drained()
    lb = connections[lb_alias()]
    before = counters(coordinator)
    first, later = lb.cursor(), lb.cursor()
    sql = 'SELECT "id", "name" AS "who" FROM "testapp_author" WHERE "id" = %s'
    with connections["default"].cursor() as direct:   # what Django's own cursor describes
        direct.execute(sql, [author.pk])
        expected = [(c.name, c.type_code) for c in direct.description] if lb.vendor == "postgresql" else None
    first.execute(sql, [author.pk])
    for _ in range(2 * len(ALIASES)):   # every copy's connection runs another statement meanwhile
        later.execute('SELECT count(*) AS "n", max("id") AS "top", 1 AS "one" FROM "testapp_author"')
    assert [c[0] for c in later.description] == ["n", "top", "one"]
    assert [c[0] for c in first.description] == ["id", "who"]
    if lb.vendor == "postgresql":   # psycopg's own Column objects, as Django's cursors give
        assert [(c.name, c.type_code) for c in first.description] == expected
    assert first.fetchall() == [(author.pk, "described")]
    first.execute('SELECT "id" FROM "testapp_author" WHERE "id" = %s', [-1])
    assert [c[0] for c in first.description] == ["id"] and first.fetchall() == []
    first.close()
    later.close()
    after = counters(coordinator)
    assert delta(before, after, 0) == {name: 0 for name in ALIASES}   # all of them zero-hop
    assert sum(delta(before, after, 1).values()) == 2 + 2 * len(ALIASES)


def test_a_deferred_description_falls_back_to_plain_tuples(coordinator, monkeypatch):
    """Should psycopg's Column ever need more of a cursor than the kept result gives, the
    description is the coordinator path's (name, type_code, None x 5), not an error."""
    from django_lb_shm.backend.alias import lb_alias

    lb = connections[lb_alias()]
    if lb.vendor != "postgresql":
        pytest.skip("the description is deferred on PostgreSQL only")
    import psycopg

    class Unbuildable:
        def __init__(self, *args):
            raise AttributeError("needs a real cursor")

    author = Author.objects.create(name="plain")
    coordinator.wait_drained()
    with connections["default"].cursor() as direct:
        direct.execute('SELECT "id", "name" FROM "testapp_author" WHERE "id" = %s', [author.pk])
        expected = [(c.name, c.type_code, None, None, None, None, None) for c in direct.description]
    monkeypatch.setattr(psycopg, "Column", Unbuildable)
    before = counters(coordinator)
    with lb.cursor() as cursor:
        cursor.execute('SELECT "id", "name" FROM "testapp_author" WHERE "id" = %s', [author.pk])
        assert list(cursor.description) == expected
        assert cursor.fetchall() == [(author.pk, "plain")]
    assert sum(delta(before, counters(coordinator), 1).values()) == 1   # zero-hop, not the coordinator's form


# -- processes that cannot attach ---------------------------------------------------------------
def test_a_layout_version_mismatch_means_the_coordinator_path(coordinator, monkeypatch, caplog):
    author = Author.objects.create(name="layout")
    coordinator.wait_drained()
    monkeypatch.setattr(shared_state, "LAYOUT_VERSION", shared_state.LAYOUT_VERSION + 1)
    reset_reader()
    reads._warned.clear()
    try:
        with caplog.at_level(logging.WARNING, logger="django_lb_shm.reads"):
            before = counters(coordinator)
            do_reads(9, author.pk)
            after = counters(coordinator)
        assert zero_hop_reader() is None
        assert delta(before, after, 1) == {name: 0 for name in ALIASES}
        assert sum(delta(before, after, 0).values()) == 9
        assert "has layout version 2, this django_lb_shm reads version 3" in caplog.text
    finally:
        monkeypatch.undo()
        reset_reader()
    do_reads(3, author.pk)
    assert zero_hop_reader() is not None


# A process of another OS user: tests/test_local_users.py (it looks for its own uid's segment).

"""Issue 14, items 2 and 3, against real coordinators, databases and app processes.

* A slow query is the query's problem: concurrent reads past READ_TIMEOUT on healthy
  copies get QueryTimeout and leave every copy RUNNING and writing (both read paths); a
  database thread never runs a read long enough to hold up its copy's writes; a copy that
  does not answer a probe (its server SIGSTOPped) still leaves the read rotation.
* Nobody holds the write order unbounded: an app process stopped inside atomic() after a
  write loses the order after TRANSACTION_HOLD_TIMEOUT (and gets TransactionError when it
  wakes up); a leader whose server is stopped is cut and the writes go to the next one.
* `status` shows who holds the write order.
"""
from __future__ import annotations

import io
import multiprocessing
import os
import signal
import threading
import time

import psutil
import pytest
from django.db import connections

import django_lb_shm
from django_lb_shm.backend.alias import lb_alias
from django_lb_shm.cli import format_status
from django_lb_shm.settings.config import build_config
from django_lb_shm.settings.validation import find_problems
from django_lb_shm.errors import QueryTimeout, TransactionError
from django_lb_shm.ops.verify import EXIT_IDENTICAL, verify
from tests.support.fault_proxy import FaultProxy
from tests.support.hold_workers import write_then_wait_inside_atomic
from tests.support.lb import ALIASES, Replicas, base_settings, table_rows
from tests.support.waiting import wait_until
from tests.testapp.models import Author

SLOW_READ = {  # ~4-6 s unless cut
    "sqlite": "WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c WHERE x < 20000000) SELECT count(*) FROM c",
    "postgresql": "SELECT pg_sleep(4)",
}


def slow_read(outcomes: list) -> None:
    """Run SLOW_READ through the load-balanced alias (on this thread's own connections)."""
    try:
        with connections[lb_alias()].cursor() as cursor:
            cursor.execute(SLOW_READ[connections[lb_alias()].vendor])
        outcomes.append("answered")
    except QueryTimeout as exc:
        outcomes.append(("QueryTimeout", str(exc)))
    except Exception as exc:  # recorded, asserted below
        outcomes.append(repr(exc))
    finally:
        connections.close_all()


class Writer(threading.Thread):
    """Autocommit creates in a loop, bounded in count and time; records every outcome."""

    def __init__(self, prefix: str, limit: int = 600, seconds: float = 45.0, pause: float = 0.01):
        super().__init__(daemon=True)
        self.prefix, self.limit, self.seconds, self.pause = prefix, limit, seconds, pause
        self.stop = threading.Event()
        self.acked: list[str] = []
        self.errors: list[str] = []
        self.slowest = 0.0

    def run(self) -> None:
        deadline = time.monotonic() + self.seconds
        try:
            for i in range(self.limit):
                if self.stop.is_set() or time.monotonic() > deadline:
                    break
                name = f"{self.prefix}-{i}"
                started = time.monotonic()
                try:
                    Author.objects.create(name=name)
                    self.acked.append(name)
                except Exception as exc:
                    self.errors.append(f"{name}: {type(exc).__name__}: {exc}")
                self.slowest = max(self.slowest, time.monotonic() - started)
                time.sleep(self.pause)
        finally:
            connections.close_all()


class StateWatch(threading.Thread):
    """Every state each copy was seen in while it runs."""

    def __init__(self, handle):
        super().__init__(daemon=True)
        self.handle = handle
        self.stop = threading.Event()
        self.seen: set = set()

    def run(self) -> None:
        while not self.stop.is_set():
            try:
                for db in self.handle.status()["databases"]:
                    self.seen.add((db["name"], db["state"]))
            except Exception as exc:  # pragma: no cover - reported by the assertion
                self.seen.add(("status", repr(exc)))
            time.sleep(0.05)


# -- item 2: slow queries ---------------------------------------------------------------------------
@pytest.mark.parametrize("path", ["AUTO", "COORDINATOR"])
def test_concurrent_slow_reads_get_query_timeout_and_every_copy_stays_running(lb_factory, path):
    handle = lb_factory("slow-reads", READ_TIMEOUT=1.5, CLIENT_TIMEOUT=20, WAIT_TIME=0.5, READ_PATH=path)
    Author.objects.create(name="seed")
    handle.wait_drained()
    writer, watch = Writer("w"), StateWatch(handle)
    writer.start()
    watch.start()
    outcomes: list = []
    try:
        time.sleep(0.3)
        readers = [threading.Thread(target=slow_read, args=(outcomes,)) for _ in range(3)]
        started = time.monotonic()
        for reader in readers:
            reader.start()
        for reader in readers:
            reader.join(60)
        elapsed = time.monotonic() - started
        time.sleep(0.5)   # writes after the reads, too
    finally:
        writer.stop.set()
        writer.join(60)
        watch.stop.set()
        watch.join(10)
    assert [o[0] if isinstance(o, tuple) else o for o in outcomes] == ["QueryTimeout"] * 3, outcomes
    assert all("takes longer than READ_TIMEOUT" in o[1] for o in outcomes), outcomes
    assert elapsed < 1.5 + 3.5, elapsed   # cut, probed, answered: not the query's 4-6 s
    assert not writer.errors, writer.errors[:5]
    assert len(writer.acked) > 20
    assert watch.seen == {(name, "RUNNING") for name in ALIASES}, watch.seen
    log = handle.log()
    assert " is DOWN" not in log and " is UNRESPONSIVE" not in log, log
    Replicas(handle).assert_identical(["testapp_author"])


def test_a_slow_read_on_a_database_thread_does_not_hold_up_its_writes(lb_factory):
    # READ_CONNECTIONS=0: every coordinator read runs on a database thread, the one that also
    # applies that copy's writes.
    handle = lb_factory("slow-thread-reads", READ_CONNECTIONS=0, READ_TIMEOUT=1, CLIENT_TIMEOUT=20,
                        WAIT_TIME=0.5, READ_PATH="COORDINATOR")
    Author.objects.create(name="seed")
    handle.wait_drained()
    outcomes: list = []
    readers = [threading.Thread(target=slow_read, args=(outcomes,)) for _ in range(3)]   # one per copy
    started = time.monotonic()
    for reader in readers:
        reader.start()
    try:
        time.sleep(0.3)
        for i in range(20):
            Author.objects.create(name=f"during-{i}")
        # The reads would run for 4-6 s; bounded at READ_TIMEOUT, the copies have their writes by now.
        status = handle.wait_drained(timeout=max(0.5, started + 1 + 2.5 - time.monotonic()))
        assert {d["state"] for d in status["databases"]} == {"RUNNING"}, status["databases"]
    finally:
        for reader in readers:
            reader.join(60)
    assert [o[0] if isinstance(o, tuple) else o for o in outcomes] == ["QueryTimeout"] * 3, outcomes
    Replicas(handle).assert_identical(["testapp_author"])


def freeze(alias: str) -> list:
    """SIGSTOP a test PostgreSQL server (postmaster and backends): not down, just never answering."""
    server = pytest.lb_pg_cluster.servers[ALIASES.index(alias)]
    postmaster = psutil.Process(server.postmaster_pid())
    frozen = [postmaster] + postmaster.children(recursive=True)
    for proc in frozen:
        proc.send_signal(signal.SIGSTOP)
    return frozen


def thaw(frozen: list) -> None:
    for proc in frozen:
        try:
            proc.send_signal(signal.SIGCONT)
        except psutil.NoSuchProcess:
            pass


@pytest.mark.postgres_only
@pytest.mark.parametrize("path", ["AUTO", "COORDINATOR"])
def test_a_hung_copy_leaves_the_read_rotation_and_the_writes_go_on(lb_factory, path):
    handle = lb_factory("hung-follower", READ_TIMEOUT=1, CLIENT_TIMEOUT=20, WAIT_TIME=0.5, READ_PATH=path)
    author = Author.objects.create(name="h")
    handle.wait_drained()   # DB2 (a follower) has the row: a candidate for reads when it hangs
    frozen = freeze("DB2")
    try:
        started = time.monotonic()
        for i in range(9):
            assert Author.objects.filter(pk=author.pk).exists()
            Author.objects.create(name=f"while-hung-{i}")
        assert time.monotonic() - started < 8
        handle.wait_state("DB2", "UNRESPONSIVE", timeout=5)
    finally:
        thaw(frozen)
    handle.wait_state("DB2", "RUNNING", timeout=30)
    Replicas(handle).assert_identical(["testapp_author"])


# -- item 3: bounded holds ------------------------------------------------------------------------------
def test_a_stopped_client_inside_atomic_loses_the_write_order_after_the_hold_timeout(lb_factory, tmp_path):
    handle = lb_factory("stopped-client", TRANSACTION_HOLD_TIMEOUT=2, CLIENT_TIMEOUT=20)
    child = multiprocessing.get_context("spawn").Process(
        target=write_then_wait_inside_atomic, args=(str(handle.config_path), str(tmp_path)))
    child.start()
    try:
        wait_until(lambda: (tmp_path / "ready").exists() or not child.is_alive(), 60, "transaction opened", every=0.02)
        os.kill(child.pid, signal.SIGSTOP)
        status = handle.status()
        order = status["coordinator"]["write_order"]
        assert order["held"] and order["by"] == "transaction", order
        assert f"pid {child.pid}" in order["client"] and order["request"].startswith(f"{child.pid}-"), order
        assert order["leader"] == "DB1" and 0 <= order["idle_s"] < 2, order
        text = format_status(status)
        assert f"write order held" in text and f"pid {child.pid}" in text, text
        started = time.monotonic()
        Author.objects.create(name="other")   # waits for the hold timeout, then goes through
        assert time.monotonic() - started < 2 + 3
        assert not handle.status()["coordinator"]["write_order"]["held"]
        assert "held the write order" in handle.log()
        os.kill(child.pid, signal.SIGCONT)
        (tmp_path / "go").write_text("go")
        child.join(60)
        assert child.exitcode == 0
    finally:
        if child.is_alive():
            os.kill(child.pid, signal.SIGCONT)
            child.kill()
            child.join(10)
    outcome = (tmp_path / "outcome").read_text().splitlines()
    assert outcome == ["TransactionError", "block: TransactionError"], outcome
    Replicas(handle).assert_identical(["testapp_author"])
    for alias in ALIASES:
        assert [row[1] for row in table_rows(alias, "testapp_author")] == ["other"]


def test_the_hold_timeout_ends_an_idle_transaction_of_this_process_too(lb_factory):
    handle = lb_factory("idle-block", TRANSACTION_HOLD_TIMEOUT=1, CLIENT_TIMEOUT=20)
    with pytest.raises(TransactionError, match="TRANSACTION_HOLD_TIMEOUT"):
        with django_lb_shm.atomic():
            Author.objects.create(name="idle")
            time.sleep(1.8)
            Author.objects.create(name="too late")
    Author.objects.create(name="after")   # the order is free, the connection usable
    handle.wait_drained()
    for alias in ALIASES:
        assert [row[1] for row in table_rows(alias, "testapp_author")] == ["after"]
    # a busy transaction (statements keep coming) is not ended
    with django_lb_shm.atomic():
        for i in range(12):
            Author.objects.create(name=f"busy-{i}")
            time.sleep(0.2)
    assert Author.objects.filter(name__startswith="busy-").count() == 12


@pytest.mark.postgres_only
def test_a_stopped_leader_server_is_cut_and_the_writes_go_to_the_next_leader(lb_factory):
    handle = lb_factory("hung-leader", TRANSACTION_HOLD_TIMEOUT=2, READ_TIMEOUT=1, CLIENT_TIMEOUT=20,
                        WAIT_TIME=0.5)
    Author.objects.create(name="before")
    handle.wait_drained()
    writers = [Writer(f"w{n}", pause=0.02) for n in range(2)]
    for writer in writers:
        writer.start()
    frozen: list = []
    try:
        time.sleep(0.5)
        frozen = freeze("DB1")   # the leader (the first database other than 'default')
        stopped_at = time.monotonic()
        acked_before = sum(len(w.acked) for w in writers)
        handle.wait_state("DB1", "DOWN", timeout=10)
        time.sleep(2)
        assert sum(len(w.acked) for w in writers) > acked_before + 10   # on the next leader
        assert time.monotonic() - stopped_at < 15
    finally:
        thaw(frozen)
    try:
        handle.wait_state("DB1", "RUNNING", timeout=30)
        time.sleep(0.5)
    finally:
        for writer in writers:
            writer.stop.set()
            writer.join(60)
    for writer in writers:
        assert not writer.errors, writer.errors[:5]
        assert writer.slowest < 2 + 1 + 2.5, writer.slowest   # hold timeout, a probe, ticks
    replicas = Replicas(handle)
    replicas.assert_identical(["testapp_author"])
    names = [row[1] for row in table_rows("default", "testapp_author")]
    acked = [name for writer in writers for name in writer.acked]
    assert sorted(names) == sorted(acked + ["before"])   # each acknowledged write exactly once
    out = io.StringIO()
    assert verify(progress=False, stream=out) == EXIT_IDENTICAL, out.getvalue()


@pytest.mark.postgres_only
def test_a_leader_that_stops_answering_with_the_commit_on_its_way_is_cut_and_the_write_decided(lb_factory):
    proxy = FaultProxy(int(base_settings()["DATABASES"]["DB1"]["PORT"]))
    try:
        handle = lb_factory("doubt", databases={"DB1": {"PORT": str(proxy.port)}}, TRANSACTION_HOLD_TIMEOUT=2,
                            READ_TIMEOUT=1, CLIENT_TIMEOUT=20, WAIT_TIME=0.5)
        Author.objects.create(name="before")
        handle.wait_drained()
        proxy.black_hole_at_commit()   # the leader's next COMMIT is held, and every byte after it
        started = time.monotonic()
        Author.objects.create(name="in doubt")   # cut at COMMIT: decided, acknowledged
        assert time.monotonic() - started < 2 + 1 + 2.5
        assert handle.wait_state("DB1", "DOWN", timeout=5)
        Author.objects.create(name="after")      # on the next leader
        # DB1 answers again, but the cut write session is still open there, idle inside the
        # write's transaction with its COMMIT on the way: DB1 must not read its marker (nor
        # replay the write) until that session is gone, or the COMMIT could land after it.
        proxy.heal_new_only()
        handle.wait_state("DB1", "RUNNING", timeout=30)
        proxy.release_held()                     # too late now: the session was ended
        Author.objects.create(name="last")
        Replicas(handle).assert_identical(["testapp_author"])
    finally:
        proxy.close()
    for alias in ALIASES:
        assert sorted(row[1] for row in table_rows(alias, "testapp_author")) == ["after", "before", "in doubt", "last"]
    out = io.StringIO()
    assert verify(progress=False, stream=out) == EXIT_IDENTICAL, out.getvalue()


# -- the prober, alone ----------------------------------------------------------------------------------
class FakeConnection:
    """What the prober needs of a DbConnection: run() blocks while ``hang`` is set, or fails."""

    def __init__(self, world: dict):
        self.world = world
        self.is_open = False

    def open(self) -> None:
        self.world["opened"] += 1
        self.is_open = True

    def run(self, sql: str) -> None:
        self.world["probes"] += 1
        if self.world["fail"]:
            raise ConnectionError("refused")
        if self.world["hung"]:
            self.world["hang"].wait(10)
        time.sleep(self.world["delay"])

    def interrupt(self) -> None:
        self.world["interrupted"] += 1

    def close(self) -> None:
        self.is_open = False


def test_the_prober_shares_one_probe_and_tells_answered_hung_and_failed():
    from django_lb_shm.databases.probes import ANSWERED, FAILED, HUNG, Prober

    world = {"opened": 0, "probes": 0, "fail": False, "hung": False, "interrupted": 0, "hang": threading.Event(),
             "delay": 0.2}
    verdicts: list = []
    prober = Prober("x", 0.3, lambda: FakeConnection(world), lambda v, d, at: verdicts.append(v))
    try:
        results: list = []
        checkers = [threading.Thread(target=lambda: results.append(prober.check(time.monotonic())))
                    for _ in range(5)]
        for checker in checkers:
            checker.start()
        for checker in checkers:
            checker.join(5)
        assert results == [ANSWERED] * 5 and world["probes"] <= 2, (results, world)   # shared
        world["hung"], world["delay"] = True, 0.0
        started = time.monotonic()
        assert prober.check(time.monotonic()) == HUNG
        assert 0.3 <= time.monotonic() - started < 1.5
        assert HUNG in verdicts and world["interrupted"] == 1
        assert prober.silent_since(started)
        world["hung"] = False
        world["hang"].set()   # the stuck probe answers late: reported, the copy is back
        wait_until(lambda: verdicts[-1] == ANSWERED, 5, "a late answer", every=0.02)
        world["fail"] = True
        assert prober.check(time.monotonic()) == FAILED
        assert verdicts[-1] == FAILED
    finally:
        world["hang"].set()
        prober.stop()


# -- the setting ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("value", [0, -1, "5", True])
def test_the_hold_timeout_must_be_a_positive_number(value):
    lb = dict(base_settings()["LOAD_BALANCER"], TRANSACTION_HOLD_TIMEOUT=value)
    problems = [p for p in find_problems(lb, base_settings()["DATABASES"]) if "TRANSACTION_HOLD_TIMEOUT" in p.msg]
    assert [p.id for p in problems] == ["django_lb_shm.E017"], problems


def test_a_hold_timeout_not_under_client_timeout_is_a_warning_and_the_default_is_well_under_it():
    settings = base_settings()
    lb = dict(settings["LOAD_BALANCER"], TRANSACTION_HOLD_TIMEOUT=30, CLIENT_TIMEOUT=20)
    problems = [p for p in find_problems(lb, settings["DATABASES"]) if "TRANSACTION_HOLD_TIMEOUT" in p.msg]
    assert [(p.id, p.level) for p in problems] == [("django_lb_shm.W004", "warning")], problems
    lb.pop("TRANSACTION_HOLD_TIMEOUT")
    assert build_config(lb, settings["DATABASES"]).transaction_hold_timeout == 5
    lb["CLIENT_TIMEOUT"] = 4
    assert build_config(lb, settings["DATABASES"]).transaction_hold_timeout == 2

"""The supervisor keeps the coordinator alive: real processes, real signals."""
from __future__ import annotations

import multiprocessing
import os
import pwd
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest
from django.db import Error as DjangoError
from django.db import connections

from django_lb_shm.backend.alias import lb_alias

from tests.support.lb import ALIASES, LAUNCHER, REPO, CoordinatorHandle, stop_all_coordinators
from tests.support.waiting import NOT_ANSWERING, names_on_alias, pid_gone, wait_until
from tests.support.workers import mixed_workload
from tests.testapp.models import Author


def names_everywhere() -> dict:
    return {alias: names_on_alias(alias, fresh=True) for alias in ALIASES}


def start_workers(count: int, per_worker: int, lb_overrides=None):
    ctx = multiprocessing.get_context("spawn")
    results = ctx.Queue()
    procs = [
        ctx.Process(target=mixed_workload,
                    args=(os.environ["LB_TEST_CONFIG"], f"w{n}", per_worker, results, lb_overrides))
        for n in range(count)
    ]
    for p in procs:
        p.start()
    return procs, results


def collect(procs, results, timeout=180):
    outcomes = [results.get(timeout=timeout) for _ in procs]
    for p in procs:
        p.join(30)
    return outcomes


def test_kill_9_coordinator_mid_workload_loses_and_duplicates_nothing(coordinator, replicas):
    old_pid = coordinator.coordinator_pid()
    procs, results = start_workers(3, 60)
    time.sleep(1.0)
    os.kill(old_pid, signal.SIGKILL)
    outcomes = collect(procs, results)
    errors = [e for _p, _a, errs in outcomes for e in errs]
    assert errors == [], errors[:5]
    status = coordinator.wait_ready()
    assert status["coordinator"]["pid"] != old_pid
    assert status["coordinator"]["restarts"] >= 1
    acked = [name for _p, names, _e in outcomes for name in names]
    assert len(acked) == 180
    replicas.assert_identical(["testapp_author"])
    for alias, names in names_everywhere().items():
        assert sorted(names) == sorted(acked), alias  # every acknowledged write, exactly once


def test_sighup_under_load_fails_no_request_and_loses_nothing(lb_factory):
    # A planned restart answers requests that arrive while it stops with "stopping": the
    # client must send them again, as it does after a crash.
    handle = lb_factory("hup", GRACEFUL_TIMEOUT=5)
    procs, results = start_workers(3, 150, lb_overrides={"ADDRESS": handle.lb["ADDRESS"]})
    for _ in range(2):
        time.sleep(1.0)
        old_pid = handle.coordinator_pid()
        os.kill(handle.supervisor_pid, signal.SIGHUP)
        wait_until(lambda: _ready_with_new_pid(handle, old_pid), 60, "the restarted coordinator")
    outcomes = collect(procs, results)
    errors = [e for _p, _a, errs in outcomes for e in errs]
    assert errors == [], errors[:5]
    acked = [name for _p, names, _e in outcomes for name in names]
    assert len(acked) == 450
    handle.wait_drained()
    for alias, names in names_everywhere().items():
        assert sorted(names) == sorted(acked), alias


def test_over_max_rss_the_coordinator_is_recycled_gracefully_without_backoff(lb_factory):
    # 1 MB: every health check (1 s) finds it over the limit; recycling must cost the apps nothing.
    handle = lb_factory("rss", MAX_RSS_MB=1, GRACEFUL_TIMEOUT=5)
    procs, results = start_workers(2, 60, lb_overrides={"ADDRESS": handle.lb["ADDRESS"], "CONNECT_TIMEOUT": 20})
    outcomes = collect(procs, results)
    errors = [e for _p, _a, errs in outcomes for e in errs]
    assert errors == [], errors[:5]
    assert sum(len(names) for _p, names, _e in outcomes) == 120
    wait_until(lambda: (status_or_none(handle) or {}).get("coordinator", {}).get("restarts", 0) >= 2,
               60, "a second recycle")
    log = handle.log()
    assert "over MAX_RSS_MB 1; recycling it" in log, log
    assert "restarting it in" not in log     # no crash-style restart, no growing backoff


def status_or_none(handle, timeout: float = 5):
    try:
        return handle.status(timeout=timeout)
    except NOT_ANSWERING:   # between two coordinators
        return None


def _ready_with_new_pid(handle, old_pid: int, every_database_running: bool = False) -> bool:
    status = status_or_none(handle)
    return (status is not None and status["coordinator"]["pid"] != old_pid
            and status["coordinator"]["state"] == "READY"
            and (not every_database_running or all(d["state"] == "RUNNING" for d in status["databases"])))


def test_kill_9_supervisor_leaves_no_orphan_and_no_segment(lb_factory):
    handle = lb_factory("orphan", HEARTBEAT_TIMEOUT=5)
    coordinator_pid = handle.coordinator_pid()
    segment = Path("/dev/shm", handle.segment_name)
    assert segment.exists()
    os.kill(handle.supervisor_pid, signal.SIGKILL)
    wait_until(lambda: pid_gone(coordinator_pid), 15, "the coordinator to exit after its supervisor died")
    wait_until(lambda: not segment.exists(), 15, "the shared memory segment to be removed")
    handle.proc.wait(5)


def test_stale_segment_of_a_dead_supervisor_is_reclaimed(lb_factory):
    handle = lb_factory("stale", start=False)
    from multiprocessing import resource_tracker, shared_memory

    name = handle.segment_name
    assert not Path(f"/dev/shm/{name}").exists(), f"{name} exists before the test"
    leftover = shared_memory.SharedMemory(name=name, create=True, size=4096)
    resource_tracker.unregister(leftover._name, "shared_memory")  # left behind, as after a crash
    leftover.close()
    handle.start()
    assert handle.status()["coordinator"]["state"] == "READY"


def test_sigterm_during_load_exits_0_and_keeps_every_acknowledged_write(lb_factory):
    handle = lb_factory("sigterm")
    procs, results = start_workers(2, 400, lb_overrides={"ADDRESS": handle.lb["ADDRESS"], "CONNECT_TIMEOUT": 1,
                                                          "CLIENT_TIMEOUT": 3})
    time.sleep(2.0)
    started = time.monotonic()
    assert handle.stop(signal.SIGTERM, timeout=30) == 0
    assert time.monotonic() - started < 20
    outcomes = collect(procs, results)
    acked = sorted(name for _p, names, _e in outcomes for name in names)
    assert acked, "the workload acknowledged nothing before the stop"
    everywhere = names_everywhere()
    for alias, names in everywhere.items():
        assert set(acked) <= set(names), alias
    assert everywhere["DB1"] == everywhere["default"] == everywhere["DB2"]
    assert not psutil.pid_exists(handle.supervisor_pid) or pid_gone(handle.supervisor_pid)


def test_forked_app_process_gets_its_own_connection(coordinator):
    Author.objects.create(name="parent")
    assert Author.objects.count() == 1
    pid = os.fork()
    if pid == 0:  # the child, like a gunicorn worker forked after import
        code = 1
        try:
            Author.objects.create(name="child")
            code = 0 if Author.objects.count() == 2 else 1
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert sorted(Author.objects.values_list("name", flat=True)) == ["child", "parent"]


def test_boot_failure_halts_instead_of_restarting(lb_factory):
    handle = lb_factory("boot", start=False)
    blocker = socket.socket()
    blocker.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    blocker.bind(("127.0.0.1", handle.lb["ADDRESS"]["PORT"]))
    blocker.listen(1)
    try:
        started = time.monotonic()
        result = subprocess.run([sys.executable, str(LAUNCHER), "run"], cwd=str(REPO), env=handle.env(),
                                capture_output=True, text=True, timeout=60)
        assert result.returncode == 3, result.stderr
        assert time.monotonic() - started < 30
        output = result.stdout + result.stderr
        assert "cannot serve at" in output and "not restarting" in output
        assert output.count("cannot serve at") == 1  # no crash loop
        port = handle.lb["ADDRESS"]["PORT"]
        assert f"port {port} (127.0.0.1:{port}) is in use by pid {os.getpid()}" in output, output
    finally:
        blocker.close()


def take_port(port: int, within: float) -> socket.socket:
    """Listen on ``port`` as soon as it is free (a killed coordinator lets go of it as it dies)."""
    deadline = time.monotonic() + within
    while True:
        blocker = socket.socket()
        blocker.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            blocker.bind(("127.0.0.1", port))
            blocker.listen(1)
            return blocker
        except OSError:
            blocker.close()
            if time.monotonic() > deadline:
                raise
            time.sleep(0.01)


def test_a_port_taken_during_the_restart_backoff_is_retried_until_it_is_free(lb_factory):
    handle = lb_factory("port-taken")
    port = handle.lb["ADDRESS"]["PORT"]
    old_pid = handle.coordinator_pid()
    os.kill(old_pid, signal.SIGKILL)
    blocker = take_port(port, within=5)   # before the restart: the supervisor waits the backoff first
    taken = f"cannot serve: port {port} (127.0.0.1:{port}) is in use by pid {os.getpid()}"
    try:
        wait_until(lambda: handle.log().count(taken) >= 3, 60, "three attempts on the taken port")
        assert handle.proc.poll() is None, handle.log()   # never a permanent stop
        log = handle.log()
        attempts = [line for line in log.splitlines() if taken in line]
        # each attempt logged, naming the holder, with the backoff growing (0.5 s went to the kill -9)
        assert [line.rsplit("; ", 1)[1] for line in attempts[:3]] == [
            "restarting it in 1.0 s", "restarting it in 2.0 s", "restarting it in 4.0 s"], log
        assert all(f"user {pwd.getpwuid(os.getuid()).pw_name})" in line for line in attempts), log
        assert "not restarting" not in log
    finally:
        blocker.close()
    wait_until(lambda: _ready_with_new_pid(handle, old_pid, every_database_running=True), 60,
               "a coordinator on the freed port")
    Author.objects.create(name="after the port was freed")
    assert Author.objects.filter(name="after the port was freed").count() == 1


def test_a_second_coordinator_on_the_same_databases_refuses_to_start(coordinator, lb_factory):
    # Another PORT, the same databases: it would number writes from the same journal position.
    Author.objects.create(name="before")
    second = lb_factory("second", start=False)
    holder = f"pid {coordinator.coordinator_pid()}"
    started = time.monotonic()
    second.start(wait=False, alongside=True)
    assert second.proc.wait(60) == 3, second.log()
    elapsed = time.monotonic() - started
    log = second.log()
    assert "already served by another django_lb_shm coordinator" in log, log
    first_port = coordinator.lb["ADDRESS"]["PORT"]
    for alias in ALIASES:   # names the one holding each database, with its whole address
        assert f"database {alias!r} is already served by another django_lb_shm coordinator " \
               f"(django_lb_shm {holder} host " in log, log
    assert log.count(f" at 127.0.0.1:{first_port}") >= len(ALIASES), log
    # Two process starts (supervisor, coordinator) and no waiting: today 15.8 s (5 s per database).
    assert elapsed < 3.0, (elapsed, log)
    assert "not restarting" in log
    # The first one never noticed: it still reads and writes every copy.
    with coordinator.active():
        Author.objects.create(name="after")
        assert sorted(Author.objects.values_list("name", flat=True)) == ["after", "before"]
    coordinator.wait_drained()
    assert len({len(names_on_alias(alias)) for alias in ALIASES}) == 1


@pytest.mark.postgres_only
def test_holders_that_cannot_be_judged_from_here_are_waited_for_once_for_all_databases(lb_factory):
    # Sessions of no coordinator of this host (another host's, a psql): their end is waited for,
    # CLAIM_WAIT for every database together, not per database.
    import psycopg

    from django_lb_shm.databases.ownership import ADVISORY_KEYS, CLAIM_WAIT

    handle = lb_factory("unjudged", start=False)
    stop_all_coordinators()
    sessions = []
    try:
        for alias in ALIASES:
            server = pytest.lb_pg_cluster.servers[ALIASES.index(alias)]
            session = psycopg.connect(server.conninfo(), autocommit=True, application_name="psql")
            assert session.execute("SELECT pg_try_advisory_lock(%s, %s)", ADVISORY_KEYS).fetchone()[0]
            sessions.append(session)
        started = time.monotonic()
        result = subprocess.run([sys.executable, str(LAUNCHER), "run"], cwd=str(REPO), env=handle.env(),
                                capture_output=True, text=True, timeout=60)
        elapsed = time.monotonic() - started
    finally:
        for session in sessions:
            session.close()
    assert result.returncode == 3, result.stderr
    for alias in ALIASES:
        assert f"database {alias!r} is already served by another django_lb_shm coordinator (psql, " \
               f"server backend pid" in result.stderr, result.stderr
    assert elapsed < CLAIM_WAIT + 3.0, elapsed


def test_a_second_supervisor_on_the_same_address_is_a_boot_error(coordinator):
    result = subprocess.run([sys.executable, str(LAUNCHER), "run"], cwd=str(REPO), env=coordinator.env(),
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 3, result.stderr   # README: 3 = boot error (the address is taken)
    assert f"supervisor (pid {coordinator.supervisor_pid}) already serves this address" in result.stderr
    assert coordinator.status()["coordinator"]["state"] == "READY"


def test_a_database_is_claimed_again_after_a_sighup_restart(lb_factory):
    handle = lb_factory("reclaim")
    old_pid = handle.coordinator_pid()
    os.kill(handle.supervisor_pid, signal.SIGHUP)
    wait_until(lambda: _ready_with_new_pid(handle, old_pid), 60, "the restarted coordinator")
    assert all(db["state"] == "RUNNING" for db in handle.status()["databases"]), handle.log()
    Author.objects.create(name="after restart")
    assert Author.objects.filter(name="after restart").count() == 1


@pytest.mark.postgres_only
def test_a_restart_takes_over_the_claim_of_a_session_the_server_still_runs(lb_factory):
    # The stopped coordinator's connection is busy in a query: the server keeps its session
    # (and the claim) until the query ends. The new coordinator must not take that for
    # another coordinator's claim.
    # the read must run in the coordinator (not on this process's own connection): READ_PATH
    # (a read on a database thread is cut at READ_TIMEOUT: high enough to outlive the restart)
    handle = lb_factory("busy", READ_CONNECTIONS=0, READ_TIMEOUT=40, GRACEFUL_TIMEOUT=1, CLIENT_TIMEOUT=60,
                        READ_PATH="COORDINATOR")
    Author.objects.create(name="x")
    old_pid = handle.coordinator_pid()
    slow = threading.Thread(target=sleep_in_the_database, args=(30,), daemon=True)
    slow.start()
    time.sleep(2)
    os.kill(handle.supervisor_pid, signal.SIGHUP)
    wait_until(lambda: _ready_with_new_pid(handle, old_pid, every_database_running=True), 60,
               "the restarted coordinator with every database RUNNING")
    assert handle.proc.poll() is None, handle.log()
    assert "terminated server session" in handle.log() and f"coordinator pid {old_pid}" in handle.log()
    Author.objects.create(name="y")
    assert Author.objects.count() == 2


@pytest.mark.postgres_only
def test_sigterm_during_a_restart_stops_the_supervisor_instead_of_being_swallowed(lb_factory):
    handle = lb_factory("hup-term", GRACEFUL_TIMEOUT=8, READ_CONNECTIONS=0, READ_PATH="COORDINATOR")
    slow = threading.Thread(target=sleep_in_the_database, args=(4,), daemon=True)
    slow.start()
    time.sleep(1.0)                       # the read is in flight: the graceful stop waits for it
    os.kill(handle.supervisor_pid, signal.SIGHUP)
    time.sleep(0.5)
    os.kill(handle.supervisor_pid, signal.SIGTERM)
    assert handle.proc.wait(30) == 0, handle.log()
    log = handle.log()
    assert "stop requested during a restart; not starting another coordinator" in log, log
    assert log.count("serving 127.0.0.1") == 1   # no coordinator was started after the SIGHUP


def sleep_in_the_database(seconds: int) -> None:
    try:
        with connections[lb_alias()].cursor() as cursor:
            cursor.execute(f"SELECT pg_sleep({seconds})")
    except DjangoError:
        pass   # cut by the restart (every error the package raises is a django.db.Error)
    finally:
        connections.close_all()


def test_an_unusable_journal_dir_is_a_boot_error_naming_the_setting(lb_factory, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    handle = lb_factory("journal", start=False, JOURNAL_DIR=str(blocker / "journal"))
    stop_all_coordinators()   # the databases are claimed by the running one
    result = subprocess.run([sys.executable, str(LAUNCHER), "run"], cwd=str(REPO), env=handle.env(),
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 3, result.stderr
    assert f"LOAD_BALANCER['JOURNAL_DIR'] ({blocker / 'journal'}) cannot be used" in result.stderr


def test_stalled_coordinator_is_restarted(lb_factory):
    handle = lb_factory("stall", HEARTBEAT_TIMEOUT=2)
    old_pid = handle.coordinator_pid()
    os.kill(old_pid, signal.SIGSTOP)
    try:
        status = wait_until(
            lambda: _status_with_new_pid(handle, old_pid), 30, "a new coordinator after the old one stopped beating"
        )
    finally:
        if not pid_gone(old_pid):
            os.kill(old_pid, signal.SIGCONT)
    assert status["coordinator"]["restarts"] >= 1
    Author.objects.create(name="after-stall")
    assert Author.objects.filter(name="after-stall").count() == 1


def _status_with_new_pid(handle: CoordinatorHandle, old_pid: int):
    status = status_or_none(handle, timeout=1)
    if status is None:
        return None
    ready = status["coordinator"]["state"] == "READY" and status["coordinator"]["pid"] != old_pid
    return status if ready else None


def test_status_reports_process_health(coordinator):
    status = coordinator.status()
    c = status["coordinator"]
    assert c["pid"] and c["rss_mb"] > 0 and c["threads"] >= len(ALIASES) and c["heartbeat_age_s"] < 5
    assert status["supervisor"]["pid"] == coordinator.supervisor_pid
    for db in status["databases"]:
        assert db["heartbeat_age_s"] is not None and db["heartbeat_age_s"] < 5

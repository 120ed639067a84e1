"""Fail fast when no coordinator can answer; wait for one that a live supervisor restarts.

Real processes: a query with nothing at the address, a coordinator killed under its
supervisor, a coordinator stopped (SIGSTOP) long enough for a wait to fail (the
circuit breaker), and an address on "another host" (no shared memory visible).
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from django_lb_shm.client import breaker
from django_lb_shm.client.connection import get_client
from django_lb_shm.errors import CoordinatorDown, CoordinatorUnavailable
from django_lb_shm.shm.state import SharedState, segment_name
from tests.support.lb import REPO
from tests.test_cli import settings_env
from tests.testapp.models import Author

WAIT_TIME = 0.5

# Two queries in a fresh process: how long each took to fail, and what it said.
TWO_QUERIES = textwrap.dedent("""
    import json, time
    import django
    django.setup()
    from tests.testapp.models import Author
    seen = []
    for _ in range(2):
        started = time.monotonic()
        try:
            Author.objects.create(name="nobody")
        except Exception as exc:
            seen.append({"type": type(exc).__name__, "elapsed": time.monotonic() - started, "message": str(exc)})
    print(json.dumps(seen))
""")


def two_queries(env: dict) -> list[dict]:
    result = subprocess.run([sys.executable, "-c", TWO_QUERIES], env=env, cwd=str(REPO),
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def test_no_coordinator_at_all_fails_within_milliseconds(no_coordinator):
    env, address = no_coordinator   # CONNECT_TIMEOUT 2 s: a wait would show
    seen = two_queries(env)
    assert [s["type"] for s in seen] == ["CoordinatorDown", "CoordinatorDown"]
    assert all(s["elapsed"] < 0.5 for s in seen), seen
    message = seen[0]["message"]
    assert f"no load balancer coordinator answers at {address}" in message
    assert "no djangoloadbalancer supervisor serves it on this host" in message
    assert "start it with `djangoloadbalancer`" in message


def test_a_segment_left_by_a_dead_supervisor_fails_fast_too(no_coordinator):
    env, address = no_coordinator
    config = json.loads(open(env["LB_TEST_CONFIG"]).read())["LOAD_BALANCER"]
    from django_lb_shm.settings.config import build_config
    from django.conf import settings

    name = segment_name(build_config(config, settings.DATABASES).address)
    dead = subprocess.Popen(["true"])
    dead.wait()
    shared = SharedState.create(name, 3)
    try:
        from django_lb_shm.shm.state import Header

        shared.set_header(Header.SUPERVISOR_PID, dead.pid)
        seen = two_queries(env)
    finally:
        shared.unlink()
    assert all(s["type"] == "CoordinatorDown" and s["elapsed"] < 0.5 for s in seen), seen
    assert f"the supervisor that served it on this host (pid {dead.pid}) is gone" in seen[0]["message"]


def test_another_users_segment_for_the_address_means_wait_not_fail_fast(no_coordinator):
    """An app process of another OS user than the coordinator's finds no segment of its own uid:
    a segment of the same address under another uid means a coordinator may be restarting."""
    env, address = no_coordinator
    config = json.loads(open(env["LB_TEST_CONFIG"]).read())["LOAD_BALANCER"]
    from django_lb_shm.settings.config import build_config
    from django.conf import settings
    from django_lb_shm.shm.state import segment_path

    address_obj = build_config(config, settings.DATABASES).address
    assert breaker.host_view(address_obj).verdict == breaker.Verdict.GONE
    own = segment_name(address_obj)
    other = segment_path(own.replace(f"_{os.getuid()}_", f"_{os.getuid() + 4242}_", 1))
    open(other, "wb").close()
    try:
        assert breaker.host_view(address_obj).verdict == breaker.Verdict.UNKNOWN
    finally:
        os.unlink(other)


def test_a_coordinator_killed_under_a_live_supervisor_is_waited_for(lb_factory):
    handle = lb_factory("restarted", CONNECT_TIMEOUT=30, READ_PATH="COORDINATOR")
    Author.objects.create(name="before")
    old_pid = handle.coordinator_pid()
    os.kill(old_pid, signal.SIGKILL)
    started = time.monotonic()
    Author.objects.create(name="after")   # waits for the supervisor to start another coordinator
    assert time.monotonic() - started > 0.3   # the supervisor's first backoff is 0.5 s
    assert handle.coordinator_pid() != old_pid
    assert sorted(Author.objects.values_list("name", flat=True)) == ["after", "before"]


def test_after_a_failed_wait_queries_fail_fast_until_the_coordinator_is_back(lb_factory):
    # A stopped (SIGSTOP) coordinator: its supervisor is alive, so the first query waits
    # CONNECT_TIMEOUT; HEARTBEAT_TIMEOUT keeps the supervisor from replacing it meanwhile.
    handle = lb_factory("breaker", CONNECT_TIMEOUT=1.5, WAIT_TIME=WAIT_TIME, HEARTBEAT_TIMEOUT=120,
                        READ_PATH="COORDINATOR")
    Author.objects.create(name="before")
    pid = handle.coordinator_pid()
    get_client().forget_connection()   # the next query connects, as a new worker would
    os.kill(pid, signal.SIGSTOP)
    try:
        started = time.monotonic()
        with pytest.raises(CoordinatorUnavailable):
            Author.objects.create(name="lost")
        assert time.monotonic() - started >= 1.0, "the first query did not wait"
        for _ in range(3):
            started = time.monotonic()
            with pytest.raises(CoordinatorDown, match="tries again every"):
                Author.objects.create(name="lost")
            assert time.monotonic() - started < 0.1
    finally:
        os.kill(pid, signal.SIGCONT)
    back = time.monotonic()
    recovered_after = wait_for_a_write(deadline=back + 10)
    assert recovered_after < WAIT_TIME + 1.5, recovered_after
    assert handle.coordinator_pid() == pid   # the same coordinator, back


def test_from_another_host_the_first_failed_wait_opens_the_breaker_and_a_probe_closes_it(lb_factory, monkeypatch):
    # No shared memory in view (another host): wait CONNECT_TIMEOUT once, then fail fast until
    # the background probe (every WAIT_TIME) reaches the coordinator.
    monkeypatch.setattr(breaker, "host_view", lambda address: breaker.HostView(breaker.Verdict.UNKNOWN))
    handle = lb_factory("remote", start=False, CONNECT_TIMEOUT=1, WAIT_TIME=WAIT_TIME, READ_PATH="COORDINATOR")
    started = time.monotonic()
    with pytest.raises(CoordinatorUnavailable):
        Author.objects.create(name="lost")
    assert time.monotonic() - started >= 0.95, "the first query did not wait"
    started = time.monotonic()
    with pytest.raises(CoordinatorDown):
        Author.objects.create(name="lost")
    assert time.monotonic() - started < 0.1
    handle.start()
    recovered_after = wait_for_a_write(deadline=time.monotonic() + 10)
    assert recovered_after < WAIT_TIME + 1.5, recovered_after


def wait_for_a_write(deadline: float) -> float:
    """Seconds until a write succeeds again."""
    started = time.monotonic()
    while True:
        try:
            Author.objects.create(name="back")
            return time.monotonic() - started
        except CoordinatorUnavailable:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.02)


@pytest.fixture
def no_coordinator(tmp_path) -> tuple[dict, str]:
    from tests.support.pg_cluster import free_port

    return settings_env(tmp_path, "nobody-home", PORT=free_port())

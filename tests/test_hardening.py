"""Issue 7: the coordinator never falls over and never lets anyone in.

Real sockets against a real coordinator: garbage, truncated frames, huge
length prefixes, wrong keys, idle and dropped connections.
"""
from __future__ import annotations

import os
import signal
import socket
import stat
import struct
import threading
import time
from multiprocessing import AuthenticationError
from multiprocessing.connection import Client

import psutil
import pytest
from django.db import connections

from django_lb_shm.backend.alias import lb_alias
from django_lb_shm.settings.validation import authkey_is_strong, find_problems
from django_lb_shm.errors import RequestRejected
from tests.support.lb import ALIASES, base_settings
from tests.support.waiting import pools_opened_by_reads, wait_logged, wait_until
from tests.testapp.models import Author


def address(handle) -> tuple:
    return ("127.0.0.1", handle.lb["ADDRESS"]["PORT"])


def still_serving(handle) -> None:
    Author.objects.create(name=f"alive-{time.monotonic_ns()}")
    assert Author.objects.count() >= 1
    assert handle.status()["coordinator"]["state"] == "READY"


def send_raw(addr, data: bytes, then_wait: float = 0.2) -> None:
    with socket.create_connection(addr, timeout=5) as sock:
        try:
            sock.recv(1024)  # the server's challenge comes first
            sock.sendall(data)
            time.sleep(then_wait)
        except OSError:
            pass


def test_garbage_on_the_port_is_dropped_and_logged(coordinator):
    addr = address(coordinator)
    pid = coordinator.coordinator_pid()
    send_raw(addr, os.urandom(300))                        # random bytes
    send_raw(addr, struct.pack("!i", 100) + b"\x80\x04")    # a truncated frame
    send_raw(addr, struct.pack("!i", -1))                  # a huge length prefix
    send_raw(addr, struct.pack("!i", 2_000_000_000) + b"x" * 64)
    still_serving(coordinator)
    assert coordinator.coordinator_pid() == pid
    wait_logged(coordinator, "dropped a connection from 127.0.0.1", 5)


def test_wrong_key_is_refused_and_logged(coordinator):
    with pytest.raises(AuthenticationError):
        Client(address(coordinator), authkey=b"not-the-key")
    still_serving(coordinator)
    wait_logged(coordinator, "refused a connection from 127.0.0.1", 5)


def test_idle_and_dropped_connections_leave_it_serving_with_bounded_memory(coordinator):
    addr = address(coordinator)
    pid = coordinator.coordinator_pid()
    process = psutil.Process(pid)
    rss_before = process.memory_info().rss
    idle = [socket.create_connection(addr, timeout=5) for _ in range(50)]  # never send anything
    try:
        for _ in range(500):
            socket.create_connection(addr, timeout=5).close()
        still_serving(coordinator)
    finally:
        for sock in idle:
            sock.close()
    still_serving(coordinator)
    assert coordinator.coordinator_pid() == pid
    assert process.memory_info().rss - rss_before < 64 * 2**20
    # the handler threads of dropped connections end (idle ones after the handshake timeout)
    wait_until(lambda: process.num_threads() <= 40, 20, "at most 40 coordinator threads", every=0.5)


def test_oversized_request_is_refused_with_a_clear_error(lb_factory):
    # a read is the smallest way to send a big request; zero-hop reads send none (nothing to limit)
    handle = lb_factory("size", MAX_REQUEST_BYTES=20_000, READ_PATH="COORDINATOR")
    with pytest.raises(RequestRejected, match="MAX_REQUEST_BYTES"):
        Author.objects.filter(name="x" * 50_000).count()
    # a client that ignores the limit is cut off at the coordinator, which goes on serving
    from multiprocessing.connection import Client as RawClient

    conn = RawClient(address(handle), authkey=handle.lb["ADDRESS"]["AUTHKEY"].encode())
    conn.send((None, "accept_connection", ("t",), {}))
    assert conn.recv() == ("#RETURN", None)
    conn.send_bytes(b"x" * 200_000)
    with pytest.raises((EOFError, ConnectionError)):
        conn.recv()
    assert Author.objects.filter(name="y").count() == 0
    assert "over" in handle.log() and "MAX_REQUEST_BYTES" in handle.log()


def test_unix_socket_address_is_owner_only(lb_factory, tmp_path):
    path = tmp_path / "lb.sock"
    handle = lb_factory("unix", ADDRESS={"PATH": str(path), "AUTHKEY": "unix-socket-key"})
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    Author.objects.create(name="over-unix")
    assert Author.objects.filter(name="over-unix").count() == 1
    assert handle.status()["coordinator"]["address"] == str(path)


def test_authkey_from_the_environment(lb_factory, monkeypatch):
    monkeypatch.setenv("LB_TEST_SECRET", "a-secret-from-the-environment")
    port = base_settings()["LOAD_BALANCER"]["ADDRESS"]["PORT"]
    handle = lb_factory("envkey", ADDRESS={"HOST": "127.0.0.1", "PORT": port, "AUTHKEY_ENV": "LB_TEST_SECRET"})
    Author.objects.create(name="env")
    assert Author.objects.count() == 1
    assert handle.client().config.address.authkey == b"a-secret-from-the-environment"


def test_non_loopback_host_needs_a_strong_key():
    dbs = base_settings()["DATABASES"]

    def ids(host, key):
        lb = {"DATABASES": list(ALIASES), "ADDRESS": {"HOST": host, "PORT": 6000, "AUTHKEY": key}}
        return [p.id for p in find_problems(lb, dbs)]

    assert "django_lb_shm.E021" in ids("0.0.0.0", "pass")
    assert "django_lb_shm.E021" not in ids("0.0.0.0", "Zq8hV2m_Xk3rT9wLp4sYb7nC1dF6gJ0eA5uE")
    assert "django_lb_shm.E021" not in ids("localhost", "pass")
    assert "django_lb_shm.E021" not in ids("127.0.0.1", "pass")
    assert not authkey_is_strong(b"a" * 64)


def test_unpicklable_argument_does_not_touch_the_coordinator(coordinator):
    pid = coordinator.coordinator_pid()
    with pytest.raises(TypeError):
        with connections[lb_alias()].cursor() as cursor:
            cursor.execute("SELECT %s", [threading.Lock()])
    still_serving(coordinator)
    assert coordinator.coordinator_pid() == pid


@pytest.mark.postgres_only
@pytest.mark.parametrize("read_path", ["database thread", "pooled connection", "zero-hop"])
def test_a_hung_database_is_out_of_the_read_rotation(lb_factory, read_path):
    handle = lb_factory("hung", READ_TIMEOUT=1, CLIENT_TIMEOUT=8,
                        READ_PATH="AUTO" if read_path == "zero-hop" else "COORDINATOR")
    author = Author.objects.create(name="h")
    handle.wait_drained()   # DB2 has the row: it is a candidate for reads when it hangs
    if read_path == "pooled connection":  # reads open the pools; the hung read is cut by the watchdog
        wait_until(lambda: pools_opened_by_reads(handle, lambda: Author.objects.filter(pk=author.pk).exists()),
                   10, "a read connection open on every database", every=0)
    server = pytest.lb_pg_cluster.servers[ALIASES.index("DB2")]
    postmaster = psutil.Process(server.postmaster_pid())
    frozen = [postmaster] + postmaster.children(recursive=True)
    for proc in frozen:
        proc.send_signal(signal.SIGSTOP)  # not down: just never answering
    try:
        started = time.monotonic()
        for _ in range(9):
            assert Author.objects.filter(pk=author.pk).exists()
        assert time.monotonic() - started < 8
        # it does not answer probes: out of the read rotation, not shown RUNNING
        handle.wait_state("DB2", "UNRESPONSIVE", timeout=3)
    finally:
        for proc in frozen:
            try:
                proc.send_signal(signal.SIGCONT)
            except psutil.NoSuchProcess:
                pass
    handle.wait_state("DB2", "RUNNING", timeout=30)
    assert Author.objects.filter(pk=author.pk).exists()
    assert "database 'DB2' is UNRESPONSIVE: no answer to a probe within 1.00 s" in handle.log()


def test_only_load_balanced_tables_can_be_written(coordinator):
    with connections[lb_alias()].cursor() as cursor:
        with pytest.raises(RequestRejected, match="it belongs to auth.User, which is not a LoadBalancerModel"):
            cursor.execute("UPDATE auth_user SET is_superuser = %s", [True])
        with pytest.raises(RequestRejected, match="unknown_table") as refused:
            cursor.execute("DELETE FROM unknown_table")
        # A model added since the coordinator started looks the same to it: say how to load it.
        assert "if this model is new, restart it (SIGHUP" in str(refused.value)
        with pytest.raises(RequestRejected, match="CREATE"):
            cursor.execute("CREATE TABLE sneaky (id integer)")
        with pytest.raises(RequestRejected, match="django_lb_shm_applied"):
            cursor.execute("UPDATE django_lb_shm_applied SET seq = 0")
        # Only Django's own sequence reset of a load-balanced table passes as a write.
        for sql in ("SELECT setval('auth_group_id_seq', 700)",
                    "SELECT pg_catalog.setval(pg_get_serial_sequence('\"testapp_author\"','id'), 5)",
                    "SELECT setval(pg_get_serial_sequence('\"testapp_author\"','id'), 5), "
                    "setval('auth_group_id_seq', 800)",
                    "SELECT setval(pg_get_serial_sequence('\"auth_group\"','id'), 500)"):
            with pytest.raises(RequestRejected, match="sequence change refused|auth.Group"):
                cursor.execute(sql)
        cursor.execute('UPDATE "testapp_author" SET rating = rating + 1')  # a load-balanced table
    still_serving(coordinator)
    wait_logged(coordinator, "refused a request: write to table 'auth_user'", 5)

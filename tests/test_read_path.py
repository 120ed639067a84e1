"""Issue 6: the short read path, checked for behaviour (timings live in the stress suite).

Most of these are about the coordinator path (READ_PATH='COORDINATOR'); zero-hop
reads have their own tests in test_zero_hop_reads.py.

* reads run on the coordinator's server thread, on a few pooled connections
  per database (READ_CONNECTIONS), and fall back to the database thread's queue;
* same-host clients reach a loopback TCP coordinator over a private Unix socket;
* a read stuck on a pooled connection is cut by the watchdog after READ_TIMEOUT; a database
  that answers probes stays in the rotation (the query is slow).
"""
from __future__ import annotations

import os
import re
import shutil
import socket
import stat
import struct
import subprocess
import tempfile
import time

import psutil
import pytest
from django.db import connections

from django_lb_shm.backend.alias import lb_alias
from django_lb_shm.client.connection import get_client
from django_lb_shm.settings.validation import find_problems
from django_lb_shm.settings.config import get_config
from django_lb_shm.errors import QueryTimeout
from django_lb_shm.wire.protocol import local_socket_path, private_directory, timed_client
from django_lb_shm.coordinator.read_pool import ReadPool
from tests.support.lb import base_settings
from tests.support.threads import run_threads
from tests.support.waiting import pools_opened_by_reads, wait_until
from tests.testapp.models import Author

SLOW_READ = {  # ~6 s: reads that only the watchdog ends early
    "sqlite": "WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c WHERE x < 20000000) SELECT count(*) FROM c",
    "postgresql": "SELECT pg_sleep(6)",
}


def read_connections(status: dict) -> dict:
    return {d["name"]: d["read_connections"] for d in status["databases"]}


def reads(status: dict) -> int:
    return sum(d["reads"] for d in status["databases"])


def test_reads_run_on_pooled_connections_and_give_them_back(coordinator_path):
    coordinator = coordinator_path
    Author.objects.create(name="pooled")
    coordinator.wait_drained()
    status = coordinator.status()
    before, lent_before = reads(status), sum(p["reads"] for p in read_connections(status).values())
    for _ in range(30):
        assert Author.objects.get(name="pooled").name == "pooled"
    status = coordinator.status()
    pools = read_connections(status)
    assert reads(status) - before == 30
    # the first read on each database asks its thread for a connection and goes through the queue
    assert sum(p["reads"] for p in pools.values()) - lent_before >= 30 - len(pools), pools
    assert all(p["busy"] == 0 and 1 <= p["open"] <= p["size"] == 4 for p in pools.values()), pools


@pytest.mark.parametrize("path", ["COORDINATOR", "AUTO"])
def test_read_counters_stay_exact_when_server_threads_read_at_once(coordinator, path):
    from tests.support.lb import read_path

    with read_path(path):
        _counters_stay_exact(coordinator)


def _counters_stay_exact(coordinator):
    Author.objects.create(name="counted")
    coordinator.wait_drained()
    before = reads(coordinator.status())

    def worker() -> None:  # its own Django connection, so its own socket and server thread
        for _ in range(50):
            assert Author.objects.filter(name="counted").count() == 1

    run_threads(worker, 4, 60, cleanup=connections.close_all)
    status = coordinator.status()
    assert reads(status) - before == 200
    assert all(d["inflight_reads"] == 0 for d in status["databases"]), status["databases"]


def test_without_read_connections_every_read_goes_through_the_database_thread(lb_factory):
    handle = lb_factory("queued-reads", READ_CONNECTIONS=0, READ_PATH="COORDINATOR")
    Author.objects.create(name="queued")
    handle.wait_drained()
    before = reads(handle.status())
    for _ in range(12):
        assert Author.objects.filter(name="queued").count() == 1
    status = handle.status()
    assert reads(status) - before == 12
    assert all(p == {"size": 0, "open": 0, "busy": 0, "reads": 0} for p in read_connections(status).values())


def app_connection():
    """This process's own connection to the coordinator, as its queries use it (this thread's)."""
    return get_client().proxy()._connection()


def unix_peer(conn) -> tuple[str, int]:
    """The socket file ``conn`` is connected to and the pid of the process listening on it, as
    the kernel reports them (getpeername, SO_PEERCRED); fails when ``conn`` is not a Unix socket."""
    with socket.socket(fileno=os.dup(conn.fileno())) as sock:
        assert sock.family == socket.AF_UNIX, f"the app's connection is {sock.family.name}, not AF_UNIX"
        creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
        return sock.getpeername(), struct.unpack("3i", creds)[0]


def assert_tcp_to(conn, coordinator_pid: int, port: int) -> None:
    """``conn`` is TCP to ``port``, and the coordinator process holds the other end of it."""
    with socket.socket(fileno=os.dup(conn.fileno())) as sock:
        assert sock.family == socket.AF_INET, f"the app's connection is {sock.family.name}, not AF_INET"
        ours, theirs = sock.getsockname(), sock.getpeername()
    assert theirs == ("127.0.0.1", port), theirs
    server_side = [(c.laddr.ip, c.laddr.port) for c in psutil.Process(coordinator_pid).net_connections("tcp")
                   if c.raddr and (c.raddr.ip, c.raddr.port) == ours]
    assert server_side == [theirs], f"the coordinator's end of {ours}: {server_side}"


def coordinator_end(conn) -> tuple[str, int]:
    """The socket file the other end of Unix socket ``conn`` is bound to, and the pid holding that
    end, from the kernel's socket table (``ss``: each end names its peer's inode)."""
    ours = str(os.fstat(conn.fileno()).st_ino)
    ends = {}
    for line in subprocess.run(["ss", "-xpnH", "state", "established"], capture_output=True, text=True,
                               timeout=10, check=True).stdout.splitlines():
        fields = line.split()
        pid = re.search(r"pid=(\d+)", line)
        ends[fields[4]] = (fields[3], fields[6], int(pid.group(1)) if pid else 0)   # inode: path, peer, pid
    path, _ours, pid = ends[ends[ours][1]]
    return path, pid


def test_same_host_clients_use_a_private_unix_socket(coordinator):
    path = get_config().address.local_socket_path
    assert path and stat.S_ISSOCK(os.stat(path).st_mode)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(os.path.dirname(path)).st_mode) == 0o700
    pid = coordinator.coordinator_pid()
    Author.objects.create(name="local")
    assert unix_peer(app_connection()) == (path, pid)   # that socket file, served by the coordinator itself
    if shutil.which("ss"):
        assert coordinator_end(app_connection()) == (path, pid)
    assert Author.objects.get(name="local").name == "local"


def test_without_its_socket_file_an_app_falls_back_to_tcp(coordinator):
    path, port = get_config().address.local_socket_path, get_config().address.port
    pid = coordinator.coordinator_pid()
    away = path + ".away"
    get_client().forget_connection()
    os.rename(path, away)   # as after a tmp cleaner: the coordinator still listens, nobody finds it
    try:
        Author.objects.create(name="over tcp")
        assert_tcp_to(app_connection(), pid, port)
        assert Author.objects.get(name="over tcp").name == "over tcp"
    finally:
        os.rename(away, path)
        get_client().forget_connection()
    assert Author.objects.filter(name="over tcp").exists()
    assert unix_peer(app_connection()) == (path, pid)   # the file back: the next connection uses it


def test_the_unix_socket_can_be_turned_off(lb_factory):
    address = dict(base_settings()["LOAD_BALANCER"]["ADDRESS"], LOCAL_SOCKET=False)
    handle = lb_factory("tcp-only", ADDRESS=address)
    address = dict(handle.lb["ADDRESS"])
    assert Author.objects.filter(name="nobody").count() == 0
    assert get_config().address.local_socket_path == ""
    assert_tcp_to(app_connection(), handle.coordinator_pid(), address["PORT"])


def test_a_socket_directory_open_to_others_is_not_trusted(tmp_path):
    path = str(tmp_path / "sockets" / "127.0.0.1-6000.sock")
    assert not private_directory(path)                    # missing
    assert private_directory(path, create=True)            # made 0700, ours
    os.chmod(os.path.dirname(path), 0o777)
    assert not private_directory(path)                    # anyone could plant a socket there
    os.chmod(os.path.dirname(path), 0o700)
    linked = str(tmp_path / "link" / "127.0.0.1-6000.sock")
    os.symlink(os.path.dirname(path), os.path.dirname(linked))
    assert not private_directory(linked)                  # a symlink is not our directory
    if os.getuid() == 0:
        os.chown(os.path.dirname(path), 65534, 65534)
        assert not private_directory(path)                # not ours


@pytest.mark.parametrize("value", [-1, 2.5, "4", True])
def test_read_connections_must_be_a_whole_number(value):
    lb = dict(base_settings()["LOAD_BALANCER"], READ_CONNECTIONS=value)
    problems = [p for p in find_problems(lb, base_settings()["DATABASES"]) if "READ_CONNECTIONS" in p.msg]
    assert [p.id for p in problems] == ["django_lb_shm.E017"], problems
    assert "zero or a positive integer" in problems[0].msg


@pytest.mark.parametrize("path", ["COORDINATOR", "AUTO"])
def test_a_slow_read_is_cut_and_takes_no_database_out(lb_factory, path):
    handle = lb_factory("slow-read", READ_TIMEOUT=0.5, CLIENT_TIMEOUT=20, WAIT_TIME=0.5, READ_PATH=path)
    Author.objects.create(name="after")
    handle.wait_drained()
    if path == "COORDINATOR":   # first reads open the pools
        wait_until(lambda: pools_opened_by_reads(handle, Author.objects.filter(name="after").exists), 10,
                   "a read connection open on every database", every=0,
                   describe=lambda: read_connections(handle.status()))
    pid = handle.coordinator_pid()
    started = time.monotonic()
    with pytest.raises(QueryTimeout, match="answers probes: the query takes longer than READ_TIMEOUT"):
        with connections[lb_alias()].cursor() as cursor:
            cursor.execute(SLOW_READ[connections[lb_alias()].vendor])
    # cut after 0.5 s (+ a watchdog tick), the database probed, answering: long before the query's ~6 s
    assert time.monotonic() - started < 3
    if connections[lb_alias()].vendor == "postgresql":
        # the cut query is cancelled on its server too, long before pg_sleep(6) would end
        while any(still_sleeping(alias) for alias in handle.lb["DATABASES"]):
            assert time.monotonic() - started < 4.5, "a cut query still runs on its server"
            time.sleep(0.1)
    states = {d["name"]: d["state"] for d in handle.status()["databases"]}
    assert set(states.values()) == {"RUNNING"}, states   # the query was slow, not a database
    assert " is UNRESPONSIVE" not in handle.log() and " is DOWN" not in handle.log(), handle.log()
    assert Author.objects.get(name="after").name == "after"
    assert handle.coordinator_pid() == pid


def still_sleeping(alias: str) -> bool:
    with connections[alias].cursor() as cursor:
        cursor.execute("SELECT count(*) FROM pg_stat_activity WHERE state = 'active' AND query = %s",
                       [SLOW_READ["postgresql"]])
        return cursor.fetchone()[0] > 0


def test_a_temp_dir_too_long_for_a_unix_socket_means_tcp_only(monkeypatch, tmp_path):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / ("d" * 120)))
    assert local_socket_path("127.0.0.1", 6000) == ""
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    assert local_socket_path("127.0.0.1", 6000).endswith("127.0.0.1-6000.sock")


@pytest.mark.parametrize("unusable", ["/nonexistent-dir/lb.sock", "/tmp/" + "x" * 200])
def test_a_local_socket_that_cannot_be_used_falls_back_to_tcp(coordinator, unusable):
    address = get_config().address
    conn = timed_client(2.0, unusable)(("127.0.0.1", address.port), address.authkey)
    try:
        assert_tcp_to(conn, coordinator.coordinator_pid(), address.port)
        conn.send((None, "dummy", (), {}))   # (the server closes its end after this request)
        assert conn.recv() == ("#RETURN", None)
    finally:
        conn.close()


def test_a_read_connection_that_cannot_be_opened_is_not_asked_for_again_at_once():
    asked = []

    class Refused:
        is_open = False

        def open(self):
            raise OSError("too many clients")

        def close(self):
            pass

    pool = ReadPool(2, Refused, grow=lambda: asked.append(1))
    assert pool.checkout() is None and len(asked) == 1
    with pytest.raises(OSError):
        pool.open_one(retry_after=0.3)
    assert pool.checkout() is None and len(asked) == 1      # backing off: reads use the queue
    time.sleep(0.35)
    assert pool.checkout() is None and len(asked) == 2      # asks again
    assert pool.stats() == {"size": 2, "open": 0, "busy": 0, "reads": 0}


def test_local_socket_must_be_a_boolean():
    lb = base_settings()["LOAD_BALANCER"]
    lb["ADDRESS"] = dict(lb["ADDRESS"], LOCAL_SOCKET="no")
    problems = [p for p in find_problems(lb, base_settings()["DATABASES"]) if "LOCAL_SOCKET" in p.msg]
    assert [p.id for p in problems] == ["django_lb_shm.E008"], problems

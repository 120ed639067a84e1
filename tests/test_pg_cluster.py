"""The throw-away PostgreSQL servers of tests/support/pg_cluster.py really work."""
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tests.support.pg_cluster import (
    PgCluster,
    PgServer,
    PostgresUnavailable,
    find_pg_bindir,
    reap_stale_clusters,
)
from tests.support.waiting import wait_until

REPO_ROOT = Path(__file__).resolve().parent.parent

pytestmark = [
    pytest.mark.postgres,
    pytest.mark.skipif(find_pg_bindir() is None,
                       reason="PostgreSQL server binaries not found (run scripts/install.sh)"),
]

psycopg = pytest.importorskip("psycopg", reason="pip install 'psycopg[binary]'")
psutil = pytest.importorskip("psutil", reason="pip install psutil")


def _select_1(server, timeout=5):
    with psycopg.connect(server.conninfo(), connect_timeout=timeout) as conn:
        return conn.execute("select 1").fetchone()[0]


def _alive(proc):
    """Running and not a zombie (an exited postmaster is reparented to PID 1,
    which may take a moment to reap it)."""
    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _server_processes(datadir):
    """Live postgres processes of the server in *datadir*: the postmaster
    (its command line names the datadir) and all its children."""
    found = set()
    for proc in psutil.process_iter(["pid", "cmdline"]):
        try:
            if datadir in " ".join(proc.info["cmdline"] or []):
                found.add(proc)
                found.update(proc.children(recursive=True))
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return {p for p in found if _alive(p)}


def _wait_gone(datadir, timeout=10) -> None:
    wait_until(lambda: not _server_processes(datadir), timeout, f"no server process of {datadir}", every=0.1,
               describe=lambda: _server_processes(datadir))


@pytest.fixture(scope="module")
def cluster():
    c = PgCluster(count=2)
    c.start()
    try:
        yield c
    finally:
        c.stop()


def test_each_server_answers(cluster):
    assert len(cluster) == 2
    assert len({s.port for s in cluster}) == 2
    for server in cluster:
        assert server.is_running()
        assert _select_1(server) == 1
        with psycopg.connect(server.conninfo()) as conn:
            db, user, fsync = conn.execute(
                "select current_database(), current_user, current_setting('fsync')").fetchone()
        assert (db, user, fsync) == ("lbtest", "postgres", "off")


def test_django_settings(cluster):
    server = cluster[0]
    assert server.django_settings() == {
        "ENGINE": "django.db.backends.postgresql",
        "NAME": "lbtest",
        "USER": "postgres",
        "PASSWORD": "",
        "HOST": "127.0.0.1",
        "PORT": str(server.port),
        "CONN_MAX_AGE": 0,
    }
    assert server.django_settings("other")["NAME"] == "other"
    dbs = cluster.django_databases()
    assert list(dbs) == ["default", "DB1"]
    assert dbs["DB1"]["PORT"] == str(cluster[1].port)


def test_create_and_drop_database(cluster):
    server = cluster[1]
    server.create_database("extra_db")
    server.create_database("extra_db")  # exist_ok by default
    with psycopg.connect(server.conninfo("extra_db")) as conn:
        assert conn.execute("select current_database()").fetchone()[0] == "extra_db"
    server.drop_database("extra_db")
    assert server.psql("select count(*) from pg_database where datname = 'extra_db'") == "0"


def test_immediate_stop_then_restart(cluster):
    victim, other = cluster[1], cluster[0]
    port = victim.port
    victim.stop(mode="immediate")
    assert not victim.is_running()
    with pytest.raises(psycopg.OperationalError):
        _select_1(victim, timeout=3)
    assert _select_1(other) == 1  # the other server is unaffected

    victim.start()  # crash recovery, same port
    assert victim.port == port
    assert victim.is_running()
    assert _select_1(victim) == 1

    victim.restart()  # fast stop + start
    assert _select_1(victim) == 1


def test_stop_leaves_no_processes_and_no_dirs():
    c = PgCluster(count=2).start()
    datadirs = [s.datadir for s in c]
    base_dir = c.base_dir
    pids = [s.postmaster_pid() for s in c]
    assert all(pids)
    procs = set()
    for d in datadirs:
        found = _server_processes(d)
        assert found, f"no postgres process found for {d}"
        procs |= found
    assert {p.pid for p in procs} >= set(pids)

    c.stop()
    wait_until(lambda: not any(_alive(p) for p in procs), 10, "every server process to end", every=0.1,
               describe=lambda: [p for p in procs if _alive(p)])
    for d in datadirs:
        _wait_gone(d)
    assert not os.path.exists(base_dir)


def _run_child(code, **kw):
    return subprocess.Popen([sys.executable, "-c", textwrap.dedent(code)], cwd=REPO_ROOT,
                            stdout=subprocess.PIPE, text=True, **kw)


CHILD = """
    import sys, time
    from tests.support.pg_cluster import PgCluster
    c = PgCluster(count=1).start()
    print(c[0].datadir, c.base_dir, flush=True)
    {tail}
"""


def test_atexit_stops_forgotten_servers():
    """A process that exits without stopping its cluster leaves nothing behind."""
    proc = _run_child(CHILD.format(tail="sys.exit(3)"))
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 3
    datadir, base_dir = out.split()
    _wait_gone(datadir)
    assert not os.path.exists(base_dir)


def test_sigterm_stops_servers():
    proc = _run_child(CHILD.format(tail="time.sleep(60)"))
    try:
        datadir, base_dir = proc.stdout.readline().split()
        assert _server_processes(datadir)
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == -signal.SIGTERM  # still dies "of SIGTERM"
    _wait_gone(datadir)
    assert not os.path.exists(base_dir)


def test_reap_stale_clusters_after_sigkill():
    """SIGKILL skips atexit; the next cluster start (or an explicit call) reaps."""
    proc = _run_child(CHILD.format(tail="time.sleep(60)"))
    try:
        datadir, base_dir = proc.stdout.readline().split()
        assert _server_processes(datadir)
    finally:
        proc.kill()
        proc.wait()
    assert _server_processes(datadir), "postgres should outlive a SIGKILLed owner"
    removed = reap_stale_clusters()
    assert base_dir in removed
    _wait_gone(datadir)
    assert not os.path.exists(base_dir)


def test_missing_binaries_error_is_actionable(tmp_path, monkeypatch):
    monkeypatch.setenv("LB_PG_BINDIR", str(tmp_path))  # no initdb in there
    assert find_pg_bindir() is None
    with pytest.raises(PostgresUnavailable, match="scripts/install.sh"):
        PgServer()
    with pytest.raises(PostgresUnavailable, match="scripts/install.sh"):
        PgCluster(count=1)

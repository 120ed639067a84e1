"""Claims on real databases (django_lb_shm/databases/ownership.py): which holder is a conflict, which is dead.

The coordinator-level behaviour (a second coordinator exits 3, a restart takes over the
session of its stopped predecessor) is in test_supervisor.py; here the decisions one by one.
"""
from __future__ import annotations

import errno
import os
import subprocess
import time

import pytest

from django_lb_shm.coordinator.db_thread import DbConnection
from django_lb_shm.errors import DatabaseOwnedElsewhere
from django_lb_shm.databases.ownership import (
    ADVISORY_KEYS,
    CLAIM_WAIT,
    HOLDER_PREFIX,
    HOST_KEY,
    LOCK_SUFFIX,
    Ownership,
)
from tests.support.lb import ALIASES, BACKEND, stop_all_coordinators


@pytest.fixture(autouse=True)
def no_coordinator_holds_the_databases():
    stop_all_coordinators()   # the suite's coordinator holds every claim while it runs


def a_dead_pid() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


@pytest.fixture
def holder():
    """Another session on DB2 holding the claim, under a given application_name."""
    import psycopg

    sessions = []

    def hold(application_name: str):
        server = pytest.lb_pg_cluster.servers[ALIASES.index("DB2")]
        session = psycopg.connect(server.conninfo(), autocommit=True)
        session.execute("SELECT set_config('application_name', %s, false)", (application_name,))
        assert session.execute("SELECT pg_try_advisory_lock(%s, %s)", ADVISORY_KEYS).fetchone()[0]
        sessions.append(session)
        return session

    yield hold
    for session in sessions:
        session.close()


@pytest.fixture
def claimant():
    conns, ownerships = [], []

    def claim(ownership: Ownership, wait: float = 0.5, alias: str = "DB2") -> None:
        conn = DbConnection(alias)
        conn.open()
        conns.append(conn)
        ownerships.append(ownership)
        ownership.claim(conn, wait=wait)

    yield claim
    for conn in conns:
        conn.close()
    for ownership in ownerships:
        ownership.release()   # SQLite: this process's flock would keep the next coordinator out


def alive(session) -> bool:
    """The psycopg ``session`` still answers (a terminated one raises OperationalError, closed or not)."""
    import psycopg

    try:
        session.execute("SELECT 1")
        return True
    except psycopg.OperationalError:
        return False


postgres = pytest.mark.skipif(BACKEND != "postgres", reason="PostgreSQL-only test; run with LB_TEST_BACKEND=postgres")


@postgres
@pytest.mark.parametrize("name", [
    f"{HOLDER_PREFIX} {{dead}} host 0badc0de at 10.0.0.5:7000",   # another host: its pid means nothing here
    f"{HOLDER_PREFIX} {{self}} host {HOST_KEY} at 127.0.0.1:7001",  # another alias of this very coordinator
    f"{HOLDER_PREFIX} 1 host {HOST_KEY} at 127.0.0.1:7002",         # a live coordinator process of this host
    "psql",                                                          # not ours at all
])
def test_a_live_or_unknowable_holder_is_a_conflict_and_is_left_alone(holder, claimant, name):
    other = holder(name.replace("{dead}", str(a_dead_pid())).replace("{self}", str(os.getpid())))
    with pytest.raises(DatabaseOwnedElsewhere, match="already served by another django_lb_shm coordinator"):
        claimant(Ownership("DB2", "127.0.0.1:6000"))
    assert alive(other)


@postgres
def test_the_session_of_a_stopped_coordinator_of_this_host_is_terminated_and_the_claim_taken(holder, claimant):
    other = holder(f"{HOLDER_PREFIX} {a_dead_pid()} host {HOST_KEY} at 127.0.0.1:7003")
    ownership = Ownership("DB2", "127.0.0.1:6000")
    claimant(ownership)
    assert ownership.session is not None
    assert not alive(other)


@postgres
def test_our_own_earlier_session_is_taken_over(holder, claimant):
    # As after a network cut: the server still runs the session this coordinator lost.
    other = holder("django_lb_shm coordinator, cut off")
    ownership = Ownership("DB2", "127.0.0.1:6000")
    ownership.session = tuple(other.execute("SELECT pid, backend_start FROM pg_stat_activity "
                                            "WHERE pid = pg_backend_pid()").fetchone())
    claimant(ownership)
    assert not alive(other)


@pytest.mark.parametrize("address", ["127.0.0.1:65535", "localhost:65535", "[::1]:65535",
                                     "coordinator-7.internal.example.com:6000"])
def test_a_live_holder_of_this_host_is_a_conflict_at_once_and_named_with_its_full_address(claimant, address):
    # Issue 17: the holder's port was cut off (63 characters: PostgreSQL's application_name),
    # and a second coordinator waited 5 s per database for a holder that is plainly alive.
    claimant(Ownership("DB2", address))
    started = time.monotonic()
    with pytest.raises(DatabaseOwnedElsewhere) as refused:
        claimant(Ownership("DB2", "127.0.0.1:6001"), wait=CLAIM_WAIT)
    assert time.monotonic() - started < 0.5
    message = str(refused.value)
    assert f"pid {os.getpid()} host {HOST_KEY} at " in message, message
    if len(f"{HOLDER_PREFIX} {os.getpid()} host {HOST_KEY} at {address}") <= 63 or BACKEND == "sqlite":
        assert f" at {address}" in message, message
    else:   # too long for an application_name: the end is kept, with the port
        shown = message.split(" at ...", 1)[1].split(",", 1)[0]
        assert address.endswith(shown) and shown.endswith(":6000"), message


@pytest.mark.skipif(BACKEND != "sqlite", reason="SQLite-only test; run with LB_TEST_BACKEND=sqlite")
def test_sqlite_claims_one_file_through_every_path_and_never_follows_a_link(claimant, tmp_path):
    from django.db import connections

    first = Ownership("DB2", "127.0.0.1:6000")
    claimant(first)
    with pytest.raises(DatabaseOwnedElsewhere, match=f"{HOLDER_PREFIX} {os.getpid()}"):
        claimant(Ownership("DB2", "127.0.0.1:6001"))
    first.release()
    claimant(Ownership("DB2", "127.0.0.1:6001"))   # free again

    database = str(connections["DB1"].settings_dict["NAME"])
    victim = tmp_path / "victim"
    victim.write_text("keep me")
    lock = os.path.realpath(database) + LOCK_SUFFIX
    if os.path.exists(lock):
        os.unlink(lock)
    os.symlink(victim, lock)
    try:
        conn = DbConnection("DB1")
        conn.open()
        with pytest.raises(OSError) as refused:
            Ownership("DB1", "x").claim(conn, wait=0)
        assert refused.value.errno == errno.ELOOP, refused.value   # O_NOFOLLOW: the link is not followed
        conn.close()
        assert victim.read_text() == "keep me"
    finally:
        os.unlink(lock)

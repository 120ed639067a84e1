"""Races of the write order, each run in a process of its own (``python -m
tests.support.race_scenarios NAME``): real SQLite files, real database threads, the real
journal and sequencer, with the interleaving forced at one point.  Each scenario asserts
what must hold and exits 0; the tests in tests/test_sequencer_races.py run them.

Found by a review of the journal change; each failed before its fix.
"""
from __future__ import annotations

import os
import shutil
import sqlite3
import sys
import tempfile
import threading
import time
import uuid
from types import SimpleNamespace

import django
from django.conf import settings
from django.db import IntegrityError as DjangoIntegrityError

BASE = tempfile.mkdtemp(prefix="lb_races_")
ALIASES = ["db1", "db2"]
SCHEMA = ["CREATE TABLE parent (id INTEGER PRIMARY KEY)",
          "CREATE TABLE t (id INTEGER PRIMARY KEY AUTOINCREMENT, name TEXT UNIQUE, "
          "parent_id INTEGER REFERENCES parent(id) DEFERRABLE INITIALLY DEFERRED)",
          "INSERT INTO parent (id) VALUES (1)"]

settings.configure(
    DATABASES={"default": {"ENGINE": "django.db.backends.sqlite3", "NAME": os.path.join(BASE, "default.sqlite3")},
               **{a: {"ENGINE": "django.db.backends.sqlite3", "NAME": os.path.join(BASE, f"{a}.sqlite3")}
                  for a in ALIASES}},
    INSTALLED_APPS=[], USE_TZ=True)
django.setup()

from django_lb_shm.coordinator.db_thread import DbThread, Hub  # noqa: E402
from django_lb_shm.wire.descriptors import Statement  # noqa: E402
from django_lb_shm.coordinator.journal import Journal  # noqa: E402
from django_lb_shm.coordinator.sequencer import Sequencer  # noqa: E402
from django_lb_shm.shm.state import DbState, SharedState  # noqa: E402
from tests.support.threads import Workers  # noqa: E402
from tests.support.waiting import wait_until  # noqa: E402


class World:
    def __init__(self) -> None:
        for alias in ALIASES:
            db = sqlite3.connect(settings.DATABASES[alias]["NAME"])
            for sql in SCHEMA:
                db.execute(sql)
            db.commit()
            db.close()
        config = SimpleNamespace(statement_timeout=0.0, read_connections=1, wait_time=0.5, client_timeout=5.0,
                                 write_ack="FIRST", address="", database_answer_timeout=5.0)
        self.shared = SharedState.create("lb_races_" + uuid.uuid4().hex[:8], len(ALIASES))
        self.journal = Journal(os.path.join(BASE, "journal"), fsync=False).open()
        self.hub = Hub(self.shared, config, lambda alias, read: self.sequencer.catch_up_from(alias, read),
                       lambda seq: self.sequencer.replay_after(seq), lambda: self.sequencer.notify_applied())
        self.threads = [DbThread(i, alias, self.hub) for i, alias in enumerate(ALIASES)]
        self.sequencer = Sequencer(self.threads, self.journal, self.shared, config)
        self.sequencer.settle_history({t.alias: (0, 0) for t in self.threads})

    def start_loops(self) -> None:
        for thread in self.threads:
            thread.start()
        self.wait(lambda: all(t.state == DbState.RUNNING for t in self.threads), "every copy RUNNING")

    def recover_in_place(self) -> None:
        for thread in self.threads:
            thread.recover()
        assert all(t.state == DbState.RUNNING for t in self.threads)

    def drain(self) -> None:
        for thread in self.threads:
            for _ in range(5):
                thread.run_once(timeout=0.05)

    @staticmethod
    def wait(predicate, what: str, timeout: float = 10) -> None:
        wait_until(predicate, timeout, what, every=0.02)

    def settled(self) -> None:
        self.wait(lambda: all(t.applied_seq >= self.sequencer.last_seq for t in self.threads), "copies caught up")

    def grouped(self, writes: list) -> list:
        """Submit writes so that they land in one group: the order is held while they queue."""
        out: list = [None] * len(writes)
        self.sequencer.lock.acquire()

        def send(i: int, statement: Statement, request_id: str) -> None:
            try:
                out[i] = ("ok", self.sequencer.write(statement, request_id))
            except Exception as exc:
                out[i] = ("error", f"{type(exc).__name__}: {exc}")

        senders = []
        for i, (statement, request_id) in enumerate(writes):
            sender = threading.Thread(target=send, args=(i, statement, request_id))
            sender.start()
            senders.append(sender)
            self.wait(lambda: self.sequencer.writes.waiting >= i + 1, "queued")
        self.sequencer.lock.release()
        for sender in senders:
            sender.join(10)
        return out


def rows(alias: str, sql: str = "SELECT id, name, parent_id FROM t ORDER BY id") -> list:
    db = sqlite3.connect(settings.DATABASES[alias]["NAME"])
    try:
        return db.execute(sql).fetchall()
    finally:
        db.close()


def identical() -> list:
    first, second = (rows(alias) for alias in ALIASES)
    assert first == second, f"copies differ: {first} / {second}"
    return first


# -- the scenarios ---------------------------------------------------------------------------------
def replay_never_reads_an_undecided_record() -> None:
    """A copy catching up must not apply a record whose COMMIT is still in progress on the
    leader: refused there (a deferred foreign key), it is decided void."""
    w = World()
    w.recover_in_place()
    db1, db2 = w.threads
    w.sequencer.write(Statement("INSERT INTO t (id, name, parent_id) VALUES (1, 'a', 1)"), "r1")
    w.drain()
    db2.go_down(Exception("simulated outage"))
    w.sequencer.write(Statement("INSERT INTO t (id, name, parent_id) VALUES (2, 'b', 1)"), "r2")
    reading, read_done = threading.Event(), threading.Event()
    replay_after = w.hub.replay_after

    def slow_replay_after(seq: int):
        reading.wait(10)
        yield from replay_after(seq)
        read_done.set()

    db2.hub = Hub(w.shared, w.hub.config, w.hub.catch_up_from, slow_replay_after, w.hub.notify_applied)
    commit = db1.writer.commit_with_marker

    def commit_while_db2_replays(seq: int, tag: int) -> None:
        reading.set()
        read_done.wait(10)
        return commit(seq, tag)

    db1.writer.commit_with_marker = commit_while_db2_replays
    recovery = Workers(db2.recover, 1).start()
    time.sleep(0.3)
    try:
        w.sequencer.write(Statement("INSERT INTO t (id, name, parent_id) VALUES (3, 'bad-fk', 999)"), "r3")
    except (sqlite3.IntegrityError, DjangoIntegrityError):   # the driver's; the coordinator sends it on as Django's
        pass
    else:
        raise AssertionError("a write with a bad deferred foreign key was acknowledged")
    recovery.join(10)
    w.drain()
    assert identical() == [(1, "a", 1), (2, "b", 1)]
    assert all(t.state == DbState.RUNNING and t.applied_seq == 3 for t in w.threads)


def a_request_sent_twice_in_one_group_is_applied_once() -> None:
    w = World()
    w.recover_in_place()
    statement = Statement("INSERT INTO t (name) VALUES ('once-' || (SELECT COUNT(*) FROM t))")
    out = w.grouped([(statement, "req-42"), (statement, "req-42")])
    w.drain()
    assert [o[0] for o in out] == ["ok", "ok"], out
    assert out[0][1].lastrowid == out[1][1].lastrowid
    assert identical() == [(1, "once-0", None)]
    assert w.journal.db.execute("SELECT COUNT(*) FROM entries WHERE request_id = 'req-42'").fetchone()[0] == 1


def a_write_that_ends_the_transaction_leaves_the_group_whole() -> None:
    """SQLite's INSERT OR ROLLBACK refused in a group ends the group's transaction: the other
    writes must not then run in autocommit on the leader alone."""
    w = World()
    w.start_loops()
    w.sequencer.write(Statement("INSERT INTO t (id, name, parent_id) VALUES (1, 'dup', 1)"), "r0")
    w.settled()
    out = w.grouped([
        (Statement("INSERT INTO t (id, name, parent_id) VALUES (2, 'A', 1)"), "rA"),
        (Statement("INSERT OR ROLLBACK INTO t (id, name, parent_id) VALUES (3, 'dup', 1)"), "rB"),
        (Statement("INSERT INTO t (id, name, parent_id) VALUES (4, 'C', 1)"), "rC"),
    ])
    w.settled()
    assert [o[0] for o in out] == ["ok", "error", "ok"], out
    assert "UNIQUE" in out[1][1]
    assert identical() == [(1, "dup", 1), (2, "A", 1), (4, "C", 1)]
    assert all(t.state == DbState.RUNNING for t in w.threads)


def an_error_caused_by_a_voided_groupmate_is_not_reported() -> None:
    """B is refused only because of A's uncommitted row; A is then refused at COMMIT: B must be
    run again (and succeed), not told of a conflict with a value that exists nowhere."""
    w = World()
    w.start_loops()
    out = w.grouped([
        (Statement("INSERT INTO t (name, parent_id) VALUES ('x', 999)"), "rA"),
        (Statement("INSERT INTO t (name, parent_id) VALUES ('x', 1)"), "rB"),
    ])
    w.settled()
    assert out[0][0] == "error" and "FOREIGN KEY" in out[0][1], out
    assert out[1][0] == "ok", out
    assert [r[1:] for r in identical()] == [("x", 1)]


SCENARIOS = {f.__name__: f for f in (replay_never_reads_an_undecided_record,
                                      a_request_sent_twice_in_one_group_is_applied_once,
                                      a_write_that_ends_the_transaction_leaves_the_group_whole,
                                      an_error_caused_by_a_voided_groupmate_is_not_reported)}

if __name__ == "__main__":
    try:
        SCENARIOS[sys.argv[1]]()
        print("scenario passed")
    finally:
        shutil.rmtree(BASE, ignore_errors=True)
    sys.stdout.flush()
    os._exit(0)   # database threads are daemons; no need to wait for them

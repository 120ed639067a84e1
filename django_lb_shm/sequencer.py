"""The global write order (CUD_ALGORITHM 'MULTITHREADING').

One lock orders every write.  Its holder runs the write on the first database
that is RUNNING and caught up (the *leader*), inside a transaction; turns it
into the form every other database must run (generated keys made explicit);
has the leader check everything COMMIT could still refuse; appends the record
to the journal with the next sequence number -- from then on the write is
*decided* --; commits the leader; queues the record on every other database's
thread; and releases the lock.  Only then is the caller answered (and, by
WRITE_ACK, after enough databases applied it).

What can go wrong, and what the caller is told:
- the leader refuses the write (IntegrityError...) before the append: rolled
  back, never journaled, the caller gets the error;
- the leader's connection fails before the append: nothing was committed
  anywhere; an autocommit write is run again on the next leader, a
  transaction fails with "none of its writes were applied";
- the journal cannot record it (a full disk): rolled back, JournalError;
- the leader's connection fails at COMMIT: the outcome on that copy is
  unknown, the write is not -- it is decided.  The leader goes DOWN and, when
  back, replays from its marker (which says whether its COMMIT happened), so
  it ends with the write exactly once, with the keys the journal holds; the
  caller is told success;
- the leader refuses COMMIT itself (SQLite's deferred foreign keys): the record
  is decided as *void*, which every copy applies as nothing, and the caller
  gets the error.  A sequence number is never handed out twice.

A caller's transaction (Django's ``atomic``) holds the lock from its first
write to its commit, runs on the leader in a real transaction, and reaches the
others as one journal entry applied as one transaction.
"""
from __future__ import annotations

import contextlib
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Optional, Sequence

from django.db import DEFAULT_DB_ALIAS

from .db_thread import DbConnection, DbThread
from .descriptors import InsertKeys, Result, Statement
from .errors import (JournalError, NoDatabaseAvailable, NotSupportedError, TransactionError, WriteNotApplied,
                     WriteOutcomeUnknown)
from .health import is_connection_error
from .journal import Journal, JournalEntry, JournalUncertain
from .shared_state import DbState, Header, SharedState

logger = logging.getLogger("django_lb_shm.sequencer")


@dataclass
class OpenTransaction:
    leader: DbThread
    statements: list = field(default_factory=list)   # follower form, in order
    started: float = field(default_factory=time.monotonic)
    holds_order: bool = True


class Sequencer:
    def __init__(self, threads: Sequence[DbThread], journal: Journal, shared: SharedState, config: Any):
        self.threads = threads  # the coordinator's list: a replaced thread is seen here too
        self.journal = journal
        self.shared = shared
        self.config = config
        self.lock = threading.Lock()
        self.applied = threading.Condition()
        self.last_seq = 0

    # -- boot ---------------------------------------------------------------------
    def start_at(self, last_seq: int) -> None:
        self.last_seq = last_seq
        self.shared.set_header(Header.LAST_SEQ, last_seq)

    def catch_up_from(self, read_marker: Callable[[], tuple[int, int]]) -> str:
        """Whether the journal can bring a copy up to date from the marker ``read_marker()``
        reads (while no write is half done): "" if so, else what is wrong with it.
        WriteNotApplied if the order stays held past CLIENT_TIMEOUT."""
        with self._ordered("replay"):
            seq, tag = read_marker()
            return gap_in_history(self.journal, seq, tag, self.last_seq)

    def replay_after(self, seq: int) -> Iterator[JournalEntry]:
        return self.journal.iter_after(seq)

    def notify_applied(self) -> None:
        with self.applied:
            self.applied.notify_all()

    # -- the lock -------------------------------------------------------------------
    def acquire(self, what: str) -> None:
        if not self.lock.acquire(timeout=self.config.client_timeout):
            raise WriteNotApplied(
                f"{what}: the write order was held by another transaction for more than "
                f"{self.config.client_timeout:.2f} s; nothing was applied"
            )

    @contextlib.contextmanager
    def _ordered(self, what: str) -> Iterator[None]:
        self.acquire(what)
        try:
            yield
        finally:
            self.lock.release()

    # -- choosing the leader ----------------------------------------------------------
    def leader_preference(self) -> list[DbThread]:
        """Databases in LOAD_BALANCER order, 'default' last.

        The app writes its other models (sessions, admin log...) to 'default'
        directly; with SQLite, a load-balanced transaction holding the write lock
        of that same file would block them until it ends.
        """
        others = [t for t in self.threads if t.alias != DEFAULT_DB_ALIAS]
        return others + [t for t in self.threads if t.alias == DEFAULT_DB_ALIAS]

    def leader(self, exclude: Sequence[DbThread] = ()) -> DbThread:
        deadline = time.monotonic() + self.config.client_timeout
        with self.applied:
            while True:
                running = [t for t in self.leader_preference() if t.state == DbState.RUNNING and t not in exclude]
                for thread in running:
                    if thread.applied_seq >= self.last_seq:
                        return thread
                remaining = deadline - time.monotonic()
                if not running or remaining <= 0:
                    states = ", ".join(f"{t.alias}={t.state.name}" for t in self.threads)
                    raise NoDatabaseAvailable(f"no database can take writes ({states}); nothing was applied")
                self.applied.wait(min(remaining, 0.1))

    # -- one autocommit write -------------------------------------------------------------
    def write(self, statement: Statement, request_id: str) -> Result:
        with self._ordered("write"):
            done = self.journal.find_request(request_id) if request_id else None
            if done is not None:
                if done.void:
                    raise WriteNotApplied(f"write #{done.seq} (request {request_id}) was refused at COMMIT; "
                                          "it was applied nowhere")
                return done.result
            entry = self._commit_on_leader([statement], request_id, single=True)
        self._wait_for_acks(entry.seq)
        return entry.result

    def _commit_on_leader(self, statements: list, request_id: str, single: bool) -> JournalEntry:
        tried: list[DbThread] = []
        while True:
            leader = self.leader(exclude=tried)
            try:
                return self._lead(leader, statements, request_id, single)
            except LeaderLost as lost:
                tried.append(leader)
                leader.go_down(lost.cause)

    def _lead(self, leader: DbThread, statements: list, request_id: str, single: bool) -> JournalEntry:
        conn = leader.writer
        entry = JournalEntry(self.last_seq + 1, request_id, [], None, leader.alias)
        try:
            if not conn.is_open:
                conn.open()
            conn.begin(immediate_constraints=True)   # PostgreSQL: sent with the statement, one round trip
            result = Result()
            for statement in statements:
                result = self._execute(conn, statement, entry.statements)
            result.database = leader.alias
            entry.result = result if single else None
            conn.prepare_commit(entry.seq, entry.tag, check_deferred=False)
        except Exception as exc:
            conn.rollback_quietly()
            if is_connection_error(exc):
                raise LeaderLost(exc) from exc
            raise
        self._decide(leader, entry)
        return entry

    def _decide(self, leader: DbThread, entry: JournalEntry) -> None:
        """Journal ``entry`` (run on ``leader``, not committed yet), commit it there, publish it.

        Raises what the caller must be told when the write was not decided, or was decided
        void; returns (the write decided and on its way to every copy) otherwise.
        """
        conn = leader.writer
        try:
            self.journal.append(entry)
        except JournalError:
            conn.rollback_quietly()
            raise
        except JournalUncertain as exc:
            # Decided or not, the journal will say when it is opened again: restart from it.
            conn.rollback_quietly()
            logger.critical("write #%d: %s; the coordinator restarts to read the journal again", entry.seq, exc)
            self.fail_stop()
            raise WriteOutcomeUnknown(f"{exc}; the coordinator restarts, and then applies the write on every "
                                      "copy or on none") from None
        try:
            conn.commit_with_marker(entry.seq, entry.tag)   # PostgreSQL: marker + COMMIT, one round trip
        except Exception as exc:
            conn.rollback_quietly()
            if is_connection_error(exc):
                # COMMIT may or may not have happened there: the marker will tell when it is back.
                logger.warning("write #%d: the connection to %r failed at COMMIT (%s); the write is decided "
                               "and reaches every copy, %r included when it is back", entry.seq, leader.alias,
                               exc, leader.alias)
                leader.go_down(exc)
                self._publish(entry, applied_on=None)
                return
            self._void(entry)
            raise
        self._publish(entry, applied_on=leader)

    def _void(self, entry: JournalEntry) -> None:
        """The leader refused COMMIT: the record is decided as nothing, on every copy."""
        void = entry.voided()
        try:
            self.journal.void(void)
        except JournalError:
            # Cannot happen silently: replayed, the write would reach the copies after all.
            logger.critical("write #%d was refused at COMMIT and the journal could not record that; "
                            "the coordinator stops so that it is not replayed", entry.seq)
            self.fail_stop()
            raise
        self._publish(void, applied_on=None)

    def fail_stop(self) -> None:
        """Set by the coordinator process: stop and let the supervisor restart it."""

    def _publish(self, entry: JournalEntry, applied_on: Optional[DbThread]) -> None:
        self.last_seq = entry.seq
        self.shared.set_header(Header.LAST_SEQ, entry.seq)
        self.shared.set_header(Header.JOURNAL_ENTRIES, self.journal.entry_count)
        if applied_on is not None:
            applied_on.mark_applied(entry.seq)
        for thread in self.threads:
            if thread is not applied_on:
                thread.submit_write(entry)
        self.notify_applied()

    @staticmethod
    def _execute(conn: DbConnection, statement: Statement, follower: list) -> Result:
        """Run on the leader; append what the followers must run to ``follower``."""
        result = conn.execute(statement)
        keys = statement.insert_keys
        if keys is None:
            follower.append(Statement(statement.sql, statement.params, statement.many))
        else:
            follower.extend(explicit_key_statements(keys, result))
        return result

    # -- acknowledgement policy ------------------------------------------------------------
    def _wait_for_acks(self, seq: int) -> None:
        policy = self.config.write_ack
        if policy == "FIRST":
            return
        deadline = time.monotonic() + self.config.client_timeout
        with self.applied:
            while not self._acked(seq, policy):
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    logger.warning("write #%d: %s acknowledgement not reached within %.1f s; "
                                   "the journal still brings it to every database", seq, policy,
                                   self.config.client_timeout)
                    return
                self.applied.wait(min(remaining, 0.1))

    def _acked(self, seq: int, policy: str) -> bool:
        applied = [t for t in self.threads if t.applied_seq >= seq and t.state == DbState.RUNNING]
        if policy == "QUORUM":
            return len(applied) >= len(self.threads) // 2 + 1
        up = [t for t in self.threads if t.state == DbState.RUNNING]
        return all(t in applied for t in up)

    # -- a caller's transaction ---------------------------------------------------------------
    def begin(self, prelude: Sequence[str]) -> OpenTransaction:
        self.acquire("transaction")
        txn = None
        try:
            leader = self.leader()
            if not leader.writer.is_open:
                leader.writer.open()
            leader.writer.begin()   # PostgreSQL: sent with the first statement; constraints as the caller set them
            txn = OpenTransaction(leader)
            for sql in prelude:
                self.run_in(txn, Statement(sql))
            return txn
        except BaseException as exc:
            if txn is None:
                self.lock.release()
            elif txn.holds_order:   # (run_in gave the order back itself when the leader failed)
                self.abandon(txn)
            if is_connection_error(exc):
                raise TransactionError(f"could not start the transaction: {exc}") from None
            raise

    def run_in(self, txn: OpenTransaction, statement: Statement, records: bool = True) -> Result:
        try:
            follower: list = []
            result = self._execute(txn.leader.writer, statement, follower)
        except Exception as exc:
            if is_connection_error(exc):
                self.abandon(txn)
                txn.leader.go_down(exc)
                raise TransactionError(
                    f"the transaction was aborted: database {txn.leader.alias!r} failed ({exc}); "
                    "none of its writes were applied"
                ) from None
            raise
        if records:
            txn.statements.extend(follower)
        result.database = txn.leader.alias
        return result

    def commit(self, txn: OpenTransaction, request_id: str) -> None:
        conn = txn.leader.writer
        entry = JournalEntry(self.last_seq + 1, request_id, txn.statements, Result(), txn.leader.alias)
        try:
            if not txn.statements:
                conn.commit()
                return
            try:
                conn.prepare_commit(entry.seq, entry.tag, check_deferred=True)   # a deferred foreign key fails here
            except Exception as exc:
                conn.rollback_quietly()
                if not is_connection_error(exc):
                    raise   # the caller's IntegrityError
                txn.leader.go_down(exc)
                raise TransactionError(f"the transaction was not committed ({exc}); none of its writes were applied") from None
            self._decide(txn.leader, entry)
        finally:
            self._release(txn)
        self._wait_for_acks(entry.seq)

    def abandon(self, txn: OpenTransaction) -> None:
        """Roll back and give the write order back (rollback, error, or the caller went away)."""
        txn.leader.writer.rollback_quietly()
        self._release(txn)

    def _release(self, txn: OpenTransaction) -> None:
        if txn.holds_order:
            txn.holds_order = False
            self.lock.release()


class LeaderLost(Exception):
    def __init__(self, cause: BaseException):
        super().__init__(str(cause))
        self.cause = cause


def explicit_key_statements(keys: InsertKeys, result: Result) -> list[Statement]:
    """The INSERT the followers run: the leader's generated keys put in place of the markers."""
    if result.rows:
        generated = [row[keys.pk_index] for row in result.rows]
    elif result.lastrowid is not None and len(keys.markers) == 1:
        generated = [result.lastrowid]
    else:
        generated = []
    if len(generated) != len(keys.markers):
        raise NotSupportedError(
            f"the first database returned {len(generated)} generated keys for {len(keys.markers)} rows; "
            "cannot give every database the same keys"
        )
    mapping = dict(zip(keys.markers, generated))
    params = _substitute(keys.follower_params, mapping)
    return [Statement(keys.follower_sql, params)] + [Statement(sql) for sql in keys.after]


def _substitute(params: Any, mapping: dict) -> Any:
    if isinstance(params, (list, tuple)):
        return type(params)(_substitute(p, mapping) for p in params)
    if type(params) is int and params in mapping:
        return mapping[params]
    return params


def gap_in_history(journal: Journal, seq: int, tag: int, last_seq: int) -> str:
    """Why the journal cannot bring a copy whose marker is (``seq``, ``tag``) to ``last_seq``;
    "" when it can.  A copy's history must be the journal's: its last applied record must
    carry the tag the journal has for that number, and every later record must be here."""
    repair = ("copy a healthy database over it (`djangoloadbalancer verify` shows the differences), "
              "then restart the coordinator")
    if seq > last_seq:
        return (f"it has applied writes up to #{seq}, but the journal and the other copies end at #{last_seq}: "
                f"the journal in JOURNAL_DIR ({journal.directory}) is missing, older or restored from a "
                f"backup, or another coordinator wrote to this copy; {repair}")
    expected = journal.tag_at(seq)
    if tag and expected and tag != expected:
        return (f"its write #{seq} is not the journal's write #{seq}: the journal was replaced or restored "
                f"while this copy was away, and the same numbers now name other writes; {repair}")
    if not journal.covers(seq, last_seq):
        return (f"it has applied writes up to #{seq}; the journal no longer holds every write after it up to "
                f"#{last_seq} (journal missing, older, or trimmed); {repair}")
    return ""

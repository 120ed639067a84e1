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
others as one journal entry applied as one transaction.  Its states, and the one
caller of ``hold_write_order``/``release_write_order``, are in ``coordinator/transaction.py``.

Nobody holds the lock unbounded (TRANSACTION_HOLD_TIMEOUT): a transaction whose
client sends nothing for that long is rolled back (``ServerTransaction.hold_timeout``,
called by the coordinator's watch), and a leader whose statement goes unanswered
for that long while the copy does not answer probes has its connection cut (the
same watch, ``DbConnection.cut_if_busy_since``): the cut is a lost connection, so
the cases above apply -- before the append the write goes to the next leader, at
COMMIT it is decided and the cut copy replays it from its marker once back.
``hold_info`` says who holds the lock, for ``status``.
"""
from __future__ import annotations

import contextlib
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Iterator, Optional, Sequence

from django.db import DEFAULT_DB_ALIAS

from django_lb_shm.coordinator.db_thread import DbConnection, DbThread, NeedsResync
from django_lb_shm.coordinator.group_commit import (
    PendingWrite,
    WriteQueue,
    pending_write,
)
from django_lb_shm.coordinator.journal import Journal, JournalEntry, JournalUncertain
from django_lb_shm.databases.failures import is_connection_error
from django_lb_shm.errors import (
    JournalError,
    NoDatabaseAvailable,
    NotSupportedError,
    TransactionError,
    WriteNotApplied,
    WriteOutcomeUnknown,
)
from django_lb_shm.shm.state import DbState, Header, SharedState
from django_lb_shm.wire.descriptors import InsertKeys, Result, Statement

if TYPE_CHECKING:   # for type hints only: not imported at run time
    from django_lb_shm.settings.config import LoadBalancerConfig

logger = logging.getLogger("django_lb_shm.sequencer")


@dataclass(eq=False)
class OpenTransaction:
    """A caller's transaction on its leader, while it holds the write order (coordinator/transaction.py)."""
    leader: DbThread
    statements: list = field(default_factory=list)   # follower form, in order
    started: float = field(default_factory=time.monotonic)
    holds_order: bool = True
    client: str = ""
    request_id: str = ""                              # of the request that opened it


@dataclass
class Hold:
    """Who holds the write order, for status."""
    by: str                  # "transaction", "autocommit writes", "replay"
    since: float
    leader: Optional[DbThread] = None
    client: str = ""
    request: str = ""
    writes: int = 0
    txn: Optional[OpenTransaction] = None
    holder: Any = None       # the ServerTransaction that holds it: its idle time, the hold timeout


class Sequencer:
    def __init__(self, threads: Sequence[DbThread], journal: Journal, shared: SharedState, config: LoadBalancerConfig):
        self.threads = threads  # the coordinator's list: a replaced thread is seen here too
        self.journal = journal
        self.shared = shared
        self.config = config
        self.lock = threading.Lock()
        self.applied = threading.Condition()
        self.last_seq = 0
        self.awaited: Optional[dict] = None   # markers seen while the history is not settled (see settle_history)
        self.writes = WriteQueue(self.lock, self._run_group)
        self.hold: Optional[Hold] = None       # set by the holder of the lock

    # -- boot ---------------------------------------------------------------------
    def start_at(self, last_seq: int) -> None:
        self.last_seq = last_seq
        self.shared.set_header(Header.LAST_SEQ, last_seq)

    def settle_history(self, markers: dict) -> None:
        """At boot, from the markers of the copies reached (None: not reached): where numbering
        goes on.  After the highest of the journal and the copies -- but when the journal is new
        or ends before a copy's marker, a copy not reached may hold writes no one else knows:
        then no copy is caught up (nor serves reads) until every copy has been seen."""
        self.start_at(self.journal.last_seq)
        self.journal.settle_members([t.alias for t in self.threads])
        # A copy whose resync did not finish holds no history of its own (its number is its source's).
        reached = {alias: (m if m[1] >= 0 else (0, 0)) for alias, m in markers.items() if m is not None}
        top = max(reached.values(), key=lambda marker: marker[0], default=(0, 0))
        unsure = self.journal.is_new or top[0] > self.journal.last_seq
        if unsure and len(reached) < len(markers):
            self.awaited = reached
            logger.warning("the journal in JOURNAL_DIR (%s) is %s; %s not reachable: no copy serves reads or "
                           "takes writes until every copy has been seen", self.journal.directory,
                           "new" if self.journal.is_new else f"behind the copies (#{self.journal.last_seq} < #{top[0]})",
                           ", ".join(sorted(set(markers) - set(reached))))
            return
        self._rebase_on(reached)

    def _rebase_on(self, markers: dict) -> None:
        seq, tag = max(markers.values(), key=lambda marker: marker[0], default=(0, 0))
        if seq > self.journal.last_seq:
            self.journal.rebase(seq, tag)
        self.start_at(self.journal.last_seq)
        if self.awaited is not None:
            self.awaited = None
            for thread in self.threads:   # the copies that waited: caught up now, not at their next probe
                thread.probe_now()

    def catch_up_from(self, alias: str, read_marker: Callable[[], tuple[int, int]]) -> str:
        """Whether the journal can bring copy ``alias`` up to date from the marker
        ``read_marker()`` reads (while no write is half done): "" if so, else what is wrong
        with it.  WriteNotApplied if the order stays held past CLIENT_TIMEOUT; HistoryUnsettled
        while a copy that may hold more writes has not been seen since boot."""
        with self._ordered("replay"):
            self.hold = Hold("replay", time.monotonic(), client=f"database thread {alias!r} (catching up)")
            seq, tag = read_marker()
            if self.awaited is not None:
                self.awaited[alias] = (seq, tag) if tag >= 0 else (0, 0)
                unseen = sorted(t.alias for t in self.threads if t.alias not in self.awaited)
                if unseen:
                    raise HistoryUnsettled(
                        f"waiting for {', '.join(unseen)}: the journal is new or ends before the copies' writes, "
                        "so until every copy has been seen no copy is known to hold every acknowledged write "
                        "(a copy that is gone for good: remove it from LOAD_BALANCER['DATABASES'] and send SIGHUP)")
                self._rebase_on(self.awaited)
            if tag < 0:
                raise NeedsResync(f"a resync of it did not finish (its marker still carries the resync's mark); "
                                  f"it is left out until `djangoloadbalancer resync {alias}` completes")
            gap = gap_in_history(self.journal, seq, tag, self.last_seq)
            if (seq, tag) == (0, 0) and self.last_seq and (gap or alias not in self.journal.members):
                raise NeedsResync(f"it has applied no write while the others are at #{self.last_seq} (a copy just "
                                  f"added, or an empty database): fill it with `djangoloadbalancer resync {alias}`")
            return gap

    def joined(self, alias: str) -> None:
        """Copy ``alias`` is caught up: it shares the journal's history from now on."""
        self.journal.add_member(alias)

    def replay_after(self, seq: int) -> Iterator[JournalEntry]:
        """Records after ``seq`` that are decided and published: a record still being decided
        (appended, COMMIT not answered yet) may yet become void; it comes through the queue."""
        return self.journal.iter_after(seq, up_to=lambda: self.last_seq)

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
            self.hold = None
            self.lock.release()

    def hold_info(self, now: float) -> dict:
        """Who holds the write order, since when, waiting on what (status)."""
        hold = self.hold
        info: dict = {"held": hold is not None, "hold_timeout_s": self.config.transaction_hold_timeout}
        if hold is None:
            return info
        info.update(by=hold.by, held_s=round(now - hold.since, 3), client=hold.client, request=hold.request,
                    leader=hold.leader.alias if hold.leader is not None else "")
        if hold.leader is not None and hold.leader.writer.busy_since:
            info["leader_silent_s"] = round(max(0.0, now - hold.leader.writer.busy_since), 3)
        if hold.txn is not None:
            info.update(idle_s=round(hold.holder.idle_for(now), 3), statements=len(hold.txn.statements))
        if hold.writes:
            info["writes"] = hold.writes
        return info

    def open_transaction(self) -> Any:
        """The ServerTransaction holding the order, or None."""
        hold = self.hold
        return hold.holder if hold is not None and hold.txn is not None else None

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
        """The first RUNNING copy that has every write; a copy that does not answer probes
        (UNRESPONSIVE) only when no RUNNING one can: it is out of reads, never out of writes
        (if it is hung, the watch cuts it and the write goes on elsewhere)."""
        deadline = time.monotonic() + self.config.client_timeout
        with self.applied:
            while True:
                preference = [t for t in self.leader_preference() if t not in exclude]
                running = ([t for t in preference if t.state == DbState.RUNNING]
                           + [t for t in preference if t.state == DbState.UNRESPONSIVE])
                for thread in running:
                    if thread.applied_seq >= self.last_seq:
                        return thread
                remaining = deadline - time.monotonic()
                if not running or remaining <= 0:
                    states = ", ".join(f"{t.alias}={t.state.name}" for t in self.threads)
                    raise NoDatabaseAvailable(f"no database can take writes ({states}); nothing was applied")
                self.applied.wait(min(remaining, 0.1))

    # -- autocommit writes, decided in groups -------------------------------------------------
    def write(self, statement: Statement, request_id: str, resent: bool = True) -> Result:
        """``resent``: the client may have sent this write id before (the journal may know it)."""
        pending = pending_write(statement, request_id, self.config.client_timeout, resent)
        result = self.writes.submit(pending)
        self._wait_for_acks(pending.seq)
        return result

    def _run_group(self, group: list) -> None:
        """Holding the order: decide every write of ``group``; each caller's outcome is set."""
        self.hold = Hold("autocommit writes", time.monotonic(), client=client_of(group[0].request_id),
                         request=group[0].request_id, writes=len(group))
        try:
            self._run_group_held(group)
        finally:
            self.hold = None

    def _run_group_held(self, group: list) -> None:
        fresh, repeats = [], []
        first_of: dict[str, PendingWrite] = {}
        for pending in group:
            if pending.request_id in first_of:   # sent again while the first send still waited
                repeats.append((pending, first_of[pending.request_id]))
            elif not (pending.resent and self._answered_from_journal(pending)):
                fresh.append(pending)
                if pending.request_id:
                    first_of[pending.request_id] = pending
        if fresh:
            self._decide_group(fresh)
        for repeat, first in repeats:
            if first.error is not None:
                repeat.fail(first.error)
            else:
                repeat.succeed(first.result, first.seq)

    def _answered_from_journal(self, pending: PendingWrite) -> bool:
        """A write sent again after a lost answer: the journal has its outcome."""
        done = self.journal.find_request(pending.request_id) if pending.request_id else None
        if done is None:
            return False
        if done.void:
            pending.fail(WriteNotApplied(f"write #{done.seq} (request {pending.request_id}) was refused at "
                                         "COMMIT; it was applied nowhere"))
        else:
            pending.succeed(done.result, done.seq)
        return True

    def _decide_group(self, group: list) -> None:
        tried: list[DbThread] = []
        while True:
            leader = self.leader(exclude=tried)
            try:
                redo = self._lead_group(leader, group)
                break
            except LeaderLost as lost:
                tried.append(leader)
                leader.go_down(lost.cause)
        for pending in redo:   # refused as a whole: one at a time shows whose write it was
            self._decide_group([pending])

    def _lead_group(self, leader: DbThread, group: list) -> list:
        """Run ``group`` on ``leader`` in one transaction and decide it; the writes to run
        again one by one when the group could not be decided as a whole."""
        conn = leader.writer
        if self.hold is not None:
            self.hold.leader = leader
        accepted: list[tuple[PendingWrite, JournalEntry]] = []
        try:
            if not conn.is_open:
                conn.open()
            conn.begin(immediate_constraints=True)   # PostgreSQL: sent with the statements, one round trip
            outcomes = conn.execute_group([pending.statement for pending in group])
            seq = self.last_seq
            for pending, outcome in zip(group, outcomes):
                if isinstance(outcome, BaseException):
                    continue
                seq += 1
                outcome.database = leader.alias
                entry = JournalEntry(seq, pending.request_id, [], outcome, leader.alias)
                entry.statements = follower_form(pending.statement, outcome)
                accepted.append((pending, entry))
            if accepted:
                conn.prepare_commit(seq, accepted[-1][1].tag, check_deferred=False)
            else:
                conn.rollback_quietly()
        except Exception as exc:
            lost = conn.lost(exc)
            conn.rollback_quietly()
            if lost:
                raise LeaderLost(exc) from exc
            if len(group) > 1:
                return list(group)
            raise
        refused_alone = [(p, o) for p, o in zip(group, outcomes) if isinstance(o, BaseException)]
        if not accepted:
            for pending, error in refused_alone:
                pending.fail(error)
            return []
        try:
            refused = self._decide(leader, [entry for _pending, entry in accepted])
        except (JournalError, WriteOutcomeUnknown) as exc:
            # The others' errors may come from these writes' uncommitted rows: all get this one.
            for pending in group:
                pending.fail(exc)
            return []
        if refused is not None:
            if len(group) > 1:
                return list(group)   # errors seen next to the refused writes are re-run too
            accepted[0][0].fail(refused)
            return []
        for pending, error in refused_alone:
            pending.fail(error)
        for pending, entry in accepted:
            pending.succeed(entry.result, entry.seq)
        return []

    def _decide(self, leader: DbThread, entries: list) -> Optional[BaseException]:
        """Journal ``entries`` (run on ``leader``, not committed yet), commit them there, publish them.

        None when they are decided and on their way to every copy; the leader's refusal of
        COMMIT when they were decided void.  JournalError when the journal could not record
        them (applied nowhere); WriteOutcomeUnknown when it cannot say.
        """
        conn = leader.writer
        try:
            self.journal.append_many(entries)
        except JournalError:
            conn.rollback_quietly()
            raise
        except JournalUncertain as exc:
            # Decided or not, the journal will say when it is opened again: restart from it.
            conn.rollback_quietly()
            logger.critical("writes #%d-#%d: %s; the coordinator restarts to read the journal again",
                            entries[0].seq, entries[-1].seq, exc)
            self.fail_stop()
            raise WriteOutcomeUnknown(f"{exc}; the coordinator restarts, and then applies the write on every "
                                      "copy or on none") from None
        last = entries[-1]
        try:
            conn.commit_with_marker(last.seq, last.tag)   # PostgreSQL: marker + COMMIT, one round trip
        except Exception as exc:
            lost = conn.lost(exc)
            conn.rollback_quietly()
            if not lost:
                self._void(entries)
                return exc
            # COMMIT may or may not have happened there: its marker will tell when it is back.
            logger.warning("writes #%d-#%d: the connection to %r failed at COMMIT (%s); they are decided "
                           "and reach every copy, %r included when it is back", entries[0].seq, last.seq,
                           leader.alias, exc, leader.alias)
            leader.go_down(exc)
            self._publish(entries, applied_on=None)
            return None
        self._publish(entries, applied_on=leader)
        return None

    def _void(self, entries: list) -> None:
        """The leader refused COMMIT: the records are decided as nothing, on every copy."""
        voids = [entry.voided() for entry in entries]
        attempt = 0
        while True:
            try:
                self.journal.void(voids)
                break
            except JournalError as exc:
                # It cannot be left so (replayed, the writes would reach the copies after all), nor
                # skipped: the write order stays held -- no write is decided -- until it is recorded.
                if attempt % 20 == 0:
                    logger.critical("writes #%d-#%d were refused at COMMIT and the journal cannot record that "
                                    "(%s); no write is decided until it can", entries[0].seq, entries[-1].seq, exc)
                attempt += 1
                time.sleep(0.5)
        self._publish(voids, applied_on=None)

    def fail_stop(self) -> None:
        """Replaced by the coordinator process: stop, and let the supervisor start it again."""

    def _publish(self, entries: list, applied_on: Optional[DbThread]) -> None:
        last = entries[-1].seq
        self.last_seq = last
        self.shared.set_header(Header.LAST_SEQ, last)
        self.shared.set_header(Header.JOURNAL_ENTRIES, self.journal.entry_count)
        if applied_on is not None:
            applied_on.mark_applied(last, writes=len(entries))
        for thread in self.threads:
            if thread is not applied_on:
                for entry in entries:
                    thread.submit_write(entry)
        self.notify_applied()

    @staticmethod
    def _execute(conn: DbConnection, statement: Statement, follower: list) -> Result:
        """Run on the leader; append what the followers must run to ``follower``."""
        result = conn.execute(statement)
        follower.extend(follower_form(statement, result))
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

    # -- a caller's transaction: its one caller is server_transaction.ServerTransaction -------------------
    def hold_write_order(self, request_id: str, client: str, holder: Any) -> OpenTransaction:
        """Take the write order for ``holder``'s transaction and begin it on the leader.  When it
        cannot (WriteNotApplied, NoDatabaseAvailable, TransactionError) the order is not held."""
        self.acquire("transaction")
        self.hold = Hold("transaction", time.monotonic(), client=client or client_of(request_id), request=request_id)
        try:
            leader = self.hold.leader = self.leader()
            self._open_writer(leader)
            leader.writer.begin()   # PostgreSQL: sent with the first statement; constraints as the caller set them
        except BaseException as exc:
            self.hold = None
            self.lock.release()
            if is_connection_error(exc):
                raise TransactionError(f"could not start the transaction: {exc}") from None
            raise
        self.hold.holder = holder   # before txn: status reads the holder once txn is set
        txn = self.hold.txn = OpenTransaction(leader, client=self.hold.client, request_id=request_id)
        return txn

    @staticmethod
    def _open_writer(leader: DbThread) -> None:
        if leader.writer.is_open:
            return
        try:
            leader.writer.open()
        except Exception as exc:
            if is_connection_error(exc):
                leader.go_down(exc)   # the next transaction tries the next leader
            raise

    def run_in(self, txn: OpenTransaction, statement: Statement, records: bool = True) -> Result:
        """``statement`` on ``txn``'s leader; LeaderLost when its connection failed."""
        try:
            follower: list = []
            result = self._execute(txn.leader.writer, statement, follower)
        except Exception as exc:
            if txn.leader.writer.lost(exc):
                raise LeaderLost(exc) from None
            raise
        if records:
            txn.statements.extend(follower)
        result.database = txn.leader.alias
        return result

    def decide_transaction(self, txn: OpenTransaction, request_id: str) -> Optional[int]:
        """Commit ``txn`` on its leader, journaled: the number whose WRITE_ACK to wait for once the
        order is given back (None: it wrote nothing).  The caller gives the order back."""
        conn = txn.leader.writer
        if not txn.statements:
            conn.commit()
            return None
        entry = JournalEntry(self.last_seq + 1, request_id, txn.statements, Result(), txn.leader.alias)
        try:
            conn.prepare_commit(entry.seq, entry.tag, check_deferred=True)   # a deferred foreign key fails here
        except Exception as exc:
            lost = conn.lost(exc)
            conn.rollback_quietly()
            if not lost:
                raise   # the caller's IntegrityError
            txn.leader.go_down(exc)
            raise TransactionError(f"the transaction was not committed ({exc}); none of its writes were applied") from None
        refused = self._decide(txn.leader, [entry])
        if refused is not None:
            raise refused   # e.g. SQLite's deferred foreign key: the caller's IntegrityError
        return entry.seq

    def wait_for_acks(self, seq: int) -> None:
        """WRITE_ACK for a decided transaction, after its order was given back."""
        self._wait_for_acks(seq)

    def roll_back_expired(self, txn: OpenTransaction) -> None:
        """Roll ``txn`` back on its leader for the hold timeout: a lost connection takes the leader down."""
        conn = txn.leader.writer
        try:
            conn.rollback()
        except Exception as exc:
            if conn.lost(exc):
                txn.leader.go_down(exc)   # its transaction died with the connection

    def release_write_order(self, txn: OpenTransaction, rollback: bool) -> None:
        """Give the order back (once; rolling ``txn`` back on its leader first, when asked): the
        leader's connection may serve another holder right after."""
        if not txn.holds_order:
            return
        if rollback:
            txn.leader.writer.rollback_quietly()
        txn.holds_order = False
        self.hold = None
        self.lock.release()


def client_of(request_id: str) -> str:
    """Request ids start with the app process's pid (client.ClientConnection.new_request_id)."""
    pid = request_id.split("-", 1)[0]
    return f"pid {pid}" if pid.isdigit() else ""


class HistoryUnsettled(Exception):
    """A copy cannot be caught up yet: another copy that may hold more writes has not been seen."""


class LeaderLost(Exception):
    def __init__(self, cause: BaseException):
        super().__init__(str(cause))
        self.cause = cause


def follower_form(statement: Statement, result: Result) -> list[Statement]:
    """What every other copy runs for ``statement``, given the leader's ``result``."""
    if statement.insert_keys is None:
        return [Statement(statement.sql, statement.params, statement.many)]
    return explicit_key_statements(statement.insert_keys, result)


def explicit_key_statements(keys: InsertKeys, result: Result) -> list[Statement]:
    """The INSERT the followers run: the leader's generated keys put in place of the markers."""
    if keys.may_skip and not result.rows:
        return []   # the leader skipped the row (a conflict): so do the identical copies
    if keys.rows:
        return _inserted_rows(keys, result)
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
    return [Statement(keys.follower_sql, params, keyed=True)] + [Statement(sql) for sql in keys.after]


def _inserted_rows(keys: InsertKeys, result: Result) -> list[Statement]:
    """The rows of a multi-row INSERT ... ON CONFLICT DO NOTHING that the leader inserted (it
    returned their keys and identities), each inserted with that key; the others skipped there."""
    by_identity = {identity: (sql, params) for identity, sql, params in keys.rows}
    statements = []
    for row in result.rows or ():
        found = by_identity.get(tuple(row[1:]))
        if found is None:
            raise NotSupportedError(
                f"the first database returned a row {tuple(row)!r} that matches none of the rows inserted; "
                "cannot give every database the same rows")
        sql, params = found
        statements.append(Statement(sql, _substitute(params, {keys.markers[0]: row[0]}), keyed=True))
    return statements + [Statement(sql) for sql in keys.after] if statements else []


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
    repair = "refill it from a healthy copy with `djangoloadbalancer resync <alias>` (the coordinator keeps running)"
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

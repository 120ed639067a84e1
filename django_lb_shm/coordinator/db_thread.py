"""One thread per database: its own connection, its own FIFO of work.

The FIFO carries the reads a server thread could not run itself on the read
pool (the database is catching up, or no pooled connection is idle; answered
on the caller's reply queue), requests to open pooled connections, and the
writes the first database already committed (applied here in global order, each in
one transaction that also records its sequence number in
``django_lb_shm_applied``, so a replay after a crash applies it exactly once).
Because a write is queued on every database before the caller is answered, a
read queued later on any database runs after it.

States (shared memory): STARTING -> RUNNING <-> DOWN -> RECOVERING -> RUNNING,
DIVERGED when a write the first database accepted fails here, and SCHEMA_BEHIND
(-> RECOVERING -> RUNNING) while the copy lacks migrations another copy has applied
(``databases/schema.py``).
"""
from __future__ import annotations

import logging
import math
import os
import queue
import re
import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Iterator, Optional

from django.db import connections

from django_lb_shm.coordinator.journal import JournalEntry
from django_lb_shm.coordinator.read_pool import PooledConnection, ReadPool
from django_lb_shm.databases.failures import (
    interrupt_statement,
    is_connection_error,
    is_statement_timeout,
    is_transient,
)
from django_lb_shm.databases.ownership import CLAIM_WAIT, Ownership, sqlite_path
from django_lb_shm.databases.probes import ANSWERED, HUNG, Prober
from django_lb_shm.errors import (
    DatabaseDown,
    DatabaseOwnedElsewhere,
    QueryTimeout,
    ResyncError,
)
from django_lb_shm.settings.validation import vendor_of
from django_lb_shm.shm.state import DbState, SharedState, Slot
from django_lb_shm.wire.descriptors import Result, Statement

if TYPE_CHECKING:   # for type hints only: not imported at run time
    from django_lb_shm.settings.config import LoadBalancerConfig

logger = logging.getLogger("django_lb_shm.db")

MARKER_TABLE = "django_lb_shm_applied"
MARKER_CREATE = (f"CREATE TABLE IF NOT EXISTS {MARKER_TABLE} "
                 "(id INTEGER PRIMARY KEY, seq BIGINT NOT NULL, tag BIGINT NOT NULL DEFAULT 0)")
MARKER_ROW = (f"INSERT INTO {MARKER_TABLE} (id, seq, tag) SELECT 1, 0, 0 "
              f"WHERE NOT EXISTS (SELECT 1 FROM {MARKER_TABLE} WHERE id = 1)")
TRANSIENT_RETRIES = 5
COMMIT_BUSY_RETRIES = 5
WRITE_BATCH = 64   # queued follower writes applied in one transaction


class DbConnection:
    """A private Django connection to one alias, used through its raw DB-API cursor."""

    def __init__(self, alias: str, statement_timeout: float = 0.0, connect_timeout: float = 0.0):
        self.alias = alias
        self.statement_timeout = statement_timeout
        self.connect_timeout = connect_timeout   # PostgreSQL: libpq's, unless OPTIONS set one
        self.wrapper: Any = None
        # monotonic start of the statement running here (0: none), for the watch that cuts a
        # statement a hung server never answers (see cut_if_busy_since)
        self.busy_since = 0.0
        self._busy_lock = threading.Lock()
        self.session: Optional[tuple] = None   # PostgreSQL: (backend pid, backend_start), to cancel a cut read
        # PostgreSQL with Django's default client-side binding cursor: statements are
        # sent with the simple query protocol, so several can share one round trip.
        self.batched = False
        self._begin_pending = False   # BEGIN not sent yet: it goes with the next statement
        # Inside a transaction a lost connection must not be replaced silently: the
        # statements after it would run outside the transaction (see execute()).
        self._in_transaction = False

    @property
    def is_open(self) -> bool:
        return self.wrapper is not None and self.wrapper.connection is not None

    def open(self) -> None:
        self.close()
        self._refuse_missing_sqlite_file()
        wrapper = connections.create_connection(self.alias)
        wrapper.inc_thread_sharing()  # used by whichever thread holds the write order
        self._bound_connect(wrapper)
        wrapper.ensure_connection()
        self.wrapper = wrapper
        self.batched = _sends_simple_queries(wrapper)
        if wrapper.vendor == "postgresql":
            if self.statement_timeout:
                self.run(f"SET statement_timeout = {int(self.statement_timeout * 1000)}")
            self.session = tuple(self.run(
                "SELECT pid, backend_start FROM pg_stat_activity WHERE pid = pg_backend_pid()").rows[0])

    def _bound_connect(self, wrapper: Any) -> None:
        """PostgreSQL: a server that accepts but never answers (SIGSTOPped) must not hold the connect forever."""
        options = wrapper.settings_dict.get("OPTIONS") or {}
        if wrapper.vendor == "postgresql" and self.connect_timeout and "connect_timeout" not in options:
            # a copy: the settings dict is shared with Django's own connections
            wrapper.settings_dict = {**wrapper.settings_dict,
                                     "OPTIONS": {**options, "connect_timeout": max(2, math.ceil(self.connect_timeout))}}

    def _refuse_missing_sqlite_file(self) -> None:
        """SQLite would create an empty database in place of a missing (moved, deleted) copy."""
        entry = connections.settings[self.alias]
        if vendor_of(entry["ENGINE"]) != "sqlite":
            return
        path = sqlite_path(entry)
        if not os.path.exists(path):
            raise DatabaseDown(f"the SQLite file of {self.alias!r} ({path}) does not exist; restore it "
                               "(or create it with `djangoloadbalancer migrate`)")

    def close(self) -> None:
        wrapper, self.wrapper = self.wrapper, None
        self._begin_pending = False
        if wrapper is not None:
            try:
                wrapper.close()
            except Exception:
                pass

    def interrupt(self) -> None:
        """Cut the statement another thread is running here (the watchdog's tool for a hung database)."""
        interrupt_statement(self.wrapper)

    def cut_if_busy_since(self, started_before: float) -> bool:
        """PostgreSQL: cut the connection if the statement running here started before
        ``started_before`` (never a later one: checked and cut under the lock the statement's
        thread takes when it ends).  Its transaction dies with the connection; whatever the
        server already received (a COMMIT) may still be applied there: the caller treats the
        outcome as unknown.  SQLite (in-process, nothing to cut): False."""
        with self._busy_lock:
            since = self.busy_since
            wrapper = self.wrapper
            if not since or since > started_before or wrapper is None or wrapper.vendor != "postgresql":
                return False
            interrupt_statement(wrapper)
            return True

    def _begin_statement(self) -> None:
        with self._busy_lock:
            self.busy_since = time.monotonic()

    def _end_statement(self) -> None:
        with self._busy_lock:
            self.busy_since = 0.0

    def execute(self, statement: Statement) -> Result:
        if not self.is_open:
            if self._in_transaction:
                raise DatabaseDown(f"the connection to {self.alias!r} was closed inside a transaction")
            self.open()
        cursor = self.wrapper.create_cursor()
        self._begin_statement()
        try:
            if self._begin_pending:
                self._execute_with_begin(cursor, statement)
            elif statement.many:
                cursor.executemany(statement.sql, statement.params)
            elif statement.params is None:
                cursor.execute(statement.sql)
            else:
                cursor.execute(statement.sql, statement.params)
            return self._result_of(cursor)
        finally:
            self._end_statement()
            cursor.close()

    def execute_bounded(self, statement: Statement, seconds: float) -> Result:
        """A read that the server cuts after ``seconds`` (PostgreSQL ``SET LOCAL statement_timeout``
        in a transaction of its own: the connection's own timeout is left as it is).  Other
        engines: as execute()."""
        if self.statement_timeout:
            seconds = min(seconds, self.statement_timeout)
        if not self.batched or statement.many or self._in_transaction or seconds <= 0:
            return self.execute(statement)
        cursor = self.wrapper.create_cursor()
        self._begin_statement()
        try:
            sql = statement.sql if statement.params is None else cursor.mogrify(statement.sql, statement.params)
            cursor.execute(_SEP.join(("BEGIN", f"SET LOCAL statement_timeout = {max(1, int(seconds * 1000))}",
                                      sql, "COMMIT")))
            cursor.nextset()
            cursor.nextset()
            return self._result_of(cursor)
        except BaseException:
            self._begin_pending, self._in_transaction = False, True
            self.rollback_quietly()   # the read's error left the transaction aborted
            raise
        finally:
            self._end_statement()
            cursor.close()

    def _result_of(self, cursor: Any) -> Result:
        description = cursor.description
        rows = cursor.fetchall() if description else []
        return Result(
            rows=rows,
            description=tuple((c[0], c[1], None, None, None, None, None) for c in description)
            if description else None,
            rowcount=cursor.rowcount,
            lastrowid=getattr(cursor, "lastrowid", None),
            database=self.alias,
        )

    def lost(self, exc: BaseException) -> bool:
        """A connection-level failure, or the connection closed under the caller (the database's
        own thread took it down meanwhile: whatever the driver then raised says nothing of SQL)."""
        return is_connection_error(exc) or not self.is_open

    def execute_group(self, statements: list) -> list:
        """Run a group of autocommit writes inside the open transaction: for each, its Result or
        the (non connection-level) error that refused it alone.  A connection-level error is
        raised.  PostgreSQL: the whole group in one round trip; when one statement fails there,
        the group is run again one statement at a time, each in its own savepoint."""
        if len(statements) == 1:
            try:
                return [self.execute(statements[0])]
            except Exception as exc:
                if self.lost(exc):
                    raise
                return [exc]
        if self.batched and self._begin_pending and not any(s.many for s in statements):
            try:
                return self._execute_at_once(statements)
            except Exception as exc:
                if self.lost(exc):
                    raise
                prefix = self._begin_pending or _BEGIN_IMMEDIATE
                self.rollback_quietly()
                self.begin(immediate_constraints=prefix == _BEGIN_IMMEDIATE)
        return [self._execute_alone(statement) for statement in statements]

    def in_transaction(self) -> bool:
        raw = self.wrapper.connection
        if self.wrapper.vendor == "sqlite":
            return raw.in_transaction
        if self.batched:
            from psycopg.pq import TransactionStatus

            return raw.info.transaction_status in (TransactionStatus.INTRANS, TransactionStatus.INERROR)
        return True   # psycopg2: statements cannot end the transaction unseen here

    def _execute_at_once(self, statements: list) -> list:
        prefix, self._begin_pending = self._begin_pending, False
        cursor = self.wrapper.create_cursor()
        self._begin_statement()
        try:
            parts = [s.sql if s.params is None else cursor.mogrify(s.sql, s.params) for s in statements]
            cursor.execute(prefix + _SEP.join(parts))
            for _ in range(prefix.count(_SEP)):
                cursor.nextset()
            results = [self._result_of(cursor)]
            while cursor.nextset():
                results.append(self._result_of(cursor))
            if len(results) != len(statements):
                # A write of several statements: whose result is whose cannot be told.
                raise GroupShapeError(f"{len(statements)} writes gave {len(results)} results")
            return results
        except BaseException:
            if self._server_idle():   # refused before it was sent: BEGIN still to come
                self._begin_pending = prefix
            raise
        finally:
            self._end_statement()
            cursor.close()

    def _execute_alone(self, statement: Statement) -> Any:
        """One write of a group, in a savepoint: its error undoes it alone (PostgreSQL: an error
        would abort the whole transaction; SQLite: INSERT OR FAIL keeps its earlier rows)."""
        self.run("SAVEPOINT lb_group_write")
        try:
            result = self.execute(statement)
        except Exception as exc:
            if self.lost(exc):
                raise
            if not self.in_transaction():
                # SQLite's INSERT OR ROLLBACK, RAISE(ROLLBACK), an interrupt: the whole group is gone.
                raise GroupShapeError(f"a refused write ended the group's transaction ({exc})") from exc
            self.run("ROLLBACK TO SAVEPOINT lb_group_write")
            return exc
        self.run("RELEASE SAVEPOINT lb_group_write")
        return result

    def _execute_with_begin(self, cursor: Any, statement: Statement) -> None:
        """The deferred BEGIN shares the statement's round trip ("BEGIN;<sql>" is one
        simple query; the statement's result is the second one)."""
        try:
            if statement.many:
                cursor.execute(self._begin_pending.rstrip().rstrip(";").strip())
                cursor.executemany(statement.sql, statement.params)
            else:
                prefix = self._begin_pending
                cursor.execute(prefix + statement.sql, statement.params)
                for _ in range(prefix.count(_SEP)):
                    cursor.nextset()
        except BaseException:
            # Refused before it was sent (a NUL in a string, a wrong parameter count):
            # the server saw no BEGIN, so the next statement must still carry it.
            if not self._server_idle():
                self._begin_pending = False
            raise
        self._begin_pending = False

    def _server_idle(self) -> bool:
        """PostgreSQL: the session is outside any transaction."""
        from psycopg.pq import TransactionStatus

        return self.wrapper.connection.info.transaction_status == TransactionStatus.IDLE

    def run(self, sql: str, params: Any = None) -> Result:
        return self.execute(Statement(sql, params))

    def begin(self, immediate_constraints: bool = False) -> None:
        """Open a transaction; on PostgreSQL the BEGIN is sent with the next statement.

        ``immediate_constraints`` (one autocommit write): deferred constraints are checked
        with the statement, so that COMMIT can no longer refuse it for them.
        """
        if self.batched:
            if not self.is_open:
                self.open()
            self._begin_pending = _BEGIN_IMMEDIATE if immediate_constraints else _BEGIN_PREFIX
        else:
            self.run("BEGIN")
        self._in_transaction = True

    def commit(self) -> None:
        if self._begin_pending:
            self._begin_pending = self._in_transaction = False   # nothing was sent: nothing to commit
            return
        for attempt in range(COMMIT_BUSY_RETRIES + 1):
            try:
                self.run("COMMIT")
                break
            except Exception as exc:
                # SQLite: a COMMIT refused as BUSY (readers hold the file) leaves the transaction
                # open, and may be tried again; only a real refusal is one.
                if not (self.wrapper.vendor == "sqlite" and is_transient(exc) and self.in_transaction()
                        and attempt < COMMIT_BUSY_RETRIES):
                    raise
                time.sleep(0.05 * (attempt + 1))
        self._in_transaction = False

    # The leader's commit: the marker is in the transaction, the journal append comes
    # before COMMIT.  SQLite (in-process, nothing to save) keeps its order: marker,
    # journal, COMMIT; PostgreSQL sends marker + COMMIT in one round trip after the journal.
    def prepare_commit(self, seq: int, tag: int, check_deferred: bool) -> None:
        """Before the journal append: whatever could make COMMIT refuse the write is checked now
        (PostgreSQL: the deferred constraints of a caller's transaction), so that after it a
        failed COMMIT can only be a lost connection -- an outcome to learn, not a refusal."""
        if not self.batched:
            self.set_marker(seq, tag)
        elif check_deferred and not self._begin_pending:
            self.run("SET CONSTRAINTS ALL IMMEDIATE")

    def commit_with_marker(self, seq: int, tag: int) -> None:
        if not self.batched:
            self.commit()
            return
        sql = _marker_sql(seq, tag) + _SEP + "COMMIT"
        if self._begin_pending:
            sql = self._begin_pending + sql
            self._begin_pending = False
        self.run(sql)
        self._in_transaction = False

    def rollback_quietly(self) -> None:
        try:
            self.rollback()
        except Exception:
            pass

    def rollback(self) -> None:
        self._in_transaction = False
        if self._begin_pending:
            self._begin_pending = False   # the server never saw the BEGIN
            return
        if self.is_open:
            self.run("ROLLBACK")

    def describe_server(self) -> dict:
        wrapper = self.wrapper
        info = {"vendor": wrapper.vendor, "version": tuple(wrapper.get_database_version())}
        if wrapper.vendor == "postgresql":
            info["server_version"] = wrapper.connection.info.server_version
        return info

    # -- the applied-sequence marker -----------------------------------------
    def ensure_marker(self) -> tuple[int, int]:
        """Create the marker table if needed (adding the tag column to one of an older
        version); (sequence, tag) of the last journal record applied here."""
        self.run(MARKER_CREATE)
        columns = [c[0].lower() for c in self.run(f"SELECT * FROM {MARKER_TABLE} WHERE 1 = 0").description]
        if "tag" not in columns:
            self.run(f"ALTER TABLE {MARKER_TABLE} ADD COLUMN tag BIGINT NOT NULL DEFAULT 0")
        rows = self.run(f"SELECT seq, tag FROM {MARKER_TABLE} WHERE id = 1").rows
        if not rows:   # (SQLite: no write, so no wait, while a resync holds the file's write lock)
            self.run(MARKER_ROW)
            rows = self.run(f"SELECT seq, tag FROM {MARKER_TABLE} WHERE id = 1").rows
        seq, tag = rows[0]
        return int(seq), int(tag)

    def set_marker(self, seq: int, tag: int) -> None:
        self.run(_marker_sql(seq, tag))

    def apply_block(self, statements: list, seq: int, tag: int) -> None:
        """Apply one journal entry (or a group of them) as one transaction, marker included.

        On PostgreSQL the whole block -- BEGIN, the statements (their parameters
        merged client-side exactly as the cursor would), the marker UPDATE and
        COMMIT -- is one simple query, one round trip.  The server stops at the
        first failing statement, so nothing of the block is committed; the
        transaction is then rolled back and the error raised as before.
        """
        if not self.is_open:
            self.open()
        statements = without_superseded_resets(statements)
        if self.batched:
            self._apply_block_at_once(statements, seq, tag)
            return
        self.begin()
        try:
            for statement in statements:
                self.execute(statement)
            self.set_marker(seq, tag)
            self.commit()
        except BaseException:
            self.rollback_quietly()
            raise

    def _apply_block_at_once(self, statements: list, seq: int, tag: int) -> None:
        self._begin_pending = False
        cursor = self.wrapper.create_cursor()
        self._begin_statement()
        try:
            parts = ["BEGIN"]
            for statement in statements:
                if statement.many:
                    parts.extend(cursor.mogrify(statement.sql, params) for params in statement.params)
                elif statement.params is None:
                    parts.append(statement.sql)
                else:
                    parts.append(cursor.mogrify(statement.sql, statement.params))
            parts.append(_marker_sql(seq, tag))
            parts.append("COMMIT")
            cursor.execute(_SEP.join(parts))
        except BaseException:
            self.rollback_quietly()
            raise
        finally:
            self._end_statement()
            cursor.close()


# Django's PostgreSQL sequence reset, which followers run after each INSERT of generated keys.
_SEQUENCE_RESET = re.compile(r"\s*SELECT\s+setval\s*\(\s*pg_get_serial_sequence\s*\(", re.IGNORECASE)


def without_superseded_resets(statements: list) -> list:
    """``statements`` less each sequence reset that an identical one repeats later in the block with
    only keyed INSERTs (and other resets) between them.

    A reset sets the sequence from the table's max(id), so the later one leaves it exactly as both
    would, and nothing between them reads the sequence.  A group of inserts then costs each
    follower one reset per table instead of one per row (each is a planned max() and a setval).
    """
    keep = [True] * len(statements)
    pending: dict[str, int] = {}   # reset text -> index of its last occurrence still droppable
    for i, statement in enumerate(statements):
        if statement.params is None and not statement.many and _SEQUENCE_RESET.match(statement.sql):
            earlier = pending.get(statement.sql)
            if earlier is not None:
                keep[earlier] = False
            pending[statement.sql] = i
        elif not statement.keyed:
            pending.clear()   # it may read a sequence: every reset before it stays
    return [s for s, k in zip(statements, keep) if k] if not all(keep) else statements


# Statements joined into one simple query: the newline ends a trailing "--" comment
# of the previous statement before the separating semicolon.
_SEP = "\n;\n"
_BEGIN_PREFIX = "BEGIN" + _SEP
_BEGIN_IMMEDIATE = _BEGIN_PREFIX + "SET CONSTRAINTS ALL IMMEDIATE" + _SEP


class NeedsResync(Exception):
    """A copy the journal cannot catch up, whose next step is a full copy (state NEW): it is empty
    while the others have writes, or its resync did not finish."""


class GroupShapeError(Exception):
    """A group of writes cannot be run as one: the sequencer runs its writes one by one."""


def _marker_sql(seq: int, tag: int) -> str:
    return f"UPDATE {MARKER_TABLE} SET seq = {int(seq)}, tag = {int(tag)} WHERE id = 1"


def _sends_simple_queries(wrapper: Any) -> bool:
    """PostgreSQL through psycopg 3 with client-side binding (Django's default cursor)."""
    if wrapper.vendor != "postgresql":
        return False
    try:
        import psycopg
    except ImportError:  # psycopg2: its own cursor, keep one statement per round trip
        return False
    factory = getattr(wrapper.connection, "cursor_factory", None)
    return isinstance(factory, type) and issubclass(factory, psycopg.ClientCursor)


@dataclass
class ReadWork:
    statement: Statement
    reply: "queue.SimpleQueue"
    token: int


@dataclass
class WriteWork:
    entry: JournalEntry


@dataclass
class CancelQuery:
    session: tuple   # (backend pid, backend_start) of the connection whose read was cut


@dataclass
class MarkResync:
    """Put a resync's mark (a negative tag) on the copy's marker: until a resync completes, a
    restarted coordinator keeps the copy out (state NEW).  Answered on ``reply``: None or the error."""
    tag: int
    reply: "queue.SimpleQueue"


@dataclass
class FinishResync:
    """A resync loaded the copy at ``seq`` with the mark ``mark``: take the source's ``tag`` as the
    copy's own, then replay the journal after ``seq`` (answered on ``reply`` once the replay starts)."""
    seq: int
    tag: int
    mark: int
    reply: "queue.SimpleQueue"


STOP = object()
GROW_READ_POOL = object()
CHECK_CONNECTION = object()   # a probe failed: is this thread's connection lost too?
WAKE = object()   # nothing to do: the loop's maintenance (a probe that is due) runs next


class Hub:
    """What a database thread needs from the coordinator (kept small for tests)."""

    def __init__(self, shared: SharedState, config: LoadBalancerConfig,
                 catch_up_from: Callable[[str, Callable[[], tuple[int, int]]], str],
                 replay_after: Callable[[int], Iterator[JournalEntry]],
                 notify_applied: Callable[[], None],
                 probe_interval: Optional[float] = None,
                 schema: Any = None, joined: Optional[Callable[[str], None]] = None):
        self.shared = shared
        self.config = config
        self.joined = joined or (lambda alias: None)   # the copy is caught up: a member of the journal's history
        # (alias, read the marker) -> "" when the journal can bring the copy up to date, else why
        # not; HistoryUnsettled while copies that may know more writes have not been seen
        self.catch_up_from = catch_up_from
        self.replay_after = replay_after
        self.notify_applied = notify_applied
        self.probe_interval = probe_interval
        self.schema = schema   # a SchemaWatch: which copies lack migrations another has (None: not compared)


class DbThread(threading.Thread):
    """Owns one database: connection, FIFO, state, heartbeat, latency."""

    def __init__(self, index: int, alias: str, hub: Hub):
        super().__init__(name=f"db-{alias}", daemon=True)
        self.index = index
        self.alias = alias
        self.hub = hub
        self.shared = hub.shared
        config = hub.config
        timeout, connect = config.statement_timeout, getattr(config, "connect_timeout", 0.0)
        self.queue: "queue.SimpleQueue[Any]" = queue.SimpleQueue()
        self.conn = DbConnection(alias, timeout, connect)      # this thread's: reads and follower writes
        self.writer = DbConnection(alias, timeout, connect)    # the write-order holder's, while this is the first database
        self.read_pool = ReadPool(config.read_connections, lambda: DbConnection(alias, timeout, connect),
                                  grow=lambda: self.queue.put(GROW_READ_POOL))
        self.prober = Prober(alias, getattr(config, "probe_timeout", 1.0), lambda: DbConnection(alias, 0.0, connect),
                             self.on_probe)
        self._state_lock = threading.Lock()   # transitions from several threads (see _transition)
        self._reading_since = 0.0   # a queued read runs on self.conn since then (0: none)
        self._read_cut = False
        self._read_lock = threading.Lock()
        self.applied_seq = 0
        self.server_info: Optional[dict] = None
        self.ownership = Ownership(alias, getattr(hub.config, "address", ""))
        self.owned_elsewhere = ""   # why the last claim failed: another coordinator serves this database
        self.claimed_at_boot = False
        self.boot_marker: Optional[tuple[int, int]] = None   # (seq, tag) read by claim_at_boot()
        self.boot_migrations: Optional[frozenset] = None     # applied migrations read by claim_at_boot()
        self.running = True
        self.next_probe = 0.0
        self.next_latency_probe = 0.0
        self.last_error = ""        # why it last left RUNNING (or stayed out), for `status`
        self.last_error_at = 0.0    # wall clock
        self.resyncing = False      # a resync holds it (resync.ResyncDesk): only the resync changes its state

    # -- state --------------------------------------------------------------------
    @property
    def state(self) -> DbState:
        return self.shared.state(self.index)

    def set_state(self, state: DbState, reason: str = "") -> None:
        with self._state_lock:
            self._set_state(state, reason)

    def _transition(self, expected: DbState, state: DbState, reason: str = "") -> bool:
        """``expected`` -> ``state``, atomically: never over a change another thread just made
        (UNRESPONSIVE -> RUNNING must not undo a DOWN: its writes were dropped from the queue)."""
        with self._state_lock:
            if self.state != expected:
                return False
            self._set_state(state, reason)
            return True

    def _set_state(self, state: DbState, reason: str) -> None:
        if state != self.state:
            log = logger.warning if state in (DbState.DOWN, DbState.DIVERGED, DbState.UNRESPONSIVE,
                                              DbState.SCHEMA_BEHIND) else logger.info
            log("database %r is %s%s", self.alias, state.name, f": {reason}" if reason else "")
        if reason and state != DbState.RUNNING:
            self.note_error(reason)
        self.shared.set_state(self.index, state)

    def note_error(self, reason: str) -> None:
        self.last_error, self.last_error_at = reason, time.time()

    def why(self) -> dict:
        """For `status`: how long it has been in its state, and its last error."""
        since = self.shared.get(self.index, Slot.STATE_SINCE)
        return {
            "state_age_s": round(time.monotonic() - since, 3) if since else None,
            "last_error": self.last_error,
            "last_error_at": self.last_error_at,
            "last_error_age_s": round(time.time() - self.last_error_at, 3) if self.last_error_at else None,
        }

    def journal_floor(self) -> Optional[int]:
        """The first journal record this copy may still need (None: none, a full copy is its next step).
        RESYNCING: the pin its resync set, at or before the sequence its copy will be taken at."""
        return None if self.state == DbState.NEW else self.applied_seq

    def mark_applied(self, seq: int, writes: int = 1) -> None:
        if self.resyncing:
            return   # a write finished just as its resync began: the pin stays its journal floor
        self.applied_seq = seq
        self.shared.set(self.index, Slot.APPLIED_SEQ, seq)
        self.shared.add(self.index, Slot.WRITES, writes)

    def mark_unresponsive(self, reason: str) -> None:
        """The copy does not answer probes: no reads until it does (writes still go to it)."""
        if self._transition(DbState.RUNNING, DbState.UNRESPONSIVE, reason):
            self.shared.add(self.index, Slot.ERRORS, 1)
            self.read_pool.reset()

    def on_probe(self, verdict: str, detail: str, at: float) -> None:
        """The prober's verdict (see databases/probes.py)."""
        if verdict == ANSWERED:
            self.shared.set(self.index, Slot.LAST_PROBE_AT, at)
            self._transition(DbState.UNRESPONSIVE, DbState.RUNNING, "it answers probes again")
        elif verdict == HUNG:
            self.mark_unresponsive(f"{detail} (a server that does not answer: stopped, or cut off)")
        else:
            self.mark_unresponsive(f"a probe failed: {detail}")
            self.queue.put(CHECK_CONNECTION)   # its own connection says whether it is DOWN

    def go_down(self, exc: BaseException) -> None:
        self.shared.add(self.index, Slot.ERRORS, 1)
        self.set_state(DbState.DOWN, f"{type(exc).__name__}: {exc}".strip())
        if threading.current_thread() is self:
            self.conn.close()   # another thread's go_down leaves it to this thread: it may be using it
        self.writer.close()
        self.read_pool.reset()
        self.next_probe = time.monotonic() + self.hub.config.wait_time

    # -- work submission (called from server threads) --------------------------
    def submit_read(self, statement: Statement, reply: "queue.SimpleQueue", token: int) -> None:
        self.shared.add(self.index, Slot.INFLIGHT, 1)
        self.queue.put(ReadWork(statement, reply, token))

    def submit_write(self, entry: JournalEntry) -> None:
        self.queue.put(WriteWork(entry))

    def submit(self, work: Any) -> None:
        """A resync's step (MarkResync, FinishResync), done in queue order on this thread."""
        self.queue.put(work)

    def probe_now(self) -> None:
        """A DOWN copy tries to recover at once instead of at its next probe."""
        self.next_probe = 0.0
        self.queue.put(WAKE)

    def wake(self) -> None:
        """Look at the state again now (the schema verdict changed)."""
        self.queue.put(WAKE)

    def stop(self) -> None:
        """Finish the work queued before this call, then stop (STOP is handled in queue order)."""
        self.queue.put(STOP)

    # -- the loop -------------------------------------------------------------------
    def replacement(self) -> "DbThread":
        """A new thread for the same database, taking over this one's queue and writer."""
        fresh = DbThread(self.index, self.alias, self.hub)
        fresh.queue = self.queue
        fresh.writer = self.writer
        fresh.read_pool = self.read_pool
        fresh.ownership = self.ownership
        fresh.applied_seq = self.applied_seq
        fresh._state_lock = self._state_lock
        fresh.prober = self.prober   # its verdicts go to the old object: the same shared slot and queue
        fresh.resyncing = self.resyncing
        self.conn.close()
        return fresh

    def run(self) -> None:
        self.recover()
        while self.running:
            try:
                self.run_once()
            except Exception:
                # A bug must not silently stop a database: log it and carry on.
                logger.exception("database thread %r: unexpected error", self.alias)
                self.shared.add(self.index, Slot.ERRORS, 1)
        self.conn.close()
        self.writer.close()
        self.read_pool.reset()
        self.ownership.release()
        self.set_state(DbState.STOPPED)

    def run_once(self, timeout: Optional[float] = None) -> None:
        self.shared.set(self.index, Slot.HEARTBEAT, time.monotonic())
        try:
            item = self.queue.get(timeout=self._poll_timeout() if timeout is None else timeout)
        except queue.Empty:
            item = None
        while item is not None:
            item = self._handle(item)
        self._maintain()

    def _handle(self, item: Any) -> Any:
        """Do one work item; returns the next one when a batch of writes read ahead."""
        if item is STOP:
            self.running = False
        elif isinstance(item, ReadWork):
            self._read(item)
        elif item is GROW_READ_POOL:
            self._grow_read_pool()
        elif isinstance(item, CancelQuery):
            self._cancel_query(item.session)
        elif item is CHECK_CONNECTION:
            self._check_connection()
        elif isinstance(item, MarkResync):
            self._mark_resync(item)
        elif isinstance(item, FinishResync):
            self._finish_resync(item)
        elif isinstance(item, WriteWork):
            entries, following = self._writes_queued_after(item.entry)
            self._write(entries)
            return following
        return None

    def _writes_queued_after(self, first: JournalEntry) -> tuple[list, Any]:
        """The writes queued right behind ``first`` (up to WRITE_BATCH), and the item after them."""
        entries = [first]
        while len(entries) < WRITE_BATCH:
            try:
                item = self.queue.get_nowait()
            except queue.Empty:
                return entries, None
            if not isinstance(item, WriteWork):
                return entries, item
            entries.append(item.entry)
        return entries, None

    def _poll_timeout(self) -> float:
        return 0.5

    def _maintain(self) -> None:
        now = time.monotonic()
        state = self.state
        if state in (DbState.DOWN, DbState.STARTING) and now >= self.next_probe:
            self.recover()
        elif state in (DbState.RUNNING, DbState.UNRESPONSIVE) and self._schema_behind():
            self.fall_behind()
        elif state == DbState.SCHEMA_BEHIND:
            self._maintain_behind(now)
        elif state == DbState.RUNNING and self.hub.probe_interval and now >= self.next_latency_probe:
            self.next_latency_probe = now + self.hub.probe_interval
            self.probe_latency()

    def _check_connection(self) -> None:
        """A probe failed: this thread's own connection decides whether the copy is DOWN."""
        if self.state not in (DbState.RUNNING, DbState.UNRESPONSIVE):
            return
        try:
            self.conn.run("SELECT 1")
        except Exception as exc:
            if self.conn.lost(exc):
                self.go_down(exc)

    def _maintain_behind(self, now: float) -> None:
        if not self._schema_behind():
            self.recover()   # migrated: catch up from the journal, then RUNNING
        elif now >= self.next_probe:
            self.next_probe = now + self.hub.config.wait_time
            self.probe_latency()   # a copy that went down meanwhile is DOWN, not SCHEMA_BEHIND

    def probe_latency(self) -> None:
        start = time.perf_counter()
        try:
            self.conn.run("SELECT 1")
        except Exception as exc:
            if is_connection_error(exc):
                self.go_down(exc)
            return
        self.shared.record_latency(self.index, (time.perf_counter() - start) * 1000)
        self.shared.set(self.index, Slot.LAST_PROBE_AT, time.monotonic())

    # -- reads ------------------------------------------------------------------------
    def _read(self, work: ReadWork) -> None:
        """A queued read, on the connection that also applies this copy's writes: bounded by
        READ_TIMEOUT (PostgreSQL: statement_timeout; SQLite: cut by the coordinator's watch,
        cut_overdue_read), so that it never holds the writes queued behind it for longer."""
        self.shared.add(self.index, Slot.INFLIGHT, -1)
        limit = self.hub.config.database_answer_timeout
        with self._read_lock:
            self._reading_since, self._read_cut = time.monotonic(), False
        try:
            ok, value = self._run_read(self.conn, work.statement, bound=limit)
        finally:
            with self._read_lock:
                self._reading_since = 0.0
        if not ok and (self._read_cut or is_statement_timeout(value)):
            value = QueryTimeout(f"database {self.alias!r} did not finish a read within {limit:.2f} s; it was cut")
        work.reply.put((work.token, ok, value))

    def cut_overdue_read(self, limit: float) -> bool:
        """SQLite: interrupt a queued read running past ``limit`` (under the lock the reading
        thread takes when the read ends: never a write that follows it).  PostgreSQL bounds it
        on the server (statement_timeout)."""
        with self._read_lock:
            since = self._reading_since
            wrapper = self.conn.wrapper
            if not since or self._read_cut or time.monotonic() - since <= limit or wrapper is None \
                    or wrapper.vendor != "sqlite":
                return False
            self._read_cut = True
            self.conn.interrupt()
            return True

    def cancel_query_of(self, conn: DbConnection) -> None:
        """After the watchdog cut a read: PostgreSQL would run it on until it next writes; cancel it."""
        if conn.session is not None:
            self.queue.put(CancelQuery(conn.session))

    def _cancel_query(self, session: tuple) -> None:
        # An ordinary query on this thread's connection (the driver waits without the GIL, even
        # on a hung server); backend_start makes sure a reused pid is never cancelled.
        try:
            self.conn.run("SELECT pg_cancel_backend(pid) FROM pg_stat_activity WHERE pid = %s AND backend_start = %s",
                          session)
        except Exception as exc:
            logger.info("database %r: could not cancel a cut read: %s", self.alias, exc)

    def _grow_read_pool(self) -> None:
        # A failure here says nothing about the database's own connection (a server at
        # max_connections refuses only the new one): it never changes the state.
        try:
            self.read_pool.open_one(retry_after=max(self.hub.config.wait_time, 1.0))
        except Exception as exc:
            logger.warning("database %r: could not open a read connection (%s); its reads go through "
                           "the database thread meanwhile", self.alias, exc)

    def read_here(self, pooled: PooledConnection, statement: Statement) -> tuple[bool, Any]:
        """Run a read on the calling (server) thread, on a connection borrowed from ``read_pool``."""
        if self.state != DbState.RUNNING:
            self.read_pool.checkin(pooled)
            return False, DatabaseDown(f"database {self.alias!r} is {self.state.name}")
        current = self.read_pool.is_current(pooled)

        def on_lost(reason: str) -> None:
            # Not when the watchdog cut it (the caller decides), nor for a connection lent
            # before the database last went down (it must not take it down again).
            if current and not pooled.interrupted:
                self.mark_unresponsive(reason)

        self.shared.add(self.index, Slot.INFLIGHT, 1)
        broken = True
        try:
            ok, value = self._run_read(pooled.conn, statement, on_lost=on_lost)
            if not ok and pooled.interrupted:
                limit = self.hub.config.database_answer_timeout
                value = QueryTimeout(f"database {self.alias!r} did not finish a read within {limit:.2f} s; it was cut")
            broken = not ok and isinstance(value, (DatabaseDown, QueryTimeout))
            return ok, value
        finally:
            self.shared.add(self.index, Slot.INFLIGHT, -1)
            self.read_pool.checkin(pooled, broken=broken)

    def _run_read(self, conn: DbConnection, statement: Statement,
                  on_lost: Optional[Callable[[str], None]] = None, bound: float = 0.0) -> tuple[bool, Any]:
        """(True, Result) or (False, the exception); DatabaseDown when the database is gone."""
        if self.state != DbState.RUNNING:
            return False, DatabaseDown(f"database {self.alias!r} is {self.state.name}")
        start = time.perf_counter()
        try:
            result = conn.execute_bounded(statement, bound) if bound else conn.execute(statement)
        except Exception as exc:
            if not is_connection_error(exc):
                return False, exc
            if on_lost is None:
                self.go_down(exc)
            else:
                on_lost(f"{type(exc).__name__}: {exc}".strip())
            return False, DatabaseDown(f"database {self.alias!r} failed: {exc}")
        self.shared.record_latency(self.index, (time.perf_counter() - start) * 1000)
        self.shared.add(self.index, Slot.READS, 1)
        return True, result

    # -- writes -----------------------------------------------------------------------
    def _write(self, entries: list) -> None:
        if self.state not in (DbState.RUNNING, DbState.RECOVERING, DbState.UNRESPONSIVE):
            return  # DOWN / DIVERGED: dropped here; the journal keeps them for the replay
        pending = [e for e in entries if e.seq > self.applied_seq]
        if len(pending) > 1 and self._apply_batch(pending):
            return
        for entry in pending:
            if not self.apply(entry):
                return

    def _apply_batch(self, entries: list) -> bool:
        """Group commit: several queued writes in one transaction, one marker update.

        False (nothing applied) on any failure: the entries are then applied one
        by one, which names the one that fails.
        """
        try:
            self.conn.apply_block([s for e in entries for s in e.statements], entries[-1].seq, entries[-1].tag)
        except Exception as exc:
            if self.conn.lost(exc) or self.state == DbState.DOWN:
                self.go_down(exc)
                return True
            return False
        for entry in entries:
            self.mark_applied(entry.seq)
        self.hub.notify_applied()
        return True

    def apply(self, entry: JournalEntry) -> bool:
        if entry.seq <= self.applied_seq:
            return True
        for attempt in range(TRANSIENT_RETRIES + 1):
            try:
                self.conn.apply_block(entry.statements, entry.seq, entry.tag)
                break
            except Exception as exc:
                if self.conn.lost(exc) or self.state == DbState.DOWN:
                    self.go_down(exc)
                    return False
                if is_transient(exc) and attempt < TRANSIENT_RETRIES:
                    time.sleep(0.05 * (attempt + 1))
                    continue
                if self._behind_now():
                    return False   # it cannot run the write yet: it waits in the journal for the migration
                self.shared.add(self.index, Slot.ERRORS, 1)
                self.set_state(
                    DbState.DIVERGED,
                    f"write #{entry.seq} (request {entry.request_id}) applied on {entry.database!r} "
                    f"failed here: {type(exc).__name__}: {exc}",
                )
                return False
        self.mark_applied(entry.seq)
        self.hub.notify_applied()
        return True

    # -- recovery -----------------------------------------------------------------------
    def _read_marker(self) -> tuple[int, int]:
        """The marker, read while the write order is held: a write this database commits as
        the leader (on its writer connection) cannot be published between the read and the
        assignment, which would otherwise set ``applied_seq`` back and replay that write."""
        seq, tag = self.conn.ensure_marker()
        self.applied_seq = seq
        self.shared.set(self.index, Slot.APPLIED_SEQ, seq)
        return seq, tag

    def claim_at_boot(self, deadline: Optional[float] = None) -> None:
        """Before the coordinator reads or writes anything: DatabaseOwnedElsewhere if another
        coordinator serves this database (a holder that cannot be judged is waited for until
        ``deadline``, shared by every database).  A database that cannot be reached now is
        claimed when it is recovered."""
        if deadline is None:
            deadline = time.monotonic() + CLAIM_WAIT
        try:
            self.conn.open()
            self._claim(wait=max(0.0, deadline - time.monotonic()))
            self.boot_marker = self.conn.ensure_marker()
            self.boot_migrations = self._read_migrations()
        except DatabaseOwnedElsewhere:
            self.conn.close()
            raise
        except Exception as exc:
            logger.info("database %r: not reachable at boot (%s); it is claimed when it comes up", self.alias, exc)
            self.conn.close()
            return
        self.claimed_at_boot = True

    def _claim(self, wait: float = 0.0) -> None:
        try:
            self.ownership.claim(self.conn, wait=wait)
        except DatabaseOwnedElsewhere as exc:
            if str(exc) != self.owned_elsewhere:
                logger.error("%s", exc)
            self.owned_elsewhere = str(exc)
            raise
        self.owned_elsewhere = ""

    def recover(self) -> None:
        """Connect, then apply every journaled write this database missed; then RUNNING
        (or SCHEMA_BEHIND while it lacks migrations another copy has applied)."""
        if self.resyncing:
            return   # the resync decides (a copy it is loading must not be caught up meanwhile)
        try:
            if (self.claimed_at_boot or self.state == DbState.SCHEMA_BEHIND) and self.conn.is_open:
                self.claimed_at_boot = False   # opened and claimed before: keep that session (and the claim)
            else:
                self.conn.open()
                self._claim()
            self.server_info = self.conn.describe_server()
            self._end_stale_writer()
            self.set_state(DbState.RECOVERING)
            gap = self.hub.catch_up_from(self.alias, self._read_marker)
            self._report_migrations()
        except NeedsResync as exc:
            self.set_state(DbState.NEW, str(exc))
            return
        except Exception as exc:
            if self.state != DbState.DOWN:
                self.go_down(exc)
            else:
                self.note_error(f"{type(exc).__name__}: {exc}".strip())   # still down: maybe for another reason
            self.next_probe = time.monotonic() + self.hub.config.wait_time
            return
        if gap:
            self.set_state(DbState.DIVERGED, gap)
            return
        if self._fall_behind_if_behind():
            return
        self._replay_then_run()

    def _replay_then_run(self) -> None:
        if not self._replay() or self.resyncing:   # (a resync that took it out meanwhile decides)
            return
        if self._fall_behind_if_behind():   # another copy was migrated during the replay
            return
        self.set_state(DbState.RUNNING)
        self.hub.joined(self.alias)
        self.hub.notify_applied()

    def _end_stale_writer(self) -> None:
        """PostgreSQL: the writer connection was closed (cut while its server did not answer,
        or lost at COMMIT), but the server may still run its session, and commit what it had
        received, after the marker is read: it is ended first, so that the marker says for
        good whether its COMMIT happened."""
        session = self.writer.session
        if session is None or self.writer.is_open or self.conn.wrapper.vendor != "postgresql":
            return
        deadline = time.monotonic() + CLAIM_WAIT
        while self.conn.run("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE pid = %s "
                            "AND backend_start = %s", session).rows:
            if time.monotonic() > deadline:
                raise DatabaseDown(f"the previous write session of {self.alias!r} (server pid {session[0]}) "
                                   "does not end; it may still commit")
            time.sleep(0.05)
        self.writer.session = None

    # -- schema ---------------------------------------------------------------------------
    def _schema_behind(self) -> tuple:
        """The migrations this copy lacks while another copy is ahead of it; () when it is not behind."""
        schema = self.hub.schema
        return schema.behind(self.alias) if schema is not None else ()

    def _read_migrations(self) -> Optional[frozenset]:
        """This copy's applied migrations of the load-balanced apps, read on its own connection; None
        when they are not compared or cannot be read (a lost connection is raised)."""
        if self.hub.schema is None:
            return None
        try:
            return self.hub.schema.read_on(self.conn)
        except Exception as exc:
            if self.conn.lost(exc):
                raise
            logger.warning("database %r: cannot read its applied migrations (%s: %s); its schema is not compared",
                           self.alias, type(exc).__name__, exc)
            return None

    def _report_migrations(self) -> None:
        """Tell the schema watch what this copy, just (re)connected, has applied."""
        applied = self._read_migrations()
        if applied is not None:
            self.hub.schema.report({self.alias: applied})

    def fall_behind(self) -> None:
        self.set_state(DbState.SCHEMA_BEHIND, self.hub.schema.reason(self.alias))
        self.read_pool.reset()
        self.next_probe = time.monotonic() + self.hub.config.wait_time

    def _fall_behind_if_behind(self) -> bool:
        if not self._schema_behind():
            return False
        self.fall_behind()
        return True

    def _behind_now(self) -> bool:
        """After a write another copy applied failed here: is this copy behind, looking again at
        every copy now (the one ahead may have been migrated a moment ago)?  Then SCHEMA_BEHIND."""
        if self.hub.schema is None:
            return False
        self.hub.schema.refresh()
        return self._fall_behind_if_behind()

    # -- a resync's steps (ops/resync.py), on this thread ---------------------------------------
    def _mark_resync(self, work: MarkResync) -> None:
        try:
            self.conn.ensure_marker()
            self.conn.run(f"UPDATE {MARKER_TABLE} SET tag = {int(work.tag)} WHERE id = 1")
        except Exception as exc:
            work.reply.put(exc)
            return
        work.reply.put(None)

    def _finish_resync(self, work: FinishResync) -> None:
        """The copy's marker goes from (seq, mark) to (seq, the source's tag) -- only if it is the one
        this resync committed --, then the journal after ``seq`` is replayed as after any outage."""
        if not self.resyncing:
            work.reply.put(ResyncError(f"the resync of {self.alias!r} was given up meanwhile"))
            return
        try:
            flipped = self.conn.run(f"UPDATE {MARKER_TABLE} SET tag = {int(work.tag)} WHERE id = 1 "
                                    f"AND seq = {int(work.seq)} AND tag = {int(work.mark)}").rowcount
            if flipped != 1:
                raise ResyncError(f"the marker of {self.alias!r} is not the one this resync committed "
                                  f"(#{work.seq}): another resync or a restore changed it meanwhile")
        except Exception as exc:
            work.reply.put(exc)
            return
        self.resyncing = False
        self.set_state(DbState.RECOVERING)
        try:
            gap = self.hub.catch_up_from(self.alias, self._read_marker)
            self._report_migrations()   # the resync may have migrated it: the watch may have seen it half-way
        except Exception as exc:   # complete at its marker now: an ordinary recovery takes it from here
            work.reply.put(exc)
            self.go_down(exc)
            return
        if gap:
            self.set_state(DbState.DIVERGED, gap)
            work.reply.put(ResyncError(f"{self.alias!r} was loaded at #{work.seq}, but {gap}"))
            return
        work.reply.put(None)
        self._replay_then_run()

    def _replay_batch(self, entries: list) -> bool:
        """Several journaled writes in one transaction, as queued ones are (one by one on a failure)."""
        self._write(entries)
        return self.applied_seq >= entries[-1].seq and self.state == DbState.RECOVERING

    def _replay(self) -> bool:
        """Apply the journal's records after the marker, read from disk a chunk at a time
        (writes published meanwhile are also queued here; the marker skips a repeat)."""
        start, replayed, batch = self.applied_seq, 0, []
        for entry in self.hub.replay_after(self.applied_seq):
            batch.append(entry)
            if len(batch) == WRITE_BATCH:
                if not self._replay_batch(batch):
                    return False
                replayed, batch = replayed + len(batch), []
        if batch:
            if not self._replay_batch(batch):
                return False
            replayed += len(batch)
        if replayed:
            logger.info("database %r: applied %d journaled writes after #%d", self.alias, replayed, start)
        return True

"""Zero-hop reads: an app process on the coordinator's host routes and runs reads itself.

The shared-memory segment holds what a read needs to pick a copy: each
database's state and applied sequence, the last sequence handed out
(``Header.LAST_SEQ``, published before a write is acknowledged), latencies and
in-flight counts.  An app process that can attach it (same host, same OS user: the
segment's name carries the uid, and one another user owns or could write is never
read; same ``LAYOUT_VERSION``) chooses the copy with the configured read algorithm and
runs the statement on a private connection of its own to that copy; the
coordinator is not on the path.  Other processes (``READ_PATH = 'COORDINATOR'``,
another host or user, another layout) keep the round trip to the coordinator,
and so does any read this module gives up on (``read`` returns None).

Guarantees, as on the coordinator path:

* read-your-writes: a read only goes to a copy whose applied sequence has reached
  the LAST_SEQ read when the read started (else another copy that has, else a
  bounded wait, else the coordinator path, which queues it behind the writes);
* only RUNNING copies serve; a connection failure on this process's connection is
  retried on another copy and counted in the thread's reader slot (``FAILURES``),
  which the coordinator's ``ReaderWatch`` answers by probing that copy;
* ``READ_TIMEOUT`` bounds a read here too (PostgreSQL ``statement_timeout`` on
  the connection, plus this process's watchdog thread for a server that does not
  answer at all; SQLite ``interrupt()``).  A cut read is counted (``TIMEOUTS``):
  the coordinator probes that copy, and this process waits for the verdict in
  shared memory -- the copy answered a probe after the cut (``Slot.LAST_PROBE_AT``):
  the query is slow, ``QueryTimeout``; the copy left RUNNING (UNRESPONSIVE: it does
  not answer): the read is retried on another copy.

Each thread claims its own reader slot (``shm.state.Reader``) with an
``flock``: it is the only writer of the slot's counters, so the hot path takes no
lock.  Connections are private ``DatabaseWrapper`` objects per thread, never
``connections[alias]``: a read must not run inside, or disturb, a transaction the
app has open on that alias.
"""
from __future__ import annotations

import copy
import datetime
import decimal
import fcntl
import logging
import os
import tempfile
import threading
import time
import uuid
import weakref
from typing import Any, Optional

from django_lb_shm.balancing import build_read_algorithm
from django_lb_shm.client.connection import get_client
from django_lb_shm.databases.failures import (
    interrupt_statement,
    is_connection_error,
    is_statement_timeout,
    is_transient,
)
from django_lb_shm.databases.ownership import sqlite_path
from django_lb_shm.errors import (
    DatabaseDown,
    QueryTimeout,
    SharedMemoryNotOwned,
    as_database_error,
)
from django_lb_shm.settings.config import LoadBalancerConfig, _settings, get_config
from django_lb_shm.shm.state import (
    HEADER_SIZE,
    SLOT_SIZE,
    DbState,
    Header,
    LayoutMismatch,
    Reader,
    SharedState,
    Slot,
    databases_key,
    segment_name,
)
from django_lb_shm.wire.descriptors import Result, Statement
from django_lb_shm.wire.protocol import private_directory

logger = logging.getLogger("django_lb_shm.reads")

STALE_AFTER = 2.0         # a heartbeat older than this (the coordinator beats every 0.5 s): look for a new segment
CATCH_UP_WAIT = 0.02      # how long a read waits for a copy to apply the last write, then the coordinator path
RETRY_ATTACH_EVERY = 2.0  # no segment (coordinator not started yet): try again after this long
QUARANTINE = 1.0          # a copy that failed here gets no reads from this process meanwhile

# Parameters the drivers take as they are.  Anything else (a psycopg Json, a custom
# adapter) takes the coordinator path, whose pickling decides, as it always did.
_PLAIN = frozenset({int, str, float, bool, type(None), bytes, decimal.Decimal, datetime.datetime,
                    datetime.date, datetime.time, datetime.timedelta, uuid.UUID, memoryview, bytearray})
try:  # Django's PostgreSQL backend wraps some values in psycopg's typed numbers (SELECT %s AS "a" of exists())
    from psycopg.types import numeric as _pg_numeric

    _PLAIN = _PLAIN | {getattr(_pg_numeric, name) for name in ("Int2", "Int4", "Int8", "IntNumeric", "Float4",
                                                                 "Float8", "Oid") if hasattr(_pg_numeric, name)}
except ImportError:
    pass
_RUNNING = float(DbState.RUNNING)
try:
    from psycopg.pq import ExecStatus as _ExecStatus

    _PSYCOPG_TUPLES: Optional[int] = int(_ExecStatus.TUPLES_OK)
except ImportError:
    _PSYCOPG_TUPLES = None


class _Cut(Exception):
    """Internal: the read ran past READ_TIMEOUT."""


class _Thread:
    """One thread's reader slot, connections and cursors."""

    def __init__(self, reader: "ZeroHopReader", slot: int, lock_fd: int):
        self.pid = os.getpid()
        self.slot = slot
        self.lock_fd = lock_fd
        self.wrappers: dict[int, Any] = {}
        self.cursors: dict[int, Any] = {}
        self.deferred: dict[int, bool] = {}   # db -> its cursor's description is built only when asked
        self.busy_since = 0.0      # monotonic start of the read in progress (0: none), for the watchdog
        self.busy_db = -1
        self.cut = False
        self.values = None
        self.bind(reader.shared)
        self._finalizer = weakref.finalize(self, _close_thread_state, self.pid, lock_fd, self.wrappers)

    def bind(self, shared: SharedState) -> None:
        """Take the slot in (a possibly new) segment: this thread is now its only writer."""
        values = self.values = shared.values
        self.base = [shared.reader_index(self.slot, db, 0) for db in range(shared.n_databases)]
        head = shared.reader_head(self.slot)
        values[head] = os.getpid()
        values[head + 1] += 1
        for db in range(shared.n_databases):
            values[shared.reader_index(self.slot, db, Reader.INFLIGHT)] = 0.0
        # The scan bound: raised by whoever claims a higher slot (re-checked against a racing claimant).
        for _ in range(3):
            if values[Header.READERS_HIGH] >= self.slot + 1:
                break
            values[Header.READERS_HIGH] = self.slot + 1


def _close_thread_state(pid: int, lock_fd: int, wrappers: dict) -> None:
    if os.getpid() != pid:
        return   # a forked child: the parent's sockets and lock are not ours to close
    for wrapper in list(wrappers.values()):
        _close_wrapper(wrapper)
    try:
        os.close(lock_fd)   # releases the slot's flock
    except OSError:
        pass


def _close_wrapper(wrapper: Any) -> None:
    raw = getattr(wrapper, "connection", None)
    if raw is not None:
        try:
            raw.close()
        except Exception:
            pass
    wrapper.connection = None


class ZeroHopReader:
    """This process's read router over the shared segment (one per process and config)."""

    def __init__(self, config: LoadBalancerConfig, shared: SharedState):
        from django.conf import settings

        self.config = config
        self.raw = settings.LOAD_BALANCER   # what the fast path compares
        self.pid = os.getpid()
        self.shared = shared
        self.values = shared.values
        self.names = list(config.databases)
        self.n = len(self.names)
        self.algorithm = build_read_algorithm(config, shared)
        self.databases = settings.DATABASES
        self.timeout = config.database_answer_timeout
        # the coordinator's reader watch polls every 50 ms, its health watch every 100 ms
        self.verdict_wait = config.probe_timeout + 0.5
        self.heartbeat_timeout = config.heartbeat_timeout
        self.state_at = [HEADER_SIZE + i * SLOT_SIZE + Slot.STATE for i in range(self.n)]
        self.applied_at = [HEADER_SIZE + i * SLOT_SIZE + Slot.APPLIED_SEQ for i in range(self.n)]
        self.since_at = [HEADER_SIZE + i * SLOT_SIZE + Slot.STATE_SINCE for i in range(self.n)]
        # A copy that failed here gets no reads from this process for QUARANTINE seconds, or until
        # the coordinator changes its state (it went DOWN and came back meanwhile).
        self.quarantine = [0.0] * self.n
        self.quarantine_since = [0.0] * self.n
        self.indices = list(range(self.n))
        self.fields = tuple(zip(self.indices, self.state_at, self.applied_at, self.since_at))
        self._local = threading.local()
        self._threads: "weakref.WeakSet[_Thread]" = weakref.WeakSet()
        self._lock = threading.Lock()        # claims and re-attach only, never a read
        self._watchdog: Optional[threading.Thread] = None
        self._next_attach = 0.0
        self.lock_dir = _lock_directory(config)

    # -- the hot path -----------------------------------------------------------------
    def read(self, statement: Statement) -> Optional[Result]:
        """The result of a read run here, or None: take the coordinator path."""
        if statement.many:
            return None
        out = self.run(statement.sql, statement.params)
        if out is None:
            return None
        rows, description, rowcount, database = out
        return Result(rows, resolve_description(description), rowcount, None, database)

    def run(self, sql: str, params: Any) -> Optional[tuple]:
        """(rows, description, rowcount, database) of a read run here, or None: take the coordinator path."""
        if params and not _plain(params):
            return None
        values = self.values
        heartbeat = values[Header.HEARTBEAT]
        now = time.monotonic()
        if heartbeat and now - heartbeat > STALE_AFTER:
            # Not beating: a coordinator restarted by its supervisor writes a new segment.
            if not self._fresh_segment(now) and now - heartbeat > self.heartbeat_timeout:
                return None   # the coordinator has not beaten for long: its states are not to be trusted
        values = self.values
        last = values[Header.LAST_SEQ]
        try:
            state = self._local.state
        except AttributeError:
            state = self._local.state = self._claim()
        if state is None:
            return None
        if state.values is not values:
            state.bind(self.shared)
        tried: list[int] = []
        reopened: list[int] = []   # copies whose kept connection failed once: tried again on a new one
        waited_until = 0.0
        while True:
            quarantine = self.quarantine
            candidates = [i for i, state_at, applied_at, since_at in self.fields
                          if values[state_at] == _RUNNING and values[applied_at] >= last
                          and (quarantine[i] <= now or values[since_at] != self.quarantine_since[i])
                          and i not in tried]
            if not candidates:
                if not tried and not any(values[self.state_at[i]] == _RUNNING for i in self.indices) \
                        and self._fresh_segment(now):
                    values = self.values   # a stopped coordinator's segment: its successor's is here
                    continue
                if tried or not any(values[self.state_at[i]] == _RUNNING for i in self.indices):
                    return None   # the coordinator path says what is down, or retries with its own connections
                # RUNNING copies still applying the last write: wait a little, then the coordinator path
                if not waited_until:
                    waited_until = now + CATCH_UP_WAIT
                elif now > waited_until:
                    return None
                time.sleep(0.0002)
                now = time.monotonic()
                continue
            algorithm = self.algorithm
            db = reopened[-1] if reopened and reopened[-1] in candidates else \
                algorithm.choose(algorithm.eligible(candidates))
            kept = db in state.cursors
            try:
                return self._run(state, db, sql, params)
            except _Cut:
                cut_at = time.monotonic()
                self._count(state, db, Reader.TIMEOUTS)   # the coordinator probes the copy
                answers = self._answers_probe(db, cut_at)
                if answers is not False:
                    raise QueryTimeout(
                        f"database {self.names[db]!r} did not finish a read within {self.timeout:.2f} s; "
                        + ("it answers probes: " if answers else "")
                        + f"the query takes longer than READ_TIMEOUT ({self.timeout:.2f} s); "
                        "raise READ_TIMEOUT or make the query faster"
                    ) from None
            except Exception as exc:
                if is_connection_error(exc) and kept and db not in reopened:
                    # A kept connection the server closed meanwhile (it restarted, or ended idle
                    # sessions): the copy may well be up; one new connection decides.
                    reopened.append(db)
                    continue
                if is_connection_error(exc):
                    logger.info("database %r failed a read on this process's connection (%s: %s); retrying "
                                "elsewhere", self.names[db], type(exc).__name__, exc)
                    self._count(state, db, Reader.FAILURES)
                elif not is_transient(exc):
                    raise   # the caller's error (bad SQL, bad data): as Django would raise it
            tried.append(db)
            self.quarantine_since[db] = values[self.since_at[db]]
            self.quarantine[db] = time.monotonic() + QUARANTINE
            now = time.monotonic()

    def _run(self, state: _Thread, db: int, sql: str, params: Any) -> tuple:
        cursor = state.cursors.get(db)
        if cursor is None:
            cursor = self._open(state, db)
        values = state.values
        base = state.base[db]
        inflight = base + Reader.INFLIGHT
        values[inflight] += 1
        state.cut = False
        state.busy_db = db
        state.busy_since = started = time.monotonic()
        try:
            if params is None:
                cursor.execute(sql)
            else:
                cursor.execute(sql, params)
            if state.deferred[db]:
                description, rows = _deferred_description(cursor)
            else:
                description = cursor.description
                rows = cursor.fetchall() if description is not None else []
        except BaseException as exc:
            state.busy_since = 0.0
            cut = state.cut or is_statement_timeout(exc)
            # Anything but the database's own error (an app's signal handler raising mid-read, a
            # value the driver could not bind) may leave the connection mid-statement: not reused.
            if cut or is_connection_error(exc) or not _from_driver(state.wrappers.get(db), exc):
                self._drop(state, db)
            if cut:
                raise _Cut() from exc
            raise as_database_error(exc)
        finally:
            state.busy_since = 0.0
            values[inflight] -= 1
        elapsed_ms = (time.monotonic() - started) * 1000
        values[base + Reader.READS] += 1
        values[base + Reader.LATENCY_SUM_MS] += elapsed_ms
        values[base + Reader.LATENCY_COUNT] += 1
        return rows, description, cursor.rowcount, self.names[db]

    def _answers_probe(self, db: int, cut_at: float) -> Optional[bool]:
        """After a read on ``db`` was cut at ``cut_at``: True if the copy answered a probe since
        (the query is slow), False if the coordinator took it out of the rotation (it does not
        answer), None if no verdict came in time (a stopped coordinator: the query is blamed)."""
        probe_at = HEADER_SIZE + db * SLOT_SIZE + Slot.LAST_PROBE_AT
        deadline = cut_at + self.verdict_wait
        while True:
            values = self.values
            if values[probe_at] > cut_at:
                return True
            if values[self.state_at[db]] != _RUNNING:
                return False
            if time.monotonic() > deadline:
                return None
            time.sleep(0.005)

    def _count(self, state: _Thread, db: int, field: Reader) -> None:
        state.values[self.shared.reader_index(state.slot, db, field)] += 1

    # -- connections --------------------------------------------------------------------
    def _open(self, state: _Thread, db: int) -> Any:
        """A private connection of this thread to copy ``db`` (never connections[alias])."""
        from django.db import DEFAULT_DB_ALIAS, connections
        from django.db.utils import load_backend

        alias = self.names[db]
        entries = {DEFAULT_DB_ALIAS: copy.deepcopy(self.databases[DEFAULT_DB_ALIAS]),
                   alias: copy.deepcopy(self.databases[alias])}
        entry = connections.configure_settings(entries)[alias]
        vendor_engine = entry["ENGINE"]
        if "sqlite" in vendor_engine:
            if not os.path.exists(sqlite_path(entry)):   # SQLite would create an empty database there
                raise DatabaseDown(f"the SQLite file of {alias!r} ({sqlite_path(entry)}) does not exist")
        if "postgresql" in vendor_engine:
            # A server that accepts but never answers must not hold the connect forever.
            options = entry.setdefault("OPTIONS", {})
            options.setdefault("connect_timeout", max(2, int(self.timeout + 0.999)))
        # Its own alias name: not one of connections' (Django's test cases treat a connection under
        # such a name as dynamically created, not as the app reaching a database it did not declare).
        wrapper = load_backend(vendor_engine).DatabaseWrapper(entry, f"{alias}:zero-hop")
        wrapper.inc_thread_sharing()   # closed from the watchdog or a finalizer, maybe on another thread
        state.busy_db, state.cut = db, False
        state.busy_since = time.monotonic()
        try:
            wrapper.ensure_connection()
            if wrapper.vendor == "postgresql":
                limit = self.timeout
                if self.config.statement_timeout:
                    limit = min(limit, self.config.statement_timeout)
                with wrapper.connection.cursor() as cursor:
                    cursor.execute(f"SET statement_timeout = {max(1, int(limit * 1000))}")
            cursor = wrapper.create_cursor()
        except BaseException as exc:
            _close_wrapper(wrapper)
            if state.cut or time.monotonic() - state.busy_since >= self.timeout:
                raise _Cut() from exc   # no answer within READ_TIMEOUT (connect_timeout): hung, not down
            raise
        finally:
            state.busy_since = 0.0
        state.wrappers[db] = wrapper
        state.cursors[db] = cursor
        state.deferred[db] = _PSYCOPG_TUPLES is not None and hasattr(cursor, "pgresult")
        self._start_watchdog()
        return cursor

    def _drop(self, state: _Thread, db: int) -> None:
        state.cursors.pop(db, None)
        wrapper = state.wrappers.pop(db, None)
        if wrapper is not None:
            _close_wrapper(wrapper)

    # -- slots ----------------------------------------------------------------------------
    def _claim(self) -> Optional[_Thread]:
        """This thread's reader slot: the first free one (an flock on its lock file)."""
        if not self.lock_dir:
            return None
        shared = self.shared
        prefix = os.path.join(self.lock_dir, f"{shared.shm.name}.reader-")
        with self._lock:
            for slot in range(shared.reader_slots):
                try:
                    fd = os.open(f"{prefix}{slot}.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
                except OSError:
                    return None
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except OSError:
                    os.close(fd)
                    continue
                state = _Thread(self, slot, fd)
                self._threads.add(state)
                return state
        logger.warning("all %d reader slots of %s are taken; this thread's reads go through the coordinator",
                       shared.reader_slots, shared.shm.name)
        return None

    def _fresh_segment(self, now: float) -> bool:
        """The heartbeat is old or no copy runs: is there a new segment (a restarted supervisor or
        coordinator)? Checked once a second."""
        if now < self._next_attach:
            return False
        with self._lock:
            self._next_attach = now + 1.0
            try:
                shared = SharedState.attach_untracked(segment_name(self.config.address))
            except (OSError, RuntimeError, ValueError, SharedMemoryNotOwned):
                return False
            heartbeat = shared.header(Header.HEARTBEAT)
            same = all(shared.header(h) == self.shared.header(h)
                       for h in (Header.SUPERVISOR_PID, Header.SUPERVISOR_STARTED_AT))
            stale = not heartbeat or now - heartbeat > self.heartbeat_timeout
            if same or stale or not _laid_out_for(shared, self.names):
                shared.close()
                return False
            self.shared, self.values = shared, shared.values
            self.algorithm.shared = shared
            return True

    # -- the watchdog ----------------------------------------------------------------------
    def _start_watchdog(self) -> None:
        if self._watchdog is not None and self._watchdog.is_alive():
            return
        with self._lock:
            if self._watchdog is None or not self._watchdog.is_alive():
                self._watchdog = threading.Thread(target=_watch, args=(weakref.ref(self), self.pid),
                                                  name="django_lb_shm-read-watchdog", daemon=True)
                self._watchdog.start()

    def cut_overdue(self, now: Optional[float] = None) -> int:
        """Cut the reads of this process running past READ_TIMEOUT; how many were cut."""
        now = time.monotonic() if now is None else now
        cut = 0
        for state in list(self._threads):
            since = state.busy_since
            if since and now - since > self.timeout and not state.cut:
                state.cut = True
                wrapper = state.wrappers.get(state.busy_db)
                if wrapper is not None:
                    interrupt_statement(wrapper)
                cut += 1
        return cut


def _watch(reader_ref: Any, pid: int) -> None:
    while True:
        reader = reader_ref()
        if reader is None or os.getpid() != pid:
            return
        tick = min(0.25, max(reader.timeout / 4, 0.02))
        try:
            reader.cut_overdue()
        except Exception:  # never let the watchdog die
            logger.exception("cutting overdue reads failed")
        del reader
        time.sleep(tick)


class PgDescription:
    """A psycopg result's ``cursor.description``, built when first asked for.

    Building it (one ``Column`` per column: name decoding, type lookup) costs a point
    read more than all of this module's bookkeeping, and the ORM never reads it for a
    SELECT.  It is built from the kept result, not from the cursor, which runs this
    thread's next read on that copy meanwhile.
    """

    __slots__ = ("cursor", "result")

    def __init__(self, cursor: Any, result: Any):
        self.cursor = cursor
        self.result = result

    def resolve(self) -> list:
        from psycopg import Column

        cursor, result = self.cursor, self.result
        try:
            encoding = cursor._encoding
        except Exception:   # (its connection closed since)
            encoding = "utf-8"
        try:
            view = _ResultView(result, encoding, cursor.adapters)
            return [Column(view, i) for i in range(result.nfields)]
        except Exception:   # a psycopg whose Column reads more of a cursor: the coordinator path's form
            return [((result.fname(i) or b"").decode(encoding), result.ftype(i), None, None, None, None, None)
                    for i in range(result.nfields)]


class _ResultView:
    """What psycopg's ``Column`` reads of a cursor (``Cursor.description`` builds its columns
    the same way), for a result the cursor may have moved past."""

    __slots__ = ("pgresult", "_encoding", "adapters")

    def __init__(self, pgresult: Any, encoding: str, adapters: Any):
        self.pgresult, self._encoding, self.adapters = pgresult, encoding, adapters


def _deferred_description(cursor: Any) -> tuple:
    """(description, rows) of a psycopg cursor's result, the description deferred."""
    result = cursor.pgresult
    if result is not None and result.status == _PSYCOPG_TUPLES:
        return PgDescription(cursor, result), cursor.fetchall()
    description = cursor.description   # (no rows: a statement that returns none, or COPY)
    return description, cursor.fetchall() if description is not None else []


def resolve_description(description: Any) -> Any:
    """A description as the DB-API has it (a deferred one built now)."""
    return description.resolve() if type(description) is PgDescription else description


def _from_driver(wrapper: Any, exc: BaseException) -> bool:
    return wrapper is not None and isinstance(exc, wrapper.Database.Error)


def _plain(params: Any) -> bool:
    values = params.values() if isinstance(params, dict) else params
    plain = _PLAIN
    for value in values:
        if type(value) not in plain:
            return False
    return True


def _lock_directory(config: LoadBalancerConfig) -> str:
    """The private directory of this user's reader-slot lock files ('' if it cannot be private)."""
    directory = os.path.join(tempfile.gettempdir(), f"django_lb_shm-{os.getuid()}")
    try:
        if private_directory(os.path.join(directory, "x"), create=True):
            return directory
    except OSError:
        pass
    logger.warning("%s is not private to this user: reads go through the coordinator", directory)
    return ""


def close_connections() -> None:
    """Close the zero-hop connections of every thread of this process (e.g. before test databases
    are dropped); they are opened again on the next read.  Call it when no read is running."""
    reader = _reader
    if reader is None or reader.pid != os.getpid():
        return
    for state in list(reader._threads):
        for db in list(state.wrappers):
            reader._drop(state, db)


# -- this process's reader ------------------------------------------------------------------
_reader: Optional[ZeroHopReader] = None
_reader_key: tuple = ()
_next_try = 0.0
_build_lock = threading.Lock()
_warned: set = set()


def zero_hop_reader() -> Optional[ZeroHopReader]:
    """This process's reader, or None: reads take the coordinator path (called on every read)."""
    reader = _reader
    if reader is not None and getattr(_settings[0], "LOAD_BALANCER", None) is reader.raw:
        return reader   # (a fork resets _reader)
    config = get_config()
    if reader is not None and reader.config is config and reader.pid == os.getpid():
        return reader
    if config.read_path != "AUTO":
        return None
    return _build(config)


def _build(config: LoadBalancerConfig) -> Optional[ZeroHopReader]:
    global _reader, _reader_key, _next_try
    from django.conf import settings

    key = (os.getpid(), id(config), id(settings.DATABASES))
    now = time.monotonic()
    if _reader_key == key and now < _next_try:
        return None   # could not attach a moment ago
    with _build_lock:
        reader = _reader
        if reader is not None and reader.config is config and reader.pid == os.getpid():
            return reader
        _reader, _reader_key = None, key
        name = segment_name(config.address)
        try:
            shared = SharedState.attach_untracked(name)
        except FileNotFoundError:
            _next_try = now + RETRY_ATTACH_EVERY   # no coordinator on this host (yet)
            return None
        except (SharedMemoryNotOwned, PermissionError, LayoutMismatch, RuntimeError, ValueError, OSError) as exc:
            _next_try = now + 60.0
            if (name, str(exc)) not in _warned:
                _warned.add((name, str(exc)))
                logger.warning("reads go through the coordinator: cannot use shared memory segment %r (%s: %s)",
                               name, type(exc).__name__, exc)
            return None
        if not _laid_out_for(shared, config.databases) or not shared.reader_slots:
            shared.close()   # (another list of copies: a coordinator that started over with other settings)
            _next_try = now + 60.0
            return None
        # The coordinator must serve the databases this process names (as on the coordinator
        # path, e.g. under manage.py test): one round trip, once per process.
        get_client().proxy()
        _reader = ZeroHopReader(config, shared)
        return _reader


def _laid_out_for(shared: SharedState, aliases: Any) -> bool:
    """The segment's database slots are this process's LOAD_BALANCER['DATABASES'], in this order."""
    return shared.n_databases == len(aliases) and shared.header(Header.DATABASES_KEY) == databases_key(aliases)


def _reset_after_fork() -> None:
    global _reader, _reader_key
    if _reader is not None:
        _orphans.append(_reader)   # never finalized in the child: its sockets are the parent's
    _reader, _reader_key = None, ()


_orphans: list = []
os.register_at_fork(after_in_child=_reset_after_fork)

"""The manager process: a multiprocessing Manager server in front of the database threads.

Spawned by the supervisor.  It serves the ``coordinator`` object at ADDRESS
(one server thread per client connection, as ``multiprocessing.managers``
does), starts one :class:`DbThread` per database, routes reads through the read
algorithm and writes through the :class:`Sequencer`, and writes its vitals
into shared memory.  It exits when told (SIGTERM) or when its supervisor is
gone, after answering what is in flight.
"""
from __future__ import annotations

import ctypes
import errno
import itertools
import logging
import os
import pickle
import queue
import re
import signal
import sys
import threading
import time
import socket
import sqlite3
from multiprocessing import AuthenticationError
from multiprocessing import connection as mp_connection
from multiprocessing.managers import Server
from traceback import format_exc
from typing import Any, Optional

import django

from . import descriptors as d
from . import mp_private
from .__about__ import __version__
from .balancing import build_read_algorithm
from .conf import apply_runtime_settings_from_environment, database_identity, get_config
from .db_thread import MARKER_TABLE, DbConnection, DbThread, Hub
from .errors import (
    ConfigurationError,
    CoordinatorUnavailable,
    DatabaseDown,
    DatabaseOwnedElsewhere,
    NoDatabaseAvailable,
    QueryTimeout,
    RequestRejected,
    TransactionError,
    WriteNotApplied,
    to_dict,
)
from .exit_codes import (
    EXIT_ADDRESS_IN_USE,
    EXIT_BOOT_ERROR,
    EXIT_CONFIG_ERROR,
    EXIT_OK,
    EXIT_ORPHANED,
    EXIT_RELOAD,
    EXIT_RESTART,
)
from .health import is_connection_error, is_transient, process_vitals
from .journal import Journal
from .outcomes import SETTLE_WAIT, TrimLag, WriteOutcomes
from .ownership import CLAIM_WAIT
from .probes import ANSWERED
from .protocol import (
    EXPOSED,
    TYPEID,
    UNKNOWN_OBJECT,
    FrameTooLarge,
    GuardedConnection,
    no_delay,
    private_directory,
)
from .resync import ResyncDesk
from .routers import is_load_balanced
from .schema import SchemaWatch, load_balanced_apps
from .sequencer import Sequencer, client_of
from .server_transaction import ServerTransaction
from .shared_state import CoordinatorState, DbState, Header, Reader, SharedState, Slot, databases_key

logger = logging.getLogger("django_lb_shm.coordinator")

TICK = 0.5
HANDSHAKE_TIMEOUT = 10.0      # a connection that does not authenticate by then is dropped
HANDSHAKE_MAX_BYTES = 4096    # no handshake frame is bigger
FRAME_OVERHEAD = 4096         # the Manager's envelope around a request
TRIM_EVERY = 5.0
BOOT_CONNECT_WAIT = 10.0


class CoordinatorStopping(CoordinatorUnavailable):
    """Sent as CoordinatorUnavailable: nothing was done, the client may retry elsewhere or later."""


class Coordinator:
    """The object app processes call through the Manager (``execute``, ``status``, ``hello``)."""

    def __init__(self, config: Any, shared: SharedState, threads: list, sequencer: Any, algorithm: Any,
                 schema: Any = None):
        self.config = config
        self.schema = schema   # the SchemaWatch, for the migrations each copy lacks
        self.shared = shared
        self.threads = threads
        self.sequencer = sequencer
        self.algorithm = algorithm
        self._local = threading.local()
        self._tokens = itertools.count()
        self.write_guard = WriteGuard.for_installed_models()
        self._active = 0
        self.stopping = False
        self._active_lock = threading.Lock()
        self.idle = threading.Condition(self._active_lock)
        self.outcomes = WriteOutcomes(sequencer.journal.find_request)
        self.settle_wait = min(SETTLE_WAIT, config.client_timeout)
        self.resyncs = ResyncDesk(threads, sequencer, config)

    # -- exposed methods ---------------------------------------------------------------
    def ping(self) -> str:
        return "pong"

    def hello(self) -> dict:
        for thread in self.threads:
            if thread.server_info:
                return {**thread.server_info, "protocol": d.PROTOCOL_VERSION, "databases": list(self.config.databases)}
        raise NoDatabaseAvailable("no database has answered yet")

    def identity(self) -> dict:
        """The databases this coordinator serves, for the client's check (``database_identity``)."""
        return {"databases": {alias: database_identity(alias) for alias in self.config.databases}}

    # A resync (resync.py): the command copies; the coordinator owns the copy's state.
    def resync_begin(self, alias: str, source: Optional[str], pid: int, host: str) -> dict:
        return self.resyncs.begin(alias, source, pid, host)

    def resync_progress(self, alias: str, nonce: int, progress: dict) -> dict:
        return self.resyncs.progress(alias, nonce, progress)

    def resync_done(self, alias: str, nonce: int, seq: int, tag: int) -> dict:
        return self.resyncs.done(alias, nonce, seq, tag)

    def resync_end(self, alias: str, nonce: int) -> None:
        self.resyncs.end(alias, nonce)

    def resync_abort(self, alias: str, nonce: int, reason: str) -> None:
        self.resyncs.abort(alias, nonce, reason)

    def status(self) -> dict:
        snapshot = self.shared.snapshot(list(self.config.databases))
        for database, thread in zip(snapshot["databases"], self.threads):
            database["read_connections"] = thread.read_pool.stats()
            database.update(thread.why())
            database["missing_migrations"] = self.schema.missing(thread.alias) if self.schema is not None else []
            resync = self.resyncs.describe(thread.alias)
            if resync:
                database["resync"] = resync
        snapshot["coordinator"].update(process_vitals(os.getpid()))
        snapshot["coordinator"]["address"] = str(self.config.address)
        snapshot["coordinator"]["read_algorithm"] = self.config.read_algorithm.name
        snapshot["coordinator"]["write_ack"] = self.config.write_ack
        writes = self.sequencer.writes
        snapshot["coordinator"]["write_groups"] = {"groups": writes.groups, "writes": writes.grouped_writes,
                                                   "waiting": writes.waiting}
        snapshot["coordinator"]["write_order"] = self.sequencer.hold_info(time.monotonic())
        supervisor_pid = snapshot["supervisor"]["pid"]
        if supervisor_pid:
            snapshot["supervisor"].update(process_vitals(supervisor_pid))
        return snapshot

    def execute(self, payload: bytes, resent: bool = False) -> bytes:
        try:
            self._enter()
        except CoordinatorStopping as exc:
            return pickle.dumps((False, to_dict(exc)), protocol=pickle.HIGHEST_PROTOCOL)
        try:
            if len(payload) > self.config.max_request_bytes:
                raise RequestRejected(
                    f"request of {len(payload)} bytes is over LOAD_BALANCER['MAX_REQUEST_BYTES'] "
                    f"({self.config.max_request_bytes})"
                )
            request = self._decode(payload)
            request.resent = bool(resent)
            result = self.dispatch(request)
            return pickle.dumps((True, result), protocol=pickle.HIGHEST_PROTOCOL)
        except Exception as exc:
            if isinstance(exc, RequestRejected):
                logger.warning("refused a request: %s", exc)
            elif not _is_caller_error(exc):
                logger.debug("request failed", exc_info=True)
            return pickle.dumps((False, to_dict(exc)), protocol=pickle.HIGHEST_PROTOCOL)
        finally:
            self._leave()

    # -- bookkeeping ---------------------------------------------------------------------
    def _enter(self) -> None:
        with self._active_lock:
            if self.stopping:
                raise CoordinatorStopping(
                    "the coordinator is stopping; the request was not applied (retry once it is back)"
                )
            self._active += 1
            self.shared.set_header(Header.ACTIVE_REQUESTS, self._active)
            self.shared.add_header(Header.REQUESTS, 1)

    def _leave(self) -> None:
        with self._active_lock:
            self._active -= 1
            self.shared.set_header(Header.ACTIVE_REQUESTS, self._active)
            if self._active == 0:
                self.idle.notify_all()

    def wait_idle(self, timeout: float) -> bool:
        """Refuse new requests, then wait for those in flight."""
        deadline = time.monotonic() + timeout
        with self._active_lock:
            self.stopping = True
            while self._active:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                self.idle.wait(remaining)
        return True

    @staticmethod
    def _decode(payload: bytes) -> d.Request:
        try:
            request = d.decode(payload)
        except Exception as exc:
            raise RequestRejected(
                f"request could not be decoded ({type(exc).__name__}: {exc}); is the app running the same "
                f"django_lb_shm version as the coordinator ({__version__})?"
            ) from None
        if not isinstance(request, d.Request):
            raise RequestRejected(f"expected a django_lb_shm Request, got {type(request).__name__}")
        d.check_version(request)
        if request.op not in d.OPERATIONS:
            raise RequestRejected(f"unknown operation {request.op!r}; known: {', '.join(d.OPERATIONS)}")
        if request.op in (d.OP_READ, d.OP_WRITE) and not isinstance(getattr(request.statement, "sql", None), str):
            raise RequestRejected(f"{request.op} request without an SQL statement")
        return request

    # -- routing -------------------------------------------------------------------------
    def dispatch(self, request: d.Request) -> d.Result:
        txn = self._transaction()
        rolled_back = txn.request_begins()   # from here until request_ends(), the hold timeout leaves it alone
        if rolled_back:
            if request.op == d.OP_ROLLBACK:
                return d.Result()   # what the client asked for was done already
            if request.in_transaction:
                raise TransactionError(rolled_back)
        try:
            return self._route(request, txn)
        finally:
            txn.request_ends()

    def _transaction(self) -> ServerTransaction:
        """This client connection's transaction (server_transaction.py), IDLE at first."""
        txn = getattr(self._local, "txn", None)
        if txn is None:
            txn = self._local.txn = ServerTransaction(self.sequencer)
        return txn

    def _route(self, request: d.Request, txn: ServerTransaction) -> d.Result:
        op = request.op
        if request.in_transaction and op in (d.OP_READ, d.OP_WRITE) and not txn.holds and not request.opens:
            raise TransactionError(
                "this connection holds no open transaction on the coordinator (it restarted, or the "
                "connection was replaced); none of the transaction's writes were applied"
            )
        if op == d.OP_WRITE:
            for sql in (*request.prelude, request.statement.sql):
                self.write_guard.check(sql)
        if op == d.OP_READ:
            if request.in_transaction:
                return txn.run(request.statement, records=False)
            return self.read(request.statement)
        if op == d.OP_WRITE:
            if not request.in_transaction:
                return self.outcomes.run(request.request_id, lambda: self.sequencer.write(
                    request.statement, request.request_id, request.resent))
            if not txn.holds:
                txn.open(request.prelude, request.request_id, self._client_label(request.request_id))
            return txn.run(request.statement)
        if op == d.OP_COMMIT:
            return self._commit(txn, request.request_id)
        if op == d.OP_OUTCOME:
            return self.outcomes.settle(request.request_id, self.settle_wait)
        txn.rollback()
        return d.Result()

    def _commit(self, txn: ServerTransaction, request_id: str) -> d.Result:
        if not txn.holds:
            # A commit sent again on a new connection: the first one may still be running.
            try:
                return self.outcomes.settle(request_id, self.settle_wait)
            except WriteNotApplied as exc:
                raise TransactionError(
                    f"commit of a transaction the coordinator does not hold (it restarted, or the connection "
                    f"dropped): {exc}; none of its writes were applied"
                ) from None
        return txn.commit(request_id, self.outcomes)

    def client_connected(self, peer: str) -> None:
        self._local.peer = peer

    def _client_label(self, request_id: str) -> str:
        """"pid 1234 via 127.0.0.1:50000" (for status: who holds the write order)."""
        peer = getattr(self._local, "peer", "")
        label = client_of(request_id) or "a client"
        return f"{label} via {peer}" if peer else label

    def client_gone(self) -> None:
        """The server thread's client disconnected: drop its transaction, if any."""
        txn = getattr(self._local, "txn", None)
        self._local.txn = None
        if txn is not None:
            txn.client_gone()

    def read(self, statement: d.Statement) -> d.Result:
        tried: list[str] = []
        deadline = time.monotonic() + self.config.client_timeout
        while True:
            candidates = [t.index for t in self.threads if t.state == DbState.RUNNING and t.alias not in tried]
            if not candidates:
                states = ", ".join(f"{t.alias}={t.state.name}" for t in self.threads)
                raise NoDatabaseAvailable(
                    f"no database can serve the read ({states})" + (f"; tried {', '.join(tried)}" if tried else "")
                )
            thread = self.threads[self.algorithm.choose(self.algorithm.eligible(candidates))]
            ok, value = self._read_on(thread, statement, deadline)
            if ok:
                return value
            if isinstance(value, QueryTimeout):
                # Slow query or hung copy?  The probe says; a copy that does not answer it is out
                # of the read rotation (Prober -> DbThread.on_probe) and the read goes elsewhere.
                if thread.prober.check(time.monotonic()) == ANSWERED:
                    raise QueryTimeout(
                        f"{value}, and the database answers probes: the query takes longer than READ_TIMEOUT "
                        f"({self.config.database_answer_timeout:.2f} s); raise READ_TIMEOUT or make the query faster"
                    )
                if time.monotonic() >= deadline:
                    raise value
                value = DatabaseDown(str(value))
            if isinstance(value, DatabaseDown):
                tried.append(thread.alias)
                continue
            raise value

    def _read_on(self, thread: Any, statement: d.Statement, deadline: float) -> tuple:
        """(ok, Result or error): here on a pooled connection when the database has every write, else queued."""
        if thread.applied_seq >= self.sequencer.last_seq:
            pooled = thread.read_pool.checkout()
            if pooled is not None:
                ok, value = thread.read_here(pooled, statement)
                if ok or not is_transient(value):
                    return ok, value
                # Busy (SQLite: a follower write holds the file): queue it behind that write.
        reply = self._reply_queue()
        token = next(self._tokens)
        thread.submit_read(statement, reply, token)
        try:
            return self._await(reply, token, thread.alias, deadline)
        except QueryTimeout as timeout:
            return False, timeout

    def cut_overdue_reads(self) -> None:
        """Watchdog: cut reads running on a pooled connection, or queued on a SQLite database
        thread, for longer than READ_TIMEOUT."""
        limit = self.config.database_answer_timeout
        for thread in self.threads:
            for pooled in thread.read_pool.cut_overdue(limit):
                thread.cancel_query_of(pooled.conn)
            thread.cut_overdue_read(limit)

    def probe(self, thread: Any) -> None:
        """An app process's read failed on its own connection to ``thread``'s database: probe it
        (no answer: out of the read rotation; a failure on the database thread's own connection
        too: DOWN)."""
        if thread.prober.check(time.monotonic()) == ANSWERED:
            logger.info("database %r answered a probe after an app process's read failed there", thread.alias)

    def _reply_queue(self) -> "queue.SimpleQueue":
        reply = getattr(self._local, "reply", None)
        if reply is None:
            reply = self._local.reply = queue.SimpleQueue()
        return reply

    def _await(self, reply: "queue.SimpleQueue", token: int, alias: str, deadline: float) -> tuple:
        """The answer to ``token``; QueryTimeout after the database's answer timeout (or the deadline)."""
        started = time.monotonic()
        limit = min(deadline, started + self.config.database_answer_timeout)
        while True:
            remaining = limit - time.monotonic()
            try:
                got_token, ok, value = reply.get(timeout=max(remaining, 0.001))
            except queue.Empty:
                raise QueryTimeout(
                    f"database {alias!r} did not answer a read within {limit - started:.2f} s"
                ) from None
            if got_token == token:
                return ok, value
            # a late answer to an earlier request that timed out: drop it


class ReaderWatch(threading.Thread):
    """Acts on what app processes running zero-hop reads report in their reader slots.

    * a read cut after READ_TIMEOUT (``Reader.TIMEOUTS``): the database is probed; the
      app process waits for the verdict in shared memory (an answer after the cut:
      ``Slot.LAST_PROBE_AT``; no answer: UNRESPONSIVE, out of the read rotation);
    * a connection failure on an app's connection (``Reader.FAILURES``): probed likewise
      (one probe at a time per database);
    * their reads' latencies (``LATENCY_SUM_MS``/``LATENCY_COUNT``): fed into the shared
      latency average that INTERVAL_TIME reads, next to the probes and the coordinator's reads.
    """

    POLL = 0.05
    LATENCY_EVERY = 0.5

    def __init__(self, coordinator: "Coordinator", threads: list):
        super().__init__(name="reader-watch", daemon=True)
        self.coordinator = coordinator
        self.shared = coordinator.shared
        self.threads = threads   # the live list: replaced database threads are seen
        self.stop_event = threading.Event()
        self.seen = self._sums()   # what earlier coordinators already answered
        self.next_latency = 0.0
        self.probing: set = set()
        self._probing_lock = threading.Lock()

    def _sums(self) -> list[dict]:
        fields = (Reader.TIMEOUTS, Reader.FAILURES, Reader.LATENCY_SUM_MS, Reader.LATENCY_COUNT)
        return [{f: self.shared.reader_sum(i, f) for f in fields} for i in range(self.shared.n_databases)]

    def run(self) -> None:
        while not self.stop_event.wait(self.POLL):
            try:
                self.run_once()
            except Exception:  # never let the watch stop
                logger.exception("reader watch failed")

    def stop(self) -> None:
        self.stop_event.set()

    def run_once(self, now: Optional[float] = None) -> None:
        now = time.monotonic() if now is None else now
        sums = self._sums()
        latency_due = now >= self.next_latency
        if latency_due:
            self.next_latency = now + self.LATENCY_EVERY
        for thread, seen, current in zip(self.threads, self.seen, sums):
            if current[Reader.TIMEOUTS] > seen[Reader.TIMEOUTS]:
                seen[Reader.TIMEOUTS] = current[Reader.TIMEOUTS]
                if thread.state == DbState.RUNNING:
                    limit = self.coordinator.config.database_answer_timeout
                    logger.info("database %r did not finish a read within %.2f s; it was cut (an app process's "
                                "own connection): probing it", thread.alias, limit)
                    thread.prober.request()
            if current[Reader.FAILURES] > seen[Reader.FAILURES]:
                seen[Reader.FAILURES] = current[Reader.FAILURES]
                if thread.state == DbState.RUNNING:
                    self._probe_soon(thread)
            if latency_due:
                count = current[Reader.LATENCY_COUNT] - seen[Reader.LATENCY_COUNT]
                if count > 0:
                    total = current[Reader.LATENCY_SUM_MS] - seen[Reader.LATENCY_SUM_MS]
                    self.shared.record_latency(thread.index, total / count)
                seen[Reader.LATENCY_COUNT] = current[Reader.LATENCY_COUNT]
                seen[Reader.LATENCY_SUM_MS] = current[Reader.LATENCY_SUM_MS]

    def _probe_soon(self, thread: Any) -> None:
        with self._probing_lock:
            if thread.index in self.probing:
                return
            self.probing.add(thread.index)

        def probe() -> None:
            try:
                self.coordinator.probe(thread)
            except Exception:
                logger.exception("probing database %r failed", thread.alias)
            finally:
                with self._probing_lock:
                    self.probing.discard(thread.index)

        threading.Thread(target=probe, name=f"probe-{thread.alias}", daemon=True).start()


class HealthWatch(threading.Thread):
    """Every POLL, what no request may be left waiting on:

    * probes: each copy that is not DOWN is probed every ``probe_every``; a probe past its
      bound is declared hung (the copy leaves the read rotation: DbThread.on_probe);
    * reads past READ_TIMEOUT on pooled connections and SQLite database threads: cut;
    * a statement of the write-order holder (the leader's write connection; a recovering
      copy's marker read) unanswered for TRANSACTION_HOLD_TIMEOUT while the copy does not
      answer probes: its connection is cut (the sequencer then treats it as lost);
    * a transaction that holds the write order idle for TRANSACTION_HOLD_TIMEOUT: rolled
      back (on a thread of its own: a ROLLBACK on a hung leader must not stop this watch).
    """

    POLL = 0.1

    def __init__(self, coordinator: "Coordinator"):
        super().__init__(name="health-watch", daemon=True)
        self.coordinator = coordinator
        self.config = coordinator.config
        self.stop_event = threading.Event()
        self._expiring: Optional[threading.Thread] = None

    def run(self) -> None:
        while not self.stop_event.wait(self.POLL):
            try:
                self.run_once(time.monotonic())
            except Exception:  # never let the watch stop
                logger.exception("health watch failed")

    def stop(self) -> None:
        self.stop_event.set()

    def run_once(self, now: float) -> None:
        for thread in list(self.coordinator.threads):
            self._watch(thread, now)
        self.coordinator.cut_overdue_reads()
        self._expire_idle_transaction(now)

    def _watch(self, thread: Any, now: float) -> None:
        prober = thread.prober
        prober.overdue(now)
        state = thread.state
        if state in (DbState.RUNNING, DbState.UNRESPONSIVE) and now - prober.requested_at >= self.config.probe_every:
            prober.request()
        self._cut_if_unanswered(thread, thread.writer, now)
        if state == DbState.RECOVERING:   # its marker is read holding the write order
            self._cut_if_unanswered(thread, thread.conn, now)

    def _cut_if_unanswered(self, thread: Any, conn: Any, now: float) -> None:
        since = conn.busy_since
        if not since or now - since <= self.config.transaction_hold_timeout:
            return
        prober = thread.prober
        if prober.silent_since(since):   # no answer since the statement began
            if conn.cut_if_busy_since(since):
                logger.warning("database %r has not answered a statement for %.1f s and does not answer probes: "
                               "its connection was cut", thread.alias, now - since)
        elif now - prober.requested_at >= min(prober.bound, self.config.probe_every):
            prober.request()

    def _expire_idle_transaction(self, now: float) -> None:
        holder = self.coordinator.sequencer.open_transaction()
        limit = self.config.transaction_hold_timeout
        if holder is None or holder.idle_for(now) <= limit or (self._expiring is not None and self._expiring.is_alive()):
            return
        self._expiring = threading.Thread(target=holder.hold_timeout, args=(limit,),
                                          name="hold-timeout", daemon=True)
        self._expiring.start()


class WriteGuard:
    """Writes may only change LoadBalancerModel tables (and their many-to-many tables).

    Anything else sent as a write (another app's table, DDL, connection
    settings) is refused: it would change copies the load balancer does not own.
    """

    _TARGET = re.compile(r'\s*(?:INSERT\s+(?:OR\s+\w+\s+)?INTO|UPDATE|DELETE\s+FROM)\s+"?([^\s"(]+)', re.IGNORECASE)
    _SQLITE_SEQUENCE_RESET = re.compile(
        r'\s*UPDATE\s+"?sqlite_sequence"?\s+SET\s+"?seq"?\s*=\s*0\s+WHERE\s+"?name"?\s+IN\s*\(([^)]*)\)\s*;?\s*$',
        re.IGNORECASE)
    # Django's PostgreSQL sequence reset: SELECT setval(pg_get_serial_sequence('"table"','id'), ...)
    _SEQUENCE_TARGET = re.compile(r"""\s*SELECT\s+setval\s*\(\s*pg_get_serial_sequence\s*\(\s*'"?([^'"]+)"?'""",
                                  re.IGNORECASE)
    _ALLOWED_HEADS = ("SAVEPOINT", "RELEASE", "ROLLBACK", "SELECT")  # savepoints; locking reads

    def __init__(self, tables: frozenset, others: Optional[dict] = None):
        self.tables = tables
        self.others = others or {}   # table -> label of an installed model that is not load-balanced

    @classmethod
    def for_installed_models(cls) -> "WriteGuard":
        from django.apps import apps

        models = apps.get_models(include_auto_created=True)
        others = {m._meta.db_table: m._meta.label for m in models if not is_load_balanced(m)}
        return cls(frozenset(m._meta.db_table for m in models if is_load_balanced(m)) - {MARKER_TABLE}, others)

    def check(self, sql: str) -> None:
        match = self._TARGET.match(sql) or self._one_sequence_reset(sql)
        if match:
            table = match.group(1)
            if table == "sqlite_sequence" and self._resets_own_sequences(sql):
                return
            if table in self.others:
                raise RequestRejected(
                    f"write to table {table!r} refused: it belongs to {self.others[table]}, which is not a "
                    "LoadBalancerModel nor listed in LOAD_BALANCER['MODELS']; write it on its own database (a "
                    "relation from a load-balanced model that cascades into it is refused by system check "
                    "django_lb_shm.E024)"
                )
            if table not in self.tables:
                raise RequestRejected(
                    f"write to table {table!r} refused: it belongs to no load-balanced model this "
                    "coordinator knows (only their tables are written through the load balancer). The "
                    "coordinator loads the models when it starts: if this model is new, restart it "
                    "(SIGHUP to the djangoloadbalancer process) after `djangoloadbalancer migrate`"
                )
            return
        if "setval" in sql.lower():
            raise RequestRejected(
                "a sequence change refused: the load balancer forwards only Django's own sequence reset "
                "(SELECT setval(pg_get_serial_sequence('\"<table>\"', ...), ...)) of a LoadBalancerModel table"
            )
        head = sql.lstrip(" \t\r\n(").split(None, 1)[0].upper() if sql.strip() else ""
        if head not in self._ALLOWED_HEADS:
            raise RequestRejected(
                f"{head or 'an empty statement'} statement refused: the load balancer applies only INSERT, "
                "UPDATE and DELETE on LoadBalancerModel tables (run schema changes with `djangoloadbalancer migrate`)"
            )

    def _one_sequence_reset(self, sql: str) -> Optional[re.Match]:
        """Django's sequence reset of one table, and nothing else in the statement."""
        return self._SEQUENCE_TARGET.match(sql) if sql.lower().count("setval") == 1 else None

    def _resets_own_sequences(self, sql: str) -> bool:
        """Django's SQLite sequence reset (flush), for load-balanced tables only."""
        match = self._SQLITE_SEQUENCE_RESET.match(sql)
        return bool(match) and {name.strip(" '\"") for name in match.group(1).split(",")} <= self.tables


def _remove_stale_socket(path: str) -> None:
    """A socket file left by a crashed coordinator; refuse to take over a live one."""
    if not os.path.exists(path):
        return
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.settimeout(1)
        probe.connect(path)
    except OSError:
        os.unlink(path)
        return
    finally:
        probe.close()
    raise OSError(errno.EADDRINUSE, f"another process is listening on {path}")


def _listen_locally(path: str) -> Optional[mp_connection.Listener]:
    """The same-host Unix socket (see protocol.local_socket_path); None, and TCP only, when it cannot be made."""
    try:
        if not private_directory(path, create=True):
            logger.warning("not serving %s: its directory is not private to this user; same-host clients use TCP", path)
            return None
        _remove_stale_socket(path)
        listener = mp_connection.Listener(path, family="AF_UNIX", backlog=256)
        os.chmod(path, 0o600)
        return listener
    except OSError as exc:
        logger.warning("not serving %s (%s); same-host clients use TCP", path, exc)
        return None


def _peer_of(conn: Any) -> str:
    """The peer's address, for log lines (and TCP_NODELAY on the way: same socket)."""
    try:
        with socket.socket(fileno=os.dup(conn.fileno())) as sock:
            if sock.family != socket.AF_UNIX:
                no_delay(sock)
            peer = sock.getpeername()
        return f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else (peer or "a local socket")
    except OSError:
        return "an unknown peer"


def _is_caller_error(exc: BaseException) -> bool:
    return not is_connection_error(exc)


class CoordinatorServer(Server):
    """The Manager server, with a bounded accept loop, a larger backlog and client clean-up."""

    def __init__(self, registry: dict, address: Any, authkey: bytes, owner: Any, local_path: str = ""):
        if isinstance(address, str):
            _remove_stale_socket(address)
        super().__init__(registry, address, authkey, "pickle")
        if isinstance(address, str):
            os.chmod(address, 0o600)  # owner only: the socket is the door to the coordinator
        self.owner = owner
        self.stop_event = threading.Event()
        try:
            mp_private.set_listen_backlog(self.listener, 256)
        except Exception:
            pass
        self.listeners = [self.listener]
        if local_path:
            local = _listen_locally(local_path)
            if local is not None:
                self.listeners.append(local)

    # The shared coordinator object lives as long as this server: proxies of
    # exited clients (or of a previous coordinator process, whose object may
    # have had the same id) must not be able to count it away.
    def incref(self, c: Any, ident: str) -> None:
        pass

    def decref(self, c: Any, ident: str) -> None:
        pass

    def serve_forever_on_all(self) -> None:
        for listener in self.listeners:
            threading.Thread(target=self.accept_forever, args=(listener,), daemon=True, name="accept").start()

    def accept_forever(self, listener: Any) -> None:
        while not self.stop_event.is_set():
            try:
                conn = listener.accept()
            except OSError:
                if self.stop_event.is_set():
                    return
                time.sleep(0.01)  # e.g. out of file descriptors: do not spin
                continue
            except AuthenticationError:
                continue
            threading.Thread(target=self.handle_request, args=(conn,), daemon=True, name="client").start()

    def handle_request(self, conn: Any) -> None:
        """The stdlib's Server.handle_request (serve_client ends with SystemExit), on our own
        _serve_connection instead of its private _handle_request."""
        try:
            self._serve_connection(conn)
        except SystemExit:
            pass
        finally:
            conn.close()

    def _serve_connection(self, conn: Any) -> None:
        """The stdlib's _handle_request, with a bounded handshake and a log line for every refusal."""
        mp_private.adopt_connection(conn, GuardedConnection)
        conn.timeout, conn.max_bytes = HANDSHAKE_TIMEOUT, HANDSHAKE_MAX_BYTES
        peer = _peer_of(conn)
        try:
            mp_private.deliver_challenge(conn, self.authkey)
            mp_private.answer_challenge(conn, self.authkey)
            ignore, funcname, args, kwds = conn.recv()
            if funcname not in mp_private.server_public_calls(self):
                raise ValueError(f"unknown manager call {funcname!r}")
        except AuthenticationError as exc:
            logger.warning("refused a connection from %s: %s (wrong AUTHKEY?)", peer, exc)
            return
        except TimeoutError:
            logger.warning("dropped a connection from %s: no handshake within %.0f s", peer, HANDSHAKE_TIMEOUT)
            return
        except Exception as exc:
            logger.warning("dropped a connection from %s: bad handshake (%s: %s)", peer, type(exc).__name__, exc)
            return
        conn.timeout, conn.max_bytes = None, self.owner.config.max_request_bytes + FRAME_OVERHEAD
        conn.peer = peer
        try:
            msg = ("#RETURN", getattr(self, funcname)(conn, *args, **kwds))
        except FrameTooLarge as exc:
            logger.warning("dropped a connection from %s: %s", peer, exc)
            return
        except Exception:
            msg = ("#TRACEBACK", format_exc())
        try:
            conn.send(msg)
        except Exception:
            pass

    def serve_client(self, conn: Any) -> None:
        try:
            self.owner.client_connected(getattr(conn, "peer", ""))
            self._serve_calls(conn)
        finally:
            if getattr(conn, "too_large", False):
                logger.warning("dropped a client connection that sent a frame over %d bytes (MAX_REQUEST_BYTES)",
                               conn.max_bytes)
            self.owner.client_gone()
        raise SystemExit  # as the stdlib's serve_client: handle_request then closes the connection, sending nothing

    def _serve_calls(self, conn: Any) -> None:
        """The Manager's serve_client, trimmed to what CoordinatorProxy sends: calls of exposed methods.

        Same replies (#RETURN, #ERROR, #TRACEBACK), with plain pickle both ways
        instead of the ForkingPickler's per-message buffer and reducer lookups.
        """
        dumps, loads, protocol = pickle.dumps, pickle.loads, pickle.HIGHEST_PROTOCOL
        while not self.stop_event.is_set():
            try:
                request = conn.recv_bytes()
            except (EOFError, OSError):
                return  # the client went away (or sent a frame over the limit: FrameTooLarge)
            try:
                ident, method, args, kwds = loads(request)
                served = mp_private.served_object(self, ident)
                if served is None:
                    # a proxy of a previous coordinator process: CoordinatorProxy reconnects
                    msg: tuple = (UNKNOWN_OBJECT, ident)
                else:
                    obj, exposed = served
                    if method not in exposed:
                        raise AttributeError(f"method {method!r} of {type(obj)} object is not exposed")
                    msg = ("#RETURN", getattr(obj, method)(*args, **kwds))
            except Exception as exc:
                msg = ("#ERROR", exc)
            try:
                conn.send_bytes(dumps(msg, protocol))
            except Exception as exc:
                try:
                    conn.send_bytes(dumps(("#UNSERIALIZABLE", format_exc()), protocol))
                except Exception:
                    logger.debug("could not answer a client: %s", exc)
                    return

    def close(self) -> None:
        self.stop_event.set()
        for listener in self.listeners:
            try:
                listener.close()
            except Exception:
                pass


class CoordinatorProcess:
    """Boot, serve, watch the parent, stop: the life of the manager process."""

    def __init__(self, config: Any, shared: SharedState, supervisor_pid: int):
        self.config = config
        self.shared = shared
        self.supervisor_pid = supervisor_pid
        self.stop_requested = threading.Event()
        self.exit_code = EXIT_OK

    def boot(self) -> None:
        # Bind first: a taken port is a boot error before any database is touched.
        address = self.config.address
        registry = {TYPEID: (lambda: self.coordinator, EXPOSED, None, None)}
        self.server = CoordinatorServer(registry, address.tuple, address.authkey, self, address.local_socket_path)
        self.algorithm = build_read_algorithm(self.config, self.shared)
        self.schema = SchemaWatch(self.config.databases, load_balanced_apps(), self.config.wait_time,
                                  connect=lambda alias: DbConnection(alias, self.config.statement_timeout),
                                  readable=self._readable_copies, on_change=self._schema_changed)
        self.hub = Hub(self.shared, self.config, self._catch_up_from, self._replay_after, self._notify_applied,
                       probe_interval=self.algorithm.probe_interval, schema=self.schema,
                       joined=self._joined)
        self.threads = [DbThread(i, alias, self.hub) for i, alias in enumerate(self.config.databases)]
        # Before the journal is opened or any database replayed.
        self._claim_databases()
        # Before any copy serves: a copy behind another never becomes RUNNING, not even for a moment.
        self.schema.report({t.alias: t.boot_migrations for t in self.threads if t.boot_migrations is not None})
        try:
            self.journal = Journal(self.config.journal_dir, fsync=self.config.journal_fsync,
                                   import_from=self.config.legacy_journal_dirs).open()
        except (OSError, sqlite3.Error) as exc:
            raise OSError(f"LOAD_BALANCER['JOURNAL_DIR'] ({self.config.journal_dir}) cannot be used: {exc}") from exc
        self.trim_lag = TrimLag(self.config.client_timeout, self.config.connect_timeout)
        self.sequencer = Sequencer(self.threads, self.journal, self.shared, self.config)
        self.sequencer.fail_stop = self._restart_to_read_journal
        self.sequencer.settle_history({t.alias: t.boot_marker for t in self.threads})
        self.shared.set_header(Header.JOURNAL_ENTRIES, self.journal.entry_count)
        self.shared.set_header(Header.JOURNAL_BYTES, self.journal.size_bytes)
        for thread in self.threads:
            self.shared.set_state(thread.index, DbState.STARTING)
            thread.start()
        self._wait_for_databases()
        self.coordinator = Coordinator(self.config, self.shared, self.threads, self.sequencer, self.algorithm,
                                       schema=self.schema)
        self.reader_watch = ReaderWatch(self.coordinator, self.threads)
        self.reader_watch.start()
        self.health_watch = HealthWatch(self.coordinator)
        self.health_watch.start()
        self.schema.start()
        self.server.serve_forever_on_all()

    def client_connected(self, peer: str) -> None:
        self.coordinator.client_connected(peer)

    def client_gone(self) -> None:
        self.coordinator.client_gone()

    def _catch_up_from(self, alias: str, read_marker: Any) -> str:
        return self.sequencer.catch_up_from(alias, read_marker)

    def _replay_after(self, seq: int) -> Any:
        return self.sequencer.replay_after(seq)

    def _restart_to_read_journal(self) -> None:
        self.exit_code = EXIT_RESTART
        self.stop_requested.set()

    def _notify_applied(self) -> None:
        self.sequencer.notify_applied()

    def _readable_copies(self) -> list[str]:
        """The copies whose migrations are worth reading now (a DOWN one is read when it is back)."""
        gone = (DbState.DOWN, DbState.STARTING, DbState.STOPPED)
        return [t.alias for t in self.threads if t.state not in gone]

    def _schema_changed(self, aliases: set) -> None:
        for thread in self.threads:
            if thread.alias in aliases:
                thread.wake()

    def _joined(self, alias: str) -> None:
        self.sequencer.joined(alias)

    def _wait_for_databases(self) -> None:
        deadline = time.monotonic() + BOOT_CONNECT_WAIT
        while time.monotonic() < deadline:
            if all(t.state != DbState.STARTING and t.state != DbState.RECOVERING for t in self.threads):
                return
            time.sleep(0.02)

    def _claim_databases(self) -> None:
        """Two coordinators on the same databases would number writes twice: the second one does not start."""
        owned = []
        deadline = time.monotonic() + CLAIM_WAIT   # one wait for all: a second coordinator fails within moments
        for thread in self.threads:
            try:
                thread.claim_at_boot(deadline)
            except DatabaseOwnedElsewhere as exc:
                owned.append(str(exc))
        if owned:
            raise DatabaseOwnedElsewhere("; ".join(owned))

    def run(self) -> int:
        self._install_signals()
        self.shared.set_header(Header.COORDINATOR_PID, os.getpid())
        self.shared.set_header(Header.STARTED_AT, time.time())
        self.shared.set_header(Header.COORDINATOR_STATE, CoordinatorState.STARTING)
        try:
            self.boot()
        except Exception as exc:
            serving = getattr(self, "server", None) is not None
            logger.error("coordinator cannot %s: %s: %s", "boot" if serving else f"serve at {self.config.address}",
                         type(exc).__name__, exc)
            if serving:
                self.server.close()
            elif isinstance(exc, OSError) and exc.errno == errno.EADDRINUSE:
                return EXIT_ADDRESS_IN_USE
            return EXIT_BOOT_ERROR
        self.shared.set_header(Header.HEARTBEAT, time.monotonic())  # beating from READY on
        self.shared.set_header(Header.COORDINATOR_STATE, CoordinatorState.READY)
        logger.info("coordinator pid %d serving %s for databases %s", os.getpid(), self.config.address,
                    ", ".join(f"{t.alias} ({t.state.name})" for t in self.threads))
        self._loop()
        self._shutdown()
        return self.exit_code

    def _install_signals(self) -> None:
        signal.signal(signal.SIGTERM, lambda signum, frame: self.stop_requested.set())
        # Ctrl-C reaches the whole process group; the supervisor decides when we stop.
        signal.signal(signal.SIGINT, signal.SIG_IGN)

    def _loop(self) -> None:
        next_trim = time.monotonic() + TRIM_EVERY
        while not self.stop_requested.wait(TICK):
            self.shared.set_header(Header.HEARTBEAT, time.monotonic())
            if os.getppid() != self.supervisor_pid:
                logger.error("supervisor (pid %d) is gone; stopping", self.supervisor_pid)
                self.exit_code = EXIT_ORPHANED
                return
            self._replace_dead_threads()
            try:
                self.coordinator.resyncs.expire()
            except Exception:  # never let a resync's bookkeeping stop the main loop
                logger.exception("expiring silent resyncs failed")
            if time.monotonic() >= next_trim:
                next_trim = time.monotonic() + TRIM_EVERY
                self._trim_journal()

    def _replace_dead_threads(self) -> None:
        for n, thread in enumerate(self.threads):
            if thread.running and not thread.is_alive():
                logger.error("database thread %r died; replacing it", thread.alias)
                replacement = thread.replacement()
                self.threads[n] = replacement
                self.shared.add(thread.index, Slot.THREAD_RESTARTS, 1)
                replacement.start()

    def _trim_journal(self) -> None:
        floors = [floor for floor in (t.journal_floor() for t in self.threads) if floor is not None]
        floor = self.trim_lag.floor(min(floors)) if floors else None
        if floor is not None and self.journal.trim(floor):
            release_free_memory()
        self.shared.set_header(Header.JOURNAL_ENTRIES, self.journal.entry_count)
        self.shared.set_header(Header.JOURNAL_BYTES, self.journal.size_bytes)

    def _shutdown(self) -> None:
        self.shared.set_header(Header.COORDINATOR_STATE, CoordinatorState.STOPPING)
        self.server.close()
        self.reader_watch.stop()
        self.health_watch.stop()
        self.schema.stop()
        if not self.coordinator.wait_idle(self.config.graceful_timeout):
            logger.warning("stopping with requests still in flight after %.1f s", self.config.graceful_timeout)
        for thread in self.threads:
            thread.stop()
            thread.prober.stop()
        deadline = time.monotonic() + self.config.graceful_timeout
        for thread in self.threads:
            thread.join(max(0.1, deadline - time.monotonic()))
        self._trim_journal()
        self.journal.close()
        self.schema.close()
        writes = self.sequencer.writes
        if writes.groups:
            logger.info("autocommit writes: %d in %d groups (mean size %.2f)", writes.grouped_writes, writes.groups,
                        writes.grouped_writes / writes.groups)
        self.shared.set_header(Header.COORDINATOR_STATE, CoordinatorState.STOPPED)
        logger.info("coordinator pid %d stopped", os.getpid())


def release_free_memory() -> None:
    """Large writes leave freed blocks in glibc's per-thread arenas, which it keeps; once the
    journal no longer needs them, give them back so that RSS follows what is pending."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):   # not glibc: nothing to do
        pass


def configure_logging(level: str = "INFO") -> None:
    """A default handler for django_lb_shm's loggers when the project configured none."""
    root = logging.getLogger("django_lb_shm")
    if not root.handlers and not logging.getLogger().handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s [%(processName)s %(process)d] %(name)s: %(message)s"))
        root.addHandler(handler)
        root.setLevel(level)


def main(settings_module: Optional[str], shm_name: str, supervisor_pid: int, sys_path: list) -> None:
    """Entry point of the spawned manager process."""
    sys.path[:0] = [p for p in sys_path if p not in sys.path]
    if settings_module:
        os.environ["DJANGO_SETTINGS_MODULE"] = settings_module
    try:
        apply_runtime_settings_from_environment()   # a coordinator of LoadBalancerTestRunner
        django.setup()

        config = get_config()
    except (ConfigurationError, Exception) as exc:
        logging.getLogger("django_lb_shm").error("coordinator cannot start: %s", exc)
        sys.exit(EXIT_CONFIG_ERROR)
    configure_logging(config.log_level)
    shared = SharedState.attach(shm_name, shares_tracker=True)
    if shared.header(Header.DATABASES_KEY) != databases_key(config.databases):
        # Added or removed copies (settings + SIGHUP): the segment's slots are laid out for the old list.
        logging.getLogger("django_lb_shm").info("LOAD_BALANCER['DATABASES'] is now %s; the supervisor starts over "
                                                "with it", ", ".join(config.databases))
        os._exit(EXIT_RELOAD)
    code = CoordinatorProcess(config, shared, supervisor_pid).run()
    logging.shutdown()
    os._exit(code)

"""The request router: the ``coordinator`` object that app processes call through the Manager.

The Manager server (coordinator/server.py) serves it at ADDRESS, one server thread per client
connection.  :class:`RequestRouter` decodes each request, routes reads through the read
algorithm (on a pooled connection, or queued on a database thread) and writes through the
:class:`Sequencer` after the :class:`WriteGuard` (coordinator/write_guard.py), keeps each connection's
transaction (coordinator/transaction.py), and answers ``status``.  The process around it, which
builds it, is coordinator/process.py.
"""
from __future__ import annotations

import itertools
import logging
import os
import pickle
import queue
import threading
import time
from typing import TYPE_CHECKING, Any, Optional

from django_lb_shm.__about__ import __version__
from django_lb_shm.coordinator.outcomes import WriteOutcomes
from django_lb_shm.coordinator.resync import ResyncDesk
from django_lb_shm.coordinator.sequencer import Sequencer, client_of
from django_lb_shm.coordinator.transaction import ServerTransaction
from django_lb_shm.coordinator.write_guard import WriteGuard
from django_lb_shm.databases.failures import (
    is_connection_error,
    is_transient,
    process_vitals,
)
from django_lb_shm.databases.probes import ANSWERED
from django_lb_shm.errors import (
    CoordinatorUnavailable,
    DatabaseDown,
    NoDatabaseAvailable,
    QueryTimeout,
    RequestRejected,
    TransactionError,
    WriteNotApplied,
    to_dict,
)
from django_lb_shm.settings.config import LoadBalancerConfig, database_identity
from django_lb_shm.shm.state import DbState, Header, SharedState
from django_lb_shm.wire import descriptors as d
from django_lb_shm.wire.protocol import SETTLE_WAIT

if TYPE_CHECKING:   # for type hints only: not imported at run time
    from django_lb_shm.balancing import ReadAlgorithm

# The logger keeps the name it had before these modules moved into coordinator/: LOGGING settings may name it.
logger = logging.getLogger("django_lb_shm.coordinator")


class CoordinatorStopping(CoordinatorUnavailable):
    """Sent as CoordinatorUnavailable: nothing was done, the client may retry elsewhere or later."""


class RequestRouter:
    """The object app processes call through the Manager (``execute``, ``status``, ``hello``)."""

    def __init__(self, config: LoadBalancerConfig, shared: SharedState, threads: list, sequencer: Sequencer,
                 algorithm: ReadAlgorithm,
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

    # A resync (ops/resync.py): the command copies; the coordinator owns the copy's state.
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
        """This client connection's transaction (coordinator/transaction.py), IDLE at first."""
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


def _is_caller_error(exc: BaseException) -> bool:
    return not is_connection_error(exc)

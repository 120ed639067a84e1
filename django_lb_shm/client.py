"""Client side: the per-process connection to the coordinator, and the DB-API
objects the virtual Django connection uses (a session and its cursors).

Every process (and every thread, via the Manager proxy's thread-local socket)
gets its own connection, opened lazily on the first query and rebuilt after a
fork, so gunicorn or celery workers never share a socket.

Reads outside a transaction (or before its first write) first try the zero-hop
path (``reads.py``): on the coordinator's host the process routes and runs them
itself; when it cannot, they are sent to the coordinator as before.
"""
from __future__ import annotations

import itertools
import logging
import os
import pickle
import re
import threading
import time
import uuid
from collections import deque
from multiprocessing import AuthenticationError
from typing import Any, Iterable, Optional

from django.db.utils import Error as DjangoDatabaseError

from . import descriptors as d
from . import determinism, mp_private
from .conf import LoadBalancerConfig, database_identity, get_config
from .breaker import ConnectBreaker
from .client_transaction import SEND, ClientTransaction
from .errors import (
    AnswerTimeout,
    AuthenticationFailed,
    ConfigurationError,
    CoordinatorDown,
    CoordinatorUnavailable,
    LoadBalancerError,
    NotSupportedError,
    ProtocolError,
    RequestRejected,
    TransactionError,
    WriteNotApplied,
    WriteOutcomeUnknown,
    from_dict,
)
from .outcomes import SETTLE_WAIT
from .protocol import CoordinatorManager, private_directory, timed_client
from .reads import PgDescription, zero_hop_reader
from .shared_state import live_supervisor
from .transactions import warn_if_in_foreign_atomic

logger = logging.getLogger("django_lb_shm.client")

READ, WRITE, LOCK, SAVEPOINT, BOUNDARY = "read", "write", "lock", "savepoint", "boundary"
_LOCKING = re.compile(r"\bFOR\s+(?:NO\s+KEY\s+)?(?:UPDATE|SHARE|KEY\s+SHARE)\b", re.IGNORECASE)
_WRITING_CTE = re.compile(r"\b(?:INSERT|UPDATE|DELETE|MERGE)\b", re.IGNORECASE)
# PostgreSQL's sequence reset (loaddata, sqlsequencereset) is a SELECT that changes a sequence.
_SEQUENCE_RESET = re.compile(r"\bsetval\s*\(", re.IGNORECASE)
_CONNECTION_LOST = (EOFError, ConnectionError, BrokenPipeError, OSError)
_UNREADABLE = (pickle.UnpicklingError, EOFError, AttributeError, ImportError)
SETTLE_MARGIN = 3.0   # on top of the coordinator's SETTLE_WAIT: its answer's way back


_KINDS: dict = {}   # sql -> kind: an ORM query's SQL repeats (its parameters are apart)
_KINDS_MAX = 2048


def classify(sql: str) -> str:
    """What a statement does: READ, WRITE, LOCK (locking read), SAVEPOINT or BOUNDARY."""
    kind = _KINDS.get(sql)
    if kind is None:
        kind = _classify(sql)
        if len(_KINDS) >= _KINDS_MAX:
            _KINDS.clear()
        _KINDS[sql] = kind
    return kind


# The statement an EXPLAIN explains: after its options ("EXPLAIN (ANALYZE, FORMAT JSON) UPDATE ...").
_EXPLAINED = re.compile(r"\b(?:SELECT|INSERT|UPDATE|DELETE|MERGE|WITH|VALUES|TABLE|EXECUTE|DECLARE|CREATE)\b",
                        re.IGNORECASE)
_ANALYZE = re.compile(r"\bANALY[SZ]E\b(\s+(?:FALSE|OFF|0)\b)?", re.IGNORECASE)


def _classify_explain(sql: str) -> str:
    """EXPLAIN only plans (READ), but PostgreSQL's EXPLAIN ANALYZE runs the statement: then it
    is what the explained statement is (an INSERT under it would change one copy only)."""
    inner = _EXPLAINED.search(sql)
    if inner is None:
        return READ
    analyze = _ANALYZE.search(sql, 0, inner.start())
    if analyze is None or analyze.group(1):
        return READ
    return _classify(sql[inner.start():])


def _classify(sql: str) -> str:
    words = sql.lstrip(" \t\r\n(").split(None, 2)
    head = words[0].upper() if words else ""
    if head == "EXPLAIN":
        return _classify_explain(sql)
    if head in ("SELECT", "VALUES", "SHOW", "WITH", "TABLE"):
        # Substring tests first: the regexes scan the whole statement (~5 µs each per read).
        upper = sql.upper()
        if head == "WITH" and _WRITING_CTE.search(sql) or "SETVAL" in upper and _SEQUENCE_RESET.search(sql):
            return WRITE
        return LOCK if "FOR" in upper and _LOCKING.search(sql) else READ
    if head == "PRAGMA":
        return WRITE if "=" in sql else READ
    if head in ("SAVEPOINT", "RELEASE") or (head == "ROLLBACK" and len(words) > 1 and words[1].upper() == "TO"):
        return SAVEPOINT
    if head in ("BEGIN", "COMMIT", "ROLLBACK", "START", "END", "ABORT"):
        return BOUNDARY
    return WRITE


class CoordinatorClient:
    """This process's connection to the coordinator (one Manager proxy; one socket per thread)."""

    _ids = itertools.count(1)

    def __init__(self, config: LoadBalancerConfig, verify_databases: bool = True):
        self.config = config
        self.verify_databases = verify_databases   # see check_same_databases(); `status` skips it
        self.pid = os.getpid()
        self._proxy = None
        self._lock = threading.Lock()
        self.breaker = ConnectBreaker(config)   # fail fast when nothing will answer (breaker.py)

    # -- connection -------------------------------------------------------
    def _connect(self):
        address = self.config.address
        manager = CoordinatorManager(address=address.tuple, authkey=address.authkey)
        local_path = address.local_socket_path
        if local_path and not private_directory(local_path):
            local_path = ""
        client = timed_client(self.config.connect_timeout, local_path)
        mp_private.set_manager_client(manager, client)
        mp_private.mark_manager_started(manager)
        try:
            proxy = manager.coordinator()
            mp_private.set_proxy_client(proxy, client)  # each thread's own connection: bounded handshake too
            return proxy
        except AuthenticationError as exc:
            raise AuthenticationFailed(
                f"the load balancer coordinator at {address} refused the AUTHKEY ({exc}); "
                "the app and the coordinator must use the same LOAD_BALANCER['ADDRESS']['AUTHKEY']."
            ) from None
        except _CONNECTION_LOST as exc:
            raise CoordinatorUnavailable(
                f"no load balancer coordinator answers at {address} ({exc.__class__.__name__}: {exc}); "
                "start it with `djangoloadbalancer` (or `python manage.py loadbalancer run`) "
                "in the Django project directory."
            ) from None

    def proxy(self, deadline: Optional[float] = None):
        """The connected proxy; connecting retries until ``deadline`` (default: CONNECT_TIMEOUT from now)."""
        if self._proxy is None:
            with self._lock:
                if self._proxy is None:
                    proxy = self._connect_with_retry(deadline)
                    self.check_same_databases(proxy)
                    self._proxy = proxy
        return self._proxy

    def check_same_databases(self, proxy: Any) -> None:
        """The coordinator must serve the databases this process names (same vendor and NAME).

        ``manage.py test`` renames them to test databases in this process only: without
        this check the coordinator would run the tests' queries on the real ones.
        """
        if not self.verify_databases:
            return
        try:
            theirs = proxy.call("identity", (), self.config.client_timeout)["databases"]
        except AttributeError as exc:
            if "not exposed" in str(exc):
                return   # a coordinator of an earlier version (no `identity`): nothing to compare
            raise
        # Copies added or removed on the coordinator's side first (settings + SIGHUP) are not a mismatch;
        # the same alias naming another database is, and so is no alias in common.
        common = [alias for alias in self.config.databases if alias in theirs]
        differ = [
            f"{alias!r} is {database_identity(alias)[1]!r} here, {theirs[alias][1]!r} there"
            for alias in common if list(theirs[alias]) != database_identity(alias)
        ] or ([] if common else [f"it serves {', '.join(theirs) or 'none'}, this process names "
                                 f"{', '.join(self.config.databases)}"])
        if differ:
            proxy.drop_connection()
            raise ConfigurationError(
                f"the load balancer coordinator at {self.config.address} serves other databases than this "
                f"process's settings name: {'; '.join(differ)}. It would run these queries on its own. "
                "Under `manage.py test`, set TEST_RUNNER = 'django_lb_shm.testing.LoadBalancerTestRunner' "
                "(it starts a coordinator on the test databases); otherwise start the coordinator with "
                "the app's settings."
            )

    def _connect_with_retry(self, deadline: Optional[float] = None):
        if deadline is None:
            deadline = time.monotonic() + self.config.connect_timeout
        return self.breaker.connect(self._connect, deadline)

    def forget_connection(self) -> None:
        proxy, self._proxy = self._proxy, None
        if proxy is not None:
            try:
                proxy.drop_connection()
            except Exception:
                pass

    # -- calls ------------------------------------------------------------
    def call(self, method: str, *args: Any, timeout: Optional[float] = None,
             deadline: Optional[float] = None) -> Any:
        """One call to the coordinator.

        ``execute`` is not re-sent here (``request`` decides what is safe to send
        again); the read-only calls (status, hello, ping) get one more try on a
        new connection when the old one died with a restarted coordinator.
        """
        timeout = self.config.client_timeout if timeout is None else timeout
        attempts = 1 if method == "execute" else 2
        for attempt in range(attempts):
            try:
                return self.proxy(deadline).call(method, args, timeout)
            except _CONNECTION_LOST:
                self.forget_connection()
                if attempt + 1 == attempts:
                    raise CoordinatorUnavailable(
                        f"lost the connection to the load balancer coordinator at {self.config.address}"
                    ) from None

    def request(self, request: d.Request, idempotent: bool) -> d.Result:
        ok, value = self.exchange(self.encode(request), idempotent)
        if ok:
            return value
        raise from_dict(value)

    def encode(self, request: d.Request) -> bytes:
        payload = d.encode(request)
        if len(payload) > self.config.max_request_bytes:
            raise RequestRejected(
                f"the query is {len(payload)} bytes once serialized, over LOAD_BALANCER['MAX_REQUEST_BYTES'] "
                f"({self.config.max_request_bytes}); send it in smaller parts or raise the limit"
            )
        return payload

    def exchange(self, payload: bytes, idempotent: bool, timeout: Optional[float] = None) -> tuple[bool, Any]:
        """The coordinator's answer to an encoded request: (True, Result) or (False, error as data).

        Raises only when no answer was received (the connection is then dropped): the
        coordinator unreachable, AnswerTimeout, or whatever interrupted the wait.
        """
        deadline = time.monotonic() + self.config.connect_timeout
        resent = False
        while True:
            try:
                args = (payload, True) if resent else (payload,)
                resent = True
                ok, value = decode_answer(self.call("execute", *args, timeout=timeout, deadline=deadline))
                if ok or value.get("error_type") != "CoordinatorUnavailable":
                    return ok, value
                raise from_dict(value)   # it is stopping: the request was not run
            except (AuthenticationFailed, CoordinatorDown):
                raise  # a wrong key stays wrong; nothing is there to answer a retry
            except CoordinatorUnavailable:
                # The connection was lost, or the coordinator answered that it is stopping (a
                # restart) and did not run the request.  Reads and writes carrying a request id
                # are safe to send again: the coordinator answers a repeated write id from its journal.
                if not idempotent or time.monotonic() > deadline:
                    raise
                self.forget_connection()
                time.sleep(0.05)

    def settle(self, request_id: str) -> d.Result:
        """What became of a write (or commit) whose answer did not come within CLIENT_TIMEOUT:
        its result, its error raised, or WriteOutcomeUnknown naming ``request_id``."""
        wait = min(SETTLE_WAIT, self.config.client_timeout)
        payload = d.encode(d.Request(op=d.OP_OUTCOME, request_id=request_id))
        try:
            ok, value = self.exchange(payload, idempotent=True, timeout=wait + SETTLE_MARGIN)
        except (CoordinatorUnavailable, AnswerTimeout, ProtocolError) as exc:
            raise WriteOutcomeUnknown(
                f"write request {request_id} got no answer within CLIENT_TIMEOUT and the coordinator could not "
                f"be asked about it ({exc}); it is applied on every copy or on none"
            ) from None
        if ok:
            return value
        error = from_dict(value)
        if isinstance(error, RequestRejected):   # a coordinator without OP_OUTCOME
            raise WriteOutcomeUnknown(f"write request {request_id} got no answer within CLIENT_TIMEOUT; it is "
                                      f"applied on every copy or on none ({error})") from None
        raise error

    def drop_thread_connection(self) -> None:
        """This thread's connection may be out of step: it is never used again (the coordinator
        rolls back the transaction it held, if any)."""
        proxy = self._proxy
        if proxy is not None:
            proxy.drop_connection()

    def new_request_id(self) -> str:
        return f"{self.pid}-{uuid.uuid4().hex[:12]}-{next(self._ids)}"


def decode_answer(reply: bytes) -> tuple[bool, Any]:
    try:
        ok, value = d.decode(reply)
    except _UNREADABLE as exc:   # (not Exception: an app's signal handler may raise here)
        raise ProtocolError(f"an answer of the coordinator could not be read ({type(exc).__name__}: {exc})") from None
    return ok, value


def read_status(config: LoadBalancerConfig, timeout: float = 5.0) -> dict:
    """The coordinator's status, whatever databases it serves (`status` and `verify` only look).

    Connecting is retried for CONNECT_TIMEOUT only while a supervisor of this user and host
    serves the address (it is restarting the coordinator); otherwise one attempt answers.
    """
    wait = config.connect_timeout if live_supervisor(config.address) else 0.0
    client = CoordinatorClient(config, verify_databases=False)
    try:
        return client.call("status", timeout=timeout, deadline=time.monotonic() + wait)
    finally:
        client.forget_connection()


_client: Optional[CoordinatorClient] = None
_client_lock = threading.Lock()


def get_client() -> CoordinatorClient:
    global _client
    config = get_config()
    client = _client
    if client is None or client.pid != os.getpid() or client.config is not config:
        with _client_lock:
            if _client is None or _client.pid != os.getpid() or _client.config is not config:
                _client = CoordinatorClient(config)
            client = _client
    return client


def _reset_after_fork() -> None:
    """A forked child must not reuse the parent's sockets (gunicorn, celery prefork)."""
    global _client
    _client = None
    mp_private.forget_proxy_connections()


os.register_at_fork(after_in_child=_reset_after_fork)


class ClientSession:
    """The DB-API 'connection' behind the virtual Django connection alias.

    Outside a transaction every statement is one request (a read: zero-hop when
    this process can).  Inside one (autocommit off), reads go through the read
    algorithm until the first write; that write opens the transaction on the
    coordinator, which then holds the global write order until commit or
    rollback, and runs the transaction's later reads on the leader.
    """

    def __init__(self, alias: str, vendor: str = ""):
        self.alias = alias
        self.vendor = vendor               # the real databases' vendor: how writes are made deterministic
        self.txn = ClientTransaction()     # AUTOCOMMIT, PENDING, OPEN or BROKEN: see client_transaction.py
        # now() / CURRENT_TIMESTAMP of the current transaction, read at its first use (see _deterministic)
        self.transaction_time: Optional[float] = None
        self.expected_inserts: deque = deque()
        self.closed = False
        self.outcome_unknown = ""   # request id of the last write whose answer an exception took

    # The transaction's state, read by Django-side code and tests (client_transaction.py changes it).
    @property
    def autocommit(self) -> bool:
        return self.txn.autocommit

    @property
    def transaction_open(self) -> bool:
        return self.txn.is_open

    @property
    def broken(self) -> str:
        """Why the open transaction is lost (its connection was dropped mid-call), or ''."""
        return self.txn.broken

    @property
    def prelude(self) -> list[tuple[str, str]]:
        return self.txn.prelude

    # -- DB-API connection surface ----------------------------------------
    def cursor(self) -> "ProxyCursor":
        return ProxyCursor(self)

    def set_autocommit(self, autocommit: bool) -> None:
        if autocommit and self.transaction_open:
            # Django ends a transaction before this; one still open here is what an exception
            # inside its commit or rollback left: applied nowhere, as on a disconnect.
            logger.warning("autocommit turned on inside an open load-balanced transaction: rolled back")
            self.rollback()
        if autocommit:
            self.txn.autocommit_on()
        else:
            self.txn.autocommit_off()
        self.transaction_time = None

    def begin(self) -> None:
        self.txn.autocommit_off()
        self.transaction_time = None

    def commit(self) -> None:
        self.transaction_time = None
        if self.txn.commit() == SEND:
            self._finish(d.OP_COMMIT)

    def rollback(self) -> None:
        self.transaction_time = None
        if self.txn.rollback() == SEND:
            self._finish(d.OP_ROLLBACK)

    def close(self) -> None:
        if self.transaction_open:
            try:
                self.rollback()
            except Exception:
                logger.warning("could not roll back an open load-balanced transaction on close", exc_info=True)
        self.closed = True

    def is_usable(self) -> bool:
        return not self.closed

    # -- inserts with generated keys ---------------------------------------
    def expect_inserts(self, pairs: Iterable[tuple[str, d.InsertKeys]]) -> None:
        self.expected_inserts.extend(pairs)

    def take_insert_keys(self, sql: str) -> Optional[d.InsertKeys]:
        if self.expected_inserts and self.expected_inserts[0][0] == sql:
            return self.expected_inserts.popleft()[1]
        return None

    # -- statements -------------------------------------------------------
    def run(self, statement: d.Statement) -> d.Result:
        kind = classify(statement.sql)
        if kind == READ and not self.txn.is_open:
            # Zero-hop: this process picks the copy from shared memory and runs the read
            # on its own connection; None means "take the coordinator path".
            reader = zero_hop_reader()
            if reader is not None:
                result = reader.read(statement)
                if result is not None:
                    return result
        if kind == BOUNDARY:
            raise NotSupportedError(
                f"{statement.sql.split()[0]} sent through the load-balanced connection; "
                "use django.db.transaction.atomic(using=...) instead."
            )
        if kind == WRITE:
            statement = self._deterministic(statement)
        if self.txn.autocommit:
            if kind == SAVEPOINT:
                return d.Result()
            if kind != READ:
                warn_if_in_foreign_atomic(self.alias)
            return self._send(d.OP_READ if kind == READ else d.OP_WRITE, statement, False)
        if not self.txn.is_open:
            if kind == SAVEPOINT:
                self.txn.savepoint(statement.sql)
                return d.Result()
            if kind == READ:
                return self._send(d.OP_READ, statement, False)
        op = d.OP_READ if kind == READ else d.OP_WRITE
        return self._send(op, statement, True)

    def _deterministic(self, statement: d.Statement) -> d.Statement:
        """The write with its clock functions made literals (one value for every copy, and for
        the journal's replay); NonDeterministicWrite for random functions."""
        keys = statement.insert_keys
        vendor = self.vendor
        if not (determinism.may_vary(statement.sql, vendor)
                or keys is not None and determinism.may_vary(keys.follower_sql, vendor)):
            return statement
        now = time.time()
        if not self.autocommit and self.transaction_time is None:
            self.transaction_time = now   # PostgreSQL's now() stands still for a whole transaction
        clock = determinism.Clock(now, None if self.autocommit else self.transaction_time)
        return determinism.deterministic(statement, vendor, clock)

    def _send(self, op: str, statement: d.Statement, in_transaction: bool) -> d.Result:
        if in_transaction:
            self.txn.statement()   # TransactionError when it is broken
        client = get_client()
        # Only writes need an id: a repeated one is answered from the journal.
        request_id = "" if op == d.OP_READ else client.new_request_id()
        request = d.Request(op=op, statement=statement, in_transaction=in_transaction, request_id=request_id)
        opening = in_transaction and not self.txn.is_open
        if opening:
            request.opens = True
            request.prelude = self.txn.prelude_sql()
        payload = client.encode(request)
        if opening:
            # From here the coordinator may hold the transaction, whatever becomes of this
            # statement: it is ended as an open one (ending one it does not hold is harmless).
            self.txn.opened()
        try:
            # Safe to send again on a new connection: reads, autocommit writes (the journal
            # answers a repeated id) and a statement opening a transaction (nothing of a
            # transaction is applied before its commit).
            ok, value = client.exchange(payload, idempotent=(op == d.OP_READ or not in_transaction or opening))
        except BaseException as exc:
            return self._unanswered(client, request, exc)
        if ok:
            return value
        raise from_dict(value)

    def _unanswered(self, client: CoordinatorClient, request: d.Request, exc: BaseException) -> d.Result:
        """``request`` was sent (or may have been) and its answer was not received: ``exc``."""
        client.drop_thread_connection()
        if request.in_transaction:
            reason = self.txn.lost(_what_happened(exc))
            if isinstance(exc, CoordinatorUnavailable) and request.opens:
                raise exc   # nothing of the transaction reached the coordinator
            if isinstance(exc, (CoordinatorUnavailable, AnswerTimeout)):
                raise TransactionError(reason) from None
            _note(exc, reason)
            raise exc
        if request.op == d.OP_READ:
            raise exc
        if isinstance(exc, (AnswerTimeout, ProtocolError)):
            return self._settle(client, request)
        if isinstance(exc, LoadBalancerError):
            raise exc   # CoordinatorUnavailable: see README, "Not guaranteed"
        self._unknown(request, exc)
        raise exc

    def _settle(self, client: CoordinatorClient, request: d.Request) -> d.Result:
        try:
            return client.settle(request.request_id)
        except DjangoDatabaseError:
            raise   # the write's own outcome, or WriteOutcomeUnknown
        except BaseException as exc:   # the app's own interrupt, while asking
            self._unknown(request, exc)
            raise

    def _unknown(self, request: d.Request, exc: BaseException) -> None:
        """An exception of the app's took the answer to a write: the app's exception goes on, with a note."""
        what = "commit" if request.op == d.OP_COMMIT else "write"
        self.outcome_unknown = request.request_id
        note = (f"django_lb_shm: the {what} of request {request.request_id} was sent and its answer not "
                f"received: its outcome is unknown (it is applied on every copy or on none)")
        _note(exc, note)
        logger.warning("%s (%s)", note, type(exc).__name__)

    def _finish(self, op: str) -> None:
        client = get_client()
        request = d.Request(op=op, in_transaction=True, request_id=client.new_request_id())
        payload = client.encode(request)
        # Only now: an exception before the send leaves it open, to be ended (rolled back) later.
        self.txn.ending()
        try:
            ok, value = client.exchange(payload, idempotent=(op == d.OP_COMMIT))
        except BaseException as exc:
            self._finish_unanswered(client, request, exc)
            return
        if not ok:
            raise from_dict(value)

    def _finish_unanswered(self, client: CoordinatorClient, request: d.Request, exc: BaseException) -> None:
        client.drop_thread_connection()
        if request.op == d.OP_ROLLBACK:
            if isinstance(exc, (CoordinatorUnavailable, AnswerTimeout)):
                return   # the coordinator dropped the transaction with the connection
            raise exc
        if isinstance(exc, (AnswerTimeout, ProtocolError)):
            try:
                self._settle(client, request)
            except WriteNotApplied as error:
                raise TransactionError(f"commit of a load-balanced transaction: {error}; none of its writes "
                                       "were applied") from None
            return
        if isinstance(exc, CoordinatorUnavailable):
            raise WriteOutcomeUnknown(f"commit of a load-balanced transaction (request {request.request_id}): "
                                      f"{exc}") from None
        if isinstance(exc, LoadBalancerError):
            raise exc
        self._unknown(request, exc)
        raise exc


def _what_happened(exc: BaseException) -> str:
    if isinstance(exc, LoadBalancerError):
        return str(exc)
    return f"a statement was interrupted by {type(exc).__name__}({exc}) before its answer came"


def _note(exc: BaseException, note: str) -> None:
    add_note = getattr(exc, "add_note", None)   # Python 3.11+
    if add_note is not None:
        add_note(note)


class ProxyCursor:
    """DB-API cursor whose statements run in the coordinator; results come back whole."""

    arraysize = 100

    def __init__(self, session: ClientSession):
        self.session = session
        self._reset()

    def _reset(self) -> None:
        self._rows: list = []
        self._pos = 0
        self._description = None
        self.rowcount = -1
        self.lastrowid = None

    @property
    def description(self) -> Optional[Any]:
        description = self._description
        if type(description) is PgDescription:   # a zero-hop read's: built on first use
            description = self._description = description.resolve()
        return description

    def execute(self, sql: str, params: Any = None) -> "ProxyCursor":
        session = self.session
        if not session.txn.is_open and not session.expected_inserts:
            # The zero-hop fast lane (the same decision as ClientSession.run, without building
            # a Statement and a Result): this process runs the read itself.
            reader = zero_hop_reader()
            if reader is not None and classify(sql) == READ:
                out = reader.run(sql, params)
                if out is not None:
                    self._rows, self._description, self.rowcount, _database = out
                    self._pos = 0
                    self.lastrowid = None
                    return self
        keys = session.take_insert_keys(sql)
        self._load(session.run(d.Statement(sql, params, False, keys)))
        return self

    def executemany(self, sql: str, param_list: Iterable[Any]) -> "ProxyCursor":
        self._load(self.session.run(d.Statement(sql, list(param_list), True)))
        return self

    def _load(self, result: d.Result) -> None:
        self._rows = result.rows
        self._pos = 0
        self._description = result.description
        self.rowcount = result.rowcount
        self.lastrowid = result.lastrowid

    def fetchone(self):
        if self._pos >= len(self._rows):
            return None
        row = self._rows[self._pos]
        self._pos += 1
        return row

    def fetchmany(self, size: Optional[int] = None):
        size = size or self.arraysize
        rows = self._rows[self._pos:self._pos + size]
        self._pos += len(rows)
        return rows

    def fetchall(self):
        rows = self._rows[self._pos:]
        self._pos = len(self._rows)
        return rows

    def __iter__(self):
        while True:
            row = self.fetchone()
            if row is None:
                return
            yield row

    def close(self) -> None:
        self._reset()

    def setinputsizes(self, *args: Any) -> None:
        pass

    def setoutputsize(self, *args: Any) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

"""The DB-API objects behind the virtual Django connection: a session and its cursors.

Reads outside a transaction (or before its first write) first try the zero-hop path
(``client/reads.py``): on the coordinator's host the process routes and runs them itself;
when it cannot, they are sent to the coordinator.
"""
from __future__ import annotations

import logging
import time
from collections import deque
from typing import Any, Iterable, Optional

from django.db.utils import Error as DjangoDatabaseError

from django_lb_shm.client import determinism
from django_lb_shm.client.connection import ClientConnection, get_client
from django_lb_shm.client.reads import PgDescription, zero_hop_reader
from django_lb_shm.client.statements import BOUNDARY, READ, SAVEPOINT, WRITE, classify
from django_lb_shm.client.transaction import SEND, ClientTransaction
from django_lb_shm.errors import (
    AnswerTimeout,
    CoordinatorUnavailable,
    LoadBalancerError,
    NotSupportedError,
    ProtocolError,
    TransactionError,
    WriteNotApplied,
    WriteOutcomeUnknown,
    from_dict,
)
from django_lb_shm.transactions import warn_if_in_foreign_atomic
from django_lb_shm.wire import descriptors as d

logger = logging.getLogger("django_lb_shm.client")

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
        self.txn = ClientTransaction()     # AUTOCOMMIT, PENDING, OPEN or BROKEN: see client/transaction.py
        # now() / CURRENT_TIMESTAMP of the current transaction, read at its first use (see _deterministic)
        self.transaction_time: Optional[float] = None
        self.expected_inserts: deque = deque()
        self.closed = False
        self.outcome_unknown = ""   # request id of the last write whose answer an exception took

    # The transaction's state, read by Django-side code and tests (client/transaction.py changes it).
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

    def _unanswered(self, client: ClientConnection, request: d.Request, exc: BaseException) -> d.Result:
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

    def _settle(self, client: ClientConnection, request: d.Request) -> d.Result:
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

    def _finish_unanswered(self, client: ClientConnection, request: d.Request, exc: BaseException) -> None:
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

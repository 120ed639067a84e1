"""The load-balanced transaction as the coordinator sees it: one per client connection.

A client's server thread (``router.RequestRouter``) keeps one ``ServerTransaction``; it
is the only caller of the sequencer's transaction hold: it takes the global write order
(``Sequencer.hold_write_order``) when the client's first write opens the transaction, and
gives it back (``Sequencer.release_write_order``) on commit, rollback, a lost leader, the
client's disconnection or the hold timeout.

States:

* IDLE -- no transaction held for this connection.
* SERVING -- the transaction holds the write order and a request of its client is being served:
  the hold timeout does not apply.
* WAITING -- it holds the write order and waits for its client's next request: after
  TRANSACTION_HOLD_TIMEOUT of that, the health watch rolls it back.
* EXPIRED -- the hold timeout rolled it back and gave the order back; its client is told on
  its next request (TransactionError, or nothing to do for its ROLLBACK).

Events: ``request_begins``/``request_ends`` (a request of the client is served),
``open`` (its first write: take the order, begin on the leader, run the recorded
savepoints), ``run`` (a statement of it on the leader), ``commit``, ``rollback``,
``client_gone`` (the connection closed) and ``hold_timeout`` (the health watch's thread,
concurrently with the others: transitions happen under the instance's lock).  Any other
(state, event) raises TransitionError.

    state     event           next      action
    -- transitions --
    IDLE      request_begins  IDLE      -
    IDLE      request_ends    IDLE      -
    IDLE      open            SERVING   write order taken, leader's transaction begun; then the prelude: ``run``s
    IDLE      open            IDLE      the order could not be taken (or no leader could begin)
    IDLE      rollback        IDLE      nothing held
    IDLE      client_gone     IDLE      -
    IDLE      hold_timeout    IDLE      -
    SERVING   run             SERVING   the statement's result or error
    SERVING   run             IDLE      leader lost: rolled back, order given back, leader DOWN; TransactionError
    SERVING   commit          IDLE      decided (or refused) on the leader, order given back, WRITE_ACK awaited
    SERVING   rollback        IDLE      rolled back on the leader, order given back (also: a prelude that failed)
    SERVING   request_ends    WAITING   the idle clock starts
    SERVING   client_gone     IDLE      rolled back, order given back
    SERVING   hold_timeout    SERVING   - (not idle)
    WAITING   request_begins  SERVING   the idle clock stops
    WAITING   client_gone     IDLE      rolled back, order given back
    WAITING   hold_timeout    WAITING   - (idle within the limit)
    WAITING   hold_timeout    EXPIRED   rolled back, order given back, why kept for the client
    EXPIRED   request_begins  IDLE      why, for the client (TransactionError)
    EXPIRED   client_gone     IDLE      -
    EXPIRED   hold_timeout    EXPIRED   -
    -- end --
"""
from __future__ import annotations

import logging
import threading
import time
from enum import Enum
from typing import Any, Optional, Sequence

from django_lb_shm.coordinator.outcomes import Fenced, WriteOutcomes
from django_lb_shm.databases.failures import is_connection_error
from django_lb_shm.errors import TransactionError
from django_lb_shm.wire.descriptors import Result, Statement
from django_lb_shm.wire.state_table import move

logger = logging.getLogger("django_lb_shm.coordinator")


class ServerState(Enum):
    IDLE = "idle"
    SERVING = "serving"
    WAITING = "waiting"
    EXPIRED = "expired"


I, S, W, X = ServerState.IDLE, ServerState.SERVING, ServerState.WAITING, ServerState.EXPIRED

TRANSITIONS = {
    (I, "request_begins"): frozenset({I}),
    (I, "request_ends"): frozenset({I}),
    (I, "open"): frozenset({S, I}),
    (I, "rollback"): frozenset({I}),
    (I, "client_gone"): frozenset({I}),
    (I, "hold_timeout"): frozenset({I}),
    (S, "run"): frozenset({S, I}),
    (S, "commit"): frozenset({I}),
    (S, "rollback"): frozenset({I}),
    (S, "request_ends"): frozenset({W}),
    (S, "client_gone"): frozenset({I}),
    (S, "hold_timeout"): frozenset({S}),
    (W, "request_begins"): frozenset({S}),
    (W, "client_gone"): frozenset({I}),
    (W, "hold_timeout"): frozenset({W, X}),
    (X, "request_begins"): frozenset({I}),
    (X, "client_gone"): frozenset({I}),
    (X, "hold_timeout"): frozenset({X}),
}


class ServerTransaction:
    """One client connection's transaction on the coordinator (see the module's table)."""

    def __init__(self, sequencer: Any):
        self.sequencer = sequencer
        self.state = ServerState.IDLE
        self.txn: Optional[Any] = None   # the sequencer's OpenTransaction while the order is held for it
        self.expired = ""                # why, in EXPIRED
        self.last_activity = time.monotonic()
        self.lock = threading.Lock()

    def __repr__(self) -> str:
        return f"<ServerTransaction {self.state.name}>"

    @property
    def holds(self) -> bool:
        return self.state is ServerState.SERVING or self.state is ServerState.WAITING

    def idle_for(self, now: float) -> float:
        """How long it has held the order waiting for its client (0 unless WAITING)."""
        return max(0.0, now - self.last_activity) if self.state is ServerState.WAITING else 0.0

    def _to(self, event: str, to: ServerState) -> None:
        self.state = move("ServerTransaction", TRANSITIONS, self.state, event, to)

    def _take(self, event: str, to: ServerState) -> Optional[Any]:
        """Move to ``to`` and hand over the OpenTransaction, if any (the caller ends it). Under the lock."""
        self._to(event, to)
        txn, self.txn = self.txn, None
        return txn

    # -- a request of the client ----------------------------------------------------------
    def request_begins(self) -> str:
        """"" -- or why the hold timeout rolled the transaction back meanwhile (then IDLE)."""
        with self.lock:
            if self.state is X:
                self._to("request_begins", I)
                why, self.expired = self.expired, ""
                return why
            self._to("request_begins", S if self.state is W else self.state)
            return ""

    def request_ends(self) -> None:
        with self.lock:
            self.last_activity = time.monotonic()
            self._to("request_ends", W if self.state is S else self.state)

    def open(self, prelude: Sequence[str], request_id: str, client: str) -> None:
        """Take the write order, begin on the leader and run the savepoints recorded before
        the first write; on failure the order is given back and the error raised."""
        if self.state is not I:
            self._to("open", S)   # raises: only an IDLE connection opens
        try:
            txn = self.sequencer.hold_write_order(request_id, client, self)
        except BaseException:
            self._to("open", I)
            raise
        with self.lock:
            self.txn = txn
            self._to("open", S)
        try:
            for sql in prelude:
                self.run(Statement(sql))
        except BaseException as exc:
            if self.holds:   # (run gave the order back itself when the leader was lost)
                self._give_back("rollback")
            if is_connection_error(exc):
                raise TransactionError(f"could not start the transaction: {exc}") from None
            raise

    def run(self, statement: Statement, records: bool = True) -> Result:
        """``statement`` in the transaction, on its leader (``records``: a write the copies replay)."""
        from django_lb_shm.coordinator.sequencer import LeaderLost

        self._to("run", S)
        txn = self.txn
        try:
            return self.sequencer.run_in(txn, statement, records)
        except LeaderLost as lost:
            self._give_back("run")
            txn.leader.go_down(lost.cause)
            raise TransactionError(
                f"the transaction was aborted: database {txn.leader.alias!r} failed ({lost.cause}); "
                "none of its writes were applied"
            ) from None

    def commit(self, request_id: str, outcomes: WriteOutcomes) -> Result:
        """Decide it (``outcomes`` keeps the answer for a client that asks again)."""
        with self.lock:
            txn = self._take("commit", I)
        try:
            return outcomes.run(request_id, lambda: self._decide(txn, request_id))
        except Fenced:
            self.sequencer.release_write_order(txn, rollback=True)
            raise TransactionError(f"commit of request {request_id}: its client stopped waiting for it and was "
                                   "told it was not applied; none of its writes were applied") from None

    def _decide(self, txn: Any, request_id: str) -> Result:
        try:
            seq = self.sequencer.decide_transaction(txn, request_id)
        finally:
            self.sequencer.release_write_order(txn, rollback=False)
        if seq is not None:
            self.sequencer.wait_for_acks(seq)
        return Result()

    def rollback(self) -> None:
        self._give_back("rollback")

    def _give_back(self, event: str) -> None:
        with self.lock:
            txn = self._take(event, I)
        if txn is not None:
            self.sequencer.release_write_order(txn, rollback=True)

    # -- from outside a request -------------------------------------------------------------
    def client_gone(self) -> None:
        with self.lock:
            self.expired = ""
            txn = self._take("client_gone", I)
        if txn is not None:
            logger.warning("a client went away inside a transaction; rolled back")
            self.sequencer.release_write_order(txn, rollback=True)

    def hold_timeout(self, limit: float) -> bool:
        """Roll it back if it has waited for its client for more than ``limit`` seconds (the
        health watch's thread); its client gets TransactionError on its next call."""
        with self.lock:
            idle = self.idle_for(time.monotonic())
            if self.state is not W or idle <= limit:
                self._to("hold_timeout", self.state)
                return False
            txn = self._take("hold_timeout", X)
            self.expired = (f"the load-balanced transaction held the write order for {idle:.1f} s without sending "
                            f"anything (LOAD_BALANCER['TRANSACTION_HOLD_TIMEOUT'] is {limit:g} s): it was rolled "
                            "back; none of its writes were applied")
        logger.warning("rolled back the transaction of %s (request %s): it held the write order for %.1f s "
                       "without sending anything", txn.client or "a client", txn.request_id or "?", idle)
        try:
            self.sequencer.roll_back_expired(txn)
        finally:
            self.sequencer.release_write_order(txn, rollback=False)
        return True

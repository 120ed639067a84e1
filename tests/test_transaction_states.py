"""Issue 20, part C: the transaction protocol as a named state machine on each side.

The pure machines (``ClientTransaction``, ``ServerTransaction``) are driven through every
(state, event) in-process: each transition of the table leads where the table says, with its
action, and every other pair raises TransitionError; the table in each docstring is the one
implemented.  Then, against a real coordinator, a transaction is walked through
write/commit, write/rollback, an interrupted call (broken, then rolled back) and the hold
timeout, on the client's session and on the coordinator's side (``status``'s write order).
"""
from __future__ import annotations

import time
from types import SimpleNamespace
from typing import Any, Callable

import pytest
from django.db import connections

import django_lb_shm
from django_lb_shm.client import transaction as client_transaction
from django_lb_shm.coordinator import transaction as server_transaction
from django_lb_shm.backend.alias import lb_alias
from django_lb_shm.client.transaction import NOTHING, SEND, ClientState, ClientTransaction
from django_lb_shm.wire.descriptors import Result, Statement
from django_lb_shm.errors import TransactionError
from django_lb_shm.coordinator.outcomes import WriteOutcomes
from django_lb_shm.coordinator.sequencer import LeaderLost
from django_lb_shm.coordinator.transaction import ServerState, ServerTransaction
from django_lb_shm.wire.state_table import TransitionError, documented, implemented
from tests.support.lb import ALIASES, table_rows
from tests.test_client_in_step import Interrupted, alarm_raises, slow_read_in_block, uses_sigalrm
from tests.testapp.models import Author, Destination


@pytest.mark.parametrize("module", [client_transaction, server_transaction], ids=["client", "server"])
def test_the_docstring_table_is_the_implemented_one(module):
    assert documented(module.__doc__) == implemented(module.TRANSITIONS)


# -- the client's machine ------------------------------------------------------------------------------
CLIENT_EVENTS: dict[str, Callable[[ClientTransaction], Any]] = {
    "autocommit_off": lambda m: m.autocommit_off(),
    "autocommit_on": lambda m: m.autocommit_on(),
    "savepoint": lambda m: m.savepoint("SAVEPOINT s1"),
    "statement": lambda m: m.statement(),
    "opened": lambda m: m.opened(),
    "lost": lambda m: m.lost("a statement was interrupted"),
    "commit": lambda m: m.commit(),
    "rollback": lambda m: m.rollback(),
    "ending": lambda m: m.ending(),
}


def client_in(state: ClientState) -> ClientTransaction:
    machine = ClientTransaction()
    machine.state = state
    if state is ClientState.PENDING:
        machine.prelude.append(("s0", "SAVEPOINT s0"))
    if state is ClientState.BROKEN:
        machine.broken = "why it broke"
    return machine


@pytest.mark.parametrize("state", list(ClientState), ids=lambda s: s.name)
@pytest.mark.parametrize("event", list(CLIENT_EVENTS))
def test_every_client_event_moves_as_the_table_says_or_is_refused(state, event):
    machine = client_in(state)
    allowed = client_transaction.TRANSITIONS.get((state, event))
    if allowed is None:
        with pytest.raises(TransitionError, match=rf"event '{event}' in state {state.name}"):
            CLIENT_EVENTS[event](machine)
        return
    try:
        CLIENT_EVENTS[event](machine)
    except TransactionError as exc:   # the BROKEN actions
        assert state is ClientState.BROKEN and event in ("statement", "commit") and "why it broke" in str(exc)
    assert machine.state in allowed


def test_client_actions():
    machine = ClientTransaction()
    assert machine.commit() == NOTHING and machine.state is ClientState.AUTOCOMMIT
    machine.autocommit_off()
    for sql in ("SAVEPOINT a", "SAVEPOINT b", "SAVEPOINT c", "ROLLBACK TO SAVEPOINT b", "RELEASE SAVEPOINT x"):
        machine.savepoint(sql)
    assert machine.prelude_sql() == ("SAVEPOINT a", "SAVEPOINT b")   # ROLLBACK TO keeps b, drops c
    machine.savepoint("RELEASE SAVEPOINT b")
    assert machine.prelude_sql() == ("SAVEPOINT a",)
    machine.statement()
    machine.opened()
    assert machine.is_open and machine.prelude == []
    assert machine.commit() == SEND and machine.state is ClientState.OPEN   # open until the request goes
    machine.ending()
    assert machine.state is ClientState.PENDING and not machine.is_open
    machine.statement()
    machine.opened()
    reason = machine.lost("it was interrupted")
    assert machine.state is ClientState.BROKEN and "it was interrupted" in reason and machine.is_open
    with pytest.raises(TransactionError, match="it was interrupted"):
        machine.statement()
    assert machine.rollback() == NOTHING and machine.state is ClientState.PENDING and machine.broken == ""
    machine.autocommit_on()
    assert machine.autocommit


# -- the coordinator's machine --------------------------------------------------------------------------
class RecordingSequencer:
    """The sequencer's transaction hold, recorded (what the machine asks of it, in order)."""

    def __init__(self, lose_leader: bool = False, refuse_hold: bool = False, refuse_sql: str = ""):
        self.calls: list[tuple] = []
        self.lose_leader, self.refuse_hold, self.refuse_sql = lose_leader, refuse_hold, refuse_sql

    def txn(self) -> SimpleNamespace:
        leader = SimpleNamespace(alias="DB1", go_down=lambda exc: self.calls.append(("go_down", str(exc))))
        return SimpleNamespace(leader=leader, holds_order=True, client="pid 1", request_id="1-a-1")

    def hold_write_order(self, request_id: str, client: str, holder: Any) -> SimpleNamespace:
        self.calls.append(("hold_write_order", request_id))
        if self.refuse_hold:
            raise TransactionError("no leader")
        return self.txn()

    def run_in(self, txn: Any, statement: Statement, records: bool = True) -> Result:
        self.calls.append(("run_in", statement.sql))
        if self.lose_leader:
            raise LeaderLost(ConnectionError("gone"))
        if statement.sql == self.refuse_sql:
            raise ValueError(f"refused {statement.sql}")
        return Result()

    def decide_transaction(self, txn: Any, request_id: str) -> int:
        self.calls.append(("decide_transaction", request_id))
        return 7

    def wait_for_acks(self, seq: int) -> None:
        self.calls.append(("wait_for_acks", seq))

    def roll_back_expired(self, txn: Any) -> None:
        self.calls.append(("roll_back_expired",))

    def release_write_order(self, txn: Any, rollback: bool) -> None:
        assert txn.holds_order, "given back twice"
        txn.holds_order = False
        self.calls.append(("release_write_order", rollback))


def server_in(state: ServerState, **sequencer: Any) -> ServerTransaction:
    machine = ServerTransaction(RecordingSequencer(**sequencer))
    machine.state = state
    if state in (ServerState.SERVING, ServerState.WAITING):
        machine.txn = machine.sequencer.txn()
    if state is ServerState.EXPIRED:
        machine.expired = "held for too long"
    return machine


SERVER_EVENTS: dict[str, Callable[[ServerTransaction], Any]] = {
    "request_begins": lambda m: m.request_begins(),
    "request_ends": lambda m: m.request_ends(),
    "open": lambda m: m.open(["SAVEPOINT s1"], "1-a-1", "pid 1"),
    "run": lambda m: m.run(Statement("INSERT INTO t VALUES (1)")),
    "commit": lambda m: m.commit("1-a-2", WriteOutcomes(lambda request_id: None)),
    "rollback": lambda m: m.rollback(),
    "client_gone": lambda m: m.client_gone(),
    "hold_timeout": lambda m: m.hold_timeout(3600),
}


@pytest.mark.parametrize("state", list(ServerState), ids=lambda s: s.name)
@pytest.mark.parametrize("event", list(SERVER_EVENTS))
def test_every_server_event_moves_as_the_table_says_or_is_refused(state, event):
    machine = server_in(state)
    allowed = server_transaction.TRANSITIONS.get((state, event))
    if allowed is None:
        with pytest.raises(TransitionError, match=rf"event '{event}' in state {state.name}"):
            SERVER_EVENTS[event](machine)
        return
    SERVER_EVENTS[event](machine)
    assert machine.state in allowed
    released = [call for call in machine.sequencer.calls if call[0] == "release_write_order"]
    assert len(released) == (1 if machine.state is ServerState.IDLE and state in (ServerState.SERVING,
                                                                                 ServerState.WAITING) else 0)


def test_server_open_run_commit():
    machine = server_in(ServerState.IDLE)
    machine.request_begins()
    machine.open(["SAVEPOINT s1"], "1-a-1", "pid 1")
    machine.run(Statement("INSERT INTO t VALUES (1)"))
    assert machine.state is ServerState.SERVING and machine.holds
    machine.request_ends()
    assert machine.state is ServerState.WAITING
    assert machine.request_begins() == "" and machine.state is ServerState.SERVING
    machine.commit("1-a-2", WriteOutcomes(lambda request_id: None))
    assert machine.state is ServerState.IDLE and machine.txn is None
    assert machine.sequencer.calls == [
        ("hold_write_order", "1-a-1"), ("run_in", "SAVEPOINT s1"), ("run_in", "INSERT INTO t VALUES (1)"),
        ("decide_transaction", "1-a-2"), ("release_write_order", False), ("wait_for_acks", 7)]


def test_server_open_that_cannot_take_the_order_stays_idle():
    machine = server_in(ServerState.IDLE, refuse_hold=True)
    with pytest.raises(TransactionError, match="no leader"):
        machine.open([], "1-a-1", "pid 1")
    assert machine.state is ServerState.IDLE


def test_server_open_whose_prelude_fails_rolls_back_and_gives_the_order_back_once():
    machine = server_in(ServerState.IDLE, refuse_sql="SAVEPOINT s2")
    with pytest.raises(ValueError, match="refused SAVEPOINT s2"):
        machine.open(["SAVEPOINT s1", "SAVEPOINT s2"], "1-a-1", "pid 1")
    assert machine.state is ServerState.IDLE and machine.txn is None
    assert machine.sequencer.calls == [("hold_write_order", "1-a-1"), ("run_in", "SAVEPOINT s1"),
                                       ("run_in", "SAVEPOINT s2"), ("release_write_order", True)]


def test_server_open_whose_prelude_loses_the_leader_gives_the_order_back_once():
    machine = server_in(ServerState.IDLE, lose_leader=True)
    with pytest.raises(TransactionError, match="database 'DB1' failed"):
        machine.open(["SAVEPOINT s1"], "1-a-1", "pid 1")
    assert machine.state is ServerState.IDLE
    assert machine.sequencer.calls == [("hold_write_order", "1-a-1"), ("run_in", "SAVEPOINT s1"),
                                       ("release_write_order", True), ("go_down", "gone")]


def test_server_lost_leader_gives_the_order_back_before_taking_it_down():
    machine = server_in(ServerState.SERVING, lose_leader=True)
    with pytest.raises(TransactionError, match="database 'DB1' failed"):
        machine.run(Statement("INSERT INTO t VALUES (1)"))
    assert machine.state is ServerState.IDLE
    assert machine.sequencer.calls[1:] == [("release_write_order", True), ("go_down", "gone")]


def test_server_hold_timeout_expires_a_waiting_transaction_once_and_tells_its_client():
    machine = server_in(ServerState.WAITING)
    machine.last_activity = time.monotonic() - 5
    assert not machine.hold_timeout(10) and machine.state is ServerState.WAITING
    assert machine.idle_for(time.monotonic()) >= 5
    assert machine.hold_timeout(1) and machine.state is ServerState.EXPIRED
    assert not machine.hold_timeout(1)   # once
    why = machine.request_begins()
    assert "TRANSACTION_HOLD_TIMEOUT" in why and machine.state is ServerState.IDLE
    assert machine.sequencer.calls == [("roll_back_expired",), ("release_write_order", False)]


# -- wired: a real coordinator ----------------------------------------------------------------------------
def session_state() -> ClientState:
    return connections[lb_alias()].connection.txn.state


def order_held(handle: Any) -> bool:
    return handle.status()["coordinator"]["write_order"]["held"]


def wait_order_free(handle: Any, bound: float = 10) -> None:
    deadline = time.monotonic() + bound
    while order_held(handle):
        assert time.monotonic() < deadline, "the write order is still held"
        time.sleep(0.05)


def copies_hold(names: list[str]) -> bool:
    return all(sorted(row[1] for row in table_rows(alias, "testapp_author")) == sorted(names) for alias in ALIASES)


def test_client_and_coordinator_walk_write_commit_and_write_rollback(replicas, coordinator):
    Author.objects.count()   # the session exists
    with django_lb_shm.atomic():
        assert Author.objects.count() == 0 and session_state() is ClientState.PENDING
        assert not order_held(coordinator)                                   # coordinator: IDLE
        Author.objects.create(name="committed")
        assert session_state() is ClientState.OPEN and order_held(coordinator)   # WAITING (held)
    assert session_state() is ClientState.AUTOCOMMIT and not order_held(coordinator)
    with pytest.raises(RuntimeError):
        with django_lb_shm.atomic():
            Author.objects.create(name="rolled back")
            assert order_held(coordinator)
            raise RuntimeError("leave")
    assert session_state() is ClientState.AUTOCOMMIT and not order_held(coordinator)
    replicas.assert_identical()
    assert copies_hold(["committed"])


@uses_sigalrm
def test_an_interrupted_call_breaks_the_transaction_on_both_sides_until_rolled_back(replicas, coordinator):
    Destination.objects.create(name="target", desc="start")
    with alarm_raises():
        with pytest.raises(Interrupted, match="left"):
            with django_lb_shm.atomic():
                Author.objects.create(name="in-block")
                slow_read_in_block()
                assert session_state() is ClientState.BROKEN
                wait_order_free(coordinator)   # its connection dropped: client_gone rolled it back
                with pytest.raises(TransactionError, match="interrupted"):
                    Author.objects.create(name="after")
                raise Interrupted("left")
    assert session_state() is ClientState.AUTOCOMMIT
    Author.objects.create(name="outside")
    replicas.assert_identical()
    assert copies_hold(["outside"])


def test_the_hold_timeout_expires_the_coordinators_side_and_the_client_is_told(lb_factory):
    handle = lb_factory("states-hold", TRANSACTION_HOLD_TIMEOUT=1, CLIENT_TIMEOUT=20)
    with pytest.raises(TransactionError, match="TRANSACTION_HOLD_TIMEOUT"):
        with django_lb_shm.atomic():
            Author.objects.create(name="idle")
            assert order_held(handle)
            wait_order_free(handle, bound=10)   # WAITING -> EXPIRED: rolled back, order given back
            assert session_state() is ClientState.OPEN   # the client does not know yet
            Author.objects.create(name="too late")
    assert session_state() is ClientState.AUTOCOMMIT
    Author.objects.create(name="after")
    handle.wait_drained()
    assert copies_hold(["after"])

"""Issue 14, items 1, 4 and 7: the client's answers stay in step, a write that times out is not
a read-style timeout, and every error a load-balanced query raises is a django.db error.

* An exception raised between sending a request and receiving its answer (a SIGALRM
  handler here) must never leave the thread's connection one answer behind: every later
  call gets its own answer, and an interrupted write is on every copy or on none.
* A write whose answer does not come within CLIENT_TIMEOUT is settled with the
  coordinator (the decided outcome) or is WriteOutcomeUnknown -- never QueryTimeout.
* A lone surrogate, an int over 64 bits, an unpicklable parameter: django.db errors that
  are also the builtin class plain Django would have raised.
"""
from __future__ import annotations

import contextlib
import io
import random
import signal
import threading
import time
import traceback
from typing import Any, Callable, Iterator

import pytest
from django.db import DatabaseError, IntegrityError, connections
from django.db.models.expressions import RawSQL

import django_lb_shm
from django_lb_shm.backend.alias import lb_alias
from django_lb_shm.errors import (
    LoadBalancerError,
    QueryTimeout,
    TransactionError,
    WriteNotApplied,
    WriteOutcomeUnknown,
)
from django_lb_shm.ops.verify import EXIT_IDENTICAL, verify
from tests.support.lb import ALIASES, BACKEND, read_path
from tests.testapp.models import Author, Destination

ITERATIONS = 200
TIME_BOUND = 150.0   # seconds for one run of the interrupt loop, whatever the machine
# pytest-timeout's default method is SIGALRM too: these tests take the signal, so their bound is a thread.
uses_sigalrm = pytest.mark.timeout(300, method="thread")


class Interrupted(Exception):
    """What the app's SIGALRM handler raises (a celery soft time limit, a request deadline...)."""


@contextlib.contextmanager
def alarm_raises() -> Iterator[None]:
    def handler(signum: int, frame: Any) -> None:
        raise Interrupted("SIGALRM")

    previous = signal.signal(signal.SIGALRM, handler)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


LANDED: list[str] = []   # where each interrupt landed: the innermost frame's file and function


def attempt(action: Callable[[], Any], delay: float) -> tuple[bool, Any]:
    """(interrupted, value): ``action`` run with a one-shot SIGALRM ``delay`` seconds in."""
    try:
        signal.setitimer(signal.ITIMER_REAL, delay)
        try:
            return False, action()
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
    except Interrupted as exc:
        frame = traceback.extract_tb(exc.__traceback__)[-2]   # [-1] is the handler
        LANDED.append(f"{frame.filename.rsplit('/', 1)[-1]}:{frame.name}")
        return True, None


def rows_named(alias: str, names: list[str]) -> list[tuple]:
    with connections[alias].cursor() as cursor:
        marks = ", ".join(["%s"] * len(names))
        cursor.execute(f"SELECT name, id FROM testapp_author WHERE name IN ({marks}) ORDER BY name", names)
        return [tuple(row) for row in cursor.fetchall()]


def assert_verify_identical() -> None:
    out = io.StringIO()
    assert verify(stream=out, progress=False) == EXIT_IDENTICAL, out.getvalue()


def end_of_task() -> bool:
    """What Django does at the end of a request (celery: of a task), close_if_unusable_or_obsolete:
    a connection an interrupt left outside autocommit is closed, which rolls back what it held.

    An interrupt that lands inside Django's own atomic() bookkeeping (between its
    set_autocommit() and its flags) leaves the connection so with any database backend;
    that is Django's state, not an answer out of step.  True when it had to be done.
    """
    wrapper = connections[lb_alias()]
    if wrapper.connection is None or (wrapper.get_autocommit() and not wrapper.in_atomic_block):
        return False
    wrapper.in_atomic_block, wrapper.atomic_blocks, wrapper.savepoint_ids = False, [], []
    wrapper.needs_rollback = wrapper.closed_in_transaction = False
    wrapper.close()
    return True


def assert_session_idle() -> None:
    wrapper = connections[lb_alias()]
    wrapper.ensure_connection()
    session = wrapper.connection
    state = (wrapper.get_autocommit(), wrapper.in_atomic_block, session.autocommit, session.transaction_open,
             session.broken)
    assert state == (True, False, True, False, ""), state


def check_own_answers(i: int, anchor: Author) -> None:
    """Calls made after an interrupt: each must get its own answer."""
    probe = Author.objects.create(name=f"probe-{i}")
    assert list(Author.objects.filter(name=f"probe-{i}").values_list("pk", flat=True)) == [probe.pk], \
        f"create() of probe-{i} answered pk {probe.pk}"
    assert Author.objects.filter(name__startswith="probe-").count() == i + 1
    assert Author.objects.get(pk=anchor.pk).name == "anchor"
    assert Destination.objects.filter(name="target").count() == 1


# -- 1. interrupted calls ------------------------------------------------------------------------
@uses_sigalrm
# An alarm that lands in a finalizer (a multiprocessing Connection's __del__) is "ignored" by Python.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
@pytest.mark.parametrize("path", ["COORDINATOR", "AUTO"])
def test_a_client_interrupted_at_random_points_gets_its_own_answers(replicas, path):
    rng = random.Random(f"in-step-{path}")
    acknowledged: dict[str, int] = {}       # name -> pk the app was told
    unknown: list[str] = []                  # creates whose answer an interrupt took
    pairs: list[tuple[str, str]] = []        # transactions whose end an interrupt took
    interrupts = healed = 0
    LANDED.clear()
    with read_path(path), alarm_raises():
        anchor = Author.objects.create(name="anchor")
        target = Destination.objects.create(name="target", desc="start")
        started = time.monotonic()
        for i in range(ITERATIONS):
            assert time.monotonic() - started < TIME_BOUND, f"only {i} iterations in {TIME_BOUND} s"
            op = rng.choice(["create", "duplicate", "count", "get", "update", "transaction"])
            delay = rng.uniform(0.00005, 0.004)
            if op == "create":
                name = f"c-{i}"
                interrupted, pk = attempt(lambda: Author.objects.create(name=name).pk, delay)
                if interrupted:
                    unknown.append(name)
                else:
                    acknowledged[name] = pk
            elif op == "duplicate":
                def duplicate() -> str:
                    with pytest.raises(IntegrityError):
                        Author.objects.create(name="anchor")
                    return "refused"
                interrupted, _ = attempt(duplicate, delay)
            elif op == "count":
                interrupted, n = attempt(lambda: Author.objects.filter(name__startswith="probe-").count(), delay)
                assert interrupted or n == i
            elif op == "get":
                interrupted, name = attempt(lambda: Author.objects.get(pk=anchor.pk).name, delay)
                assert interrupted or name == "anchor"
            elif op == "update":
                interrupted, n = attempt(
                    lambda: Destination.objects.filter(pk=target.pk).update(desc=f"u-{i}"), delay)
                assert interrupted or n == 1
            else:
                a, b = f"t-{i}-a", f"t-{i}-b"

                def block() -> tuple:
                    with django_lb_shm.atomic():
                        first = Author.objects.create(name=a)
                        Destination.objects.filter(pk=target.pk).update(desc=f"t-{i}")
                        second = Author.objects.create(name=b)
                    return first.pk, second.pk
                interrupted, keys = attempt(block, delay)
                if interrupted:
                    pairs.append((a, b))
                else:
                    acknowledged.update({a: keys[0], b: keys[1]})
            interrupts += interrupted
            healed += end_of_task()
            assert_session_idle()
            check_own_answers(i, anchor)
    assert interrupts >= ITERATIONS // 10, f"only {interrupts} calls were interrupted: the test proves little"
    assert healed <= interrupts // 4, f"{healed} of {interrupts} interrupts left Django outside autocommit"
    waiting = [spot for spot in LANDED if spot.startswith("protocol.py")]
    assert len(waiting) >= 5, f"only {len(waiting)} interrupts landed in a call to the coordinator: {LANDED}"
    replicas.assert_identical()
    assert_verify_identical()
    for alias in ALIASES:
        assert dict(rows_named(alias, list(acknowledged))) == acknowledged, alias
    for name in unknown:
        held = [len(rows_named(alias, [name])) for alias in ALIASES]
        assert held in ([0] * len(ALIASES), [1] * len(ALIASES)), (name, held)
    for a, b in pairs:
        held = [len(rows_named(alias, [a, b])) for alias in ALIASES]
        assert held in ([0] * len(ALIASES), [2] * len(ALIASES)), (a, b, held)


# Statements that run for about two seconds on the leader (and again on each copy).
def slow_value(seconds: float) -> RawSQL:
    if BACKEND == "postgres":
        return RawSQL(f"(SELECT 'slept' FROM pg_sleep({seconds}))", [])
    # about 4.5 million steps a second on an idle core here (fewer under load)
    steps = int(seconds * 4_500_000)
    return RawSQL("(WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c WHERE x < %s) "
                  "SELECT 'slept' FROM c WHERE x = %s)", [steps, steps])


@uses_sigalrm
def test_an_interrupted_write_leaves_the_next_answers_in_step(replicas):
    target = Destination.objects.create(name="target", desc="start")
    with alarm_raises():
        signal.setitimer(signal.ITIMER_REAL, 0.3)
        with pytest.raises(Interrupted) as info:
            Destination.objects.filter(pk=target.pk).update(desc=slow_value(2))
    note = " ".join(getattr(info.value, "__notes__", []))
    assert "outcome is unknown" in note and "request" in note, note
    # the next calls get their own answers, at once (not the update's, 2 s later)
    author = Author.objects.create(name="next-task")
    assert Author.objects.get(name="next-task").pk == author.pk
    assert Author.objects.filter(name="next-task").count() == 1
    replicas.assert_identical()
    descs = {row[2] for rows in replicas.rows("testapp_destination").values() for row in rows}
    assert len(descs) == 1, descs   # applied on every copy (it was decided) or on none


def slow_read_in_block() -> None:
    """A read the transaction runs on its leader, interrupted; the app catches its interrupt and
    goes on in the block (Django's update()/save() would mark the block for rollback themselves)."""
    signal.setitimer(signal.ITIMER_REAL, 0.3)
    try:
        list(Destination.objects.annotate(slept=slow_value(2)))
    except Interrupted:
        pass


@uses_sigalrm
def test_an_interrupt_inside_a_transaction_breaks_it(replicas):
    target = Destination.objects.create(name="target", desc="start")
    with alarm_raises():
        with pytest.raises(Interrupted, match="left the block"):
            with django_lb_shm.atomic():
                Author.objects.create(name="in-block")
                Destination.objects.filter(pk=target.pk).update(desc="in-block")
                slow_read_in_block()
                with pytest.raises(TransactionError, match="interrupted"):
                    Author.objects.count()
                with pytest.raises(TransactionError, match="interrupted"):
                    Author.objects.create(name="after-interrupt")
                raise Interrupted("left the block")
    # nothing of the block anywhere; the thread's next calls are in step and outside any transaction
    author = Author.objects.create(name="outside")
    assert list(Author.objects.values_list("pk", flat=True)) == [author.pk]
    replicas.assert_identical()
    assert {row[2] for rows in replicas.rows("testapp_destination").values() for row in rows} == {"start"}


@uses_sigalrm
def test_a_transaction_committed_after_an_interrupt_is_refused(replicas):
    target = Destination.objects.create(name="target", desc="start")
    with alarm_raises():
        with pytest.raises(TransactionError, match="interrupted"):
            with django_lb_shm.atomic():
                Author.objects.create(name="in-block")
                Destination.objects.filter(pk=target.pk).update(desc="in-block")
                slow_read_in_block()
    assert Author.objects.count() == 0
    assert Destination.objects.get(pk=target.pk).desc == "start"
    # a write waits for the write order: the dropped transaction has ended on the leader
    author = Author.objects.create(name="after")
    assert list(Author.objects.values_list("pk", flat=True)) == [author.pk]
    replicas.assert_identical()


def test_an_exception_before_the_commit_is_sent_leaves_no_transaction_behind(replicas, monkeypatch):
    """Django's atomic() turns autocommit back on after a commit that raised something else than a
    database error: the transaction still open then is rolled back, and never holds the write order."""
    from django_lb_shm.client.connection import ClientConnection

    real = ClientConnection.new_request_id
    calls = []

    def new_request_id(self) -> str:
        calls.append(1)
        if len(calls) == 2:   # the commit's: the create's was the first
            raise Interrupted("before the commit was sent")
        return real(self)

    monkeypatch.setattr(ClientConnection, "new_request_id", new_request_id)
    with pytest.raises(Interrupted):
        with django_lb_shm.atomic():
            Author.objects.create(name="in-block")
    monkeypatch.undo()
    started = time.monotonic()
    author = Author.objects.create(name="after")   # did not wait for a write order held by the block
    assert time.monotonic() - started < 5
    assert list(Author.objects.values_list("name", "pk")) == [("after", author.pk)]
    replicas.assert_identical()


# -- 4. a write that times out -------------------------------------------------------------------
@pytest.mark.parametrize("seconds", [2.6, 6])
def test_a_write_that_times_out_is_settled_or_unknown_never_a_query_timeout(lb_factory, seconds):
    handle = lb_factory("write-timeout", CLIENT_TIMEOUT=2)
    target = Destination.objects.create(name="target", desc="start")
    started = time.monotonic()
    try:
        updated = Destination.objects.filter(pk=target.pk).update(desc=slow_value(seconds))
    except WriteOutcomeUnknown as exc:
        assert not isinstance(exc, QueryTimeout)
        assert "request" in str(exc) and "CLIENT_TIMEOUT" in str(exc), exc
        outcome = "unknown"
    else:
        assert updated == 1
        outcome = "applied"
    elapsed = time.monotonic() - started
    assert elapsed < 2 + 5, elapsed      # CLIENT_TIMEOUT, then a short settling
    if seconds == 6:
        assert outcome == "unknown"      # still running when the settling gave up
    elif BACKEND == "postgres":
        assert outcome == "applied"      # decided a moment after the timeout: the coordinator says so
    # in step afterwards: a read at once, a write once the slow one gave the write order back
    assert Destination.objects.filter(pk=target.pk).count() == 1
    author = retry_while_the_order_is_held(lambda: Author.objects.create(name="after-timeout"))
    assert Author.objects.get(name="after-timeout").pk == author.pk
    handle.wait_drained(timeout=90)
    descs = {alias: [row[2] for row in _destination_rows(alias)] for alias in ALIASES}
    assert all(d == ["slept"] for d in descs.values()), descs   # it ran to its end: decided


def retry_while_the_order_is_held(write: Callable[[], Any], bound: float = 60) -> Any:
    """A write after one still running (or a transaction still being rolled back) on the leader:
    WriteNotApplied until it gives the write order back, which is safe to retry."""
    deadline = time.monotonic() + bound
    while True:
        try:
            return write()
        except WriteNotApplied:
            assert time.monotonic() < deadline, "the write order is still held"
            time.sleep(0.5)


def test_a_write_that_times_out_in_a_transaction_aborts_it(lb_factory):
    handle = lb_factory("write-timeout-txn", CLIENT_TIMEOUT=2)
    target = Destination.objects.create(name="target", desc="start")
    with pytest.raises(TransactionError, match="none of its writes were applied") as info:
        with django_lb_shm.atomic():
            Author.objects.create(name="in-block")
            Destination.objects.filter(pk=target.pk).update(desc=slow_value(4))
    assert not isinstance(info.value, QueryTimeout)
    assert "CLIENT_TIMEOUT" in str(info.value)
    author = retry_while_the_order_is_held(lambda: Author.objects.create(name="after"))
    assert Author.objects.get(name="after").pk == author.pk
    handle.wait_drained(timeout=90)
    for alias in ALIASES:
        assert [row[2] for row in _destination_rows(alias)] == ["start"], alias
        assert rows_named(alias, ["in-block"]) == [], alias


def _destination_rows(alias: str) -> list[tuple]:
    with connections[alias].cursor() as cursor:
        cursor.execute("SELECT id, name, \"desc\" FROM testapp_destination ORDER BY id")
        return [tuple(row) for row in cursor.fetchall()]


# -- 7. errors outside the tree -------------------------------------------------------------------
@pytest.mark.parametrize("path", ["COORDINATOR", "AUTO"])
def test_a_lone_surrogate_is_a_django_data_error_and_a_value_error(replicas, path):
    with read_path(path):
        for action in (lambda: Author.objects.create(name="\ud800"),
                       lambda: Author.objects.filter(name="bad \udfff").count(),
                       lambda: list(Author.objects.filter(name__in=["ok", "\ud83d"]))):
            with pytest.raises(ValueError) as info:
                action()
            assert isinstance(info.value, DatabaseError), type(info.value).__mro__
            assert isinstance(info.value, LoadBalancerError), type(info.value).__mro__
        author = Author.objects.create(name="fine")
        assert Author.objects.get(name="fine").pk == author.pk
    replicas.assert_identical()
    assert Author.objects.count() == 1


def test_a_value_out_of_range_and_an_unpicklable_parameter_are_django_errors(replicas):
    with pytest.raises(DatabaseError) as info:
        Author.objects.create(name="big", rating=2**63)
    if BACKEND == "sqlite":
        assert isinstance(info.value, OverflowError)
    with pytest.raises(TypeError) as info:
        with connections[lb_alias()].cursor() as cursor:
            cursor.execute("SELECT %s", [threading.Lock()])
    assert isinstance(info.value, DatabaseError), type(info.value).__mro__
    replicas.assert_identical()
    assert Author.objects.count() == 0


def test_builtin_errors_cross_the_wire_as_django_errors():
    from django_lb_shm import errors

    for builtin in (ValueError, TypeError, OverflowError, UnicodeEncodeError):
        exc = builtin("utf-8", "\ud800", 0, 1, "surrogates not allowed") if builtin is UnicodeEncodeError \
            else builtin("bad")
        rebuilt = errors.from_dict(errors.to_dict(exc))
        assert isinstance(rebuilt, DatabaseError) and isinstance(rebuilt, LoadBalancerError), type(rebuilt)
        assert isinstance(rebuilt, ValueError if builtin is UnicodeEncodeError else builtin), type(rebuilt)
    assert issubclass(errors.WriteOutcomeUnknown, DatabaseError)
    assert not issubclass(errors.WriteOutcomeUnknown, QueryTimeout)
    assert issubclass(errors.WriteNotApplied, DatabaseError)


def test_the_journal_keeps_a_decided_write_while_its_client_may_still_ask_about_it():
    """A trimmed record would make `settle` answer "never ran" for an applied write."""
    from django_lb_shm.coordinator.outcomes import TrimLag
    from django_lb_shm.wire.protocol import SETTLE_WAIT

    lag = TrimLag(client_timeout=30, connect_timeout=5)
    assert lag.retain == 30 + 5 + SETTLE_WAIT + TrimLag.MARGIN
    # A new coordinator (after a restart as well) trims nothing until it has watched that long.
    assert lag.floor(10, now=100.0) is None
    assert lag.floor(20, now=100.0 + lag.retain - 1) is None
    # Then only to what every copy had applied `retain` seconds ago, never to today's floor.
    assert lag.floor(30, now=100.0 + lag.retain) == 10
    assert lag.floor(40, now=100.0 + 2 * lag.retain - 1) == 20
    assert lag.floor(50, now=100.0 + 2 * lag.retain + 1) == 30

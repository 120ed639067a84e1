"""Group commit: concurrent autocommit writes share the cost of the global write order.

Each server thread with an autocommit write joins the queue.  One of them at a
time is the *committer*: it takes the global write order and hands everything
queued (up to ``MAX_GROUP`` writes) to the sequencer as one group -- one leader
transaction, one journal append (one fsync), one COMMIT -- while the others
wait for their own outcome.  When it is done, the next waiter still queued
becomes the committer.  Every write keeps its own sequence number, request id
and outcome: one caller's IntegrityError fails that caller only.
"""
from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import Callable, Optional

from django_lb_shm.errors import WriteNotApplied
from django_lb_shm.wire.descriptors import Result, Statement

MAX_GROUP = 64


@dataclass(eq=False)
class PendingWrite:
    statement: Statement
    request_id: str
    deadline: float                  # give up if the order is not taken by then
    result: Optional[Result] = None
    error: Optional[BaseException] = None
    seq: int = 0
    done: bool = False
    resent: bool = True              # False: a first send, which no journal record can answer

    def succeed(self, result: Result, seq: int) -> None:
        self.result, self.seq, self.done = result, seq, True

    def fail(self, error: BaseException) -> None:
        self.error, self.done = error, True

    def outcome(self) -> Result:
        if self.error is not None:
            raise self.error
        assert self.result is not None
        return self.result


class WriteQueue:
    def __init__(self, order: threading.Lock, run_group: Callable[[list], None], max_group: int = MAX_GROUP):
        self.order = order
        self.run_group = run_group
        self.max_group = max_group
        self._cv = threading.Condition()
        self._queue: list[PendingWrite] = []
        self._committing = False
        self.groups = 0          # groups run, and the writes in them (status: the mean group size)
        self.grouped_writes = 0

    def submit(self, pending: PendingWrite) -> Result:
        """Wait until ``pending`` is decided (committing groups meanwhile when it is our turn)."""
        with self._cv:
            self._queue.append(pending)
            while self._committing and not pending.done:
                self._cv.wait(0.5)
                if not pending.done and time.monotonic() >= pending.deadline and pending in self._queue:
                    self._queue.remove(pending)   # not taken into a group: it gives up, applied nowhere
                    pending.fail(order_held())
            if pending.done:
                return pending.outcome()
            self._committing = True
        try:
            self._commit_until_done(pending)
        finally:
            with self._cv:
                self._committing = False
                self._cv.notify_all()
        return pending.outcome()

    def _commit_until_done(self, mine: PendingWrite) -> None:
        while not mine.done:
            wait = self._earliest_deadline() - time.monotonic()
            if wait <= 0 or not self.order.acquire(timeout=wait):
                self._expire(time.monotonic())
                continue
            try:
                group = self._take()
                if group:
                    self._run(group)
            finally:
                self.order.release()
                with self._cv:
                    self._cv.notify_all()

    def _run(self, group: list) -> None:
        self.groups += 1
        self.grouped_writes += len(group)
        try:
            self.run_group(group)
        except BaseException as exc:   # whatever happens, no caller is left waiting
            for pending in group:
                if not pending.done:
                    pending.fail(exc)
            if not isinstance(exc, Exception):
                raise

    def _take(self) -> list:
        self._expire(time.monotonic())   # a caller whose deadline passed was told "not applied"
        with self._cv:
            group = self._queue[:self.max_group]
            del self._queue[:len(group)]
            return group

    def _earliest_deadline(self) -> float:
        with self._cv:
            return min((p.deadline for p in self._queue), default=time.monotonic())

    def _expire(self, now: float) -> None:
        with self._cv:
            for pending in [p for p in self._queue if p.deadline <= now]:
                self._queue.remove(pending)
                pending.fail(order_held())
            self._cv.notify_all()

    @property
    def waiting(self) -> int:
        return len(self._queue)


def order_held() -> WriteNotApplied:
    return WriteNotApplied("write: the write order was held for longer than CLIENT_TIMEOUT (by a transaction, "
                           "or a write that could not be decided); nothing was applied")


def pending_write(statement: Statement, request_id: str, timeout: float, resent: bool = True) -> PendingWrite:
    return PendingWrite(statement, request_id, time.monotonic() + timeout, resent=resent)


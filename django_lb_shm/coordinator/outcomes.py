"""What became of a write whose client stopped waiting for its answer.

A client that gets no answer to a write within CLIENT_TIMEOUT drops its connection
(the answer would otherwise be read as the next call's) and asks, on a new one, about
the write's request id (``OP_OUTCOME``).  The coordinator knows: while the write runs
(it waits up to :data:`SETTLE_WAIT` for it to end), for a while after it ended (the
last :data:`RECENT` outcomes, decided or refused, are kept), and for a decided write as
long as the journal holds its record.  An id that is none of these was never run: it
is *fenced*, so that if its request is read after all (a server thread far behind), it
is refused instead of being applied after its client was told "not applied".
"""
from __future__ import annotations

import threading
import time
from collections import OrderedDict, deque
from typing import Any, Callable, Optional

from django_lb_shm.errors import (
    WriteNotApplied,
    WriteOutcomeUnknown,
    from_dict,
    to_dict,
)
from django_lb_shm.wire.descriptors import Result
from django_lb_shm.wire.protocol import SETTLE_WAIT

RECENT = 1024       # outcomes kept: they are asked for within moments of the client's timeout
FENCED = 4096


class Fenced(WriteNotApplied):
    """A write whose client was already told that it was not applied: it is not run."""


class WriteOutcomes:
    """Running, recently ended and fenced write request ids of one coordinator process."""

    def __init__(self, find_request: Callable[[str], Any]):
        self._find_request = find_request      # the journal's: a decided write's record
        self._changed = threading.Condition()
        self._running: dict[str, int] = {}
        self._recent: "OrderedDict[str, tuple[bool, Any]]" = OrderedDict()
        self._fenced: "OrderedDict[str, None]" = OrderedDict()

    def run(self, request_id: str, action: Callable[[], Result]) -> Result:
        """``action()``, the write of ``request_id``, with its outcome kept for a later question."""
        if not request_id:
            return action()
        self._start(request_id)
        outcome: Optional[tuple[bool, Any]] = None
        try:
            result = action()
            outcome = (True, result)
            return result
        except Exception as exc:
            outcome = (False, to_dict(exc))
            raise
        finally:
            self._end(request_id, outcome)

    def settle(self, request_id: str, wait: float) -> Result:
        """The outcome of write ``request_id``: its result, or its error raised.

        WriteOutcomeUnknown when it still runs after ``wait`` seconds; WriteNotApplied
        when it never ran (it never will: it is fenced).
        """
        deadline = time.monotonic() + wait
        with self._changed:
            while request_id in self._running:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise WriteOutcomeUnknown(
                        f"write request {request_id} got no answer within CLIENT_TIMEOUT and was still running "
                        f"{wait:.1f} s later; it will be applied on every copy or on none"
                    )
                self._changed.wait(remaining)
            outcome = self._recent.get(request_id)
            done = None
            if outcome is None:
                done = self._find_request(request_id)
                if done is None:
                    self._fence(request_id)
        if outcome is not None:
            ok, value = outcome
            if ok:
                return value
            raise from_dict(value)
        if done is None:
            raise WriteNotApplied(f"write request {request_id} was not applied: the coordinator never ran it")
        if done.void:
            raise WriteNotApplied(f"write #{done.seq} (request {request_id}) was refused at COMMIT; "
                                  "it was applied nowhere")
        return done.result

    # -- bookkeeping ---------------------------------------------------------------------
    def _start(self, request_id: str) -> None:
        with self._changed:
            if request_id in self._fenced:
                raise Fenced(f"write request {request_id} was not run: its client stopped waiting for it "
                             "and was told it was not applied")
            self._running[request_id] = self._running.get(request_id, 0) + 1

    def _end(self, request_id: str, outcome: Optional[tuple[bool, Any]]) -> None:
        with self._changed:
            left = self._running.pop(request_id) - 1
            if left:
                self._running[request_id] = left   # the same id sent again after a reconnect
            if outcome is not None:
                self._recent[request_id] = outcome
                if len(self._recent) > RECENT:
                    self._recent.popitem(last=False)
            self._changed.notify_all()

    def _fence(self, request_id: str) -> None:
        self._fenced[request_id] = None
        if len(self._fenced) > FENCED:
            self._fenced.popitem(last=False)


class TrimLag:
    """How far the journal may be trimmed so that ``settle`` never mistakes a trimmed record for
    a write that never ran.

    A client asks about a write at most CLIENT_TIMEOUT + CONNECT_TIMEOUT + SETTLE_WAIT after
    sending it; a decided write's record is kept that long (plus a margin) after every copy
    applied it, also across a coordinator restart: a new coordinator trims nothing before it
    has watched the copies for that long.
    """

    MARGIN = 5.0

    def __init__(self, client_timeout: float, connect_timeout: float):
        self.retain = client_timeout + connect_timeout + SETTLE_WAIT + self.MARGIN
        self._seen: "deque[tuple[float, int]]" = deque()   # (monotonic time, applied everywhere)

    def floor(self, applied_everywhere: int, now: Optional[float] = None) -> Optional[int]:
        """The sequence number the journal may be trimmed to now; None: nothing yet."""
        now = time.monotonic() if now is None else now
        self._seen.append((now, applied_everywhere))
        old_enough = now - self.retain
        while len(self._seen) > 1 and self._seen[1][0] <= old_enough:
            self._seen.popleft()
        seen_at, floor = self._seen[0]
        return min(floor, applied_everywhere) if seen_at <= old_enough else None

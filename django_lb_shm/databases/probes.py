"""Is a copy answering?  A probe: ``SELECT 1`` on a connection of its own, with a short bound.

A read or a write that runs long says nothing by itself: the query may be slow, or
the copy may have stopped answering (a SIGSTOPped server, a network black hole).
The probe tells them apart.  Each copy has one :class:`Prober`, with one thread and
one connection (PostgreSQL: opened with ``connect_timeout``), that runs one probe at
a time; whoever needs a verdict asks for one and shares the probe in flight.

Verdicts, reported once per probe to ``on_verdict(verdict, detail, at)``:

* ``ANSWERED`` -- the copy answered at ``at`` (monotonic);
* ``HUNG`` -- no answer within ``bound`` seconds (declared by whoever notices first:
  a caller of :meth:`Prober.check` or the coordinator's watch through :meth:`Prober.overdue`);
  the probe's connection is then cut, and a late answer is still reported as ANSWERED;
* ``FAILED`` -- a connection-level error, on a fresh connection too.
"""
from __future__ import annotations

import logging
import threading
import time
from typing import Any, Callable, Optional

logger = logging.getLogger("django_lb_shm.probes")

ANSWERED, HUNG, FAILED = "answered", "hung", "failed"


class Prober:
    def __init__(self, alias: str, bound: float, new_connection: Callable[[], Any],
                 on_verdict: Callable[[str, str, float], None]):
        self.alias = alias
        self.bound = bound
        self.new_connection = new_connection   # a db_thread.DbConnection, not yet open
        self.on_verdict = on_verdict
        self._cv = threading.Condition()
        self._conn: Any = None
        self._wanted = False
        self._started = 0.0       # monotonic start of the probe in flight (0: none)
        self._declared = False    # the probe in flight was declared hung
        self._stopped = False
        self._thread: Optional[threading.Thread] = None
        self.requested_at = 0.0
        self.answered_at = 0.0    # when the last probe answered
        self.silent_at = 0.0      # when the last probe was declared hung or failed
        self.silent_kind = ""     # which of the two

    # -- asking ----------------------------------------------------------------------------
    def request(self) -> None:
        """Start a probe unless one is in flight (never waits)."""
        with self._cv:
            if self._stopped:
                return
            self.requested_at = time.monotonic()
            if not self._started:
                self._wanted = True
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name=f"probe-{self.alias}", daemon=True)
                self._thread.start()
            self._cv.notify_all()

    def check(self, since: float) -> str:
        """The verdict of a probe that ends after ``since``; waits about ``bound`` at most."""
        self.request()
        while True:
            with self._cv:
                verdict = self._verdict_since(since)
                if verdict:
                    return verdict
                if not self._started and not self._wanted:
                    self._wanted = True   # the last probe ended before ``since``: another one
                    self._cv.notify_all()
                now = time.monotonic()
                if not self._started or now - self._started <= self.bound:
                    self._cv.wait(max(0.005, (self._started or now) + self.bound - now + 0.005))
                    continue
            self.overdue(time.monotonic())

    def silent_since(self, since: float) -> bool:
        """No answer since ``since``, and a probe said so (never waits)."""
        with self._cv:
            return self._verdict_since(since) in (HUNG, FAILED)

    def _verdict_since(self, since: float) -> str:
        if self.answered_at >= since:
            return ANSWERED
        if self.silent_at >= since:
            return self.silent_kind
        if self._stopped or (self._started and self._declared):
            return HUNG   # still no answer to the probe declared hung
        return ""

    def overdue(self, now: float) -> bool:
        """Declare the probe in flight hung if it has run past ``bound``: True the first time."""
        with self._cv:
            if not self._started or self._declared or now - self._started <= self.bound:
                return False
            self._declared = True
            self.silent_at, self.silent_kind = now, HUNG
            conn = self._conn
            self._cv.notify_all()
        if conn is not None:
            conn.interrupt()   # frees the probe's thread (PostgreSQL: the socket is shut down)
        self._report(HUNG, f"no answer to a probe within {self.bound:.2f} s", now)
        return True

    def stop(self) -> None:
        with self._cv:
            self._stopped = True
            self._cv.notify_all()

    # -- the probe's thread ---------------------------------------------------------------------
    def _run(self) -> None:
        while True:
            with self._cv:
                while not self._wanted and not self._stopped:
                    self._cv.wait()
                if self._stopped:
                    break
                self._wanted = False
                self._started, self._declared = time.monotonic(), False
            verdict, detail = self._probe_once()
            with self._cv:
                declared, now = self._declared, time.monotonic()
                self._started = 0.0
                if verdict == ANSWERED:
                    self.answered_at = now
                elif not declared:
                    self.silent_at, self.silent_kind = now, FAILED
                self._cv.notify_all()
            if verdict == ANSWERED or not declared:   # a hung probe cut by us is no news
                self._report(verdict, detail, now)
        self._close()

    def _probe_once(self) -> tuple[str, str]:
        fresh = self._conn is None
        for attempt in range(2):
            try:
                if self._conn is None:
                    conn = self.new_connection()
                    with self._cv:
                        self._conn = conn
                    conn.open()
                self._conn.run("SELECT 1")
                return ANSWERED, ""
            except Exception as exc:
                self._close()
                if self._declared or fresh or attempt:
                    return FAILED, f"{type(exc).__name__}: {exc}".strip()
                # an old connection may have been cut on its own: one more try on a fresh one
        return FAILED, ""   # pragma: no cover - the loop always returns

    def _close(self) -> None:
        with self._cv:
            conn, self._conn = self._conn, None
        if conn is not None:
            conn.close()

    def _report(self, verdict: str, detail: str, at: float) -> None:
        try:
            self.on_verdict(verdict, detail, at)
        except Exception:   # a verdict must never kill the probe's thread
            logger.exception("database %r: acting on a probe's verdict failed", self.alias)

"""The manager process's watchdog threads: what no request may be left waiting on.

:class:`ReaderWatch` acts on what app processes running zero-hop reads report in their
reader slots; :class:`HealthWatch` asks for the probes, cuts overdue reads and hung
statements, and ends a transaction that holds the write order idle.  Both act through the
:class:`RequestRouter` (coordinator/router.py); coordinator/process.py starts and stops them.
"""
from __future__ import annotations

import logging
import threading
import time
from typing import TYPE_CHECKING, Any, Optional

from django_lb_shm.periodic import PeriodicThread
from django_lb_shm.shm.state import DbState, Reader

if TYPE_CHECKING:
    from django_lb_shm.coordinator.router import RequestRouter

# The logger keeps the name it had before these modules moved into coordinator/: LOGGING settings may name it.
logger = logging.getLogger("django_lb_shm.coordinator")


class ReaderWatch(PeriodicThread):
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

    def __init__(self, coordinator: "RequestRouter", threads: list):
        super().__init__("reader-watch", self.POLL, logger)
        self.coordinator = coordinator
        self.shared = coordinator.shared
        self.threads = threads   # the live list: replaced database threads are seen
        self.seen = self._sums()   # what earlier coordinators already answered
        self.next_latency = 0.0
        self.probing: set = set()
        self._probing_lock = threading.Lock()

    def _sums(self) -> list[dict]:
        fields = (Reader.TIMEOUTS, Reader.FAILURES, Reader.LATENCY_SUM_MS, Reader.LATENCY_COUNT)
        return [{f: self.shared.reader_sum(i, f) for f in fields} for i in range(self.shared.n_databases)]

    def tick(self) -> None:
        self.run_once()

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


class HealthWatch(PeriodicThread):
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

    def __init__(self, coordinator: "RequestRouter"):
        super().__init__("health-watch", self.POLL, logger)
        self.coordinator = coordinator
        self.config = coordinator.config
        self._expiring: Optional[threading.Thread] = None

    def tick(self) -> None:
        self.run_once(time.monotonic())

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

"""Resync, the coordinator's side: ``ResyncDesk`` owns the state of a copy being refilled.

The command (``ops/resync.py``) copies on its own connections; see there for the steps.
"""
from __future__ import annotations

import logging
import queue
import socket
import threading
import time
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Optional

from django_lb_shm.coordinator.db_thread import (
    FinishResync,
    MarkResync,
)
from django_lb_shm.coordinator.journal import new_tag
from django_lb_shm.errors import ResyncError
from django_lb_shm.shm.state import DbState, Slot, pid_alive

if TYPE_CHECKING:   # for type hints only: not imported at run time
    from django_lb_shm.coordinator.sequencer import Sequencer
    from django_lb_shm.settings.config import LoadBalancerConfig

logger = logging.getLogger("django_lb_shm.resync")

LEASE = 30.0          # seconds without word from the command before its resync is abandoned
HEARTBEAT = 2.0       # how often the command gives word
STEP_TIMEOUT = 20.0   # the copy's thread must do a resync's step within this


# == the coordinator's side ==================================================================
@dataclass
class Lease:
    """One resync in progress, as the coordinator knows it."""

    alias: str
    nonce: int
    source: str
    pid: int
    host: str
    pin: int
    started: float = field(default_factory=time.time)
    seen: float = field(default_factory=time.monotonic)
    phase: str = "copy"          # copy -> replay -> verify
    progress: dict = field(default_factory=dict)

    @property
    def mark(self) -> int:
        return -self.nonce

    def describe(self) -> dict:
        info = {k: v for k, v in asdict(self).items() if k not in ("nonce", "seen")}
        info["silent_s"] = round(time.monotonic() - self.seen, 1)
        return info


class ResyncDesk:
    """Which copies are being resynced and by whom; every state change of a resync happens here."""

    def __init__(self, threads: list, sequencer: Sequencer, config: LoadBalancerConfig):
        self.threads = threads     # the coordinator's live list: a replaced thread is seen here too
        self.sequencer = sequencer
        self.config = config
        self.leases: dict[str, Lease] = {}
        self.lock = threading.RLock()

    # -- the calls -----------------------------------------------------------------------------
    def begin(self, alias: str, source: Optional[str], pid: int, host: str) -> dict:
        with self.lock:
            thread = self._thread(alias)
            self._refuse_a_live_resync(alias, pid, host)
            nonce = new_tag()
            with self.sequencer._ordered(f"resync of {alias!r}"):   # (no write half done on it as the leader)
                if thread.state not in (DbState.RUNNING, DbState.DIVERGED, DbState.NEW, DbState.RESYNCING):
                    raise ResyncError(f"{alias!r} is {thread.state.name}: a copy can be resynced when it is "
                                      "RUNNING, DIVERGED or NEW (a DOWN copy cannot be reached; wait for it)")
                origin = self._source(alias, source)
                lease = Lease(alias, nonce, origin.alias, pid, host, pin=origin.applied_seq)
                thread.resyncing = True
                thread.applied_seq = lease.pin      # its journal floor while RESYNCING
                self.sequencer.shared.set(thread.index, Slot.APPLIED_SEQ, lease.pin)
                thread.set_state(DbState.RESYNCING, f"resync from {origin.alias} by pid {pid} on {host}")
                self.leases[alias] = lease
            try:
                self._step(thread, _mark(lease.mark))
            except Exception as exc:
                # Its marker says what it is (marked or not): an ordinary recovery reads it again.
                self.leases.pop(alias, None)
                thread.resyncing = False
                thread.go_down(exc)
                raise ResyncError(f"could not start the resync of {alias!r}: {type(exc).__name__}: {exc}") from None
            logger.info("resync of %r from %r started by pid %d on %s (journal pinned at #%d)",
                        alias, origin.alias, pid, host, lease.pin)
            return {"nonce": nonce, "source": origin.alias, "pin": lease.pin}

    def progress(self, alias: str, nonce: int, progress: dict) -> dict:
        with self.lock:
            lease = self._lease(alias, nonce)
            lease.seen = time.monotonic()
            lease.progress = dict(progress)
            return {"state": self._thread(alias).state.name, "applied_seq": self._thread(alias).applied_seq,
                    "last_seq": self.sequencer.last_seq}

    def done(self, alias: str, nonce: int, seq: int, tag: int) -> dict:
        """The command committed the copy at ``(seq, mark)``: accept it and replay after ``seq``."""
        with self.lock:
            lease = self._lease(alias, nonce)
            thread = self._thread(alias)
            if thread.state != DbState.RESYNCING or lease.phase != "copy":
                raise ResyncError(f"{alias!r} is {thread.state.name}, not waiting for this resync's copy")
            if seq < lease.pin:
                self._leave_out(alias, f"the copy was taken at #{seq}, before the journal's pin #{lease.pin}")
                raise ResyncError(f"the copy of {alias!r} was taken at #{seq}, before #{lease.pin} "
                                  "(the source was behind): run the resync again")
            try:
                self._step(thread, lambda reply: FinishResync(seq, tag, lease.mark, reply))
            except Exception as exc:
                if thread.state == DbState.RESYNCING:
                    self._leave_out(alias, f"the copy could not be taken on ({exc})")
                else:
                    self.leases.pop(alias, None)
                raise ResyncError(f"{alias!r}: {exc}") from None
            lease.phase, lease.seen = "replay", time.monotonic()
            logger.info("resync of %r: copy at #%d accepted; replaying the journal after it", alias, seq)
            return {"state": thread.state.name}

    def end(self, alias: str, nonce: int) -> None:
        with self.lock:
            self._lease(alias, nonce)
            self.leases.pop(alias, None)
            logger.info("resync of %r finished", alias)

    def abort(self, alias: str, nonce: int, reason: str) -> None:
        """The command failed: the copy is left out of reads until a resync completes."""
        with self.lock:
            lease = self._lease(alias, nonce)
            thread = self._thread(alias)
            if lease.phase != "copy":   # loaded and caught up, but found wrong: marked again first
                with self.sequencer._ordered(f"resync of {alias!r}"):
                    thread.resyncing = True
                    thread.set_state(DbState.RESYNCING, reason)
                try:
                    self._step(thread, _mark(lease.mark))
                except Exception as exc:
                    logger.warning("resync of %r: could not mark it again (%s)", alias, exc)
            self._leave_out(alias, f"resync failed: {reason}")

    def expire(self) -> None:
        """Called by the coordinator's main loop: abandon resyncs whose command has gone silent
        (never waits: a resync step may hold the desk for a while, the main loop must beat)."""
        now = time.monotonic()
        if not self.lock.acquire(blocking=False):
            return
        try:
            for alias, lease in list(self.leases.items()):
                if now - lease.seen <= LEASE:
                    continue
                if lease.phase == "copy":
                    self._leave_out(alias, f"resync abandoned: no word from the resync command (pid {lease.pid} "
                                           f"on {lease.host}) for {LEASE:.0f} s")
                else:
                    self.leases.pop(alias, None)
        finally:
            self.lock.release()

    def describe(self, alias: str) -> Optional[dict]:
        lease = self.leases.get(alias)
        return lease.describe() if lease else None

    # -- helpers -----------------------------------------------------------------------------
    def _thread(self, alias: str) -> Any:
        for thread in self.threads:
            if thread.alias == alias:
                return thread
        raise ResyncError(f"{alias!r} is not in LOAD_BALANCER['DATABASES'] of this coordinator "
                          f"({', '.join(t.alias for t in self.threads)}); add it and send SIGHUP first")

    def _lease(self, alias: str, nonce: int) -> Lease:
        lease = self.leases.get(alias)
        if lease is None or lease.nonce != nonce:
            raise ResyncError(f"the coordinator holds no such resync of {alias!r} (it restarted, or the resync "
                              "was abandoned or taken over meanwhile): run the resync again")
        return lease

    def _refuse_a_live_resync(self, alias: str, pid: int, host: str) -> None:
        lease = self.leases.get(alias)
        if lease is None or (lease.pid == pid and lease.host == host):
            return
        silent = time.monotonic() - lease.seen
        gone = lease.host == socket.gethostname() and not pid_alive(lease.pid)
        if not gone and silent <= LEASE:
            raise ResyncError(f"a resync of {alias!r} is running (pid {lease.pid} on {lease.host}, from "
                              f"{lease.source}, last word {silent:.0f} s ago); wait for it, or stop it first")
        logger.warning("resync of %r: taking over from pid %d on %s (%s)", alias, lease.pid, lease.host,
                       "no longer running" if gone else f"silent for {silent:.0f} s")
        self.leases.pop(alias, None)

    def _source(self, alias: str, wanted: Optional[str]) -> Any:
        """``wanted``, or a RUNNING copy other than the leader when there is one (held: the write order)."""
        if wanted:
            source = self._thread(wanted)
            if source.alias == alias:
                raise ResyncError(f"{alias!r} cannot be resynced from itself")
            if source.state != DbState.RUNNING:
                raise ResyncError(f"the source {wanted!r} is {source.state.name}, not RUNNING")
            return source
        # In the leader's order of preference: the first one leads (from now on, if ``alias`` led).
        running = [t for t in self.sequencer.leader_preference() if t.state == DbState.RUNNING and t.alias != alias]
        if not running:
            raise ResyncError(f"no RUNNING copy other than {alias!r} to resync it from")
        return running[1] if len(running) > 1 else running[0]

    def _step(self, thread: Any, make: Callable[["queue.SimpleQueue"], Any]) -> None:
        """Have the copy's own thread do ``make(reply)``, after the work queued before it."""
        reply: "queue.SimpleQueue" = queue.SimpleQueue()
        thread.submit(make(reply))
        try:
            outcome = reply.get(timeout=STEP_TIMEOUT)
        except queue.Empty:
            raise ResyncError(f"the thread of {thread.alias!r} did not answer within {STEP_TIMEOUT:.0f} s") from None
        if outcome is not None:
            raise outcome

    def _leave_out(self, alias: str, reason: str) -> None:
        """NEW: no reads, no writes, no journal kept for it -- a resync is its next step."""
        self.leases.pop(alias, None)
        thread = self._thread(alias)
        thread.set_state(DbState.NEW, reason)   # RESYNCING before: not the leader, nothing applied there
        thread.resyncing = False
        logger.warning("%r left out of reads until a resync completes: %s", alias, reason)


def _mark(tag: int) -> Callable[["queue.SimpleQueue"], Any]:
    return lambda reply: MarkResync(tag, reply)


# == the command's side ======================================================================

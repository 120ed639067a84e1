"""Connecting to the coordinator: wait only when something will answer.

When nothing answers at ADDRESS, a query used to retry for CONNECT_TIMEOUT before
``CoordinatorUnavailable``.  On the coordinator's host the app can tell at once
whether waiting is worth it, from what the supervisor leaves in shared memory
(``shm.state``: the segment, the supervisor's pid and start time, the
coordinator's state and heartbeat):

* no segment for a local address, or its supervisor is gone: nothing will answer,
  fail now (``CoordinatorDown``);
* a live supervisor: it is (re)starting the coordinator, wait up to CONNECT_TIMEOUT;
* no segment in view for an address of another host, another user's segment or
  another layout: no knowledge, wait as before.

After a wait that fails, the process's breaker opens: its queries fail at once
until the coordinator is seen again, by a background probe (every WAIT_TIME) or,
on its host, by its heartbeat in shared memory (the next query then tries once).
"""
from __future__ import annotations

import enum
import functools
import glob
import random
import threading
import time
import weakref
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable

import psutil

from django_lb_shm.errors import (
    AuthenticationFailed,
    CoordinatorDown,
    CoordinatorUnavailable,
)
from django_lb_shm.shm.state import (
    CoordinatorState,
    Header,
    SharedState,
    segment_name,
    segment_path,
)

if TYPE_CHECKING:   # for type hints only: not imported at run time
    from django_lb_shm.settings.config import LoadBalancerConfig


class Verdict(enum.Enum):
    GONE = "gone"              # nothing will answer: fail now
    RESTARTING = "restarting"  # a live supervisor: wait for its coordinator
    UNKNOWN = "unknown"        # nothing known on this host: wait, as before


@dataclass(frozen=True)
class HostView:
    """What this host's shared memory says about the coordinator of an address."""

    verdict: Verdict
    why: str = ""
    ready: bool = False        # the coordinator said READY
    heartbeat: float = 0.0     # its last beat (monotonic, as every process on the host reads it)


def host_view(address: Any) -> HostView:
    """Read the segment of ``address`` on this host (tens of microseconds: failed connects only)."""
    try:
        shared = SharedState.attach_untracked(segment_name(address))
    except FileNotFoundError:
        if not _is_local(address) or _other_users_segment(address):
            return HostView(Verdict.UNKNOWN)   # the coordinator may run on another host, or as another user
        return HostView(Verdict.GONE, "no djangoloadbalancer supervisor serves it on this host")
    except (OSError, RuntimeError, ValueError):
        return HostView(Verdict.UNKNOWN)   # another OS user's segment, or another layout version
    try:
        pid = int(shared.header(Header.SUPERVISOR_PID))
        started_at = shared.header(Header.SUPERVISOR_STARTED_AT)
        ready = shared.header(Header.COORDINATOR_STATE) == CoordinatorState.READY
        heartbeat = shared.header(Header.HEARTBEAT)
    finally:
        shared.close()
    if not supervisor_alive(pid, started_at):
        return HostView(Verdict.GONE, f"the supervisor that served it on this host (pid {pid}) is gone")
    return HostView(Verdict.RESTARTING, ready=ready, heartbeat=heartbeat)


def _other_users_segment(address: Any) -> bool:
    """A segment of this address made by another OS user: its coordinator may be restarting.

    Only its existence is looked at; its content is another user's and is never read.
    """
    own = segment_name(address)
    suffix = own[own.index("_", len("django_lb_shm_")):]
    return any(not name.endswith(own) for name in glob.glob(segment_path(f"django_lb_shm_*{suffix}")))


@functools.lru_cache(maxsize=64)
def _is_local(address: Any) -> bool:
    """Once per address: a HOST name costs a DNS lookup, and an open breaker asks on every query."""
    return address.is_loopback


def supervisor_alive(pid: int, started_at: float) -> bool:
    """``pid`` runs and is the process that created the segment (not a later one given the same pid)."""
    if pid <= 0:
        return False
    try:
        process = psutil.Process(pid)
        return process.create_time() <= started_at + 1.0 and process.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False
    except psutil.AccessDenied:
        return True


class ConnectBreaker:
    """One client's connects: fail fast when nothing will answer, then stay open until it does."""

    def __init__(self, config: LoadBalancerConfig):
        self.address = config.address
        self.wait_time = config.wait_time
        self.connect_timeout = config.connect_timeout
        self.opened_at = 0.0   # monotonic; 0: closed
        self.tried_at = 0.0    # start of the last failed attempt
        self.reason = ""
        self._lock = threading.Lock()
        self._prober: Any = None

    @property
    def is_open(self) -> bool:
        return self.opened_at > 0

    def connect(self, attempt: Callable[[], Any], deadline: float) -> Any:
        """``attempt()`` (one connect) until it succeeds, nothing will answer, or ``deadline``."""
        if self.is_open:
            return self._connect_while_open(attempt)
        delay = 0.05
        while True:
            tried_at = time.monotonic()
            try:
                return attempt()
            except AuthenticationFailed:
                raise
            except CoordinatorUnavailable as exc:
                view = host_view(self.address)
                remaining = deadline - time.monotonic()
                if view.verdict is Verdict.GONE or remaining <= 0:
                    raise self._open(str(exc), view, tried_at, attempt) from None
                time.sleep(min(delay * (0.5 + random.random()), remaining))
                delay = min(delay * 2, 1.0)

    def _connect_while_open(self, attempt: Callable[[], Any]) -> Any:
        """Fail at once, unless this host shows the coordinator beating since the last try."""
        view = host_view(self.address)
        if not (view.ready and view.heartbeat > self.tried_at):
            raise self.error()
        tried_at = time.monotonic()
        try:
            proxy = attempt()
        except AuthenticationFailed:
            raise
        except CoordinatorUnavailable:
            self.tried_at = tried_at
            raise self.error() from None
        self.close()
        return proxy

    def _open(self, message: str, view: HostView, tried_at: float, attempt: Callable[[], Any]) -> CoordinatorDown:
        if view.why:
            message = message.replace("; start it with", f"; {view.why}; start it with", 1)
            if view.why not in message:
                message = f"{message} ({view.why})"
        with self._lock:
            self.reason = message
            self.tried_at = tried_at
            self.opened_at = self.opened_at or time.monotonic()
            self._start_probe(attempt)
        return CoordinatorDown(message)

    def close(self) -> None:
        with self._lock:
            self.opened_at = 0.0

    def error(self) -> CoordinatorDown:
        return CoordinatorDown(
            f"{self.reason} [not retried: the last attempt, {time.monotonic() - self.tried_at:.1f} s ago, failed; "
            f"this process tries again every WAIT_TIME ({self.wait_time:g} s)]"
        )

    # -- the background probe ---------------------------------------------------------------
    def _start_probe(self, attempt: Callable[[], Any]) -> None:
        if self._prober is not None and self._prober.is_alive():
            return
        # Weak references: a client dropped meanwhile (other settings) ends its probe.
        attempt_ref = weakref.WeakMethod(attempt) if hasattr(attempt, "__self__") else (lambda: attempt)
        self._prober = threading.Thread(
            target=_probe, args=(weakref.ref(self), attempt_ref),
            name="django_lb_shm-connect-probe", daemon=True,
        )
        self._prober.start()

    def probe_once(self, attempt: Callable[[], Any]) -> bool:
        """One connect and ping; True (and closed) when the coordinator answers."""
        tried_at = time.monotonic()
        try:
            proxy = attempt()
            try:
                proxy.call("ping", (), self.connect_timeout)
            finally:
                proxy.drop_connection()
        except Exception:   # not back yet (or not ours: the next query says why)
            self.tried_at = max(self.tried_at, tried_at)
            return False
        self.close()
        return True


def _probe(breaker_ref: "weakref.ref[ConnectBreaker]", attempt_ref: Any) -> None:
    while True:
        breaker = breaker_ref()
        if breaker is None or not breaker.is_open:
            return
        interval = breaker.wait_time
        del breaker
        time.sleep(interval)
        breaker, attempt = breaker_ref(), attempt_ref()
        if breaker is None or attempt is None or not breaker.is_open:
            return
        if breaker.probe_once(attempt):
            return
        del breaker, attempt

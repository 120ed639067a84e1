"""The supervisor: the ``djangoloadbalancer`` foreground process.

It owns the shared-memory segment, spawns the manager process (the
coordinator) through ``multiprocessing``, watches it with psutil and the
heartbeats in shared memory, restarts it with backoff after a crash, and
halts instead when it failed to boot.  With LOAD_BALANCER['METRICS'] it also serves
Prometheus metrics read from the segment (``supervisor/metrics.py``), up while the coordinator
restarts.  A taken ADDRESS is a boot error only at
the first boot: after it, another process may have grabbed the port while the
coordinator restarted, and the supervisor tries again with the backoff.  Signal
handlers only record the signal; the main loop acts on it (stop: ask with
SIGTERM, wait, then force).
"""
from __future__ import annotations

import logging
import multiprocessing
import os
import queue
import signal
import sys
import time
from typing import TYPE_CHECKING, Any, Optional

from django_lb_shm.coordinator import process as coordinator_process
from django_lb_shm.databases.failures import address_holder, process_vitals
from django_lb_shm.shm.state import (
    CoordinatorState,
    DbState,
    Header,
    SharedState,
    Slot,
    segment_name,
)
from django_lb_shm.supervisor.metrics import MetricsServer, serve_metrics
from django_lb_shm.wire.exit_codes import (
    COORDINATOR_EXITS,
    EXIT_ADDRESS_IN_USE,
    EXIT_BOOT_ERROR,
    EXIT_CONFIG_ERROR,
    EXIT_OK,
    EXIT_RELOAD,
)
from django_lb_shm.wire.protocol import STOP_WITH_PARENT_ENV

if TYPE_CHECKING:   # for type hints only: not imported at run time
    from django_lb_shm.settings.config import LoadBalancerConfig

logger = logging.getLogger("django_lb_shm.supervisor")

BOOT_TIMEOUT = 60.0
MAX_BACKOFF = 30.0
HEALTHY_AFTER = 60.0   # a coordinator up this long resets the backoff


STARTED_OVER_ENV = "DJANGO_LB_SHM_STARTED_OVER"   # set across start_over(): a second request is a boot error


def start_over() -> None:
    """LOAD_BALANCER['DATABASES'] changed (settings + SIGHUP): this process's settings and shared-memory
    layout are the old ones, so it runs its own command line again (same pid) to read the new ones."""
    logger.info("LOAD_BALANCER['DATABASES'] changed; the supervisor starts over (pid %d) with the new settings",
                os.getpid())
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os.environ[STARTED_OVER_ENV] = "1"
    os.execv(sys.executable, [sys.executable] + sys.orig_argv[1:])


def mp_context() -> Any:
    """Close inherited database connections, then spawn (no forked threads or sockets)."""
    from django.db import connections

    connections.close_all()
    return multiprocessing.get_context("spawn")


class Supervisor:
    def __init__(self, config: LoadBalancerConfig, settings_module: Optional[str]):
        self.config = config
        self.settings_module = settings_module
        self.signals: "queue.SimpleQueue[int]" = queue.SimpleQueue()
        self.process: Any = None
        self.shared: Optional[SharedState] = None
        self.metrics: Optional[MetricsServer] = None
        self.restarts = 0
        self.backoff = 0.5
        self.stopping = False
        self.stuck_threads: set[str] = set()

    # -- life cycle ---------------------------------------------------------------------
    def run(self) -> int:
        self._install_signals()
        self.shared = SharedState.create(segment_name(self.config.address), len(self.config.databases),
                                         aliases=self.config.databases)
        code = EXIT_BOOT_ERROR
        try:
            self.metrics = serve_metrics(self.config, self.shared)
            code = self._boot()
            if code is None:
                code = self._loop()
            return code
        finally:
            self._stop_coordinator(force=False)
            if self.metrics is not None:
                self.metrics.stop()   # before the segment it reads is unmapped
            if code == EXIT_RELOAD:
                self.shared.hand_over()
                start_over()
            self.shared.unlink()

    def _install_signals(self) -> None:
        for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(signum, lambda s, _frame: self.signals.put(s))

    def _spawn(self) -> None:
        ctx = mp_context()
        self.process = ctx.Process(
            target=coordinator_process.main,
            args=(self.settings_module, self.shared.shm.name, os.getpid(), list(sys.path)),
            name="django_lb_shm-coordinator",
        )
        self.shared.set_header(Header.COORDINATOR_STATE, CoordinatorState.STARTING)
        self.shared.set_header(Header.HEARTBEAT, 0)
        self.process.start()
        self.started_at = time.monotonic()

    def _boot(self) -> Optional[int]:
        """Spawn and wait for READY; an exit code if the coordinator cannot boot."""
        self._spawn()
        if self._wait_ready():
            self._log_ready()
            return None
        if self.stopping:
            return EXIT_OK
        code = self.process.exitcode
        if code == EXIT_RELOAD and not os.environ.pop(STARTED_OVER_ENV, ""):
            return code
        if code == EXIT_ADDRESS_IN_USE:
            reason = self._address_in_use()
        elif code is not None:
            reason = COORDINATOR_EXITS.get(code, f"exit code {code}")
        else:
            reason = "no READY within the boot timeout"
        logger.error("the coordinator failed to boot (%s); not restarting", reason)
        return code if code in (EXIT_CONFIG_ERROR, EXIT_BOOT_ERROR) else EXIT_BOOT_ERROR

    def _wait_ready(self) -> bool:
        deadline = time.monotonic() + BOOT_TIMEOUT
        while time.monotonic() < deadline:
            if self.shared.header(Header.COORDINATOR_STATE) == CoordinatorState.READY:
                return True
            if not self.process.is_alive():
                return False
            if self._take_signal(0.05) in (signal.SIGTERM, signal.SIGINT):
                self.stopping = True
                return False
        return False

    def _log_ready(self) -> None:
        os.environ.pop(STARTED_OVER_ENV, None)   # a later change of the databases may start over again
        names = self.config.databases
        states = ", ".join(f"{name} ({self.shared.state(i).name})" for i, name in enumerate(names))
        logger.info("django_lb_shm ready at %s (supervisor pid %d, coordinator pid %d); databases: %s",
                    self.config.address, os.getpid(), self.process.pid, states)

    # -- the main loop ---------------------------------------------------------------------
    def _loop(self) -> int:
        while True:
            signum = self._take_signal(1.0)
            if signum is None and self._parent_gone():
                logger.info("the process that started this load balancer (LoadBalancerTestRunner) is gone; stopping")
                signum = signal.SIGTERM
            if signum in (signal.SIGTERM, signal.SIGINT):
                logger.info("received %s; stopping", signal.Signals(signum).name)
                self.stopping = True
                return EXIT_OK
            if signum == signal.SIGHUP:
                logger.info("received SIGHUP; restarting the coordinator")
                self._restart("SIGHUP", graceful=True)
                continue
            problem = self._health_problem()
            oversized = None if problem else self._over_rss_limit()
            if oversized:
                self._recycle(oversized)
                continue
            if problem:
                code = self.process.exitcode
                if code in (EXIT_CONFIG_ERROR, EXIT_BOOT_ERROR):
                    logger.error("the coordinator exited with %s; not restarting", COORDINATOR_EXITS[code])
                    return code
                if code == EXIT_RELOAD:
                    return code
                if code == EXIT_ADDRESS_IN_USE:
                    problem = f"the coordinator (pid {self.process.pid}) cannot serve: {self._address_in_use()}"
                self._restart(problem, graceful=False)

    def _address_in_use(self) -> str:
        address = self.config.address
        what = f"the socket {address.path}" if address.path else f"port {address.port} ({address})"
        return f"{what} is in use{address_holder(address)}"

    @staticmethod
    def _parent_gone() -> bool:
        parent = os.environ.get(STOP_WITH_PARENT_ENV)
        return bool(parent) and os.getppid() != int(parent)

    def _take_signal(self, timeout: float) -> Optional[int]:
        try:
            return self.signals.get(timeout=timeout)
        except queue.Empty:
            return None

    def _health_problem(self) -> Optional[str]:
        if not self.process.is_alive():
            return f"the coordinator (pid {self.process.pid}) exited with code {self.process.exitcode}"
        now = time.monotonic()
        heartbeat = self.shared.header(Header.HEARTBEAT)
        if heartbeat and now - heartbeat > self.config.heartbeat_timeout:
            return f"the coordinator (pid {self.process.pid}) has not beaten for {now - heartbeat:.1f} s"
        vitals = process_vitals(self.process.pid)
        if not vitals["alive"]:
            return f"the coordinator (pid {self.process.pid}) is gone ({vitals.get('status', 'no process')})"
        self._report_stuck_threads(now)
        if now - self.started_at > HEALTHY_AFTER:
            self.backoff = 0.5
        return None

    def _over_rss_limit(self) -> Optional[str]:
        if not self.config.max_rss_mb or not self.process.is_alive():
            return None
        vitals = process_vitals(self.process.pid)
        if vitals["alive"] and vitals["rss_mb"] > self.config.max_rss_mb:
            return f"the coordinator uses {vitals['rss_mb']} MB, over MAX_RSS_MB {self.config.max_rss_mb:g}"
        return None

    def _report_stuck_threads(self, now: float) -> None:
        """Once per stall: a database thread stuck in a query (the coordinator replaces dead ones)."""
        for i, name in enumerate(self.config.databases):
            beat = self.shared.get(i, Slot.HEARTBEAT)
            stuck = bool(beat) and now - beat > self.config.heartbeat_timeout and self.shared.state(i) != DbState.STOPPED
            if stuck and name not in self.stuck_threads:
                self.stuck_threads.add(name)
                logger.warning("database thread %r has not beaten for %.1f s (stuck in a query?)", name, now - beat)
            elif not stuck and name in self.stuck_threads:
                self.stuck_threads.discard(name)
                logger.info("database thread %r is beating again", name)

    def _recycle(self, reason: str) -> None:
        """Over MAX_RSS_MB: a planned restart, like SIGHUP (requests in flight finish), except
        that one that comes again within HEALTHY_AFTER of the last start waits the backoff."""
        again_soon = time.monotonic() - self.started_at < HEALTHY_AFTER
        logger.warning("%s; recycling it%s", reason, f" in {self.backoff:.1f} s" if again_soon else "")
        if again_soon:
            if self._take_signal(self.backoff) in (signal.SIGTERM, signal.SIGINT):
                self.stopping = True
                self.signals.put(signal.SIGTERM)
                return
            self.backoff = min(self.backoff * 2, MAX_BACKOFF)
        self._restart(reason, graceful=True)

    def _restart(self, reason: str, graceful: bool) -> None:
        if not graceful:
            logger.error("%s; restarting it in %.1f s", reason, self.backoff)
        self._stop_coordinator(force=not graceful)
        if self.stopping:
            return   # SIGTERM/SIGINT arrived while it stopped: do not start another one
        if not graceful:
            if self._take_signal(self.backoff) in (signal.SIGTERM, signal.SIGINT):
                self.stopping = True
                self.signals.put(signal.SIGTERM)
                return
            self.backoff = min(self.backoff * 2, MAX_BACKOFF)
        self.restarts += 1
        self.shared.set_header(Header.RESTARTS, self.restarts)
        self._spawn()
        if self._wait_ready():
            self._log_ready()

    def _stop_coordinator(self, force: bool) -> None:
        """Ask (SIGTERM), wait up to GRACEFUL_TIMEOUT, then force (SIGKILL); a second signal forces."""
        process = self.process
        if process is None or process.pid is None or not process.is_alive():
            if process is not None:
                process.join(0.1)
            return
        if force:
            process.kill()
        else:
            process.terminate()
        deadline = time.monotonic() + self.config.graceful_timeout + 2
        stop_requested = False
        while process.is_alive() and time.monotonic() < deadline:
            if self._take_signal(0.1) in (signal.SIGTERM, signal.SIGINT):
                if not self.stopping:
                    # The first stop signal, during a restart: let this stop finish, start no other.
                    logger.info("stop requested during a restart; not starting another coordinator")
                    self.stopping = stop_requested = True
                    continue
                logger.warning("second signal: forcing the coordinator to stop")
                break
        if process.is_alive():
            process.kill()
        process.join(5)
        if stop_requested:
            self.signals.put(signal.SIGTERM)   # for the main loop, which then exits

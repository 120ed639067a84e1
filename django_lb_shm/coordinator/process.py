"""The manager process: its life cycle.

Spawned by the supervisor (``main``).  It serves the ``coordinator`` object
(coordinator/router.py) at ADDRESS through its Manager server (coordinator/server.py), starts
one :class:`DbThread` per database, the sequencer and the watchdog threads
(coordinator/watchers.py), writes its vitals into shared memory, trims the journal and
replaces dead database threads.  It exits when told (SIGTERM) or when its
supervisor is gone, after answering what is in flight.
"""
from __future__ import annotations

import ctypes
import errno
import logging
import os
import signal
import sqlite3
import sys
import threading
import time
from typing import Any, Optional

import django

from django_lb_shm.balancing import build_read_algorithm
from django_lb_shm.coordinator.db_thread import DbConnection, DbThread, Hub
from django_lb_shm.coordinator.journal import Journal
from django_lb_shm.coordinator.outcomes import TrimLag
from django_lb_shm.coordinator.router import RequestRouter
from django_lb_shm.coordinator.sequencer import Sequencer
from django_lb_shm.coordinator.server import ManagerServer
from django_lb_shm.coordinator.watchers import HealthWatch, ReaderWatch
from django_lb_shm.databases.ownership import CLAIM_WAIT
from django_lb_shm.databases.schema import SchemaWatch, load_balanced_apps
from django_lb_shm.errors import ConfigurationError, DatabaseOwnedElsewhere
from django_lb_shm.ops.logging_setup import configure_logging
from django_lb_shm.settings.config import LoadBalancerConfig, get_config
from django_lb_shm.settings.overrides import apply_runtime_settings_from_environment
from django_lb_shm.shm.state import (
    CoordinatorState,
    DbState,
    Header,
    SharedState,
    Slot,
    databases_key,
)
from django_lb_shm.wire.exit_codes import (
    EXIT_ADDRESS_IN_USE,
    EXIT_BOOT_ERROR,
    EXIT_CONFIG_ERROR,
    EXIT_OK,
    EXIT_ORPHANED,
    EXIT_RELOAD,
    EXIT_RESTART,
)
from django_lb_shm.wire.protocol import EXPOSED, TYPEID

# The logger keeps the name it had before these modules moved into coordinator/: LOGGING settings may name it.
logger = logging.getLogger("django_lb_shm.coordinator")

TICK = 0.5
TRIM_EVERY = 5.0
BOOT_CONNECT_WAIT = 10.0


class CoordinatorProcess:
    """Boot, serve, watch the parent, stop: the life of the manager process."""

    def __init__(self, config: LoadBalancerConfig, shared: SharedState, supervisor_pid: int):
        self.config = config
        self.shared = shared
        self.supervisor_pid = supervisor_pid
        self.stop_requested = threading.Event()
        self.exit_code = EXIT_OK

    def boot(self) -> None:
        # Bind first: a taken port is a boot error before any database is touched.
        address = self.config.address
        registry = {TYPEID: (lambda: self.coordinator, EXPOSED, None, None)}
        self.server = ManagerServer(registry, address.tuple, address.authkey, self, address.local_socket_path)
        self.algorithm = build_read_algorithm(self.config, self.shared)
        self.schema = SchemaWatch(self.config.databases, load_balanced_apps(), self.config.wait_time,
                                  connect=lambda alias: DbConnection(alias, self.config.statement_timeout),
                                  readable=self._readable_copies, on_change=self._schema_changed)
        self.hub = Hub(self.shared, self.config, self._catch_up_from, self._replay_after, self._notify_applied,
                       probe_interval=self.algorithm.probe_interval, schema=self.schema,
                       joined=self._joined)
        self.threads = [DbThread(i, alias, self.hub) for i, alias in enumerate(self.config.databases)]
        # Before the journal is opened or any database replayed.
        self._claim_databases()
        # Before any copy serves: a copy behind another never becomes RUNNING, not even for a moment.
        self.schema.report({t.alias: t.boot_migrations for t in self.threads if t.boot_migrations is not None})
        try:
            self.journal = Journal(self.config.journal_dir, fsync=self.config.journal_fsync,
                                   import_from=self.config.legacy_journal_dirs).open()
        except (OSError, sqlite3.Error) as exc:
            raise OSError(f"LOAD_BALANCER['JOURNAL_DIR'] ({self.config.journal_dir}) cannot be used: {exc}") from exc
        self.trim_lag = TrimLag(self.config.client_timeout, self.config.connect_timeout)
        self.sequencer = Sequencer(self.threads, self.journal, self.shared, self.config)
        self.sequencer.fail_stop = self._restart_to_read_journal
        self.sequencer.settle_history({t.alias: t.boot_marker for t in self.threads})
        self.shared.set_header(Header.JOURNAL_ENTRIES, self.journal.entry_count)
        self.shared.set_header(Header.JOURNAL_BYTES, self.journal.size_bytes)
        for thread in self.threads:
            self.shared.set_state(thread.index, DbState.STARTING)
            thread.start()
        self._wait_for_databases()
        self.coordinator = RequestRouter(self.config, self.shared, self.threads, self.sequencer, self.algorithm,
                                       schema=self.schema)
        self.reader_watch = ReaderWatch(self.coordinator, self.threads)
        self.reader_watch.start()
        self.health_watch = HealthWatch(self.coordinator)
        self.health_watch.start()
        self.schema.start()
        self.server.serve_forever_on_all()

    def client_connected(self, peer: str) -> None:
        self.coordinator.client_connected(peer)

    def client_gone(self) -> None:
        self.coordinator.client_gone()

    def _catch_up_from(self, alias: str, read_marker: Any) -> str:
        return self.sequencer.catch_up_from(alias, read_marker)

    def _replay_after(self, seq: int) -> Any:
        return self.sequencer.replay_after(seq)

    def _restart_to_read_journal(self) -> None:
        self.exit_code = EXIT_RESTART
        self.stop_requested.set()

    def _notify_applied(self) -> None:
        self.sequencer.notify_applied()

    def _readable_copies(self) -> list[str]:
        """The copies whose migrations are worth reading now (a DOWN one is read when it is back)."""
        gone = (DbState.DOWN, DbState.STARTING, DbState.STOPPED)
        return [t.alias for t in self.threads if t.state not in gone]

    def _schema_changed(self, aliases: set) -> None:
        for thread in self.threads:
            if thread.alias in aliases:
                thread.wake()

    def _joined(self, alias: str) -> None:
        self.sequencer.joined(alias)

    def _wait_for_databases(self) -> None:
        deadline = time.monotonic() + BOOT_CONNECT_WAIT
        while time.monotonic() < deadline:
            if all(t.state != DbState.STARTING and t.state != DbState.RECOVERING for t in self.threads):
                return
            time.sleep(0.02)

    def _claim_databases(self) -> None:
        """Two coordinators on the same databases would number writes twice: the second one does not start."""
        owned = []
        deadline = time.monotonic() + CLAIM_WAIT   # one wait for all: a second coordinator fails within moments
        for thread in self.threads:
            try:
                thread.claim_at_boot(deadline)
            except DatabaseOwnedElsewhere as exc:
                owned.append(str(exc))
        if owned:
            raise DatabaseOwnedElsewhere("; ".join(owned))

    def run(self) -> int:
        self._install_signals()
        self.shared.set_header(Header.COORDINATOR_PID, os.getpid())
        self.shared.set_header(Header.STARTED_AT, time.time())
        self.shared.set_header(Header.COORDINATOR_STATE, CoordinatorState.STARTING)
        try:
            self.boot()
        except Exception as exc:
            serving = getattr(self, "server", None) is not None
            logger.error("coordinator cannot %s: %s: %s", "boot" if serving else f"serve at {self.config.address}",
                         type(exc).__name__, exc)
            if serving:
                self.server.close()
            elif isinstance(exc, OSError) and exc.errno == errno.EADDRINUSE:
                return EXIT_ADDRESS_IN_USE
            return EXIT_BOOT_ERROR
        self.shared.set_header(Header.HEARTBEAT, time.monotonic())  # beating from READY on
        self.shared.set_header(Header.COORDINATOR_STATE, CoordinatorState.READY)
        logger.info("coordinator pid %d serving %s for databases %s", os.getpid(), self.config.address,
                    ", ".join(f"{t.alias} ({t.state.name})" for t in self.threads))
        self._loop()
        self._shutdown()
        return self.exit_code

    def _install_signals(self) -> None:
        signal.signal(signal.SIGTERM, lambda signum, frame: self.stop_requested.set())
        # Ctrl-C reaches the whole process group; the supervisor decides when we stop.
        signal.signal(signal.SIGINT, signal.SIG_IGN)

    def _loop(self) -> None:
        next_trim = time.monotonic() + TRIM_EVERY
        while not self.stop_requested.wait(TICK):
            self.shared.set_header(Header.HEARTBEAT, time.monotonic())
            if os.getppid() != self.supervisor_pid:
                logger.error("supervisor (pid %d) is gone; stopping", self.supervisor_pid)
                self.exit_code = EXIT_ORPHANED
                return
            self._replace_dead_threads()
            try:
                self.coordinator.resyncs.expire()
            except Exception:  # never let a resync's bookkeeping stop the main loop
                logger.exception("expiring silent resyncs failed")
            if time.monotonic() >= next_trim:
                next_trim = time.monotonic() + TRIM_EVERY
                self._trim_journal()

    def _replace_dead_threads(self) -> None:
        for n, thread in enumerate(self.threads):
            if thread.running and not thread.is_alive():
                logger.error("database thread %r died; replacing it", thread.alias)
                replacement = thread.replacement()
                self.threads[n] = replacement
                self.shared.add(thread.index, Slot.THREAD_RESTARTS, 1)
                replacement.start()

    def _trim_journal(self) -> None:
        floors = [floor for floor in (t.journal_floor() for t in self.threads) if floor is not None]
        floor = self.trim_lag.floor(min(floors)) if floors else None
        if floor is not None and self.journal.trim(floor):
            release_free_memory()
        self.shared.set_header(Header.JOURNAL_ENTRIES, self.journal.entry_count)
        self.shared.set_header(Header.JOURNAL_BYTES, self.journal.size_bytes)

    def _shutdown(self) -> None:
        self.shared.set_header(Header.COORDINATOR_STATE, CoordinatorState.STOPPING)
        self.server.close()
        self.reader_watch.stop()
        self.health_watch.stop()
        self.schema.stop()
        if not self.coordinator.wait_idle(self.config.graceful_timeout):
            logger.warning("stopping with requests still in flight after %.1f s", self.config.graceful_timeout)
        for thread in self.threads:
            thread.stop()
            thread.prober.stop()
        deadline = time.monotonic() + self.config.graceful_timeout
        for thread in self.threads:
            thread.join(max(0.1, deadline - time.monotonic()))
        self._trim_journal()
        self.journal.close()
        self.schema.close()
        writes = self.sequencer.writes
        if writes.groups:
            logger.info("autocommit writes: %d in %d groups (mean size %.2f)", writes.grouped_writes, writes.groups,
                        writes.grouped_writes / writes.groups)
        self.shared.set_header(Header.COORDINATOR_STATE, CoordinatorState.STOPPED)
        logger.info("coordinator pid %d stopped", os.getpid())


def release_free_memory() -> None:
    """Large writes leave freed blocks in glibc's per-thread arenas, which it keeps; once the
    journal no longer needs them, give them back so that RSS follows what is pending."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):   # not glibc: nothing to do
        pass


def main(settings_module: Optional[str], shm_name: str, supervisor_pid: int, sys_path: list) -> None:
    """Entry point of the spawned manager process."""
    sys.path[:0] = [p for p in sys_path if p not in sys.path]
    if settings_module:
        os.environ["DJANGO_SETTINGS_MODULE"] = settings_module
    try:
        apply_runtime_settings_from_environment()   # a coordinator of LoadBalancerTestRunner
        django.setup()

        config = get_config()
    except (ConfigurationError, Exception) as exc:
        logging.getLogger("django_lb_shm").error("coordinator cannot start: %s", exc)
        sys.exit(EXIT_CONFIG_ERROR)
    configure_logging(config.log_level)
    shared = SharedState.attach(shm_name, shares_tracker=True)
    if shared.header(Header.DATABASES_KEY) != databases_key(config.databases):
        # Added or removed copies (settings + SIGHUP): the segment's slots are laid out for the old list.
        logging.getLogger("django_lb_shm").info("LOAD_BALANCER['DATABASES'] is now %s; the supervisor starts over "
                                                "with it", ", ".join(config.databases))
        os._exit(EXIT_RELOAD)
    code = CoordinatorProcess(config, shared, supervisor_pid).run()
    logging.shutdown()
    os._exit(code)

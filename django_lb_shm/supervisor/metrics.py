"""Prometheus metrics at ``/metrics``, served by the supervisor from the shared-memory segment.

``LOAD_BALANCER['METRICS'] = {'PORT': 9808}`` (``HOST`` defaults to 127.0.0.1) makes the
supervisor serve them with prometheus_client's HTTP server, in a daemon thread bound to
that host only.  Each scrape reads the segment there and then (``SegmentCollector``: no
background loop, no round trip to the coordinator), so the metrics keep answering while
the coordinator restarts.  The per-database values are what the coordinator last wrote,
the same numbers ``status`` shows (``SharedState.snapshot``); read them together with
``django_lb_shm_coordinator_up``.
"""
from __future__ import annotations

import errno
import logging
import threading
import types
from typing import TYPE_CHECKING, Any, Iterable, Optional, Sequence

import psutil

from django_lb_shm.databases.failures import address_holder
from django_lb_shm.shm.state import CoordinatorState, DbState, Header, SharedState

if TYPE_CHECKING:   # for type hints only: not imported at run time
    from django_lb_shm.settings.config import LoadBalancerConfig

logger = logging.getLogger("django_lb_shm.metrics")

PREFIX = "django_lb_shm_"


class SegmentCollector:
    """A prometheus_client collector: one reading of the segment per scrape."""

    def __init__(self, shared: SharedState, databases: Sequence[str], heartbeat_timeout: float):
        self.shared = shared
        self.databases = list(databases)
        self.heartbeat_timeout = heartbeat_timeout
        # close() waits for a scrape in progress: the supervisor unmaps the segment after it.
        self._lock = threading.Lock()
        self._closed = False

    def collect(self) -> Iterable[Any]:
        with self._lock:
            if self._closed:
                return []
            snapshot = self.shared.snapshot(self.databases)
            started_at = self.shared.header(Header.STARTED_AT)
        coordinator = snapshot["coordinator"]
        rss = resident_bytes(coordinator["pid"])
        up = coordinator_up(coordinator, rss is not None, self.heartbeat_timeout)
        return coordinator_families(coordinator, up, started_at, rss) + database_families(snapshot["databases"])

    def close(self) -> None:
        with self._lock:
            self._closed = True


def resident_bytes(pid: int) -> Optional[int]:
    """The RSS of a live process (None: no such process, or a zombie not yet reaped)."""
    if not pid:
        return None
    try:
        process = psutil.Process(pid)
        with process.oneshot():
            if process.status() == psutil.STATUS_ZOMBIE:
                return None
            return int(process.memory_info().rss)
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return None


def coordinator_up(coordinator: dict, alive: bool, heartbeat_timeout: float) -> bool:
    """READY, its process alive, and its main loop beating: the header alone still says READY
    for a moment after a kill -9, until the supervisor notices."""
    age = coordinator.get("heartbeat_age_s")
    return coordinator["state"] == "READY" and alive and age is not None and age <= heartbeat_timeout


def _gauge(name: str, documentation: str, value: float) -> Any:
    from prometheus_client.core import GaugeMetricFamily

    return GaugeMetricFamily(PREFIX + name, documentation, value=value)


def _counter(name: str, documentation: str, value: float) -> Any:
    from prometheus_client.core import CounterMetricFamily

    return CounterMetricFamily(PREFIX + name, documentation, value=value)


def coordinator_families(coordinator: dict, up: bool, started_at: float, rss: Optional[int]) -> list:
    from prometheus_client.core import GaugeMetricFamily

    states = GaugeMetricFamily(PREFIX + "coordinator_state",
                               "1 for the coordinator's current state, 0 for the others", labels=["state"])
    for state in CoordinatorState:
        states.add_metric([state.name], 1.0 if coordinator["state"] == state.name else 0.0)
    families = [
        _gauge("coordinator_up", "1 when the coordinator is READY, alive and beating", 1.0 if up else 0.0),
        states,
        _counter("coordinator_restarts", "Coordinator restarts by the supervisor (crash, hang, SIGHUP, MAX_RSS_MB)",
                 coordinator["restarts"]),
        _gauge("coordinator_start_time_seconds", "Unix time the current coordinator started (0: none yet)",
               started_at),
        _counter("coordinator_requests", "Requests the coordinator served", coordinator["requests"]),
        _gauge("coordinator_active_requests", "Requests the coordinator is serving now",
               coordinator["active_requests"]),
        _gauge("journal_bytes", "Size of the write journal (updated every few seconds)", coordinator["journal_bytes"]),
        _gauge("journal_entries", "Writes kept in the journal (not yet applied everywhere, or recent)",
               coordinator["journal_entries"]),
        _gauge("last_write_sequence", "Sequence number of the last write ordered (published before it is "
                                      "acknowledged)", coordinator["last_seq"]),
    ]
    if rss is not None:
        families.append(_gauge("coordinator_resident_memory_bytes", "RSS of the coordinator process", rss))
    return families


# (name, documentation, kind, value of a database's snapshot entry)
DATABASE_METRICS: tuple = (
    ("database_up", "1 when the database is RUNNING (serves reads, applies writes)", "gauge",
     lambda db: 1.0 if db["state"] == DbState.RUNNING.name else 0.0),
    ("reads", "Reads run on the database (by the coordinator and by app processes' zero-hop reads)", "counter",
     lambda db: db["reads"]),
    ("writes", "Writes applied to the database", "counter", lambda db: db["writes"]),
    ("errors", "Errors on the database (going DOWN, reads past READ_TIMEOUT, failed writes)", "counter",
     lambda db: db["errors"]),
    ("pending_writes", "Writes ordered but not yet applied to the database", "gauge",
     lambda db: db["pending_writes"]),
    ("applied_sequence", "Sequence number of the last write applied to the database", "gauge",
     lambda db: db["applied_seq"]),
    ("read_latency_seconds", "Moving average of the database's read and probe latency (shared by all processes)",
     "gauge", lambda db: db["latency_ms"] / 1000.0),
    ("inflight_reads", "Reads queued or running on the database now", "gauge", lambda db: db["inflight_reads"]),
    ("database_thread_restarts", "Database threads the coordinator replaced after they died", "counter",
     lambda db: db["thread_restarts"]),
)


def database_families(databases: list[dict]) -> list:
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

    families = []
    for name, documentation, kind, value in DATABASE_METRICS:
        family_class = CounterMetricFamily if kind == "counter" else GaugeMetricFamily
        family = family_class(PREFIX + name, documentation, labels=["database"])
        for db in databases:
            family.add_metric([db["name"]], value(db))
        families.append(family)
    states = GaugeMetricFamily(PREFIX + "database_state", "1 for the database's current state, 0 for the others",
                               labels=["database", "state"])
    for db in databases:
        for state in DbState:
            states.add_metric([db["name"], state.name], 1.0 if db["state"] == state.name else 0.0)
    return families + [states]


class MetricsServer:
    """prometheus_client's HTTP server for one collector, in a daemon thread."""

    def __init__(self, host: str, port: int, collector: SegmentCollector):
        self.host = host
        self.port = port
        self.collector = collector
        self.httpd: Any = None

    def start(self) -> None:
        """Bind and serve; OSError when the address cannot be bound, ImportError without prometheus_client."""
        from prometheus_client import CollectorRegistry, start_http_server

        registry = CollectorRegistry(auto_describe=False)
        registry.register(self.collector)
        self.httpd, _thread = start_http_server(self.port, addr=self.host, registry=registry)

    def stop(self) -> None:
        if self.httpd is not None:
            self.httpd.shutdown()
            self.httpd.server_close()
        self.collector.close()


def serve_metrics(config: LoadBalancerConfig, shared: SharedState) -> Optional[MetricsServer]:
    """Serve /metrics when LOAD_BALANCER['METRICS'] is set.  None when it is off or cannot be
    served: that is logged, and the supervisor goes on serving the databases without it."""
    metrics = config.metrics
    if metrics is None:
        return None
    server = MetricsServer(metrics.host, metrics.port,
                           SegmentCollector(shared, config.databases, config.heartbeat_timeout))
    try:
        server.start()
    except ImportError as exc:
        logger.error("LOAD_BALANCER['METRICS'] is set, but prometheus_client cannot be imported (%s): no metrics; "
                     "install django-lb-shm[metrics]", exc)
        return None
    except OSError as exc:
        logger.error("cannot serve metrics at %s: %s%s; serving the databases without metrics",
                     metrics, exc, _port_holder(metrics.port) if exc.errno == errno.EADDRINUSE else "")
        return None
    except Exception:   # metrics are an extra: never a reason for the supervisor to stop
        logger.exception("cannot serve metrics at %s; serving the databases without metrics", metrics)
        return None
    logger.info("metrics at %s", metrics)
    return server


def _port_holder(port: int) -> str:
    return address_holder(types.SimpleNamespace(path="", port=port))

"""Read algorithms: which ONE database serves the next read.

Every algorithm chooses among the candidates it is handed (the databases that
are RUNNING and allowed to serve reads), reading the shared latency and
in-flight arrays directly, without any round trip.  An instance runs in the
coordinator (reads that take the coordinator path) and one in every app process
that runs reads itself (``client/reads.py``): counters such as the round-robin turn are
per process, the shared arrays are common to all.  Writes do not
come here: they go to every database.

A custom algorithm is a ``ReadAlgorithm`` subclass named by dotted path in
``R_ALGORITHM['NAME']``; it receives the R_ALGORITHM options.
"""
from __future__ import annotations

import itertools
import threading
from typing import TYPE_CHECKING, Any, Mapping, Sequence

from django.utils.module_loading import import_string

from django_lb_shm.errors import ConfigurationError
from django_lb_shm.settings.validation import exclude_problem, weights_problem
from django_lb_shm.shm.state import SharedState, Slot

if TYPE_CHECKING:   # for type hints only: not imported at run time
    from django_lb_shm.settings.config import LoadBalancerConfig


class ReadAlgorithm:
    """Base class. ``choose`` gets database indexes and returns one of them."""

    #: seconds between latency probes of every database (None: no probes)
    probe_interval: float | None = None

    def __init__(self, names: Sequence[str], shared: SharedState, options: Mapping[str, Any]):
        self.names = list(names)
        self.shared = shared
        self.options = dict(options)
        excluded = self.options.get("EXCLUDE", ())
        problem = exclude_problem(excluded, self.names)
        if problem:
            raise ConfigurationError(f"{problem.msg} {problem.hint}")
        self.readable = [i for i, n in enumerate(self.names) if n not in excluded]
        self._counter = itertools.count()

    def eligible(self, candidates: Sequence[int]) -> list[int]:
        """Candidates minus databases kept out of reads (they still get every write)."""
        allowed = [i for i in candidates if i in self.readable]
        return allowed or list(candidates)

    def choose(self, candidates: Sequence[int]) -> int:
        raise NotImplementedError

    def _rotate(self, candidates: Sequence[int]) -> int:
        return candidates[next(self._counter) % len(candidates)]


class RoundRobin(ReadAlgorithm):
    """Each database in turn; ``WEIGHTS: {'DB1': 3}`` gives DB1 three turns to the others' one."""

    def __init__(self, names: Sequence[str], shared: SharedState, options: Mapping[str, Any]):
        super().__init__(names, shared, options)
        weights = self.options.get("WEIGHTS") or {}
        problem = weights_problem(weights, self.names)
        if problem:
            raise ConfigurationError(f"{problem.msg} {problem.hint}")
        self.weights = [weights.get(n, 1) for n in self.names]
        self.unweighted = all(w == 1 for w in self.weights)
        self._current = [0] * len(self.names)
        self._lock = threading.Lock()

    def choose(self, candidates: Sequence[int]) -> int:
        if self.unweighted or all(self.weights[i] == 1 for i in candidates):
            return self._rotate(candidates)
        return self._smooth_weighted(candidates)

    def _smooth_weighted(self, candidates: Sequence[int]) -> int:
        # nginx's smooth weighted round robin: spreads the heavy one's turns out.
        weighted = [i for i in candidates if self.weights[i] > 0] or list(candidates)
        with self._lock:
            total = sum(max(self.weights[i], 1) for i in weighted)
            for i in weighted:
                self._current[i] += max(self.weights[i], 1)
            best = max(weighted, key=lambda i: self._current[i])
            self._current[best] -= total
            return best


class IntervalTime(ReadAlgorithm):
    """The fastest database by measured latency (probed every INTERVAL seconds, fed by real reads).

    Databases within ``TOLERANCE`` (default 50%, and at least ``TOLERANCE_MS``,
    default 0.5 ms) of the fastest share the reads in turn, so equal databases
    split the load instead of one taking all of it.
    """

    def __init__(self, names: Sequence[str], shared: SharedState, options: Mapping[str, Any], interval: float = 5.0):
        super().__init__(names, shared, options)
        self.probe_interval = interval
        self.tolerance = float(self.options.get("TOLERANCE", 0.5))
        self.tolerance_ms = float(self.options.get("TOLERANCE_MS", 0.5))

    def choose(self, candidates: Sequence[int]) -> int:
        latencies = {i: self.shared.get(i, Slot.LATENCY_MS) for i in candidates}
        unmeasured = [i for i, ms in latencies.items() if ms <= 0]
        if unmeasured:
            return self._rotate(unmeasured)
        fastest = min(latencies.values())
        limit = max(fastest * (1 + self.tolerance), fastest + self.tolerance_ms)
        return self._rotate([i for i in candidates if latencies[i] <= limit])


class LeastConnections(ReadAlgorithm):
    """The database with the fewest reads queued or running (shared in-flight counts:
    the coordinator's and those of every app process that runs reads itself)."""

    def choose(self, candidates: Sequence[int]) -> int:
        inflight = self.shared.inflight
        loads = {i: inflight(i) for i in candidates}
        least = min(loads.values())
        return self._rotate([i for i in candidates if loads[i] <= least])


def build_read_algorithm(config: LoadBalancerConfig, shared: SharedState) -> ReadAlgorithm:
    spec = config.read_algorithm
    names = config.databases
    if spec.name == "ROUND_ROBIN":
        return RoundRobin(names, shared, spec.options)
    if spec.name == "INTERVAL_TIME":
        return IntervalTime(names, shared, spec.options, interval=spec.interval)
    if spec.name in ("LEAST_CONNECTIONS", "INTERVAL_NUMBER_OF_CONNECTIONS"):
        return LeastConnections(names, shared, spec.options)
    algorithm = load_read_algorithm(spec.name)(names, shared, spec.options)
    if algorithm.probe_interval is None and "INTERVAL" in (config.read_algorithm.options or {}):
        algorithm.probe_interval = spec.interval
    return algorithm


def load_read_algorithm(path: str) -> type[ReadAlgorithm]:
    """The ReadAlgorithm subclass a dotted path names; ConfigurationError saying why not
    (also the system check E020's message, settings.validation._check_custom_algorithm)."""
    try:
        cls = import_string(path)
    except ImportError as exc:
        raise ConfigurationError(f"LOAD_BALANCER['R_ALGORITHM']['NAME'] {path!r} cannot be imported: {exc}") from None
    if not (isinstance(cls, type) and issubclass(cls, ReadAlgorithm)):
        raise ConfigurationError(f"LOAD_BALANCER['R_ALGORITHM']['NAME'] {path!r} is not a "
                                 "django_lb_shm.balancing.ReadAlgorithm subclass.")
    return cls

"""Issue 5: read algorithms over the shared latency and in-flight arrays.

Units drive the algorithms on a real shared-memory segment; the behaviour tests
put a delaying TCP proxy in front of one real PostgreSQL server.
"""
from __future__ import annotations

import collections
import os
import time
import uuid

import pytest
from django.db import connections

from django_lb_shm.balancing import (
    IntervalTime,
    LeastConnections,
    ReadAlgorithm,
    RoundRobin,
    build_read_algorithm,
)
from django_lb_shm.settings.config import build_config
from django_lb_shm.errors import ConfigurationError
from django_lb_shm.shm.state import SharedState, Slot
from tests.support.delay_proxy import DelayProxy
from tests.support.lb import ALIASES, base_settings
from tests.support.threads import run_threads
from tests.testapp.models import Author

NAMES = ["default", "DB1", "DB2"]


@pytest.fixture
def shared():
    state = SharedState.create(f"django_lb_shm_test_{uuid.uuid4().hex[:8]}", len(NAMES))
    yield state
    state.unlink()


def spread(algorithm: ReadAlgorithm, n: int = 300, candidates=(0, 1, 2)) -> collections.Counter:
    return collections.Counter(NAMES[algorithm.choose(algorithm.eligible(list(candidates)))] for _ in range(n))


class PreferLast(ReadAlgorithm):
    """A custom algorithm, loaded by dotted path."""

    def choose(self, candidates):
        return max(candidates)


# -- units -------------------------------------------------------------------------------------
def test_round_robin_is_even(shared):
    assert spread(RoundRobin(NAMES, shared, {})) == {"default": 100, "DB1": 100, "DB2": 100}


def test_round_robin_weights_and_zero_weight(shared):
    counts = spread(RoundRobin(NAMES, shared, {"WEIGHTS": {"default": 3, "DB2": 0}}), n=400)
    assert counts == {"default": 300, "DB1": 100}
    # a weight-0 database still serves when it is the only one up
    assert spread(RoundRobin(NAMES, shared, {"WEIGHTS": {"DB2": 0}}), n=5, candidates=(2,)) == {"DB2": 5}


def test_exclude_keeps_a_database_out_of_reads(shared):
    algorithm = RoundRobin(NAMES, shared, {"EXCLUDE": ["default"]})
    assert spread(algorithm) == {"DB1": 150, "DB2": 150}
    assert spread(algorithm, n=3, candidates=(0,)) == {"default": 3}  # unless nothing else is up
    with pytest.raises(ConfigurationError):
        RoundRobin(NAMES, shared, {"EXCLUDE": ["nope"]})


def test_interval_time_prefers_the_fastest_and_shares_among_equals(shared):
    algorithm = IntervalTime(NAMES, shared, {}, interval=1)
    for i, ms in enumerate([2.0, 0.50, 0.70]):
        shared.set(i, Slot.LATENCY_MS, ms)
    assert spread(algorithm) == {"DB1": 150, "DB2": 150}  # 0.70 is within 50% (and 0.5 ms) of 0.50
    shared.set(2, Slot.LATENCY_MS, 5.0)
    assert spread(algorithm) == {"DB1": 300}
    shared.set(0, Slot.LATENCY_MS, 0.0)  # not measured yet: tried first
    assert spread(algorithm, n=3) == {"default": 3}


def test_least_connections_picks_the_least_loaded(shared):
    algorithm = LeastConnections(NAMES, shared, {})
    for i, inflight in enumerate([4, 1, 7]):
        shared.set(i, Slot.INFLIGHT, inflight)
    assert spread(algorithm, n=10) == {"DB1": 10}
    shared.set(0, Slot.INFLIGHT, 1)
    assert spread(algorithm, n=10) == {"default": 5, "DB1": 5}


def test_build_by_name_and_by_dotted_path(shared):
    settings = base_settings()

    def build(r_algorithm):
        lb = dict(settings["LOAD_BALANCER"], R_ALGORITHM=r_algorithm)
        return build_read_algorithm(build_config(lb, settings["DATABASES"]), shared)

    assert isinstance(build({"NAME": "INTERVAL_TIME", "INTERVAL": 3}), IntervalTime)
    assert build({"NAME": "INTERVAL_TIME", "INTERVAL": 3}).probe_interval == 3
    assert isinstance(build({"NAME": "INTERVAL_NUMBER_OF_CONNECTIONS"}), LeastConnections)
    custom = build({"NAME": f"{__name__}.PreferLast", "FAVOURITE": 1})
    assert isinstance(custom, PreferLast) and custom.options == {"FAVOURITE": 1}
    assert custom.choose([0, 2]) == 2


# -- real PostgreSQL with one slow server ----------------------------------------------------------
def read_counts(handle) -> dict:
    return {d["name"]: d["reads"] for d in handle.status()["databases"]}


def do_reads(n: int, threads: int = 1) -> None:
    """``n`` reads of one row on each of ``threads`` threads; a read that fails or misses fails the test."""
    author = Author.objects.first()

    def worker():
        missed = sum(not Author.objects.filter(pk=author.pk).exists() for _ in range(n))
        assert not missed, f"{missed} of {n} reads did not find the row"

    run_threads(worker, threads, 120, cleanup=connections.close_all)


@pytest.fixture
def slow_db2():
    if os.environ.get("LB_TEST_BACKEND", "sqlite") != "postgres":
        pytest.skip("PostgreSQL-only test; run with LB_TEST_BACKEND=postgres")
    port = int(base_settings()["DATABASES"]["DB2"]["PORT"])
    proxy = DelayProxy(port, delay_s=0.004)
    yield {"DB2": {"PORT": str(proxy.port)}}
    proxy.stop()


def delta(before: dict, after: dict) -> dict:
    return {name: after[name] - before[name] for name in after}


@pytest.mark.postgres_only
def test_interval_time_sends_reads_to_the_fast_databases(lb_factory, slow_db2):
    handle = lb_factory("interval", databases=slow_db2, R_ALGORITHM={"NAME": "INTERVAL_TIME", "INTERVAL": 0.2})
    Author.objects.create(name="probe")
    time.sleep(1.0)  # a few probes
    before = read_counts(handle)
    do_reads(300)
    reads = delta(before, read_counts(handle))
    latency = {d["name"]: d["latency_ms"] for d in handle.status()["databases"]}
    assert latency["DB2"] > min(latency["default"], latency["DB1"]), latency
    assert (reads["default"] + reads["DB1"]) >= 0.8 * sum(reads.values()), reads
    # (that equally fast ones share is checked on fixed latencies in the unit test above:
    # measured latencies of two idle local servers are too noisy to assert it here)


@pytest.mark.postgres_only
def test_round_robin_spreads_evenly_even_with_a_slow_database(lb_factory, slow_db2):
    handle = lb_factory("rr", databases=slow_db2, R_ALGORITHM={"NAME": "ROUND_ROBIN"})
    Author.objects.create(name="rr")
    before = read_counts(handle)
    do_reads(300)
    reads = delta(before, read_counts(handle))
    assert all(95 <= count <= 105 for count in reads.values()), reads


@pytest.mark.postgres_only
def test_least_connections_shifts_load_away_from_the_slow_database(lb_factory, slow_db2):
    handle = lb_factory("lc", databases=slow_db2, R_ALGORITHM={"NAME": "LEAST_CONNECTIONS"})
    Author.objects.create(name="lc")
    before = read_counts(handle)
    do_reads(60, threads=6)
    reads = delta(before, read_counts(handle))
    assert sum(reads.values()) == 361  # and the first() that picks the row
    assert reads["DB2"] < 0.25 * 360, reads


@pytest.mark.postgres_only
@pytest.mark.parametrize("algorithm", ["ROUND_ROBIN", "INTERVAL_TIME", "LEAST_CONNECTIONS"])
def test_a_down_database_is_left_out_by_every_algorithm(lb_factory, algorithm):
    handle = lb_factory(f"down-{algorithm.lower()}", R_ALGORITHM={"NAME": algorithm, "INTERVAL": 0.2})
    Author.objects.create(name="x")
    server = pytest.lb_pg_cluster.servers[ALIASES.index("DB2")]
    server.stop(mode="immediate")
    try:
        do_reads(5)  # the first read that hits DB2 marks it DOWN and is retried elsewhere
        handle.wait_state("DB2", "DOWN", timeout=10)
        before = read_counts(handle)
        do_reads(60)
        reads = delta(before, read_counts(handle))
        assert reads["DB2"] == 0 and sum(reads.values()) == 61, reads
    finally:
        server.start()
    handle.wait_state("DB2", "RUNNING", timeout=20)

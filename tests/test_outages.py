"""Design invariants 3 and 4 on real PostgreSQL servers: outages, catch-up, nothing lost.

Servers are stopped with `pg_ctl stop -m immediate` (a crash, as far as the
coordinator can tell) and started again; no mocks.
"""
from __future__ import annotations

import multiprocessing
import os
import time

import pytest
from django.db import DataError, IntegrityError, OperationalError, connections

from tests.support.lb import ALIASES
from tests.support.waiting import names_on_alias
from tests.support.workers import mixed_workload
from tests.testapp.models import Author

pytestmark = pytest.mark.postgres_only


def server(alias: str):
    return pytest.lb_pg_cluster.servers[ALIASES.index(alias)]


@pytest.fixture
def restore_servers():
    yield
    for alias in ALIASES:
        if not server(alias).is_running():
            server(alias).start()
        connections[alias].close()


def names_on(alias: str) -> set:
    return set(names_on_alias(alias, fresh=True))


def test_caller_errors_never_mark_a_database_down(coordinator, replicas):
    Author.objects.create(name="x")
    with pytest.raises(IntegrityError):
        Author.objects.create(name="x")
    with pytest.raises(DataError):
        Author.objects.create(name="y" * 500)  # varchar(100)
    states = {d["name"]: d["state"] for d in coordinator.status()["databases"]}
    assert set(states.values()) == {"RUNNING"}, states
    replicas.assert_identical(["testapp_author"])


def test_reads_skip_a_down_database_and_it_catches_up(coordinator, replicas, restore_servers):
    Author.objects.create(name="before")
    server("DB1").stop(mode="immediate")
    # every read succeeds while some database is up; the failed one is retried elsewhere
    for _ in range(12):
        assert Author.objects.filter(name="before").count() == 1
    coordinator.wait_state("DB1", "DOWN", timeout=10)
    for i in range(20):
        Author.objects.create(name=f"during-{i}")
    status = coordinator.status()
    db1 = next(d for d in status["databases"] if d["name"] == "DB1")
    assert db1["pending_writes"] >= 20
    server("DB1").start()
    coordinator.wait_state("DB1", "RUNNING", timeout=20)
    replicas.assert_identical(["testapp_author"])
    assert len(names_on("DB1")) == 21


def test_leader_down_moves_writes_to_the_next_database(coordinator, replicas, restore_servers):
    # DB1 takes writes first (the first database other than 'default'; see Sequencer.leader_preference)
    Author.objects.create(name="a")
    server("DB1").stop(mode="immediate")
    for i in range(10):
        Author.objects.create(name=f"b{i}")
    assert Author.objects.count() == 11
    coordinator.wait_state("DB1", "DOWN", timeout=10)
    server("DB1").start()
    coordinator.wait_state("DB1", "RUNNING", timeout=20)
    replicas.assert_identical(["testapp_author"])


def test_all_databases_down_gives_clear_errors_then_converges(coordinator, replicas, restore_servers):
    Author.objects.create(name="kept")
    for alias in ALIASES:
        server(alias).stop(mode="immediate")
    started = time.monotonic()
    with pytest.raises(OperationalError) as read_error:
        Author.objects.count()
    with pytest.raises(OperationalError) as write_error:
        Author.objects.create(name="refused")
    assert time.monotonic() - started < 25
    for error in (read_error.value, write_error.value):
        assert "no database" in str(error) and all(a in str(error) for a in ALIASES), str(error)
    for alias in ALIASES:
        server(alias).start()
    for alias in ALIASES:
        coordinator.wait_state(alias, "RUNNING", timeout=20)
    Author.objects.create(name="after")
    replicas.assert_identical(["testapp_author"])
    assert names_on("DB2") == {"kept", "after"}


def test_outage_during_a_multi_process_workload_loses_nothing(coordinator, replicas, restore_servers):
    ctx = multiprocessing.get_context("spawn")
    results = ctx.Queue()
    settings_json = os.environ["LB_TEST_CONFIG"]
    procs = [ctx.Process(target=mixed_workload, args=(settings_json, f"w{n}", 60, results)) for n in range(3)]
    for p in procs:
        p.start()
    time.sleep(1.0)
    server("DB2").stop(mode="immediate")
    time.sleep(1.5)
    server("DB2").start()
    outcomes = [results.get(timeout=180) for _ in procs]
    for p in procs:
        p.join(30)
    errors = [e for _prefix, _acked, errs in outcomes for e in errs]
    assert errors == [], errors[:5]
    acked = {name for _prefix, names, _errs in outcomes for name in names}
    assert len(acked) == 180
    coordinator.wait_state("DB2", "RUNNING", timeout=30)
    replicas.assert_identical(["testapp_author"])
    for alias in ALIASES:
        assert acked <= names_on(alias), alias
    db2 = next(d for d in coordinator.status()["databases"] if d["name"] == "DB2")
    assert db2["pending_writes"] == 0


def test_database_down_across_a_coordinator_restart(coordinator, replicas, restore_servers):
    Author.objects.create(name="one")
    server("DB2").stop(mode="immediate")
    for i in range(5):
        Author.objects.create(name=f"missed-{i}")
    coordinator.stop()
    coordinator.start()
    server("DB2").start()
    coordinator.wait_state("DB2", "RUNNING", timeout=20)
    replicas.assert_identical(["testapp_author"])
    assert len(names_on("DB2")) == 6


def test_ignore_conflicts_through_a_catch_up_and_a_new_leader_keeps_the_leaders_rows_and_keys(
        coordinator, replicas, restore_servers):
    # bulk_create(ignore_conflicts=True): the leader says which rows it inserted and their keys;
    # a copy that was down applies exactly those from the journal, and a new leader (whose
    # sequence the followers' resets moved) goes on with keys that every copy takes.
    Author.objects.bulk_create([Author(name="a"), Author(name="b")])
    server("default").stop(mode="immediate")
    coordinator.wait_state("default", "DOWN", timeout=10)
    Author.objects.bulk_create([Author(name="a"), Author(name="c"), Author(name="d")], ignore_conflicts=True)
    server("default").start()
    coordinator.wait_state("default", "RUNNING", timeout=20)
    replicas.assert_identical(["testapp_author"])

    server("DB1").stop(mode="immediate")   # the leader
    Author.objects.create(name="f")   # autocommit: moves to the next leader (a transaction would abort)
    coordinator.wait_state("DB1", "DOWN", timeout=10)
    Author.objects.bulk_create([Author(name="d"), Author(name="e")], ignore_conflicts=True)
    Author.objects.create(name="g")
    server("DB1").start()
    coordinator.wait_state("DB1", "RUNNING", timeout=20)
    connections["DB1"].close()   # this process's own connection died with the server
    replicas.assert_identical(["testapp_author"])
    assert names_on("DB1") == names_on("default") == {"a", "b", "c", "d", "e", "f", "g"}

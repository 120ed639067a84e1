"""Prometheus metrics (LOAD_BALANCER['METRICS']): served by the real supervisor from shared memory.

Scraped over HTTP from 127.0.0.1 and parsed with prometheus_client's own text parser;
compared with `status --json`, across a kill -9 of the coordinator, with a copy DOWN.
"""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request

import psutil
import pytest
from django.db import connections
from django.test import override_settings

from django_lb_shm.checks import check_load_balancer_settings, check_metrics_dependency
from django_lb_shm.settings.config import MetricsConfig, build_config
from tests.support.lb import ALIASES, BACKEND, LAUNCHER, REPO
from tests.support.pg_cluster import free_port
from tests.support.waiting import wait_until
from tests.testapp.models import Author

pytest.importorskip("prometheus_client")
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

Samples = dict[tuple[str, tuple], float]


# -- helpers -------------------------------------------------------------------------------------
def scrape(port: int, timeout: float = 5) -> Samples:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=timeout) as response:
        assert response.status == 200
        text = response.read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples[("django_lb_shm_" + name, tuple(sorted(labels.items())))]


def status_json(handle) -> dict:
    result = subprocess.run([sys.executable, str(LAUNCHER), "status", "--json"], env=handle.env(), cwd=str(REPO),
                            capture_output=True, text=True, timeout=60)
    assert result.returncode in (0, 3), result.stderr
    return json.loads(result.stdout)


def listening(pid: int) -> list[tuple[str, int]]:
    process = psutil.Process(pid)
    sockets = getattr(process, "net_connections", process.connections)(kind="inet")
    return sorted((s.laddr.ip, s.laddr.port) for s in sockets if s.status == psutil.CONN_LISTEN)


@pytest.fixture
def with_metrics(lb_factory):
    """A supervisor serving metrics on a free port of 127.0.0.1: (handle, port)."""
    port = free_port()
    handle = lb_factory("metrics", METRICS={"HOST": "127.0.0.1", "PORT": port})
    return handle, port


# -- against a running supervisor ----------------------------------------------------------------------
COMPARED = ("reads_total", "writes_total", "errors_total", "pending_writes", "applied_sequence",
            "read_latency_seconds", "database_up")


def _per_database(samples: Samples) -> dict:
    return {(name, db): value(samples, name, database=db) for name in COMPARED for db in ALIASES}


def test_metrics_match_status_after_reads_and_writes(with_metrics):
    handle, port = with_metrics
    authors = [Author.objects.create(name=f"m{i}") for i in range(12)]
    for author in authors[:4]:
        author.name += "-renamed"
        author.save()
    Author.objects.filter(name="m11").delete()
    for _ in range(15):
        assert Author.objects.filter(name__startswith="m").count() == 11
    handle.wait_drained()

    # status and a scrape agree when nothing moved between two scrapes around it
    for _attempt in range(20):
        before = scrape(port)
        status = status_json(handle)
        after = scrape(port)
        if _per_database(before) == _per_database(after) and \
                value(before, "journal_bytes") == value(after, "journal_bytes"):
            break
        time.sleep(0.3)
    else:
        raise AssertionError("the metrics never held still")
    samples = after
    for db in status["databases"]:
        name = db["name"]
        assert value(samples, "reads_total", database=name) == db["reads"]
        assert value(samples, "writes_total", database=name) == db["writes"]
        assert value(samples, "errors_total", database=name) == db["errors"]
        assert value(samples, "pending_writes", database=name) == db["pending_writes"] == 0
        assert value(samples, "applied_sequence", database=name) == db["applied_seq"]
        assert value(samples, "read_latency_seconds", database=name) == pytest.approx(db["latency_ms"] / 1000)
        assert value(samples, "database_up", database=name) == 1
        assert value(samples, "database_state", database=name, state="RUNNING") == 1
        assert value(samples, "database_state", database=name, state="DOWN") == 0
        assert db["writes"] >= 12 + 4 + 1
    # zero-hop reads (this process's reader slots) are in reads_total, as in status
    assert sum(value(samples, "reads_total", database=a) for a in ALIASES) >= 15
    c = status["coordinator"]
    assert value(samples, "coordinator_up") == 1
    assert value(samples, "coordinator_state", state="READY") == 1
    assert value(samples, "coordinator_restarts_total") == c["restarts"] == 0
    assert value(samples, "journal_bytes") == c["journal_bytes"] > 0
    assert value(samples, "last_write_sequence") == c["last_seq"] >= 17
    assert value(samples, "coordinator_resident_memory_bytes") > 10 * 2**20
    assert abs(value(samples, "coordinator_start_time_seconds") - (time.time() - c["uptime_s"])) < 5
    # bound to the configured host only, and served by the supervisor, not the coordinator
    assert listening(handle.supervisor_pid) == [("127.0.0.1", port)]
    assert ("127.0.0.1", port) not in listening(c["pid"])


def test_no_metrics_setting_opens_no_port(coordinator):
    assert "METRICS" not in coordinator.lb
    assert listening(coordinator.supervisor_pid) == []


def test_metrics_answer_while_the_coordinator_restarts_after_kill_9(with_metrics):
    handle, port = with_metrics
    first = scrape(port)
    assert value(first, "coordinator_up") == 1
    restarts = value(first, "coordinator_restarts_total")
    old_pid = handle.coordinator_pid()
    os.kill(old_pid, signal.SIGKILL)
    seen_up: list[float] = []

    def back_up() -> bool:
        samples = scrape(port, timeout=2)   # every scrape must answer: a failure fails the test
        seen_up.append(value(samples, "coordinator_up"))
        return seen_up[-1] == 1 and value(samples, "coordinator_restarts_total") == restarts + 1

    wait_until(back_up, 60, "coordinator_up 1 after the restart")
    assert 0 in seen_up, "coordinator_up never showed the dead coordinator"
    assert handle.wait_ready()["coordinator"]["pid"] != old_pid


@pytest.fixture
def copy_down():
    """take(alias) makes that copy unreachable (SQLite: its file moved away; PostgreSQL: its
    server stopped); undone afterwards."""
    undo: list = []

    def take(alias: str) -> None:
        connections[alias].close()
        if BACKEND == "postgres":
            server = pytest.lb_pg_cluster.servers[ALIASES.index(alias)]
            server.stop(mode="immediate")
            undo.append(server.start)
        else:
            path = str(connections[alias].settings_dict["NAME"])
            os.rename(path, path + ".away")
            undo.append(lambda: _move_back(path))

    yield take
    while undo:
        undo.pop()()
    for alias in ALIASES:
        connections[alias].close()


def _move_back(path: str) -> None:
    if os.path.exists(path + ".away"):
        if os.path.exists(path):
            os.unlink(path)
        os.rename(path + ".away", path)


def test_a_down_copy_shows_up_0_and_its_state(with_metrics, copy_down):
    handle, port = with_metrics
    Author.objects.create(name="before")
    copy_down("DB2")
    for i in range(5):
        Author.objects.create(name=f"during-{i}")
    handle.wait_state("DB2", "DOWN", timeout=20)
    samples = scrape(port)
    assert value(samples, "database_up", database="DB2") == 0
    assert value(samples, "database_state", database="DB2", state="DOWN") == 1
    assert value(samples, "database_state", database="DB2", state="RUNNING") == 0
    assert value(samples, "pending_writes", database="DB2") >= 1
    assert value(samples, "errors_total", database="DB2") >= 1
    for other in ("default", "DB1"):
        assert value(samples, "database_up", database=other) == 1
        assert value(samples, "pending_writes", database=other) == 0
    assert value(samples, "coordinator_up") == 1


def test_a_taken_metrics_port_does_not_stop_the_supervisor(lb_factory):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        handle = lb_factory("metrics-taken", METRICS={"PORT": port})   # HOST: 127.0.0.1 by default
        assert handle.wait_ready()["coordinator"]["state"] == "READY"
        Author.objects.create(name="served")
        assert Author.objects.filter(name="served").count() == 1
        assert handle.proc.poll() is None
        assert "cannot serve metrics at http://127.0.0.1:%d/metrics" % port in handle.log()
        assert listening(handle.supervisor_pid) == []


def test_the_test_runners_coordinator_serves_no_metrics(tmp_path):
    """LoadBalancerTestRunner's private coordinator leaves the project's METRICS port alone."""
    port = free_port()
    config = json.loads(open(os.environ["LB_TEST_CONFIG"]).read())
    config["LOAD_BALANCER"]["METRICS"] = {"PORT": port}
    path = tmp_path / "with-metrics.json"
    path.write_text(json.dumps(config))
    env = dict(os.environ, LB_TEST_CONFIG=str(path), DJANGO_SETTINGS_MODULE="tests.testproject.settings",
               LB_TEST_METRICS_PORT=str(port))
    result = subprocess.run([sys.executable, "-m", "django", "test", "-v", "2",
                             "tests.support.django_testcases.NoMetricsTestCase",
                             "--testrunner", "django_lb_shm.testing.LoadBalancerTestRunner"],
                            env=env, cwd=str(REPO), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Ran 1 test" in result.stderr


# -- settings and system checks ------------------------------------------------------------------------
def lb_with(metrics) -> dict:
    from django.conf import settings

    return dict(settings.LOAD_BALANCER, METRICS=metrics)


def check_ids(metrics) -> list[str]:
    with override_settings(LOAD_BALANCER=lb_with(metrics)):
        return [m.id for m in check_load_balancer_settings() + check_metrics_dependency()]


@pytest.mark.parametrize("metrics", [None, {"PORT": 9808}, {"HOST": "127.0.0.1", "PORT": 9808},
                                     {"HOST": "localhost", "PORT": 1}, {"HOST": "::1", "PORT": 65535}])
def test_valid_metrics_settings(metrics):
    assert check_ids(metrics) == []


def test_the_default_host_is_loopback_and_absent_means_off():
    from django.conf import settings

    config = build_config(lb_with({"PORT": 9808}), settings.DATABASES)
    assert config.metrics == MetricsConfig(port=9808, host="127.0.0.1")
    assert str(config.metrics) == "http://127.0.0.1:9808/metrics"
    assert build_config(settings.LOAD_BALANCER, settings.DATABASES).metrics is None


BAD_METRICS = [
    (9808, "django_lb_shm.E031"),
    ("http://localhost:9808", "django_lb_shm.E031"),
    ({"PORT": 9808, "HSOT": "0.0.0.0"}, "django_lb_shm.E031"),
    ({"HOST": "", "PORT": 9808}, "django_lb_shm.E032"),
    ({"HOST": 127, "PORT": 9808}, "django_lb_shm.E032"),
    ({"HOST": "no-such-host.invalid", "PORT": 9808}, "django_lb_shm.E032"),
    ({}, "django_lb_shm.E033"),
    ({"PORT": 0}, "django_lb_shm.E033"),
    ({"PORT": 70000}, "django_lb_shm.E033"),
    ({"PORT": "9808"}, "django_lb_shm.E033"),
    ({"PORT": True}, "django_lb_shm.E033"),
]


@pytest.mark.parametrize("metrics,check_id", BAD_METRICS, ids=[repr(m) for m, _ in BAD_METRICS])
def test_bad_metrics_settings_are_errors(metrics, check_id):
    with override_settings(LOAD_BALANCER=lb_with(metrics)):
        messages = check_load_balancer_settings()
    assert [m.id for m in messages] == [check_id]
    assert "METRICS" in messages[0].msg and messages[0].hint and messages[0].is_serious()


def test_the_coordinators_own_port_is_refused():
    from django.conf import settings

    port = settings.LOAD_BALANCER["ADDRESS"]["PORT"]
    assert check_ids({"PORT": port}) == ["django_lb_shm.E033"]


def test_metrics_without_prometheus_client_is_an_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "prometheus_client", None)   # `import prometheus_client` fails
    assert check_ids({"PORT": 9808}) == ["django_lb_shm.E034"]
    assert check_ids(None) == []


def test_the_launcher_refuses_to_start_with_bad_metrics(tmp_path):
    config = json.loads(open(os.environ["LB_TEST_CONFIG"]).read())
    config["LOAD_BALANCER"]["METRICS"] = {"HOST": "127.0.0.1", "PORT": 0}
    path = tmp_path / "bad-metrics.json"
    path.write_text(json.dumps(config))
    env = dict(os.environ, LB_TEST_CONFIG=str(path), DJANGO_SETTINGS_MODULE="tests.testproject.settings")
    result = subprocess.run([sys.executable, str(LAUNCHER), "run"], env=env, cwd=str(REPO),
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert "django_lb_shm.E033" in result.stderr and "nothing was started" in result.stderr

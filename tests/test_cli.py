"""`djangoloadbalancer status`, and the errors an app sees when the coordinator is not there."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import psutil
import pytest
from django.db import OperationalError, connections
from django.test import override_settings

from django_lb_shm.backend.alias import lb_alias
from django_lb_shm.errors import AuthenticationFailed, CoordinatorUnavailable
from tests.support.lb import ALIASES, REPO
from tests.support.pg_cluster import free_port
from tests.testapp.models import Author, Destination

STATUS = [sys.executable, "bin/djangoloadbalancer", "status"]
MANAGE_STATUS = [sys.executable, "-m", "django", "loadbalancer", "status"]
CONNECT_TIMEOUT = 2


def run(args: list[str], env: dict, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run(args, env=env, cwd=str(REPO), capture_output=True, text=True, timeout=timeout)


def settings_env(tmp_path: Path, name: str, **address) -> tuple[dict, str]:
    """(env, 'host:port') for a copy of the suite's settings JSON with ADDRESS overrides."""
    config = json.loads(Path(os.environ["LB_TEST_CONFIG"]).read_text())
    lb = config["LOAD_BALANCER"]
    lb["ADDRESS"].update(address)
    lb["CONNECT_TIMEOUT"] = CONNECT_TIMEOUT  # CLIENT_TIMEOUT stays the suite's 20 s
    path = tmp_path / f"{name}.json"
    path.write_text(json.dumps(config))
    env = dict(os.environ, LB_TEST_CONFIG=str(path), DJANGO_SETTINGS_MODULE="tests.testproject.settings")
    return env, f"{lb['ADDRESS']['HOST']}:{lb['ADDRESS']['PORT']}"


@pytest.fixture
def no_coordinator(tmp_path) -> tuple[dict, str]:
    return settings_env(tmp_path, "nobody-home", PORT=free_port())


def check_status_json(data: dict, handle) -> None:
    assert [db["name"] for db in data["databases"]] == list(ALIASES)
    for db in data["databases"]:
        assert set(db) >= {"name", "state", "reads", "writes", "pending_writes", "latency_ms"}
        assert db["state"] == "RUNNING"
        assert isinstance(db["reads"], int) and isinstance(db["writes"], int) and db["writes"] >= 1
        assert db["pending_writes"] == 0 and isinstance(db["latency_ms"], (int, float))
    coordinator = data["coordinator"]
    assert coordinator["pid"] == handle.coordinator_pid() and psutil.pid_exists(coordinator["pid"])
    assert coordinator["pid"] != handle.supervisor_pid
    assert isinstance(coordinator["restarts"], int) and coordinator["restarts"] >= 0
    assert coordinator["uptime_s"] > 0


# -- status against the running coordinator -------------------------------------------------------
def test_status_json_and_table(coordinator):
    Author.objects.create(name="counted")
    assert Author.objects.count() == 1
    coordinator.wait_drained()
    env = coordinator.env()
    as_json, table = run(STATUS + ["--json"], env), run(STATUS, env)
    assert as_json.returncode == 0, as_json.stderr
    check_status_json(json.loads(as_json.stdout), coordinator)
    assert table.returncode == 0, table.stderr
    lines = table.stdout.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("database"))
    assert lines[header].split()[:5] == ["database", "state", "reads", "writes", "pending"]
    assert [line.split()[0] for line in lines[header + 1:]] == list(ALIASES)
    assert all(line.split()[1] == "RUNNING" for line in lines[header + 1:])
    assert lines[0].startswith("coordinator ") and f"pid {coordinator.coordinator_pid()}" in lines[0]


def test_the_seed_readme_launcher_name_works(coordinator):
    result = run([sys.executable, "bin/djangoloadbalancer.py", "status", "--json"], coordinator.env())
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["coordinator"]["pid"] == coordinator.coordinator_pid()


def test_manage_py_loadbalancer_status_json(coordinator):
    Destination.objects.create(name="Rome", desc="city")
    coordinator.wait_drained()
    result = run(MANAGE_STATUS + ["--json"], coordinator.env())
    assert result.returncode == 0, result.stderr
    check_status_json(json.loads(result.stdout), coordinator)


def test_settings_option_is_taken_after_the_subcommand_too(coordinator):
    env = dict(coordinator.env())
    del env["DJANGO_SETTINGS_MODULE"]
    for command in (STATUS, MANAGE_STATUS):
        result = run(command + ["--settings", "tests.testproject.settings", "--json"], env)
        assert result.returncode == 0, (command, result.stderr)
        assert json.loads(result.stdout)["coordinator"]["pid"] == coordinator.coordinator_pid()


def test_status_with_invalid_settings_names_the_setting_without_a_traceback(tmp_path):
    config = json.loads(Path(os.environ["LB_TEST_CONFIG"]).read_text())
    config["LOAD_BALANCER"]["WAIT_TIME"] = -1
    path = tmp_path / "broken.json"
    path.write_text(json.dumps(config))
    result = run(STATUS, dict(os.environ, LB_TEST_CONFIG=str(path),
                              DJANGO_SETTINGS_MODULE="tests.testproject.settings"))
    assert result.returncode == 2, result.stderr
    assert "WAIT_TIME" in result.stderr and "Traceback" not in result.stderr


def test_status_shows_a_coordinator_of_other_databases_which_queries_refuse(coordinator, tmp_path):
    env, _ = settings_env(tmp_path, "renamed", PORT=coordinator.lb["ADDRESS"]["PORT"])
    config = json.loads(Path(env["LB_TEST_CONFIG"]).read_text())
    config["DATABASES"]["DB1"]["NAME"] = "not-the-same-database"
    Path(env["LB_TEST_CONFIG"]).write_text(json.dumps(config))
    status = run(STATUS + ["--json"], env)
    assert status.returncode == 0, status.stderr
    assert json.loads(status.stdout)["coordinator"]["pid"] == coordinator.coordinator_pid()
    query = run([sys.executable, "-c", QUERY_SCRIPT], env)
    assert query.returncode == 1
    seen = json.loads(query.stdout)
    assert seen["type"] == "ConfigurationError", seen
    assert "'DB1' is 'not-the-same-database' here" in seen["message"]
    assert "LoadBalancerTestRunner" in seen["message"]


def test_settings_that_cannot_be_imported_are_named_without_a_traceback(no_coordinator):
    env, _ = no_coordinator
    result = run(STATUS + ["--settings", "no_such_project.settings"], env)
    assert result.returncode == 2
    assert "cannot import the settings 'no_such_project.settings'" in result.stderr
    assert "Traceback" not in result.stderr


# -- no coordinator -------------------------------------------------------------------------------
def test_status_without_coordinator_says_where_and_how_to_start_it(no_coordinator):
    env, address = no_coordinator
    started = time.monotonic()
    result = run(STATUS, env)
    elapsed = time.monotonic() - started
    assert result.returncode != 0 and result.stdout == ""
    assert elapsed < CONNECT_TIMEOUT + 5
    assert f"no load balancer coordinator answers at {address}" in result.stderr
    assert "start it with `djangoloadbalancer`" in result.stderr


def test_status_with_nothing_listening_answers_within_a_second(tmp_path):
    # Issue 17: it retried connecting for CONNECT_TIMEOUT (4.8 s) although no supervisor serves the address.
    env, address = settings_env(tmp_path, "nobody-listens", PORT=free_port())
    config = json.loads(Path(env["LB_TEST_CONFIG"]).read_text())
    config["LOAD_BALANCER"]["CONNECT_TIMEOUT"] = 5
    Path(env["LB_TEST_CONFIG"]).write_text(json.dumps(config))
    started = time.monotonic()
    result = run(STATUS, env)
    elapsed = time.monotonic() - started
    assert result.returncode == 1 and result.stdout == ""
    assert f"no load balancer coordinator answers at {address}" in result.stderr
    assert elapsed < 3.0, elapsed   # Python and Django start-up (0.3-0.5 s here) and one connection attempt


def test_status_while_the_supervisor_restarts_the_coordinator_waits_for_it(lb_factory):
    handle = lb_factory("status-restart", CONNECT_TIMEOUT=15)
    old_pid = handle.coordinator_pid()
    os.kill(old_pid, signal.SIGKILL)
    result = run(STATUS + ["--json"], handle.env())
    assert result.returncode == 0, result.stderr + handle.log()
    assert json.loads(result.stdout)["coordinator"]["pid"] != old_pid


QUERY_SCRIPT = textwrap.dedent("""
    import json, sys, time
    import django
    django.setup()
    from django.db import OperationalError
    from tests.testapp.models import Destination
    started = time.monotonic()
    try:
        Destination.objects.count()
    except Exception as exc:
        print(json.dumps({"type": type(exc).__name__, "operational": isinstance(exc, OperationalError),
                          "elapsed": time.monotonic() - started, "message": str(exc)}))
        raise
""")


def test_model_query_without_coordinator_is_an_operational_error(no_coordinator):
    env, address = no_coordinator
    result = run([sys.executable, "-c", QUERY_SCRIPT], env)
    assert result.returncode == 1
    seen = json.loads(result.stdout)
    # No supervisor serves the address on this host: nothing to wait CONNECT_TIMEOUT for
    # (tests/test_fail_fast.py has the waits).
    assert seen["type"] == "CoordinatorDown" and seen["operational"]
    assert seen["elapsed"] < 0.5
    assert f"no load balancer coordinator answers at {address}" in seen["message"]
    assert "start it with `djangoloadbalancer`" in seen["message"]
    assert "CoordinatorDown" in result.stderr and address in result.stderr


def wrong_key(handle, **timeouts) -> dict:
    return dict(handle.lb, ADDRESS=dict(handle.lb["ADDRESS"], AUTHKEY="not-the-authkey"), **timeouts)


def test_wrong_authkey_is_refused_clearly(coordinator, tmp_path):
    with override_settings(LOAD_BALANCER=wrong_key(coordinator, CONNECT_TIMEOUT=1, CLIENT_TIMEOUT=1)):
        with pytest.raises(AuthenticationFailed) as caught:
            Destination.objects.count()
    assert isinstance(caught.value, OperationalError) and isinstance(caught.value, CoordinatorUnavailable)
    address = f"{coordinator.lb['ADDRESS']['HOST']}:{coordinator.lb['ADDRESS']['PORT']}"
    assert f"coordinator at {address} refused the AUTHKEY" in str(caught.value)
    assert "not-the-authkey" not in str(caught.value)  # the secret is not echoed

    env, _ = settings_env(tmp_path, "wrong-key", AUTHKEY="not-the-authkey")
    started = time.monotonic()
    result = run(STATUS, env)
    assert result.returncode != 0 and f"at {address} refused the AUTHKEY" in result.stderr
    assert time.monotonic() - started < 10
    # the coordinator shrugged it off
    assert Destination.objects.count() == 0
    assert coordinator.status()["coordinator"]["state"] == "READY"


def test_refused_authkey_is_not_retried(coordinator):
    started = time.monotonic()
    with override_settings(LOAD_BALANCER=wrong_key(coordinator, CONNECT_TIMEOUT=1, CLIENT_TIMEOUT=2)):
        with pytest.raises(AuthenticationFailed):
            Destination.objects.count()
    assert time.monotonic() - started < 1.0  # one refusal is final


def test_unpicklable_query_argument_is_a_type_error_and_the_coordinator_keeps_serving(coordinator):
    lock = threading.Lock()
    with connections[lb_alias()].cursor() as cursor:
        with pytest.raises(TypeError, match=r"query parameter .*lock.* cannot be sent"):
            cursor.execute("SELECT %s", [lock])
        cursor.execute("SELECT %s", [41])
        assert cursor.fetchone()[0] in (41, "41")
    with pytest.raises(TypeError, match=r"of type lock cannot be sent to the load balancer coordinator"):
        Destination.objects.extra(where=["name = %s"], params=[lock]).count()
    Destination.objects.create(name="Oslo", desc="city")
    assert Destination.objects.filter(name="Oslo").count() == 1
    assert coordinator.status()["coordinator"]["restarts"] == 0


# -- migrate -------------------------------------------------------------------------------------
def test_djangoloadbalancer_migrate_migrates_every_copy_and_plain_migrate_says_it_did_one(tmp_path):
    env, _ = settings_env(tmp_path, "migrate")
    every = run([sys.executable, "bin/djangoloadbalancer", "migrate"], env)
    assert every.returncode == 0, every.stderr
    assert [line for line in every.stdout.splitlines() if line.startswith("== migrating")] == [
        f"== migrating {alias}" for alias in ALIASES]
    assert "only database" not in every.stdout

    one = run([sys.executable, "-m", "django", "migrate", "--database", "DB1"], env)
    assert one.returncode == 0, one.stderr
    others = ", ".join(repr(alias) for alias in ALIASES if alias != "DB1")
    assert f"only database 'DB1' was changed; the other load-balanced databases ({others}) were not" in one.stdout
    assert one.stdout.count("only database") == 1
    quiet = run([sys.executable, "-m", "django", "migrate", "--database", "DB1", "-v", "0"], env)
    assert quiet.returncode == 0 and "only database" not in quiet.stdout

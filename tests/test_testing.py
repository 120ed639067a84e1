"""``manage.py test`` in a project with load-balanced models: LoadBalancerTestRunner.

A real ``python -m django test`` run against the suite's databases (SQLite files or
PostgreSQL servers) while the suite's coordinator serves the real ones.
"""
from __future__ import annotations

import re
import subprocess
import sys
import time

import psutil

from tests.support.lb import REPO
from tests.testapp.models import Author

CASES = "tests.support.django_testcases"
DJANGO_TEST = [sys.executable, "-m", "django", "test", "-v", "2"]
RUNNER = "django_lb_shm.testing.LoadBalancerTestRunner"
# (SerializedRollbackTestCase runs on its own: after another TransactionTestCase, Django's
# serialized rollback fails on the content types the flush re-created, load-balanced or not.)
ALL_BUT_SLOW = [f"{CASES}.{name}" for name in ("LoadBalancedTestCase", "LoadBalancedTransactionTestCase",
                                               "NoDatabaseTestCase")]


def run_django_tests(env: dict, runner: str, labels: list = ALL_BUT_SLOW, **kwargs) -> subprocess.CompletedProcess:
    kwargs.setdefault("cwd", str(REPO))
    return subprocess.run(DJANGO_TEST + labels + ["--testrunner", runner], env=env,
                          capture_output=True, text=True, timeout=300, **kwargs)


def test_the_runner_gives_the_tests_their_own_coordinator_on_the_test_databases(coordinator, replicas):
    Author.objects.create(name="real")
    result = run_django_tests(coordinator.env(), RUNNER)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Ran 5 tests" in result.stderr and "OK" in result.stderr
    assert "only database" not in result.stdout   # migrating the test databases is no "one copy" change
    assert "Load balancer coordinator for the test databases at 127.0.0.1:" in result.stdout
    # Nothing of the tests reached the real databases, and their coordinator served on.
    replicas.assert_identical()
    assert list(Author.objects.values_list("name", flat=True)) == ["real"]
    assert coordinator.status()["coordinator"]["restarts"] == 0


def test_without_the_runner_the_tests_are_refused_rather_than_run_on_the_real_databases(coordinator, replicas):
    Author.objects.create(name="real")
    result = run_django_tests(coordinator.env(), "django.test.runner.DiscoverRunner")
    output = result.stdout + result.stderr
    assert result.returncode != 0, output
    assert "django_lb_shm.testing.LoadBalancerTestRunner" in output, output
    replicas.assert_identical()
    assert list(Author.objects.values_list("name", flat=True)) == ["real"]


def test_serialized_rollback_test_cases_run_with_the_runner(coordinator):
    result = run_django_tests(coordinator.env(), RUNNER, [f"{CASES}.SerializedRollbackTestCase"])
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Ran 1 test" in result.stderr and "OK" in result.stderr


def test_the_runner_works_from_another_directory(coordinator, tmp_path):
    # As `cd elsewhere && python /project/manage.py test`: the project is on the test
    # process's path only, not in the working directory or PYTHONPATH.
    manage = tmp_path / "manage.py"
    manage.write_text(
        f"import sys\nsys.path.insert(0, {str(REPO)!r})\n"
        "from django.core.management import execute_from_command_line\nexecute_from_command_line(sys.argv)\n"
    )
    env = dict(coordinator.env())
    env["PYTHONPATH"] = ""
    result = subprocess.run([sys.executable, str(manage), "test", f"{CASES}.LoadBalancedTestCase",
                             "--testrunner", RUNNER], env=env, cwd=str(tmp_path),
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Ran 3 tests" in result.stderr


def test_the_test_coordinator_stops_when_the_test_process_is_killed(coordinator):
    env = dict(coordinator.env(), LB_SLOW_TEST_SECONDS="60")
    proc = subprocess.Popen(DJANGO_TEST + [f"{CASES}.SlowTestCase", "--testrunner", RUNNER], env=env,
                            cwd=str(REPO), stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        line = ""
        deadline = time.monotonic() + 120
        while "Load balancer coordinator for the test databases" not in line and time.monotonic() < deadline:
            line = proc.stdout.readline()
            assert line or proc.poll() is None, "the test process ended before its coordinator started"
        supervisor = psutil.Process(int(re.search(r"\(pid (\d+)\)", line).group(1)))
        coordinator_processes = supervisor.children(recursive=True)
        time.sleep(1)   # the slow test is running
    finally:
        proc.kill()
        proc.wait(30)
    gone, alive = psutil.wait_procs([supervisor] + coordinator_processes, timeout=30)
    assert not alive, f"still running after the test process was killed: {alive}"


def test_the_test_coordinator_runs_with_the_settings_the_test_process_made_at_run_time(coordinator):
    # As Django's runtests.py: INSTALLED_APPS (an app without migrations, the admin), TEMPLATES
    # and MIDDLEWARE are set after the settings module is read. The coordinator, which imports
    # that module itself, must know the app's table (its write guard) and pass the admin's checks.
    result = subprocess.run([sys.executable, "-m", "tests.support.runtime_settings_tests"], env=coordinator.env(),
                            cwd=str(REPO), capture_output=True, text=True, timeout=300)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert "Ran 1 test" in result.stderr and "OK" in result.stderr, output
    assert "Load balancer coordinator for the test databases at 127.0.0.1:" in result.stdout


def test_runtime_settings_are_the_ones_that_differ_from_the_settings_module(coordinator):
    from django.conf import settings
    from django.test import override_settings

    from django_lb_shm.settings.overrides import runtime_settings

    with override_settings(MIDDLEWARE=["x.Middleware"], LANGUAGE_CODE="fr"):
        changed = runtime_settings(settings)
    assert changed["MIDDLEWARE"] == ["x.Middleware"] and changed["LANGUAGE_CODE"] == "fr"
    assert "DATABASES" not in changed and "LOAD_BALANCER" not in changed and "SECRET_KEY" not in changed

"""``manage.py test`` in a project with load-balanced models: LoadBalancerTestRunner.

A real ``python -m django test`` run against the suite's databases (SQLite files or
PostgreSQL servers) while the suite's coordinator serves the real ones.
"""
from __future__ import annotations

import subprocess
import sys

from tests.support.lb import REPO
from tests.testapp.models import Author

DJANGO_TEST = [sys.executable, "-m", "django", "test", "tests.support.django_testcases", "-v", "2"]


def run_django_tests(env: dict, runner: str) -> subprocess.CompletedProcess:
    return subprocess.run(DJANGO_TEST + ["--testrunner", runner], env=env, cwd=str(REPO),
                          capture_output=True, text=True, timeout=300)


def test_the_runner_gives_the_tests_their_own_coordinator_on_the_test_databases(coordinator, replicas):
    Author.objects.create(name="real")
    result = run_django_tests(coordinator.env(), "django_lb_shm.testing.LoadBalancerTestRunner")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Ran 4 tests" in result.stderr and "OK" in result.stderr
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

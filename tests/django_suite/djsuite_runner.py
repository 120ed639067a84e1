"""Test runners of the Django-suite bar (tests/django_suite/run.sh).

Both record every test's outcome in the JSON file named by DJSUITE_RESULTS, for compare.py.
The load-balanced one also runs `verify` on the copies before the test databases are dropped
and records its exit code there.
"""
from __future__ import annotations

import io
import json
import os
import unittest
from typing import Any

from django.test.runner import DiscoverRunner

from django_lb_shm.testing import LoadBalancerTestRunner

_OUTCOMES: dict = {}
_EXTRA: dict = {}


def _describe(err: Any) -> str:
    exc_type, exc_value, _tb = err
    first = (str(exc_value).strip().splitlines() or [""])[0]
    return f"{exc_type.__name__}: {first[:300]}"


class RecordingResult(unittest.TextTestResult):
    """TextTestResult that also keeps {test id: [outcome, detail]}."""

    def _keep(self, test: Any, outcome: str, detail: str = "") -> None:
        previous = _OUTCOMES.get(test.id())
        if previous and previous[0] in ("fail", "error"):   # a failed subtest decides the test
            return
        _OUTCOMES[test.id()] = [outcome, detail]

    def addSuccess(self, test: Any) -> None:
        super().addSuccess(test)
        self._keep(test, "ok")

    def addFailure(self, test: Any, err: Any) -> None:
        super().addFailure(test, err)
        self._keep(test, "fail", _describe(err))

    def addError(self, test: Any, err: Any) -> None:
        super().addError(test, err)
        self._keep(test, "error", _describe(err))

    def addSkip(self, test: Any, reason: str) -> None:
        super().addSkip(test, reason)
        self._keep(test, "skip", reason)

    def addExpectedFailure(self, test: Any, err: Any) -> None:
        super().addExpectedFailure(test, err)
        self._keep(test, "ok", "expected failure")

    def addUnexpectedSuccess(self, test: Any) -> None:
        super().addUnexpectedSuccess(test)
        self._keep(test, "fail", "unexpected success")

    def addSubTest(self, test: Any, subtest: Any, err: Any) -> None:
        super().addSubTest(test, subtest, err)
        if err is not None:   # the first failing subtest names the test's failure
            failed = issubclass(err[0], test.failureException)
            self._keep(test, "fail" if failed else "error", f"[subtest] {_describe(err)}")


def _write_results() -> None:
    path = os.environ.get("DJSUITE_RESULTS")
    if path:
        with open(path, "w") as f:
            json.dump({"tests": _OUTCOMES, **_EXTRA}, f, indent=0, sort_keys=True)


class Recording:
    """Mixed into a runner: every test's outcome, written to DJSUITE_RESULTS after the run."""

    def get_resultclass(self) -> Any:
        return RecordingResult

    def run_suite(self, suite: Any, **kwargs: Any) -> Any:
        try:
            return super().run_suite(suite, **kwargs)
        finally:
            _write_results()


class RecordingRunner(Recording, DiscoverRunner):
    pass


class VerifyingLoadBalancerRunner(Recording, LoadBalancerTestRunner):
    """The package's runner, recording outcomes, with `verify` on the copies at the end."""

    def teardown_databases(self, old_config: Any, **kwargs: Any) -> None:
        from django_lb_shm.ops.verify import verify

        out = io.StringIO()
        try:
            code = verify(progress=False, stream=out)
        except Exception as exc:   # reported, and run.sh fails on it
            code, out = 2, io.StringIO(f"verify raised {type(exc).__name__}: {exc}\n")
        _EXTRA["verify"] = {"exit_code": code, "output": out.getvalue()[-20000:]}
        print(f"djsuite: verify of the copies exited with {code}")
        _write_results()
        super().teardown_databases(old_config, **kwargs)

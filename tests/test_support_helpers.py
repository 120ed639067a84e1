"""The suite's own helpers fail when what they wait for or run fails (tests/support/waiting.py, threads.py)."""
from __future__ import annotations

import subprocess
import time

import pytest

from django_lb_shm.errors import AnswerTimeout, CoordinatorUnavailable
from tests.support.threads import Workers, run_threads
from tests.support.waiting import NOT_ANSWERING, pid_gone, wait_drained, wait_pid_gone, wait_until


def test_wait_until_returns_the_first_truthy_value():
    values = iter([0, None, "", "ready", "later"])
    assert wait_until(lambda: next(values), 5, "a value", every=0) == "ready"


def test_wait_until_fails_in_time_naming_what_and_the_last_value():
    asked = []
    started = time.monotonic()
    with pytest.raises(AssertionError, match=r"timed out after 0.3s waiting for the answer; last value seen: \[\]"):
        wait_until(lambda: asked.append(1) or [], 0.3, "the answer", every=0.05)
    assert 0.3 <= time.monotonic() - started < 2
    assert 2 <= len(asked) <= 8   # bounded in count too: every 0.05 s for 0.3 s


def test_wait_until_describes_a_bare_false():
    with pytest.raises(AssertionError, match=r"last value seen: \{'DB1': 'DOWN'\}"):
        wait_until(lambda: False, 0.1, "DB1 RUNNING", describe=lambda: {"DB1": "DOWN"})


def test_wait_until_ignores_only_the_errors_it_is_told_to():
    def no_coordinator():
        raise CoordinatorUnavailable("no load balancer coordinator answers")

    with pytest.raises(AssertionError, match="last value seen: CoordinatorUnavailable"):
        wait_until(no_coordinator, 0.2, "a status", ignoring=NOT_ANSWERING)
    answers = iter([AnswerTimeout("late"), {"state": "READY"}])

    def status():
        answer = next(answers)
        if isinstance(answer, Exception):
            raise answer
        return answer

    assert wait_until(status, 5, "a status", every=0, ignoring=NOT_ANSWERING) == {"state": "READY"}
    with pytest.raises(KeyError):   # a bug in the predicate is not "not yet"
        wait_until(lambda: {}["state"], 5, "a status", ignoring=NOT_ANSWERING)


def test_wait_drained_names_what_is_still_pending():
    status = {"databases": [{"name": "DB1", "state": "RUNNING", "pending_writes": 3},
                            {"name": "DB2", "state": "DOWN", "pending_writes": 9}]}
    with pytest.raises(AssertionError, match=r"writes still pending after 0.2s: \{'DB1': 3\}"):
        wait_drained(lambda: status, 0.2)
    status["databases"][0]["pending_writes"] = 0
    assert wait_drained(lambda: status, 0.2) is status   # a DOWN copy's backlog is not waited for


def test_wait_pid_gone_on_a_real_process():
    proc = subprocess.Popen(["sleep", "30"])
    try:
        with pytest.raises(AssertionError, match=rf"sleeper {proc.pid} still running after 0.2s \(.*sleep 30\)"):
            wait_pid_gone(proc.pid, 0.2, "sleeper")
        proc.kill()
        wait_pid_gone(proc.pid, 10, "sleeper")   # a zombie (not reaped yet) counts as gone
        assert pid_gone(proc.pid)
    finally:
        proc.kill()
        proc.wait(10)
    assert pid_gone(proc.pid)


def test_an_assert_in_a_worker_thread_fails_the_test():
    def worker():
        assert 1 + 1 == 3, "arithmetic"

    with pytest.raises(AssertionError, match=r"worker threads failed:\n(.|\n)*AssertionError: arithmetic"):
        run_threads(worker, 2, 10)


def test_a_worker_still_running_fails_the_test():
    workers = Workers(lambda: time.sleep(2), 1).start()
    with pytest.raises(AssertionError, match=r"\['worker-0'\] still running after 0.1s"):
        workers.join(0.1)
    workers.join(10)


def test_workers_run_their_cleanup_even_when_they_fail():
    cleaned = []

    def worker():
        raise ValueError("boom")

    with pytest.raises(AssertionError, match="ValueError: boom"):
        run_threads(worker, 3, 10, cleanup=lambda: cleaned.append(1))
    assert cleaned == [1, 1, 1]

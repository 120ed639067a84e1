"""PeriodicThread, the shape of the coordinator's watches: a tick every interval, a failing tick
logged and survived, stop() honoured within an interval."""
from __future__ import annotations

import logging

from django_lb_shm.periodic import PeriodicThread
from tests.support.waiting import wait_until


class Counting(PeriodicThread):
    def __init__(self, fail_on: int):
        super().__init__("counting", 0.01, logging.getLogger("django_lb_shm.test_periodic"))
        self.ticks = 0
        self.fail_on = fail_on

    def tick(self) -> None:
        self.ticks += 1
        if self.ticks == self.fail_on:
            raise RuntimeError("tick two fails")


def test_a_failing_tick_is_logged_and_the_thread_goes_on(caplog):
    thread = Counting(fail_on=2)
    with caplog.at_level(logging.ERROR, logger="django_lb_shm.test_periodic"):
        thread.start()
        try:
            wait_until(lambda: thread.ticks >= 5, what="five ticks", timeout=5)
        finally:
            thread.stop()
            thread.join(timeout=5)
    assert not thread.is_alive()
    failures = [r for r in caplog.records if "counting failed" in r.getMessage()]
    assert len(failures) == 1 and failures[0].exc_info[0] is RuntimeError


def test_stop_ends_it_before_the_next_tick():
    thread = Counting(fail_on=0)
    thread.interval = 30.0
    thread.start()
    thread.stop()
    thread.join(timeout=5)
    assert not thread.is_alive() and thread.ticks == 0

"""The suite's one set of waiting helpers: every wait is bounded in time, and a wait that
runs out fails naming what it waited for and the last value it saw.
"""
from __future__ import annotations

import time
from typing import Callable, Optional, TypeVar

import psutil

from django_lb_shm.errors import AnswerTimeout, CoordinatorUnavailable

T = TypeVar("T")

# What asking a coordinator for its status raises while none answers (starting, restarting,
# stopping): the connection is refused or lost, or the answer does not come in time.
NOT_ANSWERING = (CoordinatorUnavailable, AnswerTimeout)


def wait_until(predicate: Callable[[], T], timeout: float, what: str, every: float = 0.05,
               ignoring: tuple[type[BaseException], ...] = (),
               describe: Optional[Callable[[], object]] = None) -> T:
    """``predicate()``'s first truthy value, asked every ``every`` s for at most ``timeout`` s.

    An exception in ``ignoring`` counts as "not yet" (and is the last value seen); any
    other one fails the wait at once.  On timeout the error names ``what`` and the last
    value seen, or ``describe()`` when the predicate's own value (a bare False) says little.
    """
    deadline = time.monotonic() + timeout
    while True:
        try:
            last: object = predicate()
        except ignoring as exc:
            last = exc
        else:
            if last:
                return last  # type: ignore[return-value]
        if time.monotonic() >= deadline:
            seen = describe() if describe is not None else last
            raise AssertionError(f"timed out after {timeout}s waiting for {what}; last value seen: {seen!r}")
        time.sleep(every)


def pending_writes(status: dict) -> dict[str, int]:
    """Writes each RUNNING database has still to apply, from a coordinator status."""
    return {d["name"]: d["pending_writes"] for d in status["databases"] if d["state"] == "RUNNING"}


def wait_drained(status: Callable[[], dict], timeout: float = 30, every: float = 0.05) -> dict:
    """The first ``status()`` in which every RUNNING database has applied every write."""
    seen: dict = {}

    def drained() -> Optional[dict]:
        seen["status"] = status()
        return None if any(pending_writes(seen["status"]).values()) else seen["status"]

    try:
        return wait_until(drained, timeout, "every RUNNING database to apply every write", every)
    except AssertionError:
        raise AssertionError(f"writes still pending after {timeout}s: {pending_writes(seen['status'])}") from None


def names_on_alias(alias: str, fresh: bool = False) -> list[str]:
    """The testapp Author names on database ``alias`` itself, in primary key order.

    ``fresh``: on a new connection (one opened before a coordinator restart or a server
    crash may be stale).
    """
    from django.db import connections

    from tests.support.lb import table_rows

    if fresh:
        connections[alias].close()
    return [row[1] for row in table_rows(alias, "testapp_author")]


def pid_gone(pid: int) -> bool:
    """The process ended (a zombie counts as ended: nobody may reap it in a container)."""
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def wait_pid_gone(pid: int, timeout: float = 15, what: str = "process") -> None:
    """Until process ``pid`` has ended (see ``pid_gone``)."""
    try:
        wait_until(lambda: pid_gone(pid), timeout, f"{what} {pid} to end")
    except AssertionError:
        try:
            state = f"{psutil.Process(pid).status()}: {' '.join(psutil.Process(pid).cmdline())[:200]}"
        except psutil.Error as exc:
            state = repr(exc)
        raise AssertionError(f"{what} {pid} still running after {timeout}s ({state})") from None


def wait_logged(handle, text: str, timeout: float, every: float = 0.1) -> None:
    """Until ``text`` is in coordinator ``handle``'s log (a CoordinatorHandle)."""
    try:
        wait_until(lambda: text in handle.log(), timeout, f"{text!r} in the coordinator's log", every)
    except AssertionError:
        raise AssertionError(f"{text!r} not in the coordinator's log after {timeout}s:\n{handle.log()}") from None


def pools_opened_by_reads(handle, read: Callable[[], bool]) -> bool:
    """True once every database of coordinator ``handle`` has a pooled read connection open;
    until then one more ``read()`` (reads open the pools), which must find its row."""
    if all(d["read_connections"]["open"] for d in handle.status()["databases"]):
        return True
    assert read(), "a read made to open the read pools found nothing"
    return False

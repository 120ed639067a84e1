"""Worker threads whose failures reach the test: pytest only warns about an exception (an
assert included) raised in a thread it did not start, so a run where every worker failed
would pass.  ``run_threads`` collects them and fails in the test's own thread.
"""
from __future__ import annotations

import threading
import traceback
from typing import Callable


class Workers:
    """Threads running ``target``; ``join`` fails naming every worker that raised or still runs."""

    def __init__(self, target: Callable[[], object], count: int, cleanup: Callable[[], object] | None = None):
        self.failures: list[str] = []
        self._lock = threading.Lock()
        self._target, self._cleanup = target, cleanup
        self.threads = [threading.Thread(target=self._run, name=f"worker-{n}", daemon=True) for n in range(count)]

    def _run(self) -> None:
        try:
            self._target()
        except BaseException:  # noqa: BLE001 - every failure, asserts included, goes to the test
            with self._lock:
                self.failures.append(f"{threading.current_thread().name}: {traceback.format_exc(limit=-3)}")
        finally:
            if self._cleanup is not None:
                self._cleanup()

    def start(self) -> "Workers":
        for thread in self.threads:
            thread.start()
        return self

    def join(self, timeout: float) -> None:
        for thread in self.threads:
            thread.join(timeout)
        running = [t.name for t in self.threads if t.is_alive()]
        assert not running, f"{running} still running after {timeout}s"
        assert not self.failures, "worker threads failed:\n" + "\n".join(self.failures)


def run_threads(target: Callable[[], object], count: int, timeout: float,
                cleanup: Callable[[], object] | None = None) -> None:
    """``count`` threads running ``target`` at once; fails in the caller's thread if any raised."""
    Workers(target, count, cleanup).start().join(timeout)

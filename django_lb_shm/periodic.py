"""A thread that does one thing every interval until it is stopped: the watches' common shape."""
from __future__ import annotations

import logging
import threading


class PeriodicThread(threading.Thread):
    """Calls :meth:`tick` every ``interval`` seconds until :meth:`stop`.

    A tick that raises is logged on ``logger`` and the thread goes on: a watch that stopped
    would leave requests waiting on what it alone acts on.
    """

    def __init__(self, name: str, interval: float, logger: logging.Logger):
        super().__init__(name=name, daemon=True)
        self.interval = interval
        self.stop_event = threading.Event()
        self._logger = logger

    def tick(self) -> None:
        raise NotImplementedError

    def run(self) -> None:
        while not self.stop_event.wait(self.interval):
            try:
                self.tick()
            except Exception:
                self._logger.exception("%s failed; it goes on", self.name)

    def stop(self) -> None:
        self.stop_event.set()

"""A few connections per database that server threads borrow to run reads themselves.

Handing a read to the database thread and back costs two thread wake-ups, as
much as the read itself on a small machine.  So when a database has applied
every sequenced write, the server thread that received the read runs it on one
of these connections; when none is idle, or the database is catching up, the
read goes through the database thread's queue (which keeps it behind the
writes queued before it).

Connections are opened by the database thread (``grow`` asks it to), never by
a server thread: connecting to a server that accepts but never answers cannot
be cut from outside.  A borrowed connection stuck on a hung database is cut by
the coordinator's watchdog after READ_TIMEOUT (:meth:`ReadPool.cut_overdue`,
``DbConnection.interrupt``): the server thread gets an error and retries the
read elsewhere.
"""
from __future__ import annotations

import threading
import time
from typing import Any, Callable, Optional


class PooledConnection:
    __slots__ = ("conn", "generation", "busy_since", "interrupted")

    def __init__(self, conn: Any, generation: int):
        self.conn = conn
        self.generation = generation
        self.busy_since = 0.0
        self.interrupted = False


class ReadPool:
    """Up to ``size`` open connections to one database."""

    def __init__(self, size: int, new_connection: Callable[[], Any], grow: Callable[[], None]):
        self.size = size
        self.new_connection = new_connection  # a db_thread.DbConnection, not yet open
        self.grow = grow                      # asks the database thread to call open_one()
        self._idle: list[PooledConnection] = []
        self._busy: set[PooledConnection] = set()
        self._count = 0
        self._opening = False
        self._no_growth_until = 0.0   # after a failed open: reads use the queue meanwhile
        self._generation = 0
        self._lent = 0                # reads run on these connections, for status
        self._lock = threading.Lock()

    def checkout(self) -> Optional[PooledConnection]:
        """An idle connection, or None (never waits; asks for one more while under ``size``)."""
        with self._lock:
            if self._idle:
                pooled = self._idle.pop()
                pooled.busy_since = time.monotonic()
                self._busy.add(pooled)
                self._lent += 1
                return pooled
            wants_more = (not self._opening and self._count < self.size
                          and time.monotonic() >= self._no_growth_until)
            self._opening = self._opening or wants_more
        if wants_more:
            self.grow()
        return None

    def open_one(self, retry_after: float = 5.0) -> None:
        """Open one more connection (on the database thread); the driver's error if it cannot.

        After a failure no more are asked for during ``retry_after`` seconds (a server
        at max_connections must not be hammered); the pool stays at its size.
        """
        with self._lock:
            generation = self._generation
        conn = self.new_connection()
        try:
            conn.open()
        except BaseException:
            with self._lock:
                self._no_growth_until = time.monotonic() + retry_after
            raise
        finally:
            with self._lock:
                self._opening = False
                keep = conn.is_open and generation == self._generation and self._count < self.size
                if keep:
                    self._count += 1
                    self._idle.append(PooledConnection(conn, generation))
        if not keep:
            conn.close()

    def checkin(self, pooled: PooledConnection, broken: bool = False) -> None:
        with self._lock:
            self._busy.discard(pooled)
            if not (broken or pooled.interrupted or pooled.generation != self._generation):
                self._idle.append(pooled)
                return
            self._count -= 1
        pooled.conn.close()

    def reset(self) -> None:
        """The database went down: close the idle connections; busy ones are closed when returned."""
        with self._lock:
            self._generation += 1
            idle, self._idle = self._idle, []
            self._count -= len(idle)
        for pooled in idle:
            pooled.conn.close()

    def cut_overdue(self, limit: float) -> list[PooledConnection]:
        """Interrupt the statements borrowed connections have been running for over ``limit`` seconds.

        Under the lock: a connection given back (and perhaps lent again) meanwhile
        is never cut by mistake, nor closed while it is being cut.
        """
        now = time.monotonic()
        cut = []
        with self._lock:
            for pooled in self._busy:
                if not pooled.interrupted and now - pooled.busy_since > limit:
                    pooled.interrupted = True
                    pooled.conn.interrupt()
                    cut.append(pooled)
        return cut

    def is_current(self, pooled: PooledConnection) -> bool:
        """Lent since the last reset (False: the database went down after it was lent)."""
        return pooled.generation == self._generation

    def stats(self) -> dict:
        with self._lock:
            return {"size": self.size, "open": self._count, "busy": len(self._busy), "reads": self._lent}

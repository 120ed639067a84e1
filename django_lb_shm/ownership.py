"""One coordinator per database.

Two coordinators serving the same databases (a settings copy with another
PORT, a second host) would each number writes from the same journal position
and the copies would end up different.  So each database thread *claims* its
database before it serves it, and holds the claim while it runs:

* PostgreSQL: a session advisory lock taken on the database thread's own
  connection (scoped to that database; released by the server when the
  session ends, so a killed coordinator never leaves it behind);
* SQLite: an exclusive ``flock`` on ``<database file>.django_lb_shm.lock``,
  held by the coordinator process (released by the kernel when it exits).
"""
from __future__ import annotations

import fcntl
import os
import time
from typing import Any, Optional

from .errors import DatabaseOwnedElsewhere

# pg_try_advisory_lock(int4, int4): its own key space, apart from the bigint form apps tend to use.
ADVISORY_KEYS = (0x6C62, 0x73686D)   # "lb", "shm"
LOCK_SUFFIX = ".django_lb_shm.lock"
# A coordinator that was just stopped or killed: its server sessions end within moments.
CLAIM_WAIT = 5.0


class Ownership:
    """The claim of one database by this coordinator process."""

    def __init__(self, alias: str, holder: str):
        self.alias = alias
        self.holder = holder     # who we are, for the message the other coordinator prints
        self._lock_file: Optional[int] = None

    def claim(self, conn: Any, wait: float = CLAIM_WAIT) -> None:
        """Claim the database ``conn`` (an open DbConnection) reaches; DatabaseOwnedElsewhere if another holds it."""
        vendor = conn.wrapper.vendor
        deadline = time.monotonic() + wait
        while True:
            other = self._try_claim(conn, vendor)
            if other is None:
                return
            if time.monotonic() >= deadline:
                raise DatabaseOwnedElsewhere(
                    f"database {self.alias!r} is already served by another django_lb_shm coordinator ({other}); "
                    "stop that one, or give this one other databases: two coordinators on the same "
                    "databases would apply writes in different orders"
                )
            time.sleep(0.2)

    def _try_claim(self, conn: Any, vendor: str) -> Optional[str]:
        """None when claimed; else a description of the holder."""
        if vendor == "postgresql":
            return self._try_advisory_lock(conn)
        if vendor == "sqlite":
            return self._try_lock_file(str(conn.wrapper.settings_dict["NAME"]))
        return None

    def _try_advisory_lock(self, conn: Any) -> Optional[str]:
        conn.run("SELECT set_config('application_name', %s, false)", (self.holder[:63],))
        if conn.run("SELECT pg_try_advisory_lock(%s, %s)", ADVISORY_KEYS).rows[0][0]:
            return None
        rows = conn.run(
            "SELECT a.application_name, a.client_addr, a.pid FROM pg_locks l JOIN pg_stat_activity a "
            "ON a.pid = l.pid WHERE l.locktype = 'advisory' AND l.granted AND l.classid = %s "
            "AND l.objid = %s AND l.objsubid = 2 AND l.database = "
            "(SELECT oid FROM pg_database WHERE datname = current_database())",
            ADVISORY_KEYS,
        ).rows
        if not rows:
            return "it let go just now"
        name, addr, pid = rows[0]
        return f"{name or 'an unnamed session'}, server backend pid {pid}" + (f" from {addr}" if addr else "")

    def _try_lock_file(self, database_file: str) -> Optional[str]:
        if self._lock_file is not None:
            return None
        path = database_file + LOCK_SUFFIX
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 200, 0).decode(errors="replace").strip()
            os.close(fd)
            return f"{holder or 'unknown'}; lock file {path}"
        except BaseException:
            os.close(fd)
            raise
        os.ftruncate(fd, 0)
        os.pwrite(fd, self.holder.encode(), 0)
        self._lock_file = fd
        return None

    def release(self) -> None:
        fd, self._lock_file = self._lock_file, None
        if fd is not None:
            os.close(fd)   # the kernel drops the flock

"""One coordinator per database.

Two coordinators serving the same databases (a settings copy with another
PORT, a second host) would each number writes from their own journal and the
copies would end up different.  So each database is *claimed* before the
coordinator reads or writes anything of it, and the claim is held while it
serves it:

* PostgreSQL: a session advisory lock on the database thread's own connection
  (scoped to that database; the server drops it when the session ends).  A
  session the server has not yet noticed is dead -- a coordinator that was just
  stopped while its query ran, our own connection cut by a network failure --
  still holds it: when its holder names a coordinator process of this host that
  no longer runs (or this very process), that session is terminated and the
  claim taken.
* SQLite: an exclusive ``flock`` on ``<database file>.django_lb_shm.lock``,
  held by the coordinator process (the kernel drops it when the process exits).
"""
from __future__ import annotations

import fcntl
import logging
import os
import re
import time
import urllib.parse
from typing import Any, Optional

from .errors import DatabaseOwnedElsewhere

logger = logging.getLogger("django_lb_shm.ownership")

# pg_try_advisory_lock(int4, int4): its own key space, apart from the bigint form apps tend to use.
ADVISORY_KEYS = (0x6C62, 0x73686D)   # "lb", "shm"
LOCK_SUFFIX = ".django_lb_shm.lock"
# Enough for a coordinator that was just stopped gracefully to let its sessions go.
CLAIM_WAIT = 5.0
HOLDER_PREFIX = "django_lb_shm coordinator pid"
_HOLDER_PID = re.compile(re.escape(HOLDER_PREFIX) + r" (\d+)")
_LOCAL_ADDRESSES = (None, "127.0.0.1", "::1")


class Ownership:
    """The claim of one database by this coordinator process."""

    def __init__(self, alias: str, address: Any):
        self.alias = alias
        self.holder = f"{HOLDER_PREFIX} {os.getpid()} at {address}"[:63]   # PostgreSQL's NAMEDATALEN
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
            return self._try_lock_file(sqlite_path(conn.wrapper.settings_dict["NAME"]))
        return None

    # -- PostgreSQL ---------------------------------------------------------------------
    def _try_advisory_lock(self, conn: Any) -> Optional[str]:
        conn.run("SELECT set_config('application_name', %s, false)", (self.holder,))
        if conn.run("SELECT pg_try_advisory_lock(%s, %s)", ADVISORY_KEYS).rows[0][0]:
            return None
        rows = conn.run(
            "SELECT a.application_name, host(a.client_addr), a.pid FROM pg_locks l JOIN pg_stat_activity a "
            "ON a.pid = l.pid WHERE l.locktype = 'advisory' AND l.granted AND l.classid = %s "
            "AND l.objid = %s AND l.objsubid = 2 AND l.database = "
            "(SELECT oid FROM pg_database WHERE datname = current_database())",
            ADVISORY_KEYS,
        ).rows
        if not rows:
            return "it let go just now"
        name, addr, backend_pid = rows[0]
        if _is_stale(name or "", addr):
            logger.warning("database %r: terminated server session %d (%s), which still held the claim "
                           "for a coordinator process that no longer runs", self.alias, backend_pid, name)
            conn.run("SELECT pg_terminate_backend(%s)", (backend_pid,))
            return f"a session of a stopped coordinator ({name}), terminated just now"
        return f"{name or 'an unnamed session'}, server backend pid {backend_pid}" + (f" from {addr}" if addr else "")

    # -- SQLite ---------------------------------------------------------------------------
    def _try_lock_file(self, database_file: str) -> Optional[str]:
        if self._lock_file is not None:
            return None
        # The real file: every path that reaches it (symlinks, "..") shares one lock file.
        path = os.path.realpath(database_file) + LOCK_SUFFIX
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 100, 0).decode(errors="replace").strip()
            os.close(fd)
            return f"{holder if holder.startswith(HOLDER_PREFIX) else 'another process'}; lock file {path}"
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


def _is_stale(application_name: str, client_addr: Optional[str]) -> bool:
    """The holder is a coordinator process of this host that no longer runs, or this process."""
    match = _HOLDER_PID.match(application_name)
    if not match or client_addr not in _LOCAL_ADDRESSES:
        return False
    pid = int(match.group(1))
    if pid == os.getpid():
        return True   # our own connection, cut without the server noticing
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


def sqlite_path(name: Any) -> str:
    """The file of a SQLite NAME, also when it is a ``file:`` URI (OPTIONS 'uri': True)."""
    name = str(name)
    if name.startswith("file:"):
        return urllib.parse.unquote(urllib.parse.urlsplit(name).path)
    return name

"""One coordinator per database.

Two coordinators serving the same databases (a settings copy with another
PORT, a second host) would each number writes from their own journal and the
copies would end up different.  So each database is *claimed* before the
coordinator reads or writes anything of it, and the claim is held while it
serves it:

* PostgreSQL: a session advisory lock taken on the database thread's own
  connection (scoped to that database; the server drops it when the session ends).
  A session the server has not yet noticed is dead still holds it: the one of a
  coordinator that was just stopped while its query ran, or this coordinator's own
  earlier session cut by a network failure.  Such a session is terminated and the
  claim taken -- but only when it is provably dead: our own earlier session (same
  backend pid and start), or one named by a coordinator process of this very host,
  boot and pid namespace (``HOST_KEY`` in its application_name) that no longer runs.
  Another alias of this coordinator reaching the same database is a conflict.
* SQLite: an exclusive ``flock`` on ``<database file>.django_lb_shm.lock``,
  held by the coordinator process (the kernel drops it when the process exits).

A holder that is certainly alive (a coordinator process of this host that runs, or this
very process) is a conflict at once; only a holder that cannot be judged from here (another
host, a session not named by a coordinator) is waited for, and the coordinator's databases
share one wait (``CLAIM_WAIT``), so that a second coordinator fails within moments.
"""
from __future__ import annotations

import fcntl
import logging
import os
import re
import socket
import time
import urllib.parse
import zlib
from dataclasses import dataclass
from typing import Any, Optional

from django_lb_shm.errors import DatabaseOwnedElsewhere
from django_lb_shm.shm.state import pid_alive

logger = logging.getLogger("django_lb_shm.ownership")

# pg_try_advisory_lock(int4, int4): its own key space, apart from the bigint form apps tend to use.
ADVISORY_KEYS = (0x6C62, 0x73686D)   # "lb", "shm"
LOCK_SUFFIX = ".django_lb_shm.lock"
# For all the databases of a coordinator together: enough for the sessions of a coordinator of
# another host that was just stopped to go (one of this host is judged at once).
CLAIM_WAIT = 1.0
HOLDER_PREFIX = "django_lb_shm pid"
APPLICATION_NAME_MAX = 63   # bytes: PostgreSQL's NAMEDATALEN - 1


def _host_key() -> str:
    """This host, boot and pid namespace, in 8 characters: where a coordinator's pid means something."""
    parts = [socket.gethostname()]
    for path in ("/proc/sys/kernel/random/boot_id", "/proc/self/ns/pid"):
        try:
            parts.append(open(path).read().strip() if "boot_id" in path else str(os.stat(path).st_ino))
        except OSError:
            parts.append("?")
    return f"{zlib.crc32('|'.join(parts).encode()):08x}"


HOST_KEY = _host_key()
# (also the longer form of earlier versions, "django_lb_shm coordinator pid ...")
_HOLDER = re.compile(r"django_lb_shm (?:coordinator )?pid (?P<pid>\d+) host (?P<host>[0-9a-f]{8})")


@dataclass(frozen=True)
class Holder:
    """Who holds a claim this coordinator wants: a description, and whether it is certainly alive."""

    description: str
    alive: bool = False


def holder_name(pid: int, address: Any, limit: Optional[int] = None) -> str:
    """'django_lb_shm pid <pid> host <host key> at <address>'; over ``limit`` bytes, the
    address keeps its end (the port) after '...'."""
    name = f"{HOLDER_PREFIX} {pid} host {HOST_KEY} at {address}"
    if limit is None or len(name.encode()) <= limit:
        return name
    head = f"{HOLDER_PREFIX} {pid} host {HOST_KEY} at ..."
    tail = str(address).encode()[-(limit - len(head.encode())):]
    return head + tail.decode(errors="ignore")


def _alive_here(description: str) -> bool:
    """A coordinator process of this host (boot, pid namespace) that still runs, or this process."""
    match = _HOLDER.match(description or "")
    if not match or match.group("host") != HOST_KEY:
        return False
    return pid_alive(int(match.group("pid")))


class Ownership:
    """The claim of one database by this coordinator process."""

    def __init__(self, alias: str, address: Any):
        self.alias = alias
        self.holder = holder_name(os.getpid(), address)
        self.application_name = holder_name(os.getpid(), address, APPLICATION_NAME_MAX)
        self.session: Optional[tuple] = None   # PostgreSQL: (backend pid, backend_start) holding the claim
        self._lock_file: Optional[int] = None

    def claim(self, conn: Any, wait: float = CLAIM_WAIT) -> None:
        """Claim the database ``conn`` (an open DbConnection) reaches; DatabaseOwnedElsewhere if another
        holds it (at once when that one is certainly alive, else after ``wait`` seconds)."""
        vendor = conn.wrapper.vendor
        deadline = time.monotonic() + wait
        while True:
            other = self._try_claim(conn, vendor)
            if other is None:
                return
            if other.alive or time.monotonic() >= deadline:
                raise DatabaseOwnedElsewhere(
                    f"database {self.alias!r} is already served by another django_lb_shm coordinator "
                    f"({other.description}); stop that one, or give this one other databases: two "
                    "coordinators on the same databases would apply writes in different orders"
                )
            time.sleep(min(0.2, max(0.0, deadline - time.monotonic())))

    def _try_claim(self, conn: Any, vendor: str) -> Optional[Holder]:
        """None when claimed; else who holds it."""
        if vendor == "postgresql":
            return self._try_advisory_lock(conn)
        if vendor == "sqlite":
            return self._try_lock_file(sqlite_path(conn.wrapper.settings_dict))
        return None

    # -- PostgreSQL ---------------------------------------------------------------------
    def _try_advisory_lock(self, conn: Any) -> Optional[Holder]:
        conn.run("SELECT set_config('application_name', %s, false)", (self.application_name,))
        for _attempt in range(10):   # a terminated session lets go within moments
            if conn.run("SELECT pg_try_advisory_lock(%s, %s)", ADVISORY_KEYS).rows[0][0]:
                self.session = conn.session
                return None
            holder = self._lock_holder(conn)
            if holder is None:
                continue   # it let go between the two queries
            name, backend_pid, backend_start = holder
            why_stale = self._why_stale(name, (backend_pid, backend_start))
            if not why_stale:
                return Holder(f"{name or 'an unnamed session'}, server backend pid {backend_pid}", _alive_here(name))
            try:
                conn.run("SELECT pg_terminate_backend(%s)", (backend_pid,))
            except Exception as exc:   # not allowed to (another role, a superuser's session)
                return Holder(f"{name}, server backend pid {backend_pid}, {why_stale}; it could not be terminated "
                              f"({exc})")
            logger.warning("database %r: terminated server session %d (%s): %s", self.alias, backend_pid, name,
                           why_stale)
            time.sleep(0.1)
        return Holder("a session that keeps coming back")

    @staticmethod
    def _lock_holder(conn: Any) -> Optional[tuple]:
        rows = conn.run(
            "SELECT a.application_name, a.pid, a.backend_start FROM pg_locks l JOIN pg_stat_activity a "
            "ON a.pid = l.pid WHERE l.locktype = 'advisory' AND l.granted AND l.classid = %s "
            "AND l.objid = %s AND l.objsubid = 2 AND l.database = "
            "(SELECT oid FROM pg_database WHERE datname = current_database())",
            ADVISORY_KEYS,
        ).rows
        return tuple(rows[0]) if rows else None

    def _why_stale(self, application_name: str, session: tuple) -> str:
        """Why the session holding the claim serves nobody any more ('' when it may).

        Only sessions named by a coordinator of this very host (the host key: host name,
        boot and pid namespace) are judged: a pid means nothing on another host.
        """
        if self.session is not None and tuple(session) == tuple(self.session):
            return "it is this coordinator's own earlier session, cut without the server noticing"
        match = _HOLDER.match(application_name or "")
        if not match or match.group("host") != HOST_KEY:
            return ""
        pid = int(match.group("pid"))
        if pid == os.getpid():
            return ""   # another alias of this coordinator reaches the same database: a real conflict
        return "" if pid_alive(pid) else f"coordinator process {pid} of this host no longer runs"

    # -- SQLite ---------------------------------------------------------------------------
    def _try_lock_file(self, database_file: str) -> Optional[Holder]:
        if self._lock_file is not None:
            return None
        # The real file: every path that reaches it (symlinks, "..") shares one lock file.
        path = os.path.realpath(database_file) + LOCK_SUFFIX
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 4096, 0).decode(errors="replace").strip()
            os.close(fd)
            named = bool(_HOLDER.match(holder))
            return Holder(f"{holder if named else 'another process'}; lock file {path}", named and _alive_here(holder))
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


def sqlite_path(settings_dict: dict) -> str:
    """The file of a SQLite database entry; its NAME is a ``file:`` URI only with OPTIONS 'uri'."""
    name = str(settings_dict.get("NAME", ""))
    if name.startswith("file:") and (settings_dict.get("OPTIONS") or {}).get("uri"):
        return urllib.parse.unquote(urllib.parse.urlsplit(name).path)
    return name

"""Telling a database that is down from a query that is wrong, and process vitals.

A connection-level failure marks a database DOWN; a caller's mistake
(IntegrityError, syntax, bad data) never does.  The drivers say which is which
in different ways: psycopg with SQLSTATE classes, sqlite3 with error names.
"""
from __future__ import annotations

import os
import socket
from typing import Any, Optional

import psutil

from django_lb_shm.errors import DatabaseDown

# SQLSTATE classes/codes that mean "the server or the link is gone", not "your query is wrong".
_PG_DOWN_CLASSES = ("08", "53", "58", "XX")
_PG_DOWN_CODES = {"57P01", "57P02", "57P03", "57P04", "57P05"}
_PG_TRANSIENT_CODES = {"40001", "40P01", "55P03"}
# SQLITE_READONLY_*: the file was moved or deleted under the connection (DBMOVED), or it or its
# directory cannot be written: the copy is unusable for now, not the write wrong.
_SQLITE_DOWN = ("SQLITE_CANTOPEN", "SQLITE_IOERR", "SQLITE_NOTADB", "SQLITE_CORRUPT", "SQLITE_FULL",
                "SQLITE_READONLY")
_SQLITE_TRANSIENT = ("SQLITE_BUSY", "SQLITE_LOCKED")

def _driver_error(exc: BaseException) -> BaseException:
    """Django wraps driver errors (``__cause__``); classify the driver's own."""
    seen = 0
    while exc.__cause__ is not None and type(exc).__module__.startswith("django.") and seen < 5:
        exc = exc.__cause__
        seen += 1
    return exc


def is_connection_error(exc: BaseException) -> bool:
    if isinstance(exc, DatabaseDown):
        return True
    exc = _driver_error(exc)
    module = type(exc).__module__
    if module.startswith("psycopg"):
        sqlstate: Optional[str] = getattr(exc, "sqlstate", None)
        if sqlstate is None:
            names = {k.__name__ for k in type(exc).__mro__}
            return bool(names & {"OperationalError", "InterfaceError"})
        return sqlstate[:2] in _PG_DOWN_CLASSES or sqlstate in _PG_DOWN_CODES
    if module == "sqlite3":
        return getattr(exc, "sqlite_errorname", "").startswith(_SQLITE_DOWN)
    return isinstance(exc, (ConnectionError, EOFError))


def is_transient(exc: BaseException) -> bool:
    exc = _driver_error(exc)
    if type(exc).__module__.startswith("psycopg"):
        return getattr(exc, "sqlstate", None) in _PG_TRANSIENT_CODES
    if type(exc).__module__ == "sqlite3":
        return getattr(exc, "sqlite_errorname", "").startswith(_SQLITE_TRANSIENT)
    return False


def is_statement_timeout(exc: BaseException) -> bool:
    """PostgreSQL's statement_timeout or a cancel (57014), SQLite's interrupt: a statement cut short."""
    cause: Optional[BaseException] = exc
    for _ in range(5):
        if cause is None:
            break
        if getattr(cause, "sqlstate", None) == "57014" or getattr(cause, "sqlite_errorname", "") == "SQLITE_INTERRUPT":
            return True
        cause = cause.__cause__
    return False


def process_vitals(pid: int) -> dict[str, Any]:
    """Liveness and resources of a process, via psutil; {'alive': False} when it is gone."""
    try:
        proc = psutil.Process(pid)
        with proc.oneshot():
            status = proc.status()
            if status == psutil.STATUS_ZOMBIE:
                return {"alive": False, "pid": pid, "status": status}
            return {
                "alive": True,
                "pid": pid,
                "status": status,
                "rss_mb": round(proc.memory_info().rss / 2**20, 1),
                "cpu_percent": proc.cpu_percent(interval=None),
                "cpu_times_s": round(sum(proc.cpu_times()[:2]), 2),
                "threads": proc.num_threads(),
            }
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return {"alive": False, "pid": pid}


def address_holder(address: Any) -> str:
    """Who holds the coordinator's address on this host: ' by pid N (name, user U)'; '' when it
    cannot be known cheaply (another user's process while not root, no such socket any more)."""
    kind, wanted = ("unix", address.path) if address.path else ("tcp", address.port)
    try:
        sockets = psutil.net_connections(kind=kind)
    except (psutil.Error, OSError):
        return ""
    pids = sorted({s.pid for s in sockets if s.pid and _bound_to(s, kind, wanted)})
    return " by " + ", ".join(_describe_process(pid) for pid in pids) if pids else ""


def _bound_to(sock: Any, kind: str, wanted: Any) -> bool:
    if kind == "unix":
        return sock.laddr == wanted
    # a listening (or bound, not yet listening) socket; not a client's connection from that port
    return bool(sock.laddr) and sock.laddr.port == wanted and sock.status in (psutil.CONN_LISTEN, psutil.CONN_NONE,
                                                                               psutil.CONN_CLOSE)


def _describe_process(pid: int) -> str:
    try:
        proc = psutil.Process(pid)
        return f"pid {pid} ({proc.name()}, user {proc.username()})"
    except (psutil.Error, KeyError):
        return f"pid {pid}"


def interrupt_statement(wrapper: Any) -> None:
    """Cut the statement another thread runs on Django connection ``wrapper`` (a watchdog's tool
    for a hung database): SQLite's interrupt(); on PostgreSQL the socket is shut down, which
    wakes the driver with an error even when the server never answers again (SIGSTOPped,
    network gone)."""
    raw = getattr(wrapper, "connection", None)
    if raw is None:
        return
    try:
        if wrapper.vendor == "sqlite":
            raw.interrupt()
            return
        with socket.socket(fileno=os.dup(raw.fileno())) as sock:
            sock.shutdown(socket.SHUT_RDWR)
    except Exception:  # closed meanwhile (psycopg raises OperationalError): nothing to cut
        pass

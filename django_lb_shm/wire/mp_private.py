"""Every use of a private (or undocumented) name of ``multiprocessing``, behind a named function.

The transport stays ``multiprocessing.managers`` (a Manager server in the coordinator, a
proxy in each app process), trimmed and bounded where the standard library leaves no
public hook.  A Python upgrade that renames one of these breaks this module alone, and
tests/test_mp_private.py names the attribute and the Python version that lost it.

Hooks that our subclasses override in place (the name must match the stdlib's):

* ``multiprocessing.connection.Connection._recv_bytes(maxsize)`` and ``._poll(timeout)``:
  ``protocol.GuardedConnection`` (read timeouts, frame size limit).
* ``multiprocessing.managers.BaseProxy._connect()`` (called by us) and ``._tls.connection``:
  ``protocol.RouterProxy`` keeps its own per-thread connection there.

Imports only the standard library: a leaf.  The private names of
``multiprocessing.shared_memory`` (``SharedMemory._fd``/``._name``, ``_posixshmem``,
``resource_tracker.unregister``) stay in shm/state.py, which imports nothing of the
package but errors.py; tests/test_mp_private.py watches them too.
"""
from __future__ import annotations

from multiprocessing import connection as mp_connection
from multiprocessing.managers import BaseManager, BaseProxy, State
from typing import Any, Callable, Optional

# -- client side: the Manager and its proxies ---------------------------------------------


def set_manager_client(manager: BaseManager, client: Callable[..., Any]) -> None:
    """The function a Manager connects with (``BaseManager._Client``: no public parameter)."""
    manager._Client = client  # type: ignore[attr-defined]


def mark_manager_started(manager: BaseManager) -> None:
    """What ``BaseManager.connect()`` sets, without its extra round trip (``BaseManager._state``)."""
    manager._state.value = State.STARTED  # type: ignore[attr-defined]


def set_proxy_client(proxy: BaseProxy, client: Callable[..., Any]) -> None:
    """Each thread's connection of a proxy is made with ``client`` (``BaseProxy._Client``)."""
    proxy._Client = client  # type: ignore[attr-defined]


def connect_proxy(proxy: BaseProxy) -> None:
    """Open this thread's connection of a proxy (``BaseProxy._connect``)."""
    proxy._connect()  # type: ignore[attr-defined]


def proxy_object_id(proxy: BaseProxy) -> str:
    """The id of the served object a proxy names (``BaseProxy._id``)."""
    return proxy._id  # type: ignore[attr-defined]


def proxy_address(proxy: BaseProxy) -> Any:
    """The server address a proxy was made for (``BaseProxy._token.address``)."""
    return proxy._token.address  # type: ignore[attr-defined]


def forget_proxy_connections() -> None:
    """After fork: the per-address thread-local connections are the parent's
    (``BaseProxy._address_to_local``)."""
    BaseProxy._address_to_local.clear()  # type: ignore[attr-defined]


# -- server side ---------------------------------------------------------------------------


def set_listen_backlog(listener: mp_connection.Listener, backlog: int) -> None:
    """``Listener`` takes a backlog, but ``managers.Server`` makes its own with 16
    (``Listener._listener._socket``)."""
    listener._listener._socket.listen(backlog)  # type: ignore[attr-defined]


def adopt_connection(conn: mp_connection.Connection, cls: type) -> None:
    """Give an accepted Connection our subclass's behaviour (the Listener makes plain ones)."""
    conn.__class__ = cls


def served_object(server: Any, ident: str) -> Optional[tuple[Any, Any]]:
    """(object, exposed method names) a Manager server serves under ``ident``; None when this
    server process has no such object (``Server.id_to_obj``)."""
    entry = server.id_to_obj.get(ident)
    return None if entry is None else (entry[0], entry[1])


def server_public_calls(server: Any) -> Any:
    """The manager calls a connection may start with (``Server.public``)."""
    return server.public


# -- the handshake (undocumented module functions of multiprocessing.connection) ------------


def deliver_challenge(conn: mp_connection.Connection, authkey: bytes) -> None:
    mp_connection.deliver_challenge(conn, authkey)


def answer_challenge(conn: mp_connection.Connection, authkey: bytes) -> None:
    mp_connection.answer_challenge(conn, authkey)


def recv_bytes_upto(conn: mp_connection.Connection, maxsize: Optional[int]) -> Any:
    """``Connection._recv_bytes`` of the base class: None when the frame's length is over ``maxsize``."""
    return mp_connection.Connection._recv_bytes(conn, maxsize)  # type: ignore[attr-defined]


def poll(conn: mp_connection.Connection, timeout: float) -> bool:
    """``Connection._poll``: ``poll()`` without its checks."""
    return conn._poll(timeout)  # type: ignore[attr-defined]


__all__ = [
    "set_manager_client", "mark_manager_started", "set_proxy_client", "connect_proxy",
    "proxy_object_id", "proxy_address", "forget_proxy_connections", "set_listen_backlog",
    "adopt_connection", "served_object", "server_public_calls", "deliver_challenge",
    "answer_challenge", "recv_bytes_upto", "poll",
]

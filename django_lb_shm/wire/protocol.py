"""The wire between app processes and the coordinator: a multiprocessing Manager.

The coordinator process serves a ``multiprocessing.managers`` server at ADDRESS,
authenticated with AUTHKEY.  It exposes one shared object, ``coordinator``, whose
``execute`` method takes an encoded descriptor and returns an encoded reply:
one round trip per query, over the same-host Unix socket when there is one.
Inside the coordinator, the server thread of that connection answers it (the
Manager server is coordinator/server.py; the object it serves, coordinator/router.py: reads
on a pooled connection or through a database thread's queue, writes under the
sequencer's order).

The coordinator process's exit codes (a protocol with the supervisor) are in wire/exit_codes.py.
"""
from __future__ import annotations

import os
import pickle
import select
import socket
import stat
import tempfile
import threading
from multiprocessing import connection as mp_connection
from multiprocessing.managers import BaseManager, BaseProxy, convert_to_error
from typing import Any, Optional

from django_lb_shm.errors import AnswerTimeout, ProtocolError
from django_lb_shm.wire import mp_private

TYPEID = "coordinator"
EXPOSED = ("execute", "status", "hello", "ping", "identity",
           "resync_begin", "resync_progress", "resync_done", "resync_end", "resync_abort")

# A reply kind of our own, next to the Manager's #RETURN/#ERROR/#TRACEBACK: the request named
# an object this coordinator process does not have (the proxy was made with a previous one).
UNKNOWN_OBJECT = "#UNKNOWN_OBJECT"

# Set by LoadBalancerTestRunner to its own pid: the supervisor stops once that process is gone.
STOP_WITH_PARENT_ENV = "DJANGO_LB_SHM_STOP_WITH_PARENT"

SETTLE_WAIT = 2.0   # seconds the coordinator waits (OP_OUTCOME) for a write still running when asked about it


class GuardedConnection(mp_connection.Connection):
    """A Connection whose reads give up after ``timeout`` seconds and refuse frames over ``max_bytes``.

    Used for every handshake (both sides) and for the coordinator's side of
    every client connection, so that silent peers, garbage and huge length
    prefixes cost a bounded time and memory.
    """

    timeout: Optional[float] = None
    max_bytes: Optional[int] = None
    too_large = False
    _poller: Any = None

    def readable_within(self, timeout: float) -> bool:
        """poll() on one registered poller: Connection.poll builds a selector per call."""
        poller = self._poller
        if poller is None:
            poller = self._poller = select.poll()
            poller.register(self.fileno(), select.POLLIN)
        return bool(poller.poll(max(timeout, 0.0) * 1000))

    def _recv_bytes(self, maxsize: Optional[int] = None):
        if self.timeout is not None and not mp_private.poll(self, self.timeout):
            raise TimeoutError(f"no answer within {self.timeout:.2f} s")
        limit = maxsize if maxsize is not None else self.max_bytes
        buf = mp_private.recv_bytes_upto(self, limit)
        if buf is None:  # the length prefix is over the limit: the payload is never read
            self.too_large = True
            raise FrameTooLarge(f"a frame over {limit} bytes")
        return buf


class FrameTooLarge(EOFError):
    """Raised as an EOF: the stream cannot be resynchronised, so the connection ends."""


def connect(address: Any, authkey: bytes, timeout: Optional[float] = None) -> mp_connection.Connection:
    """multiprocessing.connection.Client with a bound on the connect and the authkey handshake.

    ``address`` is (host, port) for TCP or a filesystem path for a Unix socket.
    """
    if isinstance(address, str):
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(timeout)
        try:
            sock.connect(address)
        except BaseException:
            sock.close()
            raise
    else:
        sock = socket.create_connection(address, timeout=timeout)
        no_delay(sock)
    sock.settimeout(None)
    conn = GuardedConnection(sock.detach())
    conn.timeout = timeout
    try:
        mp_private.answer_challenge(conn, authkey)
        mp_private.deliver_challenge(conn, authkey)
    except BaseException:
        conn.close()
        raise
    conn.timeout = None
    return conn


def no_delay(sock: socket.socket) -> None:
    """Small request/answer frames: don't let Nagle's algorithm hold them for the peer's delayed ACK."""
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    except OSError:
        pass


def timed_client(timeout: Optional[float], local_path: Optional[str] = None):
    """The Manager's ``_Client``: bounded, and over ``local_path`` first when the coordinator serves one."""
    def client(address: Any, authkey: bytes) -> mp_connection.Connection:
        if local_path and not isinstance(address, str):
            try:
                return connect(local_path, authkey, timeout)
            except OSError:
                pass  # no local socket (yet), not ours, or its backlog is full: TCP
        return connect(address, authkey, timeout)
    return client


# -- the same-host side channel --------------------------------------------------------
# A coordinator serving loopback TCP also listens on a Unix socket in a private
# directory (the tmux pattern: /tmp/django_lb_shm-<uid>, mode 0700, owned by the
# user); clients of the same user find it there and skip the TCP stack, whose
# round trip costs about twice as much on small virtual machines.
UNIX_PATH_MAX = 103  # sockaddr_un.sun_path: 108 bytes on Linux, 104 on macOS, the NUL included


def local_socket_path(host: str, port: int) -> str:
    """'' when the path would be too long for a Unix socket (a long TMPDIR): TCP only then."""
    path = os.path.join(tempfile.gettempdir(), f"django_lb_shm-{os.getuid()}", f"{host}-{port}.sock")
    return path if len(os.fsencode(path)) <= UNIX_PATH_MAX else ""


def private_directory(path: str, create: bool = False) -> bool:
    """The socket's directory exists, is ours and closed to others (else anyone could stand in for the coordinator)."""
    directory = os.path.dirname(path)
    if create:
        os.makedirs(directory, mode=0o700, exist_ok=True)
    try:
        st = os.lstat(directory)
    except FileNotFoundError:
        return False
    return stat.S_ISDIR(st.st_mode) and st.st_uid == os.getuid() and not st.st_mode & 0o077


class RouterProxy(BaseProxy):
    """Proxy for the coordinator object, with a client-side timeout on every call."""

    _exposed_ = EXPOSED

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        # Its own per-thread sockets: BaseProxy shares one socket per thread among all
        # proxies of an address, so closing another client's connection (a status
        # check, a client with other settings) would cut this one's transaction.
        self._tls = threading.local()

    def call(self, method: str, args: tuple = (), timeout: float | None = None) -> Any:
        frame = pickle.dumps((mp_private.proxy_object_id(self), method, args, {}), pickle.HIGHEST_PROTOCOL)
        conn = self._connection()
        try:
            conn.send_bytes(frame)
            if timeout is not None and not conn.readable_within(timeout):
                raise AnswerTimeout(
                    f"the load balancer coordinator at {_shown(mp_private.proxy_address(self))} "
                    f"did not answer {method!r} within {timeout:.2f} s (CLIENT_TIMEOUT)"
                )
            kind, result = conn.recv()
        except BaseException:
            # Anything between the send and the whole answer (a timeout, a signal handler's
            # exception, a half-sent frame): the answer may still come on this connection and
            # would be taken for the next call's.  It is never used again.
            self.drop_connection()
            raise
        if kind == "#RETURN":
            return result
        if kind == UNKNOWN_OBJECT:
            # This proxy names an object of a previous coordinator process: the
            # request was not run; reconnect with a fresh proxy.
            self.drop_connection()
            raise ConnectionResetError("the coordinator restarted since this connection was made")
        error = convert_to_error(kind, result)
        if method == "execute":   # its own errors come back as data: this is the wire's
            raise ProtocolError(f"the coordinator could not run a request ({kind}: {error})")
        raise error

    def _connection(self) -> mp_connection.Connection:
        try:
            return self._tls.connection
        except AttributeError:
            mp_private.connect_proxy(self)
            return self._tls.connection

    def drop_connection(self) -> None:
        conn = getattr(self._tls, "connection", None)
        if conn is not None:
            del self._tls.connection
            try:
                conn.close()
            except OSError:
                pass


def _shown(address: Any) -> str:
    return address if isinstance(address, str) else f"{address[0]}:{address[1]}"


class CoordinatorManager(BaseManager):
    """Client side of the coordinator's Manager server."""


CoordinatorManager.register(TYPEID, proxytype=RouterProxy, exposed=EXPOSED, create_method=True)

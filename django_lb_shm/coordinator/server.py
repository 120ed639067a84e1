"""The manager process's Manager server: a ``multiprocessing.managers.Server`` at ADDRESS.

Re-implemented where the standard library's is unbounded: a bounded accept loop with a
larger backlog, a bounded handshake (HANDSHAKE_TIMEOUT, HANDSHAKE_MAX_BYTES), frames
limited to MAX_REQUEST_BYTES, a log line for every refusal, calls of exposed methods only
(the ``#UNKNOWN_OBJECT`` reply to a previous process's proxy), and the same-host Unix socket
next to TCP.  Its owner (coordinator/process.py) hears of each client's arrival and
departure.  The private names of multiprocessing it relies on are in wire/mp_private.py.
"""
from __future__ import annotations

import errno
import logging
import os
import pickle
import socket
import threading
import time
from multiprocessing import AuthenticationError
from multiprocessing import connection as mp_connection
from multiprocessing.managers import Server
from traceback import format_exc
from typing import Any, Optional

from django_lb_shm.wire import mp_private
from django_lb_shm.wire.protocol import (
    UNKNOWN_OBJECT,
    FrameTooLarge,
    GuardedConnection,
    no_delay,
    private_directory,
)

# The logger keeps the name it had before these modules moved into coordinator/: LOGGING settings may name it.
logger = logging.getLogger("django_lb_shm.coordinator")

HANDSHAKE_TIMEOUT = 10.0      # a connection that does not authenticate by then is dropped
HANDSHAKE_MAX_BYTES = 4096    # no handshake frame is bigger
FRAME_OVERHEAD = 4096         # the Manager's envelope around a request


def _remove_stale_socket(path: str) -> None:
    """A socket file left by a crashed coordinator; refuse to take over a live one."""
    if not os.path.exists(path):
        return
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.settimeout(1)
        probe.connect(path)
    except OSError:
        os.unlink(path)
        return
    finally:
        probe.close()
    raise OSError(errno.EADDRINUSE, f"another process is listening on {path}")


def _listen_locally(path: str) -> Optional[mp_connection.Listener]:
    """The same-host Unix socket (see protocol.local_socket_path); None, and TCP only, when it cannot be made."""
    try:
        if not private_directory(path, create=True):
            logger.warning("not serving %s: its directory is not private to this user; same-host clients use TCP", path)
            return None
        _remove_stale_socket(path)
        listener = mp_connection.Listener(path, family="AF_UNIX", backlog=256)
        os.chmod(path, 0o600)
        return listener
    except OSError as exc:
        logger.warning("not serving %s (%s); same-host clients use TCP", path, exc)
        return None


def _peer_of(conn: Any) -> str:
    """The peer's address, for log lines (and TCP_NODELAY on the way: same socket)."""
    try:
        with socket.socket(fileno=os.dup(conn.fileno())) as sock:
            if sock.family != socket.AF_UNIX:
                no_delay(sock)
            peer = sock.getpeername()
        return f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else (peer or "a local socket")
    except OSError:
        return "an unknown peer"


class ManagerServer(Server):
    """The Manager server, with a bounded accept loop, a larger backlog and client clean-up."""

    def __init__(self, registry: dict, address: Any, authkey: bytes, owner: Any, local_path: str = ""):
        if isinstance(address, str):
            _remove_stale_socket(address)
        super().__init__(registry, address, authkey, "pickle")
        if isinstance(address, str):
            os.chmod(address, 0o600)  # owner only: the socket is the door to the coordinator
        self.owner = owner
        self.stop_event = threading.Event()
        try:
            mp_private.set_listen_backlog(self.listener, 256)
        except Exception:
            pass
        self.listeners = [self.listener]
        if local_path:
            local = _listen_locally(local_path)
            if local is not None:
                self.listeners.append(local)

    # The shared coordinator object lives as long as this server: proxies of
    # exited clients (or of a previous coordinator process, whose object may
    # have had the same id) must not be able to count it away.
    def incref(self, c: Any, ident: str) -> None:
        pass

    def decref(self, c: Any, ident: str) -> None:
        pass

    def serve_forever_on_all(self) -> None:
        for listener in self.listeners:
            threading.Thread(target=self.accept_forever, args=(listener,), daemon=True, name="accept").start()

    def accept_forever(self, listener: Any) -> None:
        while not self.stop_event.is_set():
            try:
                conn = listener.accept()
            except OSError:
                if self.stop_event.is_set():
                    return
                time.sleep(0.01)  # e.g. out of file descriptors: do not spin
                continue
            except AuthenticationError:
                continue
            threading.Thread(target=self.handle_request, args=(conn,), daemon=True, name="client").start()

    def handle_request(self, conn: Any) -> None:
        """The stdlib's Server.handle_request (serve_client ends with SystemExit), on our own
        _serve_connection instead of its private _handle_request."""
        try:
            self._serve_connection(conn)
        except SystemExit:
            pass
        finally:
            conn.close()

    def _serve_connection(self, conn: Any) -> None:
        """The stdlib's _handle_request, with a bounded handshake and a log line for every refusal."""
        mp_private.adopt_connection(conn, GuardedConnection)
        conn.timeout, conn.max_bytes = HANDSHAKE_TIMEOUT, HANDSHAKE_MAX_BYTES
        peer = _peer_of(conn)
        try:
            mp_private.deliver_challenge(conn, self.authkey)
            mp_private.answer_challenge(conn, self.authkey)
            ignore, funcname, args, kwds = conn.recv()
            if funcname not in mp_private.server_public_calls(self):
                raise ValueError(f"unknown manager call {funcname!r}")
        except AuthenticationError as exc:
            logger.warning("refused a connection from %s: %s (wrong AUTHKEY?)", peer, exc)
            return
        except TimeoutError:
            logger.warning("dropped a connection from %s: no handshake within %.0f s", peer, HANDSHAKE_TIMEOUT)
            return
        except Exception as exc:
            logger.warning("dropped a connection from %s: bad handshake (%s: %s)", peer, type(exc).__name__, exc)
            return
        conn.timeout, conn.max_bytes = None, self.owner.config.max_request_bytes + FRAME_OVERHEAD
        conn.peer = peer
        try:
            msg = ("#RETURN", getattr(self, funcname)(conn, *args, **kwds))
        except FrameTooLarge as exc:
            logger.warning("dropped a connection from %s: %s", peer, exc)
            return
        except Exception:
            msg = ("#TRACEBACK", format_exc())
        try:
            conn.send(msg)
        except Exception:
            pass

    def serve_client(self, conn: Any) -> None:
        try:
            self.owner.client_connected(getattr(conn, "peer", ""))
            self._serve_calls(conn)
        finally:
            if getattr(conn, "too_large", False):
                logger.warning("dropped a client connection that sent a frame over %d bytes (MAX_REQUEST_BYTES)",
                               conn.max_bytes)
            self.owner.client_gone()
        raise SystemExit  # as the stdlib's serve_client: handle_request then closes the connection, sending nothing

    def _serve_calls(self, conn: Any) -> None:
        """The Manager's serve_client, trimmed to what RouterProxy sends: calls of exposed methods.

        Same replies (#RETURN, #ERROR, #TRACEBACK), with plain pickle both ways
        instead of the ForkingPickler's per-message buffer and reducer lookups.
        """
        dumps, loads, protocol = pickle.dumps, pickle.loads, pickle.HIGHEST_PROTOCOL
        while not self.stop_event.is_set():
            try:
                request = conn.recv_bytes()
            except (EOFError, OSError):
                return  # the client went away (or sent a frame over the limit: FrameTooLarge)
            try:
                ident, method, args, kwds = loads(request)
                served = mp_private.served_object(self, ident)
                if served is None:
                    # a proxy of a previous coordinator process: RouterProxy reconnects
                    msg: tuple = (UNKNOWN_OBJECT, ident)
                else:
                    obj, exposed = served
                    if method not in exposed:
                        raise AttributeError(f"method {method!r} of {type(obj)} object is not exposed")
                    msg = ("#RETURN", getattr(obj, method)(*args, **kwds))
            except Exception as exc:
                msg = ("#ERROR", exc)
            try:
                conn.send_bytes(dumps(msg, protocol))
            except Exception as exc:
                try:
                    conn.send_bytes(dumps(("#UNSERIALIZABLE", format_exc()), protocol))
                except Exception:
                    logger.debug("could not answer a client: %s", exc)
                    return

    def close(self) -> None:
        self.stop_event.set()
        for listener in self.listeners:
            try:
                listener.close()
            except Exception:
                pass

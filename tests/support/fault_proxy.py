"""A fault-injecting TCP proxy on 127.0.0.1 in front of one real PostgreSQL server.

It understands just enough of the PostgreSQL frontend/backend protocol to find
the client's messages: the startup packet (and an SSLRequest / GSSENCRequest,
answered 'N' here, so the client goes on in clear text), then messages of one
type byte + an int32 length.  The server's side is forwarded as raw bytes.

Faults (each takes effect at once, on every connection through the proxy):

- ``cut_after_commit(n=1)``: the next ``n`` simple queries ('Q') whose SQL ends
  in a COMMIT (``COMMIT`` alone, ``BEGIN;...;COMMIT``, ``UPDATE ...\\n;\\nCOMMIT``)
  are forwarded to the server, then the proxy waits for the server's answer
  (so the server has certainly run the COMMIT), drops it, and closes both
  sides.  The client sees its connection die after sending COMMIT: the commit
  happened, the client cannot know it.  An extended-protocol COMMIT (Parse of a
  COMMIT ... Sync) is cut the same way, at its Sync.  ``cuts`` counts them.
- ``black_hole()``: nothing is forwarded in either direction; sockets stay open
  (new connections are accepted and held).  ``heal()`` lets the held bytes through.
- ``black_hole_at_commit()``: the next simple query that ends in a COMMIT turns the
  proxy into a black hole before it is forwarded: the server gets that COMMIT only
  at ``heal()``, late (a server that stopped answering with the COMMIT on its way).
  ``heal_new_only()`` passes the traffic of new connections but keeps holding the
  connections open until then (their sessions stay alive on the server, idle in
  whatever transaction they had); ``release_held()`` lets their held bytes through.
- ``refuse()``: every connection is closed and the listening socket too, so
  connecting is refused.  ``heal()`` listens again on the same port.

Threads only; every blocking wait is bounded (select with a short timeout).
``close()`` ends everything; use it in a ``finally`` (or the context manager).
"""
from __future__ import annotations

import re
import select
import socket
import struct
import threading
import time
from typing import Optional

SSL_REQUEST = 80877103
GSSENC_REQUEST = 80877104
CANCEL_REQUEST = 80877102

# SQL that ends with a COMMIT statement (ignoring whitespace and semicolons), e.g.
# "UPDATE django_lb_shm_applied SET seq = 7 WHERE id = 1\n;\nCOMMIT" or "COMMIT" or "BEGIN;...;COMMIT".
_COMMIT_AT_END = re.compile(r"(?:^|;)\s*(?:COMMIT|END)(?:\s+(?:WORK|TRANSACTION))?\s*;?\s*$", re.IGNORECASE)

_POLL = 0.05


def is_commit_sql(sql: str) -> bool:
    return bool(_COMMIT_AT_END.search(sql))


def _recv_exact(sock: socket.socket, n: int, alive) -> Optional[bytes]:
    buf = b""
    while len(buf) < n:
        if not alive():
            return None
        ready, _, _ = select.select([sock], [], [], _POLL)
        if not ready:
            continue
        chunk = sock.recv(n - len(buf))
        if not chunk:
            return None
        buf += chunk
    return buf


class _Link:
    """One client connection and its upstream connection."""

    def __init__(self, proxy: "FaultProxy", client: socket.socket):
        self.proxy = proxy
        self.client = client
        self.upstream: Optional[socket.socket] = None
        self.lock = threading.Lock()
        self.closed = False
        self.cutting = False              # the server's answers are dropped from now on
        self.answer_dropped = threading.Event()
        self.pending_extended_commit = False
        self.held = False                 # nothing forwarded until released (heal_new_only)

    def alive(self) -> bool:
        return not self.closed and self.proxy.running

    def close(self) -> None:
        with self.lock:
            if self.closed:
                return
            self.closed = True
        for sock in (self.client, self.upstream):
            if sock is None:
                continue
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            try:
                sock.close()
            except OSError:
                pass
        self.proxy._forget(self)

    # -- client -> server -------------------------------------------------------------
    def run_client_side(self) -> None:
        try:
            if not self._startup():
                return
            threading.Thread(target=self.run_server_side, daemon=True, name="fault-proxy-s2c").start()
            while self.alive():
                header = _recv_exact(self.client, 5, self.alive)
                if header is None:
                    return
                kind, length = header[:1], struct.unpack("!I", header[1:])[0]
                body = _recv_exact(self.client, length - 4, self.alive) if length > 4 else b""
                if body is None:
                    return
                message = header + body
                if kind == b"Q" and self.proxy._take_hole(body[:-1].decode("utf-8", "replace")):
                    self.proxy.black_hole()
                cut = False
                if kind == b"Q" and self.proxy._take_cut(body[:-1].decode("utf-8", "replace")):
                    cut = True
                elif kind == b"P":
                    # Parse: name\0 query\0 ...
                    parts = body.split(b"\0", 2)
                    if len(parts) >= 2 and is_commit_sql(parts[1].decode("utf-8", "replace")):
                        self.pending_extended_commit = self.proxy._take_cut(parts[1].decode("utf-8", "replace"))
                elif kind == b"S" and self.pending_extended_commit:
                    self.pending_extended_commit = False
                    cut = True
                if cut:
                    self._forward_then_cut(message)
                    return
                if not self._send_when_open(self.upstream, message):
                    return
        except OSError:
            pass
        finally:
            self.close()

    def _startup(self) -> bool:
        """Read the startup packet (answering SSL/GSS requests 'N'), connect upstream, forward it."""
        for _ in range(4):
            head = _recv_exact(self.client, 4, self.alive)
            if head is None:
                return False
            length = struct.unpack("!I", head)[0]
            if length < 8 or length > 100_000:
                return False
            body = _recv_exact(self.client, length - 4, self.alive)
            if body is None:
                return False
            code = struct.unpack("!I", body[:4])[0]
            if code in (SSL_REQUEST, GSSENC_REQUEST):
                self.client.sendall(b"N")
                continue
            # a black hole holds a new connection before it reaches the server
            while self.alive() and self.proxy.mode == "black_hole":
                time.sleep(_POLL)
            if not self.alive():
                return False
            self.upstream = socket.create_connection(self.proxy.target, timeout=10)
            self.upstream.settimeout(None)
            if self.closed:
                self.upstream.close()
                return False
            self.upstream.sendall(head + body)
            return code != CANCEL_REQUEST or self._drain_cancel()
        return False

    def _drain_cancel(self) -> bool:
        # A CancelRequest connection carries nothing else: the server closes it.
        self.run_server_side()
        return False

    def _send_when_open(self, sock: socket.socket, data: bytes) -> bool:
        while self.alive() and (self.held or self.proxy.mode == "black_hole"):
            time.sleep(_POLL)
        if not self.alive():
            return False
        sock.sendall(data)
        return True

    def _forward_then_cut(self, message: bytes) -> None:
        with self.lock:
            self.cutting = True
        if not self._send_when_open(self.upstream, message):
            return
        # The server has run the COMMIT once it answers (the answer is dropped); bounded wait.
        self.answer_dropped.wait(self.proxy.cut_wait)
        time.sleep(0.005)
        self.proxy._cut_fired()
        self.close()

    # -- server -> client -------------------------------------------------------------
    def run_server_side(self) -> None:
        try:
            while self.alive():
                if self.held or self.proxy.mode == "black_hole":
                    time.sleep(_POLL)
                    continue
                ready, _, _ = select.select([self.upstream], [], [], _POLL)
                if not ready:
                    continue
                data = self.upstream.recv(65536)
                if not data:
                    return
                with self.lock:
                    if self.cutting:
                        self.answer_dropped.set()
                        continue
                if not self._send_when_open(self.client, data):
                    return
        except OSError:
            pass
        finally:
            if not self.cutting:
                self.close()


class FaultProxy:
    """``FaultProxy(server_port)``; ``.port`` is where clients connect."""

    def __init__(self, target_port: int, target_host: str = "127.0.0.1", port: int = 0,
                 cut_wait: float = 2.0):
        self.target = (target_host, target_port)
        self.cut_wait = cut_wait
        self.mode = "pass"
        self.running = True
        self.cuts = 0                    # cuts that fired
        self._cuts_armed = 0
        self._hole_armed = False
        self._lock = threading.Lock()
        self._links: set[_Link] = set()
        self.connections = 0             # accepted so far
        self.cut_sql: list[str] = []     # the SQL of every cut query (for messages)
        self._listener: Optional[socket.socket] = None
        self._listen(port)
        self.port = self._listener.getsockname()[1]
        self._thread = threading.Thread(target=self._accept, daemon=True, name="fault-proxy")
        self._thread.start()

    def __enter__(self) -> "FaultProxy":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<FaultProxy 127.0.0.1:{self.port} -> {self.target[0]}:{self.target[1]} {self.mode}>"

    # -- faults -----------------------------------------------------------------------
    def cut_after_commit(self, n: int = 1) -> None:
        """Arm: the next ``n`` COMMIT queries reach the server; their answers never reach the client."""
        with self._lock:
            self._cuts_armed += n

    def black_hole_at_commit(self) -> None:
        """Arm: the next COMMIT query is held, with everything else, until heal()."""
        with self._lock:
            self._hole_armed = True

    def disarm(self) -> None:
        with self._lock:
            self._cuts_armed = 0
            self._hole_armed = False

    @property
    def armed(self) -> int:
        return self._cuts_armed

    def wait_cuts(self, count: int, timeout: float = 30) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.cuts >= count:
                return True
            time.sleep(0.02)
        return self.cuts >= count

    def black_hole(self) -> None:
        self.mode = "black_hole"

    def refuse(self) -> None:
        with self._lock:
            self.mode = "refuse"
            listener, self._listener = self._listener, None
            links = list(self._links)
        if listener is not None:
            listener.close()
        for link in links:
            link.close()

    def heal(self) -> None:
        """Back to passing traffic (listening again after refuse()); armed cuts are dropped."""
        with self._lock:
            self._cuts_armed = 0
            self._hole_armed = False
            if self._listener is None and self.running:
                self._listen(self.port)
            self.mode = "pass"

    def heal_new_only(self) -> None:
        """Pass the traffic of connections made from now on; keep holding the ones open now."""
        with self._lock:
            for link in self._links:
                link.held = True
            self._cuts_armed = 0
            self._hole_armed = False
            self.mode = "pass"

    def release_held(self) -> None:
        with self._lock:
            for link in self._links:
                link.held = False

    def close_connections(self) -> None:
        with self._lock:
            links = list(self._links)
        for link in links:
            link.close()

    def close(self) -> None:
        self.running = False
        with self._lock:
            listener, self._listener = self._listener, None
        if listener is not None:
            listener.close()
        self.close_connections()
        self._thread.join(2)

    # -- internals --------------------------------------------------------------------
    def _listen(self, port: int) -> None:
        last: Optional[OSError] = None
        for _ in range(50):
            try:
                self._listener = socket.create_server(("127.0.0.1", port), backlog=64)
                return
            except OSError as exc:   # the port of a just-closed listener: retry briefly
                last = exc
                time.sleep(0.05)
        raise last  # type: ignore[misc]

    def _take_cut(self, sql: str) -> bool:
        if not is_commit_sql(sql):
            return False
        with self._lock:
            if self._cuts_armed <= 0:
                return False
            self._cuts_armed -= 1
            self.cut_sql.append(sql)
            return True

    def _take_hole(self, sql: str) -> bool:
        if not self._hole_armed or not is_commit_sql(sql):
            return False
        with self._lock:
            armed, self._hole_armed = self._hole_armed, False
            return armed

    def _cut_fired(self) -> None:
        with self._lock:
            self.cuts += 1

    def _forget(self, link: _Link) -> None:
        with self._lock:
            self._links.discard(link)

    def _accept(self) -> None:
        while self.running:
            listener = self._listener
            if listener is None:
                time.sleep(_POLL)
                continue
            try:
                ready, _, _ = select.select([listener], [], [], 0.1)
                if not ready:
                    continue
                client, _ = listener.accept()
            except (OSError, ValueError):
                continue
            link = _Link(self, client)
            with self._lock:
                if self.mode == "refuse" or not self.running:
                    client.close()
                    continue
                self._links.add(link)
                self.connections += 1
            threading.Thread(target=link.run_client_side, daemon=True, name="fault-proxy-c2s").start()

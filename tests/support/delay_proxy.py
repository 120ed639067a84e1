"""A TCP proxy on 127.0.0.1 that delays every answer of the server behind it.

Used to make one real PostgreSQL server measurably slower for the read
algorithm tests, without touching the server.  Threads, bounded by the life of
the proxy; stop() closes everything.
"""
from __future__ import annotations

import select
import socket
import threading
import time


class DelayProxy:
    def __init__(self, target_port: int, delay_s: float, target_host: str = "127.0.0.1"):
        self.target = (target_host, target_port)
        self.delay_s = delay_s
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.running = True
        self.sockets: list[socket.socket] = []
        self.thread = threading.Thread(target=self._accept, daemon=True, name="delay-proxy")
        self.thread.start()

    def _accept(self) -> None:
        while self.running:
            ready, _, _ = select.select([self.listener], [], [], 0.2)
            if not ready:
                continue
            try:
                client, _ = self.listener.accept()
                upstream = socket.create_connection(self.target, timeout=5)
            except OSError:
                continue
            upstream.settimeout(None)
            self.sockets += [client, upstream]
            threading.Thread(target=self._pipe, args=(client, upstream, 0.0), daemon=True).start()
            threading.Thread(target=self._pipe, args=(upstream, client, self.delay_s), daemon=True).start()

    def _pipe(self, source: socket.socket, sink: socket.socket, delay: float) -> None:
        try:
            while self.running:
                ready, _, _ = select.select([source], [], [], 0.2)
                if not ready:
                    continue
                data = source.recv(65536)
                if not data:
                    break
                if delay:
                    time.sleep(delay)
                sink.sendall(data)
        except OSError:
            pass
        finally:
            for sock in (source, sink):
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def stop(self) -> None:
        self.running = False
        self.listener.close()
        for sock in self.sockets:
            try:
                sock.close()
            except OSError:
                pass
        self.thread.join(2)

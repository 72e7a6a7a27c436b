"""A TCP proxy whose connections a test cuts, as a network (or a server) that goes away.

Used in front of tokenrelay by the page tests, and in front of PostgreSQL and Redis by the
readiness tests.
"""

from __future__ import annotations

import socket
import threading
from collections.abc import Callable
from contextlib import suppress

__all__ = ["DroppingProxy"]


class DroppingProxy:
    """A TCP proxy in front of ``target`` (``scheme://host:port``) whose connections a test cuts.

    The browser cannot be made to lose one response mid-body (offline emulation leaves running
    responses alone, and a routed response cannot stream), so the page is loaded through this
    proxy instead: ``drop()`` shuts every connection at once, mid-response, and makes new ones
    fail until ``restore()``, which is what a Wi-Fi that comes back looks like to the page.
    """

    def __init__(self, target: str) -> None:
        host, port = target.rsplit("://", 1)[1].rsplit(":", 1)
        self._target = (host, int(port))
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port: int = self._listener.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self._sockets: set[socket.socket] = set()
        self._lock = threading.Lock()
        self._refusing = False
        threading.Thread(target=self._accept, daemon=True, name="dropping-proxy").start()

    def drop(self) -> None:
        """Cut every open connection now, and refuse new ones until ``restore()``."""
        with self._lock:
            self._refusing = True
            sockets, self._sockets = self._sockets, set()
        for sock in sockets:
            with suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)  # wakes the pump blocked in recv()

    def restore(self) -> None:
        with self._lock:
            self._refusing = False

    def close(self) -> None:
        self.drop()
        self._listener.close()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return  # closed
            with self._lock:
                refusing = self._refusing
            if refusing:
                client.close()
                continue
            try:
                server = socket.create_connection(self._target)
            except OSError:
                client.close()
                continue
            with self._lock:
                self._sockets.update((client, server))
            pair = _Pair(client, server, self._forget)
            threading.Thread(target=pair.pump, args=(client, server), daemon=True).start()
            threading.Thread(target=pair.pump, args=(server, client), daemon=True).start()

    def _forget(self, *sockets: socket.socket) -> None:
        with self._lock:
            self._sockets.difference_update(sockets)


class _Pair:
    """Both ends of one proxied connection: bytes pumped each way, closed once both are done."""

    def __init__(
        self,
        client: socket.socket,
        server: socket.socket,
        forget: Callable[[socket.socket, socket.socket], None],
    ) -> None:
        self._sockets = (client, server)
        self._forget = forget
        self._running = 2
        self._lock = threading.Lock()

    def pump(self, source: socket.socket, sink: socket.socket) -> None:
        with suppress(OSError):
            while data := source.recv(65536):
                sink.sendall(data)
        for sock in self._sockets:  # one side ended: so does the other
            with suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
        with self._lock:
            self._running -= 1
            last = self._running == 0
        if last:
            self._forget(*self._sockets)
            for sock in self._sockets:
                sock.close()

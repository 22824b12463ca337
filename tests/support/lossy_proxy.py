"""A TCP proxy in front of Redis that loses one reply, or holds one request, on request.

Losing the reply to a command that Redis ran is what a connection cut at the wrong moment
does: redis-py (and tokenrelay) send the command again, and Redis must not apply it twice.
Holding a request back is a slow network for that one command.
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from types import TracebackType
from typing import Self


class LossyProxy:
    """Forwards connections to Redis on `upstream_port`; see `lose_reply_to` and `hold`."""

    def __init__(self, upstream_port: int) -> None:
        self.upstream = ("127.0.0.1", upstream_port)
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self._lock = threading.Lock()
        self._lose: bytes | None = None
        self._hold: tuple[bytes, float] | None = None
        self.lost = threading.Event()  # set once a reply was lost
        self._sockets: list[socket.socket] = []
        self._closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    def lose_reply_to(self, marker: bytes) -> None:
        """The next request containing `marker` reaches Redis; its reply never comes back
        (the connection is cut once Redis has answered)."""
        with self._lock:
            self._lose = marker
            self.lost.clear()

    def hold(self, marker: bytes, seconds: float) -> None:
        """The next request containing `marker` reaches Redis `seconds` late."""
        with self._lock:
            self._hold = (marker, seconds)

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        with self._lock:  # a connection accepted from now on is closed by `_accept` itself
            self._closed = True
            sockets, self._sockets = self._sockets, []
        _close(self._listener)  # the shutdown also wakes the thread blocked in accept()
        for sock in sockets:
            _close(sock)

    def _accept(self) -> None:
        with contextlib.suppress(OSError):
            while True:
                client, _ = self._listener.accept()
                try:
                    upstream = socket.create_connection(self.upstream)
                except OSError:  # Redis is away: so is this connection
                    _close(client)
                    continue
                with self._lock:
                    if self._closed:
                        _close(client)
                        _close(upstream)
                        return
                    self._sockets += [client, upstream]
                losing = threading.Event()
                threading.Thread(
                    target=self._requests, args=(client, upstream, losing), daemon=True
                ).start()
                threading.Thread(
                    target=self._replies, args=(client, upstream, losing), daemon=True
                ).start()

    def _requests(
        self, client: socket.socket, upstream: socket.socket, losing: threading.Event
    ) -> None:
        with contextlib.suppress(OSError):
            while data := client.recv(65536):
                with self._lock:
                    if self._lose is not None and self._lose in data:
                        self._lose = None
                        losing.set()
                    held = self._hold
                    if held is not None and held[0] in data:
                        self._hold = None
                if held is not None and held[0] in data:
                    time.sleep(held[1])  # the slow network: this one request is late
                upstream.sendall(data)

    def _replies(
        self, client: socket.socket, upstream: socket.socket, losing: threading.Event
    ) -> None:
        with contextlib.suppress(OSError):
            while data := upstream.recv(65536):
                if losing.is_set():  # Redis ran it and answered: the answer is lost
                    _close(client)
                    _close(upstream)
                    self.lost.set()
                    return
                client.sendall(data)


def _close(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)
    sock.close()

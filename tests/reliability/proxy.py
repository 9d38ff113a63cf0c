"""A TCP proxy for tests that can stall its connections: a half-open network, on demand."""

from __future__ import annotations

import contextlib
import select
import socket
import threading


class _Pair:
    def __init__(self, client: socket.socket, server: socket.socket) -> None:
        self.client, self.server = client, server
        self.stalled = threading.Event()
        self.closed = threading.Event()

    def close(self) -> None:
        self.closed.set()
        for sock in (self.client, self.server):
            with contextlib.suppress(OSError):
                sock.close()


class StallableProxy:
    """Forwards 127.0.0.1:<port> to ``upstream``; ``stall()`` freezes the connections open now."""

    def __init__(self, upstream: tuple[str, int]) -> None:
        self.upstream = upstream
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self._pairs: list[_Pair] = []
        self._lock = threading.Lock()
        self._stopped = threading.Event()
        threading.Thread(target=self._accept, daemon=True).start()

    def stall(self) -> int:
        """Stop forwarding on every current connection, keeping them open; return how many."""
        with self._lock:
            live = [p for p in self._pairs if not p.closed.is_set()]
        for pair in live:
            pair.stalled.set()
        return len(live)

    def close(self) -> None:
        self._stopped.set()
        self._listener.close()
        with self._lock:
            for pair in self._pairs:
                pair.close()

    def _accept(self) -> None:
        while not self._stopped.is_set():
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            try:
                server = socket.create_connection(self.upstream)
            except OSError:
                client.close()
                continue
            pair = _Pair(client, server)
            with self._lock:
                self._pairs.append(pair)
            threading.Thread(target=self._pump, args=(pair,), daemon=True).start()

    def _pump(self, pair: _Pair) -> None:
        peers = {pair.client: pair.server, pair.server: pair.client}
        while not pair.closed.is_set() and not self._stopped.is_set():
            if pair.stalled.is_set():
                pair.closed.wait(0.05)  # neither read nor forward: the peers see silence
                continue
            try:
                readable, _, _ = select.select(list(peers), [], [], 0.05)
                for sock in readable:
                    data = sock.recv(65536)
                    if not data:
                        pair.close()
                        return
                    peers[sock].sendall(data)
            except OSError:
                pair.close()
                return

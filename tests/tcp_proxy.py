"""A TCP proxy in front of the test database that a test can cut and restore: a real outage
of the database as the app sees it, without stopping the server the other tests use."""

import socket
import threading
from contextlib import suppress


class TcpProxy:
    def __init__(self, target_host: str, target_port: int) -> None:
        self.target = (target_host, target_port)
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            self.port: int = probe.getsockname()[1]
        self._lock = threading.Lock()
        self._sockets: set[socket.socket] = set()
        self._listener: socket.socket | None = None
        self._frozen = threading.Event()
        self._drop_reply_to: bytes | None = None
        self._drop_after: bytes | None = None
        self._armed: set[socket.socket] = set()
        self._dropping: set[socket.socket] = set()

    def start(self) -> None:
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(64)
        self._listener = listener
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()

    def cut(self) -> None:
        """Refuse new connections and reset every open one, as a crashed server would."""
        self._frozen.clear()
        with self._lock:
            listener, self._listener = self._listener, None
            open_sockets, self._sockets = self._sockets, set()
        if listener is not None:
            with suppress(OSError):
                listener.shutdown(socket.SHUT_RDWR)
            listener.close()
        for sock in open_sockets:
            with suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()

    def freeze(self) -> None:
        """Keep every connection open and accept new ones, but forward nothing either way: a
        server behind a dropped network, as the app sees it."""
        self._frozen.set()

    def thaw(self) -> None:
        self._frozen.clear()

    def drop_reply_to(self, statement: bytes, after: bytes | None = None) -> None:
        """Forward the next query containing `statement` (say, a COMMIT) on a connection
        that has sent a query containing `after` first, if given, then break that connection
        before the server's reply reaches the app: the server did the work, the app never
        hears so."""
        self._drop_reply_to, self._drop_after = statement, after

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return
            if self._frozen.is_set():
                with self._lock:
                    self._sockets.add(client)
                continue
            try:
                upstream = socket.create_connection(self.target, timeout=5)
            except OSError:
                client.close()
                continue
            upstream.settimeout(None)
            with self._lock:
                self._sockets |= {client, upstream}
            for source, sink in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(source, sink), daemon=True).start()

    def _pipe(self, source: socket.socket, sink: socket.socket) -> None:
        with suppress(OSError):
            while chunk := source.recv(65536):
                if source in self._dropping:  # the reply to the statement to drop
                    for end in (source, sink):
                        end.shutdown(socket.SHUT_RDWR)
                    return
                if self._drop_after is not None and self._drop_after in chunk:
                    self._armed.add(source)
                if (
                    self._drop_reply_to is not None
                    and self._drop_reply_to in chunk
                    and (self._drop_after is None or source in self._armed)
                ):
                    self._drop_reply_to = self._drop_after = None
                    self._dropping.add(sink)
                if not self._frozen.is_set():
                    sink.sendall(chunk)
        with suppress(OSError):
            sink.shutdown(socket.SHUT_WR)

"""A misbehaving payment provider over real HTTP, for the faults the real FakePay never shows."""

import json
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


@dataclass
class Behaviour:
    status: int = 200
    body: bytes = b'{"message": "Payment processed successfully"}'
    delay_s: float = 0.0
    trickle_s: float = 0.0  # > 0: send the reply one byte at a time, this far apart
    trickle_head: bool = False  # trickle the status line and headers too, not only the body
    headers: dict[str, str] = field(default_factory=dict)
    gate: threading.Event | None = None  # set: hold the request until the event is set
    drop: bool = False  # read the request, then close the connection without a reply


class StandInProvider:
    """Answers every POST with the next queued behaviour (`answer_next`), else the current
    `behaviour`; counts what it received and what it answered."""

    def __init__(self) -> None:
        self.behaviour = Behaviour()
        self.received: list[dict[str, Any]] = []
        self.answered: list[dict[str, Any]] = []  # the requests whose reply was sent in full
        self._queue: list[Behaviour] = []
        self._lock = threading.Lock()
        provider = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                with provider._lock:
                    provider.received.append(json.loads(body))
                    behaviour = provider._queue.pop(0) if provider._queue else provider.behaviour
                if behaviour.gate is not None:
                    behaviour.gate.wait(timeout=30)
                time.sleep(behaviour.delay_s)
                if behaviour.drop:
                    self.close_connection = True
                    with suppress(OSError):
                        self.connection.shutdown(socket.SHUT_RDWR)
                    return
                with suppress(ConnectionError):  # the app may have given up waiting
                    if behaviour.trickle_head:
                        self.trickle_whole_reply(behaviour)
                        return
                    self.send_response(behaviour.status)
                    self.send_header("Content-Type", "application/json")
                    for name, value in behaviour.headers.items():
                        self.send_header(name, value)
                    self.send_header("Content-Length", str(len(behaviour.body)))
                    self.end_headers()
                    if behaviour.trickle_s:
                        for byte in behaviour.body:
                            self.wfile.write(bytes([byte]))
                            self.wfile.flush()
                            time.sleep(behaviour.trickle_s)
                    else:
                        self.wfile.write(behaviour.body)
                    with provider._lock:
                        provider.answered.append(json.loads(body))

            def trickle_whole_reply(self, behaviour: Behaviour) -> None:
                head = (
                    f"HTTP/1.0 {behaviour.status} OK\r\nContent-Type: application/json\r\n"
                    f"Content-Length: {len(behaviour.body)}\r\n\r\n"
                )
                for byte in head.encode() + behaviour.body:
                    self.wfile.write(bytes([byte]))
                    self.wfile.flush()
                    time.sleep(behaviour.trickle_s)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}/fakepay"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def answer(
        self,
        status: int,
        body: bytes | dict[str, Any],
        delay_s: float = 0.0,
        trickle_s: float = 0.0,
        headers: dict[str, str] | None = None,
        trickle_head: bool = False,
    ) -> None:
        encoded = json.dumps(body).encode() if isinstance(body, dict) else body
        self.behaviour = Behaviour(status, encoded, delay_s, trickle_s, trickle_head, headers or {})

    def answer_next(
        self,
        status: int = 200,
        body: bytes | dict[str, Any] = b'{"message": "Payment processed successfully"}',
        gate: threading.Event | None = None,
        drop: bool = False,
    ) -> None:
        """The next request not yet answered gets this instead of `behaviour`; queued calls
        apply in order, one request each."""
        encoded = json.dumps(body).encode() if isinstance(body, dict) else body
        with self._lock:
            self._queue.append(Behaviour(status, encoded, gate=gate, drop=drop))

    def drop_connections(self) -> None:
        """From now on read each request, then close the connection without replying."""
        self.behaviour = Behaviour(drop=True)

    def requests_for(self, transaction_id: str) -> list[dict[str, Any]]:
        return [body for body in self.received if body.get("transactionId") == transaction_id]

    def __enter__(self) -> "StandInProvider":
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._server.shutdown()
        self._server.server_close()


@contextmanager
def silent_provider() -> Iterator[str]:
    """A provider that accepts connections and never replies: the kernel completes the
    handshake from the listen backlog, and nothing ever reads the request."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(128)
        yield f"http://127.0.0.1:{listener.getsockname()[1]}/fakepay"


def refusing_provider_url() -> str:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    return f"http://127.0.0.1:{port}/fakepay"

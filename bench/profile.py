"""A profile of one read, for `make bench`: where a `GET /invoice/{id}` spends its time.

The app runs under pyinstrument (a sampling profiler: the process's own stacks, every 0.5 ms)
while wrk reads invoices through it at c=32, as in the measured runs. Saved beside the
results: the call tree as text, and a table of the read's parts, each in microseconds per
request (the time its frames were on the stack, divided by the requests served while the
profile ran) and as a share of the whole read. The profiler slows the process down, so the
microseconds are larger than in an unprofiled run; the shares are what carries over. (The
HTML view of a session runs to tens of MB: `pyinstrument --load=read.pyisession -r html`
renders it from the run's work folder.)
"""

from __future__ import annotations

import signal
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from pyinstrument.frame import Frame
from pyinstrument.renderers import ConsoleRenderer
from pyinstrument.session import Session

from scripts.processes import UVICORN, Running, free_port, running

INTERVAL_S = 0.0005

# The parts of a read, by the frame (function, and a piece of its file's path) that runs each.
# Nested parts are indented below the part they are in; a part's time includes its children.
# SQLAlchemy runs its engine's own code in a greenlet, which the profiler sees as stacks of
# their own: those are parts of their own too, not inside the route handler's.
PARTS: tuple[tuple[int, str, str, str], ...] = (
    (0, "the app, outermost middleware in (ASGI call)", "__call__", "observability.py"),
    (1, "the request's log line (loguru)", "_log", "loguru/_logger.py"),
    (1, "dependencies solved (key check, engine, parameters)", "solve_dependencies", "fastapi"),
    (1, "the route handler", "read_invoice", "main.py"),
    (2, "borrow a connection (pool checkout, pre-ping)", "start", "ext/asyncio/engine.py"),
    (2, "the SELECT, sent and its rows read", "execute", "ext/asyncio/engine.py"),
    (2, "give the connection back (ROLLBACK, pool return)", "close", "ext/asyncio/engine.py"),
    (2, "the row as InvoicePublic", "to_public", "invoices.py"),
    (1, "response model validation and JSON", "serialize_response", "fastapi/routing.py"),
    (0, "SQLAlchemy's engine, in its greenlet: the statement", "execute", "engine/base.py"),
    (0, "SQLAlchemy's engine, in its greenlet: the checkout", "connect", "engine/base.py"),
    (0, "SQLAlchemy's engine, in its greenlet: the close", "close", "engine/base.py"),
    (0, "HTTP: uvicorn and httptools, outside the app", "data_received", "httptools_impl.py"),
)


@dataclass(frozen=True)
class Part:
    depth: int
    label: str
    seconds: float


@contextmanager
def profiled_app(session_path: Path, log_path: Path, env: dict[str, str]) -> Iterator[Running]:
    """The app under uvicorn, under pyinstrument; the session is saved when the block ends.
    The app is stopped with SIGINT: uvicorn raises the signal it stopped on again once it has
    shut down, and pyinstrument survives a KeyboardInterrupt to write its file, not SIGTERM."""
    port = free_port()
    arguments = [
        "-m",
        "pyinstrument",
        "--interval",
        str(INTERVAL_S),
        "--renderer",
        "pyisession",
        "--outfile",
        str(session_path),
        *UVICORN,
        "main:app",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
    ]
    with running(arguments, port, log_path, env) as server:
        yield server
        server.process.send_signal(signal.SIGINT)
        server.process.wait(timeout=120)


def time_in(frame: Frame, function: str, path_part: str) -> float:
    """Seconds on the stack of every frame running `function` from a file whose path holds
    `path_part`; a frame inside another such frame (recursion) is not counted twice."""
    if frame.function == function and path_part in (frame.file_path or ""):
        return frame.time
    return sum(time_in(child, function, path_part) for child in frame.children)


def parts_of(session: Session) -> list[Part]:
    root = session.root_frame()
    if root is None:
        return []
    return [
        Part(depth, label, time_in(root, function, path)) for depth, label, function, path in PARTS
    ]


def write_profile(session_path: Path, stem: Path, requests: int) -> str:
    """Save the call tree as `stem`.txt and the table of parts as `stem`-parts.txt; the
    table as text."""
    session = Session.load(str(session_path))
    text = ConsoleRenderer(unicode=True, color=False).render(session)
    stem.with_suffix(".txt").write_text(text)
    lines = [
        f"GET /invoice/{{id}} at c=32 under pyinstrument: {requests} requests, "
        f"{session.duration:.1f} s profiled, {session.sample_count} samples",
        f"{'part':64} {'us/request':>10} {'share':>6}",
    ]
    parts = parts_of(session)
    whole_s = max(sum(part.seconds for part in parts if part.depth == 0), 1e-9)
    for part in parts:
        label = "  " * part.depth + part.label
        per_request = part.seconds / max(requests, 1) * 1e6
        lines.append(f"{label:64} {per_request:>10.0f} {part.seconds / whole_s:>6.0%}")
    table = "\n".join(lines) + "\n"
    Path(f"{stem}-parts.txt").write_text(table)
    return table


if __name__ == "__main__":  # python -m bench.profile SESSION REQUESTS STEM: render it again
    print(write_profile(Path(sys.argv[1]), Path(sys.argv[3]), int(sys.argv[2])))

"""Running the app (or another ASGI app) and FakePay as child processes on free loopback ports.

Standard library only and free of the app's own modules, so the test suite can use it before
it has pointed the settings at its own database.
"""

import os
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parent.parent
# The event loop and HTTP parser the app is served with everywhere: make, tests and bench.
UVICORN = ["-m", "uvicorn", "--loop", "uvloop", "--http", "httptools", "--no-access-log"]
MULTIPROC_DIR = "PROMETHEUS_MULTIPROC_DIR"


@dataclass(frozen=True)
class Running:
    """A child process serving HTTP at `url`, its output in `log_path`."""

    url: str
    log_path: Path
    process: subprocess.Popen[bytes]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def port_answers(host: str, port: int) -> bool:
    try:
        socket.create_connection((host, port), timeout=1).close()
    except OSError:
        return False
    return True


def wait_for_port(port: int, process: subprocess.Popen[bytes], timeout: float = 30) -> None:
    """Return once something listens on `port`; fail if `process` exits or time runs out."""
    deadline = time.monotonic() + timeout
    while not port_answers("127.0.0.1", port):
        if process.poll() is not None:
            raise RuntimeError(f"process exited early with {process.returncode}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"nothing answered on port {port} within {timeout} s")
        time.sleep(0.05)


@contextmanager
def running(
    arguments: list[str], port: int, log_path: Path, env: dict[str, str] | None = None
) -> Iterator[Running]:
    """`python <arguments>` listening on `port`, ready, for as long as the block runs."""
    with log_path.open("ab") as log:
        process = subprocess.Popen(
            [sys.executable, *arguments],
            cwd=PROJECT_ROOT,
            env={**os.environ, **(env or {})},
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    try:
        wait_for_port(port, process)
        yield Running(f"http://127.0.0.1:{port}", log_path, process)
    finally:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@contextmanager
def running_app(
    log_path: Path, env: dict[str, str] | None = None, workers: int = 1, app: str = "main:app"
) -> Iterator[Running]:
    """The app under uvicorn on a free port; with several workers, each scrape of /metrics
    counts them all (`multiprocess_metrics`)."""
    port = free_port()
    arguments = [*UVICORN, app, "--host", "127.0.0.1", "--port", str(port)]
    with (
        multiprocess_metrics(env or {}, workers) as app_env,
        running([*arguments, "--workers", str(workers)], port, log_path, app_env) as server,
    ):
        yield server


@contextmanager
def multiprocess_metrics(env: dict[str, str], workers: int) -> Iterator[dict[str, str]]:
    """`env` for an app of `workers` processes: with more than one, and no
    PROMETHEUS_MULTIPROC_DIR chosen, a new empty directory for prometheus-client's
    multiprocess mode, removed when the app has stopped (`make serve` keeps its own)."""
    if workers == 1 or MULTIPROC_DIR in {**os.environ, **env}:
        yield env
        return
    with tempfile.TemporaryDirectory(prefix="metrics-") as directory:
        yield {**env, MULTIPROC_DIR: directory}


def running_fakepay(log_path: Path, port: int | None = None) -> AbstractContextManager[Running]:
    """The real fake_pay.py on `port`, or on a free one."""
    port = port or free_port()
    return running([str(PROJECT_ROOT / "fake_pay.py"), str(port)], port, log_path)

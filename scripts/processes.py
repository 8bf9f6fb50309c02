"""Starting the app (or another ASGI app) as a uvicorn process on a free loopback port.

Standard library only and free of the app's own modules, so the test suite can use it before
it has pointed the settings at its own database.
"""

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parent.parent


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


def start_app(
    log_path: Path,
    env: dict[str, str] | None = None,
    workers: int = 1,
    app: str = "main:app",
) -> tuple[subprocess.Popen[bytes], str]:
    """A uvicorn process serving `app` on a free port, ready; its output goes to `log_path`."""
    port = free_port()
    command = [sys.executable, "-m", "uvicorn", app, "--host", "127.0.0.1", "--port", str(port)]
    command += ["--workers", str(workers), "--no-access-log"]
    with log_path.open("ab") as log:
        process = subprocess.Popen(
            command,
            cwd=PROJECT_ROOT,
            env={**os.environ, **(env or {})},
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    try:
        wait_for_port(port, process)
    except RuntimeError:
        process.kill()
        raise
    return process, f"http://127.0.0.1:{port}"

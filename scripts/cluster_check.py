"""HAProxy's health check of the Galera nodes: is this node fit to take the app's queries?

    python -m scripts.cluster_check SECRETS_FILE CHECK_PORT:NODE_PORT...

HAProxy's own `mysql-check` only sees the handshake, which a node also completes while it is
still joining, copying its data or cut off from the others (then it refuses every query with
"WSREP has not yet prepared node for application use"). So HAProxy asks this process instead,
over HTTP (`option httpchk`), one port per node: each GET opens a connection to the node as the
`clustercheck` account (no privileges: status variables need none) and answers 200 only when
the node is in the primary component, `wsrep_ready` is ON and its `wsrep_local_state` is 4
(Synced), else 503 with the reason.

A donor (state 2, Donor/Desynced) is also answered 200 when the cluster transfers state with
mariabackup: mariabackup copies the data while the donor keeps serving, and an incremental
transfer (IST) is only a stream of write-sets from the donor's cache. Taking the donor out of
HAProxy would turn every rejoin into a second outage whenever the donor is the writer.
Methods that block the donor (mysqldump, rsync) are answered 503.

Standard library and PyMySQL only; one thread per check, each with a fresh connection, so a
hung node delays no other node's answer.
"""

from __future__ import annotations

import json
import signal
import sys
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import FrameType

import pymysql

HOST = "127.0.0.1"
USER = "clustercheck"
TIMEOUT_S = 1.0
SYNCED = 4
DONOR = 2
NON_BLOCKING_SST = {"mariabackup"}


@dataclass(frozen=True)
class NodeState:
    local_state: int
    comment: str
    ready: bool
    primary: bool
    sst_method: str


def verdict(state: NodeState) -> tuple[bool, str]:
    """(up, why) for one node's state."""
    if not state.primary:
        return False, f"not in the primary component ({state.comment})"
    if not state.ready:
        return False, f"wsrep_ready is OFF ({state.comment})"
    if state.local_state == SYNCED:
        return True, "Synced"
    if state.local_state == DONOR and state.sst_method in NON_BLOCKING_SST:
        return True, f"{state.comment}, serving: {state.sst_method} does not block a donor"
    return False, state.comment


def read_state(port: int, password: str) -> NodeState:
    with (
        pymysql.connect(
            host=HOST,
            port=port,
            user=USER,
            password=password,
            connect_timeout=TIMEOUT_S,
            read_timeout=TIMEOUT_S,
            write_timeout=TIMEOUT_S,
        ) as connection,
        connection.cursor() as cursor,
    ):
        cursor.execute(
            "SHOW GLOBAL STATUS WHERE Variable_name IN ('wsrep_local_state', "
            "'wsrep_local_state_comment', 'wsrep_ready', 'wsrep_cluster_status')"
        )
        status = {str(name): str(value) for name, value in cursor.fetchall()}
        cursor.execute("SELECT @@wsrep_sst_method")
        row = cursor.fetchone()
    return NodeState(
        local_state=int(status.get("wsrep_local_state", "0")),
        comment=status.get("wsrep_local_state_comment", "?"),
        ready=status.get("wsrep_ready") == "ON",
        primary=status.get("wsrep_cluster_status") == "Primary",
        sst_method=str(row[0]) if row else "",
    )


def check(port: int, password: str) -> tuple[bool, str]:
    try:
        return verdict(read_state(port, password))
    except pymysql.err.Error as exc:
        return False, f"no answer: {exc.args[-1] if exc.args else exc}"


class CheckServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, check_port: int, node_port: int, password: str) -> None:
        super().__init__((HOST, check_port), CheckHandler)
        self.node_port = node_port
        self.password = password
        self.last: tuple[bool, str] | None = None
        self.lock = threading.Lock()

    def handle_error(self, request: object, client_address: object) -> None:
        """HAProxy resets the connection once it has read the status line: not an error."""
        if not isinstance(sys.exc_info()[1], ConnectionError):
            super().handle_error(request, client_address)  # type: ignore[arg-type]

    def record(self, up: bool, why: str) -> None:
        """Log each change of verdict or reason (not every check: HAProxy asks twice a second)."""
        with self.lock:
            if (up, why) != self.last:
                stamp = (
                    time.strftime("%Y-%m-%dT%H:%M:%S") + f".{int(time.time() * 1000) % 1000:03d}"
                )
                print(f"{stamp} node :{self.node_port} {'up' if up else 'down'}: {why}", flush=True)
                self.last = (up, why)


class CheckHandler(BaseHTTPRequestHandler):
    server: CheckServer

    def do_GET(self) -> None:
        up, why = check(self.server.node_port, self.server.password)
        self.server.record(up, why)
        body = (why + "\n").encode()
        self.send_response(200 if up else 503)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        pass  # one line per check would be noise; changes are logged by `record`


def main() -> None:
    if len(sys.argv) < 3:
        raise SystemExit(__doc__)
    password = json.loads(Path(sys.argv[1]).read_text())["check"]
    servers = []
    for pair in sys.argv[2:]:
        check_port, node_port = (int(part) for part in pair.split(":"))
        servers.append(CheckServer(check_port, node_port, password))
    threads = [threading.Thread(target=server.serve_forever, daemon=True) for server in servers]
    for thread in threads:
        thread.start()
    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    stop.wait()
    for server in servers:
        server.shutdown()
        server.server_close()


if __name__ == "__main__":
    main()

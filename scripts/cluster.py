"""A three-node MariaDB Galera cluster behind HAProxy on loopback, for `make cluster-*`.

    python -m scripts.cluster up | down | status | failback

Why: one database server is one machine to lose. Galera replicates every commit to all three
nodes before it is acknowledged, so losing one node loses no acknowledged write, and HAProxy in
front gives the app one address (127.0.0.1:3310) that moves to a surviving node by itself.

Layout, all on 127.0.0.1 and under `.data/cluster/`:

- nodes n1, n2, n3 on ports 3311-3313, each started with `--no-defaults` and every option on
  its command line (it reads no system configuration, like `make db-up`'s server), its data
  directory, socket, pid file and error log in `.data/cluster/nN/`, and its own loopback ports
  for group communication (4561-4563), incremental state transfer (4571-4573) and full state
  transfer (4581-4583);
- `scripts/cluster_check.py` on 9201-9203, one HTTP port per node, answering 200 only while
  its node can take queries (Synced, see there);
- HAProxy on 3310 in TCP mode: one writer (n1, the others `backup`), new connections only to
  nodes whose check answers 200, sessions on a node shut as soon as it is marked down.

HAProxy sticks to the node it last chose (a one-entry stick table): when n1 comes back after a
failover the writer stays where it is, because sending new connections to n1 while the pool's
old ones stay on n2 would make two writers, and their commits would fail each other's
certification. `failback` moves the writer back to n1 on purpose (it cuts the sessions on the
current writer, so do it when the cluster is quiet).

`up` installs what is missing (mariadb-server, galera-4, mariadb-backup, haproxy, socat) with
apt-get, starts every node that is down, and applies the schema through node 1. With no node
running it bootstraps one first: n1 on a cluster never started; otherwise the node whose
`grastate.dat` says `safe_to_bootstrap: 1` (the last one stopped cleanly), or after a crash of
all three the node holding the most recent commit (`mariadbd --wsrep-recover`). The others
join it: by IST (replaying the writes they missed from a donor's write-set cache) when they
have data, by SST (a mariabackup copy streamed over socat) when they have none.

Galera waits for a silent node before it evicts it, and every commit waits with it: the
shortened `evs.*` timeouts below make that under a second instead of 5 s.
"""

from __future__ import annotations

import argparse
import fcntl
import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import pymysql

from scripts.processes import port_answers
from scripts.stack import DATA, ensure_schema, server_binary
from settings import PROJECT_ROOT, Settings

CLUSTER = DATA / "cluster"
SECRETS = CLUSTER / "secrets.json"
HAPROXY_CFG = CLUSTER / "haproxy.cfg"
HAPROXY_PID = CLUSTER / "haproxy.pid"
HAPROXY_LOG = CLUSTER / "haproxy.log"
HAPROXY_SOCKET = CLUSTER / "haproxy.sock"
CHECK_PID = CLUSTER / "check.pid"
CHECK_LOG = CLUSTER / "check.log"
HOST = "127.0.0.1"
PROXY_PORT = 3310
BACKEND = "galera"
CLUSTER_NAME = "invoice-cluster"
SST_USER = "sst"
CHECK_USER = "clustercheck"
START_TIMEOUT_S = 180  # a joiner's first full copy included
STOP_TIMEOUT_S = 60
SYNCED = 4  # wsrep_local_state

# Eviction of a node that stopped answering, shortened from Galera's defaults (keepalive 1 s,
# check 0.5 s, suspect 5 s, inactive 15 s, install 7.5 s). While a dead node is not yet evicted
# every commit in the cluster waits, and the app gives up on a reply after DB_READ_TIMEOUT
# (1.2 s): eviction has to come well within that. On loopback a round trip takes microseconds,
# and the group-communication thread runs at real-time priority (below), so a live node that
# sends nothing for 0.7 s, seven keepalives in a row, is a node that is gone. Measured: writes
# resume about 1 s after a SIGKILL. Ordering Galera requires: keepalive <= inactive_check <=
# suspect <= inactive, install <= inactive.
EVICTION = {
    "evs.keepalive_period": "PT0.1S",
    "evs.inactive_check_period": "PT0.1S",
    "evs.suspect_timeout": "PT0.7S",
    "evs.inactive_timeout": "PT1.5S",
    "evs.install_timeout": "PT1.5S",
    "evs.join_retrans_period": "PT0.2S",
}

PACKAGES_HINT = """The cluster needs MariaDB with Galera, mariabackup, socat and HAProxy.
Install them, then run `make cluster-up` again:
  Debian/Ubuntu:  sudo apt-get install -y mariadb-server galera-4 mariadb-backup socat haproxy"""


def log(message: str) -> None:
    print(f"[cluster] {message}", flush=True)


@dataclass(frozen=True)
class Node:
    index: int

    @property
    def name(self) -> str:
        return f"n{self.index}"

    @property
    def port(self) -> int:
        return 3310 + self.index

    @property
    def gcomm_port(self) -> int:
        return 4560 + self.index

    @property
    def ist_port(self) -> int:
        return 4570 + self.index

    @property
    def sst_port(self) -> int:
        return 4580 + self.index

    @property
    def check_port(self) -> int:
        return 9200 + self.index

    @property
    def directory(self) -> Path:
        return CLUSTER / self.name

    @property
    def datadir(self) -> Path:
        return self.directory / "data"

    @property
    def socket(self) -> Path:
        return self.directory / "mysql.sock"

    @property
    def pid_file(self) -> Path:
        return self.directory / "mysql.pid"

    @property
    def error_log(self) -> Path:
        return self.directory / "mysql.err"

    @property
    def grastate(self) -> Path:
        return self.datadir / "grastate.dat"


NODES = (Node(1), Node(2), Node(3))
CLUSTER_ADDRESS = "gcomm://" + ",".join(f"{HOST}:{node.gcomm_port}" for node in NODES)


# --- what must be installed ------------------------------------------------------------------


def galera_provider() -> Path | None:
    """The libgalera_smm.so that the galera-4 package installed."""
    try:
        listing = subprocess.run(
            ["dpkg", "-L", "galera-4"], capture_output=True, text=True, check=False
        ).stdout
    except FileNotFoundError:
        listing = ""
    candidates = [line for line in listing.splitlines() if line.endswith("/libgalera_smm.so")]
    candidates += ["/usr/lib/galera/libgalera_smm.so", "/usr/lib64/galera-4/libgalera_smm.so"]
    return next((Path(path) for path in candidates if Path(path).is_file()), None)


def mariadb_server() -> str | None:
    found = server_binary()
    return found[1] if found and found[0] == "mariadb" else None


def haproxy_binary() -> str | None:
    return shutil.which("haproxy") or next(
        (path for path in ("/usr/sbin/haproxy",) if os.access(path, os.X_OK)), None
    )


def missing_packages() -> list[str]:
    checks = {
        "mariadb-server": mariadb_server() is not None,
        "galera-4": galera_provider() is not None,
        "mariadb-backup": shutil.which("mariadb-backup") is not None,
        "socat": shutil.which("socat") is not None,
        "haproxy": haproxy_binary() is not None,
    }
    return [package for package, present in checks.items() if not present]


def ensure_packages() -> None:
    missing = missing_packages()
    if not missing:
        return
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        raise SystemExit(PACKAGES_HINT)
    log(f"installing {' '.join(missing)} with apt-get (one time)")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    subprocess.run(["apt-get", "update", "-q"], check=True, env=env)
    subprocess.run(
        ["apt-get", "install", "-y", "-q", "--no-install-recommends", *missing],
        check=True,
        env=env,
    )
    if missing_packages():
        raise SystemExit(PACKAGES_HINT)


# --- secrets: the SST and health-check accounts ----------------------------------------------


def cluster_secrets() -> dict[str, str]:
    """Passwords of the two service accounts, made once and kept beside the data (mode 0600)."""
    if SECRETS.exists():
        stored: dict[str, str] = json.loads(SECRETS.read_text())
        return stored
    CLUSTER.mkdir(parents=True, exist_ok=True)
    made = {"sst": secrets.token_urlsafe(24), "check": secrets.token_urlsafe(24)}
    SECRETS.touch(mode=0o600)
    SECRETS.write_text(json.dumps(made))
    return made


# --- one node --------------------------------------------------------------------------------


def user_args() -> list[str]:
    # mariadbd refuses to run as root unless told which user to run as.
    return ["--user=root"] if os.geteuid() == 0 else []


@cache
def realtime_allowed() -> bool:
    """Whether this process may give a thread round-robin real-time priority (root, or
    CAP_SYS_NICE; a container may refuse it)."""
    try:
        os.sched_setscheduler(0, os.SCHED_RR, os.sched_param(1))
    except (OSError, AttributeError):
        return False
    os.sched_setscheduler(0, os.SCHED_OTHER, os.sched_param(0))
    return True


def node_options(node: Node, provider: Path) -> list[str]:
    provider_options = {
        "gmcast.listen_addr": f"tcp://{HOST}:{node.gcomm_port}",
        "ist.recv_addr": f"{HOST}:{node.ist_port}",
        "gcache.size": "128M",  # the writes a node may miss and still rejoin by IST
        **EVICTION,
    }
    if realtime_allowed():
        # The group-communication thread (keepalives, membership) ahead of every ordinary
        # process: with 1 s eviction, a node starved of CPU for a second (a joiner's crash
        # recovery beside the app and its load on two cores) would be taken for dead, and
        # every commit in the cluster waits while the membership is renegotiated.
        provider_options["gcomm.thread_prio"] = "rr:2"
    return [
        "--no-defaults",
        f"--datadir={node.datadir}",
        f"--port={node.port}",
        f"--bind-address={HOST}",
        f"--socket={node.socket}",
        f"--pid-file={node.pid_file}",
        f"--log-error={node.error_log}",
        "--skip-name-resolve",
        "--character-set-server=utf8mb4",
        # Three nodes share two cores and the app: small caches. The buffer pool is the
        # default 128M, not given here: the SST script of MariaDB 10.11 hands an explicit
        # --innodb-buffer-pool-size on to mariadb-backup, which refuses it and fails the copy.
        "--innodb-log-file-size=64M",
        "--max-connections=300",
        # What Galera needs: row events, interleaved auto-increment locks, InnoDB only.
        "--binlog-format=ROW",
        "--innodb-autoinc-lock-mode=2",
        "--default-storage-engine=InnoDB",
        "--wsrep-on=ON",
        f"--wsrep-provider={provider}",
        f"--wsrep-cluster-name={CLUSTER_NAME}",
        f"--wsrep-cluster-address={CLUSTER_ADDRESS}",
        f"--wsrep-node-name={node.name}",
        f"--wsrep-node-address={HOST}:{node.gcomm_port}",
        f"--wsrep-node-incoming-address={HOST}:{node.port}",
        f"--wsrep-sst-receive-address={HOST}:{node.sst_port}",
        "--wsrep-sst-method=mariabackup",
        "--wsrep-provider-options=" + ";".join(f"{k}={v}" for k, v in provider_options.items()),
        *user_args(),
    ]


def node_pid(node: Node) -> int | None:
    """The pid of this node's mariadbd, if it runs (a stale pid file or a reused pid is not)."""
    try:
        pid = int(node.pid_file.read_text().strip())
        command_line = Path(f"/proc/{pid}/cmdline").read_bytes()
    except (OSError, ValueError):
        return None
    return pid if f"--datadir={node.datadir}".encode() in command_line else None


def grastate(node: Node) -> dict[str, str]:
    """The node's saved replication state: uuid, seqno, safe_to_bootstrap ({} if none yet)."""
    try:
        lines = node.grastate.read_text().splitlines()
    except OSError:
        return {}
    pairs = (line.split(":", 1) for line in lines if ":" in line and not line.startswith("#"))
    return {key.strip(): value.strip() for key, value in pairs}


def initialise(node: Node) -> None:
    log(f"{node.name}: initialising a new data directory in {node.datadir}")
    install_db = shutil.which("mariadb-install-db") or shutil.which("mysql_install_db")
    if not install_db:
        raise SystemExit("mariadb-install-db is missing: reinstall the mariadb-server package")
    node.datadir.mkdir(parents=True, exist_ok=True)
    command = [
        install_db,
        "--no-defaults",
        f"--datadir={node.datadir}",
        "--auth-root-authentication-method=normal",
        "--skip-test-db",
        *user_args(),
    ]
    with node.error_log.open("a") as error_log:
        subprocess.run(command, check=True, stdout=error_log, stderr=subprocess.STDOUT)


@cache  # asked when choosing the bootstrap node and again when starting it
def recovered_position(node: Node, binary: str, provider: Path) -> tuple[str, int] | None:
    """(cluster uuid, seqno) of the last commit a node holds. A node that was killed leaves
    `seqno: -1` in grastate.dat; `mariadbd --wsrep-recover` reads the real one from InnoDB.
    Joining with it lets the node catch up by IST instead of a full copy."""
    state = grastate(node)
    if not state.get("uuid"):
        return None
    if state.get("seqno", "-1") != "-1":
        return state["uuid"], int(state["seqno"])
    recovery_log = node.directory / "recover.err"
    recovery_log.unlink(missing_ok=True)
    options = [o for o in node_options(node, provider) if not o.startswith("--log-error=")]
    subprocess.run(
        [binary, *options, f"--log-error={recovery_log}", "--wsrep-recover"],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        check=False,
        timeout=START_TIMEOUT_S,
    )
    text = recovery_log.read_text(errors="replace") if recovery_log.exists() else ""
    found = re.findall(r"Recovered position: ([0-9a-f-]+):(-?\d+)", text)
    if not found or found[-1][1] == "-1":
        log(f"{node.name}: no position recovered (see {recovery_log}): it will need a full copy")
        return None
    uuid, seqno = found[-1]
    log(f"{node.name}: recovered position {uuid}:{seqno} after an unclean stop")
    return uuid, int(seqno)


def mark_safe_to_bootstrap(node: Node) -> None:
    text = node.grastate.read_text()
    node.grastate.write_text(re.sub(r"safe_to_bootstrap:\s*\d", "safe_to_bootstrap: 1", text))


def start_node(
    node: Node, binary: str, provider: Path, *, bootstrap: bool
) -> subprocess.Popen[bytes]:
    node.directory.mkdir(parents=True, exist_ok=True)
    node.datadir.mkdir(exist_ok=True)
    command = [binary, *node_options(node, provider)]
    if grastate(node).get("seqno") == "-1":
        position = recovered_position(node, binary, provider)
        if position is not None:
            command.append(f"--wsrep-start-position={position[0]}:{position[1]}")
    if bootstrap:
        command.append("--wsrep-new-cluster")
    how = "bootstrapping a new cluster" if bootstrap else "joining"
    log(f"{node.name}: starting on {HOST}:{node.port}, {how}")
    return subprocess.Popen(
        command,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )


def node_connection(node: Node, config: Settings, timeout: float = 2) -> pymysql.Connection:
    """Root on the node's socket: no password before the first start secured it."""
    password = config.db_password.get_secret_value()
    for attempt in (password, ""):
        try:
            return pymysql.connect(
                unix_socket=str(node.socket),
                user=config.db_user,
                password=attempt,
                connect_timeout=timeout,
                read_timeout=timeout,
                autocommit=True,
            )
        except pymysql.err.OperationalError as exc:
            if exc.args[0] != 1045 or attempt == "":  # 1045: access denied
                raise
    raise AssertionError("unreachable")


def wsrep_status(connection: pymysql.Connection) -> dict[str, str]:
    with connection.cursor() as cursor:
        cursor.execute("SHOW GLOBAL STATUS LIKE 'wsrep%'")
        return {str(name): str(value) for name, value in cursor.fetchall()}


def node_status(node: Node, config: Settings) -> dict[str, str] | None:
    """The node's wsrep status variables, or None if it does not answer."""
    try:
        with node_connection(node, config) as connection:
            return wsrep_status(connection)
    except pymysql.err.Error:
        return None


def wait_synced(node: Node, process: subprocess.Popen[bytes], config: Settings) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    last = "not answering yet"
    while time.monotonic() < deadline:
        status = node_status(node, config)
        if status is not None:
            last = status.get("wsrep_local_state_comment", "?")
            if status.get("wsrep_local_state") == str(SYNCED):
                log(f"{node.name}: Synced, cluster size {status.get('wsrep_cluster_size')}")
                return
        if process.poll() is not None:
            fail_with_log(node, f"exited with {process.returncode}")
        time.sleep(0.3)
    fail_with_log(node, f"was not Synced within {START_TIMEOUT_S} s (last state: {last})")


def fail_with_log(node: Node, what: str) -> None:
    lines = node.error_log.read_text(errors="replace").splitlines()[-40:]
    raise SystemExit(f"{node.name} {what}. Last lines of {node.error_log}:\n" + "\n".join(lines))


def secure(node: Node, config: Settings) -> None:
    """Root's password as in .env, the SST account (mariabackup on a donor) and the health-check
    account (no privileges: status variables need none). Replicated, so once is enough; run on
    every `up` so the accounts always match secrets.json. The SST password is set on each node
    after it starts rather than on its command line, where anyone could read it in `ps`."""
    password = config.db_password.get_secret_value()
    passwords = cluster_secrets()
    with node_connection(node, config) as connection, connection.cursor() as cursor:
        for host in ("localhost", HOST):
            cursor.execute(
                f"CREATE USER IF NOT EXISTS 'root'@'{host}' IDENTIFIED BY %s", (password,)
            )
            cursor.execute(f"ALTER USER 'root'@'{host}' IDENTIFIED BY %s", (password,))
            cursor.execute(f"GRANT ALL PRIVILEGES ON *.* TO 'root'@'{host}' WITH GRANT OPTION")
        cursor.execute(
            f"CREATE USER IF NOT EXISTS '{SST_USER}'@'localhost' IDENTIFIED BY %s",
            (passwords["sst"],),
        )
        cursor.execute(f"ALTER USER '{SST_USER}'@'localhost' IDENTIFIED BY %s", (passwords["sst"],))
        cursor.execute(
            f"GRANT RELOAD, PROCESS, LOCK TABLES, BINLOG MONITOR ON *.* TO '{SST_USER}'@'localhost'"
        )
        cursor.execute(
            f"CREATE USER IF NOT EXISTS '{CHECK_USER}'@'{HOST}' IDENTIFIED BY %s",
            (passwords["check"],),
        )
        cursor.execute(
            f"ALTER USER '{CHECK_USER}'@'{HOST}' IDENTIFIED BY %s", (passwords["check"],)
        )


def set_sst_auth(node: Node, config: Settings) -> None:
    with node_connection(node, config) as connection, connection.cursor() as cursor:
        cursor.execute(
            "SET GLOBAL wsrep_sst_auth = %s", (f"{SST_USER}:{cluster_secrets()['sst']}",)
        )


def stop_pid(pid: int, what: str, timeout: float = STOP_TIMEOUT_S) -> None:
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            log(f"{what} stopped")
            return
        time.sleep(0.2)
    raise SystemExit(f"{what} (pid {pid}) did not stop within {timeout:g} s")


# --- the whole cluster -----------------------------------------------------------------------


def bootstrap_candidate(binary: str, provider: Path) -> Node:
    """The node to start a stopped cluster from: the one that may do so safely."""
    known = [node for node in NODES if grastate(node).get("uuid")]
    if not known:
        return NODES[0]
    safe = [node for node in known if grastate(node).get("safe_to_bootstrap") == "1"]
    if safe:
        log(f"{safe[0].name} was stopped last (safe_to_bootstrap: 1)")
        return safe[0]
    log("no node was stopped cleanly last: recovering each node's last commit")
    positions = {node: recovered_position(node, binary, provider) for node in known}
    seqnos = {node: position[1] if position else -1 for node, position in positions.items()}
    for node, seqno in seqnos.items():
        log(f"{node.name}: last commit seqno {seqno}")
    chosen = max(known, key=lambda node: (seqnos[node], -node.index))
    mark_safe_to_bootstrap(chosen)
    log(f"{chosen.name} holds the most recent commit: it bootstraps")
    return chosen


def bring_up_nodes(config: Settings) -> None:
    binary = mariadb_server()
    provider = galera_provider()
    assert binary is not None, "ensure_packages ran"
    assert provider is not None, "ensure_packages ran"
    running = [node for node in NODES if node_pid(node) is not None]
    if not running:
        first = bootstrap_candidate(binary, provider)
        if first == NODES[0] and not (first.datadir / "mysql").is_dir():
            initialise(first)
        process = start_node(first, binary, provider, bootstrap=True)
        wait_synced(first, process, config)
        secure(first, config)
        set_sst_auth(first, config)
        running.append(first)
    for node in running:
        set_sst_auth(node, config)
    for node in NODES:
        if node in running:
            log(f"{node.name}: running (pid {node_pid(node)})")
            continue
        process = start_node(node, binary, provider, bootstrap=False)
        wait_synced(node, process, config)
        set_sst_auth(node, config)
    secure(NODES[0], config)


def install_schema(database: str) -> None:
    """The app's schema in `database`, through node 1 (replicated to the others)."""
    ensure_schema(Settings(db_url=f"{HOST}:{NODES[0].port}/{database}"))


# --- health check and HAProxy ----------------------------------------------------------------


def pid_from(pid_file: Path, marker: str) -> int | None:
    try:
        pid = int(pid_file.read_text().strip())
        command_line = Path(f"/proc/{pid}/cmdline").read_bytes()
    except (OSError, ValueError):
        return None
    return pid if marker.encode() in command_line else None


def start_detached(command: list[str], pid_file: Path, log_path: Path) -> None:
    with log_path.open("a") as output:
        process = subprocess.Popen(
            command,
            cwd=PROJECT_ROOT,
            stdin=subprocess.DEVNULL,
            stdout=output,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    pid_file.write_text(str(process.pid))


def refuse_taken_port(port: int, what: str) -> None:
    """Never start a second copy beside one this script lost track of: HAProxy binds with
    SO_REUSEPORT, so two of them would share 3310, each with its own idea of the writer."""
    if port_answers(HOST, port):
        raise SystemExit(
            f"{HOST}:{port} already answers, but not the {what} started from {CLUSTER}: "
            "stop whatever listens there, then run `make cluster-up` again"
        )


def ensure_check() -> None:
    if pid_from(CHECK_PID, "scripts.cluster_check") is not None:
        return
    for node in NODES:
        refuse_taken_port(node.check_port, "health check")
    command = [sys.executable, "-m", "scripts.cluster_check", str(SECRETS)]
    command += [f"{node.check_port}:{node.port}" for node in NODES]
    start_detached(command, CHECK_PID, CHECK_LOG)
    deadline = time.monotonic() + 10
    while not all(port_answers(HOST, node.check_port) for node in NODES):
        if time.monotonic() > deadline:
            raise SystemExit(f"the health check did not start; see {CHECK_LOG}")
        time.sleep(0.1)
    log(f"health check serving on {HOST}:{NODES[0].check_port}-{NODES[-1].check_port}")


DEFAULT_SERVER = " ".join(
    [
        "check inter 500ms fastinter 200ms downinter 500ms fall 2 rise 3",
        "observe layer4 error-limit 1 on-error mark-down",
        "on-marked-down shutdown-sessions",
    ]
)


def haproxy_config() -> str:
    servers = "\n".join(
        f"    server {node.name} {HOST}:{node.port} port {node.check_port}"
        + ("" if node.index == 1 else " backup")
        for node in NODES
    )
    return f"""# Made by scripts/cluster.py; changes here are overwritten by `make cluster-up`.
global
    maxconn 4000
    stats socket {HAPROXY_SOCKET} mode 600 level admin
    log stderr format iso local0 info

defaults
    mode tcp
    timeout connect 500ms
    timeout client 8h
    timeout server 8h
    timeout check 1s
    retries 2
    option redispatch

frontend mysql
    bind {HOST}:{PROXY_PORT}
    default_backend {BACKEND}

backend {BACKEND}
    log global  # server state changes (not every connection, as the frontend would)
    # Up only while the node is Synced (scripts/cluster_check.py), checked every 0.5 s: two
    # failures (0.2 s apart) take a node out, three passes put it back. A connection the node
    # refuses takes it out at once (observe layer4), without waiting for the next check.
    option httpchk GET /
    http-check expect status 200
    default-server {DEFAULT_SERVER}
    # One writer: n1 while it is up, else the first backup that is. The one-entry stick table
    # keeps every new connection on the node chosen last, so a node that comes back does not
    # become a second writer beside the connections still open on its replacement.
    stick-table type ip size 1
    stick on dst
{servers}
"""


def ensure_haproxy() -> None:
    binary = haproxy_binary()
    assert binary is not None  # ensure_packages ran
    config = haproxy_config()
    running = pid_from(HAPROXY_PID, str(HAPROXY_CFG))
    if running is not None and HAPROXY_CFG.exists() and HAPROXY_CFG.read_text() == config:
        log(f"HAProxy running on {HOST}:{PROXY_PORT} (pid {running})")
        return
    if running is not None:
        stop_pid(running, "HAProxy (configuration changed)")
    refuse_taken_port(PROXY_PORT, "HAProxy")
    HAPROXY_CFG.write_text(config)
    subprocess.run([binary, "-c", "-q", "-f", str(HAPROXY_CFG)], check=True)
    start_detached([binary, "-db", "-f", str(HAPROXY_CFG)], HAPROXY_PID, HAPROXY_LOG)
    deadline = time.monotonic() + 10
    while not port_answers(HOST, PROXY_PORT):
        if time.monotonic() > deadline:
            raise SystemExit(f"HAProxy did not start; see {HAPROXY_LOG}")
        time.sleep(0.1)
    log(f"HAProxy started on {HOST}:{PROXY_PORT} (log: {HAPROXY_LOG.relative_to(PROJECT_ROOT)})")


def haproxy_command(command: str) -> str:
    """One command on HAProxy's admin socket, its reply."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as admin:
        admin.settimeout(2)
        admin.connect(str(HAPROXY_SOCKET))
        admin.sendall(command.encode() + b"\n")
        chunks = []
        while chunk := admin.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks).decode()


def haproxy_servers() -> dict[str, str]:
    """Each node's state in HAProxy (UP, DOWN, `UP 1/3` while rising...), {} if it is down."""
    try:
        csv = haproxy_command("show stat")
    except OSError:
        return {}
    header, *rows = csv.lstrip("# ").splitlines()
    columns = header.split(",")
    states = {}
    for row in rows:
        fields = dict(zip(columns, row.split(","), strict=False))
        if fields.get("pxname") == BACKEND and fields.get("svname", "").startswith("n"):
            states[fields["svname"]] = fields.get("status", "?")
    return states


def haproxy_writer() -> str | None:
    """The node HAProxy's stick table sends new connections to (None before the first one)."""
    try:
        table = haproxy_command(f"show table {BACKEND}")
    except OSError:
        return None
    found = re.search(r"server_key=(\w+)", table) or re.search(r"server_name=(\w+)", table)
    return found.group(1) if found else None


def wait_for_proxy(config: Settings) -> str:
    """A login through HAProxy works; the name of the node it reached."""
    proxied = Settings(db_url=f"{HOST}:{PROXY_PORT}/{config.db_name}")
    deadline = time.monotonic() + 15
    while True:
        try:
            with (
                pymysql.connect(
                    host=HOST,
                    port=PROXY_PORT,
                    user=proxied.db_user,
                    password=proxied.db_password.get_secret_value(),
                    connect_timeout=2,
                    read_timeout=2,
                ) as connection,
                connection.cursor() as cursor,
            ):
                cursor.execute("SELECT @@wsrep_node_name")
                row = cursor.fetchone()
                return str(row[0]) if row else "?"
        except pymysql.err.Error:
            if time.monotonic() > deadline:
                raise SystemExit(f"nothing answers through HAProxy; see {HAPROXY_LOG}") from None
            time.sleep(0.3)


def failback() -> None:
    """Make n1 the writer again, if it is up in HAProxy: forget the stuck node and shut the
    sessions still open on it, so the pool reconnects (to n1). A planned switchover: requests
    running on those sessions fail with 503 once."""
    states = haproxy_servers()
    if not states.get(NODES[0].name, "").startswith("UP"):
        raise SystemExit(f"{NODES[0].name} is not up in HAProxy ({states}): nothing to do")
    writer = haproxy_writer()
    if writer in (None, NODES[0].name):
        log(f"the writer is already {NODES[0].name}")
        return
    haproxy_command(f"clear table {BACKEND}")
    haproxy_command(f"shutdown sessions server {BACKEND}/{writer}")
    log(f"writer moved from {writer} to {NODES[0].name}")


# --- the commands ----------------------------------------------------------------------------


@contextmanager
def exclusive() -> Iterator[None]:
    """One `up`, `down` or `failback` at a time: two at once would both start what is down."""
    CLUSTER.mkdir(parents=True, exist_ok=True)
    with (CLUSTER / "cluster.lock").open("w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log("waiting for another scripts.cluster command to finish")
            fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def up(config: Settings) -> None:
    ensure_packages()
    bring_up_nodes(config)
    install_schema(config.db_name)
    ensure_check()
    ensure_haproxy()
    reached = wait_for_proxy(config)
    log(f"ready: HAProxy on {HOST}:{PROXY_PORT} reaches {reached}")
    print(f"DB_URL={HOST}:{PROXY_PORT}/{config.db_name}")


def down() -> None:
    for pid_file, marker, what in (
        (HAPROXY_PID, str(HAPROXY_CFG), "HAProxy"),
        (CHECK_PID, "scripts.cluster_check", "the health check"),
    ):
        pid = pid_from(pid_file, marker)
        if pid is None:
            log(f"{what} is not running")
        else:
            stop_pid(pid, what)
        pid_file.unlink(missing_ok=True)
    # The last node stopped is the one safe to bootstrap from: stop n1 last, so a full restart
    # starts from n1 again.
    for node in reversed(NODES):
        pid = node_pid(node)
        if pid is None:
            log(f"{node.name} is not running")
        else:
            stop_pid(pid, node.name)


def status(config: Settings) -> None:
    proxy = haproxy_servers()
    writer = haproxy_writer()
    print(f"{'node':<5}{'port':<6}{'process':<14}{'state':<18}{'cluster':<16}{'HAProxy':<12}")
    for node in NODES:
        pid = node_pid(node)
        wsrep = node_status(node, config) if pid else None
        state = wsrep.get("wsrep_local_state_comment", "?") if wsrep else "-"
        cluster = (
            f"{wsrep.get('wsrep_cluster_status', '?')}, size {wsrep.get('wsrep_cluster_size')}"
            if wsrep
            else "-"
        )
        role = proxy.get(node.name, "-") + (" (writer)" if writer == node.name else "")
        process = f"pid {pid}" if pid else "down"
        print(f"{node.name:<5}{node.port:<6}{process:<14}{state:<18}{cluster:<16}{role}")
    check = pid_from(CHECK_PID, "scripts.cluster_check")
    haproxy = pid_from(HAPROXY_PID, str(HAPROXY_CFG))
    print(f"health check: {f'pid {check}' if check else 'down'}")
    print(f"HAProxy on {HOST}:{PROXY_PORT}: {f'pid {haproxy}' if haproxy else 'down'}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("action", choices=["up", "down", "status", "failback"])
    action = parser.parse_args().action
    config = Settings()
    if action == "status":
        status(config)
        return
    with exclusive():
        if action == "up":
            up(config)
        elif action == "down":
            down()
        else:
            failback()


if __name__ == "__main__":
    main()

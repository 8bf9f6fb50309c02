"""The local stack for `make`: the private database server and FakePay.

    python -m scripts.stack db-up | db-down | db-reset | fakepay-up | fakepay-down
    python -m scripts.stack with-app COMMAND... | serve-guard HOST

`db-up` reuses a server that already answers at DB_URL with the configured credentials (a
docker-compose MySQL, say). Otherwise it runs a private MariaDB or MySQL 8 out of `.data/`,
bound to DB_URL's loopback port, reading no system configuration, so it never touches the
machine's own database server. Then it creates the database and applies `sql/up.sql` when the
tables are missing.

`fakepay-up` starts `fake_pay.py` in the background when nothing answers on FAKEPAY_URL's port.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import urlsplit

import pymysql

from scripts.processes import port_answers, running_app
from scripts.schema import admin_connection, apply_script, create_database, existing_tables
from settings import PROJECT_ROOT, Settings

DATA = PROJECT_ROOT / ".data"
DATADIR = DATA / "mysql"
SOCKET = DATA / "mysql.sock"
PID_FILE = DATA / "mysql.pid"
ERROR_LOG = DATA / "mysql.err"
FAKEPAY_PID_FILE = DATA / "fakepay.pid"
FAKEPAY_LOG = DATA / "fakepay.log"
READY_TIMEOUT_S = 30
TABLES = {
    "customer",
    "invoice",
    "payment",
    "invoice_status_count",
    "idempotency_key",
    "api_key",
}

INSTALL_HINT = """No MySQL-compatible server is installed and none answers at {address}.
Install one, then run `make db-up` again:
  Debian/Ubuntu:  sudo apt-get install -y mariadb-server
  macOS:          brew install mariadb     (or: brew install mysql)
Or run MySQL 8 in Docker instead: `docker compose up -d` (see docker-compose.yml)."""


def log(message: str) -> None:
    print(f"[stack] {message}", flush=True)


def answers(config: Settings) -> bool:
    """True when a server accepts the configured credentials on DB_URL's host and port."""
    try:
        admin_connection(config).close()
    except pymysql.err.OperationalError:
        return False
    return True


def server_binary() -> tuple[str, str] | None:
    """(flavour, path) of an installed server, MariaDB first."""
    for flavour, name in (("mariadb", "mariadbd"), ("mysql", "mysqld")):
        for path in (shutil.which(name), f"/usr/sbin/{name}", f"/usr/local/sbin/{name}"):
            if path and os.access(path, os.X_OK):
                real = os.path.realpath(path)
                return ("mariadb" if "mariadb" in real else flavour), path
    return None


def install_server() -> None:
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        raise SystemExit(INSTALL_HINT.format(address="127.0.0.1"))
    log("installing mariadb-server with apt-get (one time)")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    subprocess.run(["apt-get", "update", "-q"], check=True, env=env)
    subprocess.run(
        ["apt-get", "install", "-y", "-q", "--no-install-recommends", "mariadb-server"],
        check=True,
        env=env,
    )


def user_args() -> list[str]:
    # mysqld refuses to run as root unless told which user to run as.
    return ["--user=root"] if os.geteuid() == 0 else []


def initialise(flavour: str, binary: str) -> None:
    log(f"initialising a new data directory in {DATADIR}")
    DATADIR.mkdir(parents=True, exist_ok=True)
    if flavour == "mariadb":
        install_db = shutil.which("mariadb-install-db") or shutil.which("mysql_install_db")
        if not install_db:
            raise SystemExit("mariadb-install-db is missing: reinstall the mariadb-server package")
        command = [
            install_db,
            "--no-defaults",
            f"--datadir={DATADIR}",
            "--auth-root-authentication-method=normal",
            "--skip-test-db",
            *user_args(),
        ]
    else:
        command = [binary, "--no-defaults", "--initialize-insecure", f"--datadir={DATADIR}"]
        command += user_args()
    with ERROR_LOG.open("a") as error_log:
        subprocess.run(command, check=True, stdout=error_log, stderr=subprocess.STDOUT)


def start(binary: str, config: Settings) -> None:
    command = [
        binary,
        "--no-defaults",
        f"--datadir={DATADIR}",
        f"--port={config.db_port}",
        "--bind-address=127.0.0.1",
        f"--socket={SOCKET}",
        f"--pid-file={PID_FILE}",
        f"--log-error={ERROR_LOG}",
        "--skip-name-resolve",
        "--character-set-server=utf8mb4",
        "--innodb-buffer-pool-size=1G",
        "--innodb-log-file-size=512M",
        "--max-connections=400",
        *user_args(),
    ]
    log(f"starting {Path(binary).name} on 127.0.0.1:{config.db_port}")
    subprocess.Popen(
        command,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )


def wait_for_socket() -> None:
    deadline = time.monotonic() + READY_TIMEOUT_S
    while time.monotonic() < deadline:
        try:
            pymysql.connect(unix_socket=str(SOCKET), user="root", password="").close()
            return
        except pymysql.err.OperationalError as exc:
            if exc.args[0] == 1045:  # access denied: it is up, with a password already set
                return
        time.sleep(0.2)
    tail = ERROR_LOG.read_text(errors="replace").splitlines()[-30:] if ERROR_LOG.exists() else []
    raise SystemExit(
        f"The server did not become ready within {READY_TIMEOUT_S} s. "
        f"Last lines of {ERROR_LOG}:\n" + "\n".join(tail)
    )


def set_root_password(config: Settings) -> None:
    """Give root the configured password over TCP from 127.0.0.1 and locally (first start only)."""
    try:
        connection = pymysql.connect(unix_socket=str(SOCKET), user="root", password="")
    except pymysql.err.OperationalError:
        return  # already secured on an earlier run
    password = config.db_password.get_secret_value()
    with connection, connection.cursor() as cursor:
        for host in ("localhost", "127.0.0.1"):
            cursor.execute(
                f"CREATE USER IF NOT EXISTS 'root'@'{host}' IDENTIFIED BY %s", (password,)
            )
            cursor.execute(f"ALTER USER 'root'@'{host}' IDENTIFIED BY %s", (password,))
            cursor.execute(f"GRANT ALL PRIVILEGES ON *.* TO 'root'@'{host}' WITH GRANT OPTION")
        cursor.execute("FLUSH PRIVILEGES")


def ensure_server(config: Settings) -> None:
    if answers(config):
        log(f"a server already answers on {config.db_host}:{config.db_port}")
        return
    if config.db_host not in {"127.0.0.1", "localhost"}:
        raise SystemExit(f"No server answers at {config.db_host}:{config.db_port} (DB_URL).")
    found = server_binary()
    if found is None:
        install_server()
        found = server_binary()
        if found is None:
            raise SystemExit(INSTALL_HINT.format(address=f"127.0.0.1:{config.db_port}"))
    flavour, binary = found
    DATA.mkdir(exist_ok=True)
    if not (DATADIR / "mysql").is_dir():
        initialise(flavour, binary)
    start(binary, config)
    wait_for_socket()
    set_root_password(config)
    if not answers(config):
        raise SystemExit(
            f"The private server runs but refuses {config.db_user} at 127.0.0.1:{config.db_port}."
            f" Check DB_USER/DB_PASSWORD, or remove {DATADIR} to start afresh."
        )
    log("ready")


def ensure_schema(config: Settings) -> None:
    create_database(config)
    present = existing_tables(config) & TABLES
    if not present:
        apply_script(config, "up.sql")
        log(f"created the tables and seed data in `{config.db_name}`")
    elif present != TABLES:
        raise SystemExit(
            f"`{config.db_name}` has only some of the tables ({', '.join(sorted(present))}): "
            "run `make db-reset` to recreate them."
        )
    else:
        log(f"schema `{config.db_name}` is in place")


def reset_schema(config: Settings) -> None:
    create_database(config)
    apply_script(config, "down.sql")
    apply_script(config, "up.sql")
    log(f"`{config.db_name}` recreated from sql/down.sql and sql/up.sql")


def stop_process(pid_file: Path, what: str) -> None:
    if not pid_file.exists():
        log(f"{what} is not running")
        return
    pid = int(pid_file.read_text().strip())
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        pid_file.unlink(missing_ok=True)
        log(f"{what} was not running")
        return
    deadline = time.monotonic() + READY_TIMEOUT_S
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            break
        time.sleep(0.2)
    else:
        raise SystemExit(f"{what} (pid {pid}) did not stop within {READY_TIMEOUT_S} s")
    pid_file.unlink(missing_ok=True)
    log(f"{what} stopped")


def fakepay_up(config: Settings) -> None:
    address = urlsplit(config.fakepay_url)
    host, port = address.hostname or "127.0.0.1", address.port or 80
    if port_answers(host, port):
        log(f"FakePay (or something else) already answers on {host}:{port}")
        return
    DATA.mkdir(exist_ok=True)
    with FAKEPAY_LOG.open("a") as fakepay_log:
        process = subprocess.Popen(
            [sys.executable, str(PROJECT_ROOT / "fake_pay.py"), str(port)],
            stdin=subprocess.DEVNULL,
            stdout=fakepay_log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    FAKEPAY_PID_FILE.write_text(str(process.pid))
    deadline = time.monotonic() + 10
    while not port_answers(host, port):
        if process.poll() is not None or time.monotonic() > deadline:
            raise SystemExit(f"FakePay did not start; see {FAKEPAY_LOG}")
        time.sleep(0.1)
    log(f"FakePay started on {host}:{port} (log: {FAKEPAY_LOG.relative_to(PROJECT_ROOT)})")


def with_app(command: list[str]) -> int:
    """Serve the app on a free port, run `command` with APP_URL set, stop the app."""
    DATA.mkdir(exist_ok=True)
    log_path = DATA / "app-with.log"
    try:
        with running_app(log_path) as app:
            log(f"app serving on {app.url} for: {' '.join(command)}")
            env = {**os.environ, "APP_URL": app.url}
            return subprocess.run(command, env=env, check=False).returncode
    except RuntimeError as exc:
        raise SystemExit(f"the app did not start ({exc}); see {log_path}") from None


LOOPBACK = {"127.0.0.1", "localhost", "::1"}


def serve_guard(config: Settings, host: str) -> None:
    """`make serve` beyond loopback must not expose card payments to anyone who can connect."""
    if host in LOOPBACK or config.auth == "on" or config.allow_open:
        return
    print(
        f"Refusing to serve on {host} with AUTH=off: anyone who can reach it could create "
        "invoices and charge cards. Set AUTH=on and make keys with `make api-key`, or set "
        "ALLOW_OPEN=true if something in front of the service already checks every caller.",
        file=sys.stderr,
    )
    raise SystemExit(2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument(
        "action",
        choices=[
            "db-up",
            "db-down",
            "db-reset",
            "fakepay-up",
            "fakepay-down",
            "with-app",
            "serve-guard",
        ],
    )
    parser.add_argument(
        "command", nargs=argparse.REMAINDER, help="with-app: what to run; serve-guard: the host"
    )
    arguments = parser.parse_args()
    action = arguments.action
    config = Settings()
    if action == "db-up":
        ensure_server(config)
        ensure_schema(config)
    elif action == "db-reset":
        ensure_server(config)
        reset_schema(config)
    elif action == "db-down":
        stop_process(PID_FILE, "the private database server")
    elif action == "fakepay-up":
        fakepay_up(config)
    elif action == "with-app":
        sys.exit(with_app(arguments.command))
    elif action == "serve-guard":
        serve_guard(config, arguments.command[0] if arguments.command else "127.0.0.1")
    else:
        stop_process(FAKEPAY_PID_FILE, "FakePay")


if __name__ == "__main__":
    main()

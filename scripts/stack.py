"""The local stack for `make`: the private database server and FakePay.

    python -m scripts.stack db-up | db-down | db-reset | fakepay-up | fakepay-down
    python -m scripts.stack with-app COMMAND... | serve-guard HOST

`db-up` reuses a server that already answers at DB_URL with the configured credentials (a
docker-compose MySQL, say), and waits for one that holds the port but is still starting.
Otherwise it runs a private MariaDB or MySQL 8 out of `.data/`, bound to DB_URL's loopback
port, reading no system configuration, so it never touches the machine's own database server.
Then it brings the database to the head migration in place (`scripts.schema.upgrade_to_head`).

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
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import pymysql

from scripts.processes import port_answers, running_app
from scripts.schema import (
    SchemaError,
    admin_connection,
    apply_script,
    create_database,
    upgrade_to_head,
)
from settings import PROJECT_ROOT, Settings

DATA = PROJECT_ROOT / ".data"
FAKEPAY_PID_FILE = DATA / "fakepay.pid"
FAKEPAY_LOG = DATA / "fakepay.log"
READY_TIMEOUT_S = 30
# A server that holds the port but does not answer yet (a container's first start, which
# initialises its data directory) gets this long before `db-up` gives up on it.
STARTING_SERVER_TIMEOUT_S = 120

INSTALL_HINT = """No MySQL-compatible server is installed and none answers at {address}.
Install one, then run `make db-up` again:
  Debian/Ubuntu:  sudo apt-get install -y mariadb-server
  macOS:          brew install mariadb     (or: brew install mysql)
Or run MySQL 8 in Docker instead: `docker compose up -d` (see docker-compose.yml)."""


@dataclass(frozen=True)
class ServerFiles:
    """Where a private server keeps its data, socket, pid and log: `.data/mysql*` for the
    default port 3307, `.data/mysql-PORT*` for any other, so two can run side by side."""

    datadir: Path
    socket: Path
    pid_file: Path
    error_log: Path

    @classmethod
    def of(cls, config: Settings) -> ServerFiles:
        name = "mysql" if config.db_port == 3307 else f"mysql-{config.db_port}"
        return cls(DATA / name, DATA / f"{name}.sock", DATA / f"{name}.pid", DATA / f"{name}.err")


def log(message: str) -> None:
    print(f"[stack] {message}", flush=True)


def answers(config: Settings) -> bool:
    """True when a server accepts the configured credentials on DB_URL's host and port."""
    try:
        admin_connection(config).close()
    except pymysql.err.OperationalError:
        return False
    return True


def wait_for_starting_server(config: Settings) -> bool:
    """Something holds DB_URL's port but refuses the handshake: wait for it to answer rather
    than start a second server on the same port. Whether it did."""
    if not port_answers(config.db_host, config.db_port):
        return False
    log(f"{config.db_host}:{config.db_port} is taken by a server that is not ready yet; waiting")
    deadline = time.monotonic() + STARTING_SERVER_TIMEOUT_S
    while time.monotonic() < deadline:
        if answers(config):
            return True
        time.sleep(1)
    raise SystemExit(
        f"Something holds {config.db_host}:{config.db_port} but has not accepted "
        f"{config.db_user}'s login for {STARTING_SERVER_TIMEOUT_S} s. If it is a MySQL "
        "container, see `docker compose logs mysql`; check DB_USER and DB_PASSWORD; or free "
        "the port and run `make db-up` again to start the private server."
    )


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


def initialise(flavour: str, binary: str, files: ServerFiles) -> None:
    log(f"initialising a new data directory in {files.datadir}")
    files.datadir.mkdir(parents=True, exist_ok=True)
    if flavour == "mariadb":
        install_db = shutil.which("mariadb-install-db") or shutil.which("mysql_install_db")
        if not install_db:
            raise SystemExit("mariadb-install-db is missing: reinstall the mariadb-server package")
        command = [
            install_db,
            "--no-defaults",
            f"--datadir={files.datadir}",
            "--auth-root-authentication-method=normal",
            "--skip-test-db",
            *user_args(),
        ]
    else:
        command = [binary, "--no-defaults", "--initialize-insecure", f"--datadir={files.datadir}"]
        command += user_args()
    with files.error_log.open("a") as error_log:
        subprocess.run(command, check=True, stdout=error_log, stderr=subprocess.STDOUT)


def server_options(flavour: str, config: Settings) -> list[str]:
    """The private server's options, the same ones docker-compose.yml gives MySQL 8.

    Binary logging is off unless DB_BINLOG=on (MySQL 8 turns it on by default; MariaDB
    leaves it off); with it on, the schema still installs without SUPER. MySQL 8 also gets
    its X Plugin switched off (it would listen on 33060 on every interface) and its redo log
    sized with the option that replaced innodb_log_file_size in 8.0.30.
    """
    options = [
        f"--port={config.db_port}",
        "--bind-address=127.0.0.1",
        "--skip-name-resolve",
        "--character-set-server=utf8mb4",
        "--collation-server=utf8mb4_bin",
        "--innodb-buffer-pool-size=1G",
        "--max-connections=400",
    ]
    if os.environ.get("DB_BINLOG") == "on":
        options += ["--log-bin=binlog", "--server-id=1", "--binlog-format=ROW"]
    elif flavour == "mysql":
        options.append("--disable-log-bin")
    if flavour == "mysql":
        options += ["--mysqlx=OFF", "--innodb-redo-log-capacity=1G"]
    else:
        options.append("--innodb-log-file-size=512M")
    return options


def start(flavour: str, binary: str, config: Settings, files: ServerFiles) -> None:
    command = [
        binary,
        "--no-defaults",
        f"--datadir={files.datadir}",
        f"--socket={files.socket}",
        f"--pid-file={files.pid_file}",
        f"--log-error={files.error_log}",
        *server_options(flavour, config),
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


def wait_for_socket(files: ServerFiles) -> None:
    deadline = time.monotonic() + READY_TIMEOUT_S
    while time.monotonic() < deadline:
        try:
            pymysql.connect(unix_socket=str(files.socket), user="root", password="").close()
            return
        except pymysql.err.OperationalError as exc:
            if exc.args[0] == 1045:  # access denied: it is up, with a password already set
                return
        time.sleep(0.2)
    error_log = files.error_log
    tail = error_log.read_text(errors="replace").splitlines()[-30:] if error_log.exists() else []
    raise SystemExit(
        f"The server did not become ready within {READY_TIMEOUT_S} s. "
        f"Last lines of {error_log}:\n" + "\n".join(tail)
    )


def set_root_password(config: Settings, files: ServerFiles) -> None:
    """Give root the configured password over TCP from 127.0.0.1 and locally (first start only)."""
    try:
        connection = pymysql.connect(unix_socket=str(files.socket), user="root", password="")
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
    if answers(config) or wait_for_starting_server(config):
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
    files = ServerFiles.of(config)
    DATA.mkdir(exist_ok=True)
    if not (files.datadir / "mysql").is_dir():
        initialise(flavour, binary, files)
    start(flavour, binary, config, files)
    wait_for_socket(files)
    set_root_password(config, files)
    if not answers(config):
        raise SystemExit(
            f"The private server runs but refuses {config.db_user} at 127.0.0.1:{config.db_port}."
            f" Check DB_USER/DB_PASSWORD, or remove {files.datadir} to start afresh."
        )
    log("ready")


def ensure_schema(config: Settings) -> None:
    """The database at the head migration, upgraded in place; stops with what is wrong and
    how to fix it when that cannot be done safely."""
    try:
        log(upgrade_to_head(config))
    except SchemaError as error:
        raise SystemExit(str(error)) from None


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


# The MySQL-8-like run (`make test-mysql8`): a schema owner without SUPER, and an app user
# that may only read and write rows.
SCHEMA_OWNER = ("invoice_owner", "owner-password")
APP_USER = ("invoice_app", "app-password")
APP_PRIVILEGES = "SELECT, INSERT, UPDATE, DELETE"


def least_privilege(config: Settings) -> None:
    """Create the schema owner and the app user for DB_URL's database and every database
    named after it (the tests' own, their scratch ones), and print their settings as NAME=value
    lines. Refuses a server with binary logging off: the point is MySQL 8's default."""
    databases = config.db_name.replace("_", "\\_") + "%"
    with admin_connection(config) as connection, connection.cursor() as cursor:
        cursor.execute("SELECT @@log_bin")
        (log_bin,) = cursor.fetchone() or (0,)
        if not log_bin:
            raise SystemExit("binary logging is off on this server: start it with DB_BINLOG=on")
        for (user, password), privileges in ((SCHEMA_OWNER, "ALL"), (APP_USER, APP_PRIVILEGES)):
            for host in ("localhost", "127.0.0.1"):
                cursor.execute(
                    f"CREATE USER IF NOT EXISTS '{user}'@'{host}' IDENTIFIED BY %s", (password,)
                )
                cursor.execute(f"GRANT {privileges} ON `{databases}`.* TO '{user}'@'{host}'")
        for host in ("localhost", "127.0.0.1"):  # the tests watch lock waits (INNODB_TRX)
            cursor.execute(f"GRANT PROCESS ON *.* TO '{SCHEMA_OWNER[0]}'@'{host}'")
    owner, app = SCHEMA_OWNER, APP_USER
    print(f"DB_USER={app[0]}\nDB_PASSWORD={app[1]}")
    print(f"DB_SCHEMA_USER={owner[0]}\nDB_SCHEMA_PASSWORD={owner[1]}")


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
            "least-privilege",
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
        stop_process(ServerFiles.of(config).pid_file, "the private database server")
    elif action == "fakepay-up":
        fakepay_up(config)
    elif action == "with-app":
        sys.exit(with_app(arguments.command))
    elif action == "least-privilege":
        least_privilege(config)
    elif action == "serve-guard":
        serve_guard(config, arguments.command[0] if arguments.command else "127.0.0.1")
    else:
        stop_process(FAKEPAY_PID_FILE, "FakePay")


if __name__ == "__main__":
    main()

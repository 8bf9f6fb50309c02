"""The cluster tests' stack: the three Galera nodes and HAProxy (`scripts.cluster up`), a
database of their own on it, the real fake_pay.py, and the app as a uvicorn process whose
DB_URL is HAProxy's address. `make test` never collects this folder (pytest's testpaths is
`tests`); `make test-cluster` runs it."""

import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pymysql
import pytest

from scripts import cluster
from scripts.processes import PROJECT_ROOT, Running, running_app, running_fakepay
from scripts.schema import create_database
from settings import Settings

DATABASE = "invoice_management_cluster_test"
REPORTS = PROJECT_ROOT / "artifacts" / "cluster"
MEASURED: list[str] = []  # lines for the end of the run: what the tests measured


def run_cluster(action: str) -> None:
    """`python -m scripts.cluster ACTION`, as make runs it."""
    subprocess.run([sys.executable, "-m", "scripts.cluster", action], check=True, cwd=PROJECT_ROOT)


def wait_until_up_in_haproxy(names: list[str], timeout: float = 15) -> None:
    deadline = time.monotonic() + timeout
    while True:
        states = cluster.haproxy_servers()
        if all(states.get(name) == "UP" for name in names):
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"not all of {names} UP in HAProxy: {states}")
        time.sleep(0.1)


@pytest.fixture(scope="session")
def cluster_up() -> None:
    """All three nodes Synced and UP in HAProxy, node 1 the writer."""
    run_cluster("up")
    wait_until_up_in_haproxy([node.name for node in cluster.NODES])
    run_cluster("failback")


@pytest.fixture(scope="session")
def database(cluster_up: None) -> str:
    """A fresh database of the tests' own on the cluster, its schema applied as `up` does."""
    create_database(
        Settings(db_url=f"{cluster.HOST}:{cluster.NODES[0].port}/{DATABASE}"), recreate=True
    )
    cluster.install_schema(DATABASE)
    return DATABASE


@pytest.fixture
def fakepay(tmp_path: Path) -> Iterator[Running]:
    with running_fakepay(tmp_path / "fakepay.log") as server:
        yield server


@pytest.fixture
def app(database: str, fakepay: Running, tmp_path: Path) -> Iterator[Running]:
    """The app through HAProxy, as `DB_URL=127.0.0.1:3310/... make serve` runs it."""
    env = {
        "DB_URL": f"{cluster.HOST}:{cluster.PROXY_PORT}/{database}",
        "FAKEPAY_URL": f"{fakepay.url}/fakepay",
        "AUTH": "off",
    }
    with running_app(tmp_path / "app.log", env=env) as server:
        yield server


def node_rows(database: str, port: int, query: str, *args: Any) -> list[tuple[Any, ...]]:
    """`query` on one node, directly, once that node has applied every commit the cluster
    had made when the query arrived (`wsrep_sync_wait`): what the cluster as a whole holds."""
    config = Settings()
    with (
        pymysql.connect(
            host=cluster.HOST,
            port=port,
            user=config.db_user,
            password=config.db_password.get_secret_value(),
            database=database,
            autocommit=True,
        ) as connection,
        connection.cursor() as cursor,
    ):
        cursor.execute("SET SESSION wsrep_sync_wait = 1")
        cursor.execute(query, args or None)
        return list(cursor.fetchall())


def fakepay_requests(fakepay: Running) -> list[dict[str, Any]]:
    """What fake_pay.py logged about each request it received (one JSON object a line)."""
    lines = fakepay.log_path.read_text().splitlines()
    entries = [json.loads(line) for line in lines if line.startswith("{")]
    return [entry["request"] for entry in entries if isinstance(entry.get("request"), dict)]


def report(name: str, figures: dict[str, Any]) -> Path:
    """Keep a test's measurements in artifacts/cluster/ and show them at the end of the run."""
    REPORTS.mkdir(parents=True, exist_ok=True)
    path = REPORTS / f"{name}-{time.strftime('%Y%m%dT%H%M%S')}.json"
    path.write_text(json.dumps(figures, indent=2, default=str))
    summary = {key: value for key, value in figures.items() if not isinstance(value, list | dict)}
    MEASURED.append(f"{name}: {json.dumps(summary)} ({path.relative_to(PROJECT_ROOT)})")
    return path


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if MEASURED:
        terminalreporter.section("cluster measurements")
        for line in MEASURED:
            terminalreporter.write_line(line)

"""The test stack: a fresh database of its own, the real fake_pay.py, the app.

Settings are read when the app's modules are imported, so the test database and FakePay port
are put into the environment before anything imports `db` or `main`.
"""

import json
import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

import settings as app_settings
from scripts.processes import free_port, start_app, wait_for_port

PROJECT_ROOT = app_settings.PROJECT_ROOT


FAKEPAY_PORT = free_port()
_configured = app_settings.Settings()
TEST_ENV = {
    "DB_URL": f"{_configured.db_url.rsplit('/', 1)[0]}/{_configured.db_name}_test",
    "FAKEPAY_URL": f"http://127.0.0.1:{FAKEPAY_PORT}/fakepay",
    "FAKEPAY_TIMEOUT": "2",
    "LOG_LEVEL": "DEBUG",
}
os.environ.update(TEST_ENV)
app_settings.settings = app_settings.Settings()

from db import apply_script, create_database, engine  # noqa: E402
from tests.stand_in import StandInProvider  # noqa: E402


@dataclass
class FakePayProcess:
    """The real fake_pay.py, with what it logged about each request it received."""

    url: str
    log_path: Path
    process: subprocess.Popen[bytes] = field(repr=False)

    def entries(self) -> list[dict[str, Any]]:
        lines = self.log_path.read_text().splitlines()
        return [json.loads(line) for line in lines if line.startswith("{")]

    def requests_for(self, transaction_id: str) -> list[dict[str, Any]]:
        return [
            entry
            for entry in self.entries()
            if isinstance(entry["request"], dict)
            and entry["request"].get("transactionId") == transaction_id
        ]


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Tests marked `after_everything` inspect what the whole run left behind: run them last."""
    items.sort(key=lambda item: item.get_closest_marker("after_everything") is not None)


@pytest.fixture(scope="session", autouse=True)
def app_log(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """Everything the in-process app logs, kept for the card-data check at the end."""
    from loguru import logger

    import main  # noqa: F401  (configures logging first, so this sink is added after it)

    path = tmp_path_factory.mktemp("inprocess") / "app.log"
    sink_id = logger.add(path, level="DEBUG", serialize=True, diagnose=False)
    yield path
    logger.remove(sink_id)


@pytest.fixture(scope="session", autouse=True)
def database() -> None:
    """A database of the tests' own, built by the project's own up.sql."""
    create_database(app_settings.settings, recreate=True)
    apply_script(app_settings.settings, "up.sql")


@pytest.fixture
def seeded_database(database: None) -> None:
    """The seed data exactly as up.sql leaves it, for tests that use the seeded invoices."""
    apply_script(app_settings.settings, "down.sql")
    apply_script(app_settings.settings, "up.sql")
    engine.dispose()


@pytest.fixture(scope="session")
def fakepay(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FakePayProcess]:
    log_path = tmp_path_factory.mktemp("fakepay") / "fakepay.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [sys.executable, str(PROJECT_ROOT / "fake_pay.py"), str(FAKEPAY_PORT)],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    try:
        wait_for_port(FAKEPAY_PORT, process)
        yield FakePayProcess(TEST_ENV["FAKEPAY_URL"], log_path, process)
    finally:
        process.terminate()
        process.wait(timeout=10)


@pytest.fixture(scope="session")
def client(database: None, fakepay: FakePayProcess) -> Iterator[Any]:
    from fastapi.testclient import TestClient

    from main import app

    with TestClient(app) as test_client:
        yield test_client


@dataclass
class LiveServer:
    url: str
    log_path: Path


@pytest.fixture(scope="session")
def live_server(
    database: None, fakepay: FakePayProcess, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[LiveServer]:
    """The app as users run it: a uvicorn process over real HTTP."""
    log_path = tmp_path_factory.mktemp("live") / "app.log"
    process, url = start_app(log_path)
    try:
        yield LiveServer(url, log_path)
    finally:
        process.terminate()
        process.wait(timeout=10)


@pytest.fixture
def http(live_server: LiveServer) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=live_server.url, timeout=30) as http_client:
        yield http_client


@pytest.fixture
def use_provider(client: Any) -> Iterator[Callable[[str], None]]:
    """Point the app under test at another provider URL for one test."""
    from main import app
    from payments import FakePayClient, get_fakepay

    replacements: list[FakePayClient] = []

    def use(url: str) -> None:
        replacement = FakePayClient(app_settings.settings.model_copy(update={"fakepay_url": url}))
        replacements.append(replacement)
        app.dependency_overrides[get_fakepay] = lambda: replacement

    yield use
    app.dependency_overrides.pop(get_fakepay, None)
    for replacement in replacements:
        replacement.close()


@pytest.fixture
def stand_in(use_provider: Callable[[str], None]) -> Iterator[StandInProvider]:
    with StandInProvider() as provider:
        use_provider(provider.url)
        yield provider

"""The test stack: a fresh database of its own, the real fake_pay.py, the app in process (made
with the tests' settings) and as uvicorn processes (given them as environment variables)."""

from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from sqlalchemy.ext.asyncio import AsyncEngine

from scripts.processes import Running, running_fakepay
from scripts.schema import apply_script, create_database, upgrade_to_head
from tests.stand_in import StandInProvider
from tests.support import (
    FAKEPAY_PORT,
    FakePayProcess,
    OneSlotProvider,
    OverrideFakePay,
    UseProvider,
    app_process,
    settings,
)
from tests.tcp_proxy import TcpProxy


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Tests marked `after_everything` inspect what the whole run left behind: run them last."""
    items.sort(key=lambda item: item.get_closest_marker("after_everything") is not None)


@pytest.fixture(scope="session")
def app() -> FastAPI:
    """The in-process app, made with the tests' settings."""
    from main import create_app

    return create_app(settings)


@pytest.fixture(scope="session", autouse=True)
def app_log(app: FastAPI, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """Everything the in-process app logs, kept for the card-data check at the end (the app
    configures logging when it is made, so this sink is added after it)."""
    from loguru import logger

    path = tmp_path_factory.mktemp("inprocess") / "app.log"
    sink_id = logger.add(path, level="DEBUG", serialize=True, diagnose=False)
    yield path
    logger.remove(sink_id)


@pytest.fixture(scope="session", autouse=True)
def database() -> None:
    """A database of the tests' own, built by the migrations, as `make db-up` builds one."""
    create_database(settings, recreate=True)
    upgrade_to_head(settings)


@pytest.fixture
def seeded_database(database: None) -> None:
    """The seed data exactly as up.sql leaves it, for tests that use the seeded invoices (the
    script and the migrations make the same schema: test_schema)."""
    apply_script(settings, "down.sql")
    apply_script(settings, "up.sql")


@pytest.fixture(scope="session")
def fakepay(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FakePayProcess]:
    log_path = tmp_path_factory.mktemp("fakepay") / "fakepay.log"
    with running_fakepay(log_path, FAKEPAY_PORT) as server:
        yield FakePayProcess(server)


@pytest.fixture(scope="session")
def client(app: FastAPI, database: None, fakepay: FakePayProcess) -> Iterator[TestClient]:
    with TestClient(app) as test_client:
        yield test_client


@pytest.fixture
def app_engine(client: TestClient) -> AsyncEngine:
    """The in-process app's engine, from its lifespan state (run it on `client.portal`)."""
    engine: AsyncEngine = client.app_state["engine"]
    return engine


@pytest.fixture(scope="session")
def live_server(
    database: None, fakepay: FakePayProcess, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Running]:
    """The app as users run it: a uvicorn process over real HTTP."""
    with app_process(tmp_path_factory.mktemp("live") / "app.log") as server:
        yield server


@pytest.fixture
def http(live_server: Running) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=live_server.url, timeout=30) as http_client:
        yield http_client


@pytest.fixture
def override_fakepay(app: FastAPI, client: TestClient) -> Iterator[OverrideFakePay]:
    """Replace the in-process app's FakePay dependency for one test."""
    from payments import get_fakepay

    def override(dependency: Callable[[], Awaitable[Any]]) -> None:
        app.dependency_overrides[get_fakepay] = dependency

    yield override
    app.dependency_overrides.pop(get_fakepay, None)


@pytest.fixture
def use_provider(client: TestClient, override_fakepay: OverrideFakePay) -> Iterator[UseProvider]:
    """Point the in-process app at another provider URL (or another client class, or other
    provider settings) for one test. The client is made on the app's event loop, where it
    will run."""
    from payments import FakePayClient

    replacements: list[FakePayClient] = []

    def use(url: str, client_class: type[FakePayClient] = FakePayClient, **overrides: Any) -> None:
        """`overrides`: other settings for this client, such as `fakepay_timeout=10`."""
        config = settings.model_copy(update={**overrides, "fakepay_url": url})
        replacement = client.portal.call(client_class, config)  # type: ignore[union-attr]
        replacements.append(replacement)

        async def get_replacement() -> FakePayClient:
            return replacement

        override_fakepay(get_replacement)

    yield use
    for replacement in replacements:
        client.portal.call(replacement.aclose)  # type: ignore[union-attr]


@pytest.fixture
def stand_in(use_provider: UseProvider) -> Iterator[StandInProvider]:
    with StandInProvider() as provider:
        use_provider(provider.url)
        yield provider


@pytest.fixture
def one_slot_provider(client: TestClient, use_provider: UseProvider) -> Iterator[OneSlotProvider]:
    with StandInProvider() as provider:
        use_provider(provider.url, fakepay_max_concurrency=1, fakepay_timeout=30)
        yield OneSlotProvider(provider, client)


@pytest.fixture
def database_proxy(database: None) -> Iterator[TcpProxy]:
    """A TCP proxy in front of the test database, for an app that sees it go away."""
    proxy = TcpProxy(settings.db_host, settings.db_port)
    proxy.start()
    yield proxy
    proxy.cut()


@pytest.fixture(scope="session")
def live_server_with_auth(
    database: None, fakepay: FakePayProcess, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[str]:
    """The app as users run it with AUTH=on."""
    log_path = tmp_path_factory.mktemp("live") / "app-auth.log"
    with app_process(log_path, env={"AUTH": "on"}) as server:
        yield server.url

"""API keys with AUTH=on: bearer secrets, read and write scopes, revocation within seconds."""

import os
import subprocess
import sys
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from sqlalchemy import text

from models import ApiKeyScope
from scripts.api_keys import create as create_api_key
from scripts.processes import PROJECT_ROOT
from tests.support import (
    J_DOE_CARD,
    SEEDED_CANCELLED,
    TEST_ENV,
    UNKNOWN_ID,
    FakePayProcess,
    bearer,
    create_pending_invoice,
    direct_engine,
    make_key,
    revoke_key,
    settings,
)

NEW_INVOICE = {"jobDescription": "Written with a key", "amount": 1, "customerId": 1}


@pytest.fixture
def auth_on(client: TestClient, monkeypatch: pytest.MonkeyPatch) -> None:
    """AUTH=on for the in-process app: the check reads the setting on every request."""
    monkeypatch.setattr(settings, "auth", "on")


@pytest.fixture
def write_key(auth_on: None) -> str:
    return make_key("write")[1]


@pytest.fixture
def read_key(auth_on: None) -> str:
    return make_key("read")[1]


def test_the_secret_is_inv_and_32_random_bytes_stored_only_as_its_hash() -> None:
    name, secret = make_key("write")

    with direct_engine.connect() as connection:
        row = connection.execute(
            text("SELECT secret_hash, prefix FROM api_key WHERE name = :name"), {"name": name}
        ).one()
    assert secret.startswith("inv_")
    assert len(secret) >= len("inv_") + 43  # 32 bytes, URL-safe base64
    assert secret not in " ".join(row)
    assert secret.startswith(row.prefix)
    assert len(row.prefix) < 16


@pytest.mark.usefixtures("auth_on")
@pytest.mark.parametrize(
    "headers", [{}, bearer("inv_not-a-real-key"), {"Authorization": "Basic eDp5"}]
)
def test_missing_or_unknown_key_is_401_asking_for_a_bearer_token(
    client: TestClient, headers: dict[str, str]
) -> None:
    response = client.get(f"/invoice/{SEEDED_CANCELLED}", headers=headers)

    assert response.status_code == 401
    assert response.headers["www-authenticate"] == "Bearer"
    assert response.json()["detail"]


@pytest.mark.usefixtures("auth_on")
@pytest.mark.parametrize("path", ["/health-check", "/docs", "/redoc", "/openapi.json"])
def test_health_and_docs_stay_open(client: TestClient, path: str) -> None:
    assert client.get(path).status_code == 200


def test_a_write_key_may_do_everything(client: TestClient, write_key: str) -> None:
    body = {"jobDescription": "Keyed", "amount": 3, "customerId": 1, "card": J_DOE_CARD}

    created = client.post("/invoice", json=body, headers=bearer(write_key))
    read = client.get(f"/invoice/{created.json()['id']}", headers=bearer(write_key))

    assert (created.status_code, read.status_code) == (201, 200)


def test_a_read_key_may_read_but_not_write(client: TestClient, read_key: str) -> None:
    read = client.get("/invoices", headers=bearer(read_key))
    write = client.post(
        "/invoice",
        json={"jobDescription": "No", "amount": 1, "customerId": 1},
        headers=bearer(read_key),
    )

    assert read.status_code == 200
    assert write.status_code == 403
    assert "may only read" in write.json()["detail"]


def test_a_read_key_may_not_cancel(client: TestClient, write_key: str) -> None:
    _, reader = make_key("read")
    created = client.post(
        "/invoice",
        json={"jobDescription": "Not yours to void", "amount": 1, "customerId": 1},
        headers=bearer(write_key),
    )
    invoice_id = created.json()["id"]

    response = client.post(f"/invoice/cancel/{invoice_id}", headers=bearer(reader))

    assert response.status_code == 403
    assert "may only read" in response.json()["detail"]
    read = client.get(f"/invoice/{invoice_id}", headers=bearer(reader))
    assert read.json()["invoiceStatus"] == "PENDING"


def test_a_revoked_key_stops_working_within_5_seconds(client: TestClient, auth_on: None) -> None:
    name, secret = make_key("read")
    assert client.get("/invoices", headers=bearer(secret)).status_code == 200

    revoke_key(name)
    started = time.monotonic()
    while client.get("/invoices", headers=bearer(secret)).status_code == 200:
        assert time.monotonic() - started < 5, "the revoked key still works after 5 s"
        time.sleep(0.2)

    assert client.get("/invoices", headers=bearer(secret)).status_code == 401


def test_a_revoked_key_is_refused_after_an_idle_spell_even_in_a_burst(
    client: TestClient, auth_on: None
) -> None:
    """Nobody asks for 6 s, longer than the reload interval, so no reload was started; then
    a burst of writes with the revoked key: none of them may go through on the old table."""
    name, secret = make_key("write")
    assert client.get("/invoices", headers=bearer(secret)).status_code == 200
    revoke_key(name)
    time.sleep(6)

    with ThreadPoolExecutor(max_workers=10) as pool:
        replies = list(
            pool.map(
                lambda _: client.post("/invoice", json=NEW_INVOICE, headers=bearer(secret)),
                range(10),
            )
        )

    assert [reply.status_code for reply in replies] == [401] * 10


def test_a_key_made_while_running_works_within_5_seconds(client: TestClient, auth_on: None) -> None:
    _, secret = make_key("read")

    started = time.monotonic()
    while client.get("/invoices", headers=bearer(secret)).status_code != 200:
        assert time.monotonic() - started < 5
        time.sleep(0.2)


def test_last_used_is_recorded(client: TestClient, auth_on: None) -> None:
    name, secret = make_key("read")
    for _ in range(3):
        client.get("/invoices", headers=bearer(secret))

    deadline = time.monotonic() + 5
    while True:
        with direct_engine.connect() as connection:
            used = connection.execute(
                text("SELECT last_used_at FROM api_key WHERE name = :name"), {"name": name}
            ).scalar_one()
        if used is not None or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert used is not None


def test_idempotency_keys_belong_to_the_api_key_that_sent_them(
    client: TestClient, auth_on: None
) -> None:
    _, alice = make_key("write")
    _, bob = make_key("write")
    shared = {"Idempotency-Key": f"shared-{uuid.uuid4()}"}
    body = {"jobDescription": "Same key, two callers", "amount": 1, "customerId": 1}

    first = client.post("/invoice", json=body, headers={**bearer(alice), **shared})
    second = client.post("/invoice", json=body, headers={**bearer(bob), **shared})

    assert first.status_code == second.status_code == 201
    assert "idempotent-replayed" not in second.headers
    assert first.json()["id"] != second.json()["id"]


def test_a_pay_idempotency_key_is_not_shared_between_api_keys(
    client: TestClient, auth_on: None, fakepay: FakePayProcess
) -> None:
    _, alice = make_key("write")
    _, bob = make_key("write")
    shared = {"Idempotency-Key": f"shared-pay-{uuid.uuid4()}"}
    body = {"jobDescription": "One key, two payers", "amount": 1, "customerId": 1}
    alices, bobs = (
        client.post("/invoice", json=body, headers=bearer(secret)).json()["id"]
        for secret in (alice, bob)
    )
    paid = client.post(
        f"/invoice/pay/{alices}", json=J_DOE_CARD, headers={**bearer(alice), **shared}
    )
    assert paid.status_code == 201

    response = client.post(
        f"/invoice/pay/{bobs}", json=J_DOE_CARD, headers={**bearer(bob), **shared}
    )

    assert response.status_code == 201
    assert "idempotent-replayed" not in response.headers
    data = response.json()
    assert (data["id"], data["invoiceStatus"]) == (bobs, "PAID")
    assert len(fakepay.requests_for(bobs)) == 1


def test_with_auth_off_no_key_is_needed(client: TestClient) -> None:
    assert settings.auth == "off"

    assert (
        client.post(f"/invoice/pay/{create_pending_invoice(client)}", json=J_DOE_CARD).status_code
        == 201
    )


def test_openapi_declares_the_bearer_scheme(client: TestClient) -> None:
    openapi = client.get("/openapi.json").json()

    schemes = openapi["components"]["securitySchemes"]
    assert {"type": "http", "scheme": "bearer"}.items() <= next(iter(schemes.values())).items()
    assert "security" in openapi["paths"]["/invoices"]["get"]
    assert "security" not in openapi["paths"]["/health-check"]["get"]


def test_no_secret_is_logged(client: TestClient, auth_on: None, app_log: Path) -> None:
    _, secret = make_key("read")
    client.get("/invoices", headers=bearer(secret))
    client.get("/invoices", headers=bearer(secret + "x"))

    assert secret not in app_log.read_text()


def serve_guard(host: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "scripts.stack", "serve-guard", host],
        cwd=PROJECT_ROOT,
        capture_output=True,
        text=True,
        env={**os.environ, **TEST_ENV, **env},
    )


def test_serving_beyond_loopback_without_auth_is_refused() -> None:
    refused = serve_guard("0.0.0.0", AUTH="off")
    allowed = serve_guard("0.0.0.0", AUTH="off", ALLOW_OPEN="true")
    with_auth = serve_guard("0.0.0.0", AUTH="on")
    local = serve_guard("127.0.0.1", AUTH="off")

    assert refused.returncode != 0
    assert "AUTH" in refused.stderr
    assert (allowed.returncode, with_auth.returncode, local.returncode) == (0, 0, 0)


def test_live_server_with_auth_on_refuses_a_request_without_key(
    live_server_with_auth: str,
) -> None:
    response = httpx.get(f"{live_server_with_auth}/invoices")

    assert response.status_code == 401


def test_key_names_compare_exactly_on_every_server() -> None:
    # The server's default collation would make these one name on MySQL 8 (utf8mb4_0900_ai_ci)
    # and two on MariaDB (utf8mb4_general_ci); the schema's own collation makes them two on both.
    tag = uuid.uuid4().hex[:8]

    first = create_api_key(settings, f"straße-{tag}", ApiKeyScope.READ)
    second = create_api_key(settings, f"strasse-{tag}", ApiKeyScope.READ)

    assert first != second
    with pytest.raises(SystemExit, match="already exists"):
        create_api_key(settings, f"strasse-{tag}", ApiKeyScope.READ)


def protected_routes(app: FastAPI) -> list[tuple[str, str]]:
    """(method, path) of every route the app has but the ones marked public, with made-up
    ids in place of the path's parameters."""
    from fastapi.routing import APIRoute

    from auth import is_public

    filled = {"{invoice_id}": UNKNOWN_ID, "{payment_id}": "1", "{customer_id}": "1"}
    found = []
    for route in app.routes:
        if isinstance(route, APIRoute) and not is_public(route):
            path = route.path_format
            for placeholder, value in filled.items():
                path = path.replace(placeholder, value)
            found += [(method, path) for method in sorted(route.methods or ())]
    return found


def test_every_route_but_the_public_ones_needs_a_key(
    app: FastAPI, client: TestClient, auth_on: None
) -> None:
    refused = {
        (method, path): client.request(method, path).status_code
        for method, path in protected_routes(app)
    }

    assert len(refused) >= 12  # every route the app has, less the health check and docs
    assert set(refused.values()) == {401}, refused


def test_every_writing_route_refuses_a_read_key(
    app: FastAPI, client: TestClient, read_key: str
) -> None:
    writes = [(method, path) for method, path in protected_routes(app) if method != "GET"]

    refused = {
        (method, path): client.request(method, path, headers=bearer(read_key)).status_code
        for method, path in writes
    }

    assert writes
    assert set(refused.values()) == {403}, refused


def test_resolving_a_payment_needs_an_admin_key(client: TestClient, write_key: str) -> None:
    path = f"/invoice/{UNKNOWN_ID}/payments/1/resolve"
    admin = make_key("admin")[1]

    refused = client.post(path, json={"outcome": "FAILED"}, headers=bearer(write_key))
    allowed = client.post(path, json={"outcome": "FAILED"}, headers=bearer(admin))

    assert refused.status_code == 403
    assert "needs an admin key" in refused.json()["detail"]
    assert allowed.status_code == 404  # past the key check: there is no such invoice


def test_every_protected_operation_documents_401_and_403(client: TestClient) -> None:
    paths = client.get("/openapi.json").json()["paths"]

    operations = [
        (path, method, operation)
        for path, methods in paths.items()
        for method, operation in methods.items()
        if path != "/health-check"
    ]

    assert len(operations) >= 12
    for path, method, operation in operations:
        assert {"401", "403"} <= set(operation["responses"]), f"{method} {path}"
        assert operation.get("security"), f"{method} {path}"

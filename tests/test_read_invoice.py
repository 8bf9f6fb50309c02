"""GET /health-check and GET /invoice/{invoice_id}, the two endpoints the challenge gives."""

import json
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient

from scripts.processes import Running, free_port
from tests.support import WORK_CARD, OverrideFakePay, app_process

CANCELLED_ID = "a14e5bd8-02ce-11f0-8d97-7c646cb7c0bc"


def test_health_check_is_up_after_a_database_round_trip(client: TestClient) -> None:
    response = client.get("/health-check")

    assert response.status_code == 200
    assert response.json() == {"status": "UP"}


def test_read_invoice_returns_the_challenge_example(
    client: TestClient, seeded_database: None
) -> None:
    response = client.get(f"/invoice/{CANCELLED_ID}")

    assert response.status_code == 200
    assert response.json() == {
        "id": "a14e5bd8-02ce-11f0-8d97-7c646cb7c0bc",
        "jobDescription": "Software License Fee",
        "customerId": 4,
        "amount": 99.99,
        "customerName": "Amanda Lee",
        "customerEmail": "amanda.lee@paymark.co.nz",
        "invoiceStatus": "CANCELLED",
    }


def test_read_invoice_writes_whole_amounts_with_one_decimal(
    client: TestClient, seeded_database: None
) -> None:
    response = client.get("/invoice/6f53c715-0369-11f0-8d97-7c646cb7c0bc")

    assert response.status_code == 200
    assert '"amount":175.0' in response.text


def test_read_unknown_invoice_is_404(client: TestClient) -> None:
    response = client.get("/invoice/00000000-0000-4000-8000-000000000000")

    assert response.status_code == 404
    assert response.json() == {"detail": "Invoice 00000000-0000-4000-8000-000000000000 not found"}


@pytest.mark.parametrize("invoice_id", ["not-a-uuid", "a14e5bd8-02ce-11f0-8d97", "1"])
def test_read_malformed_id_is_422(client: TestClient, invoice_id: str) -> None:
    response = client.get(f"/invoice/{invoice_id}")

    assert response.status_code == 422
    (error,) = response.json()["detail"]
    assert error["loc"] == ["path", "invoice_id"]
    assert "UUID" in error["msg"]


def test_every_response_carries_a_request_id(client: TestClient) -> None:
    response = client.get("/health-check")

    assert len(response.headers["x-request-id"]) == 32


def test_a_sensible_request_id_from_the_caller_is_kept(client: TestClient) -> None:
    response = client.get("/health-check", headers={"X-Request-ID": "trace-42"})

    assert response.headers["x-request-id"] == "trace-42"


@pytest.fixture(scope="module")
def app_without_database(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A live app whose DB_URL points at a port where nothing listens."""
    log_path = tmp_path_factory.mktemp("nodb") / "app.log"
    with app_process(log_path, env={"DB_URL": f"127.0.0.1:{free_port()}/nothing"}) as server:
        yield server.url


def test_app_starts_and_health_check_is_down_without_database(
    app_without_database: str,
) -> None:
    started = time.monotonic()
    response = httpx.get(f"{app_without_database}/health-check", timeout=10)

    assert response.status_code == 503
    assert response.json() == {"status": "DOWN"}
    assert time.monotonic() - started < 3


def test_read_invoice_is_503_without_database(app_without_database: str) -> None:
    response = httpx.get(f"{app_without_database}/invoice/{CANCELLED_ID}", timeout=10)

    assert response.status_code == 503
    assert response.json() == {
        "detail": "The database is unavailable or did not answer in time; try again shortly"
    }


def test_logs_hold_no_database_password(live_server: Running, http: httpx.Client) -> None:
    http.get("/health-check")
    http.get(f"/invoice/{CANCELLED_ID}")

    log = Path(live_server.log_path).read_text()
    assert "GET /health-check 200" in log
    assert "example" not in log


def test_an_unexpected_error_is_a_json_500_with_its_request_id_logged(
    client: TestClient, app_log: Path, override_fakepay: OverrideFakePay
) -> None:
    async def broken() -> None:
        raise RuntimeError("a bug")

    override_fakepay(broken)
    response = client.post(f"/invoice/pay/{CANCELLED_ID}", json=WORK_CARD)

    assert response.status_code == 500
    assert response.json() == {
        "detail": "Internal server error; the request id is in the X-Request-ID header"
    }
    request_id = response.headers["x-request-id"]
    logged = [json.loads(line)["record"] for line in app_log.read_text().splitlines()]
    errors = [r for r in logged if r["extra"]["request_id"] == request_id]
    assert any(r["level"]["name"] == "ERROR" and r["message"] == "unhandled error" for r in errors)
    assert any(r["message"].startswith(f"POST /invoice/pay/{CANCELLED_ID} 500") for r in errors)


def test_a_card_number_in_a_url_is_not_logged(client: TestClient, app_log: Path) -> None:
    """Paths are logged; a client that puts a card number in one must not leave it there."""
    client.get("/invoice/4111 1111 1111 1111")
    client.get("/customer/0.4111111111111111")

    logged = app_log.read_text()
    assert "4111111111111111" not in logged
    assert "4111 1111 1111 1111" not in logged
    assert "/customer/0.[redacted]" in logged


def test_an_invoice_id_with_long_digit_runs_is_logged_whole(
    client: TestClient, app_log: Path
) -> None:
    """Redacting card-like digits must not cut into the ids a log reader searches for."""
    invoice_id = "0195b0f4-7f6f-7000-8000-000000000000"
    client.get(f"/invoice/{invoice_id}")

    assert f"GET /invoice/{invoice_id} 404" in app_log.read_text()

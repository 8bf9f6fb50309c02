"""Log lines carry their request's fields (`record["extra"]`, the JSON of LOG_JSON=true):
request_id, and where known route (the template), invoice_id, payment_id, status and
duration_ms; a card-like digit run in a path stays redacted."""

import json
import uuid
from pathlib import Path
from typing import Any

import httpx
from fastapi.testclient import TestClient

from scripts.processes import running_app
from tests.support import WORK_CARD, attempts, create_pending_invoice


def lines_of(log_path: Path, request_id: str) -> list[dict[str, Any]]:
    """The records logged while serving the request with this id (JSON lines)."""
    records = [
        json.loads(line)["record"]
        for line in log_path.read_text().splitlines()
        if line.startswith("{")
    ]
    return [record for record in records if record["extra"].get("request_id") == request_id]


def request_line(lines: list[dict[str, Any]]) -> dict[str, Any]:
    """The request's own line, its last: the one with its status."""
    (last,) = [line for line in lines if "status" in line["extra"]]
    return last


def new_request_id() -> dict[str, str]:
    return {"X-Request-ID": uuid.uuid4().hex}


def test_the_request_line_carries_route_template_status_duration_and_invoice_id(
    client: TestClient, app_log: Path
) -> None:
    invoice_id = create_pending_invoice(client)
    headers = new_request_id()

    assert client.get(f"/invoice/{invoice_id.upper()}", headers=headers).status_code == 200

    extra = request_line(lines_of(app_log, headers["X-Request-ID"]))["extra"]
    assert extra["route"] == "/invoice/{invoice_id}"
    assert extra["status"] == 200
    assert extra["invoice_id"] == invoice_id  # as the id is written everywhere: lower case
    assert isinstance(extra["duration_ms"], float)
    assert extra["duration_ms"] >= 0
    assert "payment_id" not in extra


def test_a_create_with_card_logs_the_new_invoice_and_payment_ids_on_every_later_line(
    client: TestClient, app_log: Path
) -> None:
    headers = new_request_id()
    body = {"jobDescription": "Logged fields", "amount": 12, "customerId": 1, "card": WORK_CARD}

    response = client.post("/invoice", json=body, headers=headers)

    assert response.status_code == 201
    invoice_id = response.json()["id"]
    lines = lines_of(app_log, headers["X-Request-ID"])
    created = next(line for line in lines if line["message"].startswith("invoice "))
    outcome = next(line for line in lines if line["message"].startswith("payment outcome"))
    assert created["extra"]["invoice_id"] == invoice_id
    assert "payment_id" not in created["extra"]  # not known yet when the invoice was made
    assert outcome["extra"]["invoice_id"] == invoice_id
    ((status, _),) = attempts(invoice_id)
    assert status == "SUCCEEDED"
    assert isinstance(outcome["extra"]["payment_id"], int)
    last = request_line(lines)["extra"]
    assert (last["route"], last["status"]) == ("/invoice", 201)
    assert last["payment_id"] == outcome["extra"]["payment_id"]


def test_a_payment_id_in_the_path_is_a_field(client: TestClient, app_log: Path) -> None:
    invoice_id = create_pending_invoice(client)
    headers = new_request_id()
    resolve = f"/invoice/{invoice_id}/payments/7/resolve"

    assert client.post(resolve, json={"outcome": "FAILED"}, headers=headers).status_code == 404

    extra = request_line(lines_of(app_log, headers["X-Request-ID"]))["extra"]
    assert extra["route"] == "/invoice/{invoice_id}/payments/{payment_id}/resolve"
    assert (extra["invoice_id"], extra["payment_id"], extra["status"]) == (invoice_id, 7, 404)


def test_a_card_number_in_a_path_is_no_field_and_stays_redacted(
    client: TestClient, app_log: Path
) -> None:
    headers = new_request_id()

    assert client.get("/invoice/4111111111111111", headers=headers).status_code == 422
    assert client.post(
        "/invoice/00000000-0000-4000-8000-000000000000/payments/4111111111111111/resolve",
        json={"outcome": "FAILED"},
        headers=headers,
    ).status_code in {404, 422}

    lines = lines_of(app_log, headers["X-Request-ID"])
    assert "4111111111111111" not in json.dumps(lines)
    first, second = [line for line in lines if "status" in line["extra"]]
    assert "invoice_id" not in first["extra"]
    assert (first["extra"]["route"], first["extra"]["status"]) == ("/invoice/{invoice_id}", 422)
    assert "[redacted]" in first["message"]
    assert "payment_id" not in second["extra"]
    assert second["extra"]["route"] == "/invoice/{invoice_id}/payments/{payment_id}/resolve"


def test_with_log_json_every_line_of_the_live_app_is_json_with_its_fields(
    database: None, tmp_path: Path
) -> None:
    log_path = tmp_path / "app.log"
    headers = new_request_id()
    with (
        running_app(log_path, env={"LOG_JSON": "true"}) as server,
        httpx.Client(base_url=server.url) as http,
    ):
        invoice_id = create_pending_invoice(http)
        response = http.get(f"/invoice/{invoice_id}", headers=headers)

    assert response.status_code == 200
    app_lines = [line for line in log_path.read_text().splitlines() if line.startswith("{")]
    assert app_lines
    extra = request_line(lines_of(log_path, headers["X-Request-ID"]))["extra"]
    assert (extra["route"], extra["invoice_id"], extra["status"]) == (
        "/invoice/{invoice_id}",
        invoice_id,
        200,
    )
    assert all("request_id" in json.loads(line)["record"]["extra"] for line in app_lines)

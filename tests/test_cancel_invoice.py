"""POST /invoice/cancel/{invoice_id}: void a PENDING invoice, never one that may be paid."""

import threading
from collections import Counter

import httpx
import pytest
from fastapi.testclient import TestClient

from scripts.processes import Running
from tests.stand_in import StandInProvider
from tests.support import (
    SEEDED_CANCELLED,
    SEEDED_PAID,
    UNKNOWN_ID,
    WORK_CARD,
    FakePayProcess,
    create_pending_invoice,
    insert_attempt,
)


def test_cancel_pending_invoice_is_200_cancelled(client: TestClient) -> None:
    invoice_id = create_pending_invoice(client)

    response = client.post(f"/invoice/cancel/{invoice_id}")

    assert response.status_code == 200
    data = response.json()
    assert data["id"] == invoice_id
    assert data["invoiceStatus"] == "CANCELLED"
    assert client.get(f"/invoice/{invoice_id}").json() == data


def test_cancelling_again_is_200_and_changes_nothing(client: TestClient) -> None:
    invoice_id = create_pending_invoice(client)
    first = client.post(f"/invoice/cancel/{invoice_id}")

    again = client.post(f"/invoice/cancel/{invoice_id}")

    assert again.status_code == 200
    assert again.json() == first.json()


def test_cancel_seeded_cancelled_invoice_is_200(client: TestClient, seeded_database: None) -> None:
    response = client.post(f"/invoice/cancel/{SEEDED_CANCELLED}")

    assert response.status_code == 200
    assert response.json()["invoiceStatus"] == "CANCELLED"


def test_cancel_paid_invoice_is_409(client: TestClient, seeded_database: None) -> None:
    response = client.post(f"/invoice/cancel/{SEEDED_PAID}")

    assert response.status_code == 409
    assert response.json() == {
        "detail": f"Invoice {SEEDED_PAID} is PAID; a paid invoice cannot be cancelled"
    }


@pytest.mark.parametrize(
    ("status", "says"),
    [("PROCESSING", "is in progress"), ("UNKNOWN", "the card may have been charged")],
)
def test_cancel_with_a_payment_unsettled_is_409_saying_what_to_do(
    client: TestClient, status: str, says: str
) -> None:
    invoice_id = create_pending_invoice(client)
    insert_attempt(invoice_id, status)

    response = client.post(f"/invoice/cancel/{invoice_id}")

    assert response.status_code == 409
    assert invoice_id in response.json()["detail"]
    assert says in response.json()["detail"]
    assert client.get(f"/invoice/{invoice_id}").json()["invoiceStatus"] == "PENDING"


def test_cancel_after_a_declined_attempt_is_allowed(
    client: TestClient, stand_in: StandInProvider
) -> None:
    invoice_id = create_pending_invoice(client)
    stand_in.answer(400, {"error": "payment failed", "reason": "Do not honour"})
    client.post(f"/invoice/pay/{invoice_id}", json=WORK_CARD)

    response = client.post(f"/invoice/cancel/{invoice_id}")

    assert response.status_code == 200


def test_cancel_unknown_invoice_is_404(client: TestClient) -> None:
    response = client.post(f"/invoice/cancel/{UNKNOWN_ID}")

    assert response.status_code == 404
    assert response.json() == {"detail": f"Invoice {UNKNOWN_ID} not found"}


def test_cancel_malformed_id_is_422(client: TestClient) -> None:
    response = client.post("/invoice/cancel/not-a-uuid")

    assert response.status_code == 422
    assert response.json()["detail"][0]["loc"] == ["path", "invoice_id"]


def test_paying_a_cancelled_invoice_is_409(client: TestClient, fakepay: FakePayProcess) -> None:
    invoice_id = create_pending_invoice(client)
    client.post(f"/invoice/cancel/{invoice_id}")

    response = client.post(f"/invoice/pay/{invoice_id}", json=WORK_CARD)

    assert response.status_code == 409
    assert "is CANCELLED" in response.json()["detail"]
    assert fakepay.requests_for(invoice_id) == []


def test_cancel_with_an_idempotency_key_replays(client: TestClient) -> None:
    invoice_id = create_pending_invoice(client)
    headers = {"Idempotency-Key": f"cancel-{invoice_id}"}

    first = client.post(f"/invoice/cancel/{invoice_id}", headers=headers)
    retry = client.post(f"/invoice/cancel/{invoice_id}", headers=headers)

    assert first.status_code == retry.status_code == 200
    assert retry.json() == first.json()
    assert retry.headers["idempotent-replayed"] == "true"


@pytest.mark.parametrize("round_number", range(8))
def test_cancel_racing_a_pay_exactly_one_wins(
    live_server: Running, fakepay: FakePayProcess, round_number: int
) -> None:
    with httpx.Client(base_url=live_server.url, timeout=30) as http:
        invoice_id = create_pending_invoice(http)
    barrier = threading.Barrier(2)
    replies: dict[str, httpx.Response] = {}

    def send(name: str, path: str, body: object) -> None:
        with httpx.Client(base_url=live_server.url, timeout=30) as http:
            barrier.wait()
            replies[name] = http.post(path, json=body)

    racers = [
        threading.Thread(target=send, args=("pay", f"/invoice/pay/{invoice_id}", WORK_CARD)),
        threading.Thread(target=send, args=("cancel", f"/invoice/cancel/{invoice_id}", None)),
    ]
    for racer in racers:
        racer.start()
    for racer in racers:
        racer.join()

    outcome = (replies["pay"].status_code, replies["cancel"].status_code)
    assert outcome in {(201, 409), (409, 200)}
    with httpx.Client(base_url=live_server.url, timeout=30) as http:
        final = http.get(f"/invoice/{invoice_id}").json()["invoiceStatus"]
    charges = len(fakepay.requests_for(invoice_id))
    assert (final, charges) == (("PAID", 1) if outcome == (201, 409) else ("CANCELLED", 0))


def test_status_counts_follow_a_cancel(client: TestClient) -> None:
    before = Counter(
        {
            s: client.get("/invoices", params={"invoiceStatus": s}).json()["total"]
            for s in ("PENDING", "CANCELLED")
        }
    )
    client.post(f"/invoice/cancel/{create_pending_invoice(client)}")

    after = Counter(
        {
            s: client.get("/invoices", params={"invoiceStatus": s}).json()["total"]
            for s in ("PENDING", "CANCELLED")
        }
    )
    assert after["CANCELLED"] - before["CANCELLED"] == 1
    assert after["PENDING"] == before["PENDING"]

"""POST /invoice/pay/{invoice_id}, and how every provider outcome leaves the invoice."""

import asyncio
import sys
import threading
import time
from datetime import UTC, datetime
from importlib.abc import MetaPathFinder
from importlib.machinery import ModuleSpec
from typing import Any

import pytest
from fastapi.testclient import TestClient
from pydantic import SecretStr
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from models import PaymentStatus
from payments import FakePayCard, FakePayClient, FakePayRequest
from settings import Settings
from tests.stand_in import StandInProvider, refusing_provider_url, silent_provider
from tests.support import (
    MASKED_WORK_CARD,
    PAID_REPLY,
    SEEDED_CANCELLED,
    SEEDED_PAID,
    SEEDED_PENDING,
    UNKNOWN_ID,
    WORK_CARD,
    FakePayProcess,
    UseProvider,
    attempts,
    create_pending_invoice,
    direct_engine,
    last_month,
)


def status_of(client: TestClient, invoice_id: str) -> str:
    status: str = client.get(f"/invoice/{invoice_id}").json()["invoiceStatus"]
    return status


def test_pay_matches_the_challenge_example(client: TestClient) -> None:
    invoice_id = create_pending_invoice(client)

    response = client.post(f"/invoice/pay/{invoice_id}", json=WORK_CARD)

    assert response.status_code == 201
    assert response.json() == {
        "id": invoice_id,
        "jobDescription": "Building Payment System",
        "customerId": 3,
        "amount": 299.99,
        "card": MASKED_WORK_CARD,
        "customerName": "Seth Hall",
        "customerEmail": "seth.hall@paymark.co.nz",
        "invoiceStatus": "PAID",
    }


def test_pay_sends_the_invoice_id_and_plain_digits_to_fakepay(
    client: TestClient, fakepay: FakePayProcess
) -> None:
    invoice_id = create_pending_invoice(client)

    client.post(f"/invoice/pay/{invoice_id}", json=WORK_CARD)

    (received,) = fakepay.requests_for(invoice_id)
    assert received["request"] == {"transactionId": invoice_id, "card": MASKED_WORK_CARD}
    assert received["status"] == 200


def test_paid_invoice_is_stored_paid_with_its_card(client: TestClient) -> None:
    invoice_id = create_pending_invoice(client)
    client.post(f"/invoice/pay/{invoice_id}", json=WORK_CARD)

    data = client.get(f"/invoice/{invoice_id}").json()

    assert data["invoiceStatus"] == "PAID"
    assert data["card"] == MASKED_WORK_CARD
    assert attempts(invoice_id) == [("SUCCEEDED", None)]


def test_pay_seeded_create_pending_invoice(client: TestClient, seeded_database: None) -> None:
    response = client.post(f"/invoice/pay/{SEEDED_PENDING}", json=WORK_CARD)

    assert response.status_code == 201
    data = response.json()
    assert data["jobDescription"] == "SEO Optimization"
    assert data["amount"] == 175.0
    assert data["invoiceStatus"] == "PAID"


def test_paying_twice_is_409_and_charges_once(client: TestClient, fakepay: FakePayProcess) -> None:
    invoice_id = create_pending_invoice(client)
    client.post(f"/invoice/pay/{invoice_id}", json=WORK_CARD)

    response = client.post(f"/invoice/pay/{invoice_id}", json=WORK_CARD)

    assert response.status_code == 409
    assert response.json() == {
        "detail": f"Invoice {invoice_id} is PAID; only PENDING invoices can be paid"
    }
    assert len(fakepay.requests_for(invoice_id)) == 1


@pytest.mark.parametrize(
    ("invoice_id", "status"), [(SEEDED_CANCELLED, "CANCELLED"), (SEEDED_PAID, "PAID")]
)
def test_pay_non_pending_seeded_invoice_is_409_naming_its_status(
    client: TestClient, seeded_database: None, invoice_id: str, status: str
) -> None:
    response = client.post(f"/invoice/pay/{invoice_id}", json=WORK_CARD)

    assert response.status_code == 409
    assert response.json() == {
        "detail": f"Invoice {invoice_id} is {status}; only PENDING invoices can be paid"
    }


def test_pay_unknown_invoice_is_404(client: TestClient) -> None:
    response = client.post(f"/invoice/pay/{UNKNOWN_ID}", json=WORK_CARD)

    assert response.status_code == 404
    assert response.json() == {"detail": f"Invoice {UNKNOWN_ID} not found"}


def test_pay_malformed_id_is_422(client: TestClient) -> None:
    response = client.post("/invoice/pay/12345", json=WORK_CARD)

    assert response.status_code == 422
    assert response.json()["detail"][0]["loc"] == ["path", "invoice_id"]


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("number", "1234 5656 7822 567", "card number must be 16 digits"),
        ("number", "1234 5656 7822 56789", "card number must be 16 digits"),
        ("number", "1234x5656y7822z5678", "card number must be 16 digits"),
        ("number", "\uff11" * 16, "card number must be 16 digits"),  # fullwidth digits
        ("number", 1234565678225678, "card number must be a JSON string of 16 digits"),
        ("expiry", "13-2040", "card expiry must be MM-YYYY with a month from 01 to 12"),
        ("expiry", "1-2040", "card expiry must be MM-YYYY with a month from 01 to 12"),
        ("expiry", "01/2040", "card expiry must be MM-YYYY with a month from 01 to 12"),
        ("expiry", last_month(), "card has expired: expiry must not be before the current month"),
        ("name", "J0hn", "card name must be 1-50 ASCII letters and spaces"),
        ("name", "   ", "card name must be 1-50 ASCII letters and spaces"),
        ("name", "A" * 51, "card name must be 1-50 ASCII letters and spaces"),
        ("name", "Zoë", "card name must be 1-50 ASCII letters and spaces"),
    ],
)
def test_bad_card_is_422_naming_field_and_rule(
    client: TestClient, field: str, value: object, message: str
) -> None:
    invoice_id = create_pending_invoice(client)

    response = client.post(f"/invoice/pay/{invoice_id}", json={**WORK_CARD, field: value})

    assert response.status_code == 422
    (error,) = response.json()["detail"]
    assert error["loc"] == ["body", field]
    assert error["msg"].startswith(message)
    assert status_of(client, invoice_id) == "PENDING"
    assert attempts(invoice_id) == []


def test_card_expiring_this_month_is_accepted(client: TestClient) -> None:
    now = datetime.now(UTC)
    invoice_id = create_pending_invoice(client)

    response = client.post(
        f"/invoice/pay/{invoice_id}", json={**WORK_CARD, "expiry": f"{now.month:02d}-{now.year}"}
    )

    assert response.status_code == 201


def test_validation_comes_before_lookup(client: TestClient) -> None:
    response = client.post(
        "/invoice/pay/00000000-0000-4000-8000-000000000000", json={**WORK_CARD, "number": "1"}
    )

    assert response.status_code == 422


def test_decline_is_402_with_fakepay_reason_and_invoice_stays_pending(
    client: TestClient, stand_in: StandInProvider
) -> None:
    invoice_id = create_pending_invoice(client)
    stand_in.answer(400, {"error": "payment failed", "reason": "Insufficient funds"})

    response = client.post(f"/invoice/pay/{invoice_id}", json=WORK_CARD)

    assert response.status_code == 402
    assert response.json() == {
        "detail": f"Payment for invoice {invoice_id} was declined by FakePay: Insufficient funds"
    }
    assert status_of(client, invoice_id) == "PENDING"
    assert attempts(invoice_id) == [("DECLINED", "Insufficient funds")]


def test_provider_refusing_connections_is_502(
    client: TestClient, use_provider: UseProvider
) -> None:
    invoice_id = create_pending_invoice(client)
    use_provider(refusing_provider_url())

    response = client.post(f"/invoice/pay/{invoice_id}", json=WORK_CARD)

    assert response.status_code == 502
    assert response.json() == {
        "detail": f"Invoice {invoice_id} was not charged: FakePay could not be reached. "
        "It is still PENDING; pay it again later"
    }
    assert status_of(client, invoice_id) == "PENDING"
    assert attempts(invoice_id) == [("FAILED", "FakePay could not be reached")]


@pytest.mark.parametrize("status", [500, 503, 404, 302])
def test_provider_answering_another_status_is_502(
    client: TestClient, stand_in: StandInProvider, status: int
) -> None:
    invoice_id = create_pending_invoice(client)
    stand_in.answer(status, b"<html>oops</html>")

    response = client.post(f"/invoice/pay/{invoice_id}", json=WORK_CARD)

    assert response.status_code == 502
    assert f"FakePay answered HTTP {status}" in response.json()["detail"]
    assert invoice_id in response.json()["detail"]
    assert status_of(client, invoice_id) == "PENDING"


def test_provider_200_with_garbage_body_is_paid(
    client: TestClient, stand_in: StandInProvider
) -> None:
    invoice_id = create_pending_invoice(client)
    stand_in.answer(200, b"\x00not json at all")

    response = client.post(f"/invoice/pay/{invoice_id}", json=WORK_CARD)

    assert response.status_code == 201
    assert response.json()["invoiceStatus"] == "PAID"


def test_provider_timeout_is_504_and_outcome_unknown(
    client: TestClient, use_provider: UseProvider
) -> None:
    invoice_id = create_pending_invoice(client)

    with silent_provider() as url:
        use_provider(url)
        response = client.post(f"/invoice/pay/{invoice_id}", json=WORK_CARD)

    assert response.status_code == 504
    (attempt,) = client.get(f"/invoice/{invoice_id}/payments").json()["items"]
    assert response.json() == {
        "detail": f"Payment for invoice {invoice_id} has an unknown outcome: FakePay did not "
        "reply within 2 s. The card may have been charged: do not pay it again. Check the "
        f"transaction {invoice_id} with the provider, then resolve attempt "
        f"{attempt['paymentId']} with POST /invoice/{invoice_id}/payments/"
        f"{attempt['paymentId']}/resolve"
    }
    assert status_of(client, invoice_id) == "PENDING"
    assert attempts(invoice_id) == [("UNKNOWN", "FakePay did not reply within 2 s")]


def test_provider_trickling_its_reply_is_cut_off_at_the_deadline_as_504(
    client: TestClient, stand_in: StandInProvider
) -> None:
    """Each byte arrives well inside the 2 s read timeout; only the 4 s deadline ends it."""
    invoice_id = create_pending_invoice(client)
    stand_in.answer(200, b" " * 200, trickle_s=0.08, trickle_head=True)

    started = time.monotonic()
    response = client.post(f"/invoice/pay/{invoice_id}", json=WORK_CARD)
    elapsed = time.monotonic() - started

    assert response.status_code == 504
    assert "FakePay did not finish its reply within 4 s" in response.json()["detail"]
    assert 4 <= elapsed < 5
    assert attempts(invoice_id) == [("UNKNOWN", "FakePay did not finish its reply within 4 s")]


def test_a_200_whose_body_trickles_past_the_deadline_is_paid(
    client: TestClient, stand_in: StandInProvider
) -> None:
    """The status line decides: FakePay said 200, whatever the body does afterwards."""
    invoice_id = create_pending_invoice(client)
    stand_in.answer(200, b" " * 200, trickle_s=0.08)

    response = client.post(f"/invoice/pay/{invoice_id}", json=WORK_CARD)

    assert response.status_code == 201
    assert attempts(invoice_id) == [("SUCCEEDED", None)]


def test_slow_reply_inside_the_timeout_is_paid(
    client: TestClient, stand_in: StandInProvider
) -> None:
    invoice_id = create_pending_invoice(client)
    stand_in.answer(200, {"message": "Payment processed successfully"}, delay_s=1.0)

    response = client.post(f"/invoice/pay/{invoice_id}", json=WORK_CARD)

    assert response.status_code == 201


@pytest.mark.parametrize(
    ("status", "body", "delay_s", "reply", "recorded"),
    [
        (400, b'{"reason": "Do not honour"}', 0.0, 402, ("DECLINED", "Do not honour")),
        (500, b"{}", 0.0, 502, ("FAILED", "FakePay answered HTTP 500")),
    ],
)
def test_failed_payment_can_be_paid_again_after_recovery_with_same_transaction_id(
    client: TestClient,
    stand_in: StandInProvider,
    status: int,
    body: bytes,
    delay_s: float,
    reply: int,
    recorded: tuple[str, str],
) -> None:
    invoice_id = create_pending_invoice(client)
    stand_in.answer(status, body, delay_s)
    assert client.post(f"/invoice/pay/{invoice_id}", json=WORK_CARD).status_code == reply
    assert status_of(client, invoice_id) == "PENDING"

    stand_in.answer(200, {"message": "Payment processed successfully"})
    response = client.post(f"/invoice/pay/{invoice_id}", json=WORK_CARD)

    assert response.status_code == 201
    assert [body["transactionId"] for body in stand_in.requests_for(invoice_id)] == [
        invoice_id,
        invoice_id,
    ]
    assert attempts(invoice_id) == [recorded, ("SUCCEEDED", None)]


def test_create_with_card_declined_is_402_naming_the_new_pending_invoice(
    client: TestClient, stand_in: StandInProvider
) -> None:
    stand_in.answer(400, {"error": "payment failed", "reason": "Card blocked"})
    body = {"jobDescription": "Audit", "amount": 50, "customerId": 4, "card": WORK_CARD}

    response = client.post("/invoice", json=body)

    assert response.status_code == 402
    (received,) = stand_in.received
    invoice_id = received["transactionId"]
    assert response.json() == {
        "detail": f"Payment for invoice {invoice_id} was declined by FakePay: Card blocked"
    }
    assert status_of(client, invoice_id) == "PENDING"


def test_200_with_an_undecodable_body_is_still_paid(
    client: TestClient, stand_in: StandInProvider
) -> None:
    """A 200 whose gzip body is broken made httpx raise DecodingError: a 500 that left the
    attempt PROCESSING although the provider had said paid."""
    invoice_id = create_pending_invoice(client)
    stand_in.answer(200, b"this is not gzip", headers={"Content-Encoding": "gzip"})

    response = client.post(f"/invoice/pay/{invoice_id}", json=WORK_CARD)

    assert response.status_code == 201
    assert response.json()["invoiceStatus"] == "PAID"
    assert attempts(invoice_id) == [("SUCCEEDED", None)]


def test_an_unexpected_error_in_the_charge_ends_the_attempt_unknown(
    client: TestClient, use_provider: UseProvider, fakepay: FakePayProcess
) -> None:
    """An exception nobody foresaw used to escape between claim and settle: a 500, and the
    attempt left PROCESSING, blocking the invoice."""
    from payments import FakePayClient, FakePayRequest

    class BrokenClient(FakePayClient):
        async def charge(self, request: FakePayRequest) -> Any:
            raise RuntimeError("a bug in the client")

    invoice_id = create_pending_invoice(client)
    use_provider(fakepay.url, BrokenClient)

    response = client.post(f"/invoice/pay/{invoice_id}", json=WORK_CARD)

    assert response.status_code == 504
    assert invoice_id in response.json()["detail"]
    assert attempts(invoice_id) == [("UNKNOWN", "unexpected error (RuntimeError)")]


def test_a_superseded_attempt_charged_late_is_refund_due_never_a_second_success(
    client: TestClient, stand_in: StandInProvider, use_provider: UseProvider
) -> None:
    """Attempt 1 stalls; attempt 2 supersedes it (the provider deduplicates) and pays; then
    attempt 1's charge lands."""
    use_provider(stand_in.url, provider_deduplicates=True)
    invoice_id = create_pending_invoice(client)
    stand_in.answer(200, PAID_REPLY, delay_s=1.5)
    first: dict[str, Any] = {}
    payer = threading.Thread(
        target=lambda: first.update(reply=client.post(f"/invoice/pay/{invoice_id}", json=WORK_CARD))
    )
    payer.start()
    while not stand_in.requests_for(invoice_id):
        time.sleep(0.05)
    age_attempts(invoice_id, hours=1)  # as if attempt 1 had stalled long ago

    second = client.post(f"/invoice/pay/{invoice_id}", json=WORK_CARD)
    payer.join()

    assert second.status_code == 201
    assert first["reply"].status_code == 409
    assert "REFUND_DUE" in first["reply"].json()["detail"]
    statuses = [status for status, _ in attempts(invoice_id)]
    assert statuses == ["REFUND_DUE", "SUCCEEDED"]
    listed = client.get("/invoices", params={"size": 100}).json()["items"]
    assert [item["id"] for item in listed].count(invoice_id) == 1
    assert client.get(f"/invoice/{invoice_id}").json()["invoiceStatus"] == "PAID"


def age_attempts(invoice_id: str, hours: int) -> None:
    with direct_engine.begin() as connection:
        connection.execute(
            text(
                "UPDATE payment SET created_at = created_at - INTERVAL :hours HOUR "
                "WHERE invoice_id = :invoice_id"
            ),
            {"hours": hours, "invoice_id": invoice_id},
        )


def test_paying_does_not_lock_the_customer(client: TestClient) -> None:
    """A claim used to lock the invoice's customer row as well, so every payment and new
    invoice of one customer queued behind each other."""
    invoice_id = create_pending_invoice(client)
    with direct_engine.connect() as connection, connection.begin():
        connection.execute(text("SELECT * FROM customer WHERE customer_id = 3 FOR UPDATE"))

        response = client.post(f"/invoice/pay/{invoice_id}", json=WORK_CARD)

    assert response.status_code == 201


def test_the_app_talks_to_the_database_in_utc(client: TestClient, app_engine: AsyncEngine) -> None:
    async def zone() -> Any:
        async with app_engine.connect() as connection:
            return (await connection.execute(text("SELECT @@session.time_zone"))).scalar_one()

    assert client.portal.call(zone) == "+00:00"  # type: ignore[union-attr]


class ImportWatch(MetaPathFinder):
    """Records every module the import system goes looking for, finding none itself."""

    def __init__(self) -> None:
        self.looked_up: list[str] = []

    def find_spec(self, fullname: str, path: Any, target: Any = None) -> ModuleSpec | None:
        self.looked_up.append(fullname)
        return None


def test_a_provider_call_looks_for_no_module(fakepay: FakePayProcess) -> None:
    """httpcore imports sniffio on every call and, with it missing, searches the path for it
    again each time (encode/httpcore#1103): a file system search per payment."""
    request = FakePayRequest(
        transaction_id=UNKNOWN_ID,
        card=FakePayCard(number=SecretStr("1234567812345678"), expiry="01-2040", name="J Doe"),
    )
    watch = ImportWatch()

    async def charge_twice() -> list[PaymentStatus]:
        provider = FakePayClient(Settings(fakepay_url=fakepay.url))
        try:
            first = await provider.charge(request)  # a first call may import lazily, once
            sys.meta_path.insert(0, watch)
            try:
                second = await provider.charge(request)
            finally:
                sys.meta_path.remove(watch)
        finally:
            await provider.aclose()
        return [first.status, second.status]

    assert asyncio.run(charge_twice()) == [PaymentStatus.SUCCEEDED] * 2
    assert watch.looked_up == []

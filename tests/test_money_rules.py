"""Money rules that a careless refactor of the pay, cancel and idempotency paths breaks.

Each test was checked by breaking its rule in the app and watching it fail. Black-box where
possible: HTTP in, the database and the provider's requests out.
"""

import threading
import uuid
from collections import Counter
from collections.abc import Iterator

import httpx
import pytest
from fastapi.testclient import TestClient
from sqlalchemy import text

from tests.stand_in import StandInProvider
from tests.support import (
    MASKED_WORK_CARD,
    PAID_REPLY,
    SUPERSEDED,
    WORK_CARD,
    FakePayProcess,
    OneSlotProvider,
    UseProvider,
    app_process,
    attempts,
    create_pending_invoice,
    direct_engine,
    insert_attempt,
    invoices_described,
    last_month,
    settings,
    superseded_attempt,
    wait_until,
)

DECLINED = (400, {"error": "payment failed", "reason": "Do not honour"})
OTHER_CARD = {"number": "4111 1111 1111 1111", "expiry": "12-2039", "name": "Other Card"}


def keyed(key: str) -> dict[str, str]:
    return {"Idempotency-Key": key}


def statuses(invoice_id: str) -> list[str]:
    return [status for status, _ in attempts(invoice_id)]


def invoice_status(http: TestClient | httpx.Client, invoice_id: str) -> str:
    response = http.get(f"/invoice/{invoice_id}")
    assert response.status_code == 200
    status: str = response.json()["invoiceStatus"]
    return status


@pytest.fixture
def patient_stand_in(use_provider: UseProvider) -> Iterator[StandInProvider]:
    """A stand-in the in-process app waits on for 30 s: a held call ends when the test says.
    It deduplicates transactionIds as far as the app knows, so an attempt whose outcome is
    unknown is replaced by the next pay instead of blocking it: the only way to a late charge
    of a replaced attempt."""
    with StandInProvider() as provider:
        use_provider(
            provider.url, fakepay_timeout=30, fakepay_deadline=30, provider_deduplicates=True
        )
        yield provider


# --- 1. a connection dropped after the request arrived: the outcome is unknown -------------


def test_provider_dropping_the_connection_after_the_request_is_504_unknown(
    client: TestClient, stand_in: StandInProvider
) -> None:
    invoice_id = create_pending_invoice(client)
    stand_in.drop_connections()

    response = client.post(f"/invoice/pay/{invoice_id}", json=WORK_CARD)

    assert response.status_code == 504
    data = response.json()
    assert data["detail"].startswith(f"Payment for invoice {invoice_id} has an unknown outcome")
    assert len(stand_in.requests_for(invoice_id)) == 1
    assert statuses(invoice_id) == ["UNKNOWN"]
    assert invoice_status(client, invoice_id) == "PENDING"


def test_cancel_refused_after_the_provider_dropped_the_connection(
    client: TestClient, stand_in: StandInProvider
) -> None:
    invoice_id = create_pending_invoice(client)
    stand_in.drop_connections()
    client.post(f"/invoice/pay/{invoice_id}", json=WORK_CARD)

    response = client.post(f"/invoice/cancel/{invoice_id}")

    assert response.status_code == 409
    data = response.json()
    assert "the card may have been charged" in data["detail"]
    assert invoice_status(client, invoice_id) == "PENDING"


# --- 2. cancel reads the newest attempt, not the oldest -------------------------------------


def test_cancel_refused_while_newest_attempt_unknown(
    client: TestClient, stand_in: StandInProvider
) -> None:
    invoice_id = create_pending_invoice(client)
    stand_in.answer(*DECLINED)
    assert client.post(f"/invoice/pay/{invoice_id}", json=WORK_CARD).status_code == 402
    insert_attempt(invoice_id, "UNKNOWN")
    assert statuses(invoice_id) == ["DECLINED", "UNKNOWN"]

    response = client.post(f"/invoice/cancel/{invoice_id}")

    assert response.status_code == 409
    data = response.json()
    assert "the card may have been charged" in data["detail"]
    assert invoice_status(client, invoice_id) == "PENDING"


def test_cancel_refused_while_newest_attempt_processing(
    client: TestClient, patient_stand_in: StandInProvider
) -> None:
    invoice_id = create_pending_invoice(client)
    patient_stand_in.answer(*DECLINED)
    assert client.post(f"/invoice/pay/{invoice_id}", json=WORK_CARD).status_code == 402
    gate = threading.Event()
    patient_stand_in.answer_next(200, PAID_REPLY, gate=gate)
    payer = threading.Thread(
        target=lambda: client.post(f"/invoice/pay/{invoice_id}", json=WORK_CARD)
    )
    payer.start()
    try:
        wait_until(lambda: len(patient_stand_in.requests_for(invoice_id)) == 2, "the second pay")
        assert statuses(invoice_id) == ["DECLINED", "PROCESSING"]

        response = client.post(f"/invoice/cancel/{invoice_id}")
    finally:
        gate.set()
        payer.join()

    assert response.status_code == 409
    data = response.json()
    assert "is in progress" in data["detail"]
    assert invoice_status(client, invoice_id) == "PAID"


# --- 3. a busy provider's 503 is not the stored reply of an Idempotency-Key ---------------


def test_retry_with_the_same_key_after_a_busy_provider_pays(
    client: TestClient, one_slot_provider: OneSlotProvider
) -> None:
    keyed_id, key = create_pending_invoice(client), f"busy-{uuid.uuid4()}"
    with one_slot_provider.busy():
        refused = client.post(f"/invoice/pay/{keyed_id}", json=WORK_CARD, headers=keyed(key))

    response = client.post(f"/invoice/pay/{keyed_id}", json=WORK_CARD, headers=keyed(key))
    provider = one_slot_provider.provider

    assert refused.status_code == 503
    assert refused.headers["retry-after"] == "1"
    assert response.status_code == 201
    assert "idempotent-replayed" not in response.headers
    data = response.json()
    assert data["invoiceStatus"] == "PAID"
    assert len(provider.requests_for(keyed_id)) == 1


# --- 4. the create fingerprint covers the card --------------------------------------------


def test_create_retried_with_another_card_under_the_same_key_is_422(
    client: TestClient, fakepay: FakePayProcess
) -> None:
    key, job = f"create-{uuid.uuid4()}", f"Card swap {uuid.uuid4()}"
    body = {"jobDescription": job, "amount": 12, "customerId": 2}
    first = client.post("/invoice", json={**body, "card": WORK_CARD}, headers=keyed(key))
    assert first.status_code == 201

    response = client.post("/invoice", json={**body, "card": OTHER_CARD}, headers=keyed(key))

    assert response.status_code == 422
    (error,) = response.json()["detail"]
    assert error["loc"] == ["header", "Idempotency-Key"]
    assert "already used for a different request" in error["msg"]
    assert invoices_described(job) == 1


def test_create_retried_with_a_card_added_under_the_same_key_is_422(client: TestClient) -> None:
    key, job = f"create-{uuid.uuid4()}", f"Card added {uuid.uuid4()}"
    body = {"jobDescription": job, "amount": 12, "customerId": 2}
    assert client.post("/invoice", json=body, headers=keyed(key)).status_code == 201

    response = client.post("/invoice", json={**body, "card": WORK_CARD}, headers=keyed(key))

    assert response.status_code == 422
    (error,) = response.json()["detail"]
    assert error["loc"] == ["header", "Idempotency-Key"]
    assert "already used for a different request" in error["msg"]


# --- 5. the deepest allowed page ----------------------------------------------------------


def test_the_deepest_allowed_page_answers_200(client: TestClient) -> None:
    assert settings.max_page_offset % 100 == 0
    page = settings.max_page_offset // 100 + 1  # (page - 1) * 100 == MAX_PAGE_OFFSET

    response = client.get("/invoices", params={"page": page, "size": 100})

    assert response.status_code == 200
    data = response.json()
    assert (data["page"], data["size"], data["items"]) == (page, 100, [])


def test_one_row_past_the_deepest_page_is_422(client: TestClient) -> None:
    page = settings.max_page_offset + 2  # (page - 1) * 1 == MAX_PAGE_OFFSET + 1

    response = client.get("/invoices", params={"page": page, "size": 1})

    assert response.status_code == 422
    (error,) = response.json()["detail"]
    assert error["loc"] == ["query", "page"]
    assert "GET /invoices/scroll" in error["msg"]


# --- 6. a late charge of a superseded attempt never pays the invoice ----------------------


def test_late_charge_after_a_declined_retry_leaves_the_invoice_pending(
    client: TestClient, patient_stand_in: StandInProvider
) -> None:
    invoice_id = create_pending_invoice(client)
    with superseded_attempt(client, patient_stand_in, invoice_id, late=(200, PAID_REPLY)):
        patient_stand_in.answer(*DECLINED)
        assert client.post(f"/invoice/pay/{invoice_id}", json=WORK_CARD).status_code == 402

    response = client.get(f"/invoice/{invoice_id}")

    assert response.status_code == 200
    data = response.json()
    assert data["invoiceStatus"] == "PENDING"
    assert "card" not in data


def test_late_charge_after_a_declined_retry_is_refund_due(
    client: TestClient, patient_stand_in: StandInProvider
) -> None:
    invoice_id = create_pending_invoice(client)
    with superseded_attempt(client, patient_stand_in, invoice_id, late=(200, PAID_REPLY)) as first:
        patient_stand_in.answer(*DECLINED)
        client.post(f"/invoice/pay/{invoice_id}", json=WORK_CARD)

    assert first.reply.status_code == 409
    data = first.reply.json()
    assert "REFUND_DUE" in data["detail"]
    assert statuses(invoice_id) == ["REFUND_DUE", "DECLINED"]


def test_late_charge_never_pays_a_cancelled_invoice(
    client: TestClient, patient_stand_in: StandInProvider
) -> None:
    invoice_id = create_pending_invoice(client)
    with superseded_attempt(client, patient_stand_in, invoice_id, late=(200, PAID_REPLY)):
        patient_stand_in.answer(*DECLINED)
        client.post(f"/invoice/pay/{invoice_id}", json=WORK_CARD)
        # the replaced attempt's outcome is unknown: an operator settles it before the cancel
        replaced = client.get(f"/invoice/{invoice_id}/payments").json()["items"][-1]
        resolve = f"/invoice/{invoice_id}/payments/{replaced['paymentId']}/resolve"
        assert client.post(resolve, json={"outcome": "FAILED"}).status_code == 200
        assert client.post(f"/invoice/cancel/{invoice_id}").status_code == 200

    response = client.get(f"/invoice/{invoice_id}")

    assert response.status_code == 200
    data = response.json()
    assert data["invoiceStatus"] == "CANCELLED"
    assert statuses(invoice_id) == ["REFUND_DUE", "DECLINED"]


# --- 7. a late decline or timeout of a superseded attempt is no refund ---------------------


def test_late_decline_of_a_superseded_attempt_is_not_refund_due(
    client: TestClient, patient_stand_in: StandInProvider
) -> None:
    invoice_id = create_pending_invoice(client)
    with superseded_attempt(client, patient_stand_in, invoice_id, late=DECLINED):
        patient_stand_in.answer(200, PAID_REPLY)
        assert client.post(f"/invoice/pay/{invoice_id}", json=WORK_CARD).status_code == 201

    assert statuses(invoice_id) == ["DECLINED", "SUCCEEDED"]  # what it was, once known
    assert invoice_status(client, invoice_id) == "PAID"


def test_late_timeout_of_a_superseded_attempt_is_not_refund_due(
    client: TestClient, stand_in: StandInProvider, use_provider: UseProvider
) -> None:
    """The app waits 2 s for the held call: the later pay has that long to supersede it."""
    use_provider(stand_in.url, provider_deduplicates=True)
    invoice_id = create_pending_invoice(client)
    with superseded_attempt(client, stand_in, invoice_id, late=None) as first:
        stand_in.answer(200, PAID_REPLY)
        assert client.post(f"/invoice/pay/{invoice_id}", json=WORK_CARD).status_code == 201

    assert first.reply.status_code == 504
    assert statuses(invoice_id) == [SUPERSEDED, "SUCCEEDED"]


# --- 8. a decline reason longer than the column --------------------------------------------


def test_a_decline_reason_longer_than_255_characters_is_stored_cut(
    client: TestClient, stand_in: StandInProvider
) -> None:
    invoice_id = create_pending_invoice(client)
    reason = "Do not honour: " + "issuer says no " * 30
    stand_in.answer(400, {"error": "payment failed", "reason": reason})

    response = client.post(f"/invoice/pay/{invoice_id}", json=WORK_CARD)

    assert response.status_code == 402
    data = response.json()
    assert data["detail"] == (
        f"Payment for invoice {invoice_id} was declined by FakePay: {reason[:255]}"
    )
    assert attempts(invoice_id) == [("DECLINED", reason[:255])]


# --- one charge per invoice: the claim race, made deterministic ---------------------------


@pytest.fixture(scope="module")
def patient_app(
    database: None, fakepay: FakePayProcess, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[str]:
    """The app over real HTTP, waiting up to 10 s on the database: a claim the test holds at a
    lock is not given up as a database outage."""
    log_path = tmp_path_factory.mktemp("patient") / "app.log"
    with app_process(log_path, env={"DB_READ_TIMEOUT": "10"}) as server:
        yield server.url


def lock_waits() -> int:
    """Transactions waiting on a lock. InnoDB refreshes this table only when it has not been
    read for 0.1 s: poll it less often than that."""
    with direct_engine.connect() as connection:
        query = text("SELECT COUNT(*) FROM information_schema.INNODB_TRX WHERE trx_state = :s")
        waiting: int = connection.execute(query, {"s": "LOCK WAIT"}).scalar_one()
    return waiting


def test_two_claims_held_at_the_attempt_insert_charge_once(
    patient_app: str, fakepay: FakePayProcess
) -> None:
    """A direct transaction locks the payment index range of the invoice, so a claim's insert
    of its attempt waits. Both pays are let go only once both wait on a lock: with the invoice
    row lock the second waits behind the first and then sees its attempt; without it both
    would insert one and both charge."""
    with httpx.Client(base_url=patient_app, timeout=30) as http:
        invoice_id = create_pending_invoice(http)
    replies: list[httpx.Response] = []

    def pay() -> None:
        with httpx.Client(base_url=patient_app, timeout=30) as http:
            replies.append(http.post(f"/invoice/pay/{invoice_id}", json=WORK_CARD))

    payers = [threading.Thread(target=pay) for _ in range(2)]
    with direct_engine.connect() as connection:
        blocker = connection.begin()
        connection.execute(
            text("SELECT id FROM payment WHERE invoice_id = :id FOR UPDATE"), {"id": invoice_id}
        )
        for payer in payers:
            payer.start()
        try:
            wait_until(lambda: lock_waits() == 2, "both claims to wait on a lock", every_s=0.2)
        finally:
            blocker.rollback()
            for payer in payers:
                payer.join()

    assert Counter(reply.status_code for reply in replies) == {201: 1, 409: 1}
    assert len(fakepay.requests_for(invoice_id)) == 1
    assert statuses(invoice_id) == ["SUCCEEDED"]


# --- second guards: a rule that only one other test caught ---------------------------------


def test_create_with_a_card_expired_last_month_is_422_and_creates_nothing(
    client: TestClient,
) -> None:
    job = f"Expired card {uuid.uuid4()}"
    card = {**WORK_CARD, "expiry": last_month()}

    response = client.post(
        "/invoice", json={"jobDescription": job, "amount": 5, "customerId": 1, "card": card}
    )

    assert response.status_code == 422
    (error,) = response.json()["detail"]
    assert error["loc"] == ["body", "card", "expiry"]
    assert error["msg"].startswith("card has expired")
    assert invoices_described(job) == 0


def test_a_declined_card_is_not_shown_on_the_invoice(
    client: TestClient, stand_in: StandInProvider
) -> None:
    invoice_id = create_pending_invoice(client)
    stand_in.answer(*DECLINED)
    client.post(f"/invoice/pay/{invoice_id}", json=OTHER_CARD)

    response = client.get(f"/invoice/{invoice_id}")

    assert response.status_code == 200
    data = response.json()
    assert data["invoiceStatus"] == "PENDING"
    assert "card" not in data


def test_an_invoice_paid_after_failed_attempts_is_listed_once_with_the_paid_card(
    client: TestClient,
) -> None:
    customer = client.post(
        "/customer",
        json={"customerName": "Retry Payer", "customerEmail": f"{uuid.uuid4()}@example.com"},
    ).json()["customerId"]
    invoice_id = create_pending_invoice(client, customerId=customer)
    for status in ("DECLINED", "FAILED"):
        insert_attempt(invoice_id, status)
    assert client.post(f"/invoice/pay/{invoice_id}", json=WORK_CARD).status_code == 201

    response = client.get("/invoices", params={"customerId": customer})

    assert response.status_code == 200
    data = response.json()
    assert data["total"] == 1
    assert [(item["id"], item["card"]) for item in data["items"]] == [
        (invoice_id, MASKED_WORK_CARD)
    ]

"""Idempotency-Key: a retried request gets the first reply again and runs nothing twice."""

import asyncio
import threading
import uuid
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient
from sqlalchemy.ext.asyncio import AsyncEngine
from sqlmodel import Session
from sqlmodel.ext.asyncio.session import AsyncSession

from db import make_engine
from idempotency import PAYMENT_STARTED, IdempotentRequest
from models import ErrorDetail, IdempotencyRecord
from scripts.processes import Running
from tests.stand_in import StandInProvider, refusing_provider_url
from tests.support import (
    J_DOE_CARD,
    PAID_REPLY,
    SEEDED_PENDING,
    WORK_CARD,
    FakePayProcess,
    OneSlotProvider,
    UseProvider,
    attempts,
    create_pending_invoice,
    direct_engine,
    invoices_described,
    paying_behind,
    serving_behind,
    settings,
    wait_until,
)
from tests.tcp_proxy import TcpProxy

HOUR = timedelta(hours=1)
ANY_INVOICE = {"jobDescription": "Keyed", "amount": 1, "customerId": 1}


def new_key() -> str:
    return f"test-{uuid.uuid4()}"


def keyed(key: str) -> dict[str, str]:
    return {"Idempotency-Key": key}


def stored_key(key: str) -> IdempotencyRecord | None:
    with Session(direct_engine) as session:
        return session.get(IdempotencyRecord, ("", key))


def stored_reply_status(key: str) -> int | None:
    record = stored_key(key)
    return None if record is None else record.response_status


def test_retried_create_gets_the_same_invoice_once(client: TestClient) -> None:
    key, job = new_key(), f"Once {uuid.uuid4()}"
    body = {"jobDescription": job, "amount": "10.00", "customerId": 2}

    first = client.post("/invoice", json=body, headers=keyed(key))
    retry = client.post("/invoice", json=body, headers=keyed(key))

    assert (first.status_code, retry.status_code) == (201, 201)
    assert retry.json() == first.json()
    assert retry.headers["idempotent-replayed"] == "true"
    assert "idempotent-replayed" not in first.headers
    assert invoices_described(job) == 1


def test_retried_create_with_card_charges_once(client: TestClient, fakepay: FakePayProcess) -> None:
    key = new_key()
    body = {"jobDescription": "Paid once", "amount": 20, "customerId": 1, "card": J_DOE_CARD}

    first = client.post("/invoice", json=body, headers=keyed(key))
    retry = client.post("/invoice", json=body, headers=keyed(key))

    assert first.status_code == retry.status_code == 201
    assert retry.json() == first.json()
    assert retry.json()["invoiceStatus"] == "PAID"
    assert len(fakepay.requests_for(first.json()["id"])) == 1


def test_retried_pay_charges_once(client: TestClient, fakepay: FakePayProcess) -> None:
    invoice_id, key = create_pending_invoice(client), new_key()

    first = client.post(f"/invoice/pay/{invoice_id}", json=WORK_CARD, headers=keyed(key))
    retry = client.post(f"/invoice/pay/{invoice_id}", json=WORK_CARD, headers=keyed(key))

    assert first.status_code == retry.status_code == 201
    assert retry.json() == first.json()
    assert retry.headers["idempotent-replayed"] == "true"
    assert len(fakepay.requests_for(invoice_id)) == 1


def test_a_quoted_key_is_the_same_key(client: TestClient) -> None:
    key, job = new_key(), f"Quoted {uuid.uuid4()}"
    body = {"jobDescription": job, "amount": 1, "customerId": 1}

    first = client.post("/invoice", json=body, headers=keyed(f'"{key}"'))
    retry = client.post("/invoice", json=body, headers=keyed(key))

    assert retry.json() == first.json()
    assert retry.headers["idempotent-replayed"] == "true"


def test_same_key_for_another_body_is_422_naming_the_header(client: TestClient) -> None:
    key = new_key()
    body = {"jobDescription": "First use", "amount": 1, "customerId": 1}
    client.post("/invoice", json=body, headers=keyed(key))

    response = client.post("/invoice", json={**body, "amount": 2}, headers=keyed(key))

    assert response.status_code == 422
    (error,) = response.json()["detail"]
    assert error["loc"] == ["header", "Idempotency-Key"]
    assert "already used for a different request" in error["msg"]


def test_same_key_on_another_endpoint_is_422(client: TestClient) -> None:
    key = new_key()
    invoice_id = create_pending_invoice(client)
    client.post(
        "/invoice", json={"jobDescription": "A", "amount": 1, "customerId": 1}, headers=keyed(key)
    )

    response = client.post(f"/invoice/pay/{invoice_id}", json=WORK_CARD, headers=keyed(key))

    assert response.status_code == 422
    assert attempts(invoice_id) == []


def test_another_card_under_the_same_key_is_another_request(client: TestClient) -> None:
    invoice_id, key = create_pending_invoice(client), new_key()
    client.post(f"/invoice/pay/{invoice_id}", json=WORK_CARD, headers=keyed(key))

    other_card = {**WORK_CARD, "number": "4111 1111 1111 1111"}
    response = client.post(f"/invoice/pay/{invoice_id}", json=other_card, headers=keyed(key))

    assert response.status_code == 422


@pytest.mark.parametrize("key", ["", "has space", "x" * 256, "tab\tkey", "caf\u00e9"])
def test_malformed_key_is_422_naming_the_header(client: TestClient, key: str) -> None:
    body = {"jobDescription": "Bad key", "amount": 1, "customerId": 1}
    raw = key.encode("latin-1")  # as sent on the wire: HTTP header values are bytes

    response = client.post("/invoice", json=body, headers={"Idempotency-Key": raw})

    assert response.status_code == 422
    assert response.json()["detail"][0]["loc"] == ["header", "Idempotency-Key"]


def test_a_key_may_be_255_characters(client: TestClient) -> None:
    body = {"jobDescription": "Long key", "amount": 1, "customerId": 1}

    response = client.post("/invoice", json=body, headers=keyed("k" * 254 + "!"))

    assert response.status_code == 201


def test_a_reply_that_changed_nothing_is_not_stored(client: TestClient) -> None:
    key = new_key()
    body = {"jobDescription": "Unknown customer", "amount": 1, "customerId": 999_999}

    missing = client.post("/invoice", json=body, headers=keyed(key))
    created = client.post("/invoice", json={**body, "customerId": 1}, headers=keyed(key))

    assert missing.status_code == 404
    assert created.status_code == 201
    assert "idempotent-replayed" not in created.headers


def test_unreachable_provider_leaves_the_key_free_to_retry(
    client: TestClient, use_provider: UseProvider
) -> None:
    invoice_id, key = create_pending_invoice(client), new_key()
    use_provider(refusing_provider_url())
    refused = client.post(f"/invoice/pay/{invoice_id}", json=WORK_CARD, headers=keyed(key))

    with StandInProvider() as provider:
        use_provider(provider.url)
        paid = client.post(f"/invoice/pay/{invoice_id}", json=WORK_CARD, headers=keyed(key))

    assert refused.status_code == 502
    assert stored_key(key) is not None  # written by the successful retry, not the 502
    assert paid.status_code == 201
    assert "idempotent-replayed" not in paid.headers
    assert len(provider.requests_for(invoice_id)) == 1


def test_a_decline_was_sent_so_it_is_stored_and_replayed(
    client: TestClient, stand_in: StandInProvider
) -> None:
    invoice_id, key = create_pending_invoice(client), new_key()
    stand_in.answer(400, {"error": "payment failed", "reason": "Do not honour"})

    first = client.post(f"/invoice/pay/{invoice_id}", json=WORK_CARD, headers=keyed(key))
    stand_in.answer(200, PAID_REPLY)
    retry = client.post(f"/invoice/pay/{invoice_id}", json=WORK_CARD, headers=keyed(key))

    assert first.status_code == retry.status_code == 402
    assert retry.json() == first.json()
    assert retry.headers["idempotent-replayed"] == "true"
    assert len(stand_in.requests_for(invoice_id)) == 1


def test_the_same_key_while_the_first_runs_is_409_with_retry_after(
    client: TestClient, stand_in: StandInProvider
) -> None:
    invoice_id, key = create_pending_invoice(client), new_key()
    stand_in.answer(200, PAID_REPLY, delay_s=1.5)
    first: dict[str, httpx.Response] = {}
    payer = threading.Thread(
        target=lambda: first.update(
            reply=client.post(f"/invoice/pay/{invoice_id}", json=WORK_CARD, headers=keyed(key))
        )
    )
    payer.start()
    while not stand_in.requests_for(invoice_id):  # the first request has claimed and sent
        threading.Event().wait(0.05)

    second = client.post(f"/invoice/pay/{invoice_id}", json=WORK_CARD, headers=keyed(key))
    payer.join()

    assert second.status_code == 409
    assert second.headers["retry-after"] == "1"
    assert "still running" in second.json()["detail"]
    assert first["reply"].status_code == 201
    assert len(stand_in.requests_for(invoice_id)) == 1


def test_concurrent_burst_with_one_key_creates_one_invoice_and_one_charge(
    live_server: Running, fakepay: FakePayProcess
) -> None:
    key, job = new_key(), f"Burst {uuid.uuid4()}"
    body = {"jobDescription": job, "amount": "33.00", "customerId": 2, "card": J_DOE_CARD}
    barrier = threading.Barrier(8)

    def send(_: int) -> httpx.Response:
        with httpx.Client(base_url=live_server.url, timeout=30) as http:
            barrier.wait()
            return http.post("/invoice", json=body, headers=keyed(key))

    with ThreadPoolExecutor(max_workers=8) as pool:
        replies = list(pool.map(send, range(8)))

    assert invoices_described(job) == 1
    codes = Counter(reply.status_code for reply in replies)
    assert set(codes) <= {201, 409}
    assert codes[201] >= 1
    paid = [reply.json() for reply in replies if reply.status_code == 201]
    assert all(reply == paid[0] for reply in paid)
    assert len(fakepay.requests_for(paid[0]["id"])) == 1


def insert_key(key: str, **columns: Any) -> None:
    columns = {"fingerprint": "0" * 64, "invoice_id": SEEDED_PENDING, **columns}
    with Session(direct_engine) as session:
        session.add(IdempotencyRecord(idempotency_key=key, **columns))
        session.commit()


def utc_now() -> datetime:
    return datetime.now(UTC).replace(tzinfo=None)


def test_an_expired_key_is_forgotten(client: TestClient) -> None:
    key = new_key()
    insert_key(key, response_status=201, response_body="{}", expires_at=utc_now())
    body = {"jobDescription": "After expiry", "amount": 1, "customerId": 1}

    response = client.post("/invoice", json=body, headers=keyed(key))

    assert response.status_code == 201
    assert "idempotent-replayed" not in response.headers


def test_expired_keys_are_purged(client: TestClient, app_engine: AsyncEngine) -> None:
    from sqlmodel.ext.asyncio.session import AsyncSession

    from idempotency import purge_expired_keys

    expired, kept = new_key(), new_key()
    insert_key(expired, response_status=201, response_body="{}", expires_at=utc_now())
    insert_key(
        kept, response_status=201, response_body="{}", expires_at=utc_now() + timedelta(hours=1)
    )

    async def purge() -> int:
        async with AsyncSession(app_engine) as session:
            return await purge_expired_keys(session)

    assert client.portal.call(purge) >= 1  # type: ignore[union-attr]
    assert stored_key(expired) is None
    assert stored_key(kept) is not None


def test_keys_are_kept_for_the_configured_ttl(client: TestClient) -> None:
    key = new_key()
    client.post(
        "/invoice", json={"jobDescription": "TTL", "amount": 1, "customerId": 1}, headers=keyed(key)
    )

    record = stored_key(key)

    assert record is not None
    assert timedelta(hours=23, minutes=59) < record.expires_at - utc_now() <= timedelta(hours=24)


def test_a_first_request_that_never_finished_is_409_naming_its_invoice(
    client: TestClient,
) -> None:
    from idempotency import fingerprint
    from models import InvoiceCreate

    key = new_key()
    body = {"jobDescription": "Unfinished", "amount": 1, "customerId": 1}
    insert_key(
        key,
        fingerprint=fingerprint("POST", "/invoice", InvoiceCreate.model_validate(body)),
        created_at=utc_now() - timedelta(hours=1),
        expires_at=utc_now() + timedelta(hours=1),
    )

    response = client.post("/invoice", json=body, headers=keyed(key))

    assert response.status_code == 409
    assert f"GET /invoice/{SEEDED_PENDING}" in response.json()["detail"]


def test_a_create_whose_payment_was_refused_busy_is_resumed_by_its_retry(
    client: TestClient, one_slot_provider: OneSlotProvider
) -> None:
    """The first request created the invoice, then found the provider busy (503, Retry-After):
    the retry with the same key pays that invoice; it neither replays the 503 nor creates a
    second invoice."""
    key = new_key()
    body = {"jobDescription": "Resumed", "amount": 12, "customerId": 2, "card": J_DOE_CARD}
    with one_slot_provider.busy():
        refused = client.post("/invoice", json=body, headers={"Idempotency-Key": key})
    retried = client.post("/invoice", json=body, headers={"Idempotency-Key": key})
    replayed = client.post("/invoice", json=body, headers={"Idempotency-Key": key})
    provider = one_slot_provider.provider

    assert refused.status_code == 503
    assert refused.headers["retry-after"] == "1"
    created_id = refused.json()["detail"].split()[1]
    assert retried.status_code == 201, retried.text
    assert retried.json()["id"] == created_id
    assert retried.json()["invoiceStatus"] == "PAID"
    assert replayed.headers["idempotent-replayed"] == "true"
    assert replayed.json() == retried.json()
    assert len(provider.requests_for(created_id)) == 1
    assert invoices_described("Resumed") == 1


# --- the reply is stored with the change it reports -----------------------------------------

# The key row's INSERT, and then the COMMIT of the same transaction: the change's own commit.
KEY_ROW = b"INSERT INTO idempotency_key"


def test_a_create_whose_commit_went_unacknowledged_replays_its_invoice(
    database_proxy: TcpProxy, fakepay: FakePayProcess, tmp_path: Path
) -> None:
    """The create's COMMIT reached the server, its OK did not reach the app (503): the reply
    was stored in that transaction, so the retry gets the invoice, and creates no other."""
    job = f"Unacked {uuid.uuid4()}"
    key, body = new_key(), {**ANY_INVOICE, "jobDescription": job}
    with serving_behind(database_proxy, tmp_path / "app.log", fakepay.url) as http:
        database_proxy.drop_reply_to(b"COMMIT", after=KEY_ROW)
        lost = http.post("/invoice", json=body, headers=keyed(key))
        retried = http.post("/invoice", json=body, headers=keyed(key))

    assert lost.status_code == 503
    assert retried.status_code == 201, retried.text
    assert retried.headers["idempotent-replayed"] == "true"
    assert retried.json()["invoiceStatus"] == "PENDING"
    assert invoices_described(job) == 1


def test_a_create_with_card_whose_commit_went_unacknowledged_is_resumed_and_charged_once(
    database_proxy: TcpProxy, fakepay: FakePayProcess, tmp_path: Path
) -> None:
    """The invoice's COMMIT went through unacknowledged, so no payment started: the key row,
    written in that transaction, says where to resume, and the retry pays that invoice."""
    job = f"Unacked card {uuid.uuid4()}"
    key, body = new_key(), {**ANY_INVOICE, "jobDescription": job, "card": WORK_CARD}
    with serving_behind(database_proxy, tmp_path / "app.log", fakepay.url) as http:
        database_proxy.drop_reply_to(b"COMMIT", after=KEY_ROW)
        lost = http.post("/invoice", json=body, headers=keyed(key))
        retried = http.post("/invoice", json=body, headers=keyed(key))

    assert lost.status_code == 503
    assert retried.status_code == 201, retried.text
    assert retried.json()["invoiceStatus"] == "PAID"
    assert invoices_described(job) == 1
    assert len(fakepay.requests_for(retried.json()["id"])) == 1


def test_a_cancel_whose_commit_went_unacknowledged_replays_cancelled(
    database_proxy: TcpProxy, fakepay: FakePayProcess, tmp_path: Path
) -> None:
    key = new_key()
    with serving_behind(database_proxy, tmp_path / "app.log", fakepay.url) as http:
        invoice_id = create_pending_invoice(http)
        database_proxy.drop_reply_to(b"COMMIT", after=KEY_ROW)
        lost = http.post(f"/invoice/cancel/{invoice_id}", headers=keyed(key))
        retried = http.post(f"/invoice/cancel/{invoice_id}", headers=keyed(key))

    assert lost.status_code == 503
    assert retried.status_code == 200, retried.text
    assert retried.headers["idempotent-replayed"] == "true"
    assert retried.json()["invoiceStatus"] == "CANCELLED"


def test_an_outcome_recorded_after_its_request_is_the_reply_its_key_replays(
    database_proxy: TcpProxy, tmp_path: Path
) -> None:
    """FakePay charged while the database was away past the request's retries (503): the
    process records the outcome later, and with it the reply, which the retry gets."""
    key = new_key()
    with paying_behind(database_proxy, tmp_path / "app.log", headers=keyed(key)) as pay:
        database_proxy.cut()
        pay.answer()
        charged = pay.reply
        database_proxy.start()
        pay_path = f"/invoice/pay/{pay.invoice_id}"
        wait_until(lambda: stored_reply_status(key) == 201, "the stored reply", 40, 0.2)
        retried = pay.http.post(pay_path, json=WORK_CARD, headers=keyed(key))

    assert charged.status_code == 503
    assert retried.status_code == 201, retried.text
    assert retried.headers["idempotent-replayed"] == "true"
    assert retried.json()["invoiceStatus"] == "PAID"
    assert len(pay.provider.requests_for(pay.invoice_id)) == 1


def test_a_pay_whose_claim_went_unacknowledged_is_paid_by_its_retry(
    database_proxy: TcpProxy, fakepay: FakePayProcess, tmp_path: Path
) -> None:
    """The claim's COMMIT reached the server, its OK did not (503, nothing sent): the process
    ends that attempt FAILED once the database answers, and frees the key, so the retry the
    client was told to make pays, once."""
    key = new_key()
    with serving_behind(database_proxy, tmp_path / "app.log", fakepay.url) as http:
        invoice_id = create_pending_invoice(http)
        pay = f"/invoice/pay/{invoice_id}"
        database_proxy.drop_reply_to(b"COMMIT", after=KEY_ROW)
        lost = http.post(pay, json=WORK_CARD, headers=keyed(key))
        wait_until(lambda: stored_key(key) is None, "the unconfirmed claim to end", 20, 0.2)
        retried = http.post(pay, json=WORK_CARD, headers=keyed(key))

    assert lost.status_code == 503
    assert "was not charged" in lost.json()["detail"]
    assert retried.status_code == 201, retried.text
    assert retried.json()["invoiceStatus"] == "PAID"
    assert [status for status, _ in attempts(invoice_id)] == ["FAILED", "SUCCEEDED"]
    assert len(fakepay.requests_for(invoice_id)) == 1


@pytest.mark.parametrize("sent", [True, False], ids=["reply", "rewind"])
def test_a_late_outcome_leaves_a_later_requests_key_row_alone(database: None, sent: bool) -> None:
    """An outcome recorded late (a settle retried after a lost acknowledgement, or the
    background recorder) for attempt 1, after a later request with the same key took the row
    for attempt 2: the row stays attempt 2's, to be answered by its own outcome."""
    key = new_key()
    insert_key(key, recovery_point=PAYMENT_STARTED, payment_id=2, expires_at=utc_now() + HOUR)

    async def record_late_outcome() -> None:
        engine = make_engine(settings)
        try:
            async with AsyncSession(engine) as session, session.begin():
                late = IdempotentRequest(key=key)
                await late.record_final(
                    session, 1, ErrorDetail(detail="late"), status_code=201, sent=sent
                )
        finally:
            await engine.dispose()

    asyncio.run(record_late_outcome())

    record = stored_key(key)
    assert record is not None
    assert (record.recovery_point, record.payment_id, record.response_status) == (
        PAYMENT_STARTED,
        2,
        None,
    )

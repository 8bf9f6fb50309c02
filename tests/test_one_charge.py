"""One charge per invoice, held by the data: the database refuses a second open or successful
attempt, an outcome the provider gave is never dropped or misfiled, and an unknown outcome
waits for an operator instead of being charged again."""

import contextlib
import os
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient
from sqlalchemy import text
from sqlalchemy.exc import IntegrityError

from payments import sweep_stalled
from tests.stand_in import StandInProvider
from tests.support import (
    PAID_REPLY,
    WORK_CARD,
    app_process,
    attempts,
    create_pending_invoice,
    direct_engine,
    insert_attempt,
    invoices_described,
    make_attempts_stale,
    paying_behind,
    wait_until,
)
from tests.tcp_proxy import TcpProxy


def statuses(invoice_id: str) -> list[str]:
    return [status for status, _ in attempts(invoice_id)]


def history(client: TestClient | httpx.Client, invoice_id: str) -> list[dict[str, object]]:
    response = client.get(f"/invoice/{invoice_id}/payments")
    assert response.status_code == 200
    items: list[dict[str, object]] = response.json()["items"]
    return items


def resolve_path(invoice_id: str, payment_id: object) -> str:
    return f"/invoice/{invoice_id}/payments/{payment_id}/resolve"


# --- the schema refuses a second charge ---------------------------------------------------


@pytest.mark.parametrize(
    ("first", "second"),
    [("PROCESSING", "PROCESSING"), ("UNKNOWN", "PROCESSING"), ("SUCCEEDED", "SUCCEEDED")],
)
def test_the_database_refuses_a_second_open_or_successful_attempt(
    client: TestClient, first: str, second: str
) -> None:
    invoice_id = create_pending_invoice(client)
    insert_attempt(invoice_id, first)

    with pytest.raises(IntegrityError, match="Duplicate entry"):
        insert_attempt(invoice_id, second)

    assert statuses(invoice_id) == [first]


# --- outcomes are never misfiled or lost ---------------------------------------------------


def test_a_lost_commit_acknowledgement_still_answers_paid(
    database_proxy: TcpProxy, tmp_path: Path
) -> None:
    """Settle's COMMIT reaches the server, its OK never reaches the app: the retry finds its
    own attempt SUCCEEDED, which is a success, not a charge to refund."""
    with paying_behind(database_proxy, tmp_path / "app.log") as pay:
        database_proxy.drop_reply_to(b"COMMIT")  # the next COMMIT is settle's
        pay.answer()
        paid = pay.reply
        read = pay.http.get(f"/invoice/{pay.invoice_id}")

    assert paid.status_code == 201, paid.text
    assert paid.json()["invoiceStatus"] == "PAID"
    assert statuses(pay.invoice_id) == ["SUCCEEDED"]
    assert read.json()["invoiceStatus"] == "PAID"
    assert len(pay.provider.requests_for(pay.invoice_id)) == 1


def test_an_outcome_is_recorded_however_long_the_database_is_away(
    database_proxy: TcpProxy, tmp_path: Path
) -> None:
    """FakePay charges while the database stays away past the request's retries: the client
    hears the card was charged, and the process records it once the database is back."""
    with paying_behind(database_proxy, tmp_path / "app.log") as pay:
        database_proxy.cut()
        pay.answer()
        charged = pay.reply
        assert statuses(pay.invoice_id) == ["PROCESSING"]  # nothing recorded yet
        database_proxy.start()
        wait_until(lambda: statuses(pay.invoice_id) == ["SUCCEEDED"], "the outcome", 40, 0.2)
        again = pay.http.post(f"/invoice/pay/{pay.invoice_id}", json=WORK_CARD)
        read = pay.http.get(f"/invoice/{pay.invoice_id}")

    assert charged.status_code == 503
    assert "the card was charged" in charged.json()["detail"]
    assert "Do not pay it again" in charged.json()["detail"]
    assert read.json()["invoiceStatus"] == "PAID"
    assert again.status_code == 409
    assert len(pay.provider.requests_for(pay.invoice_id)) == 1
    assert "not recorded yet" in (tmp_path / "app.log").read_text()


# --- an unknown outcome waits for an operator ----------------------------------------------


def test_cancel_is_refused_while_an_older_attempt_is_unknown(client: TestClient) -> None:
    invoice_id = create_pending_invoice(client)
    insert_attempt(invoice_id, "UNKNOWN")
    insert_attempt(invoice_id, "FAILED")  # a later attempt that sent nothing

    response = client.post(f"/invoice/cancel/{invoice_id}")

    assert response.status_code == 409
    assert "has an unknown outcome" in response.json()["detail"]
    assert "/resolve" in response.json()["detail"]


def test_cancel_of_a_stalled_attempt_says_the_outcome_is_unknown(client: TestClient) -> None:
    """A crash left the attempt PROCESSING an hour ago: it may have been charged, and waiting
    a few seconds will not change that."""
    invoice_id = create_pending_invoice(client)
    insert_attempt(invoice_id, "PROCESSING", age_s=3600)

    response = client.post(f"/invoice/cancel/{invoice_id}")

    assert response.status_code == 409
    assert "has an unknown outcome" in response.json()["detail"]
    assert "in progress" not in response.json()["detail"]


def test_a_stalled_attempt_is_never_charged_again(
    client: TestClient, stand_in: StandInProvider
) -> None:
    invoice_id = create_pending_invoice(client)
    insert_attempt(invoice_id, "PROCESSING", age_s=3600)

    response = client.post(f"/invoice/pay/{invoice_id}", json=WORK_CARD)

    assert response.status_code == 409
    assert "has an unknown outcome" in response.json()["detail"]
    assert stand_in.requests_for(invoice_id) == []
    assert statuses(invoice_id) == ["PROCESSING"]


def test_the_sweep_turns_a_stalled_attempt_unknown(client: TestClient) -> None:
    stalled, live = create_pending_invoice(client), create_pending_invoice(client)
    insert_attempt(stalled, "PROCESSING", age_s=3600)
    insert_attempt(live, "PROCESSING", age_s=0)  # a request still under way: left as it is

    with direct_engine.begin() as connection:
        connection.execute(sweep_stalled(600))
        connection.execute(sweep_stalled(600))  # a second process sweeping: harmless

    assert (statuses(stalled), statuses(live)) == (["UNKNOWN"], ["PROCESSING"])


def test_a_crash_mid_charge_leaves_the_invoice_waiting_for_an_operator(
    database: None, tmp_path: Path
) -> None:
    """SIGKILL while the provider holds the charge: the attempt stays open, and once past the
    stale margin nothing charges the invoice again until it is resolved."""
    with StandInProvider() as provider:
        gate = threading.Event()
        provider.answer_next(200, PAID_REPLY, gate=gate)
        env = {"FAKEPAY_URL": provider.url}
        with app_process(tmp_path / "first.log", env=env) as server:
            with httpx.Client(base_url=server.url, timeout=30) as http:
                invoice_id = create_pending_invoice(http)
            pay_url = f"{server.url}/invoice/pay/{invoice_id}"
            payer = threading.Thread(target=lambda: _post_ignoring_errors(pay_url))
            payer.start()
            wait_until(lambda: provider.requests_for(invoice_id), "the charge to arrive")
            os.kill(server.process.pid, signal.SIGKILL)
            payer.join()
        gate.set()
        make_attempts_stale(invoice_id)  # as if the stale margin had passed
        with (
            app_process(tmp_path / "second.log", env=env) as server,
            httpx.Client(base_url=server.url, timeout=30) as http,
        ):
            paid = http.post(f"/invoice/pay/{invoice_id}", json=WORK_CARD)
            cancelled = http.post(f"/invoice/cancel/{invoice_id}")

    assert (paid.status_code, cancelled.status_code) == (409, 409)
    assert "has an unknown outcome" in paid.json()["detail"]
    assert len(provider.requests_for(invoice_id)) == 1


def _post_ignoring_errors(url: str) -> None:
    with contextlib.suppress(httpx.HTTPError):  # the server is killed under it
        httpx.post(url, json=WORK_CARD, timeout=30)


def test_an_unknown_outcome_blocks_paying_again_until_resolved(client: TestClient) -> None:
    invoice_id = create_pending_invoice(client)
    insert_attempt(invoice_id, "UNKNOWN")
    (unknown,) = history(client, invoice_id)

    refused = client.post(f"/invoice/pay/{invoice_id}", json=WORK_CARD)
    resolved = client.post(
        resolve_path(invoice_id, unknown["paymentId"]), json={"outcome": "FAILED"}
    )
    paid = client.post(f"/invoice/pay/{invoice_id}", json=WORK_CARD)

    assert refused.status_code == 409
    assert resolve_path(invoice_id, unknown["paymentId"]) in refused.json()["detail"]
    assert resolved.status_code == 200
    assert resolved.json()["invoiceStatus"] == "PENDING"
    assert paid.status_code == 201
    assert statuses(invoice_id) == ["FAILED", "SUCCEEDED"]


def test_resolving_succeeded_pays_the_invoice_and_counts_it(client: TestClient) -> None:
    invoice_id = create_pending_invoice(client)
    insert_attempt(invoice_id, "UNKNOWN")
    (unknown,) = history(client, invoice_id)
    paid_before = client.get("/invoices", params={"invoiceStatus": "PAID"}).json()["total"]

    response = client.post(
        resolve_path(invoice_id, unknown["paymentId"]), json={"outcome": "SUCCEEDED"}
    )

    assert response.status_code == 200
    data = response.json()
    assert data["invoiceStatus"] == "PAID"
    assert data["card"]["number"] == "123456********5678"
    paid_after = client.get("/invoices", params={"invoiceStatus": "PAID"}).json()["total"]
    assert paid_after == paid_before + 1


def test_the_history_shows_who_resolved_an_attempt_and_when(client: TestClient) -> None:
    invoice_id = create_pending_invoice(client)
    insert_attempt(invoice_id, "UNKNOWN")
    (unknown,) = history(client, invoice_id)
    assert (unknown["resolvedBy"], unknown["resolvedAt"]) == (None, None)

    client.post(resolve_path(invoice_id, unknown["paymentId"]), json={"outcome": "FAILED"})

    (resolved,) = history(client, invoice_id)
    assert resolved["status"] == "FAILED"
    assert resolved["resolvedBy"] == "AUTH=off"
    assert isinstance(resolved["resolvedAt"], str)


def test_only_an_unknown_attempt_can_be_resolved(client: TestClient) -> None:
    invoice_id = create_pending_invoice(client)
    insert_attempt(invoice_id, "DECLINED")
    (declined,) = history(client, invoice_id)

    response = client.post(
        resolve_path(invoice_id, declined["paymentId"]), json={"outcome": "FAILED"}
    )
    missing = client.post(resolve_path(invoice_id, 2_000_000_000), json={"outcome": "FAILED"})

    assert response.status_code == 409
    assert "only an UNKNOWN outcome can be resolved" in response.json()["detail"]
    assert missing.status_code == 404


def test_payments_lists_the_attempts_an_operator_must_resolve(client: TestClient) -> None:
    invoice_id = create_pending_invoice(client)
    insert_attempt(invoice_id, "UNKNOWN")

    response = client.get("/payments", params={"status": "UNKNOWN", "size": 100})

    assert response.status_code == 200
    data = response.json()
    assert {item["status"] for item in data["items"]} == {"UNKNOWN"}
    assert invoice_id in [item["invoiceId"] for item in data["items"]]
    assert data["total"] >= 1


# --- a lost race is a conflict, not an outage ----------------------------------------------


def test_a_pay_that_waits_too_long_for_the_invoice_lock_is_a_409(
    client: TestClient, stand_in: StandInProvider
) -> None:
    invoice_id = create_pending_invoice(client)
    with direct_engine.connect() as holder:
        holder.execute(text("SELECT id FROM invoice WHERE id = :id FOR UPDATE"), {"id": invoice_id})
        started = time.monotonic()
        response = client.post(f"/invoice/pay/{invoice_id}", json=WORK_CARD)
        elapsed = time.monotonic() - started
        holder.rollback()

    assert response.status_code == 409
    assert "lost a race" in response.json()["detail"]
    assert "Retry-After" not in response.headers
    assert stand_in.requests_for(invoice_id) == []
    assert elapsed < 10


@contextlib.contextmanager
def counts_locked_for(seconds: float) -> Iterator[None]:
    """Every row of the per-status counts locked by another transaction for `seconds` (longer
    than one lock wait, shorter than two): the first try of a change that counts loses."""
    with direct_engine.connect() as holder:
        holder.execute(text("SELECT * FROM invoice_status_count FOR UPDATE"))
        release = threading.Timer(seconds, holder.rollback)
        release.start()
        try:
            yield
        finally:
            release.join()


def test_a_create_that_loses_one_race_is_run_again_and_succeeds(client: TestClient) -> None:
    job = f"retried create {time.monotonic_ns()}"
    with counts_locked_for(1.5):
        response = client.post(
            "/invoice", json={"jobDescription": job, "amount": 5, "customerId": 1}
        )

    assert response.status_code == 201, response.text
    assert invoices_described(job) == 1


def test_a_cancel_that_loses_one_race_is_run_again_and_succeeds(client: TestClient) -> None:
    invoice_id = create_pending_invoice(client)
    with counts_locked_for(1.5):
        response = client.post(f"/invoice/cancel/{invoice_id}")

    assert response.status_code == 200, response.text
    assert response.json()["invoiceStatus"] == "CANCELLED"

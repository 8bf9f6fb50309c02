"""What happens when things go wrong, over real HTTP against live uvicorn processes."""

import threading
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from sqlmodel import Session, text

from models import PaymentStatus
from tests.stand_in import StandInProvider, silent_provider
from tests.support import (
    PAID_REPLY,
    WORK_CARD,
    FakePayProcess,
    app_process,
    attempts,
    create_pending_invoice,
    direct_engine,
    insert_attempt,
    paying_behind,
    settings,
    wait_until,
)
from tests.tcp_proxy import TcpProxy


def fire_together(count: int, request: "RequestFn") -> list[httpx.Response]:
    """`count` requests released at the same instant from their own threads."""
    barrier = threading.Barrier(count)

    def go(_: int) -> httpx.Response:
        barrier.wait()
        return request()

    with ThreadPoolExecutor(max_workers=count) as pool:
        return list(pool.map(go, range(count)))


class RequestFn:
    def __init__(self, url: str, path: str, body: object) -> None:
        self.url, self.path, self.body = url, path, body

    def __call__(self) -> httpx.Response:
        with httpx.Client(base_url=self.url, timeout=30) as http:
            return http.post(self.path, json=self.body)


@pytest.fixture(scope="module")
def two_workers(
    database: None, fakepay: FakePayProcess, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[str]:
    with app_process(tmp_path_factory.mktemp("workers") / "app.log", workers=2) as server:
        with httpx.Client(base_url=server.url, timeout=10) as http:
            deadline = time.monotonic() + 15
            while http.get("/health-check").status_code != 200:  # both workers up
                assert time.monotonic() < deadline
                time.sleep(0.2)
        yield server.url


@pytest.mark.parametrize("round_number", range(3))
def test_concurrent_pays_of_one_invoice_charge_once(
    two_workers: str, fakepay: FakePayProcess, round_number: int
) -> None:
    with httpx.Client(base_url=two_workers, timeout=10) as http:
        invoice_id = create_pending_invoice(http)

    responses = fire_together(20, RequestFn(two_workers, f"/invoice/pay/{invoice_id}", WORK_CARD))

    assert Counter(response.status_code for response in responses) == {201: 1, 409: 19}
    assert len(fakepay.requests_for(invoice_id)) == 1
    conflicts = {r.json()["detail"] for r in responses if r.status_code == 409}
    assert conflicts <= {
        f"Invoice {invoice_id} is PAID; only PENDING invoices can be paid",
        f"A payment for invoice {invoice_id} is in progress; read the invoice again in a few "
        "seconds before paying or cancelling it",
    }


def attempt_statuses(invoice_id: str) -> list[str]:
    return [status for status, _ in attempts(invoice_id)]


def test_attempt_in_flight_blocks_another_pay_with_409(
    http: httpx.Client, fakepay: FakePayProcess
) -> None:
    invoice_id = create_pending_invoice(http)
    insert_attempt(invoice_id, age_s=1)

    response = http.post(f"/invoice/pay/{invoice_id}", json=WORK_CARD)

    assert response.status_code == 409
    assert "is in progress" in response.json()["detail"]
    assert fakepay.requests_for(invoice_id) == []


def test_a_stalled_attempt_waits_for_an_operator_then_the_invoice_is_paid(
    http: httpx.Client, fakepay: FakePayProcess
) -> None:
    """The request that made the attempt is long gone and it may have charged the card:
    nothing charges the invoice again until an operator, having checked with the provider,
    resolves it."""
    invoice_id = create_pending_invoice(http)
    insert_attempt(invoice_id, age_s=3600)
    refused = http.post(f"/invoice/pay/{invoice_id}", json=WORK_CARD)
    (stalled,) = http.get(f"/invoice/{invoice_id}/payments").json()["items"]

    resolved = http.post(
        f"/invoice/{invoice_id}/payments/{stalled['paymentId']}/resolve",
        json={"outcome": "FAILED"},
    )
    paid = http.post(f"/invoice/pay/{invoice_id}", json=WORK_CARD)

    assert refused.status_code == 409
    assert "has an unknown outcome" in refused.json()["detail"]
    assert resolved.status_code == 200
    assert paid.status_code == 201
    assert attempt_statuses(invoice_id) == [PaymentStatus.FAILED, PaymentStatus.SUCCEEDED]
    assert [entry["request"]["transactionId"] for entry in fakepay.requests_for(invoice_id)] == [
        invoice_id
    ]


HANGING_CAP = 30  # payments allowed to wait on the provider at once
HANGING_PAYS = 40  # ten more than that: those are refused at once


@pytest.fixture(scope="module")
def app_with_hanging_provider(
    database: None, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[str]:
    with (
        silent_provider() as provider_url,
        app_process(
            tmp_path_factory.mktemp("hanging") / "app.log",
            env={
                "FAKEPAY_URL": provider_url,
                "FAKEPAY_TIMEOUT": "6",
                "FAKEPAY_MAX_CONCURRENCY": str(HANGING_CAP),
            },
        ) as server,
    ):
        yield server.url


def test_hanging_provider_never_stalls_reads_and_creates(app_with_hanging_provider: str) -> None:
    url = app_with_hanging_provider
    with httpx.Client(base_url=url, timeout=30) as http:
        invoice_ids = [create_pending_invoice(http) for _ in range(HANGING_PAYS)]
    pays: list[httpx.Response] = []

    def pay_all() -> None:
        with ThreadPoolExecutor(max_workers=HANGING_PAYS) as pool:
            pays.extend(
                pool.map(lambda i: RequestFn(url, f"/invoice/pay/{i}", WORK_CARD)(), invoice_ids)
            )

    payer = threading.Thread(target=pay_all)
    payer.start()
    time.sleep(1.0)  # the capped payments now wait on the provider
    with httpx.Client(base_url=url, timeout=30) as http:
        read = http.get(f"/invoice/{invoice_ids[0]}")
        created = http.post(
            "/invoice", json={"jobDescription": "During", "amount": 1, "customerId": 1}
        )
        listed = http.get("/invoices")
    # Answered while every capped payment still waits on the provider (for its 6 s timeout):
    # nothing they hold (pool connections, the event loop) stood in the reads' way.
    still_waiting = payer.is_alive() and not pays
    payer.join()

    assert (read.status_code, created.status_code, listed.status_code) == (200, 201, 200)
    assert still_waiting, "the reads waited for the hanging payments to end"
    codes = Counter(response.status_code for response in pays)
    assert codes == {504: HANGING_CAP, 503: HANGING_PAYS - HANGING_CAP}
    busy = next(response for response in pays if response.status_code == 503)
    assert busy.headers["retry-after"] == "1"
    assert "too many payments are in flight" in busy.json()["detail"]


def test_timeout_answers_within_the_timeout_plus_one_second(app_with_hanging_provider: str) -> None:
    with httpx.Client(base_url=app_with_hanging_provider, timeout=30) as http:
        invoice_id = create_pending_invoice(http)
        started = time.monotonic()
        response = http.post(f"/invoice/pay/{invoice_id}", json=WORK_CARD)
        elapsed = time.monotonic() - started

    assert response.status_code == 504
    assert elapsed < 6 + 1


@pytest.fixture
def app_behind_proxy(
    database_proxy: TcpProxy, fakepay: FakePayProcess, tmp_path: Path
) -> Iterator[str]:
    env = {"DB_URL": f"127.0.0.1:{database_proxy.port}/{settings.db_name}"}
    with app_process(tmp_path / "app.log", env=env) as server:
        yield server.url


def test_app_recovers_when_the_database_comes_back(
    app_behind_proxy: str, database_proxy: TcpProxy
) -> None:
    with httpx.Client(base_url=app_behind_proxy, timeout=10) as http:
        assert http.get("/health-check").status_code == 200
        invoice_id = create_pending_invoice(http)

        database_proxy.cut()
        started = time.monotonic()
        down = http.get("/health-check")
        read_down = http.get(f"/invoice/{invoice_id}")
        elapsed = time.monotonic() - started
        database_proxy.start()
        up = http.get("/health-check")
        read_up = http.get(f"/invoice/{invoice_id}")

    assert (down.status_code, down.json()) == (503, {"status": "DOWN"})
    assert read_down.status_code == 503
    assert elapsed < 6  # two requests, each within 3 s
    assert (up.status_code, up.json()) == (200, {"status": "UP"})
    assert read_up.status_code == 200


def test_a_silent_database_is_503_within_3_s(
    app_behind_proxy: str, database_proxy: TcpProxy
) -> None:
    """The network to the database drops packets: pooled connections and new ones alike get
    no reply. Each request still answers within 3 s, and the app recovers afterwards."""
    with httpx.Client(base_url=app_behind_proxy, timeout=10) as http:
        invoice_id = create_pending_invoice(http)

        database_proxy.freeze()
        timings = []
        for path in ("/health-check", f"/invoice/{invoice_id}", "/health-check"):
            started = time.monotonic()
            response = http.get(path)
            timings.append((path, response.status_code, time.monotonic() - started))
        database_proxy.thaw()
        recovered = http.get(f"/invoice/{invoice_id}")

    for path, status_code, elapsed in timings:
        assert status_code == 503, path
        assert elapsed < 3, f"{path} took {elapsed:.1f} s"
    assert recovered.status_code == 200


def test_a_create_that_cannot_reach_the_database_writes_nothing(
    app_behind_proxy: str, database_proxy: TcpProxy
) -> None:
    body = {"jobDescription": "Lost in the outage", "amount": 1, "customerId": 1}
    with httpx.Client(base_url=app_behind_proxy, timeout=10) as http:
        database_proxy.cut()
        response = http.post("/invoice", json=body)
        database_proxy.start()

    assert response.status_code == 503
    with Session(direct_engine) as session:
        found = session.exec(  # type: ignore[call-overload]
            text("SELECT COUNT(*) FROM invoice WHERE job_description = 'Lost in the outage'")
        ).one()
    assert found == (0,)


def test_a_payment_outcome_survives_a_short_database_outage(
    database_proxy: TcpProxy, tmp_path: Path
) -> None:
    """The provider answers while the database is away: the outcome is recorded once it is
    back, so a charged invoice is not left PENDING."""
    results: dict[str, httpx.Response] = {}
    with StandInProvider() as provider:
        provider.answer(200, PAID_REPLY, delay_s=1.0)
        env = {
            "DB_URL": f"127.0.0.1:{database_proxy.port}/{settings.db_name}",
            "FAKEPAY_URL": provider.url,
        }
        with (
            app_process(tmp_path / "app.log", env=env) as server,
            httpx.Client(base_url=server.url, timeout=30) as http,
        ):
            invoice_id = create_pending_invoice(http)
            payer = threading.Thread(
                target=lambda: results.update(
                    paid=http.post(f"/invoice/pay/{invoice_id}", json=WORK_CARD)
                )
            )
            payer.start()
            time.sleep(0.5)  # claimed; the provider is still thinking
            database_proxy.cut()
            time.sleep(1.0)  # the provider has answered; recording it fails meanwhile
            database_proxy.start()
            payer.join()

    assert results["paid"].status_code == 201
    assert results["paid"].json()["invoiceStatus"] == "PAID"
    assert attempt_statuses(invoice_id) == [PaymentStatus.SUCCEEDED]
    assert "retrying" in (tmp_path / "app.log").read_text()


def test_a_decline_is_recorded_through_a_short_database_outage(
    database_proxy: TcpProxy, tmp_path: Path
) -> None:
    """The provider declines while the database is away: the decline is recorded once it is
    back, so the attempt does not stay PROCESSING and the client learns the reason."""
    declined = (400, {"error": "payment failed", "reason": "Lost card"})
    with paying_behind(database_proxy, tmp_path / "app.log", answer=declined) as pay:
        database_proxy.cut()
        pay.answer()
        wait_until(lambda: pay.provider.answered, "FakePay to decline")
        time.sleep(0.5)  # recording the decline fails meanwhile
        database_proxy.start()
        reply = pay.reply

    assert reply.status_code == 402
    assert reply.json()["detail"] == (
        f"Payment for invoice {pay.invoice_id} was declined by FakePay: Lost card"
    )
    assert attempts(pay.invoice_id) == [("DECLINED", "Lost card")]


def test_a_database_outage_after_the_charge_names_the_invoice_and_the_charge(
    database_proxy: TcpProxy, tmp_path: Path
) -> None:
    """The provider charges the card, then the database stays away longer than recording the
    outcome retries. A client of POST /invoice must still learn its invoice id and that it was
    charged, or it would retry into a second invoice and a second charge."""
    with StandInProvider() as provider:
        provider.answer(200, PAID_REPLY, delay_s=1.0)
        env = {
            "DB_URL": f"127.0.0.1:{database_proxy.port}/{settings.db_name}",
            "FAKEPAY_URL": provider.url,
        }
        body = {"jobDescription": "Charged in an outage", "amount": 5, "customerId": 1}
        with (
            app_process(tmp_path / "app.log", env=env) as server,
            httpx.Client(base_url=server.url, timeout=60) as http,
        ):
            result: dict[str, httpx.Response] = {}
            payer = threading.Thread(
                target=lambda: result.update(
                    reply=http.post("/invoice", json={**body, "card": WORK_CARD})
                )
            )
            payer.start()
            while not provider.received:
                time.sleep(0.05)
            database_proxy.cut()
            payer.join()
            database_proxy.start()
        (charged,) = provider.received

    invoice_id = charged["transactionId"]
    reply = result["reply"]
    assert reply.status_code == 503
    assert invoice_id in reply.json()["detail"]
    assert "the card was charged" in reply.json()["detail"]
    assert f"GET /invoice/{invoice_id}" in reply.json()["detail"]

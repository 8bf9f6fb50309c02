"""What the tests share: the test stack's settings, seeded ids, cards, and small helpers.

The tests' own database is DB_URL's with `_test` appended, so runs with different DB_URLs
never meet. The in-process app is made with `settings` (`main.create_app(settings)`); the app
processes the tests start get the same values as environment variables (`TEST_ENV`, through
`app_process`). Nothing here changes this process's environment.
"""

import json
import os
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol

import httpx
from sqlalchemy import create_engine, text
from sqlmodel import Session, col, select

from scripts.processes import PROJECT_ROOT, Running, free_port, running_app
from settings import Settings
from tests.stand_in import StandInProvider
from tests.tcp_proxy import TcpProxy

FAKEPAY_PORT = free_port()
_configured = Settings()
TEST_ENV = {
    "DB_URL": f"{_configured.db_url.rsplit('/', 1)[0]}/{_configured.db_name}_test",
    "FAKEPAY_URL": f"http://127.0.0.1:{FAKEPAY_PORT}/fakepay",
    "FAKEPAY_TIMEOUT": "2",
    "FAKEPAY_DEADLINE": "4",
    "LOG_LEVEL": "DEBUG",
}
settings = Settings(
    db_url=TEST_ENV["DB_URL"],
    fakepay_url=TEST_ENV["FAKEPAY_URL"],
    fakepay_timeout=float(TEST_ENV["FAKEPAY_TIMEOUT"]),
    fakepay_deadline=float(TEST_ENV["FAKEPAY_DEADLINE"]),
    log_level=TEST_ENV["LOG_LEVEL"],
)


def app_process(
    log_path: Path, env: dict[str, str] | None = None, workers: int = 1
) -> AbstractContextManager[Running]:
    """The app under uvicorn with the tests' settings (`TEST_ENV`), and `env` over them."""
    return running_app(log_path, {**TEST_ENV, **(env or {})}, workers=workers)


# A plain PyMySQL engine for tests to look at the database directly, outside the app.
# As the schema's owner: the tests write rows no request could and watch the server's lock
# waits, which the app's own user (with `make test-mysql8`, only rows) may not.
direct_engine = create_engine(
    settings.database_url("pymysql", schema_owner=True), pool_pre_ping=True
)

SEEDED_PENDING = "6f53c715-0369-11f0-8d97-7c646cb7c0bc"
SEEDED_PENDING_2 = "6f53c7be-0369-11f0-8d97-7c646cb7c0bc"
SEEDED_CANCELLED = "a14e5bd8-02ce-11f0-8d97-7c646cb7c0bc"
SEEDED_PAID = "6f53c4e0-0369-11f0-8d97-7c646cb7c0bc"
UNKNOWN_ID = "00000000-0000-4000-8000-000000000000"

# The challenge's two cards, as sent and as the API shows them back.
WORK_CARD = {"number": "1234 5656 7822 5678", "expiry": "01-2040", "name": "Work Card"}
MASKED_WORK_CARD = {"number": "123456********5678", "expiry": "01-2040", "name": "Work Card"}
J_DOE_CARD = {"number": "1234567812345678", "name": "J Doe", "expiry": "01-2040"}
PAID_REPLY = {"message": "Payment processed successfully"}


class Poster(Protocol):
    """A TestClient or an httpx.Client: anything that can post to the app."""

    def post(self, url: str, *, json: Any = ...) -> httpx.Response: ...


def create_pending_invoice(http: Poster, **overrides: Any) -> str:
    """A new PENDING invoice for customer 3 (299.99 unless overridden); its id."""
    body = {"jobDescription": "Building Payment System", "amount": 299.99, "customerId": 3}
    response = http.post("/invoice", json={**body, **overrides})
    assert response.status_code == 201, response.text
    invoice_id: str = response.json()["id"]
    return invoice_id


def attempts(invoice_id: str) -> list[tuple[str, str | None]]:
    """Every payment attempt recorded for the invoice, oldest first: (status, reason)."""
    from models import Payment

    with Session(direct_engine) as session:
        rows = session.exec(
            select(Payment.payment_status, Payment.reason)
            .where(Payment.invoice_id == invoice_id)
            .order_by(col(Payment.id))
        ).all()
    return [(status, reason) for status, reason in rows]


def insert_attempt(invoice_id: str, status: str = "PROCESSING", age_s: int = 0) -> None:
    """A payment attempt written straight into the table, as a crashed or stalled request
    would have left it, `age_s` seconds old, with the markers the app writes: an open one
    (PROCESSING, UNKNOWN) holds its invoice's open slot, a SUCCEEDED one the success slot."""
    with direct_engine.begin() as connection:
        connection.execute(
            text(
                "INSERT INTO payment (invoice_id, card_number, card_name, card_expiry, "
                "payment_status, unsettled, succeeded, created_at) VALUES (:id, "
                "'123456********5678', 'Crash', '01-2040', :status, :unsettled, :succeeded, "
                "NOW(6) - INTERVAL :age SECOND)"
            ),
            {
                "id": invoice_id,
                "status": status,
                "unsettled": 1 if status in {"PROCESSING", "UNKNOWN"} else None,
                "succeeded": 1 if status == "SUCCEEDED" else None,
                "age": age_s,
            },
        )


def invoices_described(job: str) -> int:
    """How many invoices have this job description, counted in the table."""
    with direct_engine.connect() as connection:
        query = text("SELECT COUNT(*) FROM invoice WHERE job_description = :job")
        count: int = connection.execute(query, {"job": job}).scalar_one()
    return count


def last_month() -> str:
    """The expiry MM-YYYY of a card that expired at the end of last month."""
    now = datetime.now(UTC)
    year, month = (now.year, now.month - 1) if now.month > 1 else (now.year - 1, 12)
    return f"{month:02d}-{year}"


def wait_until(
    condition: Callable[[], object], what: str, timeout_s: float = 10, every_s: float = 0.01
) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"still waiting after {timeout_s:g} s for {what}"
        time.sleep(every_s)


# What a PROCESSING attempt past the stale margin is once a later pay of its invoice replaces
# it (with a provider that deduplicates): its outcome is unknown, and stays so.
SUPERSEDED = "UNKNOWN"


def make_attempts_stale(invoice_id: str) -> None:
    """Backdate the invoice's PROCESSING attempts an hour, far past any stale margin: as if
    the requests that made them had stalled long ago."""
    with direct_engine.begin() as connection:
        connection.execute(
            text(
                "UPDATE payment SET created_at = created_at - INTERVAL 1 HOUR "
                "WHERE invoice_id = :id AND payment_status = 'PROCESSING'"
            ),
            {"id": invoice_id},
        )


@dataclass
class HeldPayment:
    """A pay request whose call the provider holds; its reply once it has ended."""

    invoice_id: str
    replies: list[httpx.Response] = field(default_factory=list)

    @property
    def reply(self) -> httpx.Response:
        (reply,) = self.replies
        return reply


@contextmanager
def superseded_attempt(
    http: Poster,
    provider: StandInProvider,
    invoice_id: str,
    late: tuple[int, dict[str, Any]] | None,
) -> Iterator[HeldPayment]:
    """An attempt in flight at the provider that a later attempt then supersedes.

    Pays `invoice_id` from a thread; the provider holds that call. Once it has arrived the
    attempt is made stale, so the next pay of the invoice supersedes it: that, and whatever
    else should happen meanwhile (a cancel), is the body of the `with` block. When the block
    ends the provider answers the held call late with `late` (status, body); with `late=None`
    it keeps it until the app gives up waiting (a timeout). The first pay's reply is then in
    `.reply`. The app's provider timeout must be longer than the block takes, unless `late`
    is None.

    The superseded attempt is UNKNOWN, and an invoice with an UNKNOWN attempt is payable
    again only with PROVIDER_DEDUPLICATES=true: the provider's client must have it on.
    """
    gate = threading.Event()
    if late is None:
        provider.answer_next(gate=gate)
    else:
        provider.answer_next(*late, gate=gate)
    held = HeldPayment(invoice_id)

    def pay() -> None:
        held.replies.append(http.post(f"/invoice/pay/{invoice_id}", json=WORK_CARD))

    payer = threading.Thread(target=pay)
    payer.start()
    try:
        wait_until(lambda: provider.requests_for(invoice_id), "the first pay to reach FakePay")
        make_attempts_stale(invoice_id)
        yield held
        still_held = payer.is_alive()
    finally:
        if late is None:
            payer.join()
        gate.set()
        payer.join()
    assert still_held, "the first pay ended before it was superseded: the test proves nothing"


@dataclass(frozen=True)
class FakePayProcess:
    """The real fake_pay.py, with what it logged about each request it received."""

    server: Running

    @property
    def url(self) -> str:
        return f"{self.server.url}/fakepay"

    def entries(self) -> list[dict[str, Any]]:
        lines = self.server.log_path.read_text().splitlines()
        return [json.loads(line) for line in lines if line.startswith("{")]

    def requests_for(self, transaction_id: str) -> list[dict[str, Any]]:
        return [
            entry
            for entry in self.entries()
            if isinstance(entry["request"], dict)
            and entry["request"].get("transactionId") == transaction_id
        ]


# conftest's `use_provider(url, client_class=FakePayClient)` and `override_fakepay(dependency)`.
UseProvider = Callable[..., None]
OverrideFakePay = Callable[[Callable[[], Awaitable[Any]]], None]


@dataclass
class PayBehindProxy:
    """A pay of a new invoice through an app whose database is behind `proxy`, its charge
    held at the provider until `answer()`; its reply once it has ended."""

    http: httpx.Client
    provider: StandInProvider
    invoice_id: str
    gate: threading.Event
    payer: threading.Thread
    replies: list[httpx.Response]

    def answer(self) -> None:
        self.gate.set()

    @property
    def reply(self) -> httpx.Response:
        self.payer.join()
        (reply,) = self.replies
        return reply


@contextmanager
def serving_behind(proxy: TcpProxy, log_path: Path, provider_url: str) -> Iterator[httpx.Client]:
    """The app as a process, its database behind `proxy` and its provider at `provider_url`;
    a client of it."""
    env = {"DB_URL": f"127.0.0.1:{proxy.port}/{settings.db_name}", "FAKEPAY_URL": provider_url}
    with (
        app_process(log_path, env=env) as server,
        httpx.Client(base_url=server.url, timeout=60) as http,
    ):
        yield http


@contextmanager
def paying_behind(
    proxy: TcpProxy,
    log_path: Path,
    answer: tuple[int, dict[str, Any]] = (200, PAID_REPLY),
    headers: dict[str, str] | None = None,
) -> Iterator[PayBehindProxy]:
    """Start the app with its database behind `proxy`, create an invoice and pay it (with
    `headers`); yield once the charge has reached the provider, which holds it until
    `answer()` is called (at the latest when the block ends)."""
    with StandInProvider() as provider:
        gate = threading.Event()
        provider.answer_next(*answer, gate=gate)
        with serving_behind(proxy, log_path, provider.url) as http:
            invoice_id = create_pending_invoice(http)
            replies: list[httpx.Response] = []
            pay = f"/invoice/pay/{invoice_id}"
            payer = threading.Thread(
                target=lambda: replies.append(http.post(pay, json=WORK_CARD, headers=headers))
            )
            payer.start()
            held = PayBehindProxy(http, provider, invoice_id, gate, payer, replies)
            try:
                wait_until(lambda: provider.requests_for(invoice_id), "the pay to reach FakePay")
                yield held
            finally:
                gate.set()
                payer.join()


@dataclass
class OneSlotProvider:
    """A stand-in the in-process app may call once at a time. `busy()` holds that one call
    (a pay of an invoice of its own), so every other payment meanwhile is refused as provider
    busy: 503 with Retry-After, nothing sent."""

    provider: StandInProvider
    http: Poster

    @contextmanager
    def busy(self) -> Iterator[None]:
        invoice_id = create_pending_invoice(self.http)
        gate = threading.Event()
        self.provider.answer_next(200, PAID_REPLY, gate=gate)
        pay = f"/invoice/pay/{invoice_id}"
        holder = threading.Thread(target=lambda: self.http.post(pay, json=WORK_CARD))
        holder.start()
        try:
            wait_until(lambda: self.provider.requests_for(invoice_id), "a pay to take the slot")
            yield
        finally:
            gate.set()
            holder.join()


# API keys, made and revoked as `make api-key` and `make api-key-revoke` do.
def make_key(scope: str) -> tuple[str, str]:
    """A new key through `python -m scripts.api_keys`, as `make api-key` runs it: (name, secret)."""
    name = f"test-{scope}-{uuid.uuid4().hex[:8]}"
    output = subprocess.run(
        [sys.executable, "-m", "scripts.api_keys", "create", name, scope],
        cwd=PROJECT_ROOT,
        env={**os.environ, **TEST_ENV},
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    return name, output.strip().splitlines()[-1]


def revoke_key(name: str) -> None:
    subprocess.run(
        [sys.executable, "-m", "scripts.api_keys", "revoke", name],
        cwd=PROJECT_ROOT,
        env={**os.environ, **TEST_ENV},
        check=True,
        capture_output=True,
    )


def bearer(secret: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {secret}"}

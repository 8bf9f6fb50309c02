"""What the tests share: the test stack's settings, seeded ids, cards, and small helpers.

Settings are read when the app's modules are imported, so this module points the environment
at the tests' own database and FakePay port before anything imports `db` or `main`; conftest
imports it first.
"""

import json
import os
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Protocol

import httpx
from sqlalchemy import create_engine, text
from sqlmodel import Session, col, select

import settings as app_settings
from scripts.processes import Running, free_port

FAKEPAY_PORT = free_port()
_configured = app_settings.Settings()
TEST_ENV = {
    "DB_URL": f"{_configured.db_url.rsplit('/', 1)[0]}/{_configured.db_name}_test",
    "FAKEPAY_URL": f"http://127.0.0.1:{FAKEPAY_PORT}/fakepay",
    "FAKEPAY_TIMEOUT": "2",
    "FAKEPAY_DEADLINE": "4",
    "LOG_LEVEL": "DEBUG",
}
os.environ.update(TEST_ENV)
app_settings.settings = settings = app_settings.Settings()

# A plain PyMySQL engine for tests to look at the database directly, outside the app.
direct_engine = create_engine(settings.database_url("pymysql"), pool_pre_ping=True)

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
    would have left it, `age_s` seconds old."""
    with direct_engine.begin() as connection:
        connection.execute(
            text(
                "INSERT INTO payment (invoice_id, card_number, card_name, card_expiry, "
                "payment_status, created_at) VALUES (:id, '123456********5678', 'Crash', "
                "'01-2040', :status, NOW(6) - INTERVAL :age SECOND)"
            ),
            {"id": invoice_id, "status": status, "age": age_s},
        )


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

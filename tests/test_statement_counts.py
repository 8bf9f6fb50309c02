"""Each request costs as few SQL statements as correctness allows."""

import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import event
from sqlalchemy.ext.asyncio import AsyncEngine

CARD = {"number": "1234567812345678", "expiry": "01-2040", "name": "J Doe"}


@pytest.fixture
def sent(app_engine: AsyncEngine) -> Iterator[list[str]]:
    """Every statement the in-process app sends, in full."""
    seen: list[str] = []

    def record(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        seen.append(statement)

    event.listen(app_engine.sync_engine, "before_cursor_execute", record)
    yield seen
    event.remove(app_engine.sync_engine, "before_cursor_execute", record)


@pytest.fixture
def statements(app_engine: AsyncEngine) -> Iterator[list[str]]:
    """The first word of each statement the in-process app sends."""
    seen: list[str] = []

    def record(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        seen.append(statement.split(None, 1)[0].upper())

    event.listen(app_engine.sync_engine, "before_cursor_execute", record)
    yield seen
    event.remove(app_engine.sync_engine, "before_cursor_execute", record)


def new_invoice(client: TestClient) -> str:
    body = {"jobDescription": "Counted", "amount": 1, "customerId": 1}
    invoice_id: str = client.post("/invoice", json=body).json()["id"]
    return invoice_id


def test_read_invoice_is_one_statement(client: TestClient, statements: list[str]) -> None:
    invoice_id = new_invoice(client)
    statements.clear()

    assert client.get(f"/invoice/{invoice_id}").status_code == 200

    assert statements == ["SELECT"]


@pytest.mark.parametrize("params", [{}, {"invoiceStatus": "PAID"}, {"page": 2, "size": 3}])
def test_list_is_two_statements(
    client: TestClient, statements: list[str], params: dict[str, Any]
) -> None:
    assert client.get("/invoices", params=params).status_code == 200

    assert statements == ["SELECT", "SELECT"]


def test_scroll_is_two_statements(client: TestClient, statements: list[str]) -> None:
    cursor = client.get("/invoices/scroll", params={"size": 1}).json()["nextCursor"]
    statements.clear()

    assert client.get("/invoices/scroll", params={"cursor": cursor}).status_code == 200

    assert statements == ["SELECT", "SELECT"]


def test_create_is_a_lookup_an_insert_and_its_count(
    client: TestClient, statements: list[str]
) -> None:
    new_invoice(client)

    assert statements == ["SELECT", "INSERT", "UPDATE"]


def test_writes_never_use_returning(client: TestClient, sent: list[str]) -> None:
    # MySQL 8 has no INSERT ... RETURNING: the ORM must take the path it takes there on MariaDB
    # too, or a test run on MariaDB proves nothing about it.
    customer = {"customerName": "No Returning", "customerEmail": f"{uuid.uuid4()}@example.com"}
    assert client.post("/customer", json=customer).status_code == 201
    body = {"jobDescription": "No returning", "amount": 1, "customerId": 1}
    headers = {"Idempotency-Key": str(uuid.uuid4())}
    assert client.post("/invoice", json={**body, "card": CARD}, headers=headers).status_code == 201

    inserts = [statement for statement in sent if statement.lstrip().upper().startswith("INSERT")]
    assert len(inserts) == 4  # customer, invoice, idempotency key, payment attempt
    assert not [statement for statement in inserts if "RETURNING" in statement.upper()]


def test_pay_is_claim_charge_settle_in_six_statements(
    client: TestClient, statements: list[str]
) -> None:
    invoice_id = new_invoice(client)
    statements.clear()

    assert client.post(f"/invoice/pay/{invoice_id}", json=CARD).status_code == 201

    # claim: count the attempt on the invoice row (which locks it), read the invoice and its
    # customer, look for an open attempt, record the attempt; settle: mark the invoice PAID,
    # the attempt SUCCEEDED, move the invoice in the counts
    assert statements == ["UPDATE", "SELECT", "SELECT", "INSERT", "UPDATE", "UPDATE", "UPDATE"]


def test_an_idempotency_key_adds_its_lookup_its_row_and_its_reply(
    client: TestClient, statements: list[str]
) -> None:
    invoice_id = new_invoice(client)
    statements.clear()

    headers = {"Idempotency-Key": f"counted-{invoice_id}"}
    assert client.post(f"/invoice/pay/{invoice_id}", json=CARD, headers=headers).status_code == 201

    # the key looked up; claim as above, the key row inserted with the attempt; settle as
    # above, the reply stored with the outcome
    assert statements == [
        "SELECT",
        *("UPDATE", "SELECT", "SELECT", "INSERT", "INSERT"),
        *("UPDATE", "UPDATE", "UPDATE", "UPDATE"),
    ]


@pytest.fixture
def commits(app_engine: AsyncEngine) -> Iterator[list[str]]:
    """Every transaction the in-process app commits on its connections."""
    seen: list[str] = []

    def record(conn: Any) -> None:
        seen.append("COMMIT")

    event.listen(app_engine.sync_engine, "commit", record)
    yield seen
    event.remove(app_engine.sync_engine, "commit", record)


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        ("/health-check", ["SELECT"]),
        ("/invoice/{id}/payments", ["SELECT", "SELECT"]),
        ("/customer/1", ["SELECT"]),
        ("/customers", ["SELECT", "SELECT"]),
        ("/payments", ["SELECT", "SELECT"]),
        ("/payments?status=UNKNOWN", ["SELECT", "SELECT"]),
    ],
)
def test_every_other_read_only_selects_and_commits_nothing(
    client: TestClient,
    statements: list[str],
    commits: list[str],
    path: str,
    expected: list[str],
) -> None:
    path = path.replace("{id}", new_invoice(client))
    statements.clear()
    commits.clear()

    assert client.get(path).status_code == 200

    assert statements == expected
    assert commits == []

"""POST /invoice: validation, persistence, and paying at once with a card."""

import uuid
from decimal import Decimal
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlmodel import Session, func, select

from models import Invoice, Payment
from tests.support import FakePayProcess, direct_engine

CHALLENGE_CARD = {"number": "1234567812345678", "name": "J Doe", "expiry": "01-2040"}


def invoice_count() -> int:
    with Session(direct_engine) as session:
        return session.exec(select(func.count()).select_from(Invoice)).one()


def stored_invoice(invoice_id: str) -> Invoice | None:
    with Session(direct_engine) as session:
        return session.get(Invoice, invoice_id)


def new_invoice(**overrides: Any) -> dict[str, Any]:
    return {"jobDescription": "Window cleaning", "amount": 10, "customerId": 5, **overrides}


def test_create_without_card_matches_the_challenge_example(client: TestClient) -> None:
    body = {"jobDescription": "Software Development and Testing", "amount": 199.99, "customerId": 2}

    response = client.post("/invoice", json=body)

    assert response.status_code == 201
    data = response.json()
    assert uuid.UUID(data.pop("id")).version == 7  # time-ordered: new rows append to the key
    assert data == {
        "jobDescription": "Software Development and Testing",
        "customerId": 2,
        "amount": 199.99,
        "customerName": "Jane Smith",
        "customerEmail": "jane.smith@example.com",
        "invoiceStatus": "PENDING",
    }


def test_created_invoice_is_persisted_and_readable(client: TestClient) -> None:
    created = client.post("/invoice", json=new_invoice(amount="12.50")).json()

    response = client.get(f"/invoice/{created['id']}")

    assert response.status_code == 200
    assert response.json() == created
    stored = stored_invoice(created["id"])
    assert stored is not None
    assert stored.amount == Decimal("12.50")


def test_create_with_card_matches_the_challenge_example(
    client: TestClient, fakepay: FakePayProcess
) -> None:
    body = {
        "jobDescription": "Software License Fee",
        "amount": 99.99,
        "customerId": 1,
        "card": CHALLENGE_CARD,
    }

    response = client.post("/invoice", json=body)

    assert response.status_code == 201
    data = response.json()
    invoice_id = data.pop("id")
    assert data == {
        "jobDescription": "Software License Fee",
        "customerId": 1,
        "amount": 99.99,
        "card": {"number": "123456********5678", "expiry": "01-2040", "name": "J Doe"},
        "customerName": "John Doe",
        "customerEmail": "john.doe@example.com",
        "invoiceStatus": "PAID",
    }
    (received,) = fakepay.requests_for(invoice_id)
    assert received["status"] == 200


def test_fakepay_receives_exactly_the_contract_json(
    client: TestClient, fakepay: FakePayProcess
) -> None:
    card = {"number": "1234-5678 1234-5678", "name": "  J Doe ", "expiry": "01-2040"}

    invoice_id = client.post("/invoice", json=new_invoice(card=card)).json()["id"]

    (received,) = fakepay.requests_for(invoice_id)
    assert received["request"] == {
        "transactionId": invoice_id,
        "card": {"number": "123456********5678", "expiry": "01-2040", "name": "J Doe"},
    }
    assert received["status"] == 200  # so FakePay saw 16 plain digits


def test_paid_invoice_reads_back_with_its_masked_card(client: TestClient) -> None:
    created = client.post("/invoice", json=new_invoice(card=CHALLENGE_CARD)).json()

    response = client.get(f"/invoice/{created['id']}")

    assert response.status_code == 200
    assert response.json() == created
    assert response.json()["card"]["number"] == "123456********5678"


def test_unknown_customer_is_404_and_writes_nothing(client: TestClient) -> None:
    before = invoice_count()

    response = client.post("/invoice", json=new_invoice(customerId=999))

    assert response.status_code == 404
    assert response.json() == {"detail": "Customer 999 not found"}
    assert invoice_count() == before


def test_unknown_customer_with_card_charges_nothing(
    client: TestClient, fakepay: FakePayProcess
) -> None:
    before = len(fakepay.entries())

    response = client.post("/invoice", json=new_invoice(customerId=999, card=CHALLENGE_CARD))

    assert response.status_code == 404
    assert len(fakepay.entries()) == before


@pytest.mark.parametrize(
    ("amount", "stored"),
    [
        (1000.00, "1000.00"),
        (1234567.89, "1234567.89"),
        (0.10, "0.10"),
        (10.5, "10.50"),
        ("0.01", "0.01"),
        (9999999999.99, "9999999999.99"),
    ],
)
def test_amounts_round_trip_exactly(client: TestClient, amount: float | str, stored: str) -> None:
    created = client.post("/invoice", json=new_invoice(amount=amount))

    assert created.status_code == 201
    assert Decimal(str(created.json()["amount"])) == Decimal(stored)
    read = client.get(f"/invoice/{created.json()['id']}").json()
    assert Decimal(str(read["amount"])) == Decimal(stored)
    invoice = stored_invoice(created.json()["id"])
    assert invoice is not None
    assert invoice.amount == Decimal(stored)


@pytest.mark.parametrize(
    ("amount", "message"),
    [
        (1.105, "Decimal input should have no more than 2 decimal places"),
        (0, "Input should be greater than 0"),
        (-5, "Input should be greater than 0"),
        (10000000000, "Decimal input should have no more than 10 digits before the decimal point"),
        ("12,50", "Input should be a valid decimal"),
        ("NaN", "Input should be a finite number"),
        (True, "Decimal input should be an integer, float, string or Decimal object"),
    ],
)
def test_invalid_amount_is_422_and_writes_nothing(
    client: TestClient, amount: object, message: str
) -> None:
    before = invoice_count()

    response = client.post("/invoice", json=new_invoice(amount=amount))

    assert response.status_code == 422
    (error,) = response.json()["detail"]
    assert error["loc"] == ["body", "amount"]
    assert error["msg"] == message
    assert invoice_count() == before


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("jobDescription", "", "String should have at least 1 character"),
        ("jobDescription", "   ", "job description must not be blank"),
        ("jobDescription", "x" * 256, "String should have at most 255 characters"),
        ("customerId", 0, "Input should be greater than or equal to 1"),
        ("customerId", "two", "Input should be a valid integer"),
    ],
)
def test_invalid_fields_are_422_naming_the_field(
    client: TestClient, field: str, value: object, message: str
) -> None:
    response = client.post("/invoice", json=new_invoice(**{field: value}))

    assert response.status_code == 422
    (error,) = response.json()["detail"]
    assert error["loc"] == ["body", field]
    assert error["msg"].startswith(message)


def test_missing_fields_are_each_named(client: TestClient) -> None:
    response = client.post("/invoice", json={})

    assert response.status_code == 422
    missing = {error["loc"][-1] for error in response.json()["detail"]}
    assert missing == {"jobDescription", "amount", "customerId"}


def test_job_description_keeps_unicode_and_sql_looking_text_verbatim(client: TestClient) -> None:
    text = "Robert'); DROP TABLE invoice;-- 🚀 Zoë"

    response = client.post("/invoice", json=new_invoice(jobDescription=text))

    assert response.status_code == 201
    assert client.get(f"/invoice/{response.json()['id']}").json()["jobDescription"] == text


def test_invalid_card_is_422_and_writes_nothing(
    client: TestClient, fakepay: FakePayProcess
) -> None:
    before, calls_before = invoice_count(), len(fakepay.entries())
    card = {**CHALLENGE_CARD, "number": "1234"}

    response = client.post("/invoice", json=new_invoice(card=card))

    assert response.status_code == 422
    assert response.json()["detail"][0]["loc"] == ["body", "card", "number"]
    assert invoice_count() == before
    assert len(fakepay.entries()) == calls_before


def test_validation_errors_never_echo_the_card_number(client: TestClient) -> None:
    card = {"number": "1234567812345678", "name": "J0hn", "expiry": "13-2040"}

    response = client.post("/invoice", json=new_invoice(card=card, amount=-1))

    assert response.status_code == 422
    assert "1234567812345678" not in response.text
    assert all("input" not in error for error in response.json()["detail"])


def test_payment_is_recorded_as_an_attempt_with_the_masked_card_only(client: TestClient) -> None:
    created = client.post("/invoice", json=new_invoice(card=CHALLENGE_CARD)).json()

    with Session(direct_engine) as session:
        attempts = session.exec(select(Payment).where(Payment.invoice_id == created["id"])).all()
    assert [(a.payment_status, a.card_number, a.card_name, a.card_expiry) for a in attempts] == [
        ("SUCCEEDED", "123456********5678", "J Doe", "01-2040")
    ]

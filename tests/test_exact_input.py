"""Money from the JSON text, and input that lax parsing would have let through."""

from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlmodel import Session, col, select

from models import Invoice
from tests.support import WORK_CARD, create_pending_invoice, direct_engine

VALID = '{{"jobDescription": "{job}", "amount": {amount}, "customerId": 1}}'


def post_raw(client: TestClient, text: str, job: str) -> Any:
    """The body exactly as written: Python's json module would turn these numbers into floats."""
    body = VALID.format(job=job, amount=text)
    return client.post("/invoice", content=body, headers={"Content-Type": "application/json"})


def stored_with(job: str) -> list[Invoice]:
    with Session(direct_engine) as session:
        return list(session.exec(select(Invoice).where(col(Invoice.job_description) == job)))


@pytest.mark.parametrize("amount", ["100.0000000000000001", "99.999999999999999", "12.345", "1e-3"])
def test_json_amount_with_more_than_two_decimals_is_422_never_rounded(
    client: TestClient, amount: str
) -> None:
    job = f"Too precise {amount}"

    response = post_raw(client, amount, job)

    assert response.status_code == 422
    (error,) = response.json()["detail"]
    assert error["loc"] == ["body", "amount"]
    assert error["msg"].startswith("Decimal input should have no more than")
    assert stored_with(job) == []


@pytest.mark.parametrize("amount", ["12.50", "12.500", "1.25e1"])
def test_json_amount_with_trailing_zeros_keeps_its_value(client: TestClient, amount: str) -> None:
    job = f"Trailing zeros {amount}"

    response = post_raw(client, amount, job)

    assert response.status_code == 201
    assert response.json()["amount"] == 12.5
    (stored,) = stored_with(job)
    assert str(stored.amount) == "12.50"


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("customerId", True),
        ("customerId", "1_0"),
        ("customerId", "2"),
        ("amount", "1_000"),
        ("amount", True),
    ],
)
def test_values_lax_parsing_would_coerce_are_422(
    client: TestClient, field: str, value: object
) -> None:
    body = {"jobDescription": "Strict", "amount": "10.00", "customerId": 1, field: value}

    response = client.post("/invoice", json=body)

    assert response.status_code == 422
    assert response.json()["detail"][0]["loc"] == ["body", field]


@pytest.mark.parametrize("job", ["\u200b", "\u200b\u2060 \ufeff", "\t\n"])
def test_job_description_of_invisible_characters_is_blank(client: TestClient, job: str) -> None:
    response = client.post("/invoice", json={"jobDescription": job, "amount": 1, "customerId": 1})

    assert response.status_code == 422
    (error,) = response.json()["detail"]
    assert error["msg"] == "job description must not be blank"


@pytest.mark.parametrize("name", ["\tJ Doe", "J Doe\n", "J\u00a0Doe", "\u00a0J Doe"])
def test_card_name_trims_spaces_only(client: TestClient, name: str) -> None:
    invoice_id = create_pending_invoice(client)

    response = client.post(f"/invoice/pay/{invoice_id}", json={**WORK_CARD, "name": name})

    assert response.status_code == 422
    assert response.json()["detail"][0]["loc"] == ["body", "name"]


def test_card_name_surrounding_spaces_are_trimmed(client: TestClient) -> None:
    invoice_id = create_pending_invoice(client)

    response = client.post(f"/invoice/pay/{invoice_id}", json={**WORK_CARD, "name": "  J Doe "})

    assert response.status_code == 201
    assert response.json()["card"]["name"] == "J Doe"


def test_documented_422_body_is_what_the_api_sends(client: TestClient) -> None:
    schema = client.get("/openapi.json").json()["components"]["schemas"]["ValidationError"]
    sent = client.post("/invoice", json={"amount": "x"}).json()["detail"][0]

    assert set(schema["properties"]) == {"type", "loc", "msg"} == set(sent)
    assert schema["additionalProperties"] is False

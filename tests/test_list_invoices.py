"""GET /invoices: page envelopes, the status filter, stable newest-first order."""

from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlmodel import Session, func, select

from models import Invoice, InvoiceStatus
from tests.support import direct_engine


def count_in_db(status: InvoiceStatus | None = None) -> int:
    query = select(func.count()).select_from(Invoice)
    if status is not None:
        query = query.where(Invoice.invoice_status == status)
    with Session(direct_engine) as session:
        return session.exec(query).one()


def create_invoices(client: TestClient, count: int) -> list[str]:
    ids = []
    for number in range(count):
        body = {"jobDescription": f"Batch job {number}", "amount": "1.00", "customerId": 2}
        ids.append(client.post("/invoice", json=body).json()["id"])
    return ids


def test_pending_filter_matches_the_challenge_example(
    client: TestClient, seeded_database: None
) -> None:
    response = client.get("/invoices", params={"invoiceStatus": "PENDING"})

    assert response.status_code == 200
    assert response.json() == {
        "items": [
            {
                "jobDescription": "Consultation Service",
                "customerId": 3,
                "amount": 300.25,
                "id": "6f53c7be-0369-11f0-8d97-7c646cb7c0bc",
                "customerName": "Seth Hall",
                "customerEmail": "seth.hall@paymark.co.nz",
                "invoiceStatus": "PENDING",
            },
            {
                "jobDescription": "SEO Optimization",
                "customerId": 3,
                "amount": 175.0,
                "id": "6f53c715-0369-11f0-8d97-7c646cb7c0bc",
                "customerName": "Seth Hall",
                "customerEmail": "seth.hall@paymark.co.nz",
                "invoiceStatus": "PENDING",
            },
        ],
        "total": 2,
        "page": 1,
        "size": 10,
        "pages": 1,
    }


def test_default_page_is_the_first_ten_newest_first(client: TestClient) -> None:
    newest = create_invoices(client, 12)

    response = client.get("/invoices")

    assert response.status_code == 200
    data = response.json()
    assert (data["page"], data["size"], data["total"]) == (1, 10, count_in_db())
    assert data["pages"] == -(-data["total"] // 10)
    assert [item["id"] for item in data["items"]] == list(reversed(newest))[:10]


@pytest.mark.parametrize("status", list(InvoiceStatus))
def test_filter_returns_only_that_status_with_its_total(client: TestClient, status: str) -> None:
    create_invoices(client, 2)

    data = client.get("/invoices", params={"invoiceStatus": status, "size": 100}).json()

    assert data["total"] == count_in_db(InvoiceStatus(status))
    assert data["items"]
    assert {item["invoiceStatus"] for item in data["items"]} == {status}


def test_walking_every_page_returns_each_invoice_once(client: TestClient) -> None:
    create_invoices(client, 15)
    total = count_in_db()
    seen: list[str] = []

    for page in range(1, -(-total // 7) + 1):
        data = client.get("/invoices", params={"page": page, "size": 7}).json()
        seen += [item["id"] for item in data["items"]]

    assert len(seen) == total
    assert len(set(seen)) == total


def test_page_past_the_end_is_empty(client: TestClient) -> None:
    total = count_in_db()

    response = client.get("/invoices", params={"page": total + 1, "size": 1})

    assert response.status_code == 200
    data = response.json()
    assert data["items"] == []
    assert data["total"] == total


@pytest.mark.parametrize("path", ["/invoices", "/customers"])
@pytest.mark.parametrize("page", [10**6, 2**63, 10**40])
def test_huge_page_numbers_are_422_never_errors(client: TestClient, path: str, page: int) -> None:
    response = client.get(path, params={"page": page, "size": 100})

    assert response.status_code == 422
    assert response.json()["detail"][0]["loc"] == ["query", "page"]


@pytest.mark.parametrize(
    ("params", "name"),
    [
        ({"invoiceStatus": "DRAFT"}, "invoiceStatus"),
        ({"invoiceStatus": "paid"}, "invoiceStatus"),
        ({"page": 0}, "page"),
        ({"page": -1}, "page"),
        ({"page": "first"}, "page"),
        ({"size": 0}, "size"),
        ({"size": 101}, "size"),
    ],
)
def test_invalid_query_is_422_naming_the_parameter(
    client: TestClient, params: dict[str, Any], name: str
) -> None:
    response = client.get("/invoices", params=params)

    assert response.status_code == 422
    (error,) = response.json()["detail"]
    assert error["loc"] == ["query", name]


def test_paid_invoices_in_the_list_show_their_masked_card(client: TestClient) -> None:
    card = {"number": "4111111111111111", "expiry": "12-2039", "name": "List Card"}
    body = {"jobDescription": "Listed", "amount": 5, "customerId": 1, "card": card}
    paid_id = client.post("/invoice", json=body).json()["id"]

    items = client.get("/invoices", params={"invoiceStatus": "PAID", "size": 100}).json()["items"]

    (listed,) = [item for item in items if item["id"] == paid_id]
    assert listed["card"] == {
        "number": "411111********1111",
        "expiry": "12-2039",
        "name": "List Card",
    }

"""GET /invoices and /invoices/scroll filtered by customer and creation time; the page depth
limit; GET /invoice/{invoice_id}/payments."""

from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlmodel import Session, col, func, select

from models import Invoice
from tests.stand_in import StandInProvider
from tests.support import (
    PAID_REPLY,
    UNKNOWN_ID,
    WORK_CARD,
    create_pending_invoice,
    direct_engine,
    settings,
)


def count_where(*conditions: Any) -> int:
    with Session(direct_engine) as session:
        return session.exec(select(func.count()).select_from(Invoice).where(*conditions)).one()


def test_customer_filter_lists_only_that_customers_invoices(client: TestClient) -> None:
    create_pending_invoice(client, customerId=4)

    data = client.get("/invoices", params={"customerId": 4, "size": 100}).json()

    assert data["total"] == count_where(col(Invoice.customer_id) == 4)
    assert {item["customerId"] for item in data["items"]} == {4}


def test_customer_and_status_filters_combine(client: TestClient) -> None:
    create_pending_invoice(client, customerId=5)

    data = client.get("/invoices", params={"customerId": 5, "invoiceStatus": "PENDING"}).json()

    expected = count_where(col(Invoice.customer_id) == 5, col(Invoice.invoice_status) == "PENDING")
    assert data["total"] == expected >= 1
    assert {(i["customerId"], i["invoiceStatus"]) for i in data["items"]} == {(5, "PENDING")}


@pytest.mark.parametrize(
    ("created_from", "created_to"),
    [
        ("2025-03-17T09:05:00Z", "2025-03-17T09:15:00Z"),
        ("2025-03-17T09:05:00", "2025-03-17T09:15:00"),  # no offset: UTC
        ("2025-03-17T11:05:00+02:00", "2025-03-17T11:15:00+02:00"),
    ],
)
def test_date_range_is_from_inclusive_to_exclusive(
    client: TestClient, seeded_database: None, created_from: str, created_to: str
) -> None:
    params = {"createdFrom": created_from, "createdTo": created_to}

    data = client.get("/invoices", params=params).json()

    assert data["total"] == 2
    assert [item["jobDescription"] for item in data["items"]] == [
        "SEO Optimization",
        "Graphic Design Service",
    ]


def test_a_date_means_midnight_utc(client: TestClient, seeded_database: None) -> None:
    on_the_day = client.get(
        "/invoices", params={"createdFrom": "2025-03-17", "createdTo": "2025-03-18"}
    ).json()
    before = client.get("/invoices", params={"createdTo": "2025-03-17"}).json()

    assert on_the_day["total"] == 5
    assert before["total"] == 0


def test_all_filters_combine_on_scroll(client: TestClient, seeded_database: None) -> None:
    params = {
        "customerId": 3,
        "invoiceStatus": "PENDING",
        "createdFrom": "2025-03-17",
        "createdTo": "2025-03-18",
        "size": 1,
    }
    first = client.get("/invoices/scroll", params=params).json()
    second = client.get("/invoices/scroll", params={**params, "cursor": first["nextCursor"]}).json()

    assert first["total"] == second["total"] == 2
    assert [first["items"][0]["jobDescription"], second["items"][0]["jobDescription"]] == [
        "Consultation Service",
        "SEO Optimization",
    ]
    assert second["nextCursor"] is None


@pytest.mark.parametrize(
    ("params", "field"),
    [
        ({"createdFrom": "yesterday"}, "createdFrom"),
        ({"createdTo": "2025-13-01"}, "createdTo"),
        ({"createdFrom": "2025-03-18", "createdTo": "2025-03-17"}, "createdTo"),
        ({"customerId": 0}, "customerId"),
        ({"customerId": "x"}, "customerId"),
    ],
)
def test_bad_filters_are_422_naming_the_parameter(
    client: TestClient, params: dict[str, Any], field: str
) -> None:
    for path in ("/invoices", "/invoices/scroll"):
        response = client.get(path, params=params)

        assert response.status_code == 422, path
        assert response.json()["detail"][0]["loc"] == ["query", field]


def test_a_page_deeper_than_the_limit_is_422_pointing_to_scroll(client: TestClient) -> None:
    page = settings.max_page_offset // 100 + 2

    response = client.get("/invoices", params={"page": page, "size": 100})

    assert response.status_code == 422
    (error,) = response.json()["detail"]
    assert error["loc"] == ["query", "page"]
    assert "GET /invoices/scroll" in error["msg"]


def test_a_page_past_the_end_within_the_limit_is_empty(client: TestClient) -> None:
    page = settings.max_page_offset // 100

    response = client.get("/invoices", params={"page": page, "size": 100})

    assert response.status_code == 200
    assert response.json()["items"] == []


def test_payment_history_lists_every_attempt_newest_first(
    client: TestClient, stand_in: StandInProvider
) -> None:
    invoice_id = create_pending_invoice(client)
    stand_in.answer(400, {"error": "payment failed", "reason": "Do not honour"})
    client.post(f"/invoice/pay/{invoice_id}", json=WORK_CARD)
    stand_in.answer(200, PAID_REPLY)
    client.post(f"/invoice/pay/{invoice_id}", json=WORK_CARD)

    response = client.get(f"/invoice/{invoice_id}/payments")

    assert response.status_code == 200
    items = response.json()["items"]
    assert [(i["status"], i["reason"]) for i in items] == [
        ("SUCCEEDED", None),
        ("DECLINED", "Do not honour"),
    ]
    assert items[0]["paymentId"] > items[1]["paymentId"]
    assert items[0]["card"] == {
        "number": "123456********5678",
        "expiry": "01-2040",
        "name": "Work Card",
    }
    assert items[0]["createdAt"].endswith("Z") or items[0]["createdAt"].endswith("+00:00")


def test_payment_history_of_an_unpaid_invoice_is_empty(client: TestClient) -> None:
    invoice_id = create_pending_invoice(client)

    response = client.get(f"/invoice/{invoice_id}/payments")

    assert response.status_code == 200
    assert response.json() == {"items": []}


def test_payment_history_of_an_unknown_invoice_is_404(client: TestClient) -> None:
    response = client.get(f"/invoice/{UNKNOWN_ID}/payments")

    assert response.status_code == 404
    assert response.json() == {"detail": f"Invoice {UNKNOWN_ID} not found"}


@pytest.mark.parametrize("path", ["/invoices", "/invoices/scroll"])
@pytest.mark.parametrize(
    ("name", "value"),
    [("createdFrom", "0001-01-01T00:00:00+01:00"), ("createdTo", "9999-12-31T23:00:00-05:00")],
)
def test_a_date_that_leaves_the_calendar_in_utc_is_422_naming_it(
    client: TestClient, path: str, name: str, value: str
) -> None:
    response = client.get(path, params={name: value})

    assert response.status_code == 422
    (error,) = response.json()["detail"]
    assert error["loc"] == ["query", name]
    assert "between 0001-01-01 and 9999-12-31" in error["msg"]

"""Exact totals without COUNT(*), and keyset scrolling through every invoice."""

from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlmodel import Session, func, select

from models import Invoice, InvoiceStatus, InvoiceStatusCount
from tests.support import direct_engine

CARD = {"number": "1234567812345678", "expiry": "01-2040", "name": "J Doe"}


def counts_table() -> dict[str, int]:
    """Per-status totals as the counts table holds them: the sum of each status's shards."""
    with Session(direct_engine) as session:
        rows = session.exec(
            select(
                InvoiceStatusCount.invoice_status, func.sum(InvoiceStatusCount.invoice_count)
            ).group_by(InvoiceStatusCount.invoice_status)
        ).all()
    return {status: int(total) for status, total in rows}


def counted_by_scan() -> dict[str, int]:
    with Session(direct_engine) as session:
        rows = session.exec(
            select(Invoice.invoice_status, func.count()).group_by(Invoice.invoice_status)
        ).all()
    return dict.fromkeys(InvoiceStatus, 0) | dict(rows)


def create(client: TestClient, **extra: Any) -> str:
    body = {"jobDescription": "Counted", "amount": 3, "customerId": 2, **extra}
    response = client.post("/invoice", json=body)
    assert response.status_code == 201
    invoice_id: str = response.json()["id"]
    return invoice_id


def test_status_counts_follow_creates_and_payments(client: TestClient) -> None:
    before = counts_table()

    create(client)
    create(client, card=CARD)
    client.post(f"/invoice/pay/{create(client)}", json=CARD)

    after = counts_table()
    assert after["PENDING"] - before["PENDING"] == 1
    assert after["PAID"] - before["PAID"] == 2
    assert after == counted_by_scan()


def test_list_totals_equal_a_full_count(client: TestClient) -> None:
    create(client)
    scanned = counted_by_scan()

    assert client.get("/invoices").json()["total"] == sum(scanned.values())
    for status in InvoiceStatus:
        listed = client.get("/invoices", params={"invoiceStatus": status}).json()
        assert listed["total"] == scanned[status]


def scroll_all(client: TestClient, size: int, **params: Any) -> list[dict[str, Any]]:
    items: list[dict[str, Any]] = []
    cursor = None
    while True:
        query = {"size": size, **params} | ({"cursor": cursor} if cursor else {})
        data = client.get("/invoices/scroll", params=query).json()
        items += data["items"]
        cursor = data["nextCursor"]
        if cursor is None:
            return items


def test_scrolling_returns_every_invoice_once_in_page_order(client: TestClient) -> None:
    for _ in range(12):
        create(client)
    total = client.get("/invoices").json()["total"]

    scrolled = scroll_all(client, size=7)
    paged = client.get("/invoices", params={"size": 100}).json()["items"]

    assert len(scrolled) == total
    assert len({item["id"] for item in scrolled}) == total
    assert [item["id"] for item in scrolled][:100] == [item["id"] for item in paged]


@pytest.mark.parametrize("status", list(InvoiceStatus))
def test_scrolling_with_a_filter_returns_only_that_status(client: TestClient, status: str) -> None:
    items = scroll_all(client, size=3, invoiceStatus=status)

    assert len(items) == counted_by_scan()[status]
    assert {item["invoiceStatus"] for item in items} <= {status}


def test_scroll_envelope_has_total_and_next_cursor(client: TestClient) -> None:
    create(client)
    create(client)

    response = client.get("/invoices/scroll", params={"size": 1})

    assert response.status_code == 200
    data = response.json()
    assert set(data) == {"items", "total", "size", "nextCursor"}
    assert (len(data["items"]), data["size"]) == (1, 1)
    assert data["total"] == sum(counted_by_scan().values())
    assert isinstance(data["nextCursor"], str)


@pytest.mark.parametrize("cursor", ["garbage", "!!!", "MjAyNnxub3QtYS11dWlk", "a" * 200])
def test_a_cursor_not_issued_here_is_422(client: TestClient, cursor: str) -> None:
    response = client.get("/invoices/scroll", params={"cursor": cursor})

    assert response.status_code == 422
    assert response.json()["detail"] == [
        {
            "type": "value_error",
            "loc": ["query", "cursor"],
            "msg": "cursor must be a nextCursor value returned by this endpoint",
        }
    ]


@pytest.mark.parametrize("size", [0, 101])
def test_scroll_size_outside_1_to_100_is_422(client: TestClient, size: int) -> None:
    assert client.get("/invoices/scroll", params={"size": size}).status_code == 422

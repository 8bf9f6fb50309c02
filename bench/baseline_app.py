"""The baseline for `make bench`: the least a FastAPI app can do for the same answers.

The same SQL as the real app (the invoice joined to its customer and successful payment; a
page plus a total from the counts table), with SQLAlchemy Core and PyMySQL, rows returned as
plain dicts: no ORM, no response model, no logging, no middleware.
"""

from typing import Any

from fastapi import FastAPI, HTTPException
from sqlalchemy import create_engine, text

from db import database_url
from settings import settings

engine = create_engine(database_url(settings), pool_size=40, max_overflow=0, pool_pre_ping=True)
app = FastAPI()

ROW = """
    SELECT i.id, i.job_description, i.customer_id, i.amount, i.invoice_status,
           c.customer_name, c.customer_email, p.card_number, p.card_expiry, p.card_name
    FROM invoice i
    JOIN customer c ON c.customer_id = i.customer_id
    LEFT JOIN payment p ON p.invoice_id = i.id AND p.payment_status = 'SUCCEEDED'
"""


def as_json(row: Any) -> dict[str, Any]:
    data = {
        "id": row.id,
        "jobDescription": row.job_description,
        "customerId": row.customer_id,
        "amount": float(row.amount),
        "customerName": row.customer_name,
        "customerEmail": row.customer_email,
        "invoiceStatus": row.invoice_status,
    }
    if row.card_number:
        data["card"] = {
            "number": row.card_number,
            "expiry": row.card_expiry,
            "name": row.card_name,
        }
    return data


@app.get("/invoice/{invoice_id}")
def read_invoice(invoice_id: str) -> dict[str, Any]:
    with engine.connect() as connection:
        row = connection.execute(text(ROW + " WHERE i.id = :id"), {"id": invoice_id}).first()
    if row is None:
        raise HTTPException(404)
    return as_json(row)


@app.get("/invoices")
def list_invoices(
    page: int = 1,
    size: int = 10,
    invoiceStatus: str | None = None,  # noqa: N803
) -> dict[str, Any]:
    status_filter = " WHERE invoice_status = :status" if invoiceStatus else ""
    params = {"status": invoiceStatus, "size": size, "offset": (page - 1) * size}
    page_ids = (
        "(SELECT id FROM invoice"
        + status_filter
        + " ORDER BY created_at DESC, id DESC LIMIT :size OFFSET :offset) AS page"
    )
    with engine.connect() as connection:
        total = connection.execute(
            text(
                "SELECT COALESCE(SUM(invoice_count), 0) FROM invoice_status_count" + status_filter
            ),
            params,
        ).scalar_one()
        rows = connection.execute(
            text(
                ROW.replace("FROM invoice i", f"FROM {page_ids} JOIN invoice i ON i.id = page.id")
                + " ORDER BY i.created_at DESC, i.id DESC"
            ),
            params,
        ).all()
    pages = -(-int(total) // size)
    items = [as_json(row) for row in rows]
    return {"items": items, "total": int(total), "page": page, "size": size, "pages": pages}

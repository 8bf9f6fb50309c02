"""The baselines for `make bench`: the least a FastAPI app can do for the same answers.

The same SQL as the real app (the invoice joined to its customer and successful payment; a
page plus a total from the counts table), rows returned as plain dicts: no ORM, no response
model, no logging, no middleware. Two of them, served the same way as the app (uvicorn with
uvloop and httptools):

* `async_app`: `async def` routes over SQLAlchemy's asyncio engine and aiomysql, the bar the
  app is held to;
* `sync_app`: `def` routes over SQLAlchemy Core and PyMySQL in FastAPI's threadpool, for
  reference.
"""

from typing import Any

import httpx
from fastapi import FastAPI, HTTPException
from sqlalchemy import create_engine, text
from sqlalchemy.ext.asyncio import create_async_engine

from settings import Settings

settings = Settings()  # the baselines read the same `.env` and environment as the app

ROW = """
    SELECT i.id, i.job_description, i.customer_id, i.amount, i.invoice_status,
           c.customer_name, c.customer_email, p.card_number, p.card_expiry, p.card_name
    FROM invoice i
    JOIN customer c ON c.customer_id = i.customer_id
    LEFT JOIN payment p ON p.invoice_id = i.id AND p.payment_status = 'SUCCEEDED'
"""
READ = text(ROW + " WHERE i.id = :id")


def list_statements(invoice_status: str | None) -> tuple[Any, Any]:
    status_filter = " WHERE invoice_status = :status" if invoice_status else ""
    page_ids = (
        "(SELECT id FROM invoice"
        + status_filter
        + " ORDER BY created_at DESC, id DESC LIMIT :size OFFSET :offset) AS page"
    )
    total = text("SELECT COALESCE(SUM(invoice_count), 0) FROM invoice_status_count" + status_filter)
    rows = text(
        ROW.replace("FROM invoice i", f"FROM {page_ids} JOIN invoice i ON i.id = page.id")
        + " ORDER BY i.created_at DESC, i.id DESC"
    )
    return total, rows


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
        data["card"] = {"number": row.card_number, "expiry": row.card_expiry, "name": row.card_name}
    return data


def envelope(rows: Any, total: int, page: int, size: int) -> dict[str, Any]:
    items = [as_json(row) for row in rows]
    return {"items": items, "total": total, "page": page, "size": size, "pages": -(-total // size)}


sync_engine = create_engine(
    settings.database_url("pymysql"), pool_size=40, max_overflow=0, pool_pre_ping=True
)
async_engine = create_async_engine(
    settings.database_url(), pool_size=20, max_overflow=0, pool_pre_ping=True
)
sync_app = FastAPI()
async_app = FastAPI()


@sync_app.get("/invoice/{invoice_id}")
def read_invoice_sync(invoice_id: str) -> dict[str, Any]:
    with sync_engine.connect() as connection:
        row = connection.execute(READ, {"id": invoice_id}).first()
    if row is None:
        raise HTTPException(404)
    return as_json(row)


@sync_app.get("/invoices")
def list_invoices_sync(
    page: int = 1,
    size: int = 10,
    invoiceStatus: str | None = None,  # noqa: N803
) -> dict[str, Any]:
    params = {"status": invoiceStatus, "size": size, "offset": (page - 1) * size}
    total, rows = list_statements(invoiceStatus)
    with sync_engine.connect() as connection:
        count = int(connection.execute(total, params).scalar_one())
        return envelope(connection.execute(rows, params).all(), count, page, size)


@async_app.get("/invoice/{invoice_id}")
async def read_invoice_async(invoice_id: str) -> dict[str, Any]:
    async with async_engine.connect() as connection:
        row = (await connection.execute(READ, {"id": invoice_id})).first()
    if row is None:
        raise HTTPException(404)
    return as_json(row)


@async_app.get("/invoices")
async def list_invoices_async(
    page: int = 1,
    size: int = 10,
    invoiceStatus: str | None = None,  # noqa: N803
) -> dict[str, Any]:
    params = {"status": invoiceStatus, "size": size, "offset": (page - 1) * size}
    total, rows = list_statements(invoiceStatus)
    async with async_engine.connect() as connection:
        count = int((await connection.execute(total, params)).scalar_one())
        return envelope((await connection.execute(rows, params)).all(), count, page, size)


# The pay flow with the app's durable steps and nothing else: claim (the invoice row locked, no
# attempt in flight, a PROCESSING attempt recorded), the FakePay call with no transaction
# open, settle (invoice PAID and counted, attempt SUCCEEDED), then the invoice read back.
LOCK = text("SELECT invoice_status FROM invoice WHERE id = :id FOR UPDATE")
IN_FLIGHT = text(
    "SELECT 1 FROM payment WHERE invoice_id = :id AND payment_status = 'PROCESSING' LIMIT 1"
)
ATTEMPT = text(
    "INSERT INTO payment (invoice_id, card_number, card_name, card_expiry) "
    "VALUES (:id, :number, :name, :expiry)"
)
PAID = text("UPDATE invoice SET invoice_status = 'PAID' WHERE id = :id")
COUNT_PAID = text(
    "UPDATE invoice_status_count SET invoice_count = invoice_count + "
    "IF(invoice_status = 'PAID', 1, -1) WHERE invoice_status IN ('PENDING', 'PAID') "
    "AND shard = CONNECTION_ID() % 16"
)
SUCCEEDED = text("UPDATE payment SET payment_status = 'SUCCEEDED' WHERE id = :payment_id")
fakepay = httpx.AsyncClient(timeout=10)


@async_app.post("/invoice/pay/{invoice_id}", status_code=201)
async def pay_invoice_async(invoice_id: str, card: dict[str, str]) -> dict[str, Any]:
    masked = f"{card['number'][:6]}{'*' * 8}{card['number'][-4:]}"
    params = {"id": invoice_id, "number": masked, "name": card["name"], "expiry": card["expiry"]}
    async with async_engine.begin() as connection:
        status = (await connection.execute(LOCK, params)).scalar_one_or_none()
        if status != "PENDING" or (await connection.execute(IN_FLIGHT, params)).first():
            raise HTTPException(409)
        payment_id = (await connection.execute(ATTEMPT, params)).lastrowid
    request = {"transactionId": invoice_id, "card": card}
    reply = await fakepay.post(settings.fakepay_url, json=request)
    if reply.status_code != 200:
        raise HTTPException(502)
    async with async_engine.begin() as connection:
        await connection.execute(PAID, params)
        await connection.execute(COUNT_PAID)
        await connection.execute(SUCCEEDED, {"payment_id": payment_id})
        row = (await connection.execute(READ, params)).one()
    return as_json(row)

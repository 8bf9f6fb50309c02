"""Invoices: read one, list a page, scroll with a cursor, create.

Reads are plain column selects (rows, not ORM objects) built once at import, so a request
skips building and cache-keying them, and turned into `InvoicePublic` by `to_public`.
"""

import uuid
from collections.abc import Sequence
from datetime import datetime
from typing import Any

from fastapi import HTTPException, status
from fastapi.exceptions import RequestValidationError
from fastapi_pagination import Page, Params, create_page
from loguru import logger
from sqlalchemy import Integer, Row, bindparam, func
from sqlalchemy.exc import IntegrityError
from sqlalchemy.sql import Subquery
from sqlmodel import col, select
from sqlmodel.ext.asyncio.session import AsyncSession
from sqlmodel.sql.expression import Select, SelectOfScalar

from idempotency import IdempotencyKeyInUseError, IdempotentRequest
from models import (
    Customer,
    Invoice,
    InvoiceCreate,
    InvoicePublic,
    InvoiceScrollPage,
    InvoiceStatus,
    InvoiceStatusCount,
    MaskedCard,
    Payment,
    PaymentStatus,
    decode_cursor,
    encode_cursor,
    uuid7,
)

# A statement of `invoice_rows`, and one row of its result: the columns by name.
InvoiceSelect = Select[*tuple[Any, ...]]
InvoiceRow = Row[*tuple[Any, ...]]


def invoice_rows(page: Subquery | None = None) -> InvoiceSelect:
    """The columns of InvoicePublic: an invoice, its customer and, once paid here, the card.
    One statement, plain columns rather than ORM entities (a read is a read).

    With `page` (a subquery of invoice ids) the statement starts from those ids, so the
    planner joins the other tables to a handful of rows instead of sorting them all.
    """
    query: InvoiceSelect = Select(
        col(Invoice.id),
        col(Invoice.job_description),
        col(Invoice.amount),
        col(Invoice.customer_id),
        col(Invoice.invoice_status),
        col(Invoice.created_at),
        col(Customer.customer_name),
        col(Customer.customer_email),
        col(Payment.card_number),
        col(Payment.card_expiry),
        col(Payment.card_name),
    )
    if page is not None:
        query = query.select_from(page).join(Invoice, col(Invoice.id) == page.c.id)
    return query.join(Customer, col(Customer.customer_id) == col(Invoice.customer_id)).outerjoin(
        Payment,
        (col(Payment.invoice_id) == col(Invoice.id))
        & (col(Payment.payment_status) == PaymentStatus.SUCCEEDED),
    )


READ_INVOICE = invoice_rows().where(col(Invoice.id) == bindparam("invoice_id"))


async def fetch(
    session: AsyncSession, statement: InvoiceSelect, params: dict[str, Any]
) -> Sequence[InvoiceRow]:
    """Run a read on the session's connection as a Core statement: rows by column name, without
    the ORM's per-statement bookkeeping, which a read of plain columns does not need."""
    connection = await session.connection()
    return (await connection.execute(statement, params)).all()


def to_public(row: InvoiceRow) -> InvoicePublic:
    """A row of `invoice_rows` as the API shows it. The row was validated on its way into the
    database and its columns have the schema's types, so it is not validated again here."""
    card = None
    if row.card_number is not None:
        card = MaskedCard.model_construct(
            number=row.card_number, expiry=row.card_expiry, name=row.card_name
        )
    return InvoicePublic.model_construct(
        id=uuid.UUID(row.id),
        job_description=row.job_description,
        amount=row.amount,
        customer_id=row.customer_id,
        customer_name=row.customer_name,
        customer_email=row.customer_email,
        invoice_status=InvoiceStatus(row.invoice_status),
        card=card,
    )


def public_invoice(
    invoice: Invoice, customer: Customer, card: MaskedCard | None = None
) -> InvoicePublic:
    return InvoicePublic.model_validate(
        {
            **invoice.model_dump(),
            "customer_name": customer.customer_name,
            "customer_email": customer.customer_email,
            "card": card,
        }
    )


async def get_invoice_or_404(session: AsyncSession, invoice_id: uuid.UUID) -> InvoicePublic:
    rows = await fetch(session, READ_INVOICE, {"invoice_id": str(invoice_id)})
    if not rows:
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"Invoice {invoice_id} not found")
    return to_public(rows[0])


NEWEST_FIRST = (col(Invoice.created_at).desc(), col(Invoice.id).desc())


def count_statement(*, filtered: bool) -> SelectOfScalar[Any]:
    query = select(func.coalesce(func.sum(InvoiceStatusCount.invoice_count), 0))
    if filtered:
        query = query.where(col(InvoiceStatusCount.invoice_status) == bindparam("invoice_status"))
    return query


def page_statement(*, filtered: bool, keyset: bool) -> InvoiceSelect:
    """One page of invoices, newest first. The ids come from the (status,) created_at, id index
    alone (a deferred join); the other columns and tables are joined to those ids only. The
    page starts at an `offset`, or (keyset) strictly after a (created_at, id) position."""
    ids = select(Invoice.id)
    if filtered:
        ids = ids.where(col(Invoice.invoice_status) == bindparam("invoice_status"))
    if keyset:
        created_at: Any = bindparam("after_created_at")
        invoice_id: Any = bindparam("after_id")
        ids = ids.where(
            (col(Invoice.created_at) < created_at)
            | ((col(Invoice.created_at) == created_at) & (col(Invoice.id) < invoice_id))
        )
    else:
        ids = ids.offset(bindparam("offset", type_=Integer))
    page = ids.order_by(*NEWEST_FIRST).limit(bindparam("limit", type_=Integer)).subquery("page")
    return invoice_rows(page).order_by(*NEWEST_FIRST)


COUNT_STATEMENTS = {filtered: count_statement(filtered=filtered) for filtered in (False, True)}
PAGE_STATEMENTS = {
    (filtered, keyset): page_statement(filtered=filtered, keyset=keyset)
    for filtered in (False, True)
    for keyset in (False, True)
}


def status_params(invoice_status: InvoiceStatus | None) -> dict[str, Any]:
    return {} if invoice_status is None else {"invoice_status": invoice_status.value}


async def count_invoices(session: AsyncSession, invoice_status: InvoiceStatus | None) -> int:
    """Exact totals from the per-status counts table: O(1) however many invoices exist."""
    statement = COUNT_STATEMENTS[invoice_status is not None]
    connection = await session.connection()
    return int(await connection.scalar(statement, status_params(invoice_status)))


async def list_page(
    session: AsyncSession, invoice_status: InvoiceStatus | None, params: Params
) -> Page[InvoicePublic]:
    """Newest first, id as tie-breaker; a page past the end costs no item query."""
    total = await count_invoices(session, invoice_status)
    raw = params.to_raw_params().as_limit_offset()
    items: list[InvoicePublic] = []
    if raw.offset is not None and raw.offset < total:
        statement = PAGE_STATEMENTS[(invoice_status is not None, False)]
        page = {"offset": raw.offset, "limit": raw.limit, **status_params(invoice_status)}
        items = [to_public(row) for row in await fetch(session, statement, page)]
    return create_page(items, total=total, params=params)  # type: ignore[return-value]


def decode_cursor_or_422(cursor: str) -> tuple[datetime, str]:
    try:
        return decode_cursor(cursor)
    except ValueError:
        raise RequestValidationError(
            [
                {
                    "type": "value_error",
                    "loc": ("query", "cursor"),
                    "msg": "cursor must be a nextCursor value returned by this endpoint",
                }
            ]
        ) from None


async def scroll(
    session: AsyncSession, invoice_status: InvoiceStatus | None, size: int, cursor: str | None
) -> InvoiceScrollPage:
    """Keyset pagination: continue strictly after the last (created_at, id) seen."""
    slice_params: dict[str, Any] = {"limit": size + 1, **status_params(invoice_status)}
    if cursor is None:
        slice_params["offset"] = 0
    else:
        created_at, invoice_id = decode_cursor_or_422(cursor)
        slice_params |= {"after_created_at": created_at, "after_id": invoice_id}
    statement = PAGE_STATEMENTS[(invoice_status is not None, cursor is not None)]
    rows = await fetch(session, statement, slice_params)
    next_cursor = None
    if len(rows) > size:
        last = rows[size - 1]
        next_cursor = encode_cursor(last.created_at, last.id)
    return InvoiceScrollPage(
        items=[to_public(row) for row in rows[:size]],
        total=await count_invoices(session, invoice_status),
        size=size,
        next_cursor=next_cursor,
    )


async def create_pending_invoice(
    session: AsyncSession, request: InvoiceCreate, idempotency: IdempotentRequest
) -> tuple[Invoice, Customer]:
    """Insert a PENDING invoice, and the request's Idempotency-Key in the same transaction."""
    customer = await session.get(Customer, request.customer_id)
    if customer is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"Customer {request.customer_id} not found")
    invoice = Invoice(
        id=str(uuid7()),
        job_description=request.job_description,
        amount=request.amount,
        customer_id=request.customer_id,
        invoice_status=InvoiceStatus.PENDING,
    )
    session.add(invoice)
    idempotency.reserve(session, invoice.id)
    try:
        await session.commit()
    except IntegrityError as error:
        if idempotency.taken_by_twin(error):
            raise IdempotencyKeyInUseError() from None
        raise
    idempotency.reserved = idempotency.changed = True
    logger.info(
        "invoice {} created for customer {}: {}", invoice.id, customer.customer_id, invoice.amount
    )
    return invoice, customer

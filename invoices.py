"""Invoices: read one, list a page, scroll with a cursor, create.

Reads are plain column selects (rows, not ORM objects) built once at import, so a request
skips building and cache-keying them, run with `db.execute_core` on the connection a read
borrows (or, inside a write, on its session's), and turned into `InvoicePublic` by
`to_public`.
"""

import math
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import cache
from typing import Annotated, Any

from fastapi import Depends, Query, Request
from fastapi.responses import Response
from fastapi_pagination import Page, Params, create_page
from loguru import logger
from pydantic import BaseModel, BeforeValidator, Field, ValidationInfo, field_validator
from sqlalchemy import (
    ColumnElement,
    Integer,
    Row,
    bindparam,
    case,
    func,
    insert,
    literal_column,
    update,
)
from sqlalchemy.dialects.mysql import DATETIME
from sqlalchemy.sql import Subquery
from sqlmodel import col, select
from sqlmodel.ext.asyncio.session import AsyncSession
from sqlmodel.sql.expression import Select, SelectOfScalar

from api_docs import invalid
from customers import CustomerNotFoundError
from db import Database, execute_core, retry_conflicts
from errors import ApiError
from idempotency import IdempotentRequest, Reply
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
    PaymentHistory,
    PaymentListItem,
    PaymentPublic,
    PaymentStatus,
    decode_cursor,
    encode_cursor,
    uuid7,
)
from observability import add_log_fields
from settings import Settings

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


# The invoice whose id is the statement's `invoice_id` parameter.
THIS_INVOICE = col(Invoice.id) == bindparam("invoice_id")
READ_INVOICE = invoice_rows().where(THIS_INVOICE)


async def fetch(
    db: Database, statement: InvoiceSelect, params: dict[str, Any]
) -> Sequence[InvoiceRow]:
    """Rows by column name, read as a Core statement (`db.execute_core`)."""
    return (await execute_core(db, statement, params)).all()


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


async def find_invoice(db: Database, invoice_id: str) -> InvoicePublic | None:
    rows = await fetch(db, READ_INVOICE, {"invoice_id": invoice_id})
    return to_public(rows[0]) if rows else None


async def get_invoice_or_404(db: Database, invoice_id: uuid.UUID) -> InvoicePublic:
    invoice = await find_invoice(db, str(invoice_id))
    if invoice is None:
        raise InvoiceNotFoundError(str(invoice_id))
    return invoice


class InvoiceNotFoundError(ApiError):
    status_code = 404
    documented = "No invoice has this id"

    def __init__(self, invoice_id: str) -> None:
        super().__init__(f"Invoice {invoice_id} not found")


class InvoiceConflictError(ApiError):
    """An invoice whose state forbids the change asked for."""

    status_code = 409
    documented = "The invoice's state forbids it: the detail says why and what to do"


class PaymentInProgressError(InvoiceConflictError):
    documented = "A payment for the invoice is in flight"

    def __init__(self, invoice_id: str) -> None:
        super().__init__(
            f"A payment for invoice {invoice_id} is in progress; read the invoice again in a "
            "few seconds before paying or cancelling it"
        )


class OutcomeUnknownError(InvoiceConflictError):
    """A payment attempt that may have charged the card, with a provider that does not
    deduplicate: nothing more may happen to the invoice until an operator resolves it."""

    documented = "A payment attempt has an unknown outcome; the detail says how to resolve it"

    def __init__(self, invoice_id: str, payment_id: int) -> None:
        super().__init__(
            f"Payment attempt {payment_id} of invoice {invoice_id} has an unknown outcome: the "
            "card may have been charged, and paying again could charge it twice. Check the "
            f"transaction {invoice_id} with the provider, then resolve the attempt with "
            f"POST /invoice/{invoice_id}/payments/{payment_id}/resolve and "
            '{"outcome": "SUCCEEDED"} if it was charged or {"outcome": "FAILED"} if not '
            "(an admin key is needed when API keys are on)"
        )


LOCK_INVOICE = select(col(Invoice.invoice_status)).where(THIS_INVOICE).with_for_update()
CANCEL_INVOICE = update(Invoice).where(THIS_INVOICE).values(invoice_status=InvoiceStatus.CANCELLED)


async def lock_invoice(session: AsyncSession, invoice_id: str) -> InvoiceStatus | None:
    """The invoice's status, its row locked until the transaction ends: the one lock that
    orders a claim, a settle and a cancel of the same invoice (the customer row is never
    locked). None when there is no such invoice."""
    locked = await execute_core(session, LOCK_INVOICE, {"invoice_id": invoice_id})
    status = locked.scalar_one_or_none()
    return None if status is None else InvoiceStatus(status)


NEWEST_FIRST = (col(Invoice.created_at).desc(), col(Invoice.id).desc())


@dataclass(frozen=True)
class InvoiceFilter:
    """What a list or scroll request narrows the invoices to; every part optional."""

    invoice_status: InvoiceStatus | None = None
    customer_id: int | None = None
    created_from: datetime | None = None  # inclusive, UTC
    created_to: datetime | None = None  # exclusive, UTC

    @property
    def shape(self) -> "FilterShape":
        """Which parts are set: one prebuilt statement serves each shape."""
        return FilterShape(
            self.invoice_status is not None,
            self.customer_id is not None,
            self.created_from is not None,
            self.created_to is not None,
        )

    def params(self) -> dict[str, Any]:
        values = {
            "invoice_status": self.invoice_status.value if self.invoice_status else None,
            "customer_id": self.customer_id,
            "created_from": self.created_from,
            "created_to": self.created_to,
        }
        return {name: value for name, value in values.items() if value is not None}


@dataclass(frozen=True)
class FilterShape:
    status: bool = False
    customer: bool = False
    created_from: bool = False
    created_to: bool = False


def conditions(shape: FilterShape) -> list[ColumnElement[bool]]:
    where: list[ColumnElement[bool]] = []
    if shape.status:
        where.append(col(Invoice.invoice_status) == bindparam("invoice_status"))
    if shape.customer:
        where.append(col(Invoice.customer_id) == bindparam("customer_id"))
    if shape.created_from:
        where.append(col(Invoice.created_at) >= bindparam("created_from"))
    if shape.created_to:
        where.append(col(Invoice.created_at) < bindparam("created_to"))
    return where


@cache
def count_statement(shape: FilterShape) -> SelectOfScalar[Any]:
    """Exact totals. By status alone (or nothing) they come from the per-status counts table,
    O(1) however many invoices exist; any other filter counts the matching index range."""
    if not (shape.customer or shape.created_from or shape.created_to):
        query = select(func.coalesce(func.sum(InvoiceStatusCount.invoice_count), 0))
        if shape.status:
            status = col(InvoiceStatusCount.invoice_status) == bindparam("invoice_status")
            query = query.where(status)
        return query
    return select(func.count()).select_from(Invoice).where(*conditions(shape))


@cache
def page_statement(shape: FilterShape, *, keyset: bool) -> InvoiceSelect:
    """One page of invoices, newest first. The ids come from a (filter columns,) created_at, id
    index alone (a deferred join); the other columns and tables are joined to those ids only.
    The page starts at an `offset`, or (keyset) strictly after a (created_at, id) position.
    Built once per shape: a request then skips building and cache-keying its statement."""
    ids = select(Invoice.id).where(*conditions(shape))
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


async def count_invoices(db: Database, where: InvoiceFilter) -> int:
    return int((await execute_core(db, count_statement(where.shape), where.params())).scalar_one())


async def list_page(db: Database, query: "InvoicePageQuery") -> Page[InvoicePublic]:
    """Newest first, id as tie-breaker; a page past the end costs no item query."""
    where, params = query.where, query.params
    raw = params.to_raw_params().as_limit_offset()
    offset = raw.offset or 0
    total = await count_invoices(db, where)
    items: list[InvoicePublic] = []
    if offset < total:
        page = {"offset": offset, "limit": raw.limit, **where.params()}
        rows = await fetch(db, page_statement(where.shape, keyset=False), page)
        items = [to_public(row) for row in rows]
    return create_page(items, total=total, params=params)  # type: ignore[return-value]


def checked_page(page: int, size: int, config: Settings) -> Params:
    """A page number is refused at once when it starts deeper than MAX_PAGE_OFFSET rows: an
    offset that deep costs the database more than any page is worth."""
    offset = (page - 1) * size
    if offset > config.max_page_offset:
        raise invalid(
            ("query", "page"),
            f"page {page} starts {offset} rows deep, past the {config.max_page_offset} that "
            "page numbers reach; to go deeper through invoices, continue with "
            "GET /invoices/scroll, whose cost does not grow with depth",
        )
    return Params(page=page, size=size)


async def page_params(
    request: Request,
    page: Annotated[int, Query(ge=1, description="Page number")] = 1,
    size: Annotated[int, Query(ge=1, le=100, description="Items per page")] = 10,
) -> Params:
    """The page of a list other than the invoices' (customers, payments)."""
    return checked_page(page, size, request.state.settings)


PageDep = Annotated[Params, Depends(page_params)]


def decode_cursor_or_422(cursor: str) -> tuple[datetime, str]:
    try:
        return decode_cursor(cursor)
    except ValueError:
        raise invalid(
            ("query", "cursor"), "cursor must be a nextCursor value returned by this endpoint"
        ) from None


async def scroll(db: Database, query: "InvoiceSliceQuery") -> InvoiceScrollPage:
    """Keyset pagination: continue strictly after the last (created_at, id) seen."""
    where, size = query.where, query.size
    slice_params: dict[str, Any] = {"limit": size + 1, **where.params()}
    if query.after is None:
        slice_params["offset"] = 0
    else:
        created_at, invoice_id = query.after
        slice_params |= {"after_created_at": created_at, "after_id": invoice_id}
    statement = page_statement(where.shape, keyset=query.after is not None)
    rows = await fetch(db, statement, slice_params)
    next_cursor = None
    if len(rows) > size:
        last = rows[size - 1]
        next_cursor = encode_cursor(last.created_at, last.id)
    return InvoiceScrollPage(
        items=[to_public(row) for row in rows[:size]],
        total=await count_invoices(db, where),
        size=size,
        next_cursor=next_cursor,
    )


# The counts per status (`invoice_status_count`) move in the transaction of every change they
# count, in the shard row of the connection that makes it: a new invoice is one more PENDING,
# a status change one less of the old status and one more of the new.
SHARD = col(InvoiceStatusCount.shard) == func.connection_id() % 16
COUNT_CREATED = (
    update(InvoiceStatusCount)
    .where(SHARD, col(InvoiceStatusCount.invoice_status) == InvoiceStatus.PENDING)
    .values(invoice_count=col(InvoiceStatusCount.invoice_count) + 1)
)
COUNT_MOVED = (
    update(InvoiceStatusCount)
    .where(
        SHARD,
        col(InvoiceStatusCount.invoice_status).in_([bindparam("old_status"), bindparam("status")]),
    )
    .values(
        invoice_count=col(InvoiceStatusCount.invoice_count)
        + case((col(InvoiceStatusCount.invoice_status) == bindparam("status"), 1), else_=-1)
    )
)


async def count_status_change(
    session: AsyncSession, old: InvoiceStatus, new: InvoiceStatus
) -> None:
    """Move one invoice from `old` to `new` in the counts, in the caller's transaction."""
    await execute_core(session, COUNT_MOVED, {"old_status": old, "status": new})


CREATE_INVOICE = insert(Invoice.metadata.tables["invoice"])


async def create_pending_invoice(
    session: AsyncSession, request: InvoiceCreate, idempotency: IdempotentRequest
) -> InvoicePublic:
    """Insert a PENDING invoice, count it, and record the request's Idempotency-Key, all in
    one transaction: with a card, as the point a retry resumes from; without, with the reply.
    The reply is made from what was sent: nothing the server wrote (such as the creation
    time) needs reading back. A retry that resumes a create gets the invoice it made, to pay."""
    if idempotency.created_invoice_id is not None:
        created = await get_invoice_or_404(session, uuid.UUID(idempotency.created_invoice_id))
        await session.commit()  # end the read: the payment's claim begins its own transaction
        return created
    values = request.model_dump(include={"job_description", "amount", "customer_id"})

    async def insert_and_count() -> InvoicePublic:
        customer = await session.get(Customer, request.customer_id)
        if customer is None:
            raise CustomerNotFoundError(request.customer_id)
        invoice_id = str(uuid7())
        await execute_core(session, CREATE_INVOICE, {"id": invoice_id, **values})
        await execute_core(session, COUNT_CREATED, {})
        created = InvoicePublic.model_construct(
            id=uuid.UUID(invoice_id),
            **values,
            customer_name=customer.customer_name,
            customer_email=customer.customer_email,
            invoice_status=InvoiceStatus.PENDING,
        )
        if request.card is None:
            idempotency.record_reply(session, invoice_id, Reply.of(created, 201))
        else:
            idempotency.record_invoice_created(session, invoice_id)
        with idempotency.twin_refused():
            await session.commit()
        return created

    # A lost race here (on a cluster: a counts shard or the key row written on another node
    # at the same moment) changed nothing; run again, a twin's committed key row is then a
    # duplicate key, answered as the key in use.
    created = await retry_conflicts(session, insert_and_count)
    add_log_fields(invoice_id=created.id)
    logger.info(
        "invoice {} created for customer {}: {}", created.id, request.customer_id, request.amount
    )
    return created


def to_utc(value: object) -> object:
    """An ISO 8601 date or date-time as a naive UTC datetime (the columns' form); a
    date-time without an offset is taken as UTC."""
    if not isinstance(value, str):
        return value
    try:
        moment = datetime.fromisoformat(value)
    except ValueError:
        raise ValueError(
            "must be an ISO 8601 date or date-time, such as 2025-03-17 or 2025-03-17T09:00:00Z"
        ) from None
    if moment.tzinfo is None:
        return moment
    try:
        return moment.astimezone(UTC).replace(tzinfo=None)
    except OverflowError:  # 0001-01-01T00:00+01:00 is before the first UTC moment there is
        raise ValueError("must fall between 0001-01-01 and 9999-12-31 in UTC") from None


UtcDateTime = Annotated[datetime, BeforeValidator(to_utc)]


class InvoiceFilterQuery(BaseModel):
    """The filters of `GET /invoices` and `/invoices/scroll`, each an optional query parameter."""

    invoice_status: InvoiceStatus | None = Field(
        None, alias="invoiceStatus", description="Only this status"
    )
    customer_id: int | None = Field(
        None, alias="customerId", ge=1, le=2_147_483_647, description="Only this customer's"
    )
    created_from: UtcDateTime | None = Field(
        None,
        alias="createdFrom",
        description="Created at or after this ISO 8601 date or date-time (UTC unless an offset "
        "is given)",
    )
    created_to: UtcDateTime | None = Field(
        None, alias="createdTo", description="Created before this date or date-time"
    )

    @field_validator("created_to")
    @classmethod
    def later_than_created_from(
        cls, created_to: datetime | None, info: ValidationInfo
    ) -> datetime | None:
        created_from = info.data.get("created_from")
        if created_from and created_to and created_from >= created_to:
            raise ValueError("createdTo must be later than createdFrom")
        return created_to

    def where(self) -> InvoiceFilter:
        return InvoiceFilter(
            self.invoice_status, self.customer_id, self.created_from, self.created_to
        )


class InvoiceListQuery(InvoiceFilterQuery):
    """The query parameters of `GET /invoices`: the filters and a page."""

    page: int = Field(1, ge=1, description="Page number")
    size: int = Field(10, ge=1, le=100, description="Items per page")


class InvoiceScrollQuery(InvoiceFilterQuery):
    """The query parameters of `GET /invoices/scroll`: the filters and a slice."""

    size: int = Field(10, ge=1, le=100, description="Invoices per slice")
    cursor: str | None = Field(
        None,
        max_length=200,
        description="`nextCursor` of the previous slice; omit to start",
    )


@dataclass(frozen=True)
class InvoicePageQuery:
    """A `GET /invoices` request, checked: which invoices, which page."""

    where: InvoiceFilter
    params: Params


@dataclass(frozen=True)
class InvoiceSliceQuery:
    """A `GET /invoices/scroll` request, checked: which invoices, how many, after where."""

    where: InvoiceFilter
    size: int
    after: tuple[datetime, str] | None  # the (created_at, id) of the last invoice seen


async def invoice_page_query(
    request: Request, query: Annotated[InvoiceListQuery, Query()]
) -> InvoicePageQuery:
    """Filters, page and page depth of a list request, resolved in one dependency: its query
    parameters validated as one model, the depth checked against the app's settings."""
    params = checked_page(query.page, query.size, request.state.settings)
    return InvoicePageQuery(query.where(), params)


async def invoice_slice_query(query: Annotated[InvoiceScrollQuery, Query()]) -> InvoiceSliceQuery:
    """Filters, size and cursor of a scroll request, resolved in one dependency."""
    after = None if query.cursor is None else decode_cursor_or_422(query.cursor)
    return InvoiceSliceQuery(query.where(), query.size, after)


InvoicePageDep = Annotated[InvoicePageQuery, Depends(invoice_page_query)]
InvoiceSliceDep = Annotated[InvoiceSliceQuery, Depends(invoice_slice_query)]


async def cancel_invoice(
    session: AsyncSession, invoice_id: uuid.UUID, idempotency: IdempotentRequest, config: Settings
) -> InvoicePublic | Response:
    """PENDING -> CANCELLED under the invoice row lock, the lock a payment's claim takes too,
    so a cancel and a pay of one invoice never both succeed. Cancelling again changes nothing.
    The reply is read, and stored under the Idempotency-Key, inside the same transaction:
    once the cancel is committed, nothing is left that could fail and leave its client unsure."""
    if replay := await idempotency.begin(session, None):
        return replay
    key = str(invoice_id)

    async def cancel_once() -> tuple[InvoicePublic, bool]:
        with idempotency.twin_refused():
            async with session.begin():
                status = await lock_invoice(session, key)
                if status is None:
                    raise InvoiceNotFoundError(key)
                if status == InvoiceStatus.PAID:
                    raise InvoiceConflictError(
                        f"Invoice {key} is PAID; a paid invoice cannot be cancelled"
                    )
                cancelled_now = status == InvoiceStatus.PENDING
                if cancelled_now:
                    await refuse_if_payment_unsettled(session, key, config)
                    await execute_core(session, CANCEL_INVOICE, {"invoice_id": key})
                    await count_status_change(session, status, InvoiceStatus.CANCELLED)
                cancelled = await get_invoice_or_404(session, invoice_id)
                if cancelled_now:
                    idempotency.record_reply(session, key, Reply.of(cancelled))
                return cancelled, cancelled_now

    # A lost race (on a cluster: a pay's claim or a counts shard certified first on another
    # node) changed nothing: the next try reads the invoice afresh and decides again.
    cancelled, cancelled_now = await retry_conflicts(session, cancel_once)
    if cancelled_now:
        logger.info("invoice {} cancelled", key)
    return cancelled


@cache
def unsettled_attempts(stale_after_s: int) -> Select[int | None, str, bool]:
    """Every attempt of the invoice that is PROCESSING or UNKNOWN, each with whether it is
    older than `stale_after_s` (a PROCESSING one that old belongs to a request that is gone)."""
    return select(
        col(Payment.id),
        col(Payment.payment_status),
        col(Payment.created_at) < stale_cutoff(stale_after_s),
    ).where(
        col(Payment.invoice_id) == bindparam("invoice_id"),
        col(Payment.payment_status).in_([PaymentStatus.PROCESSING, PaymentStatus.UNKNOWN]),
    )


async def refuse_if_payment_unsettled(
    session: AsyncSession, invoice_id: str, config: Settings
) -> None:
    """409 while any attempt of the invoice is in flight or has an unknown outcome (a
    PROCESSING attempt past the stale margin may have been charged: it is unknown too)."""
    stale_after_s = math.ceil(config.payment_stale_after_s)
    found = await execute_core(
        session, unsettled_attempts(stale_after_s), {"invoice_id": invoice_id}
    )
    attempts = found.all()
    if any(status == PaymentStatus.PROCESSING and not stale for _, status, stale in attempts):
        raise PaymentInProgressError(invoice_id)
    if attempts:
        raise OutcomeUnknownError(invoice_id, max(payment_id for payment_id, _, _ in attempts))


def stale_cutoff(seconds: int) -> ColumnElement[datetime]:
    """Server time, so the app's and the database's clocks never need to agree."""
    return literal_column(f"NOW(6) - INTERVAL {int(seconds)} SECOND", type_=DATETIME(fsp=6))


def as_utc(moment: datetime | None) -> datetime:
    """A column's naive UTC time, marked as UTC for the wire."""
    assert moment is not None  # NOT NULL columns with a server default
    return moment.replace(tzinfo=UTC)


# An attempt as the API shows it: every column but the markers.
PAYMENT_COLUMNS = (
    col(Payment.id),
    col(Payment.invoice_id),
    col(Payment.card_number),
    col(Payment.card_name),
    col(Payment.card_expiry),
    col(Payment.payment_status),
    col(Payment.reason),
    col(Payment.resolved_at),
    col(Payment.resolved_by),
    col(Payment.created_at),
    col(Payment.modified_at),
)
INVOICE_EXISTS = select(col(Invoice.id)).where(THIS_INVOICE)
ATTEMPTS_OF_INVOICE: Select[*tuple[Any, ...]] = (
    Select(*PAYMENT_COLUMNS)
    .where(col(Payment.invoice_id) == bindparam("invoice_id"))
    .order_by(col(Payment.id).desc())
)


async def payment_history(db: Database, invoice_id: uuid.UUID) -> PaymentHistory:
    """Every attempt to charge a card for the invoice, newest first, masked cards only."""
    key = {"invoice_id": str(invoice_id)}
    if (await execute_core(db, INVOICE_EXISTS, key)).first() is None:
        raise InvoiceNotFoundError(str(invoice_id))
    attempts = await execute_core(db, ATTEMPTS_OF_INVOICE, key)
    return PaymentHistory(items=[public_payment(row) for row in attempts])


def public_payment(row: Row[*tuple[Any, ...]]) -> PaymentPublic:
    """A row of `PAYMENT_COLUMNS` as the API shows it."""
    card = MaskedCard(number=row.card_number, expiry=row.card_expiry, name=row.card_name)
    return PaymentPublic(
        payment_id=row.id,
        status=row.payment_status,
        reason=row.reason,
        card=card,
        created_at=as_utc(row.created_at),
        modified_at=as_utc(row.modified_at),
        resolved_by=row.resolved_by,
        resolved_at=row.resolved_at and as_utc(row.resolved_at),
    )


@cache
def payments_page(status: bool) -> tuple[Select[*tuple[Any, ...]], SelectOfScalar[int]]:
    """A page of attempts across invoices newest first, and their total; with `status`, of
    those in one state (a range of the (payment_status, id) index)."""
    rows: Select[*tuple[Any, ...]] = Select(*PAYMENT_COLUMNS)
    total = select(func.count()).select_from(Payment)
    if status:
        rows = rows.where(col(Payment.payment_status) == bindparam("status"))
        total = total.where(col(Payment.payment_status) == bindparam("status"))
    page = rows.order_by(col(Payment.id).desc()).offset(bindparam("offset", type_=Integer))
    return page.limit(bindparam("limit", type_=Integer)), total


async def list_payments(
    db: Database, status: PaymentStatus | None, params: Params
) -> Page[PaymentListItem]:
    """Attempts across invoices, newest first, optionally in one state: what an operator
    works through (UNKNOWN to resolve, REFUND_DUE to refund)."""
    raw = params.to_raw_params().as_limit_offset()
    rows, total = payments_page(status is not None)
    values: dict[str, Any] = {"offset": raw.offset or 0, "limit": raw.limit}
    if status is not None:
        values["status"] = status
    items = [
        PaymentListItem(**public_payment(row).model_dump(), invoice_id=uuid.UUID(row.invoice_id))
        for row in await execute_core(db, rows, values)
    ]
    count = (await execute_core(db, total, values)).scalar_one()
    return create_page(items, total=count, params=params)  # type: ignore[return-value]

"""Invoice API: create invoices, pay them by card through FakePay, list them in pages."""

import logging
import sys
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, MutableMapping
from contextlib import asynccontextmanager
from datetime import datetime
from typing import Annotated, Any

from fastapi import Body, Depends, FastAPI, HTTPException, Path, Query, Request, status
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.models import Example
from fastapi.responses import JSONResponse
from fastapi_offline import FastAPIOffline
from fastapi_pagination import Page, Params, create_page
from loguru import logger
from sqlalchemy import Integer, bindparam, func
from sqlalchemy import select as sa_select
from sqlmodel import Session, col, select

from db import DATABASE_UNREACHABLE, SessionDep
from models import (
    Card,
    Customer,
    ErrorDetail,
    HealthStatus,
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
from payments import (
    FakePayClient,
    FakePayDep,
    InvoiceNotFoundError,
    InvoiceNotPayableError,
    PaymentDeclinedError,
    PaymentError,
    PaymentInProgressError,
    ProviderBusyError,
    ProviderTimeoutError,
    ProviderUnavailableError,
    pay_invoice,
)
from settings import settings

MAX_BODY_BYTES = 64 * 1024

# --- logging -------------------------------------------------------------------------------


class InterceptHandler(logging.Handler):
    """Send stdlib records (uvicorn, SQLAlchemy, httpx) through loguru."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            level: str | int = logger.level(record.levelname).name
        except ValueError:
            level = record.levelno
        logger.opt(depth=6, exception=record.exc_info).log(level, record.getMessage())


def configure_logging() -> None:
    logger.remove()
    logger.configure(extra={"request_id": "-"})
    logger.add(
        sys.stderr,
        level=settings.log_level.upper(),
        serialize=settings.log_json,
        backtrace=False,
        diagnose=False,  # tracebacks must never print variable values: they may hold card data
        format=(
            "<green>{time:YYYY-MM-DD HH:mm:ss.SSS}</green> | <level>{level: <7}</level> | "
            "{extra[request_id]} | {message}"
        ),
    )
    logging.basicConfig(handlers=[InterceptHandler()], level=logging.INFO, force=True)
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        logging.getLogger(name).handlers = []
        logging.getLogger(name).propagate = True
    # One line per request comes from RequestContextMiddleware instead.
    logging.getLogger("uvicorn.access").disabled = True
    logging.getLogger("httpx").setLevel(logging.WARNING)


configure_logging()


# --- middleware ----------------------------------------------------------------------------

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


class RequestContextMiddleware:
    """Request id, one log line per request, and a body size cap, as plain ASGI.

    A request body (for the methods that carry one) is read up front, as it is at most 64 KiB,
    so an oversized one is refused with a JSON 413 whether or not it announced its length.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request_id = self._request_id(scope)
        started = time.perf_counter()
        status_code = 500

        async def send_with_id(message: Message) -> None:
            nonlocal status_code
            if message["type"] == "http.response.start":
                status_code = message["status"]
                message.setdefault("headers", [])
                message["headers"].append((b"x-request-id", request_id.encode()))
            await send(message)

        with logger.contextualize(request_id=request_id):
            try:
                if scope["method"] in {"GET", "HEAD", "OPTIONS"}:
                    await self.app(scope, receive, send_with_id)
                elif (body := await self._read_body(receive)) is None:
                    too_large = JSONResponse(
                        {"detail": f"Request body too large: the limit is {MAX_BODY_BYTES} bytes"},
                        status_code=status.HTTP_413_CONTENT_TOO_LARGE,
                    )
                    await too_large(scope, receive, send_with_id)
                else:
                    await self.app(scope, self._replay(body), send_with_id)
            finally:
                logger.info(
                    "{} {} {} {:.1f} ms",
                    scope["method"],
                    scope["path"],
                    status_code,
                    (time.perf_counter() - started) * 1000,
                )

    @staticmethod
    def _request_id(scope: Scope) -> str:
        for name, value in scope["headers"]:
            if name == b"x-request-id":
                candidate: str = value.decode("latin-1")
                if 0 < len(candidate) <= 64 and candidate.replace("-", "").isalnum():
                    return candidate
        return uuid.uuid4().hex

    @staticmethod
    async def _read_body(receive: Receive) -> bytes | None:
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                break
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > MAX_BODY_BYTES:
                return None
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        return b"".join(chunks)

    @staticmethod
    def _replay(body: bytes) -> Receive:
        sent = False

        async def receive() -> Message:
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": body, "more_body": False}
            return {"type": "http.disconnect"}

        return receive


# --- application ---------------------------------------------------------------------------


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[dict[str, Any]]:
    """One pooled FakePay client per process, handed to requests as lifespan state."""
    fakepay = FakePayClient(settings)
    logger.info("invoice API started; FakePay at {}", settings.fakepay_url)
    try:
        yield {"fakepay": fakepay}
    finally:
        fakepay.close()


API_DESCRIPTION = """
Invoices for customers, paid by card through the FakePay provider.

* Field names are camelCase; `amount` is an exact decimal with at most two places.
* Card numbers are only ever shown masked (`123456********5678`).
* Every error body is `{"detail": ...}` with a message that says what to do.

Seeded data to try: customers 1-5; PENDING invoices `6f53c715-0369-11f0-8d97-7c646cb7c0bc`
and `6f53c7be-0369-11f0-8d97-7c646cb7c0bc`; CANCELLED `a14e5bd8-02ce-11f0-8d97-7c646cb7c0bc`.
"""

# FastAPIOffline serves Swagger UI and ReDoc from pinned, packaged assets instead of a CDN,
# so /docs works on machines without internet access.
app = FastAPIOffline(
    title="Invoice API",
    version="0.1.0",
    summary="Create invoices, pay them by card through FakePay, and list them page by page.",
    description=API_DESCRIPTION,
    openapi_tags=[
        {"name": "invoices", "description": "Create, pay, read and list invoices."},
        {"name": "health", "description": "Is the service able to reach its database?"},
    ],
    lifespan=lifespan,
)
app.add_middleware(RequestContextMiddleware)

PAYMENT_ERROR_STATUS: dict[type[PaymentError], int] = {
    InvoiceNotFoundError: status.HTTP_404_NOT_FOUND,
    InvoiceNotPayableError: status.HTTP_409_CONFLICT,
    PaymentInProgressError: status.HTTP_409_CONFLICT,
    PaymentDeclinedError: status.HTTP_402_PAYMENT_REQUIRED,
    ProviderUnavailableError: status.HTTP_502_BAD_GATEWAY,
    ProviderBusyError: status.HTTP_503_SERVICE_UNAVAILABLE,
    ProviderTimeoutError: status.HTTP_504_GATEWAY_TIMEOUT,
}


@app.exception_handler(PaymentError)
async def payment_error_handler(request: Request, error: PaymentError) -> JSONResponse:
    code = PAYMENT_ERROR_STATUS[type(error)]
    headers = {"Retry-After": "1"} if isinstance(error, ProviderBusyError) else None
    if code >= 500:
        logger.warning("payment failed with {}: {}", code, error.message)
    return JSONResponse({"detail": error.message}, status_code=code, headers=headers)


async def database_unavailable_handler(request: Request, error: Exception) -> JSONResponse:
    logger.error("database unavailable: {}: {}", type(error).__name__, getattr(error, "orig", ""))
    return JSONResponse(
        {"detail": "The database is unavailable or did not answer in time; try again shortly"},
        status_code=status.HTTP_503_SERVICE_UNAVAILABLE,
        headers={"Retry-After": "5"},
    )


for unreachable in DATABASE_UNREACHABLE:
    app.add_exception_handler(unreachable, database_unavailable_handler)


@app.exception_handler(RequestValidationError)
async def validation_error_handler(request: Request, error: RequestValidationError) -> JSONResponse:
    """FastAPI's 422 body without the `input` it normally echoes, which may be a card number."""
    detail = []
    for item in error.errors():
        message = item["msg"].removeprefix("Value error, ")
        if item["type"] == "json_invalid":
            message = f"Invalid JSON: {item.get('ctx', {}).get('error', 'cannot be parsed')}"
        detail.append({"type": item["type"], "loc": list(item["loc"]), "msg": message})
    return JSONResponse({"detail": detail}, status_code=status.HTTP_422_UNPROCESSABLE_CONTENT)


@app.exception_handler(Exception)
async def unexpected_error_handler(request: Request, error: Exception) -> JSONResponse:
    logger.opt(exception=error).error("unhandled error")
    return JSONResponse(
        {"detail": "Internal server error; the request id is in the X-Request-ID header"},
        status_code=status.HTTP_500_INTERNAL_SERVER_ERROR,
    )


# --- reading invoices ----------------------------------------------------------------------


class InvoicePageParams(Params):
    size: int = Query(10, ge=1, le=100, description="Invoices per page")


def invoice_rows(page: Any = None) -> Any:
    """The columns of InvoicePublic: an invoice, its customer and, once paid here, the card.
    One statement, plain columns rather than ORM entities (a read is a read).

    With `page` (a subquery of invoice ids) the statement starts from those ids, so the
    planner joins the other tables to a handful of rows instead of sorting them all.
    """
    query = sa_select(
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
        & (Payment.payment_status == PaymentStatus.SUCCEEDED),
    )


READ_INVOICE = invoice_rows().where(col(Invoice.id) == bindparam("invoice_id"))


def to_public(row: Any) -> InvoicePublic:
    """A row of `invoice_rows` as the API shows it; its labels are InvoicePublic's fields."""
    card = None
    if row.card_number is not None:
        card = MaskedCard(number=row.card_number, expiry=row.card_expiry, name=row.card_name)
    return InvoicePublic.model_validate({**row._mapping, "card": card})


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


def get_invoice_or_404(session: Session, invoice_id: uuid.UUID) -> InvoicePublic:
    row = session.exec(READ_INVOICE, params={"invoice_id": str(invoice_id)}).first()
    if row is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"Invoice {invoice_id} not found")
    return to_public(row)


NEWEST_FIRST = (col(Invoice.created_at).desc(), col(Invoice.id).desc())


def count_statement(*, filtered: bool) -> Any:
    query = select(func.coalesce(func.sum(InvoiceStatusCount.invoice_count), 0))
    if filtered:
        query = query.where(col(InvoiceStatusCount.invoice_status) == bindparam("invoice_status"))
    return query


def page_statement(*, filtered: bool, keyset: bool) -> Any:
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


# Built once: a list request then skips building and cache-keying these statements.
COUNT_STATEMENTS = {filtered: count_statement(filtered=filtered) for filtered in (False, True)}
PAGE_STATEMENTS = {
    (filtered, keyset): page_statement(filtered=filtered, keyset=keyset)
    for filtered in (False, True)
    for keyset in (False, True)
}


def status_params(invoice_status: InvoiceStatus | None) -> dict[str, Any]:
    return {} if invoice_status is None else {"invoice_status": invoice_status.value}


def count_invoices(session: Session, invoice_status: InvoiceStatus | None) -> int:
    """Exact totals from the per-status counts table: O(1) however many invoices exist."""
    statement = COUNT_STATEMENTS[invoice_status is not None]
    return int(session.exec(statement, params=status_params(invoice_status)).one())


def list_page(
    session: Session, invoice_status: InvoiceStatus | None, params: InvoicePageParams
) -> Page[InvoicePublic]:
    """Newest first, id as tie-breaker; a page past the end costs no item query."""
    total = count_invoices(session, invoice_status)
    raw = params.to_raw_params().as_limit_offset()
    items: list[InvoicePublic] = []
    if raw.offset is not None and raw.offset < total:
        statement = PAGE_STATEMENTS[(invoice_status is not None, False)]
        page = {"offset": raw.offset, "limit": raw.limit, **status_params(invoice_status)}
        items = [to_public(row) for row in session.exec(statement, params=page)]
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


def scroll(
    session: Session, invoice_status: InvoiceStatus | None, size: int, cursor: str | None
) -> InvoiceScrollPage:
    """Keyset pagination: continue strictly after the last (created_at, id) seen."""
    slice_params: dict[str, Any] = {"limit": size + 1, **status_params(invoice_status)}
    if cursor is None:
        slice_params["offset"] = 0
    else:
        created_at, invoice_id = decode_cursor_or_422(cursor)
        slice_params |= {"after_created_at": created_at, "after_id": invoice_id}
    statement = PAGE_STATEMENTS[(invoice_status is not None, cursor is not None)]
    rows = session.exec(statement, params=slice_params).all()
    next_cursor = None
    if len(rows) > size:
        last = rows[size - 1]
        next_cursor = encode_cursor(last.created_at, last.id)
    return InvoiceScrollPage(
        items=[to_public(row) for row in rows[:size]],
        total=count_invoices(session, invoice_status),
        size=size,
        next_cursor=next_cursor,
    )


def create_pending_invoice(session: Session, request: InvoiceCreate) -> tuple[Invoice, Customer]:
    customer = session.get(Customer, request.customer_id)
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
    session.commit()
    logger.info(
        "invoice {} created for customer {}: {}", invoice.id, customer.customer_id, invoice.amount
    )
    return invoice, customer


# --- routes --------------------------------------------------------------------------------


Responses = dict[int | str, dict[str, Any]]


def error(description: str) -> dict[str, Any]:
    return {"model": ErrorDetail, "description": description}


DATABASE_DOWN: Responses = {503: error("The database is unavailable or did not answer in time")}
BAD_BODY: Responses = {
    400: error("The body could not be read (it is not UTF-8 text)"),
    413: error("The body is larger than 64 KiB"),
}
PAYMENT_FAILURES: Responses = {
    402: error("FakePay declined the card; the invoice stays PENDING"),
    502: error("FakePay unreachable or failing; the invoice stays PENDING"),
    503: error("The database is unavailable, or too many payments are in flight"),
    504: error("FakePay did not reply in time; outcome unknown, the invoice stays PENDING"),
}


SEEDED_PENDING_ID = "6f53c715-0369-11f0-8d97-7c646cb7c0bc"
READ_EXAMPLES: dict[str, Example] = {
    "the challenge's CANCELLED invoice": {"value": "a14e5bd8-02ce-11f0-8d97-7c646cb7c0bc"},
    "a seeded PENDING invoice": {"value": SEEDED_PENDING_ID},
}
CREATE_EXAMPLES: dict[str, Example] = {
    "without card": {
        "summary": "A PENDING invoice",
        "value": {
            "jobDescription": "Software Development and Testing",
            "amount": 199.99,
            "customerId": 2,
        },
    },
    "with card": {
        "summary": "An invoice paid at once",
        "value": {
            "jobDescription": "Software License Fee",
            "amount": 99.99,
            "customerId": 1,
            "card": {"number": "1234567812345678", "name": "J Doe", "expiry": "01-2040"},
        },
    },
}
PAY_EXAMPLES: dict[str, Example] = {
    "Work Card": {
        "summary": "The challenge's card, spaces and all",
        "value": {"number": "1234 5656 7822 5678", "expiry": "01-2040", "name": "Work Card"},
    }
}


@app.get(
    "/health-check",
    tags=["health"],
    summary="Check the service and its database",
    response_model=HealthStatus,
    responses={503: {"model": HealthStatus, "description": "The database is unreachable"}},
)
def health_check(session: SessionDep) -> Any:
    """UP only after a real round trip to the database."""
    try:
        session.exec(select(1)).one()
    except DATABASE_UNREACHABLE:
        return JSONResponse({"status": "DOWN"}, status_code=status.HTTP_503_SERVICE_UNAVAILABLE)
    return HealthStatus(status="UP")


@app.get(
    "/invoice/{invoice_id}",
    tags=["invoices"],
    summary="Read one invoice",
    response_model=InvoicePublic,
    responses={404: error("No invoice has this id"), **DATABASE_DOWN},
)
def read_invoice(
    invoice_id: Annotated[uuid.UUID, Path(openapi_examples=READ_EXAMPLES)], session: SessionDep
) -> InvoicePublic:
    """One invoice with its customer, and the masked card once paid."""
    return get_invoice_or_404(session, invoice_id)


@app.post(
    "/invoice",
    tags=["invoices"],
    summary="Create an invoice, optionally paying it by card",
    response_model=InvoicePublic,
    status_code=status.HTTP_201_CREATED,
    responses={
        404: error("No customer has this id; nothing was written"),
        **BAD_BODY,
        **PAYMENT_FAILURES,
    },
)
def create_invoice(
    request: Annotated[InvoiceCreate, Body(openapi_examples=CREATE_EXAMPLES)],
    session: SessionDep,
    fakepay: FakePayDep,
) -> InvoicePublic:
    """Create a PENDING invoice; with a card, also pay it at once.

    The invoice is committed before the card is charged, so a failed payment leaves it
    PENDING, and the error names its id for a later `POST /invoice/pay/{invoice_id}`.
    """
    invoice, customer = create_pending_invoice(session, request)
    if request.card is None:
        return public_invoice(invoice, customer)
    paid, customer, card = pay_invoice(session, fakepay, invoice.id, request.card)
    return public_invoice(paid, customer, card)


@app.post(
    "/invoice/pay/{invoice_id}",
    tags=["invoices"],
    summary="Pay a PENDING invoice by card",
    response_model=InvoicePublic,
    status_code=status.HTTP_201_CREATED,
    responses={
        404: error("No invoice has this id"),
        409: error("The invoice is not PENDING, or a payment for it is in progress"),
        **BAD_BODY,
        **PAYMENT_FAILURES,
    },
)
def pay_pending_invoice(
    invoice_id: Annotated[
        uuid.UUID, Path(openapi_examples={"seeded PENDING invoice": {"value": SEEDED_PENDING_ID}})
    ],
    card: Annotated[Card, Body(openapi_examples=PAY_EXAMPLES)],
    session: SessionDep,
    fakepay: FakePayDep,
) -> InvoicePublic:
    """Pay a PENDING invoice by card; FakePay's transactionId is the invoice id.

    Try it with the seeded PENDING invoice `6f53c715-0369-11f0-8d97-7c646cb7c0bc` (once: it
    is PAID afterwards, and paying again answers 409; `make db-reset` restores it), or with
    the id of an invoice you created without a card.
    """
    paid, customer, masked = pay_invoice(session, fakepay, str(invoice_id), card)
    return public_invoice(paid, customer, masked)


InvoiceStatusQuery = Annotated[
    InvoiceStatus | None, Query(alias="invoiceStatus", description="Only this status")
]


@app.get(
    "/invoices",
    tags=["invoices"],
    summary="List invoices, page by page",
    response_model=Page[InvoicePublic],
    responses=DATABASE_DOWN,
)
def list_invoices(
    session: SessionDep,
    params: Annotated[InvoicePageParams, Depends()],
    invoice_status: InvoiceStatusQuery = None,
) -> Page[InvoicePublic]:
    """Invoices newest first, ten to a page by default.

    For deep scrolling through millions of invoices use `GET /invoices/scroll`, whose cost
    does not grow with depth.
    """
    return list_page(session, invoice_status, params)


@app.get(
    "/invoices/scroll",
    tags=["invoices"],
    summary="Scroll through invoices with a cursor",
    response_model=InvoiceScrollPage,
    responses=DATABASE_DOWN,
)
def scroll_invoices(
    session: SessionDep,
    invoice_status: InvoiceStatusQuery = None,
    size: Annotated[int, Query(ge=1, le=100, description="Invoices per slice")] = 10,
    cursor: Annotated[
        str | None,
        Query(max_length=200, description="`nextCursor` of the previous slice; omit to start"),
    ] = None,
) -> InvoiceScrollPage:
    """Invoices newest first, slice by slice: the same order as `GET /invoices`, at a cost
    that stays flat however deep you go."""
    return scroll(session, invoice_status, size, cursor)

"""Invoice API: create invoices, pay them by card through FakePay, list them in pages.

The app and its lifespan, then every route, then the status code of every failure
(`add_exception_handlers`). The work itself is in invoices.py, payments.py and customers.py.
"""

import asyncio
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Annotated, Any

from fastapi import Body, Depends, FastAPI, Path, Query, Request, status
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from fastapi.routing import APIRoute
from fastapi_offline import FastAPIOffline
from fastapi_pagination import Page, Params
from loguru import logger
from sqlmodel import select

import api_docs
import customers
import invoices
import metrics
import payments
from api_docs import (
    BAD_BODY,
    CANCEL_ID_EXAMPLES,
    CREATE_EXAMPLES,
    CUSTOMER_EXAMPLES,
    PAY_EXAMPLES,
    PAY_ID_EXAMPLES,
    READ_EXAMPLES,
)
from auth import AdminDep, Authorized, document_security, open_documentation, public
from customers import CustomerNotFoundError, EmailTakenError, get_customer_or_404
from db import DATABASE_UNREACHABLE, SessionDep, TransactionConflictError, engine
from errors import ApiError, DatabaseUnavailableError, LostRaceError, responses
from exact_json import ExactJSONRoute
from idempotency import (
    IdempotencyDep,
    IdempotencyKeyInUseError,
    IdempotentRequestUnfinishedError,
    purge_expired_keys_forever,
)
from invoices import (
    InvoiceConflictError,
    InvoiceFilterDep,
    InvoiceNotFoundError,
    OutcomeUnknownError,
    PaymentInProgressError,
    get_invoice_or_404,
    list_page,
    page_params,
    payment_history,
    scroll,
)
from models import (
    Card,
    CustomerCreate,
    CustomerPublic,
    HealthStatus,
    InvoiceCreate,
    InvoicePublic,
    InvoiceScrollPage,
    PaymentHistory,
    PaymentListItem,
    PaymentResolution,
    PaymentStatus,
)
from observability import RequestContextMiddleware, configure_logging
from payments import (
    ChargedAfterReplacedError,
    FakePayClient,
    FakePayDep,
    InvoiceNotPayableError,
    OutcomeNotRecordedError,
    OutcomeRecorder,
    PaymentDeclinedError,
    PaymentNotFoundError,
    PaymentNotStartedError,
    PaymentNotUnknownError,
    ProviderBusyError,
    ProviderTimeoutError,
    ProviderUnavailableError,
    RecorderDep,
    sweep_stalled_forever,
)
from settings import settings

configure_logging()


def operation_id(route: APIRoute) -> str:
    """Each operation's id is its handler's name (`pay_invoice`), so a generated client's
    methods read as the routes do; the names are unique in this module, and `test_docs`
    keeps them so."""
    return route.name


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[dict[str, Any]]:
    """Per process, handed to requests as lifespan state: one pooled FakePay client and the
    recorder of payment outcomes the database would not take in time. In the background: the
    purge of expired Idempotency-Keys and the sweep that turns stalled attempts UNKNOWN."""
    fakepay = FakePayClient(settings)
    recorder = OutcomeRecorder(engine)
    metrics.start(engine, settings)
    background = [
        asyncio.create_task(purge_expired_keys_forever(engine)),
        asyncio.create_task(sweep_stalled_forever(engine, fakepay.stale_after_s)),
    ]
    logger.info("invoice API started; FakePay at {}", settings.fakepay_url)
    try:
        yield {"fakepay": fakepay, "recorder": recorder}
    finally:
        for task in background:
            task.cancel()
        await recorder.aclose()
        await fakepay.aclose()
        metrics.stop()


# FastAPIOffline serves Swagger UI and ReDoc from pinned, packaged assets instead of a CDN,
# so /docs works on machines without internet access.
app = FastAPIOffline(
    title=api_docs.TITLE,
    version="0.2.0",
    summary=api_docs.SUMMARY,
    description=api_docs.DESCRIPTION,
    openapi_tags=api_docs.TAGS,
    lifespan=lifespan,
    generate_unique_id_function=operation_id,
    dependencies=[Authorized],  # every route needs a key with AUTH=on, unless marked `public`
)
app.router.route_class = ExactJSONRoute
app.add_middleware(RequestContextMiddleware)  # the outermost: every reply gets its request id
api_docs.document_validation_errors(app)
open_documentation(app)
document_security(app)
# The status code of every failure: `add_exception_handlers`, at the end of this file.


PageDep = Annotated[Params, Depends(page_params)]

# What the routes can answer besides success, documented from the errors' own classes.
KEY_ERRORS = (IdempotencyKeyInUseError, IdempotentRequestUnfinishedError)
PAYMENT_ERRORS = (
    InvoiceNotPayableError,
    PaymentInProgressError,
    OutcomeUnknownError,
    ChargedAfterReplacedError,
    LostRaceError,
    PaymentDeclinedError,
    ProviderUnavailableError,
    ProviderBusyError,
    PaymentNotStartedError,
    OutcomeNotRecordedError,
    ProviderTimeoutError,
    *KEY_ERRORS,
)


@app.get(
    "/health-check",
    tags=["health"],
    summary="Check the service and its database",
    response_model=HealthStatus,
    responses={503: {"model": HealthStatus, "description": "The database is unreachable"}},
)
@public
async def health_check(session: SessionDep) -> Any:
    """UP only after a real round trip to the database."""
    try:
        await session.exec(select(1))
    except DATABASE_UNREACHABLE:
        return JSONResponse({"status": "DOWN"}, status_code=status.HTTP_503_SERVICE_UNAVAILABLE)
    return HealthStatus(status="UP")


@app.get(
    "/invoice/{invoice_id}",
    tags=["invoices"],
    summary="Read one invoice",
    response_model=InvoicePublic,
    responses=responses(InvoiceNotFoundError, DatabaseUnavailableError),
)
async def read_invoice(
    invoice_id: Annotated[uuid.UUID, Path(openapi_examples=READ_EXAMPLES)], session: SessionDep
) -> InvoicePublic:
    """One invoice with its customer, and the masked card once paid."""
    return await get_invoice_or_404(session, invoice_id)


@app.post(
    "/invoice",
    tags=["invoices"],
    summary="Create an invoice, optionally paying it by card",
    response_model=InvoicePublic,
    status_code=status.HTTP_201_CREATED,
    responses={
        **responses(CustomerNotFoundError, *PAYMENT_ERRORS, DatabaseUnavailableError),
        **BAD_BODY,
    },
)
async def create_invoice(
    request: Annotated[InvoiceCreate, Body(openapi_examples=CREATE_EXAMPLES)],
    session: SessionDep,
    fakepay: FakePayDep,
    recorder: RecorderDep,
    idempotency: IdempotencyDep,
) -> InvoicePublic | Response:
    """Create a PENDING invoice; with a card, also pay it at once.

    The invoice is committed before the card is charged, so a failed payment leaves it
    PENDING, and the error names its id for a later `POST /invoice/pay/{invoice_id}`.
    Send an `Idempotency-Key` to make retrying safe: a retry gets the first reply again.
    """
    return await payments.create_invoice(session, fakepay, recorder, request, idempotency)


@app.post(
    "/invoice/pay/{invoice_id}",
    tags=["invoices"],
    summary="Pay a PENDING invoice by card",
    response_model=InvoicePublic,
    status_code=status.HTTP_201_CREATED,
    responses={
        **responses(InvoiceNotFoundError, *PAYMENT_ERRORS, DatabaseUnavailableError),
        **BAD_BODY,
    },
)
async def pay_invoice(
    invoice_id: Annotated[uuid.UUID, Path(openapi_examples=PAY_ID_EXAMPLES)],
    card: Annotated[Card, Body(openapi_examples=PAY_EXAMPLES)],
    session: SessionDep,
    fakepay: FakePayDep,
    recorder: RecorderDep,
    idempotency: IdempotencyDep,
) -> InvoicePublic | Response:
    """Pay a PENDING invoice by card; FakePay's transactionId is the invoice id.

    Try it with the seeded PENDING invoice `6f53c715-0369-11f0-8d97-7c646cb7c0bc` (once: it
    is PAID afterwards, and paying again answers 409; `make db-reset` restores it), or with
    the id of an invoice you created without a card.
    """
    return await payments.pay_invoice(
        session, fakepay, recorder, str(invoice_id), card, idempotency
    )


@app.post(
    "/invoice/cancel/{invoice_id}",
    tags=["invoices"],
    summary="Cancel (void) a PENDING invoice",
    response_model=InvoicePublic,
    responses=responses(
        InvoiceNotFoundError,
        InvoiceConflictError,
        PaymentInProgressError,
        OutcomeUnknownError,
        LostRaceError,
        *KEY_ERRORS,
        DatabaseUnavailableError,
    ),
)
async def cancel_invoice(
    invoice_id: Annotated[uuid.UUID, Path(openapi_examples=CANCEL_ID_EXAMPLES)],
    session: SessionDep,
    idempotency: IdempotencyDep,
) -> InvoicePublic | Response:
    """Mark a PENDING invoice CANCELLED; cancelling a CANCELLED invoice again changes nothing.

    Try it with the seeded PENDING invoice `6f53c7be-0369-11f0-8d97-7c646cb7c0bc`.
    """
    return await invoices.cancel_invoice(session, invoice_id, idempotency)


@app.get(
    "/invoice/{invoice_id}/payments",
    tags=["invoices"],
    summary="Every payment attempt of an invoice",
    response_model=PaymentHistory,
    responses=responses(InvoiceNotFoundError, DatabaseUnavailableError),
)
async def read_invoice_payments(
    invoice_id: Annotated[uuid.UUID, Path(openapi_examples=READ_EXAMPLES)], session: SessionDep
) -> PaymentHistory:
    """Each attempt to charge a card for the invoice, newest first, with masked cards only."""
    return await payment_history(session, invoice_id)


@app.post(
    "/invoice/{invoice_id}/payments/{payment_id}/resolve",
    tags=["operators"],
    summary="Resolve a payment attempt whose outcome is unknown",
    response_model=InvoicePublic,
    responses={
        **responses(
            InvoiceNotFoundError,
            PaymentNotFoundError,
            PaymentNotUnknownError,
            DatabaseUnavailableError,
        ),
        **BAD_BODY,
    },
)
async def resolve_payment(
    invoice_id: uuid.UUID,
    payment_id: Annotated[int, Path(ge=1)],
    resolution: PaymentResolution,
    session: SessionDep,
    fakepay: FakePayDep,
    operator: AdminDep,
) -> InvoicePublic:
    """Settle an UNKNOWN attempt after checking the transaction (the invoice id) with the
    provider: `SUCCEEDED` marks the invoice PAID, `FAILED` lets it be paid again. Recorded
    with who (the API key's name, or AUTH=off) and when, in the payment history. Needs an
    admin key when API keys are on."""
    outcome = PaymentStatus(resolution.outcome)
    return await payments.resolve_payment(
        session, str(invoice_id), payment_id, outcome, operator, fakepay.stale_after_s
    )


@app.get(
    "/payments",
    tags=["operators"],
    summary="List payment attempts across invoices, page by page",
    response_model=Page[PaymentListItem],
    responses=responses(DatabaseUnavailableError),
)
async def list_payments(
    session: SessionDep,
    params: PageDep,
    payment_status: Annotated[
        PaymentStatus | None,
        Query(
            alias="status", description="Only this state: UNKNOWN to resolve, REFUND_DUE to refund"
        ),
    ] = None,
) -> Page[PaymentListItem]:
    """Attempts newest first, with the invoice each was for: what an operator works through."""
    return await invoices.list_payments(session, payment_status, params)


@app.get(
    "/invoices",
    tags=["invoices"],
    summary="List invoices, page by page",
    response_model=Page[InvoicePublic],
    responses=responses(DatabaseUnavailableError),
)
async def list_invoices(
    session: SessionDep, where: InvoiceFilterDep, params: PageDep
) -> Page[InvoicePublic]:
    """Invoices newest first, ten to a page by default, filtered by any of status, customer
    and creation time.

    Page numbers reach `MAX_PAGE_OFFSET` invoices deep; to go deeper, or through millions of
    invoices, use `GET /invoices/scroll`, whose cost does not grow with depth. With only a
    status filter (or none) `total` is read from a counts table at no cost; with a customer
    or a date range it is a count of the matching invoices, which grows with their number.
    """
    return await list_page(session, where, params)


@app.get(
    "/invoices/scroll",
    tags=["invoices"],
    summary="Scroll through invoices with a cursor",
    response_model=InvoiceScrollPage,
    responses=responses(DatabaseUnavailableError),
)
async def scroll_invoices(
    session: SessionDep,
    where: InvoiceFilterDep,
    size: Annotated[int, Query(ge=1, le=100, description="Invoices per slice")] = 10,
    cursor: Annotated[
        str | None,
        Query(max_length=200, description="`nextCursor` of the previous slice; omit to start"),
    ] = None,
) -> InvoiceScrollPage:
    """Invoices newest first, slice by slice: the same order and filters as `GET /invoices`
    (send the same filters with every slice), at a cost that stays flat however deep you go."""
    return await scroll(session, where, size, cursor)


@app.post(
    "/customer",
    tags=["customers"],
    summary="Create a customer",
    response_model=CustomerPublic,
    status_code=status.HTTP_201_CREATED,
    responses={**responses(EmailTakenError, DatabaseUnavailableError), **BAD_BODY},
)
async def create_customer(
    request: Annotated[CustomerCreate, Body(openapi_examples=CUSTOMER_EXAMPLES)],
    session: SessionDep,
) -> CustomerPublic:
    """A new customer, to create invoices for; the email is unique whatever its case."""
    return await customers.create_customer(session, request)


@app.get(
    "/customer/{customer_id}",
    tags=["customers"],
    summary="Read one customer",
    response_model=CustomerPublic,
    responses=responses(CustomerNotFoundError, DatabaseUnavailableError),
)
async def read_customer(
    customer_id: Annotated[int, Path(ge=1, le=2_147_483_647, examples=[3])],
    session: SessionDep,
) -> CustomerPublic:
    """One customer."""
    return await get_customer_or_404(session, customer_id)


@app.get(
    "/customers",
    tags=["customers"],
    summary="List customers, page by page",
    response_model=Page[CustomerPublic],
    responses=responses(DatabaseUnavailableError),
)
async def list_customers(session: SessionDep, params: PageDep) -> Page[CustomerPublic]:
    """Customers by id, ten to a page by default."""
    return await customers.list_customers(session, params)


@app.get(
    "/metrics",
    tags=["operators"],
    summary="Metrics for Prometheus to scrape",
    response_class=Response,  # no JSON: the text format, documented as such below
    responses={**metrics.DOCUMENTED, **responses(metrics.MetricsOffError)},
)
async def read_metrics() -> Response:
    """Prometheus' text format: requests by route template and status, their latency,
    payment attempts by outcome, provider call latency and calls in flight, database
    connections in use, Idempotency-Key replays; every worker's, however many serve. Any key
    may read it when API keys are on."""
    return await metrics.reply()


# --- every outcome that is not a success ----------------------------------------------


def reply(error: ApiError) -> JSONResponse:
    return JSONResponse({"detail": error.message}, error.status_code, headers=error.headers)


async def api_error_handler(request: Request, error: Exception) -> JSONResponse:
    """Every domain error carries its status, headers and detail (`errors.ApiError`)."""
    assert isinstance(error, ApiError)
    if error.status_code >= 500:
        logger.warning("answered {}: {}", error.status_code, error.message)
    return reply(error)


async def database_unavailable_handler(request: Request, error: Exception) -> JSONResponse:
    logger.error("database unavailable: {}: {}", type(error).__name__, getattr(error, "orig", ""))
    return reply(DatabaseUnavailableError())


async def conflict_handler(request: Request, error: Exception) -> JSONResponse:
    logger.warning("transaction lost to a concurrent one: {}", getattr(error, "orig", ""))
    return reply(LostRaceError())


async def validation_error_handler(request: Request, error: Exception) -> JSONResponse:
    """FastAPI's 422 body without the `input` it normally echoes, which may be a card number."""
    assert isinstance(error, RequestValidationError)
    detail = []
    for item in error.errors():
        message = item["msg"].removeprefix("Value error, ")
        if item["type"] == "json_invalid":
            message = f"Invalid JSON: {item.get('ctx', {}).get('error', 'cannot be parsed')}"
        detail.append({"type": item["type"], "loc": list(item["loc"]), "msg": message})
    return JSONResponse({"detail": detail}, status_code=status.HTTP_422_UNPROCESSABLE_CONTENT)


def add_exception_handlers(app: FastAPI) -> None:
    """Every outcome that is not a success, in one place: the domain's errors reply as they
    say; an outage is a 503, a lost race a 409. `HTTPException` (401, 403) keeps FastAPI's own
    handler; an error nothing here expects becomes a 500 in `RequestContextMiddleware`, which
    logs it with the request id."""
    app.add_exception_handler(ApiError, api_error_handler)
    app.add_exception_handler(RequestValidationError, validation_error_handler)
    for unreachable in DATABASE_UNREACHABLE:
        app.add_exception_handler(unreachable, database_unavailable_handler)
    app.add_exception_handler(TransactionConflictError, conflict_handler)


add_exception_handlers(app)

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
from fastapi_offline import FastAPIOffline
from fastapi_pagination import Page, Params
from loguru import logger
from sqlmodel import select

import api_docs
from api_docs import (
    BAD_BODY,
    CANCEL_ID_EXAMPLES,
    CREATE_EXAMPLES,
    CUSTOMER_EXAMPLES,
    DATABASE_DOWN,
    KEY_IN_USE,
    PAY_EXAMPLES,
    PAY_ID_EXAMPLES,
    PAYMENT_FAILURES,
    READ_EXAMPLES,
    error,
)
from auth import Authorized
from customers import create_customer, get_customer_or_404, list_customers
from db import DATABASE_UNREACHABLE, SessionDep, TransactionConflictError
from exact_json import ExactJSONRoute
from idempotency import (
    IdempotencyDep,
    IdempotencyError,
    IdempotencyKeyInUseError,
    IdempotencyMiddleware,
    IdempotentRequestUnfinishedError,
    purge_expired_keys_forever,
)
from invoices import (
    InvoiceConflictError,
    InvoiceFilterDep,
    cancel_invoice,
    create_pending_invoice,
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
)
from observability import RequestContextMiddleware, configure_logging
from payments import (
    ChargedAfterSupersededError,
    FakePayClient,
    FakePayDep,
    InvoiceNotFoundError,
    InvoiceNotPayableError,
    OutcomeNotRecordedError,
    PaymentDeclinedError,
    PaymentError,
    PaymentInProgressError,
    PaymentNotStartedError,
    ProviderBusyError,
    ProviderTimeoutError,
    ProviderUnavailableError,
    pay_invoice,
)
from settings import settings

configure_logging()


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[dict[str, Any]]:
    """One pooled FakePay client per process, handed to requests as lifespan state, and the
    background purge of expired Idempotency-Keys."""
    fakepay = FakePayClient(settings)
    purge = asyncio.create_task(purge_expired_keys_forever())
    logger.info("invoice API started; FakePay at {}", settings.fakepay_url)
    try:
        yield {"fakepay": fakepay}
    finally:
        purge.cancel()
        await fakepay.aclose()


# FastAPIOffline serves Swagger UI and ReDoc from pinned, packaged assets instead of a CDN,
# so /docs works on machines without internet access.
app = FastAPIOffline(
    title=api_docs.TITLE,
    version="0.2.0",
    summary=api_docs.SUMMARY,
    description=api_docs.DESCRIPTION,
    openapi_tags=api_docs.TAGS,
    lifespan=lifespan,
)
app.router.route_class = ExactJSONRoute
app.add_middleware(IdempotencyMiddleware)
app.add_middleware(RequestContextMiddleware)  # the outermost: every reply gets its request id
api_docs.document_validation_errors(app)
# The status code of every failure: `add_exception_handlers`, at the end of this file.


PageDep = Annotated[Params, Depends(page_params)]


@app.get(
    "/health-check",
    tags=["health"],
    summary="Check the service and its database",
    response_model=HealthStatus,
    responses={503: {"model": HealthStatus, "description": "The database is unreachable"}},
)
async def health_check(session: SessionDep) -> Any:
    """UP only after a real round trip to the database."""
    try:
        await session.exec(select(1))
    except DATABASE_UNREACHABLE:
        return JSONResponse({"status": "DOWN"}, status_code=status.HTTP_503_SERVICE_UNAVAILABLE)
    return HealthStatus(status="UP")


@app.get(
    "/invoice/{invoice_id}",
    dependencies=[Authorized],
    tags=["invoices"],
    summary="Read one invoice",
    response_model=InvoicePublic,
    responses={404: error("No invoice has this id"), **DATABASE_DOWN},
)
async def read_invoice(
    invoice_id: Annotated[uuid.UUID, Path(openapi_examples=READ_EXAMPLES)], session: SessionDep
) -> InvoicePublic:
    """One invoice with its customer, and the masked card once paid."""
    return await get_invoice_or_404(session, invoice_id)


@app.post(
    "/invoice",
    dependencies=[Authorized],
    tags=["invoices"],
    summary="Create an invoice, optionally paying it by card",
    response_model=InvoicePublic,
    status_code=status.HTTP_201_CREATED,
    responses={
        404: error("No customer has this id; nothing was written"),
        409: error(f"Not run: {KEY_IN_USE}"),
        **BAD_BODY,
        **PAYMENT_FAILURES,
    },
)
async def create_invoice(
    request: Annotated[InvoiceCreate, Body(openapi_examples=CREATE_EXAMPLES)],
    session: SessionDep,
    fakepay: FakePayDep,
    idempotency: IdempotencyDep,
) -> InvoicePublic | Response:
    """Create a PENDING invoice; with a card, also pay it at once.

    The invoice is committed before the card is charged, so a failed payment leaves it
    PENDING, and the error names its id for a later `POST /invoice/pay/{invoice_id}`.
    Send an `Idempotency-Key` to make retrying safe: a retry gets the first reply again.
    """
    if replay := await idempotency.replay(session, request):
        return replay
    invoice = await create_pending_invoice(session, request, idempotency)
    if request.card is None:
        return invoice
    return await pay_invoice(session, fakepay, str(invoice.id), request.card, idempotency)


@app.post(
    "/invoice/pay/{invoice_id}",
    dependencies=[Authorized],
    tags=["invoices"],
    summary="Pay a PENDING invoice by card",
    response_model=InvoicePublic,
    status_code=status.HTTP_201_CREATED,
    responses={
        404: error("No invoice has this id"),
        409: error(f"The invoice is not PENDING, a payment for it is in progress, or {KEY_IN_USE}"),
        **BAD_BODY,
        **PAYMENT_FAILURES,
    },
)
async def pay_pending_invoice(
    invoice_id: Annotated[uuid.UUID, Path(openapi_examples=PAY_ID_EXAMPLES)],
    card: Annotated[Card, Body(openapi_examples=PAY_EXAMPLES)],
    session: SessionDep,
    fakepay: FakePayDep,
    idempotency: IdempotencyDep,
) -> InvoicePublic | Response:
    """Pay a PENDING invoice by card; FakePay's transactionId is the invoice id.

    Try it with the seeded PENDING invoice `6f53c715-0369-11f0-8d97-7c646cb7c0bc` (once: it
    is PAID afterwards, and paying again answers 409; `make db-reset` restores it), or with
    the id of an invoice you created without a card.
    """
    if replay := await idempotency.replay(session, card):
        return replay
    return await pay_invoice(session, fakepay, str(invoice_id), card, idempotency)


@app.post(
    "/invoice/cancel/{invoice_id}",
    dependencies=[Authorized],
    tags=["invoices"],
    summary="Cancel (void) a PENDING invoice",
    response_model=InvoicePublic,
    responses={
        404: error("No invoice has this id"),
        409: error(
            f"The invoice is PAID, a payment for it is in flight or has an unknown outcome "
            f"(the detail says what to do), or {KEY_IN_USE}"
        ),
        **DATABASE_DOWN,
    },
)
async def cancel_pending_invoice(
    invoice_id: Annotated[uuid.UUID, Path(openapi_examples=CANCEL_ID_EXAMPLES)],
    session: SessionDep,
    idempotency: IdempotencyDep,
) -> InvoicePublic | Response:
    """Mark a PENDING invoice CANCELLED; cancelling a CANCELLED invoice again changes nothing.

    Try it with the seeded PENDING invoice `6f53c7be-0369-11f0-8d97-7c646cb7c0bc`.
    """
    if replay := await idempotency.replay(session, None):
        return replay
    return await cancel_invoice(session, invoice_id, idempotency)


@app.get(
    "/invoice/{invoice_id}/payments",
    dependencies=[Authorized],
    tags=["invoices"],
    summary="Every payment attempt of an invoice",
    response_model=PaymentHistory,
    responses={404: error("No invoice has this id"), **DATABASE_DOWN},
)
async def read_invoice_payments(
    invoice_id: Annotated[uuid.UUID, Path(openapi_examples=READ_EXAMPLES)], session: SessionDep
) -> PaymentHistory:
    """Each attempt to charge a card for the invoice, newest first, with masked cards only."""
    return await payment_history(session, invoice_id)


@app.get(
    "/invoices",
    dependencies=[Authorized],
    tags=["invoices"],
    summary="List invoices, page by page",
    response_model=Page[InvoicePublic],
    responses=DATABASE_DOWN,
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
    dependencies=[Authorized],
    tags=["invoices"],
    summary="Scroll through invoices with a cursor",
    response_model=InvoiceScrollPage,
    responses=DATABASE_DOWN,
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
    dependencies=[Authorized],
    tags=["customers"],
    summary="Create a customer",
    response_model=CustomerPublic,
    status_code=status.HTTP_201_CREATED,
    responses={409: error("A customer already has this email"), **BAD_BODY, **DATABASE_DOWN},
)
async def create_new_customer(
    request: Annotated[CustomerCreate, Body(openapi_examples=CUSTOMER_EXAMPLES)],
    session: SessionDep,
) -> CustomerPublic:
    """A new customer, to create invoices for; the email is unique whatever its case."""
    return await create_customer(session, request)


@app.get(
    "/customer/{customer_id}",
    dependencies=[Authorized],
    tags=["customers"],
    summary="Read one customer",
    response_model=CustomerPublic,
    responses={404: error("No customer has this id"), **DATABASE_DOWN},
)
async def read_customer(
    customer_id: Annotated[int, Path(ge=1, le=2_147_483_647, examples=[3])],
    session: SessionDep,
) -> CustomerPublic:
    """One customer."""
    return await get_customer_or_404(session, customer_id)


@app.get(
    "/customers",
    dependencies=[Authorized],
    tags=["customers"],
    summary="List customers, page by page",
    response_model=Page[CustomerPublic],
    responses=DATABASE_DOWN,
)
async def list_all_customers(session: SessionDep, params: PageDep) -> Page[CustomerPublic]:
    """Customers by id, ten to a page by default."""
    return await list_customers(session, params)


# --- every outcome that is not a success, and its status code ---------------------------


# The domain's failures; each carries the `message` that becomes the reply's detail.
DOMAIN_ERRORS = (PaymentError, InvoiceConflictError, IdempotencyError)
DomainError = PaymentError | InvoiceConflictError | IdempotencyError
ERROR_STATUS: dict[type[DomainError], int] = {
    InvoiceNotFoundError: status.HTTP_404_NOT_FOUND,
    InvoiceConflictError: status.HTTP_409_CONFLICT,
    IdempotencyKeyInUseError: status.HTTP_409_CONFLICT,
    IdempotentRequestUnfinishedError: status.HTTP_409_CONFLICT,
    InvoiceNotPayableError: status.HTTP_409_CONFLICT,
    PaymentInProgressError: status.HTTP_409_CONFLICT,
    ChargedAfterSupersededError: status.HTTP_409_CONFLICT,
    PaymentDeclinedError: status.HTTP_402_PAYMENT_REQUIRED,
    ProviderUnavailableError: status.HTTP_502_BAD_GATEWAY,
    ProviderBusyError: status.HTTP_503_SERVICE_UNAVAILABLE,
    PaymentNotStartedError: status.HTTP_503_SERVICE_UNAVAILABLE,
    OutcomeNotRecordedError: status.HTTP_503_SERVICE_UNAVAILABLE,
    ProviderTimeoutError: status.HTTP_504_GATEWAY_TIMEOUT,
}
RETRY_AFTER_S: dict[type[Exception], str] = {
    ProviderBusyError: "1",
    PaymentNotStartedError: "5",
    IdempotencyKeyInUseError: "1",
}


async def domain_error_handler(request: Request, error: Exception) -> JSONResponse:
    assert isinstance(error, DOMAIN_ERRORS)
    code = ERROR_STATUS[type(error)]
    if code >= 500:
        logger.warning("payment failed with {}: {}", code, error.message)
    retry_after = RETRY_AFTER_S.get(type(error))
    headers = {"Retry-After": retry_after} if retry_after else None
    return JSONResponse({"detail": error.message}, status_code=code, headers=headers)


async def database_unavailable_handler(request: Request, error: Exception) -> JSONResponse:
    logger.error("database unavailable: {}: {}", type(error).__name__, getattr(error, "orig", ""))
    return JSONResponse(
        {"detail": "The database is unavailable or did not answer in time; try again shortly"},
        status_code=status.HTTP_503_SERVICE_UNAVAILABLE,
        headers={"Retry-After": "5"},
    )


async def conflict_handler(request: Request, error: Exception) -> JSONResponse:
    logger.warning("transaction lost to a concurrent one: {}", getattr(error, "orig", ""))
    return JSONResponse(
        {
            "detail": "This request lost a race with a concurrent change to the same data and "
            "changed nothing; read the resource again, then retry if it is still needed"
        },
        status_code=status.HTTP_409_CONFLICT,
    )


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
    """Every domain outcome that is not a success, and its status code, in one place.

    `HTTPException` (404 for an unknown id) keeps FastAPI's own handler; an error nothing here
    expects becomes a 500 in `RequestContextMiddleware`, which logs it with the request id.
    """
    for domain_error in DOMAIN_ERRORS:
        app.add_exception_handler(domain_error, domain_error_handler)
    app.add_exception_handler(RequestValidationError, validation_error_handler)
    for unreachable in DATABASE_UNREACHABLE:
        app.add_exception_handler(unreachable, database_unavailable_handler)
    app.add_exception_handler(TransactionConflictError, conflict_handler)


add_exception_handlers(app)

"""Invoice API: create invoices, pay them by card through FakePay, list them in pages.

The app factory and its lifespan, then every route, then the status code of every failure
(`add_exception_handlers`). The work itself is in invoices.py, payments.py and customers.py.
Writes take a session (`SessionDep`); reads borrow a pooled connection from the app's engine
(`EngineDep`) for their statements and give it back.
"""

import asyncio
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from functools import partial
from typing import Annotated, Any, TypedDict, TypeVar

from fastapi import Body, FastAPI, Path, Query, Request, status
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from fastapi.routing import APIRoute
from fastapi_offline import FastAPIOffline
from fastapi_pagination import Page
from loguru import logger
from sqlalchemy.ext.asyncio import AsyncEngine
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
from auth import (
    AdminDep,
    Authorized,
    KeyTable,
    document_security,
    open_documentation,
    public,
)
from customers import CustomerNotFoundError, EmailTakenError, get_customer_or_404
from db import (
    DATABASE_UNREACHABLE,
    EngineDep,
    SessionDep,
    TransactionConflictError,
    execute_core,
    make_engine,
)
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
    InvoiceNotFoundError,
    InvoicePageDep,
    InvoiceSliceDep,
    OutcomeUnknownError,
    PageDep,
    PaymentInProgressError,
    get_invoice_or_404,
    list_page,
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
from settings import Settings, SettingsDep


def operation_id(route: APIRoute) -> str:
    """Each operation's id is its handler's name (`pay_invoice`), so a generated client's
    methods read as the routes do; the names are unique in this module, and `test_docs`
    keeps them so."""
    return route.name


class State(TypedDict):
    """What the lifespan hands every request (`request.state`): the app's settings, its
    engine, the API key table, one pooled FakePay client, and the recorder of payment
    outcomes the database would not take in time."""

    settings: Settings
    engine: AsyncEngine
    keys: KeyTable
    fakepay: FakePayClient
    recorder: OutcomeRecorder


@asynccontextmanager
async def lifespan(app: FastAPI, config: Settings) -> AsyncIterator[State]:
    """Per process: the engine and the clients, built here rather than at import; in the
    background, the purge of expired Idempotency-Keys and the sweep that turns stalled
    attempts UNKNOWN."""
    engine = make_engine(config)
    fakepay = FakePayClient(config)
    recorder = OutcomeRecorder(engine)
    metrics.start(engine, config)
    background = [
        asyncio.create_task(purge_expired_keys_forever(engine)),
        asyncio.create_task(sweep_stalled_forever(engine, fakepay.stale_after_s)),
    ]
    logger.info("invoice API started; FakePay at {}", config.fakepay_url)
    try:
        yield State(
            settings=config,
            engine=engine,
            keys=KeyTable(engine),
            fakepay=fakepay,
            recorder=recorder,
        )
    finally:
        for task in background:
            task.cancel()
        await recorder.aclose()
        await fakepay.aclose()
        metrics.stop()
        await engine.dispose()


def create_app(config: Settings | None = None) -> FastAPI:
    """The app, for `config` (by default the settings from `.env` and the environment)."""
    config = config or Settings()
    configure_logging(config)
    # FastAPIOffline serves Swagger UI and ReDoc from pinned, packaged assets instead of a
    # CDN, so /docs works on machines without internet access.
    app = FastAPIOffline(
        title=api_docs.TITLE,
        version="0.2.0",
        summary=api_docs.SUMMARY,
        description=api_docs.DESCRIPTION,
        openapi_tags=api_docs.TAGS,
        lifespan=partial(lifespan, config=config),
        generate_unique_id_function=operation_id,
        dependencies=[Authorized],  # every route needs a key with AUTH=on, unless `public`
    )
    app.router.route_class = ExactJSONRoute
    routes.add_to(app)
    app.add_middleware(RequestContextMiddleware)  # the outermost: every reply gets its id
    api_docs.document_validation_errors(app)
    open_documentation(app)
    document_security(app)
    add_exception_handlers(app)
    return app


Endpoint = TypeVar("Endpoint", bound=Callable[..., Any])


class Routes:
    """The routes below, recorded by their decorators and added to every app `create_app`
    makes, as that app's own routes (its dependencies, its dependency overrides). FastAPI's
    `include_router` would nest them in a lazily resolved router instead, which `app.routes`
    does not list (the key checks and the tests walk it)."""

    def __init__(self) -> None:
        self.recorded: list[tuple[str, str, Callable[..., Any], dict[str, Any]]] = []

    def get(self, path: str, **options: Any) -> Callable[[Endpoint], Endpoint]:
        return self._record("GET", path, options)

    def post(self, path: str, **options: Any) -> Callable[[Endpoint], Endpoint]:
        return self._record("POST", path, options)

    def _record(
        self, method: str, path: str, options: dict[str, Any]
    ) -> Callable[[Endpoint], Endpoint]:
        def record(endpoint: Endpoint) -> Endpoint:
            self.recorded.append((method, path, endpoint, options))
            return endpoint

        return record

    def add_to(self, app: FastAPI) -> None:
        for method, path, endpoint, options in self.recorded:
            app.add_api_route(path, endpoint, methods=[method], **options)


routes = Routes()
HEALTH_PROBE = select(1)

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


@routes.get(
    "/health-check",
    tags=["health"],
    summary="Check the service and its database",
    response_model=HealthStatus,
    responses={503: {"model": HealthStatus, "description": "The database is unreachable"}},
)
@public
async def health_check(engine: EngineDep) -> Any:
    """UP only after a real round trip to the database."""
    try:
        async with engine.connect() as connection:
            await execute_core(connection, HEALTH_PROBE)
    except DATABASE_UNREACHABLE:
        return JSONResponse({"status": "DOWN"}, status_code=status.HTTP_503_SERVICE_UNAVAILABLE)
    return HealthStatus(status="UP")


@routes.get(
    "/invoice/{invoice_id}",
    tags=["invoices"],
    summary="Read one invoice",
    response_model=InvoicePublic,
    responses=responses(InvoiceNotFoundError, DatabaseUnavailableError),
)
async def read_invoice(
    invoice_id: Annotated[uuid.UUID, Path(openapi_examples=READ_EXAMPLES)], engine: EngineDep
) -> InvoicePublic:
    """One invoice with its customer, and the masked card once paid."""
    async with engine.connect() as connection:
        return await get_invoice_or_404(connection, invoice_id)


@routes.post(
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


@routes.post(
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


@routes.post(
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
    config: SettingsDep,
) -> InvoicePublic | Response:
    """Mark a PENDING invoice CANCELLED; cancelling a CANCELLED invoice again changes nothing.

    Try it with the seeded PENDING invoice `6f53c7be-0369-11f0-8d97-7c646cb7c0bc`.
    """
    return await invoices.cancel_invoice(session, invoice_id, idempotency, config)


@routes.get(
    "/invoice/{invoice_id}/payments",
    tags=["invoices"],
    summary="Every payment attempt of an invoice",
    response_model=PaymentHistory,
    responses=responses(InvoiceNotFoundError, DatabaseUnavailableError),
)
async def read_invoice_payments(
    invoice_id: Annotated[uuid.UUID, Path(openapi_examples=READ_EXAMPLES)], engine: EngineDep
) -> PaymentHistory:
    """Each attempt to charge a card for the invoice, newest first, with masked cards only."""
    async with engine.connect() as connection:
        return await payment_history(connection, invoice_id)


@routes.post(
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


@routes.get(
    "/payments",
    tags=["operators"],
    summary="List payment attempts across invoices, page by page",
    response_model=Page[PaymentListItem],
    responses=responses(DatabaseUnavailableError),
)
async def list_payments(
    engine: EngineDep,
    params: PageDep,
    payment_status: Annotated[
        PaymentStatus | None,
        Query(
            alias="status", description="Only this state: UNKNOWN to resolve, REFUND_DUE to refund"
        ),
    ] = None,
) -> Page[PaymentListItem]:
    """Attempts newest first, with the invoice each was for: what an operator works through."""
    async with engine.connect() as connection:
        return await invoices.list_payments(connection, payment_status, params)


@routes.get(
    "/invoices",
    tags=["invoices"],
    summary="List invoices, page by page",
    response_model=Page[InvoicePublic],
    responses=responses(DatabaseUnavailableError),
)
async def list_invoices(query: InvoicePageDep, engine: EngineDep) -> Page[InvoicePublic]:
    """Invoices newest first, ten to a page by default, filtered by any of status, customer
    and creation time.

    Page numbers reach `MAX_PAGE_OFFSET` invoices deep; to go deeper, or through millions of
    invoices, use `GET /invoices/scroll`, whose cost does not grow with depth. With only a
    status filter (or none) `total` is read from a counts table at no cost; with a customer
    or a date range it is a count of the matching invoices, which grows with their number.
    """
    async with engine.connect() as connection:
        return await list_page(connection, query)


@routes.get(
    "/invoices/scroll",
    tags=["invoices"],
    summary="Scroll through invoices with a cursor",
    response_model=InvoiceScrollPage,
    responses=responses(DatabaseUnavailableError),
)
async def scroll_invoices(query: InvoiceSliceDep, engine: EngineDep) -> InvoiceScrollPage:
    """Invoices newest first, slice by slice: the same order and filters as `GET /invoices`
    (send the same filters with every slice), at a cost that stays flat however deep you go."""
    async with engine.connect() as connection:
        return await scroll(connection, query)


@routes.post(
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


@routes.get(
    "/customer/{customer_id}",
    tags=["customers"],
    summary="Read one customer",
    response_model=CustomerPublic,
    responses=responses(CustomerNotFoundError, DatabaseUnavailableError),
)
async def read_customer(
    customer_id: Annotated[int, Path(ge=1, le=2_147_483_647, examples=[3])],
    engine: EngineDep,
) -> CustomerPublic:
    """One customer."""
    async with engine.connect() as connection:
        return await get_customer_or_404(connection, customer_id)


@routes.get(
    "/customers",
    tags=["customers"],
    summary="List customers, page by page",
    response_model=Page[CustomerPublic],
    responses=responses(DatabaseUnavailableError),
)
async def list_customers(engine: EngineDep, params: PageDep) -> Page[CustomerPublic]:
    """Customers by id, ten to a page by default."""
    async with engine.connect() as connection:
        return await customers.list_customers(connection, params)


@routes.get(
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


# For `uvicorn main:app`: the app with the settings of `.env` and the environment.
app = create_app()

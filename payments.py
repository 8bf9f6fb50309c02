"""Paying an invoice through FakePay: claim, charge, settle, and resolve what stays unknown.

A payment is three short steps so that no database transaction or pooled connection is held
while the provider is called, and so that one invoice is charged at most once:

1. claim: write the invoice row (its `payment_attempts`, which also locks it), check it is
   PENDING with no attempt open, record a PROCESSING attempt that holds the invoice's one open
   slot (`payment.unsettled`), commit. The database itself refuses a second open attempt (a
   unique key), so two claims cannot both win wherever they run; on one server the row lock
   makes the second wait and then see the first.
2. charge: post the `FakePayRequest` (the invoice id is the transactionId), turning every way
   the call can end into a `PaymentStatus`.
3. settle: record the outcome on the attempt while it holds the open slot; a success turns
   the invoice PAID in the same transaction, and takes the invoice's one success slot
   (`payment.succeeded`, unique too). A retry that finds its own outcome already recorded (the
   first try's COMMIT arrived, its acknowledgement did not) is that outcome. An outcome the
   database will not take within the request is handed to the `OutcomeRecorder`, which keeps
   trying in the background: what the provider said is never dropped.

An attempt whose outcome is unknown (no reply in time, or PROCESSING past the stale margin:
its request is gone) may have charged the card. FakePay does not deduplicate a transactionId,
so such an attempt keeps the open slot, and the invoice can be neither paid nor cancelled
until an operator resolves it (`resolve_payment`) after checking with the provider. With
`PROVIDER_DEDUPLICATES=true` a new claim replaces it instead and re-sends the same
transactionId; if the replaced attempt's charge answers after that, it is REFUND_DUE.
"""

import asyncio
import json
import math
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import cache
from typing import Annotated

import anyio
import httpx
from fastapi import Depends, Request
from fastapi.responses import Response
from loguru import logger
from pydantic import SecretStr, field_serializer
from sqlalchemy import Update, bindparam, func, insert, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncEngine
from sqlmodel import col, select
from sqlmodel.ext.asyncio.session import AsyncSession
from sqlmodel.sql.expression import Select

import metrics
from db import (
    CONFLICT_TRIES,
    DATABASE_UNREACHABLE,
    TransactionConflictError,
    duplicate_key_name,
    execute_core,
    retry_conflicts,
)
from errors import ApiError
from idempotency import IdempotentRequest
from invoices import (
    THIS_INVOICE,
    InvoiceNotFoundError,
    OutcomeUnknownError,
    PaymentInProgressError,
    count_status_change,
    create_pending_invoice,
    find_invoice,
    get_invoice_or_404,
    lock_invoice,
    stale_cutoff,
)
from models import (
    CamelModel,
    Card,
    Invoice,
    InvoiceCreate,
    InvoicePublic,
    InvoiceStatus,
    MaskedCard,
    Payment,
    PaymentStatus,
)
from observability import add_log_fields
from settings import SETTLE_RETRY_DELAYS_S, Settings


# The card inside the provider request: the one place the full number is serialised.
class FakePayCard(CamelModel):
    number: SecretStr
    expiry: str
    name: str

    @field_serializer("number", when_used="json")
    def reveal_number(self, number: SecretStr) -> str:
        return number.get_secret_value()


# The body FakePay expects: {"transactionId": ..., "card": {"number", "expiry", "name"}}.
class FakePayRequest(CamelModel):
    transaction_id: str
    card: FakePayCard


class PaymentError(ApiError):
    """A payment that did not happen, or did not finish; the detail names the invoice."""

    def __init__(self, invoice_id: str, message: str) -> None:
        super().__init__(message)
        self.invoice_id = invoice_id


class InvoiceNotPayableError(PaymentError):
    status_code = 409
    documented = "The invoice is not PENDING"

    def __init__(self, invoice_id: str, status: str) -> None:
        super().__init__(
            invoice_id, f"Invoice {invoice_id} is {status}; only PENDING invoices can be paid"
        )


class ProviderBusyError(PaymentError):
    status_code = 503
    retry_after_s = 1
    documented = "Too many payments in flight; nothing was charged (Retry-After)"

    def __init__(self, invoice_id: str) -> None:
        super().__init__(
            invoice_id,
            f"Invoice {invoice_id} was not charged: too many payments are in flight; retry shortly",
        )


class PaymentDeclinedError(PaymentError):
    status_code = 402
    documented = "FakePay declined the card; the invoice stays PENDING"

    def __init__(self, invoice_id: str, reason: str) -> None:
        super().__init__(
            invoice_id, f"Payment for invoice {invoice_id} was declined by FakePay: {reason}"
        )


class ProviderUnavailableError(PaymentError):
    status_code = 502
    documented = "FakePay unreachable or failing; nothing was charged, the invoice stays PENDING"

    def __init__(self, invoice_id: str, reason: str) -> None:
        super().__init__(
            invoice_id,
            f"Invoice {invoice_id} was not charged: {reason}. "
            "It is still PENDING; pay it again later",
        )


class ProviderTimeoutError(PaymentError):
    status_code = 504
    documented = "FakePay did not reply in time; the outcome is unknown (the detail says what next)"

    def __init__(self, invoice_id: str, payment_id: int, reason: str, deduplicates: bool) -> None:
        if deduplicates:
            advice = "It is still PENDING; paying again re-sends the same transactionId"
        else:
            advice = (
                "The card may have been charged: do not pay it again. Check the transaction "
                f"{invoice_id} with the provider, then resolve attempt {payment_id} with "
                f"POST /invoice/{invoice_id}/payments/{payment_id}/resolve"
            )
        super().__init__(
            invoice_id,
            f"Payment for invoice {invoice_id} has an unknown outcome: {reason}. {advice}",
        )


class PaymentNotStartedError(PaymentError):
    """The database failed before the provider was called: nothing was charged."""

    status_code = 503
    retry_after_s = 5
    documented = "The database is unavailable; nothing was charged (Retry-After)"

    def __init__(self, invoice_id: str) -> None:
        super().__init__(
            invoice_id,
            f"Invoice {invoice_id} was not charged: the database is unavailable. "
            f"It is still PENDING; pay it with POST /invoice/pay/{invoice_id} shortly",
        )


class OutcomeNotRecordedError(PaymentError):
    """The provider answered but the database would not take the answer in time; the
    process goes on recording it in the background."""

    status_code = 503
    retry_after_s = 5
    documented = (
        "FakePay answered but the database is unavailable; the detail says whether the card "
        "was charged. The outcome is recorded as soon as the database is back"
    )

    def __init__(self, invoice_id: str, status: PaymentStatus) -> None:
        charged = {
            PaymentStatus.SUCCEEDED: "the card was charged",
            PaymentStatus.UNKNOWN: "the card may have been charged",
        }.get(status, "the card was not charged")
        super().__init__(
            invoice_id,
            f"Payment for invoice {invoice_id} is not recorded yet (the database is "
            f"unavailable), but {charged}; the service records it as soon as the database is "
            f"back. Do not pay it again: read it with GET /invoice/{invoice_id} shortly, or "
            "retry with the same Idempotency-Key",
        )


class ChargedAfterReplacedError(PaymentError):
    """A stalled attempt that the provider charged after a later attempt had replaced it."""

    status_code = 409
    documented = "This attempt was charged after a later one had replaced it: REFUND_DUE"

    def __init__(self, invoice_id: str) -> None:
        super().__init__(
            invoice_id,
            f"This payment for invoice {invoice_id} was charged after it had been replaced by "
            "a later attempt; the charge is recorded as REFUND_DUE to be refunded. Read the "
            f"invoice with GET /invoice/{invoice_id}",
        )


class PaymentNotFoundError(PaymentError):
    status_code = 404
    documented = "The invoice has no payment attempt with this id"

    def __init__(self, invoice_id: str, payment_id: int) -> None:
        super().__init__(invoice_id, f"Invoice {invoice_id} has no payment attempt {payment_id}")


class PaymentNotUnknownError(PaymentError):
    status_code = 409
    documented = "Only an attempt whose outcome is UNKNOWN can be resolved"

    def __init__(self, invoice_id: str, payment_id: int, status: str) -> None:
        super().__init__(
            invoice_id,
            f"Payment attempt {payment_id} of invoice {invoice_id} is {status}; only an "
            "UNKNOWN outcome can be resolved",
        )


# How a payment ends for its client: the invoice PAID, or the error that says what happened.
Ending = InvoicePublic | PaymentError


@dataclass(frozen=True)
class ChargeResult:
    status: PaymentStatus
    reason: str | None = None
    sent: bool = True  # False: the request never reached the provider, nothing was charged


PROVIDER_BUSY = ChargeResult(PaymentStatus.FAILED, "too many payments in flight", sent=False)


def outcome_of(status_code: int, body: bytes) -> ChargeResult:
    """A provider reply as a payment outcome: 200 is paid whatever the body (contract)."""
    if status_code == httpx.codes.OK:
        return ChargeResult(PaymentStatus.SUCCEEDED)
    if status_code == httpx.codes.BAD_REQUEST:
        return ChargeResult(PaymentStatus.DECLINED, declined_reason(body))
    return ChargeResult(PaymentStatus.FAILED, f"FakePay answered HTTP {status_code}")


def declined_reason(body: bytes) -> str:
    try:
        reply = json.loads(body)
    except ValueError:
        reply = None
    reason = reply.get("reason") if isinstance(reply, dict) else None
    return str(reason)[:255] if reason else "no reason given"


class FakePayClient:
    """A pooled async HTTP client for FakePay with a cap on calls in flight.

    The cap keeps a hanging provider from collecting an unbounded pile of waiting requests
    (each holding its invoice's attempt open): calls past it are refused at once, not queued.
    httpx's timeouts apply to each read, so a provider that trickles its reply byte by byte
    could keep a call open indefinitely; `deadline` bounds the whole call.
    """

    def __init__(self, config: Settings) -> None:
        self.url = config.fakepay_url
        self.read_timeout = config.fakepay_timeout
        self.deadline = config.fakepay_deadline
        self.stale_after_s = math.ceil(config.payment_stale_after_s)
        self.deduplicates = config.provider_deduplicates
        self._slots = anyio.CapacityLimiter(config.fakepay_max_concurrency)
        self._http = httpx.AsyncClient(
            timeout=httpx.Timeout(config.fakepay_timeout, connect=config.fakepay_connect_timeout),
            limits=httpx.Limits(max_connections=config.fakepay_max_concurrency),
        )

    async def aclose(self) -> None:
        await self._http.aclose()

    @contextmanager
    def slot(self) -> Iterator[bool]:
        try:
            self._slots.acquire_nowait()
        except anyio.WouldBlock:
            yield False
            return
        metrics.provider_call_started()
        try:
            yield True
        finally:
            metrics.provider_call_ended()
            self._slots.release()

    async def charge(self, request: FakePayRequest) -> ChargeResult:
        """Post the request; every way the call can end becomes a `ChargeResult`.

        Once the status line has arrived it decides the outcome, even if the body then
        fails to arrive or to decode: a 200 is a payment whatever follows it.
        """
        body = request.model_dump(mode="json", by_alias=True)
        status_code: int | None = None
        try:
            async with (
                asyncio.timeout(self.deadline),
                self._http.stream("POST", self.url, json=body) as response,
            ):
                status_code = response.status_code
                return outcome_of(status_code, await response.aread())
        except (TimeoutError, httpx.HTTPError) as error:
            if status_code is not None:
                return outcome_of(status_code, b"")
            return self._failure(error)

    def _failure(self, error: Exception) -> ChargeResult:
        if isinstance(error, httpx.ConnectError | httpx.ConnectTimeout | httpx.PoolTimeout):
            return ChargeResult(PaymentStatus.FAILED, "FakePay could not be reached", sent=False)
        if isinstance(error, TimeoutError):
            reason = f"FakePay did not finish its reply within {self.deadline:g} s"
            return ChargeResult(PaymentStatus.UNKNOWN, reason)
        if isinstance(error, httpx.TimeoutException):
            reason = f"FakePay did not reply within {self.read_timeout:g} s"
            return ChargeResult(PaymentStatus.UNKNOWN, reason)
        # The request may have arrived before the connection broke.
        reason = f"the connection to FakePay broke ({type(error).__name__})"
        return ChargeResult(PaymentStatus.UNKNOWN, reason)


async def get_fakepay(request: Request) -> FakePayClient:
    client: FakePayClient = request.state.fakepay
    return client


FakePayDep = Annotated[FakePayClient, Depends(get_fakepay)]


@dataclass(frozen=True)
class ClaimedInvoice:
    invoice: InvoicePublic  # as it was claimed: PENDING, without a card
    payment_id: int
    card: MaskedCard
    deduplicates: bool  # whether the provider may be sent this transactionId again


# The pay path's statements, built once (building one and its cache key costs more than
# sending it) and run as Core statements (`db.execute_core`): no unit-of-work flush.
THIS_ATTEMPT = col(Payment.id) == bindparam("payment_id")
HOLDS_OPEN_SLOT = col(Payment.unsettled) == 1
CLAIM_INVOICE = (
    update(Invoice).where(THIS_INVOICE).values(payment_attempts=col(Invoice.payment_attempts) + 1)
)
RECORD_ATTEMPT = insert(Payment.metadata.tables["payment"]).values(unsettled=1)
REPLACE_ATTEMPT = (
    update(Payment)
    .where(THIS_ATTEMPT)
    .values(
        payment_status=PaymentStatus.UNKNOWN,
        unsettled=None,
        reason="replaced by a later attempt with the same transactionId",
    )
)
MARK_PAID = (
    update(Invoice)
    .where(THIS_INVOICE, col(Invoice.invoice_status) == InvoiceStatus.PENDING)
    .where(select(Payment.id).where(THIS_ATTEMPT, HOLDS_OPEN_SLOT).exists())
    .values(invoice_status=InvoiceStatus.PAID)
)
RECORD_OUTCOME = (
    update(Payment)
    .where(THIS_ATTEMPT, HOLDS_OPEN_SLOT)
    .values(
        payment_status=bindparam("outcome"),
        reason=bindparam("outcome_reason"),
        unsettled=bindparam("still_unsettled"),
        succeeded=bindparam("succeeded"),
    )
)
READ_ATTEMPT = select(col(Payment.payment_status)).where(THIS_ATTEMPT)
MARK_REFUND_DUE = (
    update(Payment)
    .where(THIS_ATTEMPT)
    .values(
        payment_status=PaymentStatus.REFUND_DUE,
        unsettled=None,
        succeeded=None,
        reason="charged after a later attempt had replaced this one: refund it",
    )
)
# The true end of an attempt that a later one replaced while it was UNKNOWN: no refund due.
RECORD_LATE_OUTCOME = (
    update(Payment)
    .where(THIS_ATTEMPT, col(Payment.payment_status) == PaymentStatus.UNKNOWN)
    .where(col(Payment.unsettled).is_(None), col(Payment.resolved_at).is_(None))
    .values(payment_status=bindparam("outcome"), reason=bindparam("outcome_reason"))
)


@cache
def open_attempt(stale_after_s: int) -> Select[int | None, str, bool]:
    """The invoice's attempt holding its open slot (at most one: a unique key), with its
    status and whether it is older than `stale_after_s`."""
    return select(
        col(Payment.id),
        col(Payment.payment_status),
        col(Payment.created_at) < stale_cutoff(stale_after_s),
    ).where(col(Payment.invoice_id) == bindparam("invoice_id"), HOLDS_OPEN_SLOT)


class ClaimUnconfirmedError(Exception):
    """The claim's COMMIT may or may not have reached the server: its attempt may exist."""

    def __init__(self, claimed: ClaimedInvoice) -> None:
        super().__init__(f"claim of invoice {claimed.invoice.id} unconfirmed")
        self.claimed = claimed


# How a claim whose COMMIT went unconfirmed ends: its attempt, if it exists, sent nothing.
CLAIM_UNCONFIRMED = ChargeResult(
    PaymentStatus.FAILED, "the database did not confirm the claim; nothing was sent", sent=False
)


async def claim(
    session: AsyncSession,
    fakepay: FakePayClient,
    recorder: "OutcomeRecorder",
    invoice_id: str,
    masked: MaskedCard,
    idempotency: IdempotentRequest,
) -> ClaimedInvoice:
    """Record a PROCESSING attempt for a PENDING invoice with no attempt open, and the
    request's Idempotency-Key as past the point of no resumption with it. A conflict with a
    concurrent transaction (nothing was sent yet) is tried again, then answered as the lost
    race it is. A COMMIT whose acknowledgement never came may have recorded the attempt: the
    recorder ends it FAILED (nothing was sent) once the database answers, which frees the
    invoice and the key for the retry the client is told to make."""
    try:
        with idempotency.twin_refused(), open_slot_taken(invoice_id):
            claimed = await retry_conflicts(
                session,
                lambda: record_attempt(session, fakepay, invoice_id, masked, idempotency),
            )
    except ClaimUnconfirmedError as unconfirmed:
        recorder.record_later(unconfirmed.claimed, CLAIM_UNCONFIRMED, idempotency)
        raise PaymentNotStartedError(invoice_id) from None
    except DATABASE_UNREACHABLE:
        raise PaymentNotStartedError(invoice_id) from None
    return claimed


@contextmanager
def open_slot_taken(invoice_id: str) -> Iterator[None]:
    """Around a claim's commit: the database refusing a second open attempt means another
    claim got there first."""
    try:
        yield
    except IntegrityError as error:
        if duplicate_key_name(error) == "uq_payment_unsettled":
            raise PaymentInProgressError(invoice_id) from None
        raise


async def record_attempt(
    session: AsyncSession,
    fakepay: FakePayClient,
    invoice_id: str,
    masked: MaskedCard,
    idempotency: IdempotentRequest,
) -> ClaimedInvoice:
    """The claim's one transaction, ended by its commit."""
    claimed: ClaimedInvoice | None = None
    try:
        async with session.begin():
            claimed = await claim_in_transaction(session, fakepay, invoice_id, masked, idempotency)
    except DATABASE_UNREACHABLE:
        if claimed is None:
            raise  # before the COMMIT: nothing was recorded
        raise ClaimUnconfirmedError(claimed) from None
    return claimed


async def claim_in_transaction(
    session: AsyncSession,
    fakepay: FakePayClient,
    invoice_id: str,
    masked: MaskedCard,
    idempotency: IdempotentRequest,
) -> ClaimedInvoice:
    """The claim's statements: lock and read the invoice, free or refuse its open slot, record
    the attempt and advance the key."""
    claimed = await execute_core(session, CLAIM_INVOICE, {"invoice_id": invoice_id})
    invoice = await find_invoice(session, invoice_id) if claimed.rowcount else None
    if invoice is None:
        raise InvoiceNotFoundError(invoice_id)
    if invoice.invoice_status != InvoiceStatus.PENDING:
        raise InvoiceNotPayableError(invoice_id, invoice.invoice_status)
    await free_open_slot(session, fakepay, invoice_id)
    recorded = await execute_core(
        session,
        RECORD_ATTEMPT,
        {
            "invoice_id": invoice_id,
            "card_number": masked.number,
            "card_name": masked.name,
            "card_expiry": masked.expiry,
        },
    )
    await idempotency.record_payment_started(session, invoice_id, recorded.lastrowid)
    return ClaimedInvoice(invoice, recorded.lastrowid, masked, fakepay.deduplicates)


async def free_open_slot(session: AsyncSession, fakepay: FakePayClient, invoice_id: str) -> None:
    """409 while an attempt is in flight. One whose outcome is unknown (or PROCESSING past the
    stale margin: its request is gone) may have charged the card: it blocks the invoice until
    resolved, unless the provider deduplicates, in which case it is replaced."""
    found = await execute_core(
        session, open_attempt(fakepay.stale_after_s), {"invoice_id": invoice_id}
    )
    attempt = found.first()
    if attempt is None:
        return
    payment_id, status, stale = attempt
    if status == PaymentStatus.PROCESSING and not stale:
        raise PaymentInProgressError(invoice_id)
    if not fakepay.deduplicates:
        raise OutcomeUnknownError(invoice_id, payment_id)
    await execute_core(session, REPLACE_ATTEMPT, {"payment_id": payment_id})
    logger.warning("invoice {}: attempt {} replaced, its outcome unknown", invoice_id, payment_id)


def ending(claimed: ClaimedInvoice, result: ChargeResult, stands: bool) -> Ending:
    """What the client is told once the outcome is recorded: the invoice PAID with the masked
    card, or the `PaymentError` that says what happened and what to do."""
    invoice_id = str(claimed.invoice.id)
    reason = result.reason or "unknown"
    if result.status == PaymentStatus.SUCCEEDED:
        if not stands:
            return ChargedAfterReplacedError(invoice_id)
        return claimed.invoice.model_copy(
            update={"invoice_status": InvoiceStatus.PAID, "card": claimed.card}
        )
    if result == PROVIDER_BUSY:
        return ProviderBusyError(invoice_id)
    if result.status == PaymentStatus.DECLINED:
        return PaymentDeclinedError(invoice_id, reason)
    if result.status == PaymentStatus.UNKNOWN:
        return ProviderTimeoutError(invoice_id, claimed.payment_id, reason, claimed.deduplicates)
    return ProviderUnavailableError(invoice_id, reason)


async def record_outcome(
    session: AsyncSession,
    claimed: ClaimedInvoice,
    result: ChargeResult,
    idempotency: IdempotentRequest,
) -> Ending:
    """One transaction that records the outcome on the attempt, and the reply under the
    request's Idempotency-Key; the reply. A later attempt may have replaced this one: a charge
    is then REFUND_DUE.

    A success takes the invoice row first, the lock every claim takes first too, so a settle
    and a claim never deadlock. Recording an outcome the attempt already has is a success:
    that is a retry whose first try committed.
    """
    async with session.begin():
        stands = await record_on_attempt(session, claimed, result)
        reply = ending(claimed, result, stands)
        await idempotency.record_final(
            session, claimed.payment_id, reply, status_code=201, sent=result.sent
        )
    return reply


async def record_on_attempt(
    session: AsyncSession, claimed: ClaimedInvoice, result: ChargeResult
) -> bool:
    """The outcome on the attempt, in the caller's transaction; whether it stands (False: a
    later attempt had replaced this one)."""
    invoice_id = str(claimed.invoice.id)
    attempt = {"invoice_id": invoice_id, "payment_id": claimed.payment_id}
    succeeded = result.status == PaymentStatus.SUCCEEDED
    recorded = False
    if not succeeded or (await execute_core(session, MARK_PAID, attempt)).rowcount:
        outcome = {
            **attempt,
            "outcome": result.status,
            "outcome_reason": result.reason,
            "still_unsettled": 1 if result.status == PaymentStatus.UNKNOWN else None,
            "succeeded": 1 if succeeded else None,
        }
        recorded = bool((await execute_core(session, RECORD_OUTCOME, outcome)).rowcount)
    if succeeded and recorded:
        await count_status_change(session, InvoiceStatus.PENDING, InvoiceStatus.PAID)
    if recorded:
        return True
    current = (await execute_core(session, READ_ATTEMPT, attempt)).scalar_one_or_none()
    if current == result.status:
        return True
    if current is None:  # an unconfirmed claim that was never committed: nothing to record
        return False
    if succeeded:
        await execute_core(session, MARK_REFUND_DUE, attempt)
        metrics.count_payment(PaymentStatus.REFUND_DUE)
        logger.error(
            "invoice {}: attempt {} was charged after a later attempt had replaced it; "
            "this charge must be refunded",
            invoice_id,
            claimed.payment_id,
        )
    elif result.status != PaymentStatus.UNKNOWN:
        late = {**attempt, "outcome": result.status, "outcome_reason": result.reason}
        await execute_core(session, RECORD_LATE_OUTCOME, late)
    return False


async def settle(
    session: AsyncSession,
    recorder: "OutcomeRecorder",
    claimed: ClaimedInvoice,
    result: ChargeResult,
    idempotency: IdempotentRequest,
) -> Ending:
    """Record the outcome, retrying through a short outage or a lost race; the reply.
    Past the request's retries the recorder takes it over, and the client is told."""
    for delay in SETTLE_RETRY_DELAYS_S:
        try:
            return await record_outcome(session, claimed, result, idempotency)
        except (*DATABASE_UNREACHABLE, TransactionConflictError):
            logger.warning("recording payment of invoice {} failed; retrying", claimed.invoice.id)
            await asyncio.sleep(delay)
    try:
        return await record_outcome(session, claimed, result, idempotency)
    except (*DATABASE_UNREACHABLE, TransactionConflictError):
        recorder.record_later(claimed, result, idempotency)
        raise OutcomeNotRecordedError(str(claimed.invoice.id), result.status) from None


class OutcomeRecorder:
    """Outcomes the provider gave that the database would not take during their request.

    Each is retried in the background, a little less often each time, for as long as it
    takes, and logged at ERROR while it waits: a charge must not be forgotten because the
    database was away. Per process; an outcome still waiting when the process stops is
    logged with what an operator must do, and its attempt turns UNKNOWN after the stale
    margin, which blocks the invoice until it is resolved.
    """

    FIRST_DELAY_S = 1.0
    LONGEST_DELAY_S = 30.0

    def __init__(self, engine: AsyncEngine) -> None:
        self.engine = engine
        self.waiting: dict[int, tuple[ClaimedInvoice, ChargeResult]] = {}  # by attempt
        self._tasks: set[asyncio.Task[None]] = set()

    def record_later(
        self, claimed: ClaimedInvoice, result: ChargeResult, idempotency: IdempotentRequest
    ) -> None:
        """Record it in the background, with the reply under the request's Idempotency-Key,
        which a retry with that key then gets."""
        self.waiting[claimed.payment_id] = (claimed, result)
        task = asyncio.get_running_loop().create_task(self._record(claimed, result, idempotency))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _record(
        self, claimed: ClaimedInvoice, result: ChargeResult, idempotency: IdempotentRequest
    ) -> None:
        delay = self.FIRST_DELAY_S
        while True:
            logger.error(
                "payment outcome {} of invoice {} (attempt {}) is not recorded yet; "
                "trying again in {:g} s",
                result.status,
                claimed.invoice.id,
                claimed.payment_id,
                delay,
            )
            await asyncio.sleep(delay)
            try:
                async with AsyncSession(self.engine) as session:
                    await record_outcome(session, claimed, result, idempotency)
            except (*DATABASE_UNREACHABLE, TransactionConflictError):
                delay = min(delay * 2, self.LONGEST_DELAY_S)
                continue
            self.waiting.pop(claimed.payment_id, None)
            logger.warning(
                "payment outcome {} of invoice {} recorded late", result.status, claimed.invoice.id
            )
            return

    async def aclose(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        for claimed, result in self.waiting.values():
            logger.error(
                "stopping with the outcome {} of invoice {} (attempt {}) unrecorded: once it is "
                "UNKNOWN, resolve it with POST /invoice/{}/payments/{}/resolve",
                result.status,
                claimed.invoice.id,
                claimed.payment_id,
                claimed.invoice.id,
                claimed.payment_id,
            )


async def get_recorder(request: Request) -> OutcomeRecorder:
    recorder: OutcomeRecorder = request.state.recorder
    return recorder


RecorderDep = Annotated[OutcomeRecorder, Depends(get_recorder)]


def sweep_stalled(stale_after_s: int) -> Update:
    """Attempts left PROCESSING past the stale margin belong to requests that are gone: their
    outcome is UNKNOWN (they keep the open slot, so the invoice waits for a resolution)."""
    return (
        update(Payment)
        .where(
            col(Payment.payment_status) == PaymentStatus.PROCESSING,
            col(Payment.created_at) < stale_cutoff(stale_after_s),
        )
        .values(
            payment_status=PaymentStatus.UNKNOWN,
            reason=f"no outcome recorded within {stale_after_s} s: the card may have been charged",
        )
    )


async def sweep_stalled_once(engine: AsyncEngine, stale_after_s: int) -> int:
    """One sweep, in one transaction; how many attempts it marked. A sweep that loses a race
    (on a cluster: another node's sweep marked the same rows first, and certification keeps
    one of the two) is run again, and then finds those rows UNKNOWN already."""
    statement = sweep_stalled(stale_after_s)
    for tries_left in reversed(range(CONFLICT_TRIES)):
        try:
            async with engine.begin() as connection:
                swept = await connection.execute(statement)
        except TransactionConflictError:
            if not tries_left:
                raise
            continue
        return swept.rowcount
    raise AssertionError("unreachable")  # pragma: no cover


async def sweep_stalled_forever(
    engine: AsyncEngine, stale_after_s: int, every_s: float = 30
) -> None:
    """The lifespan's background task. Several processes sweeping at once are harmless: the
    statement only moves PROCESSING rows past the margin to UNKNOWN, so each row is marked
    by one sweep."""
    while True:
        try:
            swept = await sweep_stalled_once(engine, stale_after_s)
            if swept:
                logger.error("{} stalled payment attempts are now UNKNOWN", swept)
        except (*DATABASE_UNREACHABLE, TransactionConflictError):
            logger.warning("sweeping stalled payment attempts failed; will try again")
        await asyncio.sleep(every_s)


RESOLVE_PAID = (
    update(Payment)
    .where(THIS_ATTEMPT)
    .values(
        payment_status=bindparam("outcome"),
        unsettled=None,
        succeeded=bindparam("succeeded"),
        resolved_at=func.now(6),
        resolved_by=bindparam("resolved_by"),
    )
)


@cache
def attempt_of_invoice(stale_after_s: int) -> Select[str, bool]:
    """An attempt's status, and whether it is older than `stale_after_s`."""
    return select(
        col(Payment.payment_status), col(Payment.created_at) < stale_cutoff(stale_after_s)
    ).where(THIS_ATTEMPT, col(Payment.invoice_id) == bindparam("invoice_id"))


async def resolve_payment(
    session: AsyncSession,
    invoice_id: str,
    payment_id: int,
    outcome: PaymentStatus,
    resolved_by: str,
    stale_after_s: int,
) -> InvoicePublic:
    """An operator's word on an UNKNOWN attempt, after checking with the provider: SUCCEEDED
    pays the invoice (or, if it was paid meanwhile, is a second charge: REFUND_DUE), FAILED
    frees it for a new payment. Under the invoice row lock, like every payment change. An
    attempt PROCESSING past the stale margin is UNKNOWN, whether or not the sweep has marked it
    yet."""
    attempt = {"invoice_id": invoice_id, "payment_id": payment_id}
    async with session.begin():
        if await lock_invoice(session, invoice_id) is None:
            raise InvoiceNotFoundError(invoice_id)
        found = await execute_core(session, attempt_of_invoice(stale_after_s), attempt)
        row = found.first()
        if row is None:
            raise PaymentNotFoundError(invoice_id, payment_id)
        status, stale = row
        if not (status == PaymentStatus.UNKNOWN or (status == PaymentStatus.PROCESSING and stale)):
            raise PaymentNotUnknownError(invoice_id, payment_id, status)
        succeeded = outcome == PaymentStatus.SUCCEEDED
        if succeeded and not (await execute_core(session, MARK_PAID, attempt)).rowcount:
            outcome, succeeded = PaymentStatus.REFUND_DUE, False
            metrics.count_payment(PaymentStatus.REFUND_DUE)
        elif succeeded:
            await count_status_change(session, InvoiceStatus.PENDING, InvoiceStatus.PAID)
        resolution = {
            **attempt,
            "outcome": outcome,
            "succeeded": 1 if succeeded else None,
            "resolved_by": resolved_by,
        }
        await execute_core(session, RESOLVE_PAID, resolution)
    logger.warning(
        "invoice {}: attempt {} resolved as {} by {}", invoice_id, payment_id, outcome, resolved_by
    )
    return await get_invoice_or_404(session, uuid.UUID(invoice_id))


async def create_invoice(
    session: AsyncSession,
    fakepay: FakePayClient,
    recorder: OutcomeRecorder,
    request: InvoiceCreate,
    idempotency: IdempotentRequest,
) -> InvoicePublic | Response:
    """Create a PENDING invoice and, with a card, pay it; the first reply again for a retry
    with the same Idempotency-Key, and, for a retry of one whose payment never started, the
    payment of the invoice it created."""
    if replay := await idempotency.begin(session, request):
        return replay
    invoice = await create_pending_invoice(session, request, idempotency)
    if request.card is None:
        return invoice
    return await charge(session, fakepay, recorder, str(invoice.id), request.card, idempotency)


async def pay_invoice(
    session: AsyncSession,
    fakepay: FakePayClient,
    recorder: OutcomeRecorder,
    invoice_id: str,
    card: Card,
    idempotency: IdempotentRequest,
) -> InvoicePublic | Response:
    """Pay a PENDING invoice; the first reply again for a retry with the same Idempotency-Key."""
    if replay := await idempotency.begin(session, card):
        return replay
    return await charge(session, fakepay, recorder, invoice_id, card, idempotency)


async def charge(
    session: AsyncSession,
    fakepay: FakePayClient,
    recorder: OutcomeRecorder,
    invoice_id: str,
    card: Card,
    idempotency: IdempotentRequest,
) -> InvoicePublic:
    """Charge `card` for a PENDING invoice once, answering the invoice PAID with the masked
    card; raise a `PaymentError` for every other end."""
    masked = card.masked()
    add_log_fields(invoice_id=invoice_id)
    claimed = await claim(session, fakepay, recorder, invoice_id, masked, idempotency)
    add_log_fields(payment_id=claimed.payment_id)
    with fakepay.slot() as acquired:
        if acquired:
            logger.info("payment requested: invoice {} card {}", invoice_id, masked.number)
            started = time.perf_counter()
            result = await charge_once(fakepay, invoice_id, card)
            elapsed_ms = (time.perf_counter() - started) * 1000
            metrics.record_charge(result.status, elapsed_ms)
            logger.info(
                "payment outcome: invoice {} {} ({}) in {:.0f} ms",
                invoice_id,
                result.status,
                result.reason or "ok",
                elapsed_ms,
            )
        else:
            result = PROVIDER_BUSY
            metrics.count_payment(result.status)
    reply = await settle(session, recorder, claimed, result, idempotency)
    if isinstance(reply, PaymentError):
        raise reply
    return reply


async def charge_once(fakepay: FakePayClient, invoice_id: str, card: Card) -> ChargeResult:
    """The provider call, which never raises: an error nobody foresaw still ends the attempt,
    as UNKNOWN, since the request may have reached the provider."""
    request = FakePayRequest(
        transaction_id=invoice_id,
        card=FakePayCard(number=card.number, expiry=card.expiry, name=card.name),
    )
    try:
        return await fakepay.charge(request)
    except Exception as error:
        logger.opt(exception=error).error("payment of invoice {} failed unexpectedly", invoice_id)
        return ChargeResult(PaymentStatus.UNKNOWN, f"unexpected error ({type(error).__name__})")

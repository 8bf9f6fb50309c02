"""Paying an invoice through FakePay: claim, charge, settle.

A payment is three short steps so that no database transaction or pooled connection is held
while the provider is called, and so that one invoice is charged at most once:

1. claim: lock the invoice row, check it is PENDING with no attempt in flight, record a
   PROCESSING attempt, commit. A concurrent claim for the same invoice waits on the lock, then
   sees the attempt and gets `PaymentInProgressError`.
2. charge: post the `FakePayRequest` (the invoice id is the transactionId, the key a provider
   deduplicates on), turning every provider outcome into a `PaymentStatus`.
3. settle: record the outcome; on success the invoice turns PAID in the same transaction.

An attempt left PROCESSING by a crash blocks its invoice only until it is older than the
longest a payment can take (the provider call's deadline plus settle's retries) and a margin;
the next claim then marks it ABANDONED. Settle only ever changes an attempt that is still
PROCESSING, so a superseded attempt that the provider charged late is recorded as REFUND_DUE,
never as a second success.
"""

import asyncio
import json
import math
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from functools import cache
from typing import Annotated

import anyio
import httpx
from fastapi import Depends, Request
from loguru import logger
from pydantic import SecretStr, field_serializer
from sqlalchemy import ColumnElement, bindparam, insert, literal_column, update
from sqlalchemy.dialects.mysql import DATETIME
from sqlmodel import col, select
from sqlmodel.ext.asyncio.session import AsyncSession
from sqlmodel.sql.expression import Select

from db import DATABASE_UNREACHABLE, TransactionConflictError, execute_core
from idempotency import IdempotentRequest
from invoices import THIS_INVOICE, count_status_change, find_invoice, lock_invoice
from models import (
    CamelModel,
    Card,
    Invoice,
    InvoicePublic,
    InvoiceStatus,
    MaskedCard,
    Payment,
    PaymentStatus,
)
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


class PaymentError(Exception):
    """A payment that did not happen; `main.py` maps each subclass to one status code."""

    def __init__(self, invoice_id: str, message: str) -> None:
        super().__init__(message)
        self.invoice_id = invoice_id
        self.message = message


class InvoiceNotFoundError(PaymentError):
    def __init__(self, invoice_id: str) -> None:
        super().__init__(invoice_id, f"Invoice {invoice_id} not found")


class InvoiceNotPayableError(PaymentError):
    def __init__(self, invoice_id: str, status: str) -> None:
        super().__init__(
            invoice_id, f"Invoice {invoice_id} is {status}; only PENDING invoices can be paid"
        )


class PaymentInProgressError(PaymentError):
    def __init__(self, invoice_id: str) -> None:
        super().__init__(
            invoice_id,
            f"A payment for invoice {invoice_id} is already in progress; "
            "check the invoice before paying again",
        )


class ProviderBusyError(PaymentError):
    def __init__(self, invoice_id: str) -> None:
        super().__init__(
            invoice_id,
            f"Invoice {invoice_id} was not charged: too many payments are in flight; retry shortly",
        )


class PaymentDeclinedError(PaymentError):
    def __init__(self, invoice_id: str, reason: str) -> None:
        super().__init__(
            invoice_id, f"Payment for invoice {invoice_id} was declined by FakePay: {reason}"
        )


class ProviderUnavailableError(PaymentError):
    def __init__(self, invoice_id: str, reason: str) -> None:
        super().__init__(
            invoice_id,
            f"Invoice {invoice_id} was not charged: {reason}. "
            "It is still PENDING; pay it again later",
        )


class ProviderTimeoutError(PaymentError):
    def __init__(self, invoice_id: str, reason: str) -> None:
        super().__init__(
            invoice_id,
            f"Payment for invoice {invoice_id} has an unknown outcome: {reason}. "
            "It is still PENDING; paying again reuses the same transactionId",
        )


class PaymentNotStartedError(PaymentError):
    """The database failed before the provider was called: nothing was charged."""

    def __init__(self, invoice_id: str) -> None:
        super().__init__(
            invoice_id,
            f"Invoice {invoice_id} was not charged: the database is unavailable. "
            f"It is still PENDING; pay it with POST /invoice/pay/{invoice_id} shortly",
        )


class OutcomeNotRecordedError(PaymentError):
    """The provider answered but the database would not take the answer."""

    def __init__(self, invoice_id: str, status: PaymentStatus) -> None:
        charged = {
            PaymentStatus.SUCCEEDED: "the card was charged",
            PaymentStatus.UNKNOWN: "the card may have been charged",
        }.get(status, "the card was not charged")
        super().__init__(
            invoice_id,
            f"Payment for invoice {invoice_id} could not be recorded (the database is "
            f"unavailable), but {charged}. Do not pay it again: read it with "
            f"GET /invoice/{invoice_id} once the service is back, or retry with the same "
            "Idempotency-Key",
        )


class ChargedAfterSupersededError(PaymentError):
    """A stalled attempt that the provider charged after a later attempt had replaced it."""

    def __init__(self, invoice_id: str) -> None:
        super().__init__(
            invoice_id,
            f"This payment for invoice {invoice_id} was charged after it had been replaced by "
            "a later attempt; the charge is recorded as REFUND_DUE to be refunded. Read the "
            f"invoice with GET /invoice/{invoice_id}",
        )


@dataclass(frozen=True)
class ChargeResult:
    status: PaymentStatus
    reason: str | None = None
    sent: bool = True  # False: the request never reached the provider, nothing was charged


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
        try:
            yield True
        finally:
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


async def claim(
    session: AsyncSession,
    invoice_id: str,
    masked: MaskedCard,
    stale_after_s: int,
    idempotency: IdempotentRequest,
) -> ClaimedInvoice:
    """Lock the invoice row (its customer is only read), check it can be paid, record a
    PROCESSING attempt, and reserve the request's Idempotency-Key with it."""
    try:
        with idempotency.twin_refused():
            claimed = await record_attempt(session, invoice_id, masked, stale_after_s, idempotency)
    except DATABASE_UNREACHABLE:
        raise PaymentNotStartedError(invoice_id) from None
    idempotency.reserved = True
    return claimed


async def record_attempt(
    session: AsyncSession,
    invoice_id: str,
    masked: MaskedCard,
    stale_after_s: int,
    idempotency: IdempotentRequest,
) -> ClaimedInvoice:
    """The claim's one transaction, ended by its commit."""
    async with session.begin():
        status = await lock_invoice(session, invoice_id)
        if status is None:
            raise InvoiceNotFoundError(invoice_id)
        if status != InvoiceStatus.PENDING:
            raise InvoiceNotPayableError(invoice_id, status)
        await supersede_stalled_attempts(session, invoice_id, stale_after_s)
        invoice = await find_invoice(session, invoice_id)
        assert invoice is not None  # its row is locked: it exists
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
        idempotency.reserve(session, invoice_id)
        return ClaimedInvoice(invoice, recorded.lastrowid)


async def supersede_stalled_attempts(
    session: AsyncSession, invoice_id: str, stale_after_s: int
) -> None:
    """409 while an attempt is in flight; one older than `stale_after_s` is ABANDONED."""
    attempts = await execute_core(
        session, in_flight_attempts(stale_after_s), {"invoice_id": invoice_id}
    )
    in_flight = attempts.all()
    if any(not stale for _, stale in in_flight):
        raise PaymentInProgressError(invoice_id)
    if in_flight:
        await session.exec(
            update(Payment)
            .where(col(Payment.id).in_([payment_id for payment_id, _ in in_flight]))
            .values(payment_status=PaymentStatus.ABANDONED, reason="superseded after a stall")
        )
        logger.warning("invoice {} had a stalled payment attempt; marked ABANDONED", invoice_id)


def stale_cutoff(seconds: int) -> ColumnElement[datetime]:
    """Server time, so the app's and the database's clocks never need to agree."""
    return literal_column(f"NOW(6) - INTERVAL {int(seconds)} SECOND", type_=DATETIME(fsp=6))


# The pay path's statements, built once (building one and its cache key costs more than
# sending it) and run as Core statements (`db.execute_core`): no unit-of-work flush.
THIS_ATTEMPT = col(Payment.id) == bindparam("payment_id")
STILL_PROCESSING = col(Payment.payment_status) == PaymentStatus.PROCESSING
RECORD_ATTEMPT = insert(Payment.metadata.tables["payment"])
MARK_PAID = (
    update(Invoice)
    .where(THIS_INVOICE, col(Invoice.invoice_status) == InvoiceStatus.PENDING)
    .where(select(Payment.id).where(THIS_ATTEMPT, STILL_PROCESSING).exists())
    .values(invoice_status=InvoiceStatus.PAID)
)
RECORD_OUTCOME = (
    update(Payment)
    .where(THIS_ATTEMPT, STILL_PROCESSING)
    .values(payment_status=bindparam("outcome"), reason=bindparam("outcome_reason"))
)


@cache
def in_flight_attempts(stale_after_s: int) -> Select[int | None, bool]:
    """The invoice's PROCESSING attempts, each with whether it is older than `stale_after_s`."""
    return select(col(Payment.id), col(Payment.created_at) < stale_cutoff(stale_after_s)).where(
        col(Payment.invoice_id) == bindparam("invoice_id"), STILL_PROCESSING
    )


async def settle(session: AsyncSession, claimed: ClaimedInvoice, result: ChargeResult) -> bool:
    """Record the outcome on the attempt if it is still PROCESSING; whether it was.

    Retries through a short database outage: once the provider has answered, losing that
    answer would leave a charged invoice PENDING. Each try is one transaction of absolute
    values, so a retry is harmless. A success takes the invoice row first, the lock every
    claim takes first too, so a settle and a claim never deadlock.
    """
    invoice_id = str(claimed.invoice.id)
    attempt = {"invoice_id": invoice_id, "payment_id": claimed.payment_id}
    outcome = {**attempt, "outcome": result.status, "outcome_reason": result.reason}
    for delay in (*SETTLE_RETRY_DELAYS_S, None):
        try:
            async with session.begin():
                if result.status == PaymentStatus.SUCCEEDED:
                    paid = await execute_core(session, MARK_PAID, attempt)
                    if paid.rowcount:
                        await count_status_change(
                            session, InvoiceStatus.PENDING, InvoiceStatus.PAID
                        )
                recorded = await execute_core(session, RECORD_OUTCOME, outcome)
                if recorded.rowcount == 0 and result.status == PaymentStatus.SUCCEEDED:
                    await record_late_charge(session, claimed)
        except (*DATABASE_UNREACHABLE, TransactionConflictError):
            if delay is None:
                logger.error(
                    "payment outcome {} of invoice {} not recorded: database unreachable",
                    result.status,
                    invoice_id,
                )
                raise OutcomeNotRecordedError(invoice_id, result.status) from None
            logger.warning("recording payment of invoice {} failed; retrying", invoice_id)
            await asyncio.sleep(delay)
        else:
            return bool(recorded.rowcount)
    raise AssertionError("unreachable")  # pragma: no cover


async def record_late_charge(session: AsyncSession, claimed: ClaimedInvoice) -> None:
    """The provider charged an attempt that a later one had already superseded."""
    await session.exec(
        update(Payment)
        .where(col(Payment.id) == claimed.payment_id)
        .values(
            payment_status=PaymentStatus.REFUND_DUE,
            reason="charged after this attempt had been superseded: refund it",
        )
    )
    logger.error(
        "invoice {}: attempt {} was charged after it had been superseded; "
        "this charge must be refunded",
        claimed.invoice.id,
        claimed.payment_id,
    )


async def pay_invoice(
    session: AsyncSession,
    fakepay: FakePayClient,
    invoice_id: str,
    card: Card,
    idempotency: IdempotentRequest,
) -> InvoicePublic:
    """Charge `card` for a PENDING invoice once, answering the invoice PAID with the masked
    card; raise a `PaymentError` for every other end."""
    masked = card.masked()
    claimed = await claim(session, invoice_id, masked, fakepay.stale_after_s, idempotency)
    with fakepay.slot() as acquired:
        if not acquired:
            busy = ChargeResult(PaymentStatus.FAILED, "too many payments in flight", sent=False)
            await settle(session, claimed, busy)
            raise ProviderBusyError(invoice_id)
        logger.info("payment requested: invoice {} card {}", invoice_id, masked.number)
        started = time.perf_counter()
        result = await charge_once(fakepay, invoice_id, card)
        elapsed_ms = (time.perf_counter() - started) * 1000
    idempotency.changed = idempotency.changed or result.sent
    logger.info(
        "payment outcome: invoice {} {} ({}) in {:.0f} ms",
        invoice_id,
        result.status,
        result.reason or "ok",
        elapsed_ms,
    )
    if not await settle(session, claimed, result) and result.status == PaymentStatus.SUCCEEDED:
        raise ChargedAfterSupersededError(invoice_id)
    if result.status == PaymentStatus.SUCCEEDED:
        return claimed.invoice.model_copy(
            update={"invoice_status": InvoiceStatus.PAID, "card": masked}
        )
    reason = result.reason or "unknown"
    if result.status == PaymentStatus.DECLINED:
        raise PaymentDeclinedError(invoice_id, reason)
    if result.status == PaymentStatus.UNKNOWN:
        raise ProviderTimeoutError(invoice_id, reason)
    raise ProviderUnavailableError(invoice_id, reason)


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

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
provider's timeouts plus a margin; the next claim then marks it ABANDONED.
"""

import asyncio
import math
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from typing import Annotated

import anyio
import httpx
from fastapi import Depends, Request
from loguru import logger
from pydantic import SecretStr, field_serializer
from sqlalchemy import ColumnElement, literal_column, update
from sqlalchemy.dialects.mysql import DATETIME
from sqlmodel import col, select
from sqlmodel.ext.asyncio.session import AsyncSession

from db import DATABASE_UNREACHABLE
from models import (
    CamelModel,
    Card,
    Customer,
    Invoice,
    InvoiceStatus,
    MaskedCard,
    Payment,
    PaymentStatus,
)
from settings import Settings

STALE_MARGIN_S = 30


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


@dataclass(frozen=True)
class ChargeResult:
    status: PaymentStatus
    reason: str | None = None


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
        self.stale_after_s = math.ceil(
            config.fakepay_connect_timeout + config.fakepay_timeout + STALE_MARGIN_S
        )
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
        body = request.model_dump(mode="json", by_alias=True)
        try:
            async with asyncio.timeout(self.deadline):
                response = await self._http.post(self.url, json=body)
        except TimeoutError:
            return ChargeResult(
                PaymentStatus.UNKNOWN,
                f"FakePay did not finish its reply within {self.deadline:g} s",
            )
        except (httpx.ConnectError, httpx.ConnectTimeout):
            return ChargeResult(PaymentStatus.FAILED, "FakePay could not be reached")
        except httpx.TimeoutException:
            return ChargeResult(
                PaymentStatus.UNKNOWN, f"FakePay did not reply within {self.read_timeout:g} s"
            )
        except httpx.TransportError as exc:
            # The request may have arrived before the connection broke.
            return ChargeResult(
                PaymentStatus.UNKNOWN, f"the connection to FakePay broke ({type(exc).__name__})"
            )
        if response.status_code == httpx.codes.OK:
            return ChargeResult(PaymentStatus.SUCCEEDED)
        if response.status_code == httpx.codes.BAD_REQUEST:
            return ChargeResult(PaymentStatus.DECLINED, declined_reason(response))
        return ChargeResult(PaymentStatus.FAILED, f"FakePay answered HTTP {response.status_code}")


def declined_reason(response: httpx.Response) -> str:
    try:
        reply = response.json()
    except ValueError:
        reply = None
    reason = reply.get("reason") if isinstance(reply, dict) else None
    return str(reason)[:255] if reason else "no reason given"


async def get_fakepay(request: Request) -> FakePayClient:
    client: FakePayClient = request.state.fakepay
    return client


FakePayDep = Annotated[FakePayClient, Depends(get_fakepay)]


@dataclass(frozen=True)
class ClaimedInvoice:
    invoice: Invoice
    customer: Customer
    payment_id: int


async def claim(
    session: AsyncSession, invoice_id: str, masked: MaskedCard, stale_after_s: int
) -> ClaimedInvoice:
    async with session.begin():
        result = await session.exec(
            select(Invoice, Customer)
            .join(Customer, col(Customer.customer_id) == col(Invoice.customer_id))
            .where(Invoice.id == invoice_id)
            .with_for_update()
        )
        row = result.first()
        if row is None:
            raise InvoiceNotFoundError(invoice_id)
        invoice, customer = row
        if invoice.invoice_status != InvoiceStatus.PENDING:
            raise InvoiceNotPayableError(invoice_id, invoice.invoice_status)
        attempts = await session.exec(
            select(Payment.id, col(Payment.created_at) < stale_cutoff(stale_after_s)).where(
                Payment.invoice_id == invoice_id,
                Payment.payment_status == PaymentStatus.PROCESSING,
            )
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
        payment = Payment(
            invoice_id=invoice_id,
            card_number=masked.number,
            card_name=masked.name,
            card_expiry=masked.expiry,
        )
        session.add(payment)
        await session.flush()
        assert payment.id is not None
        claimed = ClaimedInvoice(invoice, customer, payment.id)
    # A snapshot from here on: a failed settle's rollback must not expire these objects and
    # send their next attribute read to a database that may be down.
    session.expunge_all()
    return claimed


def stale_cutoff(seconds: int) -> ColumnElement[datetime]:
    """Server time, so the app's and the database's clocks never need to agree."""
    return literal_column(f"NOW(6) - INTERVAL {int(seconds)} SECOND", type_=DATETIME(fsp=6))


SETTLE_RETRY_DELAYS_S = (0.2, 0.5, 1.0, 2.0)


async def settle(session: AsyncSession, claimed: ClaimedInvoice, result: ChargeResult) -> None:
    """Record the outcome, retrying through a short database outage: once the provider has
    answered, losing that answer would leave a charged invoice PENDING. Both updates set
    absolute values, so a retry is harmless. A success takes the invoice row first, the lock
    every claim takes first too, so a settle and a claim never deadlock on the payment index.
    """
    for delay in (*SETTLE_RETRY_DELAYS_S, None):
        try:
            async with session.begin():
                if result.status == PaymentStatus.SUCCEEDED:
                    await session.exec(
                        update(Invoice)
                        .where(col(Invoice.id) == claimed.invoice.id)
                        .values(invoice_status=InvoiceStatus.PAID)
                    )
                await session.exec(
                    update(Payment)
                    .where(col(Payment.id) == claimed.payment_id)
                    .values(payment_status=result.status, reason=result.reason)
                )
        except DATABASE_UNREACHABLE:
            if delay is None:
                logger.error(
                    "payment outcome {} of invoice {} not recorded: database unreachable",
                    result.status,
                    claimed.invoice.id,
                )
                raise
            logger.warning("recording payment of invoice {} failed; retrying", claimed.invoice.id)
            await asyncio.sleep(delay)
        else:
            if result.status == PaymentStatus.SUCCEEDED:
                claimed.invoice.invoice_status = InvoiceStatus.PAID
            return


async def pay_invoice(
    session: AsyncSession, fakepay: FakePayClient, invoice_id: str, card: Card
) -> tuple[Invoice, Customer, MaskedCard]:
    """Charge `card` for a PENDING invoice once; raise a `PaymentError` for every other end."""
    masked = card.masked()
    claimed = await claim(session, invoice_id, masked, fakepay.stale_after_s)
    with fakepay.slot() as acquired:
        if not acquired:
            await settle(
                session, claimed, ChargeResult(PaymentStatus.FAILED, "too many payments in flight")
            )
            raise ProviderBusyError(invoice_id)
        logger.info("payment requested: invoice {} card {}", invoice_id, masked.number)
        started = time.perf_counter()
        result = await fakepay.charge(
            FakePayRequest(
                transaction_id=invoice_id,
                card=FakePayCard(number=card.number, expiry=card.expiry, name=card.name),
            )
        )
        elapsed_ms = (time.perf_counter() - started) * 1000
    logger.info(
        "payment outcome: invoice {} {} ({}) in {:.0f} ms",
        invoice_id,
        result.status,
        result.reason or "ok",
        elapsed_ms,
    )
    await settle(session, claimed, result)
    if result.status == PaymentStatus.SUCCEEDED:
        return claimed.invoice, claimed.customer, masked
    reason = result.reason or "unknown"
    if result.status == PaymentStatus.DECLINED:
        raise PaymentDeclinedError(invoice_id, reason)
    if result.status == PaymentStatus.UNKNOWN:
        raise ProviderTimeoutError(invoice_id, reason)
    raise ProviderUnavailableError(invoice_id, reason)

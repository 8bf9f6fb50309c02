"""Idempotency-Key: a retried request gets the first reply again instead of running twice.

Stripe's semantics with the IETF httpapi draft's header, and rocket-rides-atomic's design: the
key's row records how far its request got (`recovery_point`), and every step that changes
something advances it in the same transaction as the change, so the row can never say more or
less than the database holds. `IdempotentRequest` is that row's lifecycle, driven by the domain:

1. `begin`, before anything else: a finished reply under the key is returned as it was
   (`Idempotent-Replayed: true`); the same key on another request is a 422; a request still
   running under it is a 409 with `Retry-After`; a request that stopped after creating its
   invoice (`invoice_created`) is resumed: this one pays the invoice it created.
2. `record_reply`, `record_invoice_created`, `record_payment_started`: the key row is written
   in the transaction of the request's first change (the invoice insert, the cancel, or the
   payment attempt of a claim) and moved on by the next; a concurrent twin fails on the row's
   unique key (`twin_refused`) and its change is rolled back.
3. `record_final`, in the transaction that records the payment's outcome (or, for the
   background recorder, in the one that records it late): the reply is stored with it. An
   outcome that asks the client to try again (the provider was busy, nothing was sent) is not
   a reply: the key goes back to where a retry resumes (`invoice_created`), or, for a payment
   alone, is dropped so the key may be used again.

A request that changes nothing (a 404, a 409 about the invoice's state, a validation error)
writes no row. A row is kept `IDEMPOTENCY_TTL_HOURS`, then purged. Fingerprints cover the
method, the path and the validated body with the card number masked, so no hash of a card
number is ever stored.
"""

import asyncio
import hashlib
import json
import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Annotated, Any

from fastapi import Depends, Header, Request
from fastapi.responses import JSONResponse, Response
from loguru import logger
from pydantic import BaseModel
from sqlalchemy import ColumnElement, delete, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncEngine
from sqlmodel import col
from sqlmodel.ext.asyncio.session import AsyncSession

import metrics
from api_docs import invalid
from auth import KnownKey, authorize
from db import DATABASE_UNREACHABLE, TransactionConflictError, duplicate_key_name
from errors import ApiError
from models import Card, IdempotencyRecord, InvoiceCreate
from settings import SettingsDep

HEADER = "Idempotency-Key"
VISIBLE_ASCII = re.compile(r"[\x21-\x7e]{1,255}")
# The recovery points: the invoice is created, its payment may be resumed; a charge may have
# been sent, the request must finish (or a later one read the invoice).
INVOICE_CREATED = "invoice_created"
PAYMENT_STARTED = "payment_started"


class IdempotencyError(ApiError):
    """A request that must not run because of its key."""

    status_code = 409


class IdempotencyKeyInUseError(IdempotencyError):
    retry_after_s = 1
    documented = "A request with the same Idempotency-Key is still running (Retry-After)"

    def __init__(self) -> None:
        super().__init__(
            f"A request with this {HEADER} is still running; retry in a second to get its reply"
        )


class IdempotentRequestUnfinishedError(IdempotencyError):
    documented = "The first request with this Idempotency-Key did not finish"

    def __init__(self, invoice_id: str) -> None:
        super().__init__(
            f"The first request with this {HEADER} did not finish; it concerned invoice "
            f"{invoice_id}. Read it with GET /invoice/{invoice_id} before trying again"
        )


def now() -> datetime:
    """UTC without a zone, as the database's DATETIME columns hold it (sessions run in UTC)."""
    return datetime.now(UTC).replace(tzinfo=None)


def canonical_body(body: BaseModel | None) -> Any:
    """The body as the fingerprint sees it: validated, with any card number masked."""
    if body is None:
        return None
    if isinstance(body, Card):
        return body.masked().model_dump()
    if isinstance(body, InvoiceCreate):
        return {**body.model_dump(mode="json", exclude={"card"}), "card": canonical_body(body.card)}
    return body.model_dump(mode="json")


def fingerprint(method: str, path: str, body: BaseModel | None) -> str:
    """What makes two requests the same request: SHA-256 of method, path and canonical body."""
    text = json.dumps([method, path, canonical_body(body)], sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()


@dataclass(frozen=True)
class Reply:
    """A reply as the client receives it: what a key stores, and what a replay sends."""

    status_code: int
    body: str

    @classmethod
    def of(cls, outcome: BaseModel | ApiError, status_code: int = 200) -> "Reply":
        """The reply the app sends for `outcome`: a response model (by alias, as the routes
        serialize it) with `status_code`, or an error with its own status and detail."""
        if isinstance(outcome, ApiError):
            content: Any = {"detail": outcome.message}
            status_code = outcome.status_code
        else:
            content = outcome.model_dump(mode="json", by_alias=True)
        return cls(status_code, bytes(JSONResponse(content).body).decode())


@dataclass
class IdempotentRequest:
    """The Idempotency-Key of one request, or none (`key is None`: every method is a no-op)."""

    key: str | None = None
    owner: str = ""
    method: str = "POST"
    path: str = ""
    fingerprint: str = ""
    # The invoice that this key's request created, once its row says so (this request, or
    # the earlier one that `begin` resumes).
    created_invoice_id: str | None = None
    stale_after: timedelta = field(default=timedelta(minutes=5))
    ttl: timedelta = field(default=timedelta(hours=24))

    async def begin(self, session: AsyncSession, body: BaseModel | None) -> Response | None:
        """The stored reply for this key, if there is one; raise if the key cannot be used;
        None to go on (and, for a create that stopped after its invoice, to resume it)."""
        if self.key is None:
            return None
        self.fingerprint = fingerprint(self.method, self.path, body)
        record = await session.get(IdempotencyRecord, (self.owner, self.key))
        if record is not None and record.expires_at <= now():
            await session.delete(record)
            record = None
        await session.commit()  # end the read, so the change that follows starts afresh
        if record is None:
            return None
        if record.fingerprint != self.fingerprint:
            raise invalid(
                ("header", HEADER),
                f"this {HEADER} was already used for a different request; "
                "use a new key for a new request",
                kind="idempotency_key_reused",
            )
        if record.response_status is not None and record.response_body is not None:
            metrics.count_idempotent_replay()
            return Response(
                record.response_body,
                status_code=record.response_status,
                media_type="application/json",
                headers={"Idempotent-Replayed": "true"},
            )
        if record.recovery_point == INVOICE_CREATED:
            # Its payment never started; two retries at once both go on, and the database
            # lets one of them start it (`record_payment_started`).
            self.created_invoice_id = record.invoice_id
            return None
        started = record.created_at or now()
        if now() - started > self.stale_after:
            raise IdempotentRequestUnfinishedError(record.invoice_id)
        raise IdempotencyKeyInUseError()

    def _this_key(self) -> ColumnElement[bool]:
        return (col(IdempotencyRecord.owner) == self.owner) & (
            col(IdempotencyRecord.idempotency_key) == self.key
        )

    def _add_row(
        self,
        session: AsyncSession,
        invoice_id: str,
        point: str | None,
        reply: Reply | None,
        payment_id: int | None = None,
    ) -> None:
        assert self.key is not None
        session.add(
            IdempotencyRecord(
                owner=self.owner,
                idempotency_key=self.key,
                fingerprint=self.fingerprint,
                invoice_id=invoice_id,
                recovery_point=point,
                payment_id=payment_id,
                response_status=None if reply is None else reply.status_code,
                response_body=None if reply is None else reply.body,
                expires_at=now() + self.ttl,
            )
        )

    def record_reply(self, session: AsyncSession, invoice_id: str, reply: Reply) -> None:
        """In the transaction of a change that is the whole request (a create without a card,
        a cancel): the key row, finished, with its reply."""
        if self.key is not None:
            self._add_row(session, invoice_id, None, reply)

    def record_invoice_created(self, session: AsyncSession, invoice_id: str) -> None:
        """In the transaction that creates the invoice a payment will follow: a retry after
        this resumes with the payment."""
        if self.key is not None:
            self._add_row(session, invoice_id, INVOICE_CREATED, None)
            self.created_invoice_id = invoice_id

    async def record_payment_started(
        self, session: AsyncSession, invoice_id: str, payment_id: int
    ) -> None:
        """In the claim's transaction, with the attempt `payment_id` it records: from here a
        charge may be sent, and the request cannot be resumed, only finished. A create's key
        moves on from `invoice_created`, and only one request can move it (a twin finds it
        moved: the key is in use)."""
        if self.key is None:
            return
        if self.created_invoice_id != invoice_id:
            self._add_row(session, invoice_id, PAYMENT_STARTED, None, payment_id)
            return
        moved = await session.exec(
            update(IdempotencyRecord)
            .where(self._this_key(), col(IdempotencyRecord.recovery_point) == INVOICE_CREATED)
            .values(recovery_point=PAYMENT_STARTED, payment_id=payment_id, created_at=now())
        )
        if not moved.rowcount:
            raise IdempotencyKeyInUseError()

    async def record_final(
        self,
        session: AsyncSession,
        payment_id: int,
        outcome: BaseModel | ApiError,
        *,
        status_code: int,
        sent: bool,
    ) -> None:
        """In the transaction that records the outcome of attempt `payment_id`: the reply to
        `outcome` (`status_code` for a success) is stored with it. If no charge was sent, the
        reply asks for a retry and is not stored: a create's key goes back to
        `invoice_created`, a payment's key is dropped.

        Only while the row is still that attempt's, unanswered: an outcome recorded late (a
        retry after a lost acknowledgement, the background recorder) must not touch the row
        of a later request with the same key."""
        if self.key is None:
            return
        mine = (
            self._this_key(),
            col(IdempotencyRecord.payment_id) == payment_id,
            col(IdempotencyRecord.response_status).is_(None),
        )
        if sent:
            reply = Reply.of(outcome, status_code)
            statement: Any = (
                update(IdempotencyRecord)
                .where(*mine)
                .values(
                    recovery_point=None,
                    response_status=reply.status_code,
                    response_body=reply.body,
                )
            )
        elif self.created_invoice_id is not None:
            statement = (
                update(IdempotencyRecord)
                .where(*mine)
                .values(recovery_point=INVOICE_CREATED, payment_id=None)
            )
        else:
            statement = delete(IdempotencyRecord).where(*mine)
        if not (await session.exec(statement)).rowcount:
            logger.info(
                "Idempotency-Key {}: already answered, or taken by a later request than attempt {}",
                self.key,
                payment_id,
            )

    @contextmanager
    def twin_refused(self) -> Iterator[None]:
        """Around the commit of a transaction that writes this key's row: failing on the
        row's primary key means a twin request holds the key (`IdempotencyKeyInUseError`).
        The other rows such a commit inserts have generated keys, which cannot collide."""
        try:
            yield
        except IntegrityError as error:
            if self.key is not None and duplicate_key_name(error) == "PRIMARY":
                raise IdempotencyKeyInUseError() from None
            raise


async def idempotent_request(
    request: Request,
    config: SettingsDep,
    api_key: Annotated[KnownKey | None, Depends(authorize)],
    idempotency_key: Annotated[
        str | None,
        Header(
            alias=HEADER,
            description="Optional. Retries with the same key and body get the first reply "
            "again (`Idempotent-Replayed: true`) instead of running twice. 1-255 visible "
            "ASCII characters; a quoted value means the same key unquoted.",
            examples=["order-7f3c2a"],
        ),
    ] = None,
) -> IdempotentRequest:
    """Keys are per API key (with AUTH=on): two clients may use the same key independently."""
    if idempotency_key is None:
        return IdempotentRequest()
    key = idempotency_key
    if len(key) >= 2 and key.startswith('"') and key.endswith('"'):
        key = key[1:-1]
    if not VISIBLE_ASCII.fullmatch(key):
        raise invalid(
            ("header", HEADER), f"{HEADER} must be 1-255 visible ASCII characters (no spaces)"
        )
    return IdempotentRequest(
        key=key,
        owner="" if api_key is None else f"api-key:{api_key.id}",
        method=request.method,
        path=request.url.path,
        stale_after=timedelta(seconds=config.payment_stale_after_s),
        ttl=timedelta(hours=config.idempotency_ttl_hours),
    )


IdempotencyDep = Annotated[IdempotentRequest, Depends(idempotent_request)]


async def purge_expired_keys(session: AsyncSession, batch: int = 1000) -> int:
    """Delete keys past their TTL, a batch at a time; how many went.

    Every process purges. A batch that loses a race (on a cluster: another node's purge
    deleted the same rows, and certification keeps one of the two) is rolled back, and this
    purge stops there: the other one is removing the same rows, and whatever is left goes
    at the next round."""
    removed = 0
    while True:
        try:
            result = await session.exec(
                delete(IdempotencyRecord)
                .where(col(IdempotencyRecord.expires_at) <= now())
                .with_dialect_options(mysql_limit=batch)
            )
            await session.commit()
        except TransactionConflictError:
            await session.rollback()
            logger.info("another purge of expired idempotency keys is at work; leaving it")
            return removed
        removed += result.rowcount
        if result.rowcount < batch:
            return removed


async def purge_expired_keys_forever(engine: AsyncEngine, every_s: float = 600) -> None:
    """The lifespan's background task: purge, sleep, repeat; a database outage only waits."""
    while True:
        try:
            async with AsyncSession(engine) as session:
                removed = await purge_expired_keys(session)
            if removed:
                logger.info("purged {} expired idempotency keys", removed)
        except (*DATABASE_UNREACHABLE, TransactionConflictError):
            logger.warning("purging expired idempotency keys failed; will try again")
        await asyncio.sleep(every_s)

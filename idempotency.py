"""Idempotency-Key: a retried request gets the first reply again instead of running twice.

Stripe's semantics with the IETF httpapi draft's header. The lifecycle of one key:

1. `replay` (the route, before doing anything): a finished reply under the key is returned as
   it was, marked `Idempotent-Replayed: true`; the same key on another request is a 422; a
   request still running under it is a 409 with `Retry-After`.
2. `reserve` (the domain, inside the transaction of the request's first change: the invoice
   insert, or the payment attempt of a claim): the key row is written with that change, so a
   crash can never leave one without the other. A concurrent twin blocks on the row's unique
   key and then fails with `IdempotencyKeyInUseError`, its own change rolled back.
3. `IdempotencyMiddleware` (after the reply): the reply is stored in the row if the request
   changed something (`changed`: an invoice was created or a charge was sent); otherwise the
   row is dropped and the key may be used again. A reply that asks the client to try again
   (a 503, or any reply with Retry-After) is never stored as final: a create whose payment
   could not start records its recovery point (`invoice_created`), and the retry with the
   same key resumes there, paying the invoice it already created.

A row is kept `IDEMPOTENCY_TTL_HOURS`, then purged. Fingerprints cover the method, the path and
the validated body with the card number masked, so no hash of a card number is ever stored.
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
from fastapi.responses import Response
from loguru import logger
from pydantic import BaseModel
from sqlalchemy import ColumnElement, delete, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncEngine
from sqlmodel import col
from sqlmodel.ext.asyncio.session import AsyncSession
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from api_docs import invalid
from db import DATABASE_UNREACHABLE, TransactionConflictError, is_duplicate_key
from errors import ApiError
from models import Card, IdempotencyRecord, InvoiceCreate
from settings import Settings

HEADER = "Idempotency-Key"
VISIBLE_ASCII = re.compile(r"[\x21-\x7e]{1,255}")
STATE_KEY = "idempotency"
INVOICE_CREATED = "invoice_created"  # the recovery point of a create whose payment must resume


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


@dataclass
class IdempotentRequest:
    """The Idempotency-Key of one request, or none (`key is None`: every method is a no-op)."""

    key: str | None = None
    owner: str = ""
    method: str = "POST"
    path: str = ""
    fingerprint: str = ""
    reserved: bool = False  # this request wrote the key row
    changed: bool = False  # this request created an invoice or sent a charge
    charge_sent: bool = False  # this request sent a charge to the provider
    resumed_invoice_id: str | None = None  # a retry resuming after the invoice was created
    stale_after: timedelta = field(default=timedelta(minutes=5))
    ttl: timedelta = field(default=timedelta(hours=24))
    engine: AsyncEngine | None = None  # the app's, where the key row lives (none without a key)

    async def replay(self, session: AsyncSession, body: BaseModel | None) -> Response | None:
        """The stored reply for this key, if there is one; raise if the key cannot be used."""
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
        if record.recovery_point == INVOICE_CREATED:
            await self.resume(record)
            return None
        if record.response_status is None or record.response_body is None:
            started = record.created_at or now()
            if now() - started > self.stale_after:
                raise IdempotentRequestUnfinishedError(record.invoice_id)
            raise IdempotencyKeyInUseError()
        return Response(
            record.response_body,
            status_code=record.response_status,
            media_type="application/json",
            headers={"Idempotent-Replayed": "true"},
        )

    async def resume(self, record: IdempotencyRecord) -> None:
        """Take over a key whose request ended asking for a retry, after creating its invoice:
        this request goes on from there. Two retries at once: one resumes, one waits."""
        async with AsyncSession(self.engine) as session, session.begin():
            taken = await session.exec(
                update(IdempotencyRecord)
                .where(self._this_key(), col(IdempotencyRecord.recovery_point) == INVOICE_CREATED)
                .values(recovery_point=None, created_at=now())
            )
        if not taken.rowcount:
            raise IdempotencyKeyInUseError()
        self.reserved = self.changed = True
        self.resumed_invoice_id = record.invoice_id

    def _this_key(self) -> ColumnElement[bool]:
        return (col(IdempotencyRecord.owner) == self.owner) & (
            col(IdempotencyRecord.idempotency_key) == self.key
        )

    def reserve(self, session: AsyncSession, invoice_id: str) -> None:
        """Add the key row to the transaction that makes this request's first change."""
        if self.key is None or self.reserved:
            return
        session.add(
            IdempotencyRecord(
                owner=self.owner,
                idempotency_key=self.key,
                fingerprint=self.fingerprint,
                invoice_id=invoice_id,
                expires_at=now() + self.ttl,
            )
        )

    @contextmanager
    def twin_refused(self) -> Iterator[None]:
        """Around the commit of a transaction that reserved this key: failing on the key's
        row means a twin request holds it, and is `IdempotencyKeyInUseError`. (The other rows
        such a commit inserts have generated keys, which cannot collide.)"""
        try:
            yield
        except IntegrityError as error:
            if self.key is not None and not self.reserved and is_duplicate_key(error):
                raise IdempotencyKeyInUseError() from None
            raise

    async def finish(self, status_code: int, body: bytes, asks_retry: bool) -> None:
        """Store the reply under the key; drop the key if the request changed nothing. A reply
        asking for a retry is not final: after creating an invoice (and sending no charge) the
        key records where to resume; after a charge was sent it stays unfinished, naming its
        invoice, for the retry to read."""
        where = self._this_key()
        async with AsyncSession(self.engine) as session, session.begin():
            if not self.changed:
                await session.exec(delete(IdempotencyRecord).where(where))
            elif not asks_retry:
                await session.exec(
                    update(IdempotencyRecord)
                    .where(where)
                    .values(response_status=status_code, response_body=body.decode())
                )
            elif not self.charge_sent:
                await session.exec(
                    update(IdempotencyRecord).where(where).values(recovery_point=INVOICE_CREATED)
                )


async def idempotent_request(
    request: Request,
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
    if idempotency_key is None:
        return IdempotentRequest()
    key = idempotency_key
    if len(key) >= 2 and key.startswith('"') and key.endswith('"'):
        key = key[1:-1]
    if not VISIBLE_ASCII.fullmatch(key):
        raise invalid(
            ("header", HEADER), f"{HEADER} must be 1-255 visible ASCII characters (no spaces)"
        )
    api_key = getattr(request.state, "api_key", None)  # set by auth.authorize when AUTH=on
    config: Settings = request.state.settings
    idempotent = IdempotentRequest(
        key=key,
        owner="" if api_key is None else f"api-key:{api_key.id}",
        method=request.method,
        path=request.url.path,
        stale_after=timedelta(seconds=config.payment_stale_after_s),
        ttl=timedelta(hours=config.idempotency_ttl_hours),
        engine=request.state.engine,
    )
    request.state.idempotency = idempotent
    return idempotent


IdempotencyDep = Annotated[IdempotentRequest, Depends(idempotent_request)]


class IdempotencyMiddleware:
    """Stores the reply of a request that reserved an Idempotency-Key, before sending it.

    Storing first means a client that retries the moment it has the reply finds it stored.
    Requests without a reserved key pass straight through.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "POST":
            await self.app(scope, receive, send)
            return
        held: list[Message] = []

        async def hold(message: Message) -> None:
            idempotent = scope.get("state", {}).get(STATE_KEY)
            if not (isinstance(idempotent, IdempotentRequest) and idempotent.reserved):
                for earlier in held:
                    await send(earlier)
                held.clear()
                await send(message)
                return
            held.append(message)
            if message["type"] == "http.response.body" and not message.get("more_body"):
                start, *chunks = held
                body = b"".join(chunk.get("body", b"") for chunk in chunks)
                await store(idempotent, start["status"], body, asks_retry(start))
                for pending in held:
                    await send(pending)
                held.clear()

        await self.app(scope, receive, hold)


def asks_retry(start: Message) -> bool:
    """A reply that tells the client to try again: a 503, or any reply with Retry-After."""
    headers = {name.lower() for name, _ in start.get("headers", [])}
    return start["status"] == 503 or b"retry-after" in headers


async def store(idempotent: IdempotentRequest, status_code: int, body: bytes, retry: bool) -> None:
    try:
        await idempotent.finish(status_code, body, retry)
    except DATABASE_UNREACHABLE:
        # The key row stays unfinished: a retry gets a 409 naming the invoice to read.
        logger.error("the reply to Idempotency-Key {} could not be stored", idempotent.key)


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

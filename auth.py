"""API keys: who may call, with a `read`, `write` or `admin` scope. Off unless `AUTH=on`.

A key's secret (`inv_` and 32 random bytes, URL-safe) is shown once when it is made and
stored only as its SHA-256. Checking a key costs no database round trip: the keys live in an
in-process table that a request finding it `RELOAD_EVERY_S` old reloads in the background, so
a revoked key stops working within seconds without a restart, and `last_used_at` is written
at most once a minute per key.
"""

import asyncio
import hashlib
import hmac
import secrets
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from typing import Annotated, Any, TypeVar

from fastapi import Depends, FastAPI, HTTPException, Request, status
from fastapi.routing import APIRoute
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from loguru import logger
from sqlalchemy import update
from sqlalchemy.ext.asyncio import AsyncEngine
from sqlmodel import col, func, select

from db import DATABASE_UNREACHABLE, execute_core
from models import ApiKey, ApiKeyScope, ErrorDetail

SECRET_PREFIX = "inv_"  # noqa: S105  (a marker for humans and secret scanners, not a secret)
RELOAD_EVERY_S = 2.0  # well inside the 5 s a revocation may take
STALEST_S = 4.0  # no request decides on an older table: it waits for a reload instead
UNKNOWN_RELOAD_S = 0.5
LAST_USED_EVERY_S = 60.0
READ_METHODS = {"GET", "HEAD", "OPTIONS"}


def new_secret() -> str:
    return SECRET_PREFIX + secrets.token_urlsafe(32)


def secret_hash(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def display_prefix(secret: str) -> str:
    """Enough of a secret to tell keys apart in a list, far too little to use."""
    return secret[: len(SECRET_PREFIX) + 6]


@dataclass(frozen=True)
class KnownKey:
    id: int
    name: str
    scope: ApiKeyScope
    secret_hash: str


ACTIVE_KEYS = select(
    col(ApiKey.id), col(ApiKey.name), col(ApiKey.scope), col(ApiKey.secret_hash)
).where(col(ApiKey.revoked_at).is_(None))


@dataclass
class KeyTable:
    """The active keys by secret hash, as of the last reload; one per app, made in its
    lifespan."""

    engine: AsyncEngine
    by_hash: dict[str, KnownKey] = field(default_factory=dict)
    loaded_at: float | None = None
    reloading: bool = False
    lock: asyncio.Lock | None = None
    last_used_written: dict[int, float] = field(default_factory=dict)

    async def reload(self) -> None:
        async with self.engine.connect() as connection:
            rows = (await execute_core(connection, ACTIVE_KEYS)).all()
        keys = [KnownKey(row.id, row.name, ApiKeyScope(row.scope), row.secret_hash) for row in rows]
        self.by_hash = {key.secret_hash: key for key in keys}
        self.loaded_at = time.monotonic()

    async def fresh(self) -> None:
        """Reload the keys in the background once they are `RELOAD_EVERY_S` old, while
        requests go on with the table they have; a table older than `STALEST_S` (on first use,
        or after an idle spell) is reloaded before any request decides on it, so a revoked key
        stops working within 5 s, busy or idle."""
        age = None if self.loaded_at is None else time.monotonic() - self.loaded_at
        if age is None or age > STALEST_S:
            self.lock = self.lock or asyncio.Lock()
            async with self.lock:
                if self.loaded_at is None or time.monotonic() - self.loaded_at > STALEST_S:
                    await self.reload()
        elif age > RELOAD_EVERY_S and not self.reloading:
            self.reloading = True
            run_in_background(self.reload_quietly())

    async def reload_quietly(self) -> None:
        try:
            await self.reload()
        except DATABASE_UNREACHABLE:
            logger.warning("reloading API keys failed; keeping the last known ones")
        finally:
            self.reloading = False

    async def find_or_reload(self, secret: str) -> KnownKey | None:
        """A key made a moment ago works at once: an unknown secret reloads the table first,
        at most every `UNKNOWN_RELOAD_S` (so unknown secrets cannot flood the database)."""
        key = self.find(secret)
        if key is not None:
            return key
        self.lock = self.lock or asyncio.Lock()
        async with self.lock:
            if self.loaded_at is None or time.monotonic() - self.loaded_at > UNKNOWN_RELOAD_S:
                await self.reload()
        return self.find(secret)

    def find(self, secret: str) -> KnownKey | None:
        digest = secret_hash(secret)
        key = self.by_hash.get(digest)
        if key is None or not hmac.compare_digest(key.secret_hash, digest):
            return None
        return key

    def note_use(self, key: KnownKey) -> None:
        """Record the use in the background, once a minute per key at most."""
        now = time.monotonic()
        if now - self.last_used_written.get(key.id, -LAST_USED_EVERY_S) < LAST_USED_EVERY_S:
            return
        self.last_used_written[key.id] = now
        run_in_background(write_last_used(self.engine, key.id))


BACKGROUND: set[asyncio.Task[None]] = set()  # strong references until each task is done


def run_in_background(work: Coroutine[Any, Any, None]) -> None:
    task = asyncio.get_running_loop().create_task(work)
    BACKGROUND.add(task)
    task.add_done_callback(BACKGROUND.discard)


async def write_last_used(engine: AsyncEngine, key_id: int) -> None:
    try:
        async with engine.begin() as connection:
            await connection.execute(
                update(ApiKey).where(col(ApiKey.id) == key_id).values(last_used_at=func.now(6))
            )
    except DATABASE_UNREACHABLE:
        logger.warning("could not record the use of API key {}", key_id)


bearer = HTTPBearer(
    auto_error=False,
    description="An API key from `make api-key NAME=... SCOPE=read|write|admin`, sent as "
    "`Authorization: Bearer <secret>`. Needed only when the service runs with AUTH=on.",
)


def unauthorized(detail: str) -> HTTPException:
    return HTTPException(
        status.HTTP_401_UNAUTHORIZED, detail, headers={"WWW-Authenticate": "Bearer"}
    )


Endpoint = TypeVar("Endpoint", bound=Callable[..., Any])


def public(endpoint: Endpoint) -> Endpoint:
    """Marks a route that needs no API key. The app applies `authorize` to every route, so a
    route is open only by this explicit mark (the docs and OpenAPI are not routes of ours)."""
    endpoint.public = True  # type: ignore[attr-defined]
    return endpoint


def is_public(route: object) -> bool:
    return bool(getattr(getattr(route, "endpoint", None), "public", False))


async def authorize(
    request: Request,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)],
) -> KnownKey | None:
    """With AUTH=on: a known, unrevoked key; `read` keys for GET only; routes marked `public`
    need none. Off: nobody is asked."""
    if request.state.settings.auth == "off" or is_public(request.scope.get("route")):
        return None
    if credentials is None:
        raise unauthorized("An API key is needed: send Authorization: Bearer <secret>")
    keys: KeyTable = request.state.keys
    await keys.fresh()
    key = await keys.find_or_reload(credentials.credentials)
    if key is None:
        raise unauthorized("This API key is unknown or revoked")
    if key.scope == ApiKeyScope.READ and request.method not in READ_METHODS:
        raise HTTPException(
            status.HTTP_403_FORBIDDEN,
            f"API key {key.name} may only read; {request.method} needs a write key",
        )
    keys.note_use(key)
    return key


Authorized = Depends(authorize)
OFF = "AUTH=off"  # who acted, when no key was asked for


async def authorize_admin(
    key: Annotated[KnownKey | None, Depends(authorize)],
) -> str:
    """The operators' endpoints need an `admin` key; the name of who is acting."""
    if key is None:
        return OFF
    if key.scope != ApiKeyScope.ADMIN:
        raise HTTPException(
            status.HTTP_403_FORBIDDEN, f"API key {key.name} is {key.scope}; this needs an admin key"
        )
    return key.name


AdminDep = Annotated[str, Depends(authorize_admin)]


DOCUMENTATION_PAGES = ("/docs", "/docs/oauth2-redirect", "/redoc")  # FastAPIOffline's


def open_documentation(app: FastAPI) -> None:
    """Swagger UI and ReDoc are pages anyone may read: mark their routes public."""
    pages = [route for route in app.routes if getattr(route, "path", None) in DOCUMENTATION_PAGES]
    assert len(pages) == len(DOCUMENTATION_PAGES), "the documentation pages moved"
    for route in pages:
        public(getattr(route, "endpoint"))  # noqa: B009  (routes are typed as BaseRoute)


def document_security(app: FastAPI) -> None:
    """Make the OpenAPI document say what the app does: every operation but the public ones
    needs the bearer key and may answer 401 (no key, or one unknown or revoked) and 403 (a
    key whose scope is too low)."""
    generate = app.openapi
    refused = {
        "401": {"model": ErrorDetail, "description": "No API key, or an unknown or revoked one"},
        "403": {"model": ErrorDetail, "description": "The API key's scope does not allow this"},
    }

    def openapi() -> dict[str, Any]:
        schema = generate()
        detail = {"$ref": "#/components/schemas/ErrorDetail"}
        for route in app.routes:
            if not isinstance(route, APIRoute) or not route.include_in_schema:
                continue
            for method in route.methods or ():
                operation = schema["paths"][route.path_format][method.lower()]
                if is_public(route):
                    operation.pop("security", None)
                    continue
                for code, answer in refused.items():
                    operation["responses"].setdefault(
                        code,
                        {
                            "description": answer["description"],
                            "content": {"application/json": {"schema": detail}},
                        },
                    )
        return schema

    app.openapi = openapi  # type: ignore[method-assign]

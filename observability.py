"""Logging and the request middleware: one log line per request, each tagged with its id.

Every line logged while a request is served carries its fields in `record["extra"]` (the JSON
lines of `LOG_JSON=true` show them): `request_id`; `route` (the template) and the `invoice_id`
and `payment_id` its path names, once the request is routed; ids the domain learns later
(`add_log_fields`: a new invoice, a payment attempt); and, on the request's own line, `status`
and `duration_ms`. The middleware also counts the request in `metrics`.

Card data never reaches a log: tracebacks are printed without variable values, the only
card number the app ever formats is the masked one, and a raw path is logged redacted.
"""

import logging
import re
import sys
import time
import uuid
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from loguru import logger
from starlette import status
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

import metrics
from settings import Settings

if TYPE_CHECKING:
    from loguru import Record  # the stubs' name for a log record; not importable at run time

MAX_BODY_BYTES = 64 * 1024
# A run of 12 or more digits in a path could be a card number someone put in a URL: never log
# it. A UUID (an invoice id) is kept whole, however many digits it runs to.
CARD_LIKE = re.compile(
    r"(?P<uuid>[0-9a-fA-F]{8}(?:-[0-9a-fA-F]{4}){3}-[0-9a-fA-F]{12})|\d(?:[ -]?\d){11,}"
)
INTERNAL_ERROR = {"detail": "Internal server error; the request id is in the X-Request-ID header"}
PAYMENT_ID_DIGITS = 10  # a payment id is an INT: longer digit runs are no id (maybe a card)


@dataclass
class RequestFields:
    """The fields of the log lines of the request being served, as they become known."""

    request_id: str
    scope: Scope
    known: dict[str, object] = field(default_factory=dict)
    routed: bool = False

    def learn_route(self) -> None:
        """Once routed: the route's template, and the ids in its path that are well formed."""
        self.routed = True
        self.known["route"] = route_template(self.scope)
        params = self.scope.get("path_params", {})
        invoice_id, payment_id = (
            str(params.get("invoice_id", "")),
            str(params.get("payment_id", "")),
        )
        if (canonical := canonical_uuid(invoice_id)) is not None:
            self.known.setdefault("invoice_id", canonical)
        if payment_id.isascii() and payment_id.isdigit() and len(payment_id) <= PAYMENT_ID_DIGITS:
            self.known.setdefault("payment_id", int(payment_id))


# The request being served; each request runs in a task of its own, so the value ends with it.
CURRENT_REQUEST: ContextVar[RequestFields | None] = ContextVar("current_request", default=None)


class InterceptHandler(logging.Handler):
    """Send stdlib records (uvicorn, SQLAlchemy, httpx) through loguru."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            level: str | int = logger.level(record.levelname).name
        except ValueError:
            level = record.levelno
        logger.opt(depth=6, exception=record.exc_info).log(level, record.getMessage())


def configure_logging(config: Settings) -> None:
    logger.remove()
    logger.configure(patcher=tag_with_request_fields)
    logger.add(
        sys.stderr,
        level=config.log_level.upper(),
        serialize=config.log_json,
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


def redact_card_numbers(path: str) -> str:
    return CARD_LIKE.sub(lambda match: match["uuid"] or "[redacted]", path)


def canonical_uuid(text: str) -> str | None:
    try:
        return str(uuid.UUID(text))
    except ValueError:
        return None


def route_template(scope: Scope) -> str:
    """The path template of the route that took the request, never the raw path."""
    route = scope.get("route")
    template = getattr(route, "path", None)
    return template if isinstance(template, str) else metrics.UNMATCHED


def add_log_fields(**fields: object) -> None:
    """Fields for every later log line of the request being served: ids the domain learns
    (`invoice_id=`, `payment_id=`). Outside a request, nothing."""
    current = CURRENT_REQUEST.get()
    if current is not None:
        current.known.update(
            {
                name: str(value) if isinstance(value, uuid.UUID) else value
                for name, value in fields.items()
            }
        )


def tag_with_request_fields(record: "Record") -> None:
    """A context variable read per log line: cheaper than `logger.contextualize` per request.
    Outside a request, `request_id` is "-"."""
    extra = record["extra"]
    current = CURRENT_REQUEST.get()
    if current is None:
        extra["request_id"] = "-"
        return
    if not current.routed and "route" in current.scope:
        current.learn_route()
    extra["request_id"] = current.request_id
    for name, value in current.known.items():
        extra.setdefault(name, value)


class RequestContextMiddleware:
    """Request id, one log line per request, a body size cap, and the last word on errors.

    It is the outermost layer, so every reply carries `X-Request-ID`, including the 500 for an
    error nothing else caught, and that error is logged with the request's id. A request body
    (for the methods that carry one) is read up front, as it is at most 64 KiB, so an oversized
    one is refused with a JSON 413 whether or not it announced its length.
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
        response_started = False

        async def send_with_id(message: Message) -> None:
            nonlocal status_code, response_started
            if message["type"] == "http.response.start":
                status_code, response_started = message["status"], True
                message.setdefault("headers", [])
                message["headers"].append((b"x-request-id", request_id.encode()))
            await send(message)

        fields = RequestFields(request_id, scope)
        CURRENT_REQUEST.set(fields)
        try:
            await self._dispatch(scope, receive, send_with_id)
        except Exception as error:
            logger.opt(exception=error).error("unhandled error")
            if response_started:
                raise
            failure = JSONResponse(INTERNAL_ERROR, status.HTTP_500_INTERNAL_SERVER_ERROR)
            await failure(scope, receive, send_with_id)
        finally:
            seconds = time.perf_counter() - started
            metrics.observe_request(route_template(scope), scope["method"], status_code, seconds)
            fields.known.update(status=status_code, duration_ms=round(seconds * 1000, 1))
            logger.info(
                "{} {} {} {:.1f} ms",
                scope["method"],
                redact_card_numbers(scope["path"]),
                status_code,
                seconds * 1000,
            )

    async def _dispatch(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["method"] in {"GET", "HEAD", "OPTIONS"}:
            await self.app(scope, receive, send)
        elif (body := await self._read_body(receive)) is None:
            too_large = JSONResponse(
                {"detail": f"Request body too large: the limit is {MAX_BODY_BYTES} bytes"},
                status_code=status.HTTP_413_CONTENT_TOO_LARGE,
            )
            await too_large(scope, receive, send)
        else:
            await self.app(scope, self._replay(body), send)

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

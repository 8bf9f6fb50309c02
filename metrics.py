"""Prometheus metrics, every one defined here, served by `GET /metrics` on the API's own port.

One process counts in memory. With several (`make serve WORKERS=2`), prometheus-client's
multiprocess mode: `PROMETHEUS_MULTIPROC_DIR` names a directory, made empty before the
workers start (the Makefile does it), where each worker writes its values, and a scrape served
by any worker sums every worker's files. The library reads the variable when it is imported,
so it must be in the environment before the app starts. `METRICS=false` records nothing and
answers 404 at /metrics.

Labels hold only route templates, methods, status codes and outcomes: never a raw path (which
could hold a card number someone put in a URL) and nothing a client chose.
"""

import os
from typing import Any

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    multiprocess,
)
from sqlalchemy import event
from sqlalchemy.ext.asyncio import AsyncEngine
from starlette.concurrency import run_in_threadpool
from starlette.responses import Response

from errors import ApiError
from settings import Settings

MULTIPROCESS_DIR = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
recording = True  # METRICS of the settings the app started with (`start`)
UNMATCHED = "(unmatched)"  # the route label of a request no route took: never its raw path

REQUESTS = Counter(
    "invoice_api_requests",
    "HTTP requests answered, by route template, method and status code",
    ["route", "method", "status"],
)
REQUEST_SECONDS = Histogram(
    "invoice_api_request_duration_seconds",
    "Time from a request's arrival to the end of its reply, by route template and method",
    ["route", "method"],
)
PAYMENT_ATTEMPTS = Counter(
    "invoice_api_payment_attempts",
    "Payment attempts by outcome: as the provider answered (a call refused for too many in "
    "flight is FAILED), and REFUND_DUE for each charge that answered after a later attempt had "
    "replaced its own",
    ["outcome"],
)
PROVIDER_SECONDS = Histogram(
    "invoice_api_provider_call_duration_seconds",
    "Time of each FakePay call, by the outcome it gave",
    ["outcome"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 15),
)
PROVIDER_IN_FLIGHT = Gauge(
    "invoice_api_provider_calls_in_flight",
    "FakePay calls under way",
    multiprocess_mode="livesum",
)
POOL_IN_USE = Gauge(
    "invoice_api_db_pool_connections_in_use",
    "Database connections checked out of the pool",
    multiprocess_mode="livesum",
)
IDEMPOTENT_REPLAYS = Counter(
    "invoice_api_idempotent_replays",
    "Replies replayed for a retried Idempotency-Key instead of running the request again",
)
OUTCOMES = ("SUCCEEDED", "DECLINED", "FAILED", "UNKNOWN", "REFUND_DUE")
for _outcome in OUTCOMES:
    PAYMENT_ATTEMPTS.labels(_outcome)  # every outcome shows, at 0 until it happens


# The OpenAPI reply of GET /metrics: text, not JSON (its errors stay JSON).
DOCUMENTED: dict[int | str, dict[str, Any]] = {
    200: {
        "description": "Prometheus' text exposition format",
        "content": {"text/plain": {"schema": {"type": "string"}}},
    }
}


class MetricsOffError(ApiError):
    status_code = 404
    documented = "Metrics are off (METRICS=false)"

    def __init__(self) -> None:
        super().__init__("Metrics are off in this service (METRICS=false)")


def observe_request(route: str, method: str, status: int, seconds: float) -> None:
    if recording:
        REQUESTS.labels(route, method, str(status)).inc()
        REQUEST_SECONDS.labels(route, method).observe(seconds)


def record_charge(outcome: str, elapsed_ms: float) -> None:
    """A provider call that ended with `outcome` after `elapsed_ms`: its latency, and the
    attempt's outcome."""
    if recording:
        PROVIDER_SECONDS.labels(outcome).observe(elapsed_ms / 1000)
        PAYMENT_ATTEMPTS.labels(outcome).inc()


def count_payment(outcome: str) -> None:
    """An attempt that ended without a provider answer of its own (refused as busy: FAILED) or
    whose charge must be refunded (REFUND_DUE)."""
    if recording:
        PAYMENT_ATTEMPTS.labels(outcome).inc()


def provider_call_started() -> None:
    if recording:
        PROVIDER_IN_FLIGHT.inc()


def provider_call_ended() -> None:
    if recording:
        PROVIDER_IN_FLIGHT.dec()


def count_idempotent_replay() -> None:
    if recording:
        IDEMPOTENT_REPLAYS.inc()


def _checked_out(*_: object) -> None:
    POOL_IN_USE.inc()


def _checked_in(*_: object) -> None:
    POOL_IN_USE.dec()


def start(engine: AsyncEngine, config: Settings) -> None:
    """Per process, at start-up: record or not as `config` says, and follow the pool of the
    engine the app uses."""
    global recording  # one switch per process, set at start-up
    recording = config.metrics
    if not recording:
        return
    pool = engine.sync_engine.pool
    if not event.contains(pool, "checkout", _checked_out):
        event.listen(pool, "checkout", _checked_out)
        event.listen(pool, "checkin", _checked_in)


def stop() -> None:
    """Per process, at shutdown: in multiprocess mode, this process's gauges stop adding to
    the sums (its counters and histograms stay: what it counted happened). A worker killed
    without a shutdown leaves its gauges until the directory is emptied at the next start."""
    if MULTIPROCESS_DIR is not None:
        multiprocess.mark_process_dead(os.getpid())  # type: ignore[no-untyped-call]


def scrape() -> bytes:
    if MULTIPROCESS_DIR is None:
        return generate_latest(REGISTRY)
    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
    return generate_latest(registry)


async def reply() -> Response:
    """The text format; in multiprocess mode reading every worker's files, off the loop."""
    if not recording:
        raise MetricsOffError()
    body = scrape() if MULTIPROCESS_DIR is None else await run_in_threadpool(scrape)
    return Response(body, media_type=CONTENT_TYPE_LATEST)

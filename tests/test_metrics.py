"""GET /metrics: Prometheus' text format, counted by route template, payment outcome, the
provider, the pool and Idempotency-Key replays; every worker's in each scrape."""

import json
import threading
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy.ext.asyncio import AsyncEngine

from scripts.processes import running_app
from tests.stand_in import StandInProvider
from tests.support import (
    PAID_REPLY,
    UNKNOWN_ID,
    WORK_CARD,
    OneSlotProvider,
    UseProvider,
    bearer,
    create_pending_invoice,
    make_key,
    settings,
    superseded_attempt,
    wait_until,
)

READ = "/invoice/{invoice_id}"
Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def scrape(http: TestClient | httpx.Client, headers: dict[str, str] | None = None) -> Samples:
    """Every sample of one scrape, by name and labels."""
    response = http.get("/metrics", headers=headers)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/plain")
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(response.text)
        for sample in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def requests_counted(samples: Samples, route: str, status: str, method: str = "GET") -> float:
    labels = {"route": route, "method": method, "status": status}
    return value(samples, "invoice_api_requests_total", **labels)


def attempts_counted(samples: Samples, outcome: str) -> float:
    return value(samples, "invoice_api_payment_attempts_total", outcome=outcome)


def test_a_request_is_counted_under_its_route_template_and_status(client: TestClient) -> None:
    before = scrape(client)

    for _ in range(3):
        assert client.get(f"/invoice/{UNKNOWN_ID}").status_code == 404
    after = scrape(client)

    assert requests_counted(after, READ, "404") - requests_counted(before, READ, "404") == 3
    timed = "invoice_api_request_duration_seconds_count"
    assert value(after, timed, route=READ, method="GET") - value(
        before, timed, route=READ, method="GET"
    ) == pytest.approx(3)
    assert not any(UNKNOWN_ID in str(labels) for _, labels in after)


def test_a_card_number_in_a_path_never_becomes_a_label(client: TestClient) -> None:
    before = scrape(client)

    assert client.get("/invoice/4111111111111111").status_code == 422
    assert client.get("/nowhere/4111111111111111").status_code == 404
    response = client.get("/metrics")

    assert "4111111111111111" not in response.text
    after = scrape(client)
    assert requests_counted(after, READ, "422") - requests_counted(before, READ, "422") == 1
    unmatched = requests_counted(after, "(unmatched)", "404")
    assert unmatched - requests_counted(before, "(unmatched)", "404") == 1


@pytest.mark.parametrize(
    ("answer", "reply", "outcome"),
    [
        ((200, PAID_REPLY), 201, "SUCCEEDED"),
        ((400, {"error": "payment failed", "reason": "Do not honour"}), 402, "DECLINED"),
        ((500, {}), 502, "FAILED"),
        (None, 504, "UNKNOWN"),  # the connection dropped after the request arrived
    ],
)
def test_each_payment_outcome_is_counted_with_the_provider_call_latency(
    client: TestClient,
    stand_in: StandInProvider,
    answer: tuple[int, dict[str, Any]] | None,
    reply: int,
    outcome: str,
) -> None:
    invoice_id = create_pending_invoice(client)
    if answer is None:
        stand_in.answer_next(drop=True)
    else:
        stand_in.answer_next(*answer)
    before = scrape(client)

    assert client.post(f"/invoice/pay/{invoice_id}", json=WORK_CARD).status_code == reply
    after = scrape(client)

    assert attempts_counted(after, outcome) - attempts_counted(before, outcome) == 1
    calls = "invoice_api_provider_call_duration_seconds_count"
    assert value(after, calls, outcome=outcome) - value(before, calls, outcome=outcome) == 1
    others = {"SUCCEEDED", "DECLINED", "FAILED", "UNKNOWN", "REFUND_DUE"} - {outcome}
    assert all(
        attempts_counted(after, other) == attempts_counted(before, other) for other in others
    )


def test_a_payment_refused_as_provider_busy_counts_as_failed(
    client: TestClient, one_slot_provider: OneSlotProvider
) -> None:
    invoice_id = create_pending_invoice(client)
    with one_slot_provider.busy():
        before = scrape(client)
        assert client.post(f"/invoice/pay/{invoice_id}", json=WORK_CARD).status_code == 503
        after = scrape(client)

    assert attempts_counted(after, "FAILED") - attempts_counted(before, "FAILED") == 1
    assert value(after, "invoice_api_provider_calls_in_flight") >= 1  # the call holding the slot


def test_a_late_charge_of_a_replaced_attempt_counts_as_refund_due(
    client: TestClient, use_provider: UseProvider
) -> None:
    with StandInProvider() as provider:
        use_provider(
            provider.url, fakepay_timeout=30, fakepay_deadline=30, provider_deduplicates=True
        )
        invoice_id = create_pending_invoice(client)
        before = scrape(client)
        with superseded_attempt(client, provider, invoice_id, late=(200, PAID_REPLY)) as first:
            assert client.post(f"/invoice/pay/{invoice_id}", json=WORK_CARD).status_code == 201

    assert first.reply.status_code == 409
    after = scrape(client)
    assert attempts_counted(after, "REFUND_DUE") - attempts_counted(before, "REFUND_DUE") == 1


def test_provider_calls_in_flight_are_counted_while_they_last(
    client: TestClient, stand_in: StandInProvider
) -> None:
    in_flight = "invoice_api_provider_calls_in_flight"
    invoice_id = create_pending_invoice(client)
    gate = threading.Event()
    stand_in.answer_next(200, PAID_REPLY, gate=gate)
    before = value(scrape(client), in_flight)
    payer = threading.Thread(
        target=lambda: client.post(f"/invoice/pay/{invoice_id}", json=WORK_CARD)
    )
    payer.start()
    try:
        wait_until(lambda: stand_in.requests_for(invoice_id), "the pay to reach the provider")
        during = value(scrape(client), in_flight)
    finally:
        gate.set()
        payer.join()

    assert during == before + 1
    assert value(scrape(client), in_flight) == before


def test_database_connections_in_use_are_read_from_the_apps_pool(
    client: TestClient, app_engine: AsyncEngine
) -> None:
    in_use = "invoice_api_db_pool_connections_in_use"
    before = value(scrape(client), in_use)
    held = client.portal.call(app_engine.connect().start)  # type: ignore[union-attr]
    try:
        during = value(scrape(client), in_use)
    finally:
        client.portal.call(held.close)  # type: ignore[union-attr]

    assert during == before + 1
    assert value(scrape(client), in_use) == before


def test_an_idempotent_replay_is_counted(client: TestClient) -> None:
    body = {"jobDescription": "Counted replay", "amount": 3, "customerId": 1}
    headers = {"Idempotency-Key": f"replay-{uuid.uuid4()}"}
    first = client.post("/invoice", json=body, headers=headers)
    before = scrape(client)

    again = client.post("/invoice", json=body, headers=headers)

    assert (first.status_code, again.status_code) == (201, 201)
    assert again.headers["Idempotent-Replayed"] == "true"
    replays = "invoice_api_idempotent_replays_total"
    assert value(scrape(client), replays) - value(before, replays) == 1


def test_with_metrics_off_nothing_is_counted_and_metrics_answer_404(
    client: TestClient, app_engine: AsyncEngine
) -> None:
    import metrics

    before = scrape(client)
    metrics.start(app_engine, settings.model_copy(update={"metrics": False}))  # METRICS=false
    try:
        assert client.get(f"/invoice/{UNKNOWN_ID}").status_code == 404
        response = client.get("/metrics")
    finally:
        metrics.start(app_engine, settings)

    assert response.status_code == 404
    assert response.json() == {"detail": "Metrics are off in this service (METRICS=false)"}
    assert requests_counted(scrape(client), READ, "404") == requests_counted(before, READ, "404")


def test_with_auth_on_metrics_need_a_key_and_a_read_key_is_enough(
    live_server_with_auth: str,
) -> None:
    _, read_key = make_key("read")
    with httpx.Client(base_url=live_server_with_auth, timeout=30) as http:
        refused = http.get("/metrics")
        samples = scrape(http, headers=bearer(read_key))

    assert refused.status_code == 401
    assert requests_counted(samples, "/metrics", "401") >= 1


def served_by(log_path: Path) -> Counter[int]:
    """How many reads each worker process logged (LOG_JSON=true; the lines of uvicorn's
    supervisor, which runs none of the app, are plain text)."""
    lines = [
        json.loads(line)["record"]
        for line in log_path.read_text().splitlines()
        if line.startswith("{")
    ]
    return Counter(
        line["process"]["id"]
        for line in lines
        if line["extra"].get("route") == READ and "status" in line["extra"]
    )


def test_with_two_workers_every_scrape_counts_every_workers_requests(tmp_path: Path) -> None:
    log_path = tmp_path / "app.log"
    with running_app(log_path, env={"LOG_JSON": "true"}, workers=2) as server:
        wait_until(
            lambda: httpx.get(f"{server.url}/health-check").status_code == 200, "both workers up"
        )
        sent = 0
        while len(served_by(log_path)) < 2:
            assert sent < 400, "one worker served every request"
            for _ in range(20):  # a new connection each, for either worker to accept
                assert httpx.get(f"{server.url}/invoice/{UNKNOWN_ID}").status_code == 404
            sent += 20
        with httpx.Client(base_url=server.url) as http:
            scrapes = [scrape(http) for _ in range(6)]

    assert len(served_by(log_path)) == 2
    assert [requests_counted(samples, READ, "404") for samples in scrapes] == [sent] * 6


def test_a_worker_that_stops_takes_its_gauges_out_of_the_sums(tmp_path: Path) -> None:
    """As `make serve` runs it: a directory of the project's choosing, emptied before."""
    directory = tmp_path / "metrics"
    directory.mkdir()
    env = {"PROMETHEUS_MULTIPROC_DIR": str(directory)}
    with running_app(tmp_path / "app.log", env=env, workers=2) as server:
        wait_until(lambda: len(list(directory.glob("gauge_livesum_*.db"))) == 2, "both workers")
        assert httpx.get(f"{server.url}/invoice/{UNKNOWN_ID}").status_code == 404

    assert list(directory.glob("gauge_livesum_*.db")) == []
    assert list(directory.glob("counter_*.db"))  # what the workers counted stays

"""Several writers: one app process per Galera node, each connected to its node directly (no
HAProxy), all sharing one FakePay whose log shows every charge.

Every node takes writes, so two requests on different nodes conflict not on a row lock but
at COMMIT, when Galera certifies their write sets: the later one is refused (error 1213).
These tests send conflicting requests to two nodes at the same instant (a barrier) and judge
the outcome from the replies, the database and FakePay's log.

Galera's reads are not causal across nodes by default (`wsrep_sync_wait=0`): an invoice
created on one node can be missing on another for a moment, so a test waits until the second
node sees it before racing there.
"""

import asyncio
import contextlib
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from typing import Any

import httpx
import pytest

from scripts import cluster
from scripts.processes import Running, running_app, running_fakepay
from settings import Settings
from tests_cluster.conftest import fakepay_requests, node_rows, report
from tests_cluster.load import CARD, Load

PAY_ROUNDS = 60
ROUNDS = 20
STATUSES = ("PENDING", "PAID", "CANCELLED")


@dataclass(frozen=True)
class Writer:
    """An app process and the node it writes to."""

    node: cluster.Node
    app: Running
    http: httpx.Client


@pytest.fixture(scope="module")
def fakepay(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Running]:
    with running_fakepay(tmp_path_factory.mktemp("fakepay") / "fakepay.log") as server:
        yield server


@pytest.fixture(scope="module")
def writers(
    database: str, fakepay: Running, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[list[Writer]]:
    logs = tmp_path_factory.mktemp("writers")
    started: list[Writer] = []
    with contextlib.ExitStack() as stack:
        for node in cluster.NODES:
            env = {
                "DB_URL": f"{cluster.HOST}:{node.port}/{database}",
                "FAKEPAY_URL": f"{fakepay.url}/fakepay",
                "AUTH": "off",
            }
            app = stack.enter_context(running_app(logs / f"app-{node.name}.log", env=env))
            http = stack.enter_context(httpx.Client(base_url=app.url, timeout=15))
            started.append(Writer(node, app, http))
        yield started


def race(*calls: Callable[[], httpx.Response]) -> list[httpx.Response]:
    """Run the calls in threads released together by a barrier; their replies, in order."""
    barrier = threading.Barrier(len(calls))

    def released(call: Callable[[], httpx.Response]) -> httpx.Response:
        barrier.wait()
        return call()

    with ThreadPoolExecutor(len(calls)) as pool:
        return list(pool.map(released, calls))


def pairs(rounds: int, writers: list[Writer]) -> Iterator[tuple[int, Writer, Writer]]:
    """Round by round, two writers on different nodes: n1/n2, n2/n3, n3/n1, ..."""
    for number in range(rounds):
        yield number, writers[number % 3], writers[(number + 1) % 3]


def create_pending(writer: Writer, tag: str) -> str:
    body = {"jobDescription": tag, "amount": 12.5, "customerId": 2}
    response = writer.http.post("/invoice", json=body)
    assert response.status_code == 201, response.text
    invoice_id: str = response.json()["id"]
    return invoice_id


def wait_until_seen(writer: Writer, invoice_id: str, timeout: float = 5) -> None:
    """Until the writer's node has applied the invoice's creation."""
    deadline = time.monotonic() + timeout
    while writer.http.get(f"/invoice/{invoice_id}").status_code != 200:
        assert time.monotonic() < deadline, f"{invoice_id} never reached {writer.node.name}"
        time.sleep(0.02)


def charges_of(fakepay: Running, invoice_ids: set[str]) -> Counter[str]:
    return Counter(
        str(request.get("transactionId"))
        for request in fakepay_requests(fakepay)
        if request.get("transactionId") in invoice_ids
    )


def conflicts_so_far() -> int:
    """Write sets refused at certification, and local transactions aborted by a replicated
    one, summed over the nodes: how often the cluster saw two writers collide."""
    total = 0
    for node in cluster.NODES:
        status = cluster.node_status(node, Settings()) or {}
        total += int(status.get("wsrep_local_cert_failures", 0))
        total += int(status.get("wsrep_local_bf_aborts", 0))
    return total


def invoice_status(database: str, invoice_id: str) -> str:
    ((status,),) = node_rows(
        database,
        cluster.NODES[0].port,
        "SELECT invoice_status FROM invoice WHERE id = %s",
        invoice_id,
    )
    return str(status)


def succeeded_attempts(database: str, invoice_id: str) -> int:
    ((count,),) = node_rows(
        database,
        cluster.NODES[0].port,
        "SELECT COUNT(*) FROM payment WHERE invoice_id = %s AND payment_status = 'SUCCEEDED'",
        invoice_id,
    )
    return int(count)


def test_one_invoice_paid_on_two_nodes_at_once_is_charged_once(
    writers: list[Writer], fakepay: Running, database: str
) -> None:
    tag = f"pay-race-{uuid.uuid4().hex[:8]}"
    conflicts_before = conflicts_so_far()
    outcomes: list[tuple[str, list[int], str]] = []
    for _, first, second in pairs(PAY_ROUNDS, writers):
        invoice_id = create_pending(first, tag)
        wait_until_seen(second, invoice_id)
        replies = race(
            partial(first.http.post, f"/invoice/pay/{invoice_id}", json=CARD),
            partial(second.http.post, f"/invoice/pay/{invoice_id}", json=CARD),
        )
        loser = next((reply for reply in replies if reply.status_code != 201), None)
        detail = loser.json().get("detail", "") if loser is not None else ""
        outcomes.append((invoice_id, sorted(reply.status_code for reply in replies), detail))
    charges = charges_of(fakepay, {invoice_id for invoice_id, _, _ in outcomes})
    double = {invoice: count for invoice, count in charges.items() if count > 1}
    losers = Counter(
        "in progress"
        if "in progress" in detail
        else "already PAID"
        if "is PAID" in detail
        else detail[:60]
        for _, _, detail in outcomes
    )
    report(
        "pay_race",
        {
            "rounds": len(outcomes),
            "double_charges": len(double),
            "replies": str(Counter(str(statuses) for _, statuses, _ in outcomes)),
            "losers_told": str(dict(losers)),
            "certification_conflicts": conflicts_so_far() - conflicts_before,
        },
    )
    assert not double, f"charged more than once: {double}"
    for invoice_id, statuses, detail in outcomes:
        assert statuses == [201, 409], (invoice_id, statuses, detail)
        assert charges[invoice_id] == 1, invoice_id
        assert invoice_status(database, invoice_id) == "PAID"
        assert succeeded_attempts(database, invoice_id) == 1


def test_pay_on_one_node_and_cancel_on_another_one_wins(
    writers: list[Writer], fakepay: Running, database: str
) -> None:
    tag = f"pay-cancel-{uuid.uuid4().hex[:8]}"
    outcomes: list[tuple[str, int, int, str]] = []
    for number, first, second in pairs(ROUNDS, writers):
        invoice_id = create_pending(first, tag)
        wait_until_seen(second, invoice_id)
        payer, canceller = (first, second) if number % 2 == 0 else (second, first)
        pay_reply, cancel_reply = race(
            partial(payer.http.post, f"/invoice/pay/{invoice_id}", json=CARD),
            partial(canceller.http.post, f"/invoice/cancel/{invoice_id}"),
        )
        outcomes.append(
            (invoice_id, pay_reply.status_code, cancel_reply.status_code, cancel_reply.text)
        )
    charges = charges_of(fakepay, {invoice_id for invoice_id, _, _, _ in outcomes})
    report(
        "pay_cancel_race",
        {
            "rounds": len(outcomes),
            "pay_won": sum(1 for _, paid, _, _ in outcomes if paid == 201),
            "cancel_won": sum(1 for _, _, cancelled, _ in outcomes if cancelled == 200),
            "replies": str(Counter(f"pay {p} cancel {c}" for _, p, c, _ in outcomes)),
        },
    )
    for invoice_id, paid, cancelled, text in outcomes:
        assert sorted((paid, cancelled)) in ([201, 409], [200, 409]), (invoice_id, paid, text)
        status = invoice_status(database, invoice_id)
        if paid == 201:
            assert (status, charges[invoice_id]) == ("PAID", 1), invoice_id
        else:
            assert (status, charges[invoice_id]) == ("CANCELLED", 0), invoice_id


def test_one_idempotency_key_on_two_nodes_creates_one_invoice(
    writers: list[Writer], database: str
) -> None:
    tag = f"idem-race-{uuid.uuid4().hex[:8]}"
    seen: Counter[str] = Counter()
    for number, first, second in pairs(ROUNDS, writers):
        body = {"jobDescription": f"{tag} {number}", "amount": 30, "customerId": 3}
        headers = {"Idempotency-Key": f"{tag}-{number}"}
        replies = race(
            partial(first.http.post, "/invoice", json=body, headers=headers),
            partial(second.http.post, "/invoice", json=body, headers=headers),
        )
        created = node_rows(
            database,
            first.node.port,
            "SELECT id FROM invoice WHERE job_description = %s",
            body["jobDescription"],
        )
        assert len(created) == 1, (number, created, [reply.text for reply in replies])
        (invoice_id,) = created[0]
        originals = [
            r for r in replies if r.status_code == 201 and "Idempotent-Replayed" not in r.headers
        ]
        assert len(originals) == 1, [(r.status_code, r.text) for r in replies]
        assert originals[0].json()["id"] == invoice_id
        for reply, writer in zip(replies, (first, second), strict=True):
            if reply is originals[0]:
                continue
            seen[f"{reply.status_code} replayed={'Idempotent-Replayed' in reply.headers}"] += 1
            if reply.status_code == 201:
                assert reply.headers["Idempotent-Replayed"] == "true"
                assert reply.json()["id"] == invoice_id
                continue
            assert reply.status_code == 409, reply.text
            assert reply.headers.get("Retry-After"), (reply.headers, reply.text)
            # The retry the 409 asks for gets the first reply again.
            assert replayed_id(writer, body, headers) == invoice_id
    report("idempotency_race", {"rounds": ROUNDS, "other_request_got": str(dict(seen))})


def replayed_id(writer: Writer, body: dict[str, Any], headers: dict[str, str]) -> str:
    deadline = time.monotonic() + 10
    while True:
        reply = writer.http.post("/invoice", json=body, headers=headers)
        if reply.status_code == 201:
            assert reply.headers.get("Idempotent-Replayed") == "true", reply.text
            invoice_id: str = reply.json()["id"]
            return invoice_id
        assert reply.status_code == 409, reply.text
        assert reply.headers.get("Retry-After"), reply.text
        assert time.monotonic() < deadline, "the key never replayed"
        time.sleep(0.1)


def test_one_email_created_on_two_nodes_makes_one_customer(
    writers: list[Writer], database: str
) -> None:
    tag = uuid.uuid4().hex[:8]
    seen: Counter[str] = Counter()
    for number, first, second in pairs(ROUNDS, writers):
        email = f"race.{tag}.{number}@example.com"
        replies = race(
            partial(
                first.http.post,
                "/customer",
                json={"customerName": "Race One", "customerEmail": email},
            ),
            partial(
                second.http.post,
                "/customer",
                json={"customerName": "Race Two", "customerEmail": email.upper()},
            ),
        )
        statuses = sorted(reply.status_code for reply in replies)
        seen[str(statuses)] += 1
        customers = node_rows(
            database,
            first.node.port,
            "SELECT customer_id FROM customer WHERE LOWER(customer_email) = %s",
            email,
        )
        assert len(customers) == 1, (email, customers)
        assert statuses == [201, 409], [reply.text for reply in replies]
        taken = next(reply for reply in replies if reply.status_code == 409)
        assert "already exists" in taken.json()["detail"], taken.text
    report("email_race", {"rounds": ROUNDS, "replies": str(dict(seen))})


def test_status_totals_match_the_rows_after_a_mixed_run_on_three_nodes(
    writers: list[Writer], database: str
) -> None:
    tag = f"mixed-{uuid.uuid4().hex[:8]}"
    mix = {"read": 10, "list": 10, "create": 30, "create_paid": 15, "pay": 20, "cancel": 15}
    loads = [Load(writer.app.url, tag, workers=3, max_requests=250, mix=mix) for writer in writers]

    async def run_all() -> None:
        await asyncio.gather(*(load.run() for load in loads))

    asyncio.run(run_all())
    replies = [reply for load in loads for reply in load.replies]
    statuses = Counter(f"{reply.operation} {reply.status}" for reply in replies)
    totals: dict[str, dict[str, tuple[int, int]]] = {}
    for writer in writers:
        counted = dict(
            node_rows(
                database,
                writer.node.port,
                "SELECT invoice_status, COUNT(*) FROM invoice GROUP BY invoice_status",
            )
        )
        for status in STATUSES:
            listed = writer.http.get("/invoices", params={"invoiceStatus": status, "size": 1})
            assert listed.status_code == 200, listed.text
            pair = (int(listed.json()["total"]), int(counted.get(status, 0)))
            totals.setdefault(writer.node.name, {})[status] = pair
    report(
        "mixed_three_nodes",
        {
            "requests": len(replies),
            "conflicts_answered": sum(1 for r in replies if r.status == 409),
            "statuses": dict(statuses),
            "409s": [f"{r.operation}: {r.detail}" for r in replies if r.status == 409],
            "totals_vs_rows": totals,
        },
    )
    broken = [r for r in replies if r.status is None or r.status >= 500]
    assert not broken, [(r.operation, r.status, r.detail) for r in broken]
    assert len(replies) >= 3 * 250
    # Each invoice is created, paid or cancelled by one client only: a 409 here would be a
    # lost race on a shared row (a counts shard) that retrying should have absorbed.
    assert not [r for r in replies if r.status == 409], statuses
    for node, by_status in totals.items():
        for status, (total, rows) in by_status.items():
            assert total == rows, f"{node} {status}: total {total}, COUNT(*) {rows}"

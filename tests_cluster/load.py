"""A bounded mixed load on the app (reads, lists, creates, pays, and cancels if asked), every
reply kept with its timing, for the test to judge afterwards."""

import asyncio
import random
import time
from dataclasses import dataclass, field

import httpx

CARD = {"number": "4242 4242 4242 4242", "expiry": "12-2040", "name": "Fail Over"}
SEEDED_IDS = ["6f53c715-0369-11f0-8d97-7c646cb7c0bc", "a14e5bd8-02ce-11f0-8d97-7c646cb7c0bc"]
# How often each kind of request is sent.
MIX = {"read": 30, "list": 20, "create": 20, "create_paid": 15, "pay": 15}
# Paying and cancelling both take a PENDING invoice this load created.
NEEDS_PENDING = {"pay", "cancel"}


@dataclass(frozen=True)
class Reply:
    operation: str
    started: float  # time.monotonic()
    ended: float
    status: int | None  # None: no reply at all (connection error or timeout)
    retry_after: str | None
    invoice_id: str | None
    detail: str

    @property
    def failed(self) -> bool:
        """A reply that is not the operation's normal outcome."""
        return self.status is None or self.status >= 500 or self.status == 409


@dataclass
class Load:
    base_url: str
    tag: str  # in every invoice's jobDescription, to find this run's invoices
    workers: int = 6
    max_requests: int = 20_000
    mix: dict[str, int] = field(default_factory=lambda: dict(MIX))
    replies: list[Reply] = field(default_factory=list)
    pending: list[str] = field(default_factory=list)  # created PENDING, not yet paid by the load
    created: list[str] = field(default_factory=list)
    stop: asyncio.Event = field(default_factory=asyncio.Event)

    async def run(self) -> None:
        limits = httpx.Limits(max_connections=self.workers)
        async with httpx.AsyncClient(base_url=self.base_url, timeout=10, limits=limits) as http:
            await asyncio.gather(*(self.worker(http, seed) for seed in range(self.workers)))

    async def worker(self, http: httpx.AsyncClient, seed: int) -> None:
        pick = random.Random(seed)
        operations, weights = list(self.mix), list(self.mix.values())
        while not self.stop.is_set() and len(self.replies) < self.max_requests:
            operation = pick.choices(operations, weights)[0]
            if operation in NEEDS_PENDING and not self.pending:
                operation = "create"
            await self.send(http, operation, pick)

    async def send(self, http: httpx.AsyncClient, operation: str, pick: random.Random) -> None:
        invoice_id: str | None = None
        body = {"jobDescription": f"{self.tag} {operation}", "amount": 12.5, "customerId": 2}
        started = time.monotonic()
        try:
            if operation == "read":
                invoice_id = pick.choice(self.created[-50:] or SEEDED_IDS)
                response = await http.get(f"/invoice/{invoice_id}")
            elif operation == "list":
                response = await http.get("/invoices", params={"size": 10})
            elif operation == "create":
                response = await http.post("/invoice", json=body)
            elif operation == "create_paid":
                response = await http.post("/invoice", json={**body, "card": CARD})
            elif operation == "cancel":
                invoice_id = self.pending.pop(pick.randrange(len(self.pending)))
                response = await http.post(f"/invoice/cancel/{invoice_id}")
            else:
                invoice_id = self.pending.pop(pick.randrange(len(self.pending)))
                response = await http.post(f"/invoice/pay/{invoice_id}", json=CARD)
        except httpx.HTTPError as exc:
            ended = time.monotonic()
            self.replies.append(Reply(operation, started, ended, None, None, invoice_id, repr(exc)))
            return
        ended = time.monotonic()
        reply = response.json() if response.content else {}
        if response.status_code == 201 and operation in {"create", "create_paid"}:
            invoice_id = reply["id"]
            self.created.append(reply["id"])
            if operation == "create":
                self.pending.append(reply["id"])
        detail = "" if response.is_success else str(reply.get("detail", response.text))[:300]
        self.replies.append(
            Reply(
                operation,
                started,
                ended,
                response.status_code,
                response.headers.get("Retry-After"),
                invoice_id,
                detail,
            )
        )

"""Add N realistic invoices to the database in DB_URL, fast: `make seed N=1000000`.

Invoices spread over five years, over every status (roughly 60% PAID, 30% PENDING, 10%
CANCELLED) and over the seeded customers plus generated ones. Rows go in as multi-row INSERTs
of a few thousand, one transaction per batch, from several connections at once; each batch
moves the counts table in its own transaction, as every write of the app does.
"""

from __future__ import annotations

import argparse
import random
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from typing import Any

from tqdm import tqdm

from models import uuid7
from scripts.schema import admin_connection, count_new_invoices
from settings import Settings

JOBS = [
    "Website Development",
    "Graphic Design Service",
    "SEO Optimization",
    "Software License Fee",
    "Consultation Service",
    "Database Migration",
    "Security Audit",
    "Cloud Hosting",
    "Mobile App Maintenance",
    "Data Analysis Report",
    "Training Workshop",
    "Technical Support Plan",
]
STATUSES = ["PAID"] * 6 + ["PENDING"] * 3 + ["CANCELLED"]
CUSTOMERS = 1000
SPAN_US = 5 * 365 * 24 * 3600 * 1_000_000


def ensure_customers(cursor: Any) -> list[int]:
    cursor.execute("SELECT COUNT(*) FROM customer")
    (existing,) = cursor.fetchone()
    if existing < CUSTOMERS:
        rows = ", ".join(
            f"('Customer {n}', 'customer{n}@example.com')"
            for n in range(existing + 1, CUSTOMERS + 1)
        )
        cursor.execute(f"INSERT INTO customer (customer_name, customer_email) VALUES {rows}")
    cursor.execute("SELECT customer_id FROM customer")
    return [row[0] for row in cursor.fetchall()]


def batch_values(
    rng: random.Random,
    customers: list[int],
    count: int,
    window: tuple[datetime, int],
    id_version: int,
) -> tuple[str, Counter[str]]:
    """One VALUES list, its invoices in time order within the batch's window, as they would
    arrive, and how many of each status it holds. Every value is generated here; nothing
    comes from outside."""
    start, width_us = window
    rows = []
    statuses: Counter[str] = Counter()
    for offset in sorted(rng.randrange(width_us) for _ in range(count)):
        created = start + timedelta(microseconds=offset)
        if id_version == 7:
            invoice_id = uuid7(created, rng)
        else:
            invoice_id = uuid.UUID(int=rng.getrandbits(128), version=4)
        amount = f"{rng.randrange(100, 500_000) / 100:.2f}"
        stamp = created.strftime("%Y-%m-%d %H:%M:%S.%f")
        customer, job, status = rng.choice(customers), rng.choice(JOBS), rng.choice(STATUSES)
        statuses[status] += 1
        rows.append(f"('{invoice_id}',{customer},'{job}',{amount},'{status}','{stamp}','{stamp}')")
    return ",".join(rows), statuses


class Batches:
    """Batches adding up to the total, oldest first, handed out to writers one at a time.
    Each covers its own slice of the last five years, so every index grows at its end."""

    def __init__(self, total: int, batch: int) -> None:
        sizes = [batch] * (total // batch) + ([total % batch] if total % batch else [])
        width_us = SPAN_US // max(len(sizes), 1)
        oldest = datetime.now(UTC) - timedelta(microseconds=SPAN_US)
        self._batches = iter(
            (size, (oldest + timedelta(microseconds=index * width_us), width_us))
            for index, size in enumerate(sizes)
        )
        self._lock = threading.Lock()

    def __iter__(self) -> Iterator[tuple[int, tuple[datetime, int]]]:
        while True:
            with self._lock:
                batch = next(self._batches, None)
            if batch is None:
                return
            yield batch


def write(
    config: Settings,
    customers: list[int],
    batches: Batches,
    rng: random.Random,
    id_version: int,
    progress: Any,
) -> None:
    """One writer: its own connection, one transaction per batch, until no batch is left."""
    with admin_connection(config, config.db_name) as connection, connection.cursor() as cursor:
        for size, window in batches:
            values, statuses = batch_values(rng, customers, size, window, id_version)
            cursor.execute("BEGIN")
            cursor.execute(
                "INSERT INTO invoice (id, customer_id, job_description, amount, "
                f"invoice_status, created_at, modified_at) VALUES {values}"
            )
            count_new_invoices(cursor, statuses)
            cursor.execute("COMMIT")
            progress.update(size)


def seed(
    config: Settings, count: int, batch: int, writers: int, id_version: int, seed: int | None
) -> float:
    """Rows per second. The counts table's shard rows let writers commit side by side."""
    with admin_connection(config, config.db_name) as connection, connection.cursor() as cursor:
        customers = ensure_customers(cursor)
    batches = Batches(count, batch)
    base = random.Random(seed)  # noqa: S311  (test data, not secrets)
    started = time.perf_counter()
    with (
        tqdm(total=count, unit="rows", unit_scale=True, desc="invoices") as progress,
        ThreadPoolExecutor(max_workers=writers) as pool,
    ):
        futures = [
            pool.submit(
                write,
                config,
                customers,
                batches,
                random.Random(base.getrandbits(64)),  # noqa: S311
                id_version,
                progress,
            )
            for _ in range(writers)
        ]
        for future in futures:
            future.result()
    return count / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("count", type=int, help="invoices to add")
    parser.add_argument("--batch", type=int, default=5000, help="rows per INSERT")
    parser.add_argument("--writers", type=int, default=2, help="parallel connections")
    parser.add_argument("--uuid", type=int, choices=[4, 7], default=7, help="id version")
    parser.add_argument("--seed", type=int, default=None, help="random seed, for repeatable data")
    args = parser.parse_args()
    rate = seed(Settings(), args.count, args.batch, args.writers, args.uuid, args.seed)
    print(f"added {args.count:,} invoices at {rate:,.0f} rows/s (UUIDv{args.uuid} ids)")


if __name__ == "__main__":
    main()

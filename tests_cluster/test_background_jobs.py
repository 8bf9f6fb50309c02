"""Every app process runs the same background jobs: the purge of expired Idempotency-Keys and
the sweep that turns stalled payment attempts UNKNOWN. With many processes on different
nodes they run at once on the same rows; that must be harmless: no job fails, every expired
key goes exactly once, every stalled attempt is marked exactly once, nothing else changes."""

import asyncio
import uuid
from collections.abc import Mapping, Sequence

from sqlalchemy.ext.asyncio import AsyncEngine
from sqlmodel.ext.asyncio.session import AsyncSession

from db import make_engine
from idempotency import purge_expired_keys
from payments import sweep_stalled_once
from scripts import cluster
from scripts.schema import count_new_invoices
from settings import Settings
from tests_cluster.conftest import node_rows, report

PER_NODE = 3  # jobs of each kind per node: 9 purgers and 9 sweeps at once
EXPIRED, LIVE = 400, 40
STALLED, FRESH = 120, 12
STALE_AFTER_S = 600


def execute(
    database: str,
    statement: str,
    rows: Sequence[tuple[object, ...]],
    counted: Mapping[str, int] | None = None,
) -> None:
    """Run `statement` once per row on node 1, in one transaction with the counts of any
    invoices it inserts (`counted`, by status)."""
    import pymysql

    config = Settings()
    with (
        pymysql.connect(
            host=cluster.HOST,
            port=cluster.NODES[0].port,
            user=config.db_user,
            password=config.db_password.get_secret_value(),
            database=database,
        ) as connection,
        connection.cursor() as cursor,
    ):
        cursor.executemany(statement, rows)
        if counted:
            count_new_invoices(cursor, counted)
        connection.commit()
        connection.commit()


def seed_keys(database: str, owner: str) -> None:
    rows: list[tuple[object, ...]] = [
        (owner, f"expired-{n}", "0" * 64, str(uuid.uuid4()), "2000-01-01") for n in range(EXPIRED)
    ]
    rows += [(owner, f"live-{n}", "0" * 64, str(uuid.uuid4()), "2999-01-01") for n in range(LIVE)]
    execute(
        database,
        "INSERT INTO idempotency_key (owner, idempotency_key, fingerprint, invoice_id, "
        "expires_at) VALUES (%s, %s, %s, %s, %s)",
        rows,
    )


def seed_attempts(database: str, tag: str) -> None:
    """One PROCESSING attempt on each of STALLED + FRESH new invoices; STALLED of them an
    hour old, long past the margin."""
    invoices = [(str(uuid.uuid4()), f"{tag} {n}") for n in range(STALLED + FRESH)]
    execute(
        database,
        "INSERT INTO invoice (id, customer_id, job_description, amount, invoice_status) "
        "VALUES (%s, 1, %s, 1, 'CANCELLED')",
        invoices,
        counted={"CANCELLED": len(invoices)},  # as every writer of invoices must
    )
    execute(
        database,
        "INSERT INTO payment (invoice_id, card_number, card_name, card_expiry, payment_status, "
        "unsettled, created_at) VALUES (%s, '424242******4242', 'Sweep', '12-2040', "
        "'PROCESSING', 1, NOW(6) - INTERVAL %s SECOND)",
        [(invoice_id, 3600 if n < STALLED else 0) for n, (invoice_id, _) in enumerate(invoices)],
    )


async def purge(engine: AsyncEngine, start: asyncio.Event) -> int:
    await start.wait()
    async with AsyncSession(engine) as session:
        return await purge_expired_keys(session, batch=25)


async def sweep(engine: AsyncEngine, start: asyncio.Event) -> int:
    await start.wait()
    return await sweep_stalled_once(engine, STALE_AFTER_S)


async def all_at_once(database: str) -> list[int | BaseException]:
    """PER_NODE purgers and PER_NODE sweeps on each node, released together; what each
    returned (purgers first on each node), or what it raised."""
    engines = [
        make_engine(Settings(db_url=f"{cluster.HOST}:{node.port}/{database}"))
        for node in cluster.NODES
    ]
    start = asyncio.Event()
    jobs = [
        job(engine, start) for engine in engines for job in [purge] * PER_NODE + [sweep] * PER_NODE
    ]
    running = asyncio.gather(*jobs, return_exceptions=True)
    await asyncio.sleep(0.2)  # every job started and waiting
    start.set()
    try:
        return list(await running)
    finally:
        for engine in engines:
            await engine.dispose()


def test_purges_and_sweeps_on_every_node_at_once_are_harmless(database: str) -> None:
    owner = f"purge-{uuid.uuid4().hex[:8]}"
    tag = f"sweep-{owner}"
    seed_keys(database, owner)
    seed_attempts(database, tag)
    port = cluster.NODES[0].port
    ((expired_before,),) = node_rows(
        database,
        port,
        "SELECT COUNT(*) FROM idempotency_key WHERE expires_at <= UTC_TIMESTAMP()",
    )
    ((stalled_before,),) = node_rows(
        database,
        port,
        "SELECT COUNT(*) FROM payment WHERE payment_status = 'PROCESSING' "
        "AND created_at < NOW(6) - INTERVAL %s SECOND",
        STALE_AFTER_S,
    )

    results = asyncio.run(all_at_once(database))
    errors = [repr(result) for result in results if isinstance(result, BaseException)]
    purged = [r for n, r in enumerate(results) if n % (2 * PER_NODE) < PER_NODE]
    swept = [r for n, r in enumerate(results) if n % (2 * PER_NODE) >= PER_NODE]

    keys = dict(
        node_rows(
            database,
            port,
            "SELECT idempotency_key LIKE 'live-%%', COUNT(*) FROM idempotency_key "
            "WHERE owner = %s GROUP BY 1",
            owner,
        )
    )
    attempts = dict(
        node_rows(
            database,
            port,
            "SELECT CONCAT(p.payment_status, IF(p.created_at < NOW(6) - INTERVAL 1800 SECOND, "
            "' stalled', ' fresh')), COUNT(*) FROM payment p JOIN invoice i "
            "ON i.id = p.invoice_id WHERE i.job_description LIKE %s GROUP BY 1",
            f"{tag} %",
        )
    )
    report(
        "background_jobs",
        {
            "purgers": len(purged),
            "sweeps": len(swept),
            "errors": len(errors),
            "keys_purged": sum(r for r in purged if isinstance(r, int)),
            "attempts_marked": sum(r for r in swept if isinstance(r, int)),
            "purged_by_job": purged,
            "swept_by_job": swept,
            "left": {"keys": keys, "attempts": attempts},
            "error_list": errors,
        },
    )
    assert not errors, errors
    assert sum(purged) == expired_before  # type: ignore[arg-type]
    assert keys == {1: LIVE}, keys
    assert sum(swept) == stalled_before  # type: ignore[arg-type]
    assert attempts == {"UNKNOWN stalled": STALLED, "PROCESSING fresh": FRESH}, attempts

"""`make bench-cluster`: the app on the Galera cluster (through HAProxy) beside the app on the
single server, measured side by side in one run with `bench.run`'s machinery.

Both get a bench database of their own seeded alike, one app process each (one worker, as
`make bench` runs it) and one shared FakePay; each figure is the median of alternating
rounds, and what matters is the ratio cluster / single server.

    python -m bench.cluster [--rows N] [--duration S] [--rounds R] [--reuse]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import tempfile
from dataclasses import asdict
from datetime import UTC, datetime
from pathlib import Path

from bench.run import (
    PAY_FLOW,
    RESULTS,
    Measurement,
    Script,
    Wrk,
    ensure_wrk,
    find,
    get_script,
    ids_script,
    measure,
    pay_script,
    pending_invoices,
    sample_ids,
)
from scripts import cluster
from scripts.processes import running_app, running_fakepay
from scripts.schema import create_database, upgrade_to_head
from scripts.seed import seed
from settings import Settings

SINGLE, CLUSTER = "single server", "cluster (HAProxy)"
PAYS_PER_RUN = 2000
READ, LIST = "GET /invoice/{id}", "GET /invoices"


def prepare(config: Settings, rows: int, on_cluster: bool) -> None:
    """A fresh bench database with `rows` invoices, seeded alike on both targets."""
    if on_cluster:
        node_1 = Settings(db_url=f"{cluster.HOST}:{cluster.NODES[0].port}/{config.db_name}")
        create_database(node_1, recreate=True)
        cluster.install_schema(config.db_name)
    else:
        create_database(config, recreate=True)
        upgrade_to_head(config)
    seed(config, rows, batch=2000, writers=2, id_version=7, seed=1)


def main() -> None:
    parser = argparse.ArgumentParser(description="the app on the cluster beside one server")
    parser.add_argument("--rows", type=int, default=20_000, help="invoices to seed on each")
    parser.add_argument("--duration", type=int, default=5, help="seconds per wrk run")
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds per figure")
    parser.add_argument("--reuse", action="store_true", help="keep both bench databases as is")
    args = parser.parse_args()

    dev = Settings()
    name = f"{dev.db_name}_bench_cluster"
    configs = {
        SINGLE: Settings(db_url=f"{dev.db_url.rsplit('/', 1)[0]}/{name}"),
        CLUSTER: Settings(db_url=f"{cluster.HOST}:{cluster.PROXY_PORT}/{name}"),
    }
    wrk_binary = ensure_wrk()
    if not args.reuse:
        for target, config in configs.items():
            print(f"seeding {args.rows} invoices on the {target}", flush=True)
            prepare(config, args.rows, on_cluster=target == CLUSTER)
    ids = {target: sample_ids(config, 1000)[0] for target, config in configs.items()}

    workdir = Path(tempfile.mkdtemp(prefix="bench-cluster-"))
    wrk = Wrk(wrk_binary, args.duration, workdir)
    measurements: list[Measurement] = []
    with running_fakepay(workdir / "fakepay.log") as fakepay, contextlib.ExitStack() as stack:
        urls = {}
        for n, (target, config) in enumerate(configs.items()):
            env = {
                "DB_URL": config.db_url,
                "FAKEPAY_URL": f"{fakepay.url}/fakepay",
                "LOG_LEVEL": "INFO",
                "AUTH": "off",
            }
            urls[target] = stack.enter_context(running_app(workdir / f"{n}.log", env)).url
        reads: dict[str, Script] = {
            target: wrk.script(f"read{n}", ids_script(ids[target]))
            for n, target in enumerate(configs)
        }
        listing = wrk.script("list", get_script("/invoices"))
        for connections in (1, 32):
            measurements += measure(wrk, urls, READ, reads, connections, args.rounds)
            measurements += measure(wrk, urls, LIST, listing, connections, args.rounds)

        def pays(target: str, n: int) -> Script:
            def fresh() -> Path:
                pending = pending_invoices(configs[target], PAYS_PER_RUN)
                return wrk.script(f"pays{n}", pay_script(pending))

            return fresh

        pay_scripts = {target: pays(target, n) for n, target in enumerate(configs)}
        for connections in (1, 8):
            measurements += measure(wrk, urls, PAY_FLOW, pay_scripts, connections, args.rounds)

    report(measurements, args)


def report(measurements: list[Measurement], args: argparse.Namespace) -> None:
    print(f"\n{'endpoint':42} {'c':>3} {'target':18} {'req/s':>8} {'p50 ms':>8} {'p99 ms':>8}")
    for m in measurements:
        print(
            f"{m.endpoint:42} {m.connections:>3} {m.target:18} {m.req_per_s:>8.0f} "
            f"{m.p50_ms:>8.2f} {m.p99_ms:>8.2f}  errors {m.errors}"
        )
    ratios = {
        f"{endpoint}, c={c}: cluster / single": find(measurements, CLUSTER, endpoint, c).req_per_s
        / max(find(measurements, SINGLE, endpoint, c).req_per_s, 1e-9)
        for endpoint, c in (
            (READ, 1),
            (READ, 32),
            (LIST, 1),
            (LIST, 32),
            (PAY_FLOW, 1),
            (PAY_FLOW, 8),
        )
    }
    print()
    for label, value in ratios.items():
        print(f"{label:60} {value:.2f}x")
    errors = sum(m.errors for m in measurements)
    print(f"errors and non-2xx replies: {errors}")
    RESULTS.mkdir(parents=True, exist_ok=True)
    stamp = datetime.now(UTC).strftime("%Y-%m-%dT%H%M")
    data = {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "rows": args.rows,
        "duration_s": args.duration,
        "rounds": args.rounds,
        "cores": os.cpu_count(),
        "ratios": ratios,
        "median_ratio": statistics.median(ratios.values()),
        "measurements": [asdict(m) for m in measurements],
    }
    path = RESULTS / f"cluster-{stamp}.json"
    path.write_text(json.dumps(data, indent=2) + "\n")
    print(f"wrote {path.relative_to(RESULTS.parent.parent)}")


if __name__ == "__main__":
    main()

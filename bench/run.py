"""`make bench`: the app against a minimal baseline, measured side by side in one run.

The machine is shared and its speed drifts, so every figure that matters is a ratio to a
baseline measured in the same run, alternating the two so drift hits both, and each figure is
the median of several rounds. Load comes from wrk on loopback.

    python -m bench.run [--rows N] [--duration S] [--rounds R] [--reuse] [--profile-only]

The run ends with a profile of one read (`bench.profile`), saved beside the results.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import statistics
import subprocess
import tempfile
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx

from bench.profile import profiled_app, write_profile
from models import ApiKeyScope, encode_cursor
from scripts.api_keys import create as create_api_key
from scripts.processes import running_app, running_fakepay
from scripts.schema import admin_connection, count_new_invoices, create_database, upgrade_to_head
from scripts.seed import seed
from settings import PROJECT_ROOT as ROOT
from settings import Settings

RESULTS = ROOT / "bench" / "results"
PAY_CARD = {"number": "4111111111111111", "expiry": "12-2039", "name": "Bench Card"}
PAY_BODY = {"jobDescription": "Bench", "amount": 9.99, "customerId": 1, "card": PAY_CARD}
FAKEPAY_BODY = {"transactionId": "8176929e-5484-462b-9758-c74ac68f7892", "card": PAY_CARD}
DONE_LUA = """
done = function(summary, latency, requests)
  local errors = summary.errors
  io.write(string.format('\\n{"requests": %d, "duration_us": %d, "errors": %d, ' ..
    '"non2xx": %d, "p50_us": %d, "p99_us": %d}\\n',
    summary.requests, summary.duration,
    errors.connect + errors.read + errors.write + errors.timeout, errors.status,
    latency:percentile(50), latency:percentile(99)))
end
"""


@dataclass
class Measurement:
    target: str
    endpoint: str
    connections: int
    req_per_s: float
    p50_ms: float
    p99_ms: float
    errors: int


def ensure_wrk() -> str:
    found = shutil.which("wrk")
    if found:
        return found
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        raise SystemExit("wrk is needed: install it (Debian/Ubuntu: apt-get install wrk)")
    print("installing wrk with apt-get (one time)", flush=True)
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    subprocess.run(["apt-get", "update", "-q"], check=True, env=env, stdout=subprocess.DEVNULL)
    subprocess.run(["apt-get", "install", "-y", "-q", "wrk"], check=True, env=env)
    return shutil.which("wrk") or "wrk"


def peak_rss_mib(process: subprocess.Popen[bytes]) -> float:
    """Largest peak resident set (VmHWM) among the process and its children (the workers)."""
    pids = [process.pid]
    children = Path(f"/proc/{process.pid}/task/{process.pid}/children")
    if children.exists():
        pids += [int(pid) for pid in children.read_text().split()]
    peaks = []
    for pid in pids:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                peaks.append(int(line.split()[1]) / 1024)
    return max(peaks)


class Wrk:
    def __init__(self, binary: str, duration: int, scripts: Path) -> None:
        self.binary, self.duration, self.scripts = binary, duration, scripts

    def script(self, name: str, body: str) -> Path:
        path = self.scripts / f"{name}.lua"
        path.write_text(body + DONE_LUA)
        return path

    def run(self, url: str, script: Path, connections: int) -> dict[str, Any]:
        threads = min(connections, 2)
        output = subprocess.run(
            [
                self.binary,
                f"-t{threads}",
                f"-c{connections}",
                f"-d{self.duration}s",
                "--timeout",
                "10s",
                "-s",
                str(script),
                url,
            ],
            check=True,
            capture_output=True,
            text=True,
        ).stdout
        result: dict[str, Any] = json.loads(output.strip().splitlines()[-1])
        return result


def get_script(path: str) -> str:
    return f'wrk.method = "GET"\nwrk.path = "{path}"\n'


def ids_script(ids: list[str], headers: dict[str, str] | None = None) -> str:
    quoted = ",".join(f'"{invoice_id}"' for invoice_id in ids)
    header_lines = "".join(f'wrk.headers["{k}"] = "{v}"\n' for k, v in (headers or {}).items())
    return header_lines + (
        f"local ids = {{{quoted}}}\nlocal i = 0\n"
        "request = function()\n  i = i % #ids + 1\n"
        '  return wrk.format("GET", "/invoice/" .. ids[i])\nend\n'
    )


def post_script(path: str, body: dict[str, Any]) -> str:
    return (
        f'wrk.method = "POST"\nwrk.path = "{path}"\n'
        f"wrk.body = '{json.dumps(body)}'\n"
        'wrk.headers["Content-Type"] = "application/json"\n'
    )


Script = Path | Callable[[], Path]


def measure(
    wrk: Wrk,
    targets: dict[str, str],
    endpoint: str,
    script: Script | dict[str, Script],
    connections: int,
    rounds: int,
) -> list[Measurement]:
    """Median of `rounds` runs per target, alternating which target goes first. A `script`
    that is a function makes a fresh script for every run (pays need unused invoices); a dict
    gives each target its own (targets with databases of their own)."""
    samples: dict[str, list[dict[str, Any]]] = {name: [] for name in targets}
    names = list(targets)
    for round_number in range(rounds):
        order = names if round_number % 2 == 0 else names[::-1]
        for name in order:
            chosen = script[name] if isinstance(script, dict) else script
            run_script = chosen() if callable(chosen) else chosen
            samples[name].append(wrk.run(targets[name], run_script, connections))
    results: list[Measurement] = []
    for name, runs in samples.items():
        results.append(
            Measurement(
                target=name,
                endpoint=endpoint,
                connections=connections,
                req_per_s=statistics.median(r["requests"] / r["duration_us"] * 1e6 for r in runs),
                p50_ms=statistics.median(r["p50_us"] for r in runs) / 1000,
                p99_ms=statistics.median(r["p99_us"] for r in runs) / 1000,
                errors=sum(r["errors"] + r["non2xx"] for r in runs),
            )
        )
    return results


PAYS_PER_RUN = 6000


def pending_invoices(config: Settings, count: int) -> list[str]:
    """`count` new PENDING invoices of one customer, for pays to go through."""
    ids = [str(uuid.uuid4()) for _ in range(count)]
    with admin_connection(config, config.db_name) as connection, connection.cursor() as cursor:
        cursor.execute("BEGIN")
        cursor.executemany(
            "INSERT INTO invoice (id, customer_id, job_description, amount) "
            "VALUES (%s, 5, 'Bench pay', 9.99)",
            [(invoice_id,) for invoice_id in ids],
        )
        count_new_invoices(cursor, {"PENDING": count})
        cursor.execute("COMMIT")
    return ids


def pay_script(ids: list[str]) -> str:
    """Each wrk thread pays its own share of `ids`, each invoice once."""
    quoted = ",".join(f'"{invoice_id}"' for invoice_id in ids)
    return (
        f"local ids = {{{quoted}}}\nlocal threads = 0\nlocal i = 0\n"
        'function setup(thread)\n  thread:set("slot", threads)\n  threads = threads + 1\nend\n'
        'wrk.method = "POST"\n'
        f"wrk.body = '{json.dumps(PAY_CARD)}'\n"
        'wrk.headers["Content-Type"] = "application/json"\n'
        "request = function()\n  i = i + 1\n"
        '  return wrk.format(nil, "/invoice/pay/" .. ids[(i - 1) * 2 + slot + 1])\nend\n'
    )


def prepare_database(config: Settings, rows: int, reuse: bool) -> float | None:
    """A bench database of its own with `rows` seeded invoices; the seeding rate, if seeded."""
    if reuse:
        return None
    create_database(config, recreate=True)
    upgrade_to_head(config)
    rate: float = seed(config, rows, batch=5000, writers=2, id_version=7, seed=1)
    return rate


def sample_ids(config: Settings, count: int) -> tuple[list[str], str]:
    """Random invoice ids, and a scroll cursor halfway down the list."""
    with admin_connection(config, config.db_name) as connection, connection.cursor() as cursor:
        cursor.execute("SELECT COALESCE(SUM(invoice_count), 0) FROM invoice_status_count")
        (total,) = cursor.fetchone() or (0,)
        cursor.execute(f"SELECT id FROM invoice ORDER BY RAND() LIMIT {int(count)}")
        ids = [row[0] for row in cursor.fetchall()]
        cursor.execute(
            "SELECT created_at, id FROM invoice ORDER BY created_at DESC, id DESC "
            f"LIMIT 1 OFFSET {int(total) // 2}"
        )
        created_at, invoice_id = cursor.fetchone() or (datetime.now(UTC), "")
    return ids, encode_cursor(created_at, invoice_id)


def chart(measurements: list[Measurement], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = sorted({(m.endpoint, m.connections) for m in measurements})
    targets = sorted({m.target for m in measurements})
    figure, (throughput, latency) = plt.subplots(2, 1, figsize=(12, 9))
    width = 0.8 / len(targets)
    for index, target in enumerate(targets):
        by_label = {(m.endpoint, m.connections): m for m in measurements if m.target == target}
        xs = [n + index * width for n in range(len(labels))]
        throughput.bar(
            xs, [by_label[k].req_per_s if k in by_label else 0 for k in labels], width, label=target
        )
        latency.bar(
            xs, [by_label[k].p50_ms if k in by_label else 0 for k in labels], width, label=target
        )
    names = [f"{endpoint}\nc={c}" for endpoint, c in labels]
    for axis, title in ((throughput, "requests/s (median)"), (latency, "p50 latency, ms")):
        axis.set_xticks([n + 0.4 - width / 2 for n in range(len(labels))], names, fontsize=7)
        axis.set_title(title)
        axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=110)


TARGETS = {
    "app": "main:app",
    "baseline (async)": "bench.baselines:async_app",
    "baseline (sync)": "bench.baselines:sync_app",
}
BASELINE = "baseline (async)"
PAY_FLOW = "POST /invoice/pay/{id} (one customer)"


def main() -> None:
    parser = argparse.ArgumentParser(description="benchmark the app against minimal baselines")
    parser.add_argument("--rows", type=int, default=200_000, help="invoices to seed")
    parser.add_argument("--duration", type=int, default=5, help="seconds per wrk run")
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds per figure")
    parser.add_argument("--reuse", action="store_true", help="keep the bench database as is")
    parser.add_argument(
        "--profile-only", action="store_true", help="only the profile of one read, no ratios"
    )
    args = parser.parse_args()

    dev = Settings()
    bench_db = f"{dev.db_url.rsplit('/', 1)[0]}/{dev.db_name}_bench"
    config = Settings(db_url=bench_db)
    wrk_binary = ensure_wrk()
    seed_rate = prepare_database(config, args.rows, args.reuse)
    ids, deep_cursor = sample_ids(config, 1000)

    workdir = Path(tempfile.mkdtemp(prefix="bench-"))
    wrk = Wrk(wrk_binary, args.duration, workdir)
    measurements: list[Measurement] = []
    rss: dict[str, float] = {}
    with running_fakepay(workdir / "fakepay.log") as fakepay:
        # INFO: the app writes its one line per request, as it does in production.
        env = {"DB_URL": bench_db, "FAKEPAY_URL": f"{fakepay.url}/fakepay", "LOG_LEVEL": "INFO"}
        read = wrk.script("read", ids_script(ids))
        if args.profile_only:
            print(profile_read(wrk, env, read, workdir, args.duration))
            return
        with contextlib.ExitStack() as stack:
            servers = {
                name: stack.enter_context(running_app(workdir / f"{n}.log", env, app=app))
                for n, (name, app) in enumerate(TARGETS.items())
            }
            urls = {name: running.url for name, running in servers.items()}
            listing = wrk.script("list", get_script("/invoices"))
            filtered = wrk.script("list_pending", get_script("/invoices?invoiceStatus=PENDING"))
            for connections in (1, 32):
                for endpoint, script in (
                    ("GET /invoice/{id}", read),
                    ("GET /invoices", listing),
                    ("GET /invoices?invoiceStatus=PENDING", filtered),
                ):
                    measurements += measure(wrk, urls, endpoint, script, connections, args.rounds)
            app_url = urls["app"]
            deep = wrk.script("scroll_deep", get_script(f"/invoices/scroll?cursor={deep_cursor}"))
            measurements += measure(
                wrk, {"app": app_url}, "GET /invoices/scroll (middle)", deep, 1, args.rounds
            )
            pay_body = {
                "jobDescription": "Bench",
                "amount": 9.99,
                "customerId": 1,
                "card": PAY_CARD,
            }
            pay = wrk.script("pay", post_script("/invoice", pay_body))
            fakepay_body = {
                "transactionId": "8176929e-5484-462b-9758-c74ac68f7892",
                "card": PAY_CARD,
            }
            direct = wrk.script("fakepay", post_script("/fakepay", fakepay_body))
            pay_targets = {name: urls[name] for name in ("app", BASELINE)}

            def pays() -> Path:
                return wrk.script("pays", pay_script(pending_invoices(config, PAYS_PER_RUN)))

            for connections in (1, 8):
                measurements += measure(wrk, pay_targets, PAY_FLOW, pays, connections, args.rounds)
                measurements += measure(
                    wrk, {"app": app_url}, "POST /invoice with card", pay, connections, args.rounds
                )
                measurements += measure(
                    wrk, {"fakepay": fakepay.url}, "POST /fakepay", direct, connections, args.rounds
                )
            for name, running in servers.items():
                rss[name] = peak_rss_mib(running.process)
            measurements += filtered_pages(wrk, app_url, config, args.rounds)
            deepest = Settings().max_page_offset // 10 + 1  # its offset is MAX_PAGE_OFFSET
            for label, query in (("", ""), (", PENDING", "&invoiceStatus=PENDING")):
                path = f"/invoices?page={deepest}{query}"
                measurements.append(
                    timed_get(app_url, path, f"GET /invoices deepest page{label}", args.rounds)
                )

        # AUTH=on beside AUTH=off: the key check must cost no database round trip.
        secret = create_api_key(config, f"bench-{uuid.uuid4().hex[:8]}", ApiKeyScope.READ)
        keyed = wrk.script("read_keyed", ids_script(ids, {"Authorization": f"Bearer {secret}"}))
        with (
            running_app(workdir / "off.log", {**env, "AUTH": "off"}) as auth_off,
            running_app(workdir / "on.log", {**env, "AUTH": "on"}) as auth_on,
        ):
            for target, url in (("app, AUTH=off", auth_off.url), ("app, AUTH=on", auth_on.url)):
                measurements += measure(
                    wrk, {target: url}, "GET /invoice/{id} (bearer key)", keyed, 32, args.rounds
                )

        # The metrics' cost: the same reads with METRICS=true (the default) and METRICS=false,
        # an even number of rounds so each goes first as often (the first run of a round is
        # the slower one on this machine, by up to a fifth).
        even_rounds = args.rounds + args.rounds % 2
        with (
            running_app(workdir / "metrics.log", {**env, "METRICS": "true"}) as metrics_on,
            running_app(workdir / "no-metrics.log", {**env, "METRICS": "false"}) as metrics_off,
        ):
            for connections in (1, 32):
                measurements += measure(
                    wrk,
                    {"app, METRICS=true": metrics_on.url, "app, METRICS=false": metrics_off.url},
                    "GET /invoice/{id} (metrics)",
                    read,
                    connections,
                    even_rounds,
                )

        with running_app(workdir / "app2.log", env, workers=2) as app2:
            time.sleep(2)  # both workers up
            measurements += measure(
                wrk, {"app, 2 workers": app2.url}, "GET /invoice/{id}", read, 32, args.rounds
            )
            rss["app (2 workers, per worker)"] = peak_rss_mib(app2.process)

        profile = profile_read(wrk, env, read, workdir, args.duration)
    report(measurements, rss, seed_rate, args)
    print(f"\n{profile}")


def profile_read(wrk: Wrk, env: dict[str, str], read: Path, workdir: Path, duration: int) -> str:
    """The app under pyinstrument while wrk reads invoices at c=32 (one run to warm up, one
    profiled in full): its call tree and the table of a read's parts, in bench/results."""
    session_path = workdir / "read.pyisession"
    with profiled_app(session_path, workdir / "profiled.log", env) as app:
        warm = wrk.run(app.url, read, 32)
        measured = wrk.run(app.url, read, 32)
    RESULTS.mkdir(parents=True, exist_ok=True)
    stem = RESULTS / f"{datetime.now(UTC).strftime('%Y-%m-%d')}-read-profile"
    requests = warm["requests"] + measured["requests"]
    print(f"profiled {requests} reads in {2 * duration} s", flush=True)
    return write_profile(session_path, stem, requests)


def timed_get(url: str, path: str, endpoint: str, rounds: int) -> Measurement:
    """One request at a time, timed: for pages too slow to load with wrk's clients."""
    seconds, errors = [], 0
    for _ in range(rounds):
        started = time.perf_counter()
        response = httpx.get(f"{url}{path}", timeout=300)
        seconds.append(time.perf_counter() - started)
        errors += response.status_code != httpx.codes.OK
    median = statistics.median(seconds)
    return Measurement("app", endpoint, 1, 1 / median, median * 1000, max(seconds) * 1000, errors)


def filtered_pages(wrk: Wrk, url: str, config: Settings, rounds: int) -> list[Measurement]:
    """Page 1, with its exact total, for one customer and for one day (the middle one)."""
    with admin_connection(config, config.db_name) as connection, connection.cursor() as cursor:
        cursor.execute(
            "SELECT customer_id FROM invoice GROUP BY customer_id ORDER BY COUNT(*) DESC LIMIT 1"
        )
        (customer_id,) = cursor.fetchone() or (1,)
        cursor.execute(
            "SELECT DATE(FROM_UNIXTIME("
            "(UNIX_TIMESTAMP(MIN(created_at)) + UNIX_TIMESTAMP(MAX(created_at))) / 2)) FROM invoice"
        )
        (day,) = cursor.fetchone() or (datetime.now(UTC).date(),)
    next_day = day + timedelta(days=1)
    results: list[Measurement] = []
    for endpoint, path in (
        ("GET /invoices?customerId= (busiest customer)", f"/invoices?customerId={customer_id}"),
        (
            "GET /invoices?createdFrom=&createdTo= (one day)",
            f"/invoices?createdFrom={day}&createdTo={next_day}",
        ),
    ):
        script = wrk.script(f"filter{len(results)}", get_script(path))
        results += measure(wrk, {"app": url}, endpoint, script, 1, rounds)
    return results


def find(measurements: list[Measurement], target: str, endpoint: str, c: int) -> Measurement:
    return next(
        m for m in measurements if (m.target, m.endpoint, m.connections) == (target, endpoint, c)
    )


def report(
    measurements: list[Measurement],
    rss: dict[str, float],
    seed_rate: float | None,
    args: argparse.Namespace,
) -> None:
    print(
        f"\n{'endpoint':42} {'c':>3} {'target':16} {'req/s':>9} {'p50 ms':>8} "
        f"{'p99 ms':>8} {'vs base':>8} {'errors':>6}"
    )
    for m in measurements:
        base = next(
            (
                b.req_per_s
                for b in measurements
                if (b.target, b.endpoint, b.connections) == (BASELINE, m.endpoint, m.connections)
            ),
            0.0,
        )
        ratio = f"{m.req_per_s / base:.2f}x" if base else ""
        print(
            f"{m.endpoint:42} {m.connections:>3} {m.target:16} {m.req_per_s:>9.0f} "
            f"{m.p50_ms:>8.2f} {m.p99_ms:>8.2f} {ratio:>8} {m.errors:>6}"
        )

    read, listing = "GET /invoice/{id}", "GET /invoices"

    def versus(target: str, endpoint: str, c: int, base: str = BASELINE) -> float:
        return find(measurements, target, endpoint, c).req_per_s / max(
            find(measurements, base, endpoint, c).req_per_s, 1e-9
        )

    ratios = {
        "read vs async baseline, c=1": versus("app", read, 1),
        "read vs async baseline, c=32": versus("app", read, 32),
        "list page 1 vs async baseline, c=1": versus("app", listing, 1),
        "list page 1 vs async baseline, c=32": versus("app", listing, 32),
        "sync baseline vs async baseline, read c=32": versus("baseline (sync)", read, 32),
        "read, 2 workers vs 1-worker async baseline, c=32": versus("app, 2 workers", read, 32),
        "pay flow vs minimal async, c=1": versus("app", PAY_FLOW, 1),
        "pay flow vs minimal async, c=8": versus("app", PAY_FLOW, 8),
        "read with AUTH=on vs AUTH=off, c=32": versus(
            "app, AUTH=on", "GET /invoice/{id} (bearer key)", 32, "app, AUTH=off"
        ),
        "read with metrics vs METRICS=false, c=1": versus(
            "app, METRICS=true", "GET /invoice/{id} (metrics)", 1, "app, METRICS=false"
        ),
        "read with metrics vs METRICS=false, c=32": versus(
            "app, METRICS=true", "GET /invoice/{id} (metrics)", 32, "app, METRICS=false"
        ),
        "pay flow vs FakePay alone, c=8": find(
            measurements, "app", "POST /invoice with card", 8
        ).req_per_s
        / find(measurements, "fakepay", "POST /fakepay", 8).req_per_s,
    }
    print()
    for name, value in ratios.items():
        print(f"{name:48} {value:.2f}")
    for name, value in rss.items():
        print(f"peak RSS {name:39} {value:.0f} MiB")
    if seed_rate is not None:
        print(f"{'seeding':48} {seed_rate:,.0f} rows/s")

    RESULTS.mkdir(parents=True, exist_ok=True)
    stamp = datetime.now(UTC).strftime("%Y-%m-%d")
    data = {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "rows": args.rows,
        "duration_s": args.duration,
        "rounds": args.rounds,
        "cores": os.cpu_count(),
        "seed_rows_per_s": seed_rate,
        "ratios": ratios,
        "peak_rss_mib": rss,
        "measurements": [asdict(m) for m in measurements],
    }
    (RESULTS / f"{stamp}.json").write_text(json.dumps(data, indent=2) + "\n")
    chart(measurements, RESULTS / f"{stamp}.png")
    print(f"\nwrote bench/results/{stamp}.json and bench/results/{stamp}.png")


if __name__ == "__main__":
    main()

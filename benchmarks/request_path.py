"""Request-path benchmark: what N signal emits cost a request, for each way of handling them.

    python benchmarks/request_path.py                 # in-process test client, then gunicorn
    python benchmarks/request_path.py --only inproc   # or: --only gunicorn [--with-worker]

Prints p50/p99 latency (us), requests/s, Redis round trips per request and the
ratios of p50 and p99 to the no-receiver baseline measured in the same run.
Under gunicorn, "cpu" is the worker process's CPU time per request (us, from
/proc: both its threads and the sender) and "trips" its sends (one RPUSH each, run by
its enqueue script) per request, as Redis counts them; "waiting", the jobs left in the queue at the end of the load.
With ``--with-worker`` one default ``worker.py`` drains the queue while the signal_queue
variants run, as in production: the sender then finds no jobs waiting and sends at once
(group commit) instead of lingering, which costs more sends; "cpu" counts gunicorn's
processes only, not the worker's.
In-process, requests/s (and "mean us", its inverse) count the time until the
last event is in Redis: the final flush is inside the elapsed time, so the
sender's work is included. Redis is a private redis-server on a free port.
Nothing here asserts a speed.
"""

from __future__ import annotations

import argparse
import http.client
import os
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import redis  # noqa: E402
from redis.connection import Connection  # noqa: E402

from benchmarks.apps import VARIANTS, flush, make_app  # noqa: E402
from devtools.redis_process import RedisProcess, free_port  # noqa: E402

ROUND_TRIPS = [0]
_send = Connection.send_packed_command


def _counting_send(self: Connection, *args: Any, **kwargs: Any) -> None:
    # A pipeline or a command is one send_packed_command: a round trip.
    ROUND_TRIPS[0] += 1
    _send(self, *args, **kwargs)


def percentile(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(len(values) * q))]


def bench_inproc(variant: str, n: int, url: str, requests: int) -> dict[str, float]:
    app = make_app(variant, n, url)
    client = app.test_client()
    for i in range(200):
        client.get(f"/orders/{i}?user=alice", buffered=True)
    flush(app)
    Connection.send_packed_command = _counting_send  # type: ignore[method-assign]
    ROUND_TRIPS[0] = 0
    times = []
    started = time.perf_counter()
    for i in range(requests):
        t = time.perf_counter()
        # buffered=True closes the response, so work run on close is in the latency
        client.get(f"/orders/{i}?user=alice", buffered=True)
        times.append(time.perf_counter() - t)
    flush(app)  # the sender's work and round trips count too
    elapsed = time.perf_counter() - started
    trips = ROUND_TRIPS[0]
    Connection.send_packed_command = _send  # type: ignore[method-assign]
    return {
        "p50": percentile(times, 0.5) * 1e6,
        "p99": percentile(times, 0.99) * 1e6,
        "rps": requests / elapsed,
        "mean": elapsed / requests * 1e6,
        "trips": trips / requests,
    }


def load(port: int, seconds: float, clients: int) -> tuple[list[float], int]:
    """Keep-alive HTTP clients on loopback for ``seconds``; bounded in time and count."""
    times: list[float] = []
    errors = [0]
    stop = time.monotonic() + seconds
    lock = threading.Lock()

    def client(k: int) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        mine = []
        i = 0
        while time.monotonic() < stop and i < 200_000:
            i += 1
            t = time.perf_counter()
            conn.request("GET", f"/orders/{i}?user=u{k}")
            response = conn.getresponse()
            response.read()
            if response.status != 200:
                errors[0] += 1
            mine.append(time.perf_counter() - t)
        conn.close()
        with lock:
            times.extend(mine)

    threads = [threading.Thread(target=client, args=(k,)) for k in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return times, errors[0]


def bench_gunicorn(
    variant: str, n: int, url: str, seconds: float, clients: int, with_worker: bool = False
) -> dict[str, float]:
    port = free_port()
    env = dict(os.environ, BENCH_VARIANT=variant, BENCH_N=str(n), SIGNAL_QUEUE_REDIS_URL=url, PYTHONPATH=str(ROOT))
    worker = None
    if with_worker and variant.startswith("signal_queue"):
        # One default worker drains the queue during the load, as in production: the sender
        # then sees no jobs waiting (its group-commit regime) instead of a growing backlog.
        worker = subprocess.Popen(
            [sys.executable, "worker.py", "--app", "benchmarks.apps:env_app()", "--logging-level", "WARNING"],
            cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
    server = subprocess.Popen(
        [sys.executable, "-m", "gunicorn", "--bind", f"127.0.0.1:{port}", "--workers", "1", "--threads", "4",
         "--worker-class", "gthread", "--log-level", "warning", "benchmarks.apps:env_app()"],
        cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                c = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
                c.request("GET", "/orders/0")
                c.getresponse().read()
                break
            except OSError:
                if time.monotonic() > deadline or server.poll() is not None:
                    raise SystemExit(f"gunicorn did not start for {variant}") from None
                time.sleep(0.05)
        load(port, 1.0, clients)  # warm up
        sends, cpu = redis_sends(url), process_cpu(server.pid)
        times, errors = load(port, seconds, clients)
        sends, cpu = redis_sends(url) - sends, process_cpu(server.pid) - cpu
        waiting = redis.Redis.from_url(url).llen("rq:queue:signals")
    finally:
        server.terminate()
        server.wait(timeout=30)
        if worker is not None:
            worker.terminate()
            try:
                worker.wait(timeout=30)
            except subprocess.TimeoutExpired:
                worker.kill()
                worker.wait()
    return {
        "p50": percentile(times, 0.5) * 1e6,
        "p99": percentile(times, 0.99) * 1e6,
        "rps": len(times) / seconds,
        "trips": sends / max(1, len(times)),
        "cpu": cpu / max(1, len(times)) * 1e6,
        "errors": errors,
        "waiting": waiting,
    }


def process_cpu(master: int) -> float:
    """CPU seconds (user + system) of the gunicorn master's worker processes, from /proc."""
    ticks = os.sysconf("SC_CLK_TCK")
    total = 0.0
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as stat:
                fields = stat.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == master:  # ppid
            total += (int(fields[11]) + int(fields[12])) / ticks  # utime, stime
    return total


def redis_sends(url: str) -> int:
    """The app's sends Redis has run: each is one round trip (one script), with one RPUSH per queue."""
    stats = redis.Redis.from_url(url).info("commandstats")
    return int(stats.get("cmdstat_rpush", {}).get("calls", 0))


def medians(runs: list[tuple[str, int, dict[str, float]]]) -> list[tuple[str, int, dict[str, float]]]:
    """One row per (variant, N), in first-seen order: each figure the median of its runs."""
    grouped: dict[tuple[str, int], list[dict[str, float]]] = {}
    for variant, n, result in runs:
        grouped.setdefault((variant, n), []).append(result)
    return [
        (variant, n, {k: statistics.median(r[k] for r in results) for k in results[0]})
        for (variant, n), results in grouped.items()
    ]


def table(title: str, rows: list[tuple[str, int, dict[str, float]]]) -> None:
    """One line per variant, with its p50, p99 and req/s as ratios of the baseline's (same N, same run)."""
    base = {n: r for v, n, r in rows if v == "baseline"}
    print(f"\n{title}")
    cols = (f"{'variant':30} {'N':>2} {'p50 us':>9} {'p99 us':>9} {'req/s':>8} {'p50/base':>9} {'p99/base':>9} "
            f"{'rps/base':>9}")
    extra = [k for k in ("mean", "cpu", "trips", "errors", "waiting") if k in rows[0][2]]
    print(cols + "".join(f" {k:>7}" for k in extra))
    for variant, n, r in rows:
        b = base[n]
        line = (f"{variant:30} {n:>2} {r['p50']:9.0f} {r['p99']:9.0f} {r['rps']:8.0f} {r['p50'] / b['p50']:8.2f}x "
                f"{r['p99'] / b['p99']:8.2f}x {r['rps'] / b['rps']:8.2f}x")
        print(line + "".join(f" {r[k]:7.2f}" for k in extra))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", choices=["inproc", "gunicorn"])
    parser.add_argument("--requests", type=int, default=3000, help="in-process requests per variant")
    parser.add_argument("--seconds", type=float, default=4.0, help="gunicorn load seconds per variant")
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--variants", nargs="*", default=list(VARIANTS))
    parser.add_argument("--n", type=int, nargs="*", default=[1, 5], help="emits per request")
    parser.add_argument("--with-worker", action="store_true",
                        help="gunicorn: one worker.py drains the queue during the signal_queue variants' load")
    parser.add_argument("--rounds", type=int, default=1,
                        help="runs per variant, interleaved; each figure is the median over the rounds")
    args = parser.parse_args()
    if "baseline" not in args.variants:
        args.variants.insert(0, "baseline")

    server = RedisProcess()
    server.start()
    try:
        if args.only in (None, "inproc"):
            runs: list[tuple[str, int, dict[str, float]]] = []
            for _ in range(args.rounds):
                for n in args.n:
                    for variant in args.variants:
                        requests = max(50, args.requests // 60) if variant == "inline_20ms" else args.requests
                        runs.append((variant, n, bench_inproc(variant, n, server.url, requests)))
                        redis.Redis.from_url(server.url).flushall()
            rows = medians(runs)
            base = {n: r["p50"] for v, n, r in rows if v == "baseline"}
            table("In-process (Flask test client; latency includes what runs on response close; req/s and "
                  "mean us include the final flush)", rows)
            sq = {n: r["p50"] for v, n, r in rows if v == "signal_queue"}
            for other in ("naive_enqueue", "celery_delay"):
                o = {n: r["p50"] for v, n, r in rows if v == other}
                for n in sq:
                    if n in o:
                        per_emit_sq = (sq[n] - base[n]) / n
                        per_emit_other = (o[n] - base[n]) / n
                        print(f"per emit, N={n}: signal_queue {per_emit_sq:.1f} us, {other} {per_emit_other:.1f} us "
                              f"({per_emit_other / max(per_emit_sq, 0.01):.0f}x)")
        if args.only in (None, "gunicorn"):
            runs = []
            for _ in range(args.rounds):
                for n in args.n:
                    for variant in args.variants:
                        runs.append((variant, n, bench_gunicorn(variant, n, server.url, args.seconds, args.clients,
                                                                   args.with_worker)))
                        redis.Redis.from_url(server.url).flushall()
            rows = medians(runs)
            drained = ", one worker.py draining the queue (signal_queue variants)" if args.with_worker else ""
            table(f"gunicorn gthread (1 worker, 4 threads), {args.clients} keep-alive clients on loopback{drained}",
                  rows)
    finally:
        server.stop()
    print(f"\nmachine: {os.cpu_count()} cores, Python {sys.version.split()[0]}, load average "
          f"{os.getloadavg()[0]:.1f}; median of {args.rounds} interleaved run(s) per variant")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Request-path benchmark: what N signal emits cost a request, for each way of handling them.

    python benchmarks/request_path.py                 # in-process test client, then gunicorn
    python benchmarks/request_path.py --only inproc   # or: --only gunicorn

Prints p50/p99 latency (us), requests/s, Redis round trips per request and the
ratio of p50 to the no-receiver baseline measured in the same run. Redis is a
private redis-server on a free port. Nothing here asserts a speed.
"""

from __future__ import annotations

import argparse
import http.client
import os
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

from benchmarks.apps import VARIANTS, make_app  # noqa: E402
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
    state = app.extensions.get("signal_queue")
    if state is not None:
        state.outbox.flush()
    Connection.send_packed_command = _counting_send  # type: ignore[method-assign]
    ROUND_TRIPS[0] = 0
    times = []
    started = time.perf_counter()
    for i in range(requests):
        t = time.perf_counter()
        # buffered=True closes the response, so work run on close is in the latency
        client.get(f"/orders/{i}?user=alice", buffered=True)
        times.append(time.perf_counter() - t)
    elapsed = time.perf_counter() - started
    if state is not None:
        state.outbox.flush()  # the sender's round trips count too
    trips = ROUND_TRIPS[0]
    Connection.send_packed_command = _send  # type: ignore[method-assign]
    return {
        "p50": percentile(times, 0.5) * 1e6,
        "p99": percentile(times, 0.99) * 1e6,
        "rps": requests / elapsed,
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


def bench_gunicorn(variant: str, n: int, url: str, seconds: float, clients: int) -> dict[str, float]:
    port = free_port()
    env = dict(os.environ, BENCH_VARIANT=variant, BENCH_N=str(n), SIGNAL_QUEUE_REDIS_URL=url, PYTHONPATH=str(ROOT))
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
        times, errors = load(port, seconds, clients)
    finally:
        server.terminate()
        server.wait(timeout=30)
    return {
        "p50": percentile(times, 0.5) * 1e6,
        "p99": percentile(times, 0.99) * 1e6,
        "rps": len(times) / seconds,
        "errors": errors,
    }


def table(title: str, rows: list[tuple[str, int, dict[str, float]]], baseline: dict[int, float]) -> None:
    print(f"\n{title}")
    cols = f"{'variant':30} {'N':>2} {'p50 us':>9} {'p99 us':>9} {'req/s':>8} {'p50/base':>9}"
    extra = [k for k in ("trips", "errors") if k in rows[0][2]]
    print(cols + "".join(f" {k:>7}" for k in extra))
    for variant, n, r in rows:
        line = f"{variant:30} {n:>2} {r['p50']:9.0f} {r['p99']:9.0f} {r['rps']:8.0f} {r['p50'] / baseline[n]:8.2f}x"
        print(line + "".join(f" {r[k]:7.2f}" for k in extra))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", choices=["inproc", "gunicorn"])
    parser.add_argument("--requests", type=int, default=3000, help="in-process requests per variant")
    parser.add_argument("--seconds", type=float, default=4.0, help="gunicorn load seconds per variant")
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--variants", nargs="*", default=list(VARIANTS))
    args = parser.parse_args()
    if "baseline" not in args.variants:
        args.variants.insert(0, "baseline")

    server = RedisProcess()
    server.start()
    try:
        if args.only in (None, "inproc"):
            rows = []
            for n in (1, 5):
                for variant in args.variants:
                    if variant == "inline_20ms":
                        result = bench_inproc(variant, n, server.url, max(50, args.requests // 60))
                    else:
                        result = bench_inproc(variant, n, server.url, args.requests)
                    rows.append((variant, n, result))
                    redis.Redis.from_url(server.url).flushall()
            base = {n: r["p50"] for v, n, r in rows if v == "baseline"}
            table("In-process (Flask test client; latency includes what runs on response close)", rows, base)
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
            rows = []
            for n in (1, 5):
                for variant in args.variants:
                    rows.append((variant, n, bench_gunicorn(variant, n, server.url, args.seconds, args.clients)))
                    redis.Redis.from_url(server.url).flushall()
            base = {n: r["p50"] for v, n, r in rows if v == "baseline"}
            table(f"gunicorn gthread (1 worker, 4 threads), {args.clients} keep-alive clients on loopback", rows, base)
    finally:
        server.stop()
    print(f"\nmachine: {os.cpu_count()} cores, Python {sys.version.split()[0]}; one run per variant")
    return 0


if __name__ == "__main__":
    sys.exit(main())

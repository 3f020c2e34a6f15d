"""Delivery lag: from the emit to the handler's start, at steady rates, one app process and one worker.

    python benchmarks/delivery_lag.py [--rates 10 100 1000 5000 10000] [--seconds 3]

The app (``benchmarks/lag_app.py``, default configuration) runs in this
process and emits at a steady rate, inside a request context, 5 events per
request; one default worker (``worker.py``, its own process) runs the
receiver, which notes ``time.time() - sent_at``. For each rate: p50, p99 and
max lag, the rate actually reached, and how long the worker took to finish
after the last emit (a worker that keeps up finishes at once). The lag is
split in two, event by event: the app's part (emit to its batch being in Redis:
the sender's send returned, noted by a wrapper around ``Dispatcher.send``) and the
rest (Redis to the handler's start: the worker's part). After each rate, the same
rate goes through ``benchmarks/lag_floor.py`` (the same hops, with no work: a
sender thread, Redis, a worker process and its child), and the ratio of the two
medians is printed: what is signal_queue's and what is this machine's cost of
waking its hops. Nothing here asserts a speed.

The receiver notes its lag with one append to a local file (``--report file``,
the default), read at the end of each rate, so the benchmark measures
signal_queue rather than itself; ``--report redis`` pushes each lag to a Redis
list instead (one round trip per event, as earlier versions of this benchmark
did, which about doubled a trivial event's work in the worker). The worker runs
at its default log level (INFO) unless ``--logging-level`` says otherwise; its
log goes to /dev/null.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from devtools.redis_process import RedisProcess  # noqa: E402

server = RedisProcess()
server.start()
os.environ["SIGNAL_QUEUE_REDIS_URL"] = server.url
LAG_FILE = Path(tempfile.mkdtemp(prefix="sq-lag-")) / "lags"
if "--report" not in sys.argv or sys.argv[sys.argv.index("--report") + 1:][:1] != ["redis"]:
    os.environ["SIGNAL_QUEUE_BENCH_LAG_FILE"] = str(LAG_FILE)
ENV = dict(os.environ, PYTHONPATH=str(ROOT))

import redis  # noqa: E402

from benchmarks import lag_app  # noqa: E402
from benchmarks.lag_floor import FloorSender  # noqa: E402

PER_REQUEST = 5


def percentile(values: list[float], q: float) -> float:
    return values[min(len(values) - 1, int(len(values) * q))]


#: Event id -> seconds from its emit to the end of the send that carried it (the app's part of the lag).
SENT: dict[str, float] = {}
#: Batch jobs sent at this rate.
JOBS = [0]


def note_sends() -> None:
    """Wrap the app's Dispatcher.send to note when each event's batch is in Redis."""
    dispatcher = lag_app.app.extensions["signal_queue"].dispatcher
    send = dispatcher.send

    def noted(batches: Any) -> None:
        send(batches)
        now = time.time()
        JOBS[0] += len(batches)
        for b in batches:
            for event in json.loads(b.args)[0]:
                SENT[event["id"]] = now - event["kwargs"]["sent_at"]

    dispatcher.send = noted


def reported(conn: redis.Redis) -> int:
    """How many lags the receiver noted so far."""
    if lag_app.LAG_FILE:
        with open(lag_app.LAG_FILE, "rb") as f:
            return f.read().count(b"\n")
    return int(conn.llen(lag_app.LAGS))


def lags_ms(conn: redis.Redis) -> dict[str, float]:
    """Event id -> ms from its emit to its handler's start."""
    if lag_app.LAG_FILE:
        with open(lag_app.LAG_FILE, "rb") as f:
            lines = f.read().splitlines()
    else:
        lines = conn.lrange(lag_app.LAGS, 0, -1)
    return {event_id.decode(): float(lag) * 1000 for lag, event_id in (line.split() for line in lines)}


def paced(rate: float, seconds: float, emit_request: Callable[[int], None]) -> tuple[int, float]:
    """Call ``emit_request(i)`` (5 emits) at ``rate`` events/s for ``seconds``; (events, rate reached)."""
    total = max(PER_REQUEST * 10, int(rate * seconds)) // PER_REQUEST * PER_REQUEST
    interval = PER_REQUEST / rate  # one request's 5 emits together, as a view sends them
    start = time.perf_counter()
    for i in range(total // PER_REQUEST):
        due = start + i * interval
        while (ahead := due - time.perf_counter()) > 0:
            if ahead > 0.002:
                time.sleep(ahead - 0.001)
        emit_request(i)
    return total, total / (time.perf_counter() - start)


def wait_reported(conn: redis.Redis, total: int, rate: float) -> None:
    deadline = time.monotonic() + 120
    while reported(conn) < total:
        if time.monotonic() > deadline:
            raise SystemExit(f"at {rate}/s not every event ran: {reported(conn)} of {total}")
        time.sleep(0.001)


def start_afresh(conn: redis.Redis) -> None:
    conn.delete(lag_app.LAGS)
    if lag_app.LAG_FILE:
        open(lag_app.LAG_FILE, "wb").close()  # the handler appends (O_APPEND): truncating starts afresh


def run_rate(conn: redis.Redis, rate: float, seconds: float) -> dict[str, float]:
    start_afresh(conn)
    SENT.clear()
    JOBS[0] = 0

    def emit_request(i: int) -> None:
        with lag_app.app.test_request_context(f"/orders/{i}?user=alice", headers={"User-Agent": "bench"}):
            for _ in range(PER_REQUEST):
                lag_app.tick.send("bench", sent_at=time.time())

    with lag_app.app.app_context():
        total, reached = paced(rate, seconds, emit_request)
    emitted = time.perf_counter()
    wait_reported(conn, total, rate)
    finished = time.perf_counter()
    by_event = lags_ms(conn)
    lags = sorted(by_event.values())
    app_part = sorted(x * 1000 for x in SENT.values())
    worker_part = sorted(lag - SENT[event_id] * 1000 for event_id, lag in by_event.items() if event_id in SENT)
    return {
        "events": total, "reached": reached, "p50": percentile(lags, 0.5),
        "p99": percentile(lags, 0.99), "max": lags[-1], "tail_s": finished - emitted,
        "app_p50": percentile(app_part, 0.5), "app_p99": percentile(app_part, 0.99),
        "worker_p50": percentile(worker_part, 0.5), "worker_p99": percentile(worker_part, 0.99),
        "per_job": total / max(1, JOBS[0]),
    }


def run_floor(conn: redis.Redis, emitter: FloorSender, rate: float, seconds: float) -> dict[str, float]:
    """The same rate through :mod:`benchmarks.lag_floor`'s hops (no work): the machine's floor."""
    start_afresh(conn)

    def emit_request(i: int) -> None:
        for k in range(PER_REQUEST):
            emitter.emit(f"{i}-{k}")

    total, reached = paced(rate, seconds, emit_request)
    emitted = time.perf_counter()
    wait_reported(conn, total, rate)
    finished = time.perf_counter()
    lags = sorted(lags_ms(conn).values())
    return {"events": total, "reached": reached, "p50": percentile(lags, 0.5), "p99": percentile(lags, 0.99),
            "max": lags[-1], "tail_s": finished - emitted}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rates", type=float, nargs="*", default=[10, 100, 1000, 5000, 10000])
    parser.add_argument("--seconds", type=float, default=3.0, help="seconds of emits per rate (at least 50 events)")
    parser.add_argument("--logging-level", default="INFO", help="the worker's (its default: INFO)")
    parser.add_argument("--report", choices=("file", "redis"), default="file",
                        help="how the receiver notes its lag: an append to a local file, or an RPUSH to Redis")
    args = parser.parse_args()
    conn = redis.Redis.from_url(server.url)
    worker = subprocess.Popen(
        [sys.executable, "worker.py", "--app", "benchmarks.lag_app:app", "--logging-level", args.logging_level],
        cwd=ROOT, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    floor = emitter = None
    if lag_app.LAG_FILE:  # the floor's child notes its lags in the same file
        floor = subprocess.Popen([sys.executable, "benchmarks/lag_floor.py", "--worker", server.url, lag_app.LAG_FILE],
                                 cwd=ROOT, env=ENV)
        emitter = FloorSender(server.url)
    rows = []
    try:
        deadline = time.monotonic() + 30
        while conn.scard("rq:workers") == 0:
            if time.monotonic() > deadline or worker.poll() is not None:
                raise SystemExit("the worker did not start")
            time.sleep(0.05)
        note_sends()
        run_rate(conn, 200, 0.5)  # warm up both sides
        if emitter is not None:
            run_floor(conn, emitter, 200, 0.5)
        for rate in args.rates:
            # Each rate through signal_queue, then through the floor's hops, one after the other.
            rows.append((rate, run_rate(conn, rate, args.seconds),
                         None if emitter is None else run_floor(conn, emitter, rate, args.seconds)))
    finally:
        for process in (worker, floor):
            if process is not None:
                process.terminate()
                process.wait(timeout=30)
        server.stop()
        shutil.rmtree(LAG_FILE.parent, ignore_errors=True)
    print(f"\n{'rate/s':>8} {'reached/s':>10} {'events':>7} {'p50 ms':>8} {'p99 ms':>8} {'max ms':>8} "
          f"{'drain after s':>14} {'app p50':>8} {'app p99':>8} {'wkr p50':>8} {'wkr p99':>8} {'events/job':>11} "
          f"{'floor p50':>10} {'floor p99':>10} {'p50/floor':>10}")
    for rate, r, f in rows:
        print(f"{rate:8.0f} {r['reached']:10.0f} {r['events']:7.0f} {r['p50']:8.2f} {r['p99']:8.2f} "
              f"{r['max']:8.2f} {r['tail_s']:14.3f} {r['app_p50']:8.2f} {r['app_p99']:8.2f} {r['worker_p50']:8.2f} "
              f"{r['worker_p99']:8.2f} {r['per_job']:11.1f}" + (
                  "" if f is None else f" {f['p50']:10.2f} {f['p99']:10.2f} {r['p50'] / f['p50']:9.2f}x"))
    print(f"\none app process (this one), one worker (--logging-level {args.logging_level}); lags noted "
          f"by {'a local file' if lag_app.LAG_FILE else 'RPUSH to Redis'}; {PER_REQUEST} emits per request; "
          f"{os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f}")
    if any(f is not None for _, _, f in rows):
        print("floor: the same rates through benchmarks/lag_floor.py, the same hops (a sender thread, Redis, a "
              "worker process and its child) with no work: this machine's cost of waking them")
    return 0


if __name__ == "__main__":
    sys.exit(main())

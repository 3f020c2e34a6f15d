"""Redis memory: bytes per event waiting in the queue, and per handled event still held afterwards.

    python benchmarks/redis_memory.py [--events 20000] [--rate 0 | --per-job K] [--after 60]

A private redis-server; the app of :mod:`benchmarks.memory_app` (Flask-Login
user, ten request headers, a path with a query string) serves ``--events``
requests with the Flask test client, each sending one deferred signal, at
``--rate`` requests per second (0: as fast as one thread goes), with no worker
running. How many events a batch job carries depends on how many a process
gathers per send (its rate times ``SIGNAL_QUEUE_LINGER``, 10 ms): ``--per-job K``
makes every job carry K events whatever this machine's speed, as a process
gathering K events per send does (``SIGNAL_QUEUE_BATCH_SIZE=K``, a linger of
10 s, and the benchmark sends after every K requests). Then:

1. waiting: Redis's ``used_memory`` over the empty baseline, per event, and the
   keys by kind (``MEMORY USAGE ... SAMPLES 0`` summed per key pattern);
2. handled: a real worker (``worker.py``, its own process, default settings)
   runs the backlog; ``--after`` seconds after the last event was handled,
   with the worker still running, what is left over the baseline, per event,
   and the keys by kind with their TTLs.

The private Redis runs with ``latency-tracking no``: Redis 7's per-command
latency histograms (~20 KiB per command name, made at its first call and kept)
would count a constant ~1 MB as if events held it. No assertion: the figures go
to benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from devtools.redis_process import RedisProcess  # noqa: E402

QUEUE = "rq:queue:signals"
# A key name's parts that vary per job, batch, event or worker process: shown as *.
_VARYING = re.compile(r"^(sqb)?[0-9a-f]{16,}$|^[0-9a-f]{32}$|.*\d{3,}.*")


def pattern(key: str) -> str:
    """``rq:job:sqb1234...`` -> ``rq:job:*``: the key's kind, for the breakdown."""
    parts = key.split(":")
    return ":".join("*" if i > 1 and _VARYING.match(part) else part for i, part in enumerate(parts))


def breakdown(conn: Any) -> dict[str, list[int]]:
    """Key pattern -> [keys, bytes (MEMORY USAGE, every element counted), least TTL, most TTL]."""
    kinds: dict[str, list[int]] = defaultdict(lambda: [0, 0, 1 << 62, -(1 << 62)])
    keys = [k.decode() for k in conn.scan_iter(count=1000)]
    for start in range(0, len(keys), 500):
        chunk = keys[start : start + 500]
        with conn.pipeline(transaction=False) as pipe:
            for key in chunk:
                pipe.memory_usage(key, samples=0)
                pipe.ttl(key)
            replies = pipe.execute()
        for i, key in enumerate(chunk):
            size, ttl = replies[2 * i], replies[2 * i + 1]
            if size is None:  # expired between SCAN and MEMORY USAGE
                continue
            row = kinds[pattern(key)]
            row[0] += 1
            row[1] += size
            row[2] = min(row[2], ttl)
            row[3] = max(row[3], ttl)
    return dict(kinds)


def show(kinds: dict[str, list[int]], events: int) -> None:
    print(f"    {'key pattern':<34}{'keys':>8}{'bytes':>12}{'B/event':>10}   TTL s (-1: none)")
    for name, (count, size, low, high) in sorted(kinds.items(), key=lambda kv: -kv[1][1]):
        ttl = str(low) if low == high else f"{low}..{high}"
        print(f"    {name:<34}{count:>8}{size:>12}{size / events:>10.1f}   {ttl}")
    total = sum(row[1] for row in kinds.values())
    print(f"    {'all keys':<34}{sum(r[0] for r in kinds.values()):>8}{total:>12}{total / events:>10.1f}")


def used(conn: Any) -> int:
    return int(conn.info("memory")["used_memory"])


def wait_for(what: str, check: Any, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise SystemExit(f"timed out waiting for {what}")
        time.sleep(0.05)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--events", type=int, default=20_000, help="requests, one event each (e.g. 200000)")
    parser.add_argument("--rate", type=float, default=0, help="requests per second (0: as fast as it goes)")
    parser.add_argument("--per-job", type=int, default=0, help="events per batch job (0: as the default settings "
                                                                 "make them at this rate)")
    parser.add_argument("--after", type=float, default=60, help="seconds to wait after the last event was handled")
    args = parser.parse_args()
    if args.per_job:
        os.environ.update(SIGNAL_QUEUE_BATCH_SIZE=str(args.per_job), SIGNAL_QUEUE_LINGER="10")

    # Redis 7 keeps a latency histogram per command name (~20 KiB each, made at its first call, kept
    # for good): a constant, not memory the events hold, so it is turned off here.
    server = RedisProcess(args=("--latency-tracking", "no"))
    server.start()
    os.environ["SIGNAL_QUEUE_REDIS_URL"] = server.url
    import redis

    from benchmarks import memory_app

    conn = redis.Redis.from_url(server.url)
    worker: subprocess.Popen[bytes] | None = None
    try:
        app = memory_app.app
        state = app.extensions["signal_queue"]
        client = app.test_client()
        version = conn.info("server")["redis_version"]
        baseline = used(conn)

        started = time.perf_counter()
        for i in range(args.events):
            if args.rate > 0:
                delay = started + i / args.rate - time.perf_counter()
                if delay > 0:
                    time.sleep(delay)
            client.set_cookie("session", memory_app.cookie(i))
            response = client.get(memory_app.path(i), headers=memory_app.headers(i))
            if response.status_code != 200:
                raise SystemExit(f"request {i}: {response.status}")
            if args.per_job and (i + 1) % args.per_job == 0:
                state.outbox.flush()  # a send of K events: one job
        state.outbox.flush()
        emitted = time.perf_counter() - started
        wait_for("the events to reach Redis", lambda: int(conn.hget("sq:stats", "enqueued") or 0) >= args.events, 60)
        jobs = int(conn.llen(QUEUE))
        waiting = used(conn) - baseline
        print(f"redis {version}; {args.events} events in {emitted:.1f} s "
              f"({args.events / emitted:.0f}/s{', paced' if args.rate else ''}), in {jobs} batch jobs "
              f"({args.events / max(jobs, 1):.1f} events per job)")
        print(f"waiting: used_memory +{waiting} B = {waiting / args.events:.1f} B per waiting event")
        show(breakdown(conn), args.events)
        sample = conn.lindex(QUEUE, jobs // 2)
        if isinstance(sample, bytes):
            key = f"rq:job:{sample.decode()}"
            fields = conn.hgetall(key)
            print(f"    a job in the middle of the queue: MEMORY USAGE {conn.memory_usage(key, samples=0)} B, "
                  f"{len(fields)} fields, data {len(fields.get(b'data', b''))} B (zlib), encoding "
                  f"{conn.object('encoding', key).decode()}")

        env = dict(os.environ, PYTHONPATH=str(ROOT), SIGNAL_QUEUE_REDIS_URL=server.url)
        worker = subprocess.Popen(
            [sys.executable, "worker.py", "--app", "benchmarks.memory_app:app", "--logging-level", "WARNING"],
            cwd=ROOT, env=env,
        )
        started = time.perf_counter()
        wait_for("the worker to handle every event",
                 lambda: int(conn.hget("sq:stats", "handled") or 0) >= args.events and not conn.llen(QUEUE), 1800)
        print(f"handled by one worker in {time.perf_counter() - started:.1f} s; waiting {args.after:.0f} s")
        time.sleep(args.after)  # the figure is what is left after this long: real time is the point
        held = used(conn) - baseline
        print(f"handled, {args.after:.0f} s later (worker running): used_memory +{held} B = "
              f"{held / args.events:.1f} B per handled event")
        show(breakdown(conn), args.events)
    finally:
        if worker is not None:
            worker.send_signal(signal.SIGTERM)
            worker.wait(timeout=60)
        state.outbox.close()
        server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""App-process CPU per deferred event: the request thread and the sender thread together.

    python benchmarks/emit_cpu.py [--requests 10000] [--n 5] [--rounds 3]

Runs the benchmark app's view (``benchmarks/apps.py``) through the Flask test
client, ``--requests`` times with N emits each, and reads the process's CPU
time (``getrusage(RUSAGE_SELF)``: every thread) around the loop plus the final
flush, so the sender's work is counted. The same loop on the no-receiver
baseline, in the same run, is subtracted:

    CPU per event = (CPU(signal_queue) - CPU(baseline)) / (requests * N)

The request thread's own share (``time.thread_time``) is printed beside it.
Each round runs every variant once, one after the other; each round's figure
is taken against that round's baseline, and the median of the rounds is shown
with their range (on a noisy machine the lowest figure of each variant alone
could pair a disturbed baseline with a quiet variant). ``floor_bridge`` is the
least a thread-based bridge does (``benchmarks/apps.py`` ``FloorBridge``): what
any design of this shape pays on this machine. Nothing here asserts a speed.
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import redis  # noqa: E402

from benchmarks.apps import flush, make_app  # noqa: E402
from devtools.redis_process import RedisProcess  # noqa: E402
from signal_queue import SignalQueue  # noqa: E402

#: What each round runs: the baseline (no receiver), signal_queue, the inline append it replaces, and the
#: floor of a thread-based bridge in Python (benchmarks/apps.py FloorBridge: what any design like ours pays).
VARIANTS = ("baseline", "signal_queue", "inline_append", "floor_bridge")


def cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def run(variant: str, n: int, url: str, requests: int) -> tuple[float, float, float]:
    """(process CPU s, request-thread CPU s, wall s) for ``requests`` requests of ``variant``."""
    app = make_app(variant, n, url)
    client = app.test_client()
    state = app.extensions.get("signal_queue")
    for i in range(300):  # warm up: the sender thread, connections, caches
        client.get(f"/orders/{i}?user=alice", buffered=True)
    flush(app)
    start_cpu, start_thread, start_wall = cpu(), time.thread_time(), time.perf_counter()
    for i in range(requests):
        client.get(f"/orders/{i}?user=alice", buffered=True)
    thread = time.thread_time() - start_thread
    flush(app)
    if state is not None:
        # the sender may still be between its take and its send: wait until Redis has them all
        conn = redis.Redis.from_url(url)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and int(conn.hget("sq:stats", "enqueued") or 0) < (requests + 300) * n:
            time.sleep(0.001)
    result = cpu() - start_cpu, thread, time.perf_counter() - start_wall
    if state is not None:
        SignalQueue.close(app)
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=10_000)
    parser.add_argument("--n", type=int, default=5, help="emits per request")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    server = RedisProcess()
    server.start()
    try:
        rounds: list[dict[str, tuple[float, float, float]]] = []
        for _ in range(args.rounds):
            got: dict[str, tuple[float, float, float]] = {}
            for variant in VARIANTS:
                redis.Redis.from_url(server.url).flushall()
                got[variant] = run(variant, args.n, server.url, args.requests)
            rounds.append(got)
    finally:
        server.stop()
    events = args.requests * args.n
    print(f"{args.requests} requests x {args.n} emits = {events} events; median of {args.rounds} rounds "
          "(each against its own round's baseline), range in brackets")
    print(f"{'variant':16} {'CPU s':>7} {'us/request':>11} {'us/event (minus baseline)':>34} {'request thread':>24}")
    for variant in VARIANTS:
        totals = [r[variant][0] for r in rounds]
        per_event = [(r[variant][0] - r["baseline"][0]) / events * 1e6 for r in rounds]
        thread = [(r[variant][1] - r["baseline"][1]) / events * 1e6 for r in rounds]
        print(f"{variant:16} {statistics.median(totals):7.2f} {statistics.median(totals) / args.requests * 1e6:11.1f} "
              f"{statistics.median(per_event):10.2f} [{min(per_event):.2f}..{max(per_event):.2f}]{'':>8} "
              f"{statistics.median(thread):8.2f} [{min(thread):.2f}..{max(thread):.2f}]")
    print(f"\nmachine: {os.cpu_count()} cores, Python {sys.version.split()[0]}, "
          f"load average {os.getloadavg()[0]:.1f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

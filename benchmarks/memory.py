"""Memory: RSS of the app process over 100,000 deferred emits, with Redis up and during an outage.

    python benchmarks/memory.py [--emits 100000]

Redis up: RSS after the emits (sent, collected) must stay near the start.
Redis down: events wait in the outbox, bounded by SIGNAL_QUEUE_MAX_PENDING,
and the excess is dropped (counted); the growth is the outbox's size.
"""

from __future__ import annotations

import argparse
import gc
import logging
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.apps import make_app  # noqa: E402
from devtools.redis_process import RedisProcess, free_port  # noqa: E402


def rss_mib() -> float:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


def run(app_url: str, emits: int, rounds: int, per_request: int = 5) -> tuple[list[float], int, dict[str, int]]:
    """RSS before, then after each round of ``emits``; and the peak outbox depth seen."""
    app = make_app("signal_queue", per_request, app_url)
    state = app.extensions["signal_queue"]
    client = app.test_client()
    for i in range(200):
        client.get(f"/orders/{i}", buffered=True)
    state.outbox.flush()
    gc.collect()
    rss = [rss_mib()]
    peak = 0
    for _ in range(rounds):
        for i in range(emits // per_request):
            client.get(f"/orders/{i}", buffered=True)
            if i % 500 == 0:
                peak = max(peak, state.outbox.pending)
        state.outbox.flush()
        gc.collect()
        rss.append(rss_mib())
    return rss, peak, dict(state.dispatcher.counters)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--emits", type=int, default=100_000)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    server = RedisProcess()
    server.start()
    try:
        started = time.perf_counter()
        rss, peak, counters = run(server.url, args.emits, args.rounds)
        print(f"Redis up: {args.rounds} x {args.emits} emits in {time.perf_counter() - started:.1f}s; "
              f"RSS MiB {' -> '.join(f'{r:.1f}' for r in rss)}; first round +{rss[1] - rss[0]:.1f}, "
              f"after it +{rss[-1] - rss[1]:.1f} (steady state); peak outbox depth {peak}; "
              f"enqueued {counters.get('enqueued', 0)}")
    finally:
        server.stop()
    os.environ["SIGNAL_QUEUE_SOCKET_TIMEOUT"] = "0.2"
    spool = Path(tempfile.mkdtemp(prefix="sq-bench-spool-")) / "spool.sqlite3"
    os.environ["SIGNAL_QUEUE_SPOOL_PATH"] = str(spool)
    logging.getLogger("signal_queue").setLevel(logging.CRITICAL)
    down = f"redis://127.0.0.1:{free_port()}/0"
    started = time.perf_counter()
    rss, peak, counters = run(down, args.emits, 1)
    size = sum(p.stat().st_size for p in spool.parent.iterdir()) / 2**20
    print(f"Redis down: {args.emits} emits in {time.perf_counter() - started:.1f}s; RSS MiB {rss[0]:.1f} -> "
          f"{rss[1]:.1f}; peak outbox depth {peak}; spooled {counters.get('spooled', 0)} events, spool "
          f"{size:.1f} MiB on disk; lost {counters.get('lost', 0)}, dropped {counters.get('dropped', 0)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

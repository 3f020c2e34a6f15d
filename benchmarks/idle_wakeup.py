"""Idle wake-up: how long after an event is in Redis an idle worker starts its receiver, per queue.

    python benchmarks/idle_wakeup.py [--events 200] [--gap 0.02]

One worker serves ``--queues`` queues (the default queue first in its order,
then the others). Events are sent one at a time at a low rate (``--gap`` seconds apart,
so the worker is idle and waiting each time), in ``immediate`` delivery mode:
the job is in Redis when ``send()`` returns. The receiver notes the time from
just before ``send()`` to its own start. Prints p50/p95/max per queue.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from devtools.redis_process import RedisProcess  # noqa: E402

server = RedisProcess()
server.start()
os.environ["SIGNAL_QUEUE_REDIS_URL"] = server.url

import redis  # noqa: E402

from benchmarks import wakeup_app  # noqa: E402

ENV = dict(os.environ, PYTHONPATH=str(ROOT), SIGNAL_QUEUE_REDIS_URL=server.url)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--events", type=int, default=200, help="events per queue")
    parser.add_argument("--gap", type=float, default=0.02, help="seconds between events")
    parser.add_argument("--queues", type=int, default=3, choices=(1, 2, 3), help="queues the worker serves")
    args = parser.parse_args()
    queues = wakeup_app.QUEUES[: args.queues]
    conn = redis.Redis.from_url(server.url)
    worker = subprocess.Popen(
        [sys.executable, "worker.py", "--app", "benchmarks.wakeup_app:app", "--no-scheduler", "--logging-level",
         "WARNING", *queues], cwd=ROOT, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 30
        while conn.scard("rq:workers") == 0:
            if time.monotonic() > deadline:
                raise SystemExit("the worker did not start")
            time.sleep(0.05)
        time.sleep(0.5)
        with wakeup_app.app.app_context():
            for i in range(args.events * len(queues)):
                queue = queues[i % len(queues)]
                wakeup_app.pings[queue].send("bench", sent_at=time.time())
                time.sleep(args.gap)
        total = args.events * len(queues)
        deadline = time.monotonic() + 60
        while sum(conn.llen(wakeup_app.LAGS.format(q)) for q in queues) < total:
            if time.monotonic() > deadline:
                raise SystemExit("not every event ran")
            time.sleep(0.05)
        lags = {q: sorted(float(x) * 1000 for x in conn.lrange(wakeup_app.LAGS.format(q), 0, -1))
                for q in queues}
    finally:
        worker.terminate()
        worker.wait(timeout=30)
        server.stop()
    print(f"\n{'queue (worker order)':22} {'events':>7} {'p50 ms':>8} {'p95 ms':>8} {'max ms':>8}")
    for queue, values in lags.items():
        p95 = values[min(len(values) - 1, int(len(values) * 0.95))]
        print(f"{queue:22} {len(values):7d} {statistics.median(values):8.2f} {p95:8.2f} {values[-1]:8.2f}")
    print(f"\n{args.gap * 1000:.0f} ms between events; {os.cpu_count()} cores")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Worker throughput: events per second drained from a backlog, per worker class and process count.

    python benchmarks/worker_throughput.py [--events 10000] [--plain 2000]

The backlog is made through signal_queue's real emit path (inside a request
context, so each event carries a request snapshot). Each worker runs in its own
process with --burst; its start-up time (measured on an empty queue in the same
run) is subtracted. Baselines in the same run: plain RQ jobs (one per event)
on RQ's forking Worker and SimpleWorker, and Celery's solo worker.
"""

from __future__ import annotations

import argparse
import os
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
from rq import Queue  # noqa: E402
from rq.serializers import JSONSerializer  # noqa: E402

from benchmarks import worker_app  # noqa: E402

ENV = dict(os.environ, PYTHONPATH=str(ROOT), SIGNAL_QUEUE_REDIS_URL=server.url)
conn = redis.Redis.from_url(server.url)


def emit_backlog(events: int) -> None:
    app = worker_app.app
    with app.test_request_context("/orders/1", headers={"User-Agent": "bench"}):
        for i in range(events):
            worker_app.tick.send("bench", n=i)
    app.extensions["signal_queue"].outbox.flush()


def timed(cmd: list[str], processes: int = 1) -> float:
    started = time.perf_counter()
    procs = [subprocess.Popen(cmd, cwd=ROOT, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
             for _ in range(processes)]
    for p in procs:
        if p.wait(timeout=1800) != 0:
            raise SystemExit(f"{cmd} exited {p.returncode}")
    return time.perf_counter() - started


def sq_worker(worker_class: str) -> list[str]:
    return [sys.executable, "worker.py", "--app", "benchmarks.worker_app:app", "--burst", "--no-scheduler",
            "--worker-class", worker_class, "--logging-level", "WARNING"]


def rq_worker(worker_class: str, queue: str) -> list[str]:
    return [sys.executable, "-m", "rq.cli", "worker", "--url", server.url, "--burst", "--quiet",
            "--worker-class", worker_class, "--serializer", "json", queue]


def run_celery(events: int) -> float:
    for i in range(events):
        worker_app.celery_tick.delay(i)
    cmd = [sys.executable, "-m", "celery", "-A", "benchmarks.worker_app:celery", "worker", "--pool=solo",
           "--loglevel=WARNING", "-Q", "bench", "--without-gossip", "--without-mingle", "--without-heartbeat"]
    started = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=ROOT, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 1800
        while int(conn.get(worker_app.DONE) or 0) < events:
            if time.monotonic() > deadline or proc.poll() is not None:
                raise SystemExit("celery worker did not finish")
            time.sleep(0.01)
        return time.perf_counter() - started
    finally:
        proc.terminate()
        proc.wait(timeout=60)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--events", type=int, default=10_000)
    parser.add_argument("--plain", type=int, default=2000, help="jobs for the plain-RQ SimpleWorker baseline")
    parser.add_argument("--plain-fork", type=int, default=300, help="jobs for RQ's forking Worker (~10/s here)")
    args = parser.parse_args()
    rows: list[tuple[str, int, float]] = []
    try:
        startup = {wc: timed(sq_worker(wc)) for wc in ("simple", "fork")}
        rq_startup = {wc: timed(rq_worker(wc, "plain")) for wc in ("rq.worker.SimpleWorker", "rq.worker.Worker")}

        for label, wc, procs in [
            ("signal_queue, default worker (SimpleWorker), 1 process", "simple", 1),
            ("signal_queue, RQ forking Worker, 1 process", "fork", 1),
            ("signal_queue, default worker, 2 processes", "simple", 2),
        ]:
            conn.flushall()
            emit_backlog(args.events)
            elapsed = timed(sq_worker(wc), procs) - startup[wc]
            assert conn.llen("rq:queue:signals") == 0
            rows.append((label, args.events, elapsed))

        plain_queue = Queue("plain", connection=conn, serializer=JSONSerializer)
        for label, wc, count in [("plain RQ jobs, RQ forking Worker", "rq.worker.Worker", args.plain_fork),
                                 ("plain RQ jobs, RQ SimpleWorker", "rq.worker.SimpleWorker", args.plain)]:
            conn.flushall()
            plain_queue.enqueue_many([Queue.prepare_data(worker_app.plain_job, args=(i,)) for i in range(count)])
            rows.append((label, count, timed(rq_worker(wc, "plain")) - rq_startup[wc]))

        conn.flushall()
        rows.append(("Celery worker --pool=solo (one task per event)", args.events, run_celery(args.events)))
    finally:
        server.stop()

    base = next(r for r in rows if r[0].startswith("plain RQ jobs, RQ forking"))
    base_rate = base[1] / base[2]
    print(f"\n{'worker':58} {'events':>7} {'seconds':>8} {'events/s':>9} {'vs RQ fork':>10}")
    for label, n, secs in rows:
        print(f"{label:58} {n:7d} {secs:8.2f} {n / secs:9.0f} {n / secs / base_rate:9.1f}x")
    print(f"\nstart-up subtracted: signal_queue {startup['simple']:.2f}s (simple) {startup['fork']:.2f}s (fork); "
          f"rq {rq_startup['rq.worker.SimpleWorker']:.2f}s; {os.cpu_count()} cores")
    return 0


if __name__ == "__main__":
    sys.exit(main())

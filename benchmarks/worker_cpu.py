"""Worker CPU per event: where one default worker's time goes, by process, next to Celery's solo worker.

    python benchmarks/worker_cpu.py [--events 20000] [--rounds 3] [--profile DIR]

A backlog of trivial events is made through the real emit path (in a request
context, so each event carries a request snapshot) and hidden under another key;
one default worker (``worker.py``, its own process) starts and goes idle; then
the backlog is put back in one RENAME and the clock runs until every event is
counted handled. CPU time (utime + stime from ``/proc/<pid>/stat``) of the
worker (the supervisor), its handler process and redis-server is read before
and after, so start-up is left out; CPU is steadier than wall time on a shared
machine. Celery's solo worker drains the same number of trivial tasks in the
same run, measured the same way. The worker runs at its default log level,
INFO, unless ``--logging-level`` says otherwise. ``--profile DIR`` runs ``py-spy record`` on the
supervisor and the handler process for one extra round and writes speedscope
and flame-graph files there. Nothing here asserts a speed.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from devtools.redis_process import RedisProcess  # noqa: E402

server = RedisProcess()
server.start()
os.environ["SIGNAL_QUEUE_REDIS_URL"] = server.url

import redis  # noqa: E402

from benchmarks import worker_app  # noqa: E402

ENV = dict(os.environ, PYTHONPATH=str(ROOT), SIGNAL_QUEUE_REDIS_URL=server.url)
conn = redis.Redis.from_url(server.url)
PY_SPY = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
TICKS = os.sysconf("SC_CLK_TCK")
QUEUE = "rq:queue:signals"
HIDDEN = "bench:hidden"


def cpu(pid: int) -> float:
    """Seconds of CPU (user + system) that process ``pid`` used so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS


def children(pid: int) -> list[int]:
    """The pids of ``pid``'s child processes."""
    found: list[int] = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        with open(task / "children") as f:
            found += [int(c) for c in f.read().split()]
    return found


def redis_pid() -> int:
    return int(conn.info("server")["process_id"])


def wait_for(condition: Callable[[], object], what: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise SystemExit(f"timed out waiting for {what}")
        time.sleep(0.01)


def handled() -> int:
    return int(conn.hget("sq:stats", "handled") or 0)


def emit_hidden(events: int) -> None:
    """Queue ``events`` through the app's emit path, then hide the queue from the worker."""
    app = worker_app.app
    with app.test_request_context("/orders/1", headers={"User-Agent": "bench"}):
        for i in range(events):
            worker_app.tick.send("bench", n=i)
    app.extensions["signal_queue"].outbox.flush()
    wait_for(lambda: conn.exists(QUEUE), "the backlog")
    conn.rename(QUEUE, HIDDEN)


def sq_round(events: int, profile: Path | None = None, level: str = "INFO") -> dict[str, float]:
    conn.flushall()
    emit_hidden(events)
    cmd = [sys.executable, "worker.py", "--app", "benchmarks.worker_app:app", "--no-scheduler",
           "--logging-level", level]
    worker = subprocess.Popen(cmd, cwd=ROOT, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    spies: list[subprocess.Popen[bytes]] = []
    try:
        wait_for(lambda: conn.scard("rq:workers") > 0 and children(worker.pid), "the worker")
        time.sleep(0.3)  # let it settle into its blocking wait
        [handler] = children(worker.pid)
        if profile is not None:
            for name, pid in (("supervisor", worker.pid), ("handler", handler)):
                for fmt, ext in (("speedscope", "json"), ("flamegraph", "svg")):
                    spies.append(subprocess.Popen(
                        [PY_SPY, "record", "-p", str(pid), "-r", "500", "--gil", "-f", fmt, "-o",
                         str(profile / f"{name}.{ext}")],
                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
            time.sleep(1.0)
        pids = {"supervisor": worker.pid, "handler": handler, "redis": redis_pid()}
        before = {name: cpu(pid) for name, pid in pids.items()}
        load = os.getloadavg()[0]
        started = time.perf_counter()
        conn.rename(HIDDEN, QUEUE)
        wait_for(lambda: handled() >= events, "every event", timeout=600)
        elapsed = time.perf_counter() - started
        after = {name: cpu(pid) for name, pid in pids.items()}
    finally:
        worker.terminate()
        worker.wait(timeout=60)
        for spy in spies:
            spy.wait(timeout=60)
    result = {name: (after[name] - before[name]) / events * 1e6 for name in pids}
    result["rate"] = events / elapsed
    result["load"] = load
    return result


def celery_round(events: int) -> dict[str, float]:
    conn.flushall()
    for i in range(events):
        worker_app.celery_tick.delay(i)
    conn.rename("bench", HIDDEN)
    cmd = [sys.executable, "-m", "celery", "-A", "benchmarks.worker_app:celery", "worker", "--pool=solo",
           "--loglevel=WARNING", "-Q", "bench", "--without-gossip", "--without-mingle", "--without-heartbeat"]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        # Ready once it listens on its queue (kombu's BRPOP shows in CLIENT LIST).
        wait_for(lambda: any(c.get("cmd") == "brpop" for c in conn.client_list()), "the celery worker")
        pids = {"celery": proc.pid, "redis": redis_pid()}
        before = {name: cpu(pid) for name, pid in pids.items()}
        load = os.getloadavg()[0]
        started = time.perf_counter()
        conn.rename(HIDDEN, "bench")
        wait_for(lambda: int(conn.get(worker_app.DONE) or 0) >= events, "every celery task", timeout=600)
        elapsed = time.perf_counter() - started
        after = {name: cpu(pid) for name, pid in pids.items()}
    finally:
        proc.terminate()
        proc.wait(timeout=60)
    result = {name: (after[name] - before[name]) / events * 1e6 for name in pids}
    result["rate"] = events / elapsed
    result["load"] = load
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--events", type=int, default=20_000)
    parser.add_argument("--celery-events", type=int, default=5_000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--profile", type=Path, help="directory for py-spy profiles of one extra round")
    parser.add_argument("--logging-level", default="INFO",
                        help="the worker's (its default, INFO; its log goes to /dev/null here)")
    args = parser.parse_args()
    rows: list[tuple[str, dict[str, float]]] = []
    try:
        for _ in range(args.rounds):
            rows.append(("signal_queue default worker", sq_round(args.events, level=args.logging_level)))
            rows.append(("Celery --pool=solo", celery_round(args.celery_events)))
        if args.profile is not None:
            if not Path(PY_SPY).exists():
                raise SystemExit("--profile needs py-spy on PATH (pip install py-spy)")
            args.profile.mkdir(parents=True, exist_ok=True)
            sq_round(args.events, args.profile, args.logging_level)
    finally:
        server.stop()
    print(f"\n{'worker':30} {'events/s':>9} {'worker us':>10} {'handler us':>11} {'redis us':>9} {'load':>5}")
    for label, r in rows:
        own = r.get("supervisor", r.get("celery", 0.0))
        print(f"{label:30} {r['rate']:9.0f} {own:10.1f} {r.get('handler', 0.0):11.1f} {r['redis']:9.1f} "
              f"{r['load']:5.1f}")
    sq = [r["rate"] for label, r in rows if label.startswith("signal")]
    cel = [r["rate"] for label, r in rows if label.startswith("Celery")]
    print(f"\nbest of {args.rounds}: signal_queue {max(sq):.0f} events/s, Celery solo {max(cel):.0f} tasks/s, "
          f"ratio {max(sq) / max(cel):.1f}x; CPU per event in microseconds; {os.cpu_count()} cores")
    return 0


if __name__ == "__main__":
    sys.exit(main())

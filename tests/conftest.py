"""Fixtures: a private redis-server per session, an empty database per test, real workers."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from flask import Flask
from rq.job import Job
from rq.serializers import JSONSerializer

from devtools.redis_process import RedisProcess
from signal_queue import SignalQueue
from signal_queue.wire.keys import RUN_EVENTS
from tests.redis_server import RedisServer

ROOT = Path(__file__).resolve().parent.parent

# Chosen before any test module imports an app, so every app made at import
# time points at the private server: the machine's Redis on 6379 is never used.
SERVER = RedisServer()
os.environ["SIGNAL_QUEUE_REDIS_URL"] = SERVER.url
# Each app a test makes gets its own spool file, never one in the repo's instance folder.
SPOOL_DIR = tempfile.mkdtemp(prefix="sq-spool-")
os.environ["SIGNAL_QUEUE_SPOOL_PATH"] = os.path.join(SPOOL_DIR, "session-spool.sqlite3")


@pytest.fixture(autouse=True)
def own_spool(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Each test's apps (and its workers) spool to a file of their own."""
    path = tmp_path / "spool.sqlite3"
    monkeypatch.setenv("SIGNAL_QUEUE_SPOOL_PATH", str(path))
    return path


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    SERVER.start()
    yield SERVER
    SERVER.stop()


@pytest.fixture
def redis_url(redis_server: RedisServer, monkeypatch: pytest.MonkeyPatch) -> str:
    """The private Redis, emptied, and set as SIGNAL_QUEUE_REDIS_URL for apps and workers."""
    redis.Redis.from_url(redis_server.url).flushall()
    monkeypatch.setenv("SIGNAL_QUEUE_REDIS_URL", redis_server.url)
    return redis_server.url


@pytest.fixture
def conn(redis_url: str) -> redis.Redis:
    return redis.Redis.from_url(redis_url)


@pytest.fixture
def app_on(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[Callable[[str], Flask]]:
    """Make tests/fault_app.py's app on a given Redis, in this process; closed at the end."""
    made: list[Flask] = []

    def make(url: str) -> Flask:
        from tests.fault_app import create_app

        monkeypatch.setenv("SIGNAL_QUEUE_REDIS_URL", url)
        monkeypatch.setenv("SIGNAL_QUEUE_SPOOL_PATH", str(tmp_path / f"app{len(made)}.sqlite3"))
        app = create_app()
        made.append(app)
        return app

    yield make
    for app in made:
        SignalQueue.close(app)


def drain(app: Flask) -> None:
    """Wait until every event the app has emitted so far is in Redis."""
    app.extensions["signal_queue"].outbox.flush()


def queued_events(conn: redis.Redis, name: str = "signals") -> int:
    """Events waiting in queue ``name`` (a batch job counts its events)."""
    total = 0
    for job_id in conn.lrange(f"rq:queue:{name}", 0, -1):
        job = Job.fetch(job_id.decode(), connection=conn, serializer=JSONSerializer)
        total += len(job.args[0]) if job.func_name == RUN_EVENTS else 1
    return total


def run_worker(
    app: str,
    url: str,
    *extra: str,
    cwd: Path = ROOT,
    pythonpath: tuple[Path, ...] = (),
    timeout: float = 120,
) -> subprocess.CompletedProcess[str]:
    """Run ``python worker.py --burst`` in its own process until the queues are empty."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([*(str(p) for p in pythonpath), str(ROOT)])
    env["SIGNAL_QUEUE_REDIS_URL"] = url
    result = subprocess.run(
        [sys.executable, str(ROOT / "worker.py"), "--app", app, "--url", url, "--burst", *extra],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert result.returncode == 0, f"worker exited {result.returncode}\n{result.stdout}\n{result.stderr}"
    return result


@pytest.fixture
def server() -> Iterator[RedisProcess]:
    """A redis-server of the test's own, killed at the end."""
    process = RedisProcess()
    process.start()
    yield process
    process.kill()


@pytest.fixture
def client(server: RedisProcess) -> Iterator[redis.Redis]:
    """A client of the test's Redis."""
    connection = redis.Redis.from_url(server.url)
    yield connection
    connection.close()


def answers(conn: redis.Redis) -> bool:
    """Whether the Redis behind ``conn`` answers a PING yet (a check for :func:`wait_until`)."""
    try:
        return bool(conn.ping())
    except redis.ConnectionError:
        return False


def wait_until(
    what: str, check: Callable[[], object], timeout: float, process: subprocess.Popen[Any] | None = None
) -> float:
    """Poll ``check`` until it is true; the seconds it took.

    Fails naming ``what`` after ``timeout`` seconds, or at once if ``process`` exited meanwhile.
    """
    started = time.monotonic()
    while not check():
        if process is not None and process.poll() is not None:
            raise AssertionError(f"the process exited (status {process.returncode}) while waiting for {what}")
        if time.monotonic() - started > timeout:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.02)
    return time.monotonic() - started

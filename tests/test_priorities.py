"""Queue order: SIGNAL_QUEUE_QUEUES decides which queue a worker takes from first."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest
import redis
from rq import Worker

from tests.conftest import ROOT, drain, run_worker, wait_until
from tests.priority_app import alert, create_app, note, report
from tests.recording import records

APP = "tests.priority_app:create_app()"


@pytest.fixture
def ordered(monkeypatch: pytest.MonkeyPatch) -> str:
    """The order critical, signals, bulk for apps and workers (an environment variable, as in production)."""
    monkeypatch.setenv("SIGNAL_QUEUE_QUEUES", "critical,signals,bulk")
    return "critical,signals,bulk"


def test_workers_take_from_queues_in_the_configured_order(conn: redis.Redis, redis_url: str, ordered: str) -> None:
    """Bulk and default events queued first still run after the critical ones queued last."""
    app = create_app()
    with app.app_context():
        for n in range(3):
            report.send("app", n=n)
            note.send("app", n=n)
        drain(app)
        for n in range(3):
            alert.send("app", n=n)
        drain(app)

    run_worker(APP, redis_url)

    assert [r["receiver"] for r in records(conn)] == ["alert"] * 3 + ["note"] * 3 + ["report"] * 3


def test_without_the_key_the_default_queue_comes_first_then_alphabetical(conn: redis.Redis, redis_url: str) -> None:
    """Today's order stays the default: signals, then bulk, critical."""
    app = create_app()
    assert app.extensions["signal_queue"].queue_names() == ["signals", "bulk", "critical"]


def test_info_and_rq_info_show_the_order(conn: redis.Redis, redis_url: str, ordered: str) -> None:
    """`flask signal-queue info` lists queues with their priority; a worker shows them in that order in rq info."""
    env = dict(os.environ, PYTHONPATH=str(ROOT), SIGNAL_QUEUE_REDIS_URL=redis_url)
    out = subprocess.run(
        [sys.executable, "-m", "flask", "--app", APP, "signal-queue", "info", "--json"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=60, check=True,
    )
    queues = json.loads(out.stdout)["queues"]
    assert [(q["name"], q["priority"]) for q in queues] == [("critical", 1), ("signals", 2), ("bulk", 3)]
    text = subprocess.run(
        [sys.executable, "-m", "flask", "--app", APP, "signal-queue", "info"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=60, check=True,
    ).stdout
    assert "queues, in the order workers take from them: critical, signals, bulk" in text

    worker = subprocess.Popen(
        [sys.executable, "worker.py", "--app", APP, "--name", "ordered"],
        cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        def ordered() -> list[Worker]:
            return [w for w in Worker.all(connection=conn) if w.name == "ordered"]

        wait_until("the worker to register", ordered, 30, worker)
        found = ordered()
        assert found, "the worker registered"
        assert found[0].queue_names() == ["critical", "signals", "bulk"]
        rq_info = subprocess.run(
            [sys.executable, "-m", "rq.cli", "info", "--url", redis_url],
            capture_output=True, text=True, timeout=60, check=True,
        ).stdout
        assert re.search(r"ordered.*critical, signals, bulk", rq_info), rq_info
    finally:
        worker.terminate()
        worker.wait(timeout=10)


def test_a_queue_the_order_leaves_out_is_served_last_with_a_warning(
    conn: redis.Redis, redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Listing only some queues never strands a receiver's events: the rest come last, and the worker says so."""
    monkeypatch.setenv("SIGNAL_QUEUE_QUEUES", "critical")
    app = create_app()
    assert app.extensions["signal_queue"].queue_names() == ["critical", "signals", "bulk"]
    with app.app_context():
        report.send("app", n=1)
        drain(app)
    out = run_worker(APP, redis_url)
    assert "receivers use queue(s) signals, bulk, which SIGNAL_QUEUE_QUEUES does not list" in out.stderr
    assert [r["receiver"] for r in records(conn)] == ["report"]

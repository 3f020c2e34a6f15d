"""signal_queue.testing: capture, assert and drain in a user's test suite; the shipped example passes."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import redis

from signal_queue import PayloadError
from signal_queue.testing import capture_events
from tests.conftest import ROOT, drain, queued_events
from tests.misc_app import create_app, misc
from tests.recording import records


def test_capture_takes_events_instead_of_redis_and_drain_runs_them(conn: redis.Redis) -> None:
    """While capturing, nothing is enqueued; drain() runs the receivers with the worker's code."""
    app = create_app()
    with capture_events(app) as events:
        app.test_client().get("/emit/captured", headers={"X-Request-ID": "req-9"})
        [event] = events.filter(receiver="tests.misc_app:on_misc")
        assert (event.signal, event.sender, event.kwargs) == ("misc", "view", {"value": "captured"})
        assert event.request is not None and event.request["request_id"] == "req-9"
        assert records(conn) == []
        assert events.drain() == 1
        assert events.drain() == 0, "each event runs once"
    drain(app)
    assert queued_events(conn) == 0
    [rec] = records(conn)
    assert rec["kwargs"] == {"value": "captured"} and rec["request"]["request_id"] == "req-9"
    app.test_client().get("/emit/after")
    drain(app)
    assert queued_events(conn) == 1, "after the block, events go to Redis again"


def test_capture_still_refuses_what_a_worker_could_not_take() -> None:
    """Unserializable kwargs raise in a capture as they would in production."""
    app = create_app()
    with capture_events(app), app.app_context(), pytest.raises(PayloadError):
        misc.send("x", value=object())


def test_the_shipped_example_test_passes() -> None:
    """examples/testing shows users the fixture; it runs green with the plugin."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT / "examples" / "article"), str(ROOT)]))
    out = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(ROOT / "examples" / "testing")],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=120,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert "2 passed" in out.stdout

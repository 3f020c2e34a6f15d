"""How a user tests deferred receivers: capture the events a request defers, assert, then run them.

    pytest examples/testing        (from the repo, with PYTHONPATH=examples/article)
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from application import app as article_app
from flask import Flask

from signal_queue.testing import EventCapture


@pytest.fixture
def app() -> Iterator[Flask]:
    yield article_app


def test_dashboard_defers_one_audit_record(app: Flask, deferred_events: EventCapture) -> None:
    """The request defers the audit receiver with the request it saw; nothing runs yet."""
    app.test_client().get("/dashboard?user=alice", headers={"Authorization": "Bearer secret"})
    [event] = deferred_events.filter(signal="access-event")
    assert event.receiver == "audit_events:persist_access_record"
    assert event.sender == "dashboard_module"
    assert event.request is not None and event.request["path"] == "/dashboard"
    assert ["Authorization", "[REDACTED]"] in event.request["headers"], "secrets never leave the request"
    assert event.g == {"current_user": "alice"}


def test_drain_runs_the_receiver_as_a_worker_would(
    app: Flask, deferred_events: EventCapture, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """drain() runs the receiver with the rebuilt request: it writes the line the worker writes."""
    monkeypatch.chdir(tmp_path)
    app.test_client().get("/dashboard?user=bob")
    assert not (tmp_path / "access_audit.log").exists()
    assert deferred_events.drain() == 1
    line = (tmp_path / "access_audit.log").read_text()
    assert line.endswith("] bob@127.0.0.1 accessed /dashboard\n")

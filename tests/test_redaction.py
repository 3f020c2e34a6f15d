"""Secrets never leave the process: fields named like passwords, tokens and keys are sent as [REDACTED]."""

from __future__ import annotations

import zlib
from pathlib import Path

import pytest
import redis

from signal_queue.testing import capture_events
from tests.conftest import drain, run_worker
from tests.recording import records
from tests.secret_app import create_app

APP = "tests.secret_app:create_app()"


@pytest.fixture
def secret_db(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SECRET_DB", str(tmp_path / "secret.sqlite3"))


def test_secret_fields_never_reach_redis_and_the_rest_does(
    conn: redis.Redis, redis_url: str, secret_db: None
) -> None:
    """A form's password, a token kwarg, a model's password hash and g.api_key: [REDACTED] in Redis and the worker."""
    app = create_app()
    assert app.test_client().get("/signup").status_code == 200
    drain(app)
    dump = b"".join(v for k in conn.keys("rq:job:*") for v in conn.hgetall(k).values())
    assert b"hunter2" not in dump, "a secret reached Redis"
    run_worker(APP, redis_url)
    [rec] = records(conn)
    hidden = "[REDACTED]"
    assert rec["kwargs"]["form"] == {"email": "ada@example.com", "password": hidden, "password_confirm": hidden}
    assert rec["kwargs"]["token"] == "[REDACTED]"
    assert rec["kwargs"]["account"] == {"email": "ada@example.com", "password_hash": "[REDACTED]"}
    assert rec["g"] == {"api_key": "[REDACTED]", "tenant": "acme"}


def stored(conn: redis.Redis) -> bytes:
    """Every job hash in Redis, its compressed data decompressed."""
    parts = []
    for key in conn.keys("rq:job:*"):
        for value in conn.hgetall(key).values():
            try:
                parts.append(zlib.decompress(value))
            except zlib.error:
                parts.append(value)
    return b"\n".join(parts)


def test_secret_path_arguments_and_query_parameters_never_reach_redis(
    conn: redis.Redis, redis_url: str, secret_db: None
) -> None:
    """A token in the URL (a secret-named path argument, query parameters) is [REDACTED] in the
    stored request, so in Redis; the handler's request matches the same rule with [REDACTED] as the
    value, and every other parameter is as sent."""
    app = create_app()
    response = app.test_client().get("/reset/tok-hunter2-path/3?access_token=tok-hunter2-query&page=2&apiKey=k-hunter2")
    assert response.status_code == 200
    drain(app)
    dump = stored(conn)
    assert b"reset-asked" in dump, "the job data was read"
    assert b"hunter2" not in dump, "a secret in the URL reached Redis"
    run_worker(APP, redis_url)
    [rec] = records(conn)
    hidden = "[REDACTED]"
    assert rec["request"]["path"] == f"/reset/{hidden}/3"
    assert rec["kwargs"]["args"] == {"access_token": hidden, "page": "2", "apiKey": hidden}
    assert rec["kwargs"]["view_args"] == {"reset_token": hidden, "step": 3}
    assert rec["kwargs"]["step"] == 3
    assert "hunter2" not in rec["request"]["url"] + rec["request"]["query"]
    assert "page=2" in rec["request"]["query"]


def test_redaction_is_configurable(conn: redis.Redis, secret_db: None) -> None:
    """SIGNAL_QUEUE_REDACT_FIELDS=() sends everything (an app that needs a token in its receiver)."""
    app = create_app(SIGNAL_QUEUE_REDACT_FIELDS=())
    with capture_events(app) as events:
        app.test_client().get("/signup")
    [event] = events
    assert event.kwargs["confirm_token"] == "tok-hunter2"
    assert event.kwargs["form_data"]["password"] == "hunter2"

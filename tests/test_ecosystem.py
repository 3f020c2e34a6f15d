"""Extensions' own signals: Flask-Login users and SQLAlchemy models as kwargs, types of the app's own."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import redis
from rq.serializers import JSONSerializer

from signal_queue import ConfigurationError, PayloadError, SignalQueue
from signal_queue.consumer.job import SignalJob
from signal_queue.testing import capture_events
from tests.conftest import ROOT, drain, queued_events, run_worker
from tests.recording import records
from tests.types_app import Money, create_app

TYPES_APP = "tests.types_app:create_app()"


def tell_story(tmp_path: Path, name: str, url: str, deferred: bool) -> tuple[list[int], Path, Path]:
    """Run tests/drive_story.py in its own process; return the statuses, its log and its database."""
    workdir = tmp_path / name
    workdir.mkdir()
    log, database = workdir / "audit.log", workdir / "story.sqlite3"
    env = dict(
        os.environ, PYTHONPATH=str(ROOT), SIGNAL_QUEUE_REDIS_URL=url, STORY_LOG=str(log), STORY_DB=str(database),
        STORY_DEFERRED="1" if deferred else "0",
    )
    out = subprocess.run(
        [sys.executable, "-m", "tests.drive_story"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout), log, database


def test_login_and_model_audits_write_the_inline_lines_from_the_worker(tmp_path: Path, redis_url: str) -> None:
    """Register, log in, rename, log out, delete: every request 200; the worker writes what inline wrote."""
    statuses, inline_log, _ = tell_story(tmp_path, "inline", redis_url, deferred=False)
    assert statuses == [200] * 5
    inline = inline_log.read_text().splitlines()
    assert inline == [
        "insert User 1 ada@example.com /register 10.0.0.1",
        "login 1 ada@example.com /login/1 10.0.0.1",
        "update User 1 ada@lovelace.org /rename/1 10.0.0.2",
        "delete User 1 ada@lovelace.org /delete/1 10.0.0.3",
    ]

    statuses, deferred_log, database = tell_story(tmp_path, "deferred", redis_url, deferred=True)
    assert statuses == [200] * 5
    assert not deferred_log.exists(), "the request process wrote the audit log"
    assert queued_events(redis.Redis.from_url(redis_url)) == 4

    env_log = tmp_path / "deferred" / "audit.log"
    worker_env = {"STORY_LOG": str(env_log), "STORY_DB": str(database), "STORY_DEFERRED": "1"}
    old = {k: os.environ.get(k) for k in worker_env}
    os.environ.update(worker_env)
    try:
        run_worker("tests.story_app:create_app()", redis_url)
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    assert env_log.read_text().splitlines() == inline
    assert redis.Redis.from_url(redis_url).zcard("rq:failed:signals") == 0


def test_a_user_kwarg_is_reloaded_by_the_user_loader(conn: redis.Redis, redis_url: str) -> None:
    """The worker's user is what the app's user_loader returns now (renamed since the emit)."""
    app = create_app()
    app.test_client().get("/greet/7/Ada")
    drain(app)
    run_worker_with_users(redis_url, {"7": "Ada Lovelace"})
    [rec] = records(conn)
    assert rec["kwargs"] == {"id": "7", "kind": "Member", "user_name": "Ada Lovelace"}


def test_a_deleted_user_arrives_with_the_attributes_captured_at_emit(conn: redis.Redis, redis_url: str) -> None:
    """The loader returns None (deleted since): the receiver gets the app's class with the id and emit-time attrs."""
    app = create_app()
    app.test_client().get("/greet/8/Grace")
    drain(app)
    run_worker_with_users(redis_url, {})
    [rec] = records(conn)
    assert rec["kwargs"] == {"id": "8", "kind": "Member", "user_name": "Grace"}


def run_worker_with_users(redis_url: str, users: dict[str, str]) -> None:
    """A worker whose user_loader knows ``users`` (read from TYPES_USERS in its environment)."""
    os.environ["TYPES_USERS"] = json.dumps(users)
    try:
        run_worker(TYPES_APP, redis_url)
    finally:
        os.environ.pop("TYPES_USERS", None)


def test_registered_type_reaches_the_worker_by_its_name(conn: redis.Redis, redis_url: str) -> None:
    """A Money kwarg travels as the type named "money" and is rebuilt as Money in the worker."""
    app = create_app()
    assert app.test_client().get("/pay/12.50").status_code == 200
    drain(app)
    [job_id] = conn.lrange("rq:queue:signals", 0, -1)
    job = SignalJob.fetch(job_id.decode(), connection=conn, serializer=JSONSerializer)
    [event] = job.args[0]
    decimal = {"__sq__": "decimal", "v": "12.50"}
    assert event["kwargs"]["price"] == {"__sq__": "type", "name": "money", "v": [decimal, "EUR"]}
    run_worker(TYPES_APP, redis_url)
    [rec] = records(conn)
    assert rec["kwargs"]["price"] == "Money(amount=Decimal('12.50'), currency='EUR')"
    assert rec["kwargs"]["kind"] == "Money"


def test_registered_type_in_eager_mode_and_the_testing_helpers(conn: redis.Redis, redis_url: str) -> None:
    """Eager mode and capture_events use the same registry as the worker."""
    app = create_app(SIGNAL_QUEUE_EAGER=True)
    app.test_client().get("/pay/3")
    [rec] = records(conn)
    assert rec["kwargs"]["price"] == "Money(amount=Decimal('3'), currency='EUR')"

    app = create_app()
    with capture_events(app) as events:
        app.test_client().get("/pay/4")
    [event] = events
    assert event.kwargs["price"] == {"__sq__": "type", "name": "money", "v": [{"__sq__": "decimal", "v": "4"}, "EUR"]}
    events.drain()
    assert records(conn)[-1]["kwargs"]["kind"] == "Money"


def test_a_decoder_that_fails_fails_that_event_naming_the_type(conn: redis.Redis, redis_url: str) -> None:
    """The worker records the event as failed with the type and the reason; the next event runs."""
    app = create_app()
    client = app.test_client()
    client.get("/pay-broken")
    client.get("/pay/1")
    drain(app)
    run_worker(TYPES_APP, redis_url)
    assert [r["kwargs"]["kind"] for r in records(conn)] == ["Money"]
    [failed] = [j.decode() for j in conn.zrange("rq:failed:signals", 0, -1)]
    rows = json.loads(flask_failed(redis_url))
    assert [row["job_id"] for row in rows] == [failed]
    assert "type 'broken': decode failed: KeyError('no-such-key')" in rows[0]["error"]


def flask_failed(url: str) -> str:
    env = dict(os.environ, PYTHONPATH=str(ROOT), SIGNAL_QUEUE_REDIS_URL=url)
    out = subprocess.run(
        [sys.executable, "-m", "flask", "--app", TYPES_APP, "signal-queue", "failed", "--json"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=60,
    )
    assert out.returncode == 0, out.stderr
    return out.stdout


def test_register_type_refuses_a_name_taken_by_another_class() -> None:
    """Two classes under one wire name would decode as the wrong one: refused, naming both."""
    sq = SignalQueue()
    sq.register_type(Money, encode=lambda m: 1, decode=lambda v: v, name="cash")

    class Other:
        pass

    with pytest.raises(ConfigurationError, match=r"'cash' is already registered for tests\.types_app\.Money"):
        sq.register_type(Other, encode=lambda o: 1, decode=lambda v: v, name="cash")
    with pytest.raises(ConfigurationError, match="needs a class"):
        sq.register_type("Money", encode=lambda o: 1, decode=lambda v: v)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("config", "testing", "debug"),
    [({}, True, False), ({}, False, True), ({"SIGNAL_QUEUE_EAGER": True}, False, False),
     ({"SIGNAL_QUEUE_UNSENDABLE": "raise"}, False, False)],
)
def test_unsendable_kwarg_raises_while_a_developer_is_looking(
    conn: redis.Redis, config: dict[str, object], testing: bool, debug: bool
) -> None:
    """Testing, debug, eager mode or the "raise" policy: PayloadError at emit, nothing sent."""
    app = create_app(**config)
    app.testing, app.debug = testing, debug
    with app.test_request_context("/pay-object"), pytest.raises(PayloadError, match="kwarg price cannot be sent"):
        app.view_functions["pay_object"]()
    drain(app)
    assert queued_events(conn) == 0


def test_unsendable_kwarg_raises_under_capture_events(conn: redis.Redis) -> None:
    """A test's capture is a developer looking too."""
    app = create_app()
    with capture_events(app), app.test_request_context("/pay-object"), pytest.raises(PayloadError):
        app.view_functions["pay_object"]()


def test_unsendable_kwarg_in_production_is_recorded_not_a_500(
    conn: redis.Redis, redis_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    """No 500 for an audit: the event lands in the failed registry with its request, key and reason."""
    app = create_app()
    with caplog.at_level(logging.ERROR, logger="signal_queue"):
        response = app.test_client().get("/pay-object", headers={"X-Request-ID": "req-9"})
    assert response.status_code == 200
    assert "kwarg price cannot be sent to a worker (builtins.object is not JSON-serializable)" in caplog.text
    assert app.extensions["signal_queue"].dispatcher.counters["unsendable"] == 1
    drain(app)
    run_worker(TYPES_APP, redis_url)
    assert records(conn) == [], "the receiver did not run with a missing kwarg"
    [row] = json.loads(flask_failed(redis_url))
    assert (row["signal"], row["receiver"], row["path"], row["request_id"]) == (
        "paid", "tests.types_app:on_paid", "/pay-object", "req-9"
    )
    assert "kwarg price could not be carried to the worker: builtins.object is not JSON-serializable" in row["error"]
    assert redis.Redis.from_url(redis_url).llen("rq:queue:signals") == 0, "recorded once, not retried"


def test_record_policy_records_even_in_testing_mode(conn: redis.Redis) -> None:
    """SIGNAL_QUEUE_UNSENDABLE=record chooses recording explicitly."""
    app = create_app(SIGNAL_QUEUE_UNSENDABLE="record")
    app.testing = True
    assert app.test_client().get("/pay-object").status_code == 200
    drain(app)
    assert queued_events(conn) == 1


def test_unknown_policy_is_a_configuration_error() -> None:
    with pytest.raises(ConfigurationError, match="SIGNAL_QUEUE_UNSENDABLE must be one of auto, raise, record"):
        create_app(SIGNAL_QUEUE_UNSENDABLE="ignore")

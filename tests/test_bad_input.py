"""Bad input gets an error that names what was wrong, and loses nothing else."""

from __future__ import annotations

import gc
import logging
from pathlib import Path
from typing import Any

import pytest
import redis
from blinker import Signal
from flask import Flask
from rq import Queue
from rq.job import Job
from rq.serializers import JSONSerializer

from signal_queue import (
    ConfigurationError,
    PayloadError,
    ReceiverNotAddressable,
    SignalQueue,
    deferred,
)
from signal_queue.testing import capture_events
from signal_queue.wire.keys import RUN_EVENT, RUN_EVENTS
from tests.conftest import drain, run_worker
from tests.misc_app import create_app, inline_calls, misc, on_misc
from tests.recording import records
from tests.redis_server import free_port

APP = "tests.misc_app:create_app()"


def failure(conn: redis.Redis, job_id: str) -> str:
    """The exception text RQ recorded for a failed job."""
    assert conn.zscore("rq:failed:signals", job_id) is not None, f"job {job_id} is not in the failed registry"
    job = Job.fetch(job_id, connection=conn, serializer=JSONSerializer)
    result = job.latest_result()
    assert result is not None and result.exc_string
    return result.exc_string


def valid_payload(app: Flask, value: str = "ok") -> dict[str, Any]:
    """A well-formed event as the bridge would write it (taken with the public capture helper)."""
    with capture_events(app) as events:
        app.test_client().get(f"/emit/{value}")
    [event] = events
    return event.payload


def craft(conn: redis.Redis, func: str, payload: Any, **kwargs: Any) -> Job:
    return Queue("signals", connection=conn, serializer=JSONSerializer).enqueue_call(func, args=(payload,), **kwargs)


def test_unserializable_kwarg_raises_at_emit_and_enqueues_nothing(conn: redis.Redis) -> None:
    """The error names the signal, the receiver and the key; no job is written."""
    app = create_app()
    app.testing = True
    with pytest.raises(PayloadError) as info:
        app.test_client().get("/emit-object")
    err = info.value
    assert (err.signal, err.receiver, err.key) == ("misc", "tests.misc_app:on_misc", "value['nested'][1]")
    assert "'misc'" in str(err) and "tests.misc_app:on_misc" in str(err) and "value['nested'][1]" in str(err)
    assert "builtins.object is not JSON-serializable" in str(err)
    assert conn.llen("rq:queue:signals") == 0
    assert conn.keys("rq:job:*") == []


def test_crafted_jobs_are_refused_and_good_jobs_still_run(conn: redis.Redis, redis_url: str, tmp_path: Path) -> None:
    """Unknown receivers, foreign functions, callbacks, bad data and versions are refused with clear reasons."""
    app = create_app()
    good = valid_payload(app, "good")
    marker = tmp_path / "pwned"

    unknown = craft(conn, RUN_EVENT, dict(good, receiver="os:system"))
    wrong_signal = craft(conn, RUN_EVENT, dict(good, signal="other"))
    foreign = craft(conn, "os.system", f"touch {marker}")
    callback = craft(conn, RUN_EVENT, dict(valid_payload(app, "cb")))
    conn.hset(callback.key, "success_callback_name", "os.getcwd")
    missing = craft(conn, RUN_EVENT, {k: v for k, v in good.items() if k != "signal"})
    wrong_type = craft(conn, RUN_EVENT, dict(good, kwargs=["not", "a", "dict"]))
    version = craft(conn, RUN_EVENT, dict(good, v=99))
    not_json = craft(conn, RUN_EVENT, good)
    conn.hset(not_json.key, "data", b"\x80\x04 definitely not json")
    bad_tag = craft(conn, RUN_EVENT, dict(good, kwargs={"value": {"__sq__": "nope"}}))
    signature = craft(conn, RUN_EVENT, dict(good, kwargs={"value": 1, "extra": 2}))
    ok = craft(conn, RUN_EVENT, good)

    run_worker(APP, redis_url)

    assert "receiver 'os:system' (signal 'misc') is not registered with @deferred" in failure(conn, unknown.id)
    assert "registered with @deferred for signal(s) 'misc', not for 'other'" in failure(conn, wrong_signal.id)
    assert "names function 'os.system'" in failure(conn, foreign.id)
    assert not marker.exists()
    assert "missing" not in failure(conn, wrong_type.id)
    assert "event key 'kwargs' must be dict, got list" in failure(conn, wrong_type.id)
    assert "event key 'signal' is missing" in failure(conn, missing.id)
    assert "event format version 99 is not supported" in failure(conn, version.id)
    assert "data is not a JSON job written by signal_queue" in failure(conn, not_json.id)
    assert "cannot decode its arguments" in failure(conn, bad_tag.id)
    assert "no longer accepts this event's arguments" in failure(conn, signature.id)
    assert "MalformedEvent" in failure(conn, missing.id)

    assert "field 'success_callback_name' must be empty" in failure(conn, callback.id)

    values = [r["kwargs"]["value"] for r in records(conn)]
    assert values == ["good"], "the good job ran; the job edited to carry a callback did not run at all"
    assert conn.zcard("rq:failed:signals") == 10
    assert not conn.exists(ok.key), "the good job finished: a finished job is not kept (SIGNAL_QUEUE_RESULT_TTL 0)"
    assert conn.llen("rq:queue:signals") == 0


def test_redis_down_at_emit_does_not_fail_the_request(caplog: pytest.LogCaptureFixture, tmp_path: Path) -> None:
    """With Redis unreachable, the request succeeds, other receivers run, the event is spooled and logged."""
    app = create_app(
        SIGNAL_QUEUE_REDIS_URL=f"redis://127.0.0.1:{free_port()}/0",
        SIGNAL_QUEUE_SPOOL_PATH=str(tmp_path / "spool.sqlite3"),
    )
    inline_calls.clear()
    with caplog.at_level(logging.WARNING, logger="signal_queue"):
        response = app.test_client().get("/emit/down")
        drain(app)
    assert response.status_code == 200
    assert inline_calls == [{"value": "down"}]
    assert "1 event(s) were spooled to" in caplog.text and "ConnectionError" in caplog.text
    assert "tests.misc_app:on_misc" in caplog.text
    state = app.extensions["signal_queue"]
    assert state.dispatcher.counters["spooled"] == 1
    assert state.dispatcher.spool.depth() == (1, 1)


def test_receivers_that_cannot_be_named_are_refused_at_decoration() -> None:
    """Lambdas, nested functions and methods cannot be found by a worker: refused, with the reason."""
    with pytest.raises(ReceiverNotAddressable, match="module level"):
        deferred(misc)(lambda sender: None)

    def nested(sender: Any) -> None: ...

    with pytest.raises(ReceiverNotAddressable, match=r"test_receivers_that_cannot_be_named.*<locals>"):
        deferred(misc)(nested)


def test_bad_decorator_arguments_are_refused() -> None:
    """Anonymous signals, non-signals, bad retry, timeout and queue values name what is wrong."""
    with pytest.raises(ConfigurationError, match="named signal"):
        deferred(Signal())
    with pytest.raises(ConfigurationError, match="blinker signal"):
        deferred("misc")  # type: ignore[arg-type]
    with pytest.raises(ConfigurationError, match="retry"):
        deferred(misc, retry=-1)
    with pytest.raises(ConfigurationError, match="timeout"):
        deferred(misc, timeout=0)
    with pytest.raises(ConfigurationError, match="queue"):
        deferred(misc, queue="")


def test_extension_misuse_says_how_to_fix_it() -> None:
    """Double init, missing extension, emit outside an app and bad config each say what to do."""
    app = create_app()
    with pytest.raises(ConfigurationError, match="already set up"):
        SignalQueue(app)
    bare = Flask("bare")
    with bare.app_context(), pytest.raises(ConfigurationError, match=r"no SignalQueue; call SignalQueue\(app\)"):
        misc.send("x", value=1)
    with pytest.raises(ConfigurationError, match="outside an application context"):
        misc.send("x", value=1)
    with pytest.raises(ConfigurationError, match="SIGNAL_QUEUE_TRUSTED_PROXIES"):
        create_app(SIGNAL_QUEUE_TRUSTED_PROXIES=-1)
    with pytest.raises(ConfigurationError, match="SIGNAL_QUEUE_REDIS_URL"):
        create_app(SIGNAL_QUEUE_REDIS_URL="http://nope")
    for grace in (-1, "7", True, float("nan")):
        with pytest.raises(ConfigurationError, match=r"SIGNAL_QUEUE_SHUTDOWN_GRACE must be a number of seconds >= 0"):
            create_app(SIGNAL_QUEUE_SHUTDOWN_GRACE=grace)
    assert SignalQueue.state(create_app(SIGNAL_QUEUE_SHUTDOWN_GRACE=2)).consumer.shutdown_grace == 2.0


def test_decorator_returns_the_function_and_holds_the_forwarder_strongly() -> None:
    """@deferred returns the receiver itself, and its forwarder survives garbage collection."""
    assert on_misc.__name__ == "on_misc" and on_misc.__module__ == "tests.misc_app"
    gc.collect()
    names = [getattr(r, "__name__", "") for r in misc.receivers_for("anything")]
    assert "deferred:tests.misc_app:on_misc" in names


def test_a_batch_with_an_event_whose_names_are_not_text_is_logged_and_the_rest_runs(
    conn: redis.Redis, redis_url: str
) -> None:
    """An event whose signal is a list (Redis edited) is rejected; the batch's INFO line still names it."""
    app = create_app()
    good = valid_payload(app, "fine")
    bad = dict(valid_payload(app, "odd"), signal=["not", "text"])
    Queue("signals", connection=conn, serializer=JSONSerializer).enqueue_call(RUN_EVENTS, args=([good, bad], {}))
    out = run_worker(APP, redis_url)
    [line] = [line for line in out.stderr.splitlines() if "signal_queue.events INFO job_id=" in line] or [out.stderr]
    assert " events=2 handled=1 failed=1 " in line
    assert "receivers=misc->tests.misc_app:on_misc(1),['not', 'text']->tests.misc_app:on_misc(1)" in line
    assert [r["kwargs"]["value"] for r in records(conn)] == ["fine"]
    assert "event key 'signal' must be str" in failure(conn, bad["id"])

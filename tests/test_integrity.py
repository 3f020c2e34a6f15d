"""Nothing a client or Redis hands the bridge changes what the worker does or records."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
import redis
from flask import Flask
from rq.job import Job
from rq.serializers import JSONSerializer

from signal_queue import PayloadError
from signal_queue.consumer.job import SignalJob
from signal_queue.wire.keys import RUN_EVENTS
from tests.conftest import drain, run_worker
from tests.misc_app import create_app
from tests.recording import records

APP = "tests.misc_app:create_app()"


def failure(conn: redis.Redis, job_id: str) -> str:
    """The exception text RQ recorded for a job in the failed registry."""
    assert conn.zscore("rq:failed:signals", job_id) is not None, f"job {job_id} is not in the failed registry"
    # Read with the bridge's job class: RQ's own would choke on the fields a test broke.
    result = SignalJob.fetch(job_id, connection=conn, serializer=JSONSerializer).latest_result()
    assert result is not None and result.exc_string
    return result.exc_string


def emit_jobs(app: Flask, values: list[str]) -> dict[str, str]:
    """One real batch job per value, written by the bridge itself: {value: job id}."""
    client = app.test_client()
    jobs: dict[str, str] = {}
    conn = redis.Redis.from_url(app.config["SIGNAL_QUEUE_REDIS_URL"])
    for value in values:
        before = set(conn.lrange("rq:queue:signals", 0, -1))
        assert client.get(f"/emit/{value}").status_code == 200
        drain(app)
        [job_id] = set(conn.lrange("rq:queue:signals", 0, -1)) - before
        jobs[value] = job_id.decode()
    return jobs


class Hooks:
    """A loopback HTTP server that counts the requests it gets (a webhook target)."""

    def __init__(self) -> None:
        self.requests: list[str] = []
        hits = self.requests

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                hits.append(self.path)
                self.send_response(204)
                self.end_headers()

            do_GET = do_POST

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def hooks() -> Iterator[Hooks]:
    server = Hooks()
    yield server
    server.close()


def test_clients_request_id_never_keys_a_snapshot(conn: redis.Redis, redis_url: str) -> None:
    """30 requests with one X-Request-ID in one batch: each event keeps its own path and client address."""
    app = create_app(SIGNAL_QUEUE_LINGER=10)  # the sender waits: the test's flush sends all 30 at once
    client = app.test_client()
    for i in range(30):
        response = client.get(
            f"/emit/v{i}", headers={"X-Request-ID": "same-id"}, environ_base={"REMOTE_ADDR": f"10.0.0.{i}"}
        )
        assert response.status_code == 200
    drain(app)
    [job_id] = conn.lrange("rq:queue:signals", 0, -1)
    job = Job.fetch(job_id.decode(), connection=conn, serializer=JSONSerializer)
    assert job.func_name == RUN_EVENTS and len(job.args[0]) == 30, "all 30 events are in one batch"
    assert len(job.args[1]) == 30, "one snapshot per request, not one per X-Request-ID"

    run_worker(APP, redis_url)

    seen = {r["kwargs"]["value"]: r["request"] for r in records(conn)}
    assert len(seen) == 30
    for i in range(30):
        request = seen[f"v{i}"]
        assert (request["path"], request["remote_addr"]) == (f"/emit/v{i}", f"10.0.0.{i}")
        assert request["request_id"] == "same-id", "the client's id is still carried, as a value"


def test_job_edited_in_redis_is_refused_and_nothing_it_names_is_called(
    conn: redis.Redis, redis_url: str, hooks: Hooks
) -> None:
    """Webhooks, callbacks, dependencies, repeats, unknown fields and larger settings: refused, never acted on.

    A larger result TTL is not refused but cut to the worker's own (test_redis_memory)."""
    edits: dict[str, dict[str, Any]] = {
        "webhook": {
            "webhooks": json.dumps(
                [{"url": hooks.url, "job_status": "finished"}, {"url": hooks.url, "job_status": "failed"}]
            )
        },
        "callback": {"failure_callback_name": "os.getcwd", "failure_callback_timeout": 5},
        "depends": {"dependency_ids": json.dumps(["other"]), "dependency_id": "other"},
        "repeat": {"repeats_left": 3, "repeat_intervals": "[0]"},
        "unknown": {"x_custom": "1"},
        "longtimeout": {"timeout": 10**6},
        "keepfailure": {"failure_ttl": 10**9},
        "moreretries": {"retries_left": 99},
        "ttl": {"ttl": 5},
    }
    app = create_app()
    jobs = emit_jobs(app, [*edits, "untouched"])
    for value, fields in edits.items():
        conn.hset(f"rq:job:{jobs[value]}", mapping=fields)

    worker = run_worker(APP, redis_url)

    assert hooks.requests == [], "the worker called a URL named in Redis"
    assert [r["kwargs"]["value"] for r in records(conn)] == ["untouched"], "only the untouched job ran"
    for value, fields in edits.items():
        reason = failure(conn, jobs[value])
        assert "was refused and not run" in reason, value
        assert all(f"field {name!r}" in reason for name in fields), (value, reason)
        assert f"field {next(iter(fields))!r}" in worker.stderr, "the reason is logged"
    assert conn.zcard("rq:failed:signals") == len(edits)
    assert conn.llen("rq:queue:signals") == 0


@pytest.mark.parametrize(
    ("field", "value", "reason"),
    [
        ("sq_attempts", "abc", "field 'sq_attempts' must be a whole number"),
        ("created_at", "garbage", "field 'created_at' is not a UTC time"),
        ("retries_left", "x", "field 'retries_left' must be a whole number"),
        ("status", "bogus", "field 'status' is not an RQ job status"),
        ("timeout", "-5", "field 'timeout' must be >= 1"),
    ],
)
def test_unreadable_field_does_not_stop_the_worker(
    conn: redis.Redis, redis_url: str, field: str, value: str, reason: str
) -> None:
    """A field RQ would choke on lands the job in the failed registry; the worker runs the next job."""
    app = create_app()
    jobs = emit_jobs(app, ["bad", "good"])
    conn.hset(f"rq:job:{jobs['bad']}", field, value)

    run_worker(APP, redis_url)

    assert reason in failure(conn, jobs["bad"])
    assert [r["kwargs"]["value"] for r in records(conn)] == ["good"]
    assert conn.llen("rq:queue:signals") == 0
    assert conn.llen("rq:queue:signals:intermediate") == 0, "nothing stuck between queue and worker"


def test_job_hash_without_data_is_refused(conn: redis.Redis, redis_url: str) -> None:
    """A job whose data field was deleted is recorded as failed with the reason, not dropped silently."""
    app = create_app()
    jobs = emit_jobs(app, ["bad", "good"])
    conn.hdel(f"rq:job:{jobs['bad']}", "data")

    run_worker(APP, redis_url)

    assert "field 'data' is missing" in failure(conn, jobs["bad"])
    assert [r["kwargs"]["value"] for r in records(conn)] == ["good"]


def nested(depth: int) -> list[Any]:
    value: list[Any] = []
    for _ in range(depth - 1):
        value = [value]
    return value


def test_deeply_nested_kwarg_is_a_payload_error(conn: redis.Redis) -> None:
    """10,000 levels deep: a PayloadError naming signal, receiver and key path, not a RecursionError
    (SIGNAL_QUEUE_UNSENDABLE=raise; in production the event is recorded instead, as for any kwarg)."""
    from tests.misc_app import misc

    app = create_app(SIGNAL_QUEUE_UNSENDABLE="raise")
    with app.test_request_context("/deep"), pytest.raises(PayloadError) as info:
        misc.send("view", value=nested(10_000))
    err = info.value
    assert (err.signal, err.receiver) == ("misc", "tests.misc_app:on_misc")
    assert err.key == "value" + "[0]" * 101
    assert "nested deeper than 100 levels" in str(err) and "tests.misc_app:on_misc" in str(err)
    drain(app)
    assert conn.llen("rq:queue:signals") == 0

    with app.test_request_context("/ok"):
        misc.send("view", value=nested(100))  # as deep as allowed: carried
    drain(app)
    assert conn.llen("rq:queue:signals") == 1


def test_deeply_nested_job_data_is_refused_in_the_worker(conn: redis.Redis, redis_url: str) -> None:
    """Data nested past what JSON or the codec will read fails that job with a reason; the worker goes on."""
    app = create_app()
    jobs = emit_jobs(app, ["toodeep", "deepkwarg", "good"])
    for value, depth in (("toodeep", 100_000), ("deepkwarg", 150)):
        key = f"rq:job:{jobs[value]}"
        data = Job.fetch(jobs[value], connection=conn, serializer=JSONSerializer).data.decode()
        kwarg = f'"value":"{value}"'  # the app writes compact JSON (orjson)
        assert kwarg in data
        conn.hset(key, "data", data.replace(kwarg, f'"value": {"[" * depth}{"]" * depth}'))

    run_worker(APP, redis_url)

    assert "data is not a JSON job written by signal_queue" in failure(conn, jobs["toodeep"])
    assert [r["kwargs"]["value"] for r in records(conn)] == ["good"]
    # The batch job itself succeeded; its bad event was recorded as its own failed job.
    assert conn.zcard("rq:failed:signals") == 2
    [spun_off] = [j.decode() for j in conn.zrange("rq:failed:signals", 0, -1) if j.decode() != jobs["toodeep"]]
    assert "nested deeper than 100 levels" in failure(conn, spun_off)

"""The batch jobs the app writes itself (signal_queue.wire.rq_jobs) are RQ's own jobs to RQ and its tools."""

from __future__ import annotations

import hashlib
import inspect
import json
import math
import subprocess
import sys
import zlib
from typing import Any

import pytest
import redis
import rq
from rq import Queue, Retry
from rq.job import Job, JobStatus
from rq.registry import FinishedJobRegistry, StartedJobRegistry
from rq.serializers import JSONSerializer

from signal_queue.wire.keys import BATCH_RETRIES, RUN_EVENTS
from signal_queue.wire.rq_jobs import MIRRORED
from tests.conftest import ROOT, drain, run_worker
from tests.misc_app import create_app, misc
from tests.recording import records
from tests.test_rq_compat import resolve

APP = "tests.misc_app:create_app()"


@pytest.mark.parametrize("name", sorted(MIRRORED))
def test_rq_code_whose_storage_the_app_writes_is_unchanged(name: str) -> None:
    """The RQ code whose output wire/rq_jobs.py reproduces is the code it was checked against."""
    digest = hashlib.sha256(inspect.getsource(resolve(name)).encode()).hexdigest()[:16]
    assert digest == MIRRORED[name], (
        f"{name} changed in rq {rq.__version__}: read it against signal_queue/wire/rq_jobs.py, "
        f"then set its digest to {digest}"
    )


def batch_job(app: Any, conn: redis.Redis, *values: Any) -> str:
    """The id of the one batch job the app writes for ``values`` (one emit each, in one request)."""
    before = set(conn.lrange("rq:queue:signals", 0, -1))
    with app.test_request_context("/emit/x?y=1", headers={"Authorization": "Bearer secret"}):
        for value in values:
            misc.send("view", value=value)
    drain(app)
    [job_id] = set(conn.lrange("rq:queue:signals", 0, -1)) - before
    return str(job_id.decode())


def test_the_job_hash_is_the_one_rq_writes_for_the_same_job(conn: redis.Redis) -> None:
    """Field for field what Queue.enqueue_many writes for the same call and options (times aside)."""
    app = create_app(SIGNAL_QUEUE_LINGER=10)  # one job for the request's events
    ours = batch_job(app, conn, "a", "b")
    fields = {k.decode(): v for k, v in conn.hgetall(f"rq:job:{ours}").items()}
    args = json.loads(zlib.decompress(fields["data"]))[2]
    queue = Queue("signals", connection=conn, serializer=JSONSerializer)
    queue.enqueue_many([Queue.prepare_data(
        RUN_EVENTS, args=tuple(args), timeout=int(fields["timeout"]), result_ttl=int(fields["result_ttl"]),
        failure_ttl=int(fields["failure_ttl"]), description=fields["description"].decode(), job_id="theirs",
        retry=Retry(max=BATCH_RETRIES),
    )])
    theirs = {k.decode(): v for k, v in conn.hgetall("rq:job:theirs").items()}
    left_out = {k for k, v in theirs.items() if v == b""}  # RQ reads a missing field as an empty one
    assert left_out == {"success_callback_name", "failure_callback_name", "stopped_callback_name", "started_at",
                        "ended_at", "last_heartbeat", "worker_name", "group_id"}
    theirs = {k: v for k, v in theirs.items() if k not in left_out}

    assert sorted(fields) == sorted(theirs), "the same fields, but for those RQ writes empty"
    times = ("created_at", "enqueued_at")
    assert {k: v for k, v in fields.items() if k not in (*times, "data")} == {
        k: v for k, v in theirs.items() if k not in (*times, "data")
    }
    assert json.loads(zlib.decompress(fields["data"])) == json.loads(zlib.decompress(theirs["data"]))
    for name in times:  # RQ's own format, which its parser reads back
        assert len(fields[name]) == len(theirs[name]) and fields[name].endswith(b"Z")
    assert [j.decode() for j in conn.lrange("rq:queue:signals", 0, -1)] == [ours, "theirs"]
    assert conn.smembers("rq:queues") == {b"rq:queue:signals"}


def test_rq_reads_the_job_back_and_its_worker_runs_it(conn: redis.Redis, redis_url: str) -> None:
    """Job.fetch, Queue.count and Queue.jobs see an RQ job; rq info counts it; the worker runs and registers it."""
    app = create_app(SIGNAL_QUEUE_LINGER=10)
    job_id = batch_job(app, conn, "first", "second", "third")
    job = Job.fetch(job_id, connection=conn, serializer=JSONSerializer)
    assert (job.func_name, job.get_status(), job.origin) == (RUN_EVENTS, JobStatus.QUEUED, "signals")
    assert job.args[0][0]["kwargs"] == {"value": "first"} and len(job.args[0]) == 3
    assert (job.retries_left, job.retry_intervals, job.result_ttl) == (BATCH_RETRIES, [0], 0)  # not kept
    assert job.created_at is not None and job.enqueued_at is not None
    assert job.description == "3 event(s): misc -> tests.misc_app:on_misc"
    queue = Queue("signals", connection=conn, serializer=JSONSerializer)
    assert queue.count == 1 and [j.id for j in queue.jobs] == [job_id]
    assert "Bearer secret" not in zlib.decompress(conn.hget(f"rq:job:{job_id}", "data") or b"").decode()
    info = subprocess.run(
        [sys.executable, "-m", "rq.cli", "info", "--url", redis_url, "signals"],
        capture_output=True, text=True, timeout=60, cwd=ROOT, check=True,
    ).stdout
    assert "signals" in info and "1" in info.split("signals", 1)[1].splitlines()[0]

    run_worker(APP, redis_url)

    assert [r["kwargs"]["value"] for r in records(conn)] == ["first", "second", "third"]
    # Finished: deleted at once (SIGNAL_QUEUE_RESULT_TTL 0), as RQ deletes a job whose result is not kept.
    assert not conn.exists(f"rq:job:{job_id}")
    assert FinishedJobRegistry("signals", connection=conn).get_job_ids() == []
    assert StartedJobRegistry("signals", connection=conn).get_job_ids() == []


def test_values_orjson_cannot_write_still_reach_the_worker(conn: redis.Redis, redis_url: str) -> None:
    """An integer past 64 bits (orjson refuses it: the standard encoder writes that job), NaN and
    infinities (JSON has no word for them: tagged, never written as null) arrive as they were sent."""
    app = create_app()
    with app.test_request_context("/"):
        misc.send("view", value=2**70)
        misc.send("view", value=[float("nan"), {"x": float("-inf")}])
        misc.send("view", value=float("inf"))
        misc.send(float("nan"), value="nan sender")
    drain(app)
    for job_id in conn.lrange("rq:queue:signals", 0, -1):
        data = zlib.decompress(conn.hget(f"rq:job:{job_id.decode()}", "data") or b"")
        json.loads(data, parse_constant=lambda word: pytest.fail(f"{word} written into a job: not JSON"))

    run_worker(APP, redis_url)

    seen = [r["kwargs"]["value"] for r in records(conn)]
    assert seen[0] == 2**70
    assert math.isnan(seen[1]["items"][0]) and seen[1]["items"][1] == {"x": float("-inf")}
    assert seen[2] == float("inf")
    [nan_sender] = [r["sender"] for r in records(conn) if r["kwargs"]["value"] == "nan sender"]
    assert math.isnan(nan_sender)

"""Per-receiver retries count attempts; timeouts end a stuck handler as a failed attempt."""

from __future__ import annotations

import redis
from rq.job import Job
from rq.serializers import JSONSerializer

from tests.conftest import drain, run_worker
from tests.misc_app import create_app, flaky, slow
from tests.recording import records

APP = "tests.misc_app:create_app()"


def test_failing_handler_is_retried_and_sees_its_attempt(conn: redis.Redis, redis_url: str) -> None:
    """retry=Retry(max=2): fails twice, succeeds on attempt 3; current_event.attempt says so."""
    app = create_app()
    with app.app_context():
        flaky.send("t", fail_times=2)
    drain(app)
    run_worker(APP, redis_url)
    assert [r["kwargs"]["attempt"] for r in records(conn)] == [1, 2, 3]
    assert conn.zcard("rq:failed:signals") == 0


def test_handler_failing_every_attempt_ends_in_the_failed_registry(conn: redis.Redis, redis_url: str) -> None:
    """After the last retry the job is in RQ's failed registry with the handler's exception."""
    app = create_app()
    with app.app_context():
        flaky.send("t", fail_times=99)
    drain(app)
    run_worker(APP, redis_url)
    assert [r["kwargs"]["attempt"] for r in records(conn)] == [1, 2, 3]
    [job_id] = conn.zrange("rq:failed:signals", 0, -1)
    job = Job.fetch(job_id.decode(), connection=conn, serializer=JSONSerializer)
    result = job.latest_result()
    assert result is not None and result.exc_string
    assert "RuntimeError: attempt 3 fails on purpose" in result.exc_string


def test_timeout_stops_a_stuck_handler(conn: redis.Redis, redis_url: str) -> None:
    """@deferred(timeout=1) ends a handler that takes 30 s; the attempt fails with JobTimeoutException."""
    app = create_app()
    with app.app_context():
        slow.send("t", seconds=30)
    drain(app)
    out = run_worker(APP, redis_url, timeout=25)
    assert records(conn) == []
    [job_id] = conn.zrange("rq:failed:signals", 0, -1)
    result = Job.fetch(job_id.decode(), connection=conn, serializer=JSONSerializer).latest_result()
    assert result is not None and "JobTimeoutException" in result.exc_string
    assert "Job OK" not in out.stderr


def test_rerun_batch_skips_events_marked_done(conn: redis.Redis, redis_url: str) -> None:
    """A batch job run again (after a crash) skips the events it marked done; the rest see attempt 2."""
    app = create_app()
    with app.app_context():
        for _ in range(3):
            flaky.send("t", fail_times=0)
    drain(app)
    [job_id] = [j.decode() for j in conn.lrange("rq:queue:signals", 0, -1)]
    # As a worker killed after the first event would leave it: one start, event 0 marked done.
    conn.hset(f"rq:job:{job_id}", "sq_attempts", 1)
    conn.sadd(f"sq:done:{job_id}", 0)
    run_worker(APP, redis_url)
    assert [r["kwargs"]["attempt"] for r in records(conn)] == [2, 2]
    assert conn.zcard("rq:failed:signals") == 0


def test_one_event_timing_out_does_not_stop_its_batch(conn: redis.Redis, redis_url: str) -> None:
    """In one batch job, a stuck event fails alone (timeout); the events around it run."""
    app = create_app()
    with app.app_context():
        flaky.send("t", fail_times=0)
        slow.send("t", seconds=30)
        flaky.send("t", fail_times=0)
    drain(app)
    assert conn.llen("rq:queue:signals") == 1, "the three events travel in one job"
    run_worker(APP, redis_url, timeout=25)
    assert [r["receiver"] for r in records(conn)] == ["flaky-attempt", "flaky-attempt"]
    [failed_id] = conn.zrange("rq:failed:signals", 0, -1)
    failed = Job.fetch(failed_id.decode(), connection=conn, serializer=JSONSerializer)
    assert failed.func_name == "signal_queue.jobs.run_event", "the failed event became its own job"
    assert failed.description == "slow -> tests.misc_app:on_slow"
    result = failed.latest_result()
    assert result is not None and "JobTimeoutException" in result.exc_string

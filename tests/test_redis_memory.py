"""What events leave in Redis once handled: nothing per event, unless results are asked for.

Bytes go to ``benchmarks/redis_memory.py``; these tests count keys and read TTLs.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import redis

from signal_queue import SignalQueue
from signal_queue.wire.keys import SENT_KEY, SENT_TTL
from tests.conftest import ROOT, drain, run_worker, wait_until
from tests.misc_app import create_app, flaky, misc, slow
from tests.recording import RECORDS, records

APP = "tests.misc_app:create_app()"


def job_ids(conn: redis.Redis) -> list[str]:
    return [j.decode() for j in conn.lrange("rq:queue:signals", 0, -1)]


def test_handled_events_leave_no_key_of_their_own(conn: redis.Redis, redis_url: str) -> None:
    """40 events in 10 batch jobs, handled by a real worker: no job, result, registry entry or marker
    of theirs is left, and the keys left are a few that do not grow with the number of events."""
    app = create_app()
    client = app.test_client()
    sent: list[str] = []
    for i in range(40):
        assert client.get(f"/emit/v{i}").status_code == 200
        if i % 4 == 3:
            drain(app)  # one send, one batch job
            sent += [j for j in job_ids(conn) if j not in sent]
    SignalQueue.close(app)
    assert len(sent) >= 10

    run_worker(APP, redis_url)

    assert len(records(conn)) == 40
    keys = sorted(k.decode() for k in conn.keys("*"))
    assert [k for k in keys if any(job in k for job in sent)] == [], "a key of a handled job is left"
    assert conn.zcard("rq:finished:signals") == 0, "a finished-registry entry is left"
    left = [k for k in keys if k != RECORDS]
    assert len(left) <= 10, left


def test_each_send_deletes_the_sent_markers_of_the_sends_confirmed_before_it(
    conn: redis.Redis, redis_url: str
) -> None:
    """A batch's sent-marker matters only while the batch may be in a spool; once its send is
    confirmed, the next send (or the idle sender, or close) deletes it."""
    app = create_app()
    client = app.test_client()
    for i in range(5):
        assert client.get(f"/emit/v{i}").status_code == 200
        drain(app)
    markers = conn.keys("sq:sent:*")
    assert len(markers) <= 1, "only the last send's marker may be left"
    for key in markers:
        assert 0 < conn.ttl(key) <= SENT_TTL
    SignalQueue.close(app)
    assert conn.keys("sq:sent:*") == []


def test_replay_knows_a_delivered_batch_by_its_job_and_drops_its_marker(
    tmp_path: Path, conn: redis.Redis, redis_url: str
) -> None:
    """A lost reply spools a batch that reached Redis: the replay skips it while its job exists even
    without the marker, and deletes the marker once the spool row is gone."""
    app = create_app(SIGNAL_QUEUE_SPOOL_PATH=str(tmp_path / "spool.sqlite3"))
    dispatcher = app.extensions["signal_queue"].dispatcher
    outbox = app.extensions["signal_queue"].outbox
    with app.app_context():
        misc.send("x", value="once")
        misc.send("x", value="twice?")
    events = list(outbox._pending)
    outbox._pending.clear()
    first, second = (dispatcher.prepare([e])[0] for e in events)
    dispatcher.send([first, second])  # they reached Redis...
    dispatcher.spool.put([first, second])  # ...and were spooled too, as a lost reply makes them
    conn.delete(SENT_KEY.format(second.job_id))  # its marker gone; its job still waits
    assert 0 < conn.ttl(SENT_KEY.format(first.job_id)) <= SENT_TTL

    assert dispatcher.replay() == 0
    assert dispatcher.counters["replay_skipped"] == 2
    assert dispatcher.spool.depth() == (0, 0)
    assert not conn.exists(SENT_KEY.format(first.job_id)), "the spool row is gone: its marker too"
    run_worker(APP, redis_url)
    assert sorted(r["kwargs"]["value"] for r in records(conn)) == ["once", "twice?"]


def test_results_are_kept_when_asked_and_the_done_marks_go_with_the_job(
    conn: redis.Redis, redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """SIGNAL_QUEUE_RESULT_TTL=60: the finished batch job stays, for 60 s at most, in RQ's finished
    registry; its done marks are a field of its hash, not a key that outlives it."""
    monkeypatch.setenv("SIGNAL_QUEUE_RESULT_TTL", "60")
    app = create_app()
    for value in ("a", "b"):
        assert app.test_client().get(f"/emit/{value}").status_code == 200
    drain(app)
    [job_id] = job_ids(conn)

    run_worker(APP, redis_url)

    assert len(records(conn)) == 2
    assert conn.zscore("rq:finished:signals", job_id) is not None
    assert 0 < conn.ttl(f"rq:job:{job_id}") <= 60
    assert conn.hget(f"rq:job:{job_id}", "sq_done") == b",0,1"
    assert conn.keys("sq:done:*") == []


def test_jobs_queued_with_a_result_ttl_run_and_are_kept_no_longer_than_the_worker_sets(
    conn: redis.Redis, redis_url: str
) -> None:
    """Jobs that ask for results to be kept (500 s, as the previous default wrote them; forever, as an
    edit in Redis would) run on a worker that keeps none, and leave nothing."""
    app = create_app(SIGNAL_QUEUE_RESULT_TTL=500)
    client = app.test_client()
    for value in ("kept-500", "kept-forever"):
        assert client.get(f"/emit/{value}").status_code == 200
        drain(app)
    old, forever = job_ids(conn)
    conn.hset(f"rq:job:{forever}", "result_ttl", -1)
    assert conn.hget(f"rq:job:{old}", "result_ttl") == b"500"

    run_worker(APP, redis_url)  # the default: SIGNAL_QUEUE_RESULT_TTL 0

    assert sorted(r["kwargs"]["value"] for r in records(conn)) == ["kept-500", "kept-forever"]
    assert conn.zcard("rq:failed:signals") == 0
    assert conn.keys("rq:job:*") == [] and conn.zcard("rq:finished:signals") == 0


def test_rerun_batch_skips_the_events_marked_done_in_its_hash(conn: redis.Redis, redis_url: str) -> None:
    """A batch run again after a crash skips the events its first run marked in its job hash."""
    app = create_app()
    with app.app_context():
        for _ in range(3):
            flaky.send("t", fail_times=0)
    drain(app)
    [job_id] = job_ids(conn)
    # As a worker killed after the first event would leave it: one start, event 0 marked done.
    conn.hset(f"rq:job:{job_id}", mapping={"sq_attempts": 1, "sq_done": ",0"})
    run_worker(APP, redis_url)
    assert [r["kwargs"]["attempt"] for r in records(conn)] == [2, 2]
    assert conn.zcard("rq:failed:signals") == 0
    assert conn.keys("rq:job:*") == []


def test_job_whose_hash_vanished_while_it_ran_is_not_run_again(conn: redis.Redis, redis_url: str) -> None:
    """A batch whose job hash is deleted while it runs (a purge, Redis restarted without its data)
    finishes once: deleting the finished job (result TTL 0) does not fail it into a retry."""
    app = create_app()
    with app.app_context():
        for _ in range(2):
            slow.send("t", seconds=0.9)
    drain(app)
    [job_id] = job_ids(conn)
    env = dict(os.environ, PYTHONPATH=str(ROOT), SIGNAL_QUEUE_REDIS_URL=redis_url)
    worker = subprocess.Popen(
        [sys.executable, str(ROOT / "worker.py"), "--app", APP, "--burst"],
        cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )
    try:
        wait_until("the job to start", lambda: conn.hget(f"rq:job:{job_id}", "status") == b"started", 30, worker)
        assert conn.delete(f"rq:job:{job_id}") == 1
        _, stderr = worker.communicate(timeout=60)
    finally:
        if worker.poll() is None:
            worker.kill()
            worker.wait()
    assert worker.returncode == 0, stderr
    assert [r["receiver"] for r in records(conn)] == ["slow-done", "slow-done"], "each event ran once"
    assert "InvalidJobOperation" not in stderr
    assert conn.keys("rq:job:*") == [] and conn.zcard("rq:failed:signals") == 0

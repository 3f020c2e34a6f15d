"""Spool, replay and requeue: what an operator does after an outage or a bad deploy."""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import redis
from rq.job import Job
from rq.serializers import JSONSerializer

from devtools.redis_process import RedisProcess
from signal_queue import PayloadError
from signal_queue.wire.keys import SENT_KEY
from tests.conftest import ROOT, drain, queued_events, run_worker, wait_until
from tests.misc_app import create_app, fixable, misc
from tests.recording import records
from tests.redis_server import free_port

APP = "tests.misc_app:create_app()"


def flask_cli(url: str, spool: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, PYTHONPATH=str(ROOT), SIGNAL_QUEUE_REDIS_URL=url, SIGNAL_QUEUE_SPOOL_PATH=str(spool))
    return subprocess.run(
        [sys.executable, "-m", "flask", "--app", APP, "signal-queue", *args],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=60,
    )


def test_spooled_events_are_replayed_by_the_app_when_redis_returns(tmp_path: Path) -> None:
    """Redis down: spooled, the breaker stops retrying each time; Redis back: the sender replays alone."""
    server = RedisProcess()
    app = create_app(SIGNAL_QUEUE_REDIS_URL=server.url, SIGNAL_QUEUE_SPOOL_PATH=str(tmp_path / "spool.sqlite3"))
    state = app.extensions["signal_queue"]
    client = app.test_client()
    try:
        for i in range(3):
            assert client.get(f"/emit/down{i}").status_code == 200
        drain(app)
        assert state.dispatcher.spool.depth()[1] == 3
        assert state.dispatcher.breaker.failures >= 1
        server.start()
        conn = redis.Redis.from_url(server.url)
        wait_until("the spool to be replayed", lambda: queued_events(conn) >= 3, 40)
        assert queued_events(conn) == 3, "replayed without any new request"
        assert state.dispatcher.spool.depth() == (0, 0)
        assert state.dispatcher.counters["replayed"] == 3
    finally:
        server.kill()


def test_replay_skips_batches_that_did_reach_redis(tmp_path: Path, conn: redis.Redis, redis_url: str) -> None:
    """A batch spooled although it got through (its reply was lost) is not sent twice."""
    app = create_app(SIGNAL_QUEUE_SPOOL_PATH=str(tmp_path / "spool.sqlite3"))
    dispatcher = app.extensions["signal_queue"].dispatcher
    outbox = app.extensions["signal_queue"].outbox
    with app.app_context():
        misc.send("x", value="once")
    events = list(outbox._pending)
    outbox._pending.clear()
    [batch] = dispatcher.prepare(events)
    dispatcher.send([batch])  # it reached Redis...
    dispatcher.spool.put([batch])  # ...and was spooled too, as a lost reply would make it
    assert conn.exists(SENT_KEY.format(batch.job_id))
    assert dispatcher.replay() == 0
    assert dispatcher.counters["replay_skipped"] == 1
    assert dispatcher.spool.depth() == (0, 0)
    run_worker(APP, redis_url)
    assert [r["kwargs"]["value"] for r in records(conn)] == ["once"]


def test_unwritable_spool_is_logged_loudly_and_the_request_succeeds(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Redis down and the spool unwritable: counted as lost, logged as an error, the request still 200."""
    blocker = tmp_path / "not-a-directory"
    blocker.write_text("a file where the spool's folder should be")
    app = create_app(
        SIGNAL_QUEUE_REDIS_URL=f"redis://127.0.0.1:{free_port()}/0",
        SIGNAL_QUEUE_SPOOL_PATH=str(blocker / "spool.sqlite3"),
    )
    with caplog.at_level(logging.ERROR, logger="signal_queue"):
        assert app.test_client().get("/emit/lost").status_code == 200
        drain(app)
    assert app.extensions["signal_queue"].dispatcher.counters["lost"] == 1
    assert "1 event(s) were LOST: Redis failed" in caplog.text
    assert "could not be written" in caplog.text and "not-a-directory" in caplog.text


def test_flask_replay_command_sends_the_spool(tmp_path: Path, conn: redis.Redis, redis_url: str) -> None:
    """`flask signal-queue replay` sends what a dead process left in the spool."""
    spool = tmp_path / "spool.sqlite3"
    down = create_app(SIGNAL_QUEUE_REDIS_URL=f"redis://127.0.0.1:{free_port()}/0", SIGNAL_QUEUE_SPOOL_PATH=str(spool))
    down.test_client().get("/emit/left-behind")
    drain(down)
    out = flask_cli(redis_url, spool, "replay")
    assert out.returncode == 0, out.stderr
    assert "1 event(s) in 1 batch(es)" in out.stdout and "replayed 1 event(s)" in out.stdout
    assert queued_events(conn) == 1
    again = flask_cli(redis_url, spool, "replay", "--json")
    assert json.loads(again.stdout)["left"] == 0


def test_always_failing_event_is_requeued_after_the_fix(tmp_path: Path, conn: redis.Redis, redis_url: str) -> None:
    """Failed registry holds the event with its error; `requeue --receiver` after the fix runs it."""
    app = create_app()
    with app.app_context():
        fixable.send("shop", order_id=7)
        misc.send("shop", value="unrelated")
    drain(app)
    run_worker(APP, redis_url)
    assert conn.zcard("rq:failed:signals") == 1
    spool = tmp_path / "spool.sqlite3"

    listed = flask_cli(redis_url, spool, "failed", "--json")
    assert listed.returncode == 0, listed.stderr
    [row] = json.loads(listed.stdout)
    assert (row["signal"], row["receiver"]) == ("fixable", "tests.misc_app:on_fixable")
    assert row["error"] == "RuntimeError: order 7: bug not fixed yet"
    human = flask_cli(redis_url, spool, "failed", "--receiver", "tests.misc_app:on_fixable")
    assert "fixable -> tests.misc_app:on_fixable" in human.stdout and "1 failed" in human.stdout
    info = json.loads(flask_cli(redis_url, spool, "info", "--json").stdout)
    [queue] = info["queues"]
    assert (queue["name"], queue["failed"], queue["jobs_waiting"]) == ("signals", 1, 0)
    assert {"signal": "fixable", "receiver": "tests.misc_app:on_fixable", "queue": "signals"} in info["receivers"]
    assert info["spool"]["events"] == 0
    assert info["counters"] == {
        "enqueued": 2, "replayed": 0, "handled": 1, "failed": 1, "spooled": 0, "lost": 0, "dropped": 0
    }
    nothing = flask_cli(redis_url, spool, "requeue", "--receiver", "tests.misc_app:on_misc")
    assert "requeued 0 job(s)" in nothing.stdout
    conn.set("sq:test:fixed", 1)  # the deploy
    out = flask_cli(redis_url, spool, "requeue", "--receiver", "tests.misc_app:on_fixable", "--json")
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout) == {"requeued": [row["job_id"]]}
    run_worker(APP, redis_url)
    assert [r["kwargs"].get("order_id") for r in records(conn) if r["receiver"] == "fixable"] == [7]
    assert conn.zcard("rq:failed:signals") == 0
    usage = flask_cli(redis_url, spool, "requeue")
    assert usage.returncode != 0 and "--all, --receiver NAME or --id ID" in usage.stderr


def test_jobs_queued_before_a_setting_was_lowered_run_after_a_requeue(
    tmp_path: Path, conn: redis.Redis, redis_url: str
) -> None:
    """A worker refuses a failure TTL larger than its own; `requeue` gives the job this worker's settings."""
    app = create_app(SIGNAL_QUEUE_FAILURE_TTL=10**8)  # the app as it was configured before the change
    with app.app_context():
        misc.send("shop", value="queued-before")
    drain(app)
    run_worker(APP, redis_url)  # today's config: SIGNAL_QUEUE_FAILURE_TTL one year
    [job_id] = [j.decode() for j in conn.zrange("rq:failed:signals", 0, -1)]
    assert records(conn) == []
    spool = tmp_path / "spool.sqlite3"
    [row] = json.loads(flask_cli(redis_url, spool, "failed", "--json").stdout)
    assert "field 'failure_ttl' is 100000000, more than this worker sets (31536000)" in row["error"]

    out = flask_cli(redis_url, spool, "requeue", "--all", "--json")
    assert json.loads(out.stdout) == {"requeued": [job_id]}
    assert conn.hget(f"rq:job:{job_id}", "failure_ttl") == b"31536000"
    run_worker(APP, redis_url)
    assert [r["kwargs"]["value"] for r in records(conn)] == ["queued-before"]
    assert conn.zcard("rq:failed:signals") == 0


def test_oversized_event_is_refused_at_emit(conn: redis.Redis) -> None:
    """Kwargs over SIGNAL_QUEUE_MAX_EVENT_BYTES raise PayloadError naming the largest key; nothing sent.
    In production (the policy "auto" in an app that is not testing) the largest kwarg is replaced
    by a marker the worker fails the event with, and the small ones are kept."""
    app = create_app(SIGNAL_QUEUE_MAX_EVENT_BYTES=1000, SIGNAL_QUEUE_UNSENDABLE="raise")
    with app.app_context(), pytest.raises(PayloadError) as info:
        misc.send("x", value="y" * 5000)
    assert "over SIGNAL_QUEUE_MAX_EVENT_BYTES (1000)" in str(info.value)
    assert info.value.key == "value" and "tests.misc_app:on_misc" in str(info.value)
    with app.app_context(), pytest.raises(PayloadError):
        misc.send("x", value={"nested": ["z" * 2000]})
    drain(app)
    assert queued_events(conn) == 0

    app = create_app(SIGNAL_QUEUE_MAX_EVENT_BYTES=1000)
    with app.app_context():
        misc.send("x", value="y" * 5000, note="kept")
    drain(app)
    [job_id] = conn.lrange("rq:queue:signals", 0, -1)
    [event] = Job.fetch(job_id.decode(), connection=conn, serializer=JSONSerializer).args[0]
    assert event["kwargs"]["note"] == "kept"
    assert event["kwargs"]["value"]["__sq__"] == "unsendable"
    assert "over SIGNAL_QUEUE_MAX_EVENT_BYTES (1000)" in event["kwargs"]["value"]["reason"]


def test_worker_with_a_wrong_password_says_so(redis_url: str) -> None:
    """A wrong Redis password stops the worker at once with a message naming the (masked) URL."""
    server = RedisProcess()
    server.start()
    try:
        redis.Redis.from_url(server.url).config_set("requirepass", "right")
        url = f"redis://:wrong@127.0.0.1:{server.port}/0"
        out = subprocess.run(
            [sys.executable, "worker.py", "--app", APP, "--url", url, "--burst"],
            cwd=ROOT, env=dict(os.environ, PYTHONPATH=str(ROOT)), capture_output=True, text=True, timeout=60,
        )
        assert out.returncode == 2
        assert f"Redis at redis://:***@127.0.0.1:{server.port}/0 refused the worker" in out.stderr
        assert "wrong" not in out.stderr.replace("WRONGPASS", "")
    finally:
        server.kill()


def test_emits_with_redis_up_touch_no_disk(tmp_path: Path, conn: redis.Redis) -> None:
    """While Redis answers, the spool file is never created: emits cost no disk I/O."""
    spool = tmp_path / "spool.sqlite3"
    app = create_app(SIGNAL_QUEUE_SPOOL_PATH=str(spool))
    client = app.test_client()
    for i in range(50):
        client.get(f"/emit/{i}")
    drain(app)
    assert queued_events(conn) == 50
    assert not spool.exists() and list(tmp_path.iterdir()) == []


def test_event_lines_at_debug(conn: redis.Redis, redis_url: str) -> None:
    """--logging-level DEBUG: a line per handled event too, with its fields, next to the batch's line."""
    app = create_app()
    with app.app_context():
        misc.send("x", value="a")
        misc.send("x", value="b")
    drain(app)
    out = run_worker(APP, redis_url, "--logging-level", "DEBUG")
    handled = [line for line in out.stderr.splitlines() if "signal_queue.events DEBUG event_id=" in line]
    assert len(handled) == 2, out.stderr
    for line in handled:
        assert "signal=misc receiver=tests.misc_app:on_misc attempt=1 duration_ms=" in line
        assert line.endswith("outcome=handled")
    assert sum("signal_queue.events INFO job_id=" in line for line in out.stderr.splitlines()) == 1


def test_metrics_logs_and_purge(tmp_path: Path, conn: redis.Redis, redis_url: str) -> None:
    """Counters in Prometheus text, one log line per event from the worker, purge with confirmation."""
    app = create_app()
    with app.app_context():
        misc.send("x", value="a")
        misc.send("x", value="b")
        fixable.send("x", order_id=1)
    drain(app)
    out = run_worker(APP, redis_url)
    # At INFO (the default): one line per batch job, and one per failed event (WARNING); handled events
    # have a line of their own at DEBUG only.
    job_lines = [line for line in out.stderr.splitlines() if "signal_queue.events INFO job_id=" in line]
    assert len(job_lines) == 1, out.stderr
    assert " attempt=1 events=3 handled=2 failed=1 " in job_lines[0]
    assert "receivers=misc->tests.misc_app:on_misc(2),fixable->tests.misc_app:on_fixable(1)" in job_lines[0]
    assert "outcome=handled" not in out.stderr
    [failed] = [line for line in out.stderr.splitlines() if "outcome=failed" in line]
    assert "signal_queue.events WARNING event_id=" in failed
    assert "receiver=tests.misc_app:on_fixable attempt=1" in failed
    assert "error=RuntimeError: order 1: bug not fixed yet" in failed

    spool = tmp_path / "spool.sqlite3"
    metrics = flask_cli(redis_url, spool, "metrics").stdout
    assert "# TYPE signal_queue_enqueued_total counter" in metrics
    assert "\nsignal_queue_enqueued_total 3\n" in metrics
    assert "\nsignal_queue_handled_total 2\n" in metrics
    assert "\nsignal_queue_failed_total 1\n" in metrics
    assert "\nsignal_queue_spool_events 0\n" in metrics

    assert flask_cli(redis_url, spool, "purge").returncode != 0, "purge needs to be told what"
    refused = flask_cli(redis_url, spool, "purge", "--failed")  # no input: the confirmation says no
    assert refused.returncode != 0 and "Delete 1 failed event(s) for good?" in refused.stdout
    assert conn.zcard("rq:failed:signals") == 1
    done = flask_cli(redis_url, spool, "purge", "--failed", "--yes")
    assert done.returncode == 0 and "purged 1 failed event(s)" in done.stdout
    assert conn.zcard("rq:failed:signals") == 0


def test_metrics_view_serves_prometheus_text(conn: redis.Redis) -> None:
    """metrics_view mounted on the app serves the same text."""
    from signal_queue.metrics import metrics_view

    app = create_app()
    app.add_url_rule("/metrics", view_func=metrics_view)
    app.test_client().get("/emit/one")
    drain(app)
    response = app.test_client().get("/metrics")
    assert response.status_code == 200 and response.mimetype == "text/plain"
    body = response.get_data(as_text=True)
    assert "\nsignal_queue_enqueued_total 1\n" in body
    assert "\nsignal_queue_process_emitted_total 1\n" in body


HOST_A = """
import sys
from tests.misc_app import create_app
app = create_app()
client = app.test_client()
for i in range(int(sys.argv[1])):
    assert client.get(f"/emit/host-a-{i}").status_code == 200
app.extensions["signal_queue"].outbox.flush()
print("spooled", flush=True)
sys.stdin.read()  # alive until killed, as a host that goes away with its app running
"""


def test_spool_of_a_dead_host_is_replayed_on_another_host(tmp_path: Path, conn: redis.Redis, redis_url: str) -> None:
    """Host A spools during an outage and dies; its spool file, copied elsewhere, is replayed once."""
    host_a, rescue = tmp_path / "host-a", tmp_path / "rescue"
    host_a.mkdir()
    env = dict(
        os.environ, PYTHONPATH=str(ROOT), SIGNAL_QUEUE_SPOOL_PATH=str(host_a / "spool.sqlite3"),
        SIGNAL_QUEUE_REDIS_URL=f"redis://127.0.0.1:{free_port()}/0",  # Redis unreachable from host A
    )
    with subprocess.Popen(
        [sys.executable, "-c", HOST_A, "25"], cwd=ROOT, env=env, text=True,
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
    ) as app_a:
        try:
            assert app_a.stdout is not None and app_a.stdout.readline().strip() == "spooled"
        finally:
            app_a.kill()  # SIGKILL: no atexit, no clean close of the SQLite file
            app_a.wait(timeout=30)
    # The host is gone; its disk is mounted elsewhere: copy what was on it (the WAL files included).
    shutil.copytree(host_a, rescue)
    spool = rescue / "spool.sqlite3"

    out = flask_cli(redis_url, spool, "replay", "--json")
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout) == {"spool": str(spool), "replayed": 25, "skipped": 0, "left": 0}
    # Someone replays the original disk too: the batches are in Redis already and not sent again.
    twice = flask_cli(redis_url, host_a / "spool.sqlite3", "replay", "--json")
    assert json.loads(twice.stdout) == {"spool": str(host_a / "spool.sqlite3"), "replayed": 0, "skipped": 25, "left": 0}

    run_worker(APP, redis_url)
    values = sorted(r["kwargs"]["value"] for r in records(conn))
    assert values == sorted(f"host-a-{i}" for i in range(25)), "each event of host A handled exactly once"

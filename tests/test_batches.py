"""How the default worker runs a batch in its handler process: what the batch shares, and what it must not.

The handler process answers each event before it starts the next, and wakes
the worker only every few answers; it reads each request snapshot and builds
each request's WSGI environ once per batch; it sets the timeout timer only when
the one pending does not fit. These tests put a crash, a timeout and handlers
that change their contexts at the places where that could show. Real worker
processes on a private redis-server.
"""

from __future__ import annotations

import collections
import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from flask import Flask
from rq.job import Job
from rq.serializers import JSONSerializer

from devtools.redis_process import RedisProcess
from signal_queue import SignalQueue
from signal_queue.consumer.handler_process import WAKE_EVERY
from tests.conftest import ROOT, drain, wait_until
from tests.test_faults import fault_env
from tests.test_poison import alive, descendants, entries, settled, worker_log

BATCH_APP = "tests.batch_app:create_app()"


@pytest.fixture
def app(server: RedisProcess, tmp_path: Path) -> Iterator[Flask]:
    """The batch app on the test's Redis; its events wait for drain() (a long linger), so they make one batch."""
    from tests.batch_app import create_app

    made = create_app(
        SIGNAL_QUEUE_REDIS_URL=server.url, SIGNAL_QUEUE_SPOOL_PATH=str(tmp_path / "app.sqlite3"), SIGNAL_QUEUE_LINGER=5
    )
    yield made
    SignalQueue.close(made)


@pytest.fixture
def worker(server: RedisProcess, tmp_path: Path) -> Iterator[subprocess.Popen[bytes]]:
    """One default worker for the batch app; at the end it and every process it forked are killed."""
    env = fault_env(server.url, tmp_path / "handled.log", tmp_path / "spool.sqlite3")
    with open(env["FAULT_LOG"] + ".worker", "ab") as out:
        proc = subprocess.Popen(
            [sys.executable, "worker.py", "--app", BATCH_APP], cwd=ROOT, env=env, stdout=out, stderr=out
        )
    yield proc
    family = descendants(proc.pid)
    if proc.poll() is None:
        proc.kill()
    proc.wait()
    for pid in family:
        if alive(pid):
            os.kill(pid, signal.SIGKILL)


def test_crashes_between_wakes_run_every_other_event_once(
    tmp_path: Path, client: redis.Redis, app: Flask, worker: subprocess.Popen[bytes]
) -> None:
    """A batch of 60: an os._exit two answers after a wake, a segfault two answers after a wake of the next
    handler process. The answers the worker was not woken for are settled (not run again), each crash fails
    alone and is retried once on its own, and every other event runs exactly once."""
    from tests.batch_app import crash, step

    log = tmp_path / "handled.log"
    steps = 0
    with app.app_context():
        for position in range(3 * WAKE_EVERY):
            if position in (WAKE_EVERY + 2, 2 * WAKE_EVERY + 5):
                crash.send("test", n=position, how="exit" if position < 2 * WAKE_EVERY else "segfault")
            else:
                step.send("test", n=position)
                steps += 1
    drain(app)
    assert client.llen("rq:queue:signals") == 1, "the events travel in one job"
    wait_until("the batch and the retries to settle", lambda: settled(client) and len(entries(log, "start")) >= 4,
               60)
    ran = collections.Counter(r[4] for r in entries(log, "ran"))
    starts = collections.Counter(r[4] for r in entries(log, "start"))
    stats = {k.decode(): int(v) for k, v in client.hgetall("sq:stats").items()}
    print(f"\ncrashes between wakes: steps that ran {len(ran)}/{steps}, most runs of one {max(ran.values())}, "
          f"starts of the crashing events {dict(starts)}, counters {stats}")
    assert len(ran) == steps and set(ran.values()) == {1}, "every other event ran exactly once"
    assert starts == {str(WAKE_EVERY + 2): 2, str(2 * WAKE_EVERY + 5): 2}, "attempt 1 in the batch, 2 alone"
    assert stats.get("handled") == steps and stats.get("failed") == 4
    assert client.zcard("rq:failed:signals") == 2
    assert worker_log(log).count("crashed the handler process") == 4 and worker.poll() is None


def test_each_event_gets_its_own_timeout_whatever_timer_is_pending(
    tmp_path: Path, client: redis.Redis, app: Flask, worker: subprocess.Popen[bytes]
) -> None:
    """Timeout 1 s, returns at once; timeout 60 s, sleeps 2.5 s; timeout 1 s, sleeps 30 s; a step. The timer
    left pending by the first does not end the second, and the third ends at its own 1 s."""
    from tests.batch_app import linger, nap, step

    log = tmp_path / "handled.log"
    with app.app_context():
        nap.send("test", n=0, seconds=0)
        linger.send("test", n=1, seconds=2.5)
        nap.send("test", n=2, seconds=30)
        step.send("test", n=3)
    drain(app)
    wait_until("the batch to settle", lambda: settled(client) and any(r[4] == "3" for r in entries(log, "ran")), 60)
    ran = [r[4] for r in entries(log, "ran")]
    errors = [e.decode() for e in client.zrange("rq:failed:signals", 0, -1)]
    print(f"\ntimeouts in one batch: ran {ran}, failed {len(errors)}")
    assert ran == ["0", "1", "3"], "the 60 s event ran to its end; the 30 s nap was ended"
    [failed] = errors
    result = Job.fetch(failed, connection=client, serializer=JSONSerializer).latest_result()
    assert result is not None and "JobTimeoutException: Task exceeded maximum timeout value (1 seconds)" in str(
        result.exc_string
    )
    assert int(client.hget("sq:stats", "handled") or 0) == 3


def test_events_of_one_request_each_see_the_request_as_it_was(
    tmp_path: Path, client: redis.Redis, app: Flask, worker: subprocess.Popen[bytes]
) -> None:
    """One request's five events in one batch share its snapshot and its WSGI environ; every other handler
    changes g, the request (environ, view args, an attribute) and the snapshot in place. Each of the others
    sees the request as it was."""
    log = tmp_path / "handled.log"
    assert app.test_client().get("/orders/7?x=1", headers={"X-Test": "one"}).status_code == 200
    drain(app)
    assert client.llen("rq:queue:signals") == 1
    wait_until("the five events", lambda: settled(client) and len(entries(log, "ran")) == 5, 60)
    seen = [json.loads(r[5]) for r in entries(log, "ran") if int(r[4]) % 2 == 0]
    print(f"\none request, five events: what the observers saw {seen[0]}; all alike: "
          f"{all(s == seen[0] for s in seen)}")
    assert len(seen) == 3 and all(s == seen[0] for s in seen), seen
    assert seen[0] == {
        "g": {"tenant": "acme"}, "path": "/orders/7", "args": {"x": "1"}, "view_args": {"order": 7},
        "endpoint": "order", "rule": "/orders/<int:order>", "routing_exception": None,
        "header": "one", "mutated": None, "attribute": None, "snapshot_view_args": {"order": 7},
        "snapshot_headers": seen[0]["snapshot_headers"], "remote_addr": "127.0.0.1",
    }
    # A request no route matches: each event's request has Flask's NotFound, as the emit's had.
    from tests.batch_app import observe

    with app.test_request_context("/nowhere/3"):
        observe.send("test", n=10)
        observe.send("test", n=12)
    drain(app)
    wait_until("the two events", lambda: settled(client) and len(entries(log, "ran")) == 7, 60)
    unrouted = [json.loads(r[5]) for r in entries(log, "ran") if int(r[4]) >= 10]
    assert [(s["path"], s["endpoint"], s["rule"], s["view_args"], s["routing_exception"]) for s in unrouted] == [
        ("/nowhere/3", None, None, None, "NotFound")
    ] * 2, unrouted

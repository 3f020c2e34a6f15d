"""signal_queue's uses of RQ internals (signal_queue.consumer.rq_compat) still fit the installed RQ."""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import inspect
import threading
import time
from typing import Any

import pytest
import redis
import rq
from rq import Queue
from rq.executions import Execution
from rq.job import JobStatus
from rq.serializers import JSONSerializer

from signal_queue import SignalQueue
from signal_queue.consumer.job import SignalJob
from signal_queue.consumer.rq_compat import CHECKED_RQ, MAINTENANCE_LOCK_TTL, MIRRORED, CompatQueue, rq_version_checked
from signal_queue.consumer.worker import SignalWorker, build_worker
from tests.conftest import drain, wait_until
from tests.misc_app import create_app, misc


def resolve(dotted: str) -> Any:
    parts = dotted.split(".")
    for i in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:i]))
        except ImportError:
            continue
        for attr in parts[i:]:
            obj = getattr(obj, attr)
        return obj
    raise ImportError(dotted)


def test_installed_rq_is_a_version_the_compat_module_was_checked_against() -> None:
    """pyproject pins rq to the checked minor versions; an rq outside them fails here first."""
    assert rq_version_checked(), f"rq {rq.__version__} is not among {CHECKED_RQ}: check rq_compat against it"


@pytest.mark.parametrize("name", sorted(MIRRORED))
def test_mirrored_rq_code_is_unchanged(name: str) -> None:
    """The RQ code rq_compat copies or overrides is the code it was checked against."""
    digest = hashlib.sha256(inspect.getsource(resolve(name)).encode()).hexdigest()[:16]
    assert digest == MIRRORED[name], (
        f"{name} changed in rq {rq.__version__}: read it against signal_queue/consumer/rq_compat.py, "
        f"then set its digest to {digest}"
    )


def test_job_taken_but_never_started_goes_back_at_once(redis_url: str) -> None:
    """A worker that lost Redis between taking a job and starting it returns the job itself.

    RQ's own clean-up would return it only after a minute (its intermediate-queue rule).
    """
    app = create_app()
    with app.app_context():
        misc.send("x", value="taken")
    drain(app)
    conn = redis.Redis.from_url(redis_url)
    worker = build_worker(SignalQueue.state(app).consumer, url=redis_url)
    assert isinstance(worker, SignalWorker)
    queue = Queue("signals", connection=conn, serializer=JSONSerializer)
    [job_id] = [j.decode() for j in conn.lrange(queue.key, 0, -1)]
    conn.lmove(queue.key, queue.intermediate_queue_key)  # what RQ's dequeue does
    job = SignalJob.fetch(job_id, connection=conn, serializer=JSONSerializer)
    worker.taking = (job_id, queue)
    worker.prepare_execution(job)  # RQ registers the execution... then Redis went away before the start
    assert conn.zcard(queue.started_job_registry.key) == 1

    assert worker.return_untaken_job() == job_id
    assert [j.decode() for j in conn.lrange(queue.key, 0, -1)] == [job_id]
    assert conn.llen(queue.intermediate_queue_key) == 0
    assert conn.zcard(queue.started_job_registry.key) == 0, "no stale execution left to look abandoned"
    assert worker.return_untaken_job() is None, "nothing left to return"


def test_maintenance_lock_left_by_a_dead_worker_expires_in_a_minute(redis_url: str) -> None:
    """Our workers' queues hold RQ's clean-up lock for 60 s, not 899 s, so recovery is not blocked long."""
    worker = build_worker(SignalQueue.state(create_app()).consumer, ["signals"], url=redis_url)
    [queue] = worker.queues
    assert isinstance(queue, CompatQueue)
    assert queue.acquire_maintenance_lock()
    assert not queue.acquire_maintenance_lock(), "still one cleaner at a time"
    conn = redis.Redis.from_url(redis_url)
    assert 0 < conn.ttl(queue.registry_cleaning_key) <= MAINTENANCE_LOCK_TTL == 60


def test_the_worker_notes_the_job_it_takes_before_running_it(redis_url: str) -> None:
    """The note is made when RQ takes the job, so a failure right after (a heartbeat) still knows it."""
    app = create_app()
    with app.app_context():
        misc.send("x", value="noted")
    drain(app)
    worker = build_worker(SignalQueue.state(app).consumer, url=redis_url)
    CompatQueue.taken = None
    result = CompatQueue.dequeue_any(
        worker.queues, None, connection=worker.connection, job_class=SignalJob, serializer=worker.serializer
    )
    assert result is not None
    job, queue = result
    assert CompatQueue.taken == (job.id, queue)
    assert worker.return_untaken_job() == job.id, "taken, not started: put back"
    assert redis.Redis.from_url(redis_url).lrange(queue.key, 0, -1) == [job.id.encode()]


def queues_of(conn: redis.Redis, *names: str) -> list[CompatQueue]:
    return [CompatQueue(n, connection=conn, serializer=JSONSerializer, job_class=SignalJob) for n in names]


def enqueue(conn: redis.Redis, name: str, value: str) -> str:
    """A real single-event job on queue ``name``, written by the app."""
    app = create_app(SIGNAL_QUEUE_QUEUE=name)
    before = set(conn.lrange(f"rq:queue:{name}", 0, -1))
    with app.app_context():
        misc.send("x", value=value)
    drain(app)
    [job_id] = set(conn.lrange(f"rq:queue:{name}", 0, -1)) - before
    return str(job_id.decode())


def test_a_take_whose_reply_was_lost_hands_the_same_job_again(conn: redis.Redis) -> None:
    """The take is idempotent for its process: asked again, it answers with the job it took, not the next."""
    first, second = enqueue(conn, "signals", "a"), enqueue(conn, "signals", "b")
    queues = queues_of(conn, "signals", "other")
    assert CompatQueue._take(conn, queues, hold=False) is not None  # ...and its reply never arrives
    assert conn.lrange("rq:queue:signals:intermediate", 0, -1) == [first.encode()], "taken, not popped"
    again = CompatQueue.dequeue_any(queues, None, connection=conn, job_class=SignalJob, serializer=JSONSerializer)
    assert again is not None and again[0].id == first
    assert conn.lrange("rq:queue:signals", 0, -1) == [second.encode()], "the next job is still queued"
    taker = CompatQueue._taker
    CompatQueue._taker = None  # another process asks
    try:
        other = CompatQueue.dequeue_any(queues, None, connection=conn, job_class=SignalJob, serializer=JSONSerializer)
    finally:
        CompatQueue._taker = taker
    assert other is not None and other[0].id == second


@pytest.mark.parametrize("names", [("signals",), ("signals", "second", "third")])
def test_an_idle_wait_wakes_when_any_queue_gets_a_job_and_takes_nothing_meanwhile(
    conn: redis.Redis, names: tuple[str, ...]
) -> None:
    """Blocked with a 10 s timeout, the take returns as soon as the last queue gets a job, not at the timeout."""
    queues = queues_of(conn, *names)
    done: list[Any] = []

    def take() -> None:
        got = CompatQueue.dequeue_any(queues, 10, connection=conn, job_class=SignalJob, serializer=JSONSerializer)
        done.append((got, time.monotonic()))

    thread = threading.Thread(target=take)
    thread.start()
    with contextlib.suppress(AssertionError):  # the assertion below says it
        wait_until("the take to block", lambda: conn.info("clients")["blocked_clients"] >= len(names), 10)
    assert conn.info("clients")["blocked_clients"] >= len(names), "the take is waiting on every queue"
    assert not done and conn.llen(f"rq:queue:{names[-1]}") == 0
    app = create_app(SIGNAL_QUEUE_QUEUE=names[-1])
    with app.app_context():
        misc.send("x", value="late")
    drain(app)  # returns once the job is in Redis
    pushed = time.monotonic()
    thread.join(timeout=10)
    [(got, at)] = done
    assert got is not None and got[1].name == names[-1] and got[0].args[0][0]["kwargs"] == {"value": "late"}
    assert at - pushed < 0.5, f"woke {at - pushed:.3f} s after the job arrived"
    assert all(conn.llen(f"rq:queue:{n}") == 0 for n in names)


def test_release_puts_back_what_a_stopping_worker_holds(conn: redis.Redis) -> None:
    """A job the blocking move held, and one whose take reply was never read, go back to their queue's front."""
    taken, held, queued = (enqueue(conn, "signals", v) for v in ("taken", "held", "queued"))
    [queue] = queues_of(conn, "signals")
    assert CompatQueue._take(conn, [queue], hold=False) is not None  # took "taken"; the reply was never read
    conn.lrem(queue.key, 1, held)
    conn.rpush(f"sq:hold:signals:{CompatQueue.taker()}", held)  # the wait's BLMOVE ran; its reply was lost
    assert CompatQueue.release(conn, [queue]) == 2
    assert [j.decode() for j in conn.lrange(queue.key, 0, -1)] == [taken, held, queued]
    assert conn.llen(queue.intermediate_queue_key) == 0 and conn.zcard("sq:taken:signals") == 0
    assert conn.llen(f"sq:hold:signals:{CompatQueue.taker()}") == 0


def test_a_wait_on_one_queue_brings_back_the_take_that_follows_it(conn: redis.Redis) -> None:
    """The blocking move and the take go in one write: the wait answers with the take's reply, so a job
    arriving at an idle worker costs it one round trip; without the script in Redis, the next take claims it."""
    first = enqueue(conn, "signals", "a")
    [queue] = queues_of(conn, "signals")
    hold = f"sq:hold:signals:{CompatQueue.taker()}"
    reply = CompatQueue._wait(conn, [queue], 1, hold=True)
    assert reply is not None and reply[1] == first.encode() and reply[2] == b"hash"
    assert conn.lrange(queue.intermediate_queue_key, 0, -1) == [first.encode()]
    assert conn.llen(hold) == 0 and conn.zscore("sq:taken:signals", first) is not None
    conn.lrem(queue.intermediate_queue_key, 1, first)
    conn.zrem("sq:taken:signals", first)
    second = enqueue(conn, "signals", "b")
    conn.script_flush()  # a restarted Redis, SCRIPT FLUSH: the take's EVALSHA fails
    assert CompatQueue._wait(conn, [queue], 1, hold=True) is None
    assert conn.lrange(hold, 0, -1) == [second.encode()]
    got = CompatQueue.dequeue_any([queue], 1, connection=conn, job_class=SignalJob, serializer=JSONSerializer)
    assert got is not None and got[0].id == second and conn.llen(hold) == 0


def test_deleting_a_finished_job_reads_its_status_and_executions_once(conn: redis.Redis) -> None:
    """RQ's delete of a job whose result is not kept read its execution registry three times and each
    execution twice (a round trip each); CompatJob's reads them once, and deletes the same keys."""
    enqueue(conn, "signals", "a")
    [queue] = queues_of(conn, "signals")
    got = CompatQueue.dequeue_any([queue], None, connection=conn, job_class=SignalJob, serializer=JSONSerializer)
    assert got is not None
    job = got[0]
    with conn.pipeline() as pipe:
        execution = Execution.create(job, 60, pipeline=pipe, worker_name="w")
        job.set_status(JobStatus.STARTED, pipeline=pipe)
        pipe.execute()
    assert conn.zcard(queue.started_job_registry.key) == 1
    conn.config_resetstat()
    with conn.pipeline() as pipe:
        job.delete(pipeline=pipe, remove_from_queue=False)
        pipe.execute()
    stats = conn.info("commandstats")
    reads = {name: stats.get(f"cmdstat_{name}", {}).get("calls", 0) for name in ("zrange", "hgetall", "hget")}
    assert reads == {"zrange": 1, "hgetall": 1, "hget": 1}
    assert not conn.exists(job.key, execution.key, f"rq:executions:{job.id}")
    assert conn.zcard(queue.started_job_registry.key) == 0

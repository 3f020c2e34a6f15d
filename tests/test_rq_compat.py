"""signal_queue's uses of RQ internals (signal_queue.consumer.rq_compat) still fit the installed RQ."""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import importlib
import inspect
import json
import random
import sys
import threading
import time
from typing import Any

import pytest
import redis
import rq
from rq import Queue, Worker
from rq.executions import Execution, ExecutionRegistry
from rq.job import Job, JobStatus
from rq.registry import StartedJobRegistry
from rq.serializers import JSONSerializer
from rq.utils import utcformat

from signal_queue import SignalQueue
from signal_queue.consumer.job import SignalJob
from signal_queue.consumer.rq_compat import (
    _LUA_COMMON,
    CHECKED_RQ,
    MAINTENANCE_LOCK_TTL,
    MIRRORED,
    CompatQueue,
    Starter,
    parse_rq_time,
    rq_version_checked,
)
from signal_queue.consumer.run import use_runner
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


def signal_worker(redis_url: str) -> SignalWorker:
    """A worker of the default queue that takes jobs as its loop does (nothing noted from an earlier test)."""
    worker = build_worker(SignalQueue.state(create_app()).consumer, ["signals"], url=redis_url)
    assert isinstance(worker, SignalWorker)
    worker.register_birth()
    CompatQueue.taken = CompatQueue.started = CompatQueue.read = None
    return worker


def starter_of(worker: SignalWorker) -> Starter:
    return Starter(worker.name, worker.key, worker.executions_key, worker.heartbeat_ttl)


def start_as_rq_reads_it(conn: redis.Redis, worker: SignalWorker, job: Job, execution: Execution) -> dict[str, Any]:
    """A started job as RQ (rq info, rq-dashboard, its registries) and the worker read it; ids and times
    replaced by whether they are what they should be."""
    now = time.time()
    ttl = worker.heartbeat_ttl
    fields = conn.hgetall(job.key)
    composite = f"{job.id}:{execution.id}"
    executions = [e.id for e in ExecutionRegistry(job.id, connection=conn).get_executions()]
    stored = Execution.fetch(execution.id, job.id, connection=conn)
    started_at = parse_rq_time(fields[b"started_at"]).timestamp()
    wip = conn.zscore(StartedJobRegistry("signals", connection=conn).key, composite)
    registry = conn.zscore(f"rq:executions:{job.id}", execution.id)
    return {
        "job fields": sorted(fields),
        "status": fields[b"status"],
        "worker_name is the worker's": fields[b"worker_name"] == worker.name.encode(),
        "started_at is now": abs(started_at - now) < 5,
        "last_heartbeat is started_at": fields[b"last_heartbeat"] == fields[b"started_at"],
        "attempts": fields[b"sq_attempts"],
        "job key lives on": conn.ttl(job.key),
        "status read by RQ": Job.fetch(job.id, connection=conn, serializer=JSONSerializer).get_status(),
        "in RQ's started registry": job.id in StartedJobRegistry("signals", connection=conn).get_job_ids(),
        "started registry score": wip is not None and abs(wip - now - ttl) <= 2,
        "executions read by RQ are this one": executions == [execution.id],
        "execution registry score": registry is not None and abs(registry - now - ttl - 60) <= 2,
        "execution registry ttl": 0 < conn.ttl(f"rq:executions:{job.id}") <= ttl + 60,
        "execution fields": sorted(conn.hgetall(execution.key)),
        "execution's worker and job": (stored.worker_name, stored.job_id) == (worker.name, job.id),
        "execution created now": abs(stored.created_at.timestamp() - now) < 5
        and abs(stored.last_heartbeat.timestamp() - now) < 5,
        "execution ttl": 0 < conn.ttl(execution.key) <= ttl,
        "in the worker's executions": conn.sismember(worker.executions_key, composite),
        "worker executions ttl": 0 < conn.ttl(worker.executions_key) <= ttl,
        "worker's state read by RQ": Worker.find_by_key(worker.key, connection=conn).get_state(),  # type: ignore[union-attr]
        "worker key ttl": 0 < conn.ttl(worker.key) <= ttl,
        "taken and not started": conn.lpos("rq:queue:signals:intermediate", job.id) is not None
        or conn.zscore("sq:taken:signals", job.id) is not None,
        "status in the worker": job.get_status(refresh=False),
        "worker_name in the worker": job.worker_name == worker.name,
        "execution in the worker": worker.executions.get(execution.id) is execution,
        "execution id in the worker": execution.composite_key == composite,
    }


def test_the_take_starts_the_job_as_rqs_own_start_transaction_does(redis_url: str, conn: redis.Redis) -> None:
    """The take that hands a worker its job also starts it, in the same script: the job, its execution,
    the registries and the worker read as after RQ's start transaction, and starting it then costs nothing."""
    enqueue(conn, "signals", "a")
    enqueue(conn, "signals", "b")
    worker = signal_worker(redis_url)
    # RQ's own start: a take that only takes (no worker asked it to start), then the start transaction.
    taken = CompatQueue.dequeue_any(
        worker.queues, None, connection=conn, job_class=SignalJob, serializer=JSONSerializer
    )
    assert taken is not None and conn.hget(taken[0].key, "status") == b"queued"
    by_transaction = start_as_rq_reads_it(conn, worker, taken[0], worker._start(taken[0]))
    # The worker's own take, from its loop.
    got = worker.dequeue_job_and_maintain_ttl(None)
    assert got is not None and got[0].id != taken[0].id
    job = got[0]
    assert conn.hget(job.key, "status") == b"started", "started by the take itself"
    assert job.attempt == 1, "the job's attempt is read before the take counted its start"
    conn.config_resetstat()
    execution = worker._start(job)
    assert not {k for k in conn.info("commandstats") if not k.startswith("cmdstat_config")}, "the start sent nothing"
    by_take = start_as_rq_reads_it(conn, worker, job, execution)
    assert by_take == by_transaction
    assert by_take["status"] == b"started" and by_take["attempts"] == b"1"
    assert by_take["executions read by RQ are this one"] and by_take["in RQ's started registry"]
    assert by_take["worker's state read by RQ"] == "busy" and not by_take["taken and not started"]


def test_lua_times_are_rqs_utcformat(conn: redis.Redis) -> None:
    """The start the take writes formats Redis's clock as RQ's utcformat does (leap days, centuries, ends of years)."""
    script = _LUA_COMMON + "return utc(tonumber(ARGV[1]), tonumber(ARGV[2]))"
    chosen = [0, 59, 86399, 86400, 951782399, 951782400, 951868800, 978307199, 1709164800, 1735689599,
              1795631728, 4107542399, 4107542400, 4102444800, 253402300799]
    rng = random.Random(13)
    for seconds in chosen + [rng.randrange(0, 253402300800) for _ in range(300)]:
        micros = rng.randrange(0, 1_000_000)
        expected = utcformat(dt.datetime.fromtimestamp(seconds, dt.timezone.utc).replace(microsecond=micros))
        assert conn.eval(script, 0, seconds, micros).decode() == expected, seconds


def test_a_starting_take_whose_reply_was_lost_hands_the_job_again_started_once(
    redis_url: str, conn: redis.Redis
) -> None:
    """A take that started its job and whose reply never arrived: asked again, it hands the same job over,
    with its lost start undone (no stray execution left to look abandoned) and the start counted once."""
    first, second = enqueue(conn, "signals", "a"), enqueue(conn, "signals", "b")
    worker = signal_worker(redis_url)
    CompatQueue.starter = starter_of(worker)
    try:
        lost = CompatQueue._take(conn, worker.queues, hold=False)  # ...and its reply never arrives
    finally:
        CompatQueue.starter = None
    assert lost is not None
    assert conn.hget(f"rq:job:{first}", "status") == b"started" and conn.zcard("rq:wip:signals") == 1
    got = worker.dequeue_job_and_maintain_ttl(None)
    assert got is not None and got[0].id == first
    started = CompatQueue.started
    assert started is not None and started.job_id == first
    assert [m.decode() for m in conn.zrange("rq:wip:signals", 0, -1)] == [f"{first}:{started.execution_id}"]
    assert conn.smembers(worker.executions_key) == {f"{first}:{started.execution_id}".encode()}
    assert len(list(conn.scan_iter("rq:execution:*"))) == 1, "the lost start's execution is gone"
    assert conn.hget(f"rq:job:{first}", "sq_attempts") == b"1" and got[0].attempt == 1
    assert conn.lrange("rq:queue:signals", 0, -1) == [second.encode()], "the next job is still queued"


def test_release_puts_back_a_job_its_take_started_and_nobody_read(redis_url: str, conn: redis.Redis) -> None:
    """A worker stopped while its take's reply is on its way: the job the take started goes back to the
    front of its queue, reading as queued and never started."""
    taken, queued = enqueue(conn, "signals", "taken"), enqueue(conn, "signals", "queued")
    worker = signal_worker(redis_url)
    [queue] = worker.queues
    CompatQueue.starter = starter_of(worker)
    try:
        assert CompatQueue._take(conn, [queue], hold=False) is not None  # the reply was never read
    finally:
        CompatQueue.starter = None
    assert conn.hget(f"rq:job:{taken}", "status") == b"started"
    assert CompatQueue.release(conn, [queue]) == 1
    assert [j.decode() for j in conn.lrange(queue.key, 0, -1)] == [taken, queued]
    job = Job.fetch(taken, connection=conn, serializer=JSONSerializer)
    assert job.get_status() == JobStatus.QUEUED and conn.hget(job.key, "sq_attempts") == b"0"
    assert conn.zcard("rq:wip:signals") == 0 and not list(conn.scan_iter("rq:execution*"))
    assert conn.scard(worker.executions_key) == 0 and conn.zcard("sq:taken:signals") == 0
    assert conn.llen(queue.intermediate_queue_key) == 0


def test_job_started_by_its_take_and_never_run_goes_back_at_once(redis_url: str, conn: redis.Redis) -> None:
    """Stopped (or cut off from Redis) after its take started a job and before the job reached its
    handlers, the worker puts it back at the front of its queue, unstarted, not after the abandoned bound."""
    job_id = enqueue(conn, "signals", "a")
    worker = signal_worker(redis_url)
    got = worker.dequeue_job_and_maintain_ttl(None)
    assert got is not None and got[0].id == job_id and conn.hget(got[0].key, "status") == b"started"
    worker._start(got[0])
    assert worker.return_untaken_job() == job_id
    assert conn.lrange("rq:queue:signals", 0, -1) == [job_id.encode()]
    assert Job.fetch(job_id, connection=conn, serializer=JSONSerializer).get_status() == JobStatus.QUEUED
    assert conn.hget(f"rq:job:{job_id}", "sq_attempts") == b"0"
    assert conn.zcard("rq:wip:signals") == 0 and not list(conn.scan_iter("rq:execution*"))
    assert worker.return_untaken_job() is None, "nothing left to return"


def test_a_job_reads_its_times_as_rq_does_without_strptime(conn: redis.Redis) -> None:
    """Loading a job gives the times RQ's own restore gives (also RQ's older form without microseconds),
    without strptime, which was the largest part of loading a job in the worker."""
    job_id = enqueue(conn, "signals", "a")
    key = f"rq:job:{job_id}"
    conn.hset(key, mapping={"started_at": "2026-11-25T18:00:00.123456Z", "ended_at": "2026-11-25T18:00:01.000001Z",
                            "last_heartbeat": "2026-11-25T18:00:00.500000Z"})
    times = ("created_at", "enqueued_at", "started_at", "ended_at", "last_heartbeat")
    strptime: list[str] = []

    def note(frame: Any, event: str, arg: Any) -> None:
        if event == "call" and frame.f_code.co_name == "_strptime":
            strptime.append(frame.f_code.co_filename)

    ours = SignalJob(job_id, connection=conn, serializer=JSONSerializer)
    raw = conn.hgetall(key)
    sys.setprofile(note)
    try:
        ours.restore(raw)
    finally:
        sys.setprofile(None)
    rqs = Job(job_id, connection=conn, serializer=JSONSerializer)
    rqs.restore(raw)
    assert {t: getattr(ours, t) for t in times} == {t: getattr(rqs, t) for t in times}
    assert all(getattr(ours, t).tzinfo is not None for t in times)
    assert not strptime, "the times were read without strptime"
    conn.hset(key, "ended_at", "2026-11-25T18:00:01Z")  # RQ's older form: read by RQ's own parser
    older = SignalJob(job_id, connection=conn, serializer=JSONSerializer)
    older.restore(conn.hgetall(key))
    assert older.refusal is None and older.ended_at == dt.datetime(2026, 11, 25, 18, 0, 1, tzinfo=dt.timezone.utc)


def test_a_first_attempt_reaches_its_handler_before_rqs_bookkeeping_and_starts_once(
    redis_url: str, conn: redis.Redis
) -> None:
    """A job its take started goes to the handler process as soon as it is loaded, before RQ logs it
    and runs its bookkeeping (execute_job); the job function then follows it: the event runs once,
    the job starts once, and nothing is left started."""
    job_id = enqueue(conn, "signals", "early")
    worker = signal_worker(redis_url)
    worker.get_redis_server_version()  # RQ's one look, made at the first job
    worker.handlers.start()
    use_runner(worker.handlers)
    try:
        got = worker.dequeue_job_and_maintain_ttl(None)
        assert got is not None and got[0].id == job_id
        wait_until("the handler to run the event before execute_job", lambda: conn.llen("sq:test:records") == 1, 10)
        assert conn.hget(f"rq:job:{job_id}", "sq_attempts") == b"1"
        worker.execute_job(*got)
    finally:
        use_runner(None)
        worker.handlers.close()
        worker.close_heartbeats()
    [record] = [json.loads(r) for r in conn.lrange("sq:test:records", 0, -1)]
    assert record["kwargs"] == {"value": "early"} and record["attempt"] == 1
    assert not conn.exists(f"rq:job:{job_id}"), "finished (its result is not kept)"
    assert conn.zcard("rq:wip:signals") == 0 and not list(conn.scan_iter("rq:execution*")), "started once, ended once"
    assert conn.scard(worker.executions_key) == 0


@pytest.mark.parametrize("by", ["take", "release"])
@pytest.mark.parametrize("known", ["marks", "read"])
def test_a_job_cut_short_after_it_ran_is_never_handed_again_as_a_first_attempt(
    redis_url: str, conn: redis.Redis, known: str, by: str
) -> None:
    """A job its take started, which ran, and whose end a Redis fault cut short (the worker restarts in the same
    process), stays started for RQ's clean-up of abandoned jobs, which runs it again reading its done marks. The
    next take of the process, or its release, does not undo its start as that of a take whose reply was lost
    (that would run its events again as a first attempt). It knows by the job's done marks, or else because
    the process read the job."""
    first, second = enqueue(conn, "signals", "a"), enqueue(conn, "signals", "b")
    worker = signal_worker(redis_url)
    got = worker.dequeue_job_and_maintain_ttl(None)
    assert got is not None and got[0].id == first
    if known == "marks":
        conn.hset(f"rq:job:{first}", "sq_done", ",0")  # its event ran and was marked done
        CompatQueue.read = None  # ...even if the process forgot it
    CompatQueue.taken = CompatQueue.started = None  # run_worker's return_untaken_job after the fault
    if by == "take":
        again = worker.dequeue_job_and_maintain_ttl(None)
        assert again is not None and again[0].id == second, "the next job, not the one cut short"
    else:
        assert CompatQueue.release(conn, worker.queues) == 0, "a stop does not put it back"
        assert conn.lrange("rq:queue:signals", 0, -1) == [second.encode()]
    job = Job.fetch(first, connection=conn, serializer=JSONSerializer)
    assert job.get_status() == JobStatus.STARTED and conn.hget(job.key, "sq_attempts") == b"1"
    assert first in StartedJobRegistry("signals", connection=conn).get_job_ids()

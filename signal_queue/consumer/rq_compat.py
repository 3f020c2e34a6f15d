"""Every use of RQ's non-public API in signal_queue, in one place.

Everything else in the package uses RQ's public API (``Queue``, ``Job.fetch``,
registries, ``enqueue_many``, ``get_current_job``...). What is here overrides
or calls RQ internals, each with the RQ code it mirrors; it was checked against
the RQ minor versions in :data:`CHECKED_RQ` (pyproject pins ``rq`` to them), and
``tests/test_rq_compat.py`` fails if the RQ code mirrored here changes.
"""

from __future__ import annotations

import datetime as dt
import threading
import time
from collections.abc import Callable
from typing import Any, ClassVar

import redis
import rq
from rq import Queue, SimpleWorker
from rq.exceptions import DeserializationError, StopRequested
from rq.job import Job
from rq.results import Result
from rq.utils import as_text, str_to_date
from rq.worker import BaseWorker, WorkerStatus
from rq.worker_registration import register as register_worker

from .redis_faults import describe, transient_cause

#: The RQ minor versions this module was checked against.
CHECKED_RQ = ("3.0",)

#: The RQ code this module copies, overrides or depends on the inside of, with the first
#: 16 hex digits of the SHA-256 of its source as checked (rq 3.0.0). A test compares them
#: with the installed RQ: when one changes, read the new code against this module, then
#: update the digest.
MIRRORED = {
    "rq.worker.SimpleWorker.execute_job": "eae0f23110aeb280",
    "rq.worker.BaseWorker.maintain_heartbeats": "b73451c9b97f7247",
    "rq.worker.BaseWorker.get_heartbeat_ttl": "8878c9689380486b",
    "rq.worker.BaseWorker.prepare_execution": "899b4eaa689fcf35",
    "rq.worker.BaseWorker.request_stop": "f934e7e7e6eecfee",
    "rq.job.Job.restore": "859daf950a3ede0b",
    "rq.job.Job.to_dict": "9e1a56a9cd4b57e5",  # the fields SignalJob's allow-list knows
    "rq.job.Job._deserialize_data": "00c06178d415b147",
    "rq.job.Job.prepare_for_execution": "4e8e0eca634da20b",
    "rq.queue.Queue.acquire_maintenance_lock": "ebdce3e6d60ef394",
    "rq.queue.Queue.dequeue_any": "2452e56ad5197396",
    "rq.intermediate_queue.IntermediateQueue.get_first_seen_key": "59872b5c87c5bd19",
    "rq.intermediate_queue.IntermediateQueue.should_be_cleaned_up": "adb9f8c95fc4d7b5",
    "rq.results.Result.create_failure": "f5b597594c3dcad3",
    # FaultAwareWorker: the loop ends quietly on StopRequested (RedisFault is one); the dequeue
    # loop retries connection errors itself, a line per try; the five calls the loop makes.
    "rq.worker.BaseWorker.work": "04b5cdf8e554d8a2",
    "rq.worker.BaseWorker.dequeue_job_and_maintain_ttl": "2715cf34d9e3af3b",
    "rq.worker.BaseWorker.check_for_suspension": "e8095ae1fcf966bd",
    "rq.worker.BaseWorker.run_maintenance_tasks": "3d8a446b5354fce3",
    "rq.worker.BaseWorker._pubsub_exception_handler": "5213e36c3b773343",
    "rq.worker.BaseWorker.heartbeat": "63b1089fd146d19c",
    "rq.worker.BaseWorker.register_birth": "4690ab4f7b74ffb2",
    "rq.worker.BaseWorker.should_run_maintenance_tasks.fget": "eda86dbb1a00e8a8",
    "rq.worker_registration.register": "757bc1c839a259c8",
    "rq.worker.BaseWorker.register_death": "cb2b0be150213a99",
    "rq.utils.str_to_date": "7e4d7f7531e244f7",
}


def rq_version_checked() -> bool:
    """True if the installed RQ is one of :data:`CHECKED_RQ`."""
    return ".".join(rq.__version__.split(".")[:2]) in CHECKED_RQ


def parse_rq_time(value: bytes | str) -> dt.datetime:
    """A time as RQ writes it in a job hash (rq 3.0 ``rq.utils.str_to_date``); ValueError if it is not one."""
    return str_to_date(value)


def record_failure_result(job: Job, ttl: int, exc_string: str, pipeline: Any) -> None:
    """Store a failure result for ``job``, as RQ's worker does for a job that raised
    (rq 3.0 ``Result.create_failure``, called from ``Job._handle_failure``)."""
    Result.create_failure(job, ttl, exc_string, pipeline=pipeline)


class CompatJob(Job):
    """RQ's Job with the hooks signal_queue needs: loading from a checked hash, and counting starts."""

    def restore(self, raw_data: Any) -> Any:
        # rq 3.0 Job.restore(raw_data): called by Job.fetch/refresh with the job hash as
        # HGETALL returns it. We hand RQ's parser only the fields load() allows.
        return self.load({as_text(k): v for k, v in raw_data.items()})

    def load(self, fields: dict[str, Any]) -> Any:
        """Read the job hash (field names as text); subclasses check it and call :meth:`load_checked`."""
        return self.load_checked(fields)

    def load_checked(self, fields: dict[str, Any]) -> Any:
        """RQ's own parsing of a job hash (rq 3.0 ``Job.restore``)."""
        return super().restore(fields)

    def set_call(self, func_name: str, args: tuple[Any, ...]) -> None:
        """Set the call RQ's logging and bookkeeping read, keeping the stored data as it is
        (rq 3.0 ``Job._deserialize_data`` fills these four attributes from ``data``)."""
        self._func_name, self._instance, self._args, self._kwargs = func_name, None, args, {}

    def _deserialize_data(self) -> None:
        # rq 3.0 Job._deserialize_data: its DeserializationError carries no message.
        try:
            super()._deserialize_data()  # type: ignore[no-untyped-call]
        except DeserializationError as exc:
            raise DeserializationError(
                f"job {self.id}: data is not a JSON job written by signal_queue ({exc.__cause__!r})"
            ) from exc.__cause__

    def prepare_for_execution(self, worker_name: str, pipeline: Any) -> None:
        # rq 3.0 Job.prepare_for_execution: the pipeline that marks the job started.
        super().prepare_for_execution(worker_name, pipeline)
        self.starting(pipeline)

    def starting(self, pipeline: Any) -> None:
        """Add to the pipeline that marks the job started (it costs no round trip)."""


class RedisFault(StopRequested):
    """A Redis error inside RQ's work loop, raised as the one exception that loop ends on quietly.

    rq 3.0 ``BaseWorker.work`` breaks out of its loop on ``StopRequested`` (and runs
    its teardown); any other error is logged with a traceback as "unhandled". The
    error itself is kept in :attr:`FaultAwareWorker.redis_fault` for ``run_worker``,
    which waits for Redis or exits according to what it was.
    """

    def __init__(self, error: redis.RedisError) -> None:
        super().__init__(f"{type(error).__name__}: {error}")
        self.error = error


class FaultAwareWorker(BaseWorker):
    """RQ's worker loop, ended by any Redis error instead of retried or logged as a crash, and
    registered again when Redis no longer lists it.

    The heartbeat RQ sends before and after each job (three commands, three round trips in
    rq 3.0) goes in one pipeline here, and reads on the way whether Redis still lists the
    worker and how many jobs wait in its queues: a Redis that restarted empty while the
    client reconnected by itself (redis-py retries) shows up at the next heartbeat.
    """

    #: The Redis error that ended :meth:`work`, if one did.
    redis_fault: redis.RedisError | None = None
    #: Jobs waiting in this worker's queues at its last heartbeat.
    queued_seen: int | None = None
    #: Called (with ``queued_seen`` before that heartbeat) after the worker registered again.
    on_registration_lost: Callable[[int | None], None] | None = None
    _pubsub_failing = False

    def _fault(self, exc: redis.RedisError) -> RedisFault:
        self.redis_fault = exc
        return RedisFault(exc)

    # rq 3.0 BaseWorker.work calls these five in its loop; each talks to Redis.

    def check_for_suspension(self, burst: bool) -> None:
        try:
            super().check_for_suspension(burst)
        except redis.RedisError as exc:
            raise self._fault(exc) from exc

    def run_maintenance_tasks(self) -> None:
        try:
            super().run_maintenance_tasks()  # type: ignore[no-untyped-call]
        except redis.RedisError as exc:
            raise self._fault(exc) from exc

    def dequeue_job_and_maintain_ttl(self, timeout: int | None, max_idle_time: int | None = None) -> Any:
        try:
            return super().dequeue_job_and_maintain_ttl(timeout, max_idle_time)
        except RedisFault as fault:
            self.redis_fault = fault.error
            raise
        except redis.RedisError as exc:
            raise self._fault(exc) from exc

    def execute_job(self, job: Job, queue: Queue) -> None:
        try:
            super().execute_job(job, queue)
        except RedisFault as fault:
            self.redis_fault = fault.error
            raise
        except redis.RedisError as exc:
            raise self._fault(exc) from exc

    def heartbeat(self, timeout: int | None = None, pipeline: Any = None) -> None:
        # rq 3.0 BaseWorker.heartbeat: HSET last_heartbeat, EXPIRE the worker and its executions.
        if pipeline is not None:  # part of RQ's own pipeline (job start, job heartbeats)
            super().heartbeat(timeout, pipeline)
            return
        try:
            with self.connection.pipeline(transaction=False) as pipe:
                super().heartbeat(timeout, pipe)
                pipe.sismember(self.redis_workers_keys, self.key)
                for queue in self.queues:
                    pipe.llen(queue.key)
                replies = pipe.execute()
            queued_before, self.queued_seen = self.queued_seen, sum(replies[4:])
            self._pubsub_failing = False  # Redis answers: the channel's next loss gets its line
            if not replies[3]:
                self.register_again(queued_before)
        except redis.RedisError as exc:
            raise self._fault(exc) from exc

    def _pubsub_exception_handler(self, exc: Exception, pubsub: Any, pubsub_thread: Any) -> None:
        # rq 3.0 BaseWorker._pubsub_exception_handler: the thread that listens for `rq` commands
        # logs an ERROR every 2 s while Redis is away (and redis-py reconnects it). One line here.
        if not isinstance(exc, redis.ConnectionError):
            super()._pubsub_exception_handler(exc, pubsub, pubsub_thread)
            return
        if not self._pubsub_failing:
            self.log.warning("signal_queue: worker %s: its command channel lost Redis (%s); it reconnects by itself",
                             self.name, exc)
            self._pubsub_failing = True
        time.sleep(2.0)

    def register_again(self, queued_before: int | None) -> None:
        """Write this worker's registration again, as ``register_birth`` does, so ``rq info`` lists it.

        rq 3.0 ``register_birth`` refuses a name whose hash exists without a death
        date, which the heartbeat just wrote; this writes the same keys without that check.
        """
        with self.connection.pipeline() as pipe:
            pipe.hset(self.key, mapping=self.serialize())
            register_worker(self, pipe)
            pipe.expire(self.key, self.worker_ttl + 60)
            pipe.execute()
        if self.on_registration_lost is not None:
            self.on_registration_lost(queued_before)


def defer_maintenance(worker: BaseWorker) -> None:
    """Let ``worker`` run its first registry clean-up one interval from now, not at once.

    rq 3.0 runs it at start (``should_run_maintenance_tasks`` is True while
    ``last_cleaned_at`` is None). After Redis refused writes for a while, the
    running jobs of other workers missed their heartbeats meanwhile; they renew
    them within a second of Redis taking writes again, and a clean-up before
    that would take their jobs for abandoned and run them twice.
    """
    worker.last_cleaned_at = dt.datetime.now(dt.timezone.utc)  # type: ignore[assignment]


#: Seconds RQ's per-queue maintenance lock lives (rq 3.0 ``Queue.acquire_maintenance_lock``: 899).
#: A worker killed, or Redis restarted, in the middle of a clean-up leaves it held, and no
#: one recovers abandoned jobs until it expires.
MAINTENANCE_LOCK_TTL = 60


class CompatQueue(Queue):
    """RQ's Queue with a one-minute maintenance lock, noting the job a worker takes.

    ``taken`` is the job this process's worker took from a queue and has not
    finished (a worker process runs one worker at a time). It is noted at the
    moment RQ takes it, so that a worker which loses Redis before or while
    starting the job knows what to put back (:meth:`CompatWorker.return_untaken_job`).
    """

    taken: ClassVar[tuple[str, Queue] | None] = None

    def acquire_maintenance_lock(self) -> bool:
        # rq 3.0 Queue.acquire_maintenance_lock, with our TTL.
        return bool(self.connection.set(self.registry_cleaning_key, 1, nx=True, ex=MAINTENANCE_LOCK_TTL))

    @classmethod
    def dequeue_any(cls, *args: Any, **kwargs: Any) -> tuple[Job, Queue] | None:
        # rq 3.0 Queue.dequeue_any: the worker's one call that takes a job. rq 3.0's
        # dequeue_job_and_maintain_ttl retries a connection error here itself, a log line
        # per try and never a new registration; a RedisFault passes that loop by.
        try:
            result = super().dequeue_any(*args, **kwargs)
        except redis.RedisError as exc:
            raise RedisFault(exc) from exc
        if result is not None:
            CompatQueue.taken = (result[0].id, result[1])
        return result


# Front of the queue is the left end: RQ pushes at_front jobs with LPUSH and takes from the left.
# KEYS: intermediate list, queue, first-seen key, started registry; ARGV: job id, its stale executions.
# Writes RQ's own keys as rq 3.0 names them (Queue.intermediate_queue_key,
# IntermediateQueue.get_first_seen_key, StartedJobRegistry entries "job_id:execution_id").
_RETURN_UNTAKEN = """
if redis.call('LREM', KEYS[1], 1, ARGV[1]) == 1 then
  redis.call('DEL', KEYS[3])
  for i = 2, #ARGV do redis.call('ZREM', KEYS[4], ARGV[i]) end
  redis.call('LPUSH', KEYS[2], ARGV[1])
  return 1
end
return 0
"""


class CompatWorker(SimpleWorker):
    """RQ's SimpleWorker (jobs run in the worker process), with heartbeats from a thread.

    A thread renews the running job's entry in RQ's started registry every
    third of ``heartbeat_ttl``, so that when the worker dies (SIGKILL, a
    segfault in a handler) the job is found abandoned and run again by
    another worker, skipping the events it had finished.
    """

    heartbeat_ttl = 30

    @property
    def taking(self) -> tuple[str, Queue] | None:
        """The job taken from the queue and not finished yet (see :meth:`return_untaken_job`)."""
        return CompatQueue.taken

    @taking.setter
    def taking(self, value: tuple[str, Queue] | None) -> None:
        CompatQueue.taken = value

    def execute_job(self, job: Job, queue: Queue) -> None:
        # rq 3.0 SimpleWorker.execute_job, plus the note of the job taken and the heartbeat thread.
        self.taking = (job.id, queue)
        execution = self.prepare_execution(job)
        stop = threading.Event()
        beat = threading.Thread(
            target=self._beat, args=(job, execution, stop), name="signal_queue-heartbeat", daemon=True
        )
        beat.start()
        try:
            self.perform_job(job, queue, execution)
        finally:
            stop.set()
            beat.join()
        self.taking = None
        self.set_state(WorkerStatus.IDLE)

    def _beat(self, job: Job, execution: Any, stop: threading.Event) -> None:
        interval = max(self.heartbeat_ttl / 3, 0.5)
        failing: str | None = None
        # After a failure, try every half second: once Redis takes writes again, the
        # job's entry must be renewed before another worker's clean-up finds it expired.
        while not stop.wait(0.5 if failing else interval):
            try:
                # rq 3.0 BaseWorker.maintain_heartbeats: the job's, the execution's and the worker's.
                self.maintain_heartbeats(job, execution)
                if isinstance(self, FaultAwareWorker) and not self.connection.sismember(
                    self.redis_workers_keys, self.key
                ):
                    self.register_again(self.queued_seen)  # Redis lost it while this job ran
            except Exception as exc:
                cause = transient_cause(exc)
                if (cause or type(exc).__name__) != failing:  # one line per cause, not one per try
                    self.log.warning("signal_queue: job %s heartbeat failed%s (%s: %s); retrying", job.id,
                                     f": Redis {describe(cause)}" if cause else "", type(exc).__name__, exc)
                failing = cause or type(exc).__name__
                continue
            if failing:
                self.log.warning("signal_queue: job %s heartbeat renewed again", job.id)
                failing = None

    def get_heartbeat_ttl(self, job: Job, working_time: float = 0.0) -> int:
        # rq 3.0 BaseWorker.get_heartbeat_ttl: ours is renewed by the thread, not per job timeout.
        return self.heartbeat_ttl

    def return_untaken_job(self) -> str | None:
        """After Redis came back: put the job this worker took but never started back on its queue.

        RQ moves a taken job to the queue's intermediate list and out of it in the
        atomic transaction that starts it. A worker that lost Redis in between
        leaves it there, and RQ's clean-up returns it only after a minute
        (rq 3.0 ``IntermediateQueue.should_be_cleaned_up``); this worker knows
        the job, so it returns it at once.
        """
        if self.taking is None:
            return None
        job_id, queue = self.taking
        self.taking = None
        keys = [
            queue.intermediate_queue_key,
            queue.key,
            queue.intermediate_queue.get_first_seen_key(job_id),
            queue.started_job_registry.key,
        ]
        # RQ registers the execution before it starts the job: an entry left by this worker
        # would later look abandoned while another worker runs the job, and run it twice.
        stale = [f"{job_id}:{execution_id}" for execution_id in self.executions]
        self.executions.clear()
        # One script, so the job is in one list or the other whatever happens to Redis meanwhile.
        if not self.connection.eval(_RETURN_UNTAKEN, len(keys), *keys, job_id, *stale):
            return None  # it was started (the started registry recovers it) or already returned
        return job_id


def retire_worker(worker: BaseWorker) -> None:
    """Unregister a worker whose teardown could not (Redis refused it then), so ``rq info`` drops it.

    rq 3.0 ``BaseWorker.register_death``: also lets a new worker of the same
    ``--name`` register (``register_birth`` refuses a name without a death date).
    """
    try:
        worker.register_death()  # type: ignore[no-untyped-call]
    except redis.RedisError as exc:
        worker.log.warning("signal_queue: could not unregister worker %s: %s", worker.name, exc)


def stop_requested(worker: BaseWorker) -> bool:
    """True once SIGTERM/SIGINT asked ``worker`` to stop.

    rq 3.0 raises StopRequested when idle without setting ``_stop_requested``;
    ``request_stop`` always notes ``_shutdown_requested_date``.
    """
    return bool(worker._stop_requested or getattr(worker, "_shutdown_requested_date", None))

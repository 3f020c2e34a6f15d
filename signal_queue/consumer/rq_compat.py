"""Every use of RQ's non-public API in signal_queue, in one place.

Everything else in the package uses RQ's public API (``Queue``, ``Job.fetch``,
registries, ``enqueue_many``, ``get_current_job``...). What is here overrides
or calls RQ internals, each with the RQ code it mirrors; it was checked against
the RQ minor versions in :data:`CHECKED_RQ` (pyproject pins ``rq`` to them), and
``tests/test_rq_compat.py`` fails if the RQ code mirrored here changes.

Taking a job (:meth:`CompatQueue.dequeue_any`) is a reliable fetch on every
path, one queue or many: one Lua script takes the first job in the queues'
order and moves it into that queue's intermediate list (RQ's own list of jobs
taken and not started), notes when in ``sq:taken:<queue>`` and which process took
it in ``sq:taker:<id>``, and returns the job hash in the same reply. A take whose
reply was lost (a failover, a cut connection) is answered again with the same
job when its worker asks again; a job whose worker died before starting it goes
back to the front of its queue at the next registry clean-up once it has waited
longer than ``SIGNAL_QUEUE_ABANDONED_AFTER`` (:class:`CompatIntermediateQueue`).
An idle worker never pops with BLPOP, whose lost reply loses the job. With one
queue it waits as RQ does, with a blocking move (``BLMOVE``), but into a hold
list of its own, ``sq:hold:<queue>:<id>``, which its next take claims; that take
is sent in the same write as the blocking move, so Redis runs it the moment the
move returns (a dead worker's hold list is emptied by the clean-up, as its
intermediate entries are). With several queues, one thread per queue waits with ``BLMOVE queue queue
LEFT LEFT``, which wakes when the queue gets a job and leaves the list as it
was, and the worker then takes in the queues' order.

The default worker's take also starts the job it takes, in the same script: it
writes what RQ's start transaction writes (the execution, the started registry,
the job's status, the worker's state; :meth:`CompatWorker._start`), so a job
arriving at an idle worker is started in the round trip that hands it over, and
a job is never taken and not started. The take's record then names the
execution: a take whose reply was lost undoes that start and hands the job over
again, and a stopping worker puts such a job back, unstarted. A worker killed
before it read the reply leaves a started job, which RQ's clean-up of abandoned
jobs recovers, as when a worker dies running a job.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import functools
import hashlib
import logging
import math
import os
import re
import select
import signal
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from multiprocessing.process import BaseProcess
from typing import Any, ClassVar, cast

import redis
import rq
from rq import Queue, SimpleWorker
from rq.defaults import DEFAULT_LOGGING_DATE_FORMAT, DEFAULT_LOGGING_FORMAT
from rq.exceptions import DequeueTimeout, DeserializationError, InvalidJobOperation, StopRequested
from rq.executions import Execution, ExecutionRegistry
from rq.intermediate_queue import IntermediateQueue
from rq.job import JOB_ID_PATTERN, Job, JobStatus
from rq.results import Result
from rq.scheduler import RQScheduler
from rq.timeouts import JobTimeoutException, UnixSignalDeathPenalty
from rq.utils import as_text, current_timestamp, now, str_to_date
from rq.worker import BaseWorker, WorkerStatus
from rq.worker_registration import register as register_worker

from ..wire.keys import ATTEMPT_FIELD, DONE_FIELD, HOLD_KEY, HOLDERS_KEY, TAKEN_KEY, TAKER_KEY
from ..wire.redis_errors import describe, retry_while_transient, transient_cause
from .lifeline import die_with_parent, orphaned
from .quarantine import entry_text, quarantine

logger = logging.getLogger("signal_queue.worker")

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
    "rq.worker.BaseWorker.handle_warm_shutdown_request": "25d331e215916915",
    "rq.worker.BaseWorker._start_scheduler": "49c229109608aa31",
    "rq.worker.BaseWorker.stop_scheduler": "b90d9019bcaf7b95",
    "rq.worker.BaseWorker.unsubscribe": "16e9db30b9c54c46",
    "rq.worker.BaseWorker.run_maintenance_tasks": "3d8a446b5354fce3",  # restarts a dead scheduler via start()
    "rq.worker.BaseWorker.perform_job": "1f0e40678ae519cf",
    # an error of the success bookkeeping goes to _finalize_failure, which queues the job again (a retry)
    "rq.worker.BaseWorker._finalize_success": "ef21a613e8080195",
    "rq.worker.BaseWorker._finalize_failure": "6d1b8bd1117e9641",
    "rq.scheduler.RQScheduler.start": "7995068483aebe44",
    "rq.scheduler.RQScheduler.work": "5d1810bdd4392089",
    "rq.scheduler.RQScheduler.request_stop": "3b064bb4d72ed53f",
    "rq.timeouts.BaseDeathPenalty.__init__": "a13b463409540ce1",
    # restore reads a missing field as an empty one: producer.dispatcher.NewJob leaves empty ones out
    "rq.job.Job.restore": "859daf950a3ede0b",
    "rq.job.Job.to_dict": "9e1a56a9cd4b57e5",  # the fields SignalJob's allow-list knows, the empty ones
    "rq.job.Job._deserialize_data": "00c06178d415b147",
    "rq.job.Job.prepare_for_execution": "4e8e0eca634da20b",
    # a finished job is deleted (result TTL 0): delete reads the stored status first, and raises without it
    "rq.job.Job.delete": "1a15005871aa9579",
    "rq.job.Job._remove_from_registries": "53ca8ad3a8438edb",
    "rq.job.Job._fetch_status": "a9a4c55465726f19",
    "rq.worker.BaseWorker.handle_job_success": "9dda7c7d3ca18ee6",
    "rq.queue.Queue.acquire_maintenance_lock": "ebdce3e6d60ef394",
    "rq.queue.Queue.dequeue_any": "2452e56ad5197396",  # replaced by a reliable take
    "rq.queue.Queue.lmove": "7aa797ad300b8aec",  # the intermediate list a taken job waits in, and its end
    "rq.queue.Queue._fetch_dequeued_job": "dccbf64962d1bbfc",  # the queue and job a take returns
    "rq.queue.Queue.from_queue_key": "51be3f8374d8f826",
    "rq.queue.Queue.intermediate_queue.fget": "77cb167510546504",
    "rq.job.Job.fetch": "4c0184a10a6ca526",  # the id check and the hash a take returns instead of HGETALL
    "rq.job.Job.refresh": "818b52b414f3efb2",
    "rq.intermediate_queue.IntermediateQueue.get_intermediate_queue_key": "7cb13cb0e156659f",
    "rq.intermediate_queue.IntermediateQueue.get_first_seen_key": "59872b5c87c5bd19",
    "rq.intermediate_queue.IntermediateQueue.should_be_cleaned_up": "adb9f8c95fc4d7b5",
    "rq.intermediate_queue.IntermediateQueue.cleanup": "e465aaeb5d294870",  # replaced: the abandoned-job bound
    "rq.worker.BaseWorker.clean_registries": "e2c9790c8156c72c",  # calls intermediate_queue.cleanup under the lock
    "rq.worker.BaseWorker.dequeue_job_and_maintain_ttl": "2715cf34d9e3af3b",  # calls dequeue_any; DequeueTimeout
    "rq.worker.BaseWorker.prepare_job_execution": "d08dd32962e3f82a",  # copied: CompatWorker._start
    "rq.executions.prepare_execution": "e8d5a964e2a10d0c",  # copied: CompatWorker._start
    "rq.worker.BaseWorker._shutdown": "828be105b616d1d6",  # StopRequested raised wherever an idle worker is
    "rq.executions.Execution.create": "b167074a0d209e85",  # started registry entries "<job id>:<execution id>"
    "rq.results.Result.create_failure": "f5b597594c3dcad3",
    "rq.executions.ExecutionRegistry.get_executions": "f0b4dd0be021900e",  # raises for a gone execution
    # CompatJob.delete reads the status and the executions once and answers RQ's reads of them from that
    "rq.job.Job.execution_registry.fget": "f427c9420013ffb5",
    "rq.executions.ExecutionRegistry.get_execution_ids": "852bff955f502a08",
    "rq.executions.Execution.fetch": "28f0de56df645f6c",
    "rq.executions.Execution.refresh": "e3f742f42afe46b3",
    "rq.executions.Execution.restore": "14ec03f8cd6885c4",
    "rq.registry.StartedJobRegistry.remove_executions": "2414e6949e84c032",
    "rq.executions.ExecutionRegistry.delete": "dda35779303b2d0c",
    "rq.executions.ExecutionRegistry.cleanup": "8d3debb01fc55a89",
    "rq.executions.Execution.key.fget": "7b80e9ed12a68e2c",  # rq:execution:<job id>:<id>
    # The start a take writes (_TAKE), and its undoing (_LUA_COMMON unstart), reproduce these writes:
    "rq.executions.Execution.__init__": "991789894557baba",
    "rq.executions.Execution.save": "27a9a8461d65ee04",
    "rq.executions.Execution.serialize": "6ebaef2afef46bd7",
    "rq.executions.Execution.delete": "8c36e0625109f83b",
    "rq.executions.Execution.composite_key.fget": "cf43d2d8fe576478",
    "rq.executions.Execution.worker_executions_key.fget": "b523f4d752876907",
    "rq.executions.ExecutionRegistry.__init__": "7e6cc59144a7c95f",
    "rq.executions.ExecutionRegistry.add": "0ee58742c13a130e",
    "rq.registry.StartedJobRegistry.add_execution": "058aeccefc8e8ea8",
    "rq.job.Job.heartbeat": "d2b6e131210d4eae",
    "rq.worker.BaseWorker.executions_key.fget": "e15fdeaca66fbc60",
    "rq.utils.utcformat": "c29988f57cd73de7",
    "rq.utils.current_timestamp": "0e518e6dd2617a01",
    # FaultAwareWorker: the loop ends quietly on StopRequested (RedisFault is one); the dequeue
    # loop retries connection errors itself, a line per try (dequeue_job_and_maintain_ttl, above);
    # the calls the loop makes.
    "rq.worker.BaseWorker.work": "04b5cdf8e554d8a2",
    "rq.worker.BaseWorker.check_for_suspension": "e8095ae1fcf966bd",
    "rq.worker.BaseWorker._pubsub_exception_handler": "5213e36c3b773343",
    "rq.worker.BaseWorker.heartbeat": "63b1089fd146d19c",
    "rq.worker.BaseWorker.set_state": "bb8d4f1d93ff078b",  # "idle" again before each take: skipped
    "rq.worker.BaseWorker.handle_execution_ended": "23748b027980a6cd",  # replaced: no heartbeat write
    "rq.worker.BaseWorker.cleanup_execution": "4aef566a7d19eff1",  # the ending transaction also says "idle"
    "rq.worker.BaseWorker.register_birth": "4690ab4f7b74ffb2",  # refuses a live name: taken over when stale
    "rq.worker.BaseWorker.serialize": "219368b12c2d438b",  # the worker hash's hostname and pid fields
    "rq.worker.BaseWorker.should_run_maintenance_tasks.fget": "eda86dbb1a00e8a8",
    "rq.worker_registration.register": "757bc1c839a259c8",
    "rq.worker.BaseWorker.register_death": "cb2b0be150213a99",
    "rq.utils.str_to_date": "7e4d7f7531e244f7",
    "rq.job.get_current_job": "a3fd249c56ead743",  # reads rq.job._current_job, which set_current_job sets
}


def rq_version_checked() -> bool:
    """True if the installed RQ is one of :data:`CHECKED_RQ`."""
    return ".".join(rq.__version__.split(".")[:2]) in CHECKED_RQ


#: A time as rq 3.0 writes it (``rq.utils.utcformat``): what ``str_to_date`` parses with strptime, slowly.
_RQ_TIME = re.compile(r"(\d{4})-(\d\d)-(\d\d)T(\d\d):(\d\d):(\d\d)\.(\d{6})Z", re.ASCII)


def parse_rq_time(value: bytes | str) -> dt.datetime:
    """A time as RQ writes it in a job hash (rq 3.0 ``rq.utils.str_to_date``); ValueError if it is not one.

    The form RQ writes is read directly (a worker reads several per job); any other goes to RQ's own
    parser, which accepts a few more.
    """
    text = value.decode() if isinstance(value, bytes) else value
    if (found := _RQ_TIME.fullmatch(text)) is not None:
        year, month, day, hour, minute, second, micro = map(int, found.groups())
        return dt.datetime(year, month, day, hour, minute, second, micro, tzinfo=dt.timezone.utc)
    return str_to_date(value)


def set_current_job(job: Job | None) -> None:
    """Make ``job`` what ``rq.get_current_job()`` returns in this process (the handler process runs
    receivers outside RQ's ``Job.perform``, which sets it: rq 3.0 ``rq.job._current_job``)."""
    rq.job._current_job.set(job)


def current_job_stub(job_id: str, origin: str, connection: redis.Redis | None) -> Job:
    """The job a receiver runs in, as the handler process knows it: its id and queue; its other
    fields load from Redis when read (``refresh()``), as for any ``Job(id=...)``."""
    job = Job(id=job_id, connection=connection)
    job.origin = origin
    return job


def record_failure_result(job: Job, ttl: int, exc_string: str, pipeline: Any) -> None:
    """Store a failure result for ``job``, as RQ's worker does for a job that raised
    (rq 3.0 ``Result.create_failure``, called from ``Job._handle_failure``)."""
    Result.create_failure(job, ttl, exc_string, pipeline=pipeline)


#: The times a job hash holds, as rq 3.0 ``Job.restore`` reads them (``str_to_date``; a missing
#: ``created_at`` reads as now, the others as None).
_JOB_TIMES = ("created_at", "enqueued_at", "started_at", "ended_at", "last_heartbeat")


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
        """RQ's own parsing of a job hash (rq 3.0 ``Job.restore``), its times read by :func:`parse_rq_time`.

        RQ reads each time with ``strptime`` (``str_to_date``), the largest part of loading a job;
        :func:`parse_rq_time` reads the form RQ writes directly and gives the same datetimes.
        """
        times = {name: fields[name] for name in _JOB_TIMES if fields.get(name)}
        result = super().restore({name: value for name, value in fields.items() if name not in times})
        for name, value in times.items():
            setattr(self, name, parse_rq_time(value))
        return result

    def set_call(self, func_name: str, args: tuple[Any, ...]) -> None:
        """Set the call RQ's logging and bookkeeping read, keeping the stored data as it is
        (rq 3.0 ``Job._deserialize_data`` fills these four attributes from ``data``)."""
        self._func_name, self._instance, self._args, self._kwargs = func_name, None, args, {}

    def _deserialize_data(self) -> None:
        # rq 3.0 Job._deserialize_data: its DeserializationError carries no message, and it takes any
        # exception for bad data, even the StopRequested that RQ's SIGTERM handler raises wherever an
        # idle worker is: a job being read then was refused and lost. The stop goes on as a stop.
        try:
            super()._deserialize_data()  # type: ignore[no-untyped-call]
        except DeserializationError as exc:
            if isinstance(exc.__cause__, StopRequested):
                raise exc.__cause__ from None
            raise DeserializationError(
                f"job {self.id}: data is not a JSON job written by signal_queue ({exc.__cause__!r})"
            ) from exc.__cause__

    def prepare_for_execution(self, worker_name: str, pipeline: Any) -> None:
        # rq 3.0 Job.prepare_for_execution: the pipeline that marks the job started. RQ takes the
        # job out of the intermediate list in it only for a worker of one queue
        # (BaseWorker.perform_job); ours took it there from any number of queues.
        super().prepare_for_execution(worker_name, pipeline)
        pipeline.lrem(intermediate_key(self.origin), 1, self.id)
        pipeline.zrem(TAKEN_KEY.format(self.origin), self.id)
        self.starting(pipeline)

    def starting(self, pipeline: Any) -> None:
        """Add to the pipeline that marks the job started (it costs no round trip)."""

    #: While :meth:`delete` runs: the job's stored status and its executions, read once (see there).
    _known: tuple[bytes | None, list[Execution]] | None = None

    def forget_gone_executions(self) -> list[Execution]:
        """Take the executions whose hash is gone out of the job's execution registry; the others.

        rq 3.0 ``ExecutionRegistry.get_executions`` raises ValueError for an execution id whose
        hash is gone: that of a worker killed mid-job, whose execution was cleaned up since.
        ``Job.delete`` reads them (``StartedJobRegistry.remove_executions``,
        ``ExecutionRegistry.delete``), so a job run again after its worker was killed, whose
        result is not kept (deleted at its end), failed after it ran.
        """
        return self._read_for_delete()[1]

    def _read_for_delete(self) -> tuple[bytes | None, list[Execution]]:
        """The job's stored status and its executions whose hash exists, in two round trips at most.

        As rq 3.0 ``ExecutionRegistry.get_execution_ids`` (its clean-up of expired entries, then
        the ids) and ``Execution.fetch`` (each hash, restored) read them; the ids whose hash is
        gone are taken out of the registry.
        """
        registry = ExecutionRegistry(self.id, connection=self.connection)
        with self.connection.pipeline(transaction=False) as pipe:
            pipe.hget(self.key, "status")
            pipe.zremrangebyscore(registry.key, 0, current_timestamp())
            pipe.zrange(registry.key, 0, -1)
            status, _, raw_ids = pipe.execute()
        ids = [as_text(i) for i in raw_ids]
        if not ids:
            return status, []
        with self.connection.pipeline(transaction=False) as pipe:
            for execution_id in ids:
                pipe.hgetall(Execution(execution_id, self.id, connection=self.connection).key)
            hashes = pipe.execute()
        executions, gone = [], []
        for execution_id, data in zip(ids, hashes, strict=True):
            if not data:
                gone.append(execution_id)
                continue
            execution = Execution(execution_id, self.id, connection=self.connection)
            execution.restore(data)
            executions.append(execution)
        if gone:
            self.connection.zrem(registry.key, *gone)
        return status, executions

    @property
    def execution_registry(self) -> ExecutionRegistry:
        # rq 3.0 Job.execution_registry; while delete runs, one that answers from what it read.
        if self._known is not None:
            return _KnownExecutions(self.id, self.connection, self._known[1])
        return ExecutionRegistry(self.id, connection=self.connection)

    def _fetch_status(self) -> Any:
        # rq 3.0 Job._fetch_status (HGET status): while delete runs, the status it read.
        if self._known is None:
            return super()._fetch_status()
        status = self._known[0]
        if not status:
            raise InvalidJobOperation(f"Failed to retrieve status for job: {self.id}")
        return JobStatus(as_text(status))

    def delete(self, pipeline: Any = None, remove_from_queue: bool = True, delete_dependents: bool = False) -> None:
        # rq 3.0 Job.delete first reads the job's stored status (_remove_from_registries calls
        # _fetch_status, to know which registry holds it) and raises InvalidJobOperation if there
        # is none. BaseWorker.handle_job_success deletes a finished job this way when its result
        # TTL is 0: a job whose hash vanished while it ran (Redis restarted without its data, a
        # purge) would fail there after it ran, and RQ's retry would run it again. The heartbeat
        # may have written a new hash meanwhile, with only `last_heartbeat`. A job without a
        # status is in no registry by status: what is left of it is deleted, as RQ's delete does.
        # RQ reads the status and the executions (each registry read two round trips, each
        # execution one) three times over; here they are read once, before, and answered from.
        self._known = self._read_for_delete()
        try:
            try:
                super().delete(pipeline, remove_from_queue, delete_dependents)
            except InvalidJobOperation:
                if self._known[0] is not None:
                    raise
                connection = pipeline if pipeline is not None else self.connection
                self.execution_registry.delete(job=self, pipeline=connection)  # type: ignore[arg-type]
                result_key = Result.get_key(self.id)  # type: ignore[no-untyped-call]
                connection.delete(self.key, self.dependents_key, self.dependencies_key, result_key)
        finally:
            self._known = None


class _KnownExecutions(ExecutionRegistry):
    """A job's execution registry that answers reads from what :meth:`CompatJob.delete` read
    (rq 3.0 ``ExecutionRegistry.get_execution_ids`` and ``get_executions``); writes go to Redis."""

    def __init__(self, job_id: str, connection: Any, executions: list[Execution]) -> None:
        super().__init__(job_id, connection)
        self._executions = executions

    def get_execution_ids(self, start: int = 0, end: int = -1) -> list[str]:
        return [e.id for e in self._executions]

    def get_executions(self, start: int = 0, end: int = -1) -> list[Execution]:
        return list(self._executions)


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
    #: Least seconds between two looks at ``rq suspend``, and between two of the heartbeats RQ's loop
    #: sends between jobs: rq 3.0 sends three of these and one look per job, each a round trip, for a
    #: registration that lives ``worker_ttl`` (30 s or more). With jobs of a few milliseconds they
    #: were most of the worker's own work; a suspension now takes effect within this bound.
    LOOK_AT_MOST_EVERY = 1.0
    _suspension_seen_at = -math.inf
    _beaten_at = -math.inf
    #: Seconds the success bookkeeping of a job that ran tries again while Redis refuses for a while.
    FINISH_WAIT = 10.0

    def _fault(self, exc: redis.RedisError) -> RedisFault:
        self.redis_fault = exc
        return RedisFault(exc)

    # rq 3.0 BaseWorker.work calls these five in its loop; each talks to Redis.

    def check_for_suspension(self, burst: bool) -> None:
        if time.monotonic() - self._suspension_seen_at < self.LOOK_AT_MOST_EVERY:
            return
        try:
            super().check_for_suspension(burst)
        except redis.RedisError as exc:
            raise self._fault(exc) from exc
        self._suspension_seen_at = time.monotonic()

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

    def _finalize_success(self, job: Job, queue: Queue, execution: Execution, return_value: Any) -> None:
        # rq 3.0 perform_job hands an error of its success bookkeeping to _finalize_failure, as if the job
        # had failed, and the failure handling queues the job again (a retry), written from this process's
        # copy. The job ran: its events would run again, and on a Redis that restarted empty no done mark
        # skips them. While Redis refuses for a while, the success is tried again (the heartbeat thread
        # keeps the job's execution alive meanwhile); past FINISH_WAIT the worker's loop ends on the error
        # (run_worker waits for Redis) and the job stays started, for RQ's clean-up of abandoned jobs (its
        # done marks skip its events). A success Redis executed whose reply was lost is written twice: the
        # worker's successful-job count and working time count the job twice; the rest is the same.
        finish = super()._finalize_success
        try:
            retry_while_transient(lambda: finish(job, queue, execution, return_value), f"record that job {job.id} ran",
                                  logger, self.FINISH_WAIT)
        except redis.RedisError as exc:
            if transient_cause(exc) is None:  # a refusal that waiting does not end (about the data, an ACL): as RQ does
                raise
            raise self._fault(exc) from exc

    def _finalize_failure(self, job: Job, queue: Queue, execution: Execution, exc_info: Any) -> None:
        # rq 3.0 perform_job calls this for whatever its try raised: the fault above is not the job's failure.
        if isinstance(exc_info[1], RedisFault):
            raise exc_info[1]
        super()._finalize_failure(job, queue, execution, exc_info)

    def heartbeat(self, timeout: int | None = None, pipeline: Any = None) -> None:
        # rq 3.0 BaseWorker.heartbeat: HSET last_heartbeat, EXPIRE the worker and its executions.
        if pipeline is not None:  # part of RQ's own pipeline (job start, job heartbeats)
            super().heartbeat(timeout, pipeline)
            return
        if timeout is None and time.monotonic() - self._beaten_at < self.LOOK_AT_MOST_EVERY:
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
        self._beaten_at = time.monotonic()

    def set_state(self, state: str, pipeline: Any = None) -> None:
        # rq 3.0 BaseWorker.set_state: HSET state (a round trip of its own without a pipeline). RQ's
        # loop sets "idle" after each job and again before the next take: Redis has it already.
        if pipeline is None and state == WorkerStatus.IDLE and self.get_state() == WorkerStatus.IDLE:
            return
        super().set_state(state, pipeline)

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

    def register_birth(self) -> None:
        """RQ's registration, which takes over this name's registration if it is a stale one of this host.

        rq 3.0 ``register_birth`` refuses a name whose hash exists without a death date,
        until that hash expires (``worker_ttl`` + 60 s). A worker whose teardown could not
        write its death (Redis was away), or one killed outright, leaves such a hash; after a
        failover the new master holds it too (replicated). It is taken over when it was
        written by this process, or by a process of this host that is gone: the worker
        restarted by its supervisor. A name in use elsewhere is refused as RQ refuses it.
        """
        owner = stale_registration(self.connection, self.key, self.hostname or "")
        if owner is not None:
            self.connection.delete(self.key)
            self.log.warning("signal_queue: worker %s: took over its registration left by %s", self.name, owner)
        super().register_birth()  # type: ignore[no-untyped-call]

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


def stale_registration(connection: redis.Redis, key: str, hostname: str) -> str | None:
    """Who left the live registration ``key`` (rq 3.0 worker hash: ``hostname``, ``pid``, ``death``),
    if a new worker of that name may take it over: this process, or a dead process of this host."""
    host, pid_text, death = connection.hmget(key, "hostname", "pid", "death")
    if host is None or death is not None or not hostname or as_text(host) != hostname:
        return None
    try:
        pid = int(pid_text or 0)
    except ValueError:
        return None
    if pid == os.getpid():
        return f"this process (pid {pid})"
    if pid <= 0:
        return None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return f"pid {pid} of this host, which is gone"
    except PermissionError:
        return None  # alive, another user's
    return None


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


def intermediate_key(queue_name: str) -> str:
    """The intermediate list of queue ``queue_name`` (rq 3.0 ``Queue.intermediate_queue_key``)."""
    return IntermediateQueue.get_intermediate_queue_key(Queue.redis_queue_namespace_prefix + queue_name)


class _Script:
    """A Lua script, run by its SHA1 (and sent whole when the server does not know it yet)."""

    def __init__(self, source: str) -> None:
        self.source = source
        self.sha = hashlib.sha1(source.encode()).hexdigest()

    def __call__(self, connection: redis.Redis, keys: Sequence[Any], args: Sequence[Any]) -> Any:
        try:
            return connection.evalsha(self.sha, len(keys), *keys, *args)
        except redis.exceptions.NoScriptError:
            return connection.eval(self.source, len(keys), *keys, *args)


# Lua helpers the take, the release and the return of an unstarted job share.
# utc(): a Unix time (seconds, microseconds) as rq 3.0 utcformat writes it (%Y-%m-%dT%H:%M:%S.%fZ),
# by the civil-from-days algorithm (Redis's Lua has no os.date).
# unstart(): undo a start written by a take (see _TAKE), so the job reads as taken and not
# started: its execution and the entries RQ keeps of it deleted (rq 3.0 Execution.delete), its status
# "queued" and its start no longer counted. Fields the start set (started_at, worker_name,
# last_heartbeat) stay, as RQ leaves them on a job it retries.
_LUA_COMMON = r"""
local function utc(sec, usec)
  local days = math.floor(sec / 86400)
  local rem = sec - days * 86400
  local z = days + 719468
  local era = math.floor(z / 146097)
  local doe = z - era * 146097
  local yoe = math.floor((doe - math.floor(doe / 1460) + math.floor(doe / 36524) - math.floor(doe / 146096)) / 365)
  local doy = doe - (365 * yoe + math.floor(yoe / 4) - math.floor(yoe / 100))
  local mp = math.floor((5 * doy + 2) / 153)
  local day = doy - math.floor((153 * mp + 2) / 5) + 1
  local month = mp < 10 and mp + 3 or mp - 9
  local year = yoe + era * 400 + (month <= 2 and 1 or 0)
  return string.format('%04d-%02d-%02dT%02d:%02d:%02d.%06dZ', year, month, day,
    math.floor(rem / 3600), math.floor((rem % 3600) / 60), rem % 60, usec)
end
local function split(text)
  local parts = {}
  for part in string.gmatch(text, '[^\n]+') do parts[#parts + 1] = part end
  return parts
end
-- Add step to a job's count of starts. Nothing in a job hash is trusted, and a script that fails
-- half-way keeps what it wrote: a count that is not a whole number is left as it is (the worker
-- refuses such a job, and never counted its start).
local function count(job, field, step)
  local text = redis.call('HGET', job, field) or '0'
  local n = string.match(text, '^%s*%+?%d+%s*$') and tonumber(text)
  if n and n < 1e15 then
    redis.call('HSET', job, field, string.format('%d', math.max(n + step, 0)))
  end
end
-- True if a start by this taker (named by its record) may be undone: it is still registered, the
-- process does not know the job (ARGV 'known': the job it read and did not finish, which a fault
-- may have cut short), and no event of it is marked done (it never ran).
local function undoable(prefixes, wip, id, exec, known)
  return id ~= known and redis.call('ZSCORE', wip, id .. ':' .. exec)
    and (redis.call('HGET', prefixes.job .. id, prefixes.done) or '') == ''
end
local function unstart(prefixes, wip, id, exec, worker_executions)
  local composite = id .. ':' .. exec
  redis.call('DEL', prefixes.execution .. composite)
  redis.call('ZREM', wip, composite)
  redis.call('ZREM', prefixes.executions .. id, exec)
  redis.call('SREM', worker_executions, composite)
  count(prefixes.job .. id, prefixes.attempts, -1)
  redis.call('HSET', prefixes.job .. id, 'status', 'queued')
end
"""

# The front of a queue is its left end: RQ pushes at_front jobs with LPUSH and takes from the
# left, into the right end of the intermediate list (rq 3.0 Queue.lmove). The job hash comes
# back in the same reply (rq 3.0 Job.refresh is HGETALL, read before the start below writes), with
# the key's type: a job id whose hash is missing, or of another type, is quarantined by the
# caller, not dropped.
# KEYS: this process's taker record, the holders set of the first queue, the worker's hash and its
# executions set (when the take starts the job), then per queue in order: the queue, its
# intermediate list, its taken set, this process's hold list of it, its started registry.
# ARGV: (unused: was the client's clock), seconds the record lives, the job key prefix, this
# taker's id if it will block on the first queue when there is nothing to take (else ''); then, for
# a take that also starts the job (else ''): the new execution's id, the worker's name, the
# heartbeat TTL, the key prefixes of executions and of a job's execution registry, the attempts
# field; last, the job this process already knows it took ('' if none).
# The time of a take is Redis's clock (TIME), as the clean-up reads it (recover_taken): a take
# sent behind a blocking wait, in the same write, runs when the wait ends.
#
# A take that starts the job writes what CompatWorker._start's transaction wrote after it, the
# same keys and values (rq 3.0 executions.prepare_execution then BaseWorker.prepare_job_execution:
# Execution.create, BaseWorker.set_state, BaseWorker.heartbeat, Job.heartbeat,
# Job.prepare_for_execution, and the start counted in the job's attempts field), with Redis's
# clock for the worker's: the job is never taken and not started, and its start costs no round
# trip. Its record then also names the execution and the worker's executions set, so that a
# take whose reply was lost hands the job over again (its lost start undone first) and a stopping
# worker's release puts it back.
_TAKE = _Script(_LUA_COMMON + r"""
local clock = redis.call('TIME')
local sec, usec = tonumber(clock[1]), tonumber(clock[2])
local now = sec + usec / 1000000
local starting = ARGV[5] ~= ''
local prefixes = {job = ARGV[3], execution = ARGV[8], executions = ARGV[9], attempts = ARGV[10], done = ARGV[12]}
local function answer(queue, id)
  local key = ARGV[3] .. id
  local kind = redis.call('TYPE', key).ok
  if kind == 'hash' then return {queue, id, kind, redis.call('HGETALL', key)} end
  return {queue, id, kind, {}}
end
local function start(i, id)
  local exec, worker, ttl = ARGV[5], ARGV[6], tonumber(ARGV[7])
  local composite = id .. ':' .. exec
  local stamp = string.format('%d.%06d', sec, usec)
  local at = utc(sec, usec)
  local job = ARGV[3] .. id
  -- Execution.create: the execution's hash, the job's execution registry, the started registry,
  -- the worker's executions set
  redis.call('HSET', ARGV[8] .. composite, 'id', exec, 'job_id', id, 'created_at', stamp,
    'last_heartbeat', stamp, 'worker_name', worker)
  redis.call('EXPIRE', ARGV[8] .. composite, ttl)
  redis.call('ZADD', ARGV[9] .. id, sec + ttl + 60, exec)
  redis.call('EXPIRE', ARGV[9] .. id, ttl + 60)
  redis.call('ZADD', KEYS[i + 4], sec + ttl, composite)
  redis.call('SADD', KEYS[4], composite)
  -- set_state(BUSY), then the worker's heartbeat (whose EXPIRE of the worker's executions set
  -- replaces the one Execution.create gave it, ttl + 60)
  redis.call('HSET', KEYS[3], 'state', 'busy', 'last_heartbeat', at)
  redis.call('EXPIRE', KEYS[3], ttl)
  redis.call('EXPIRE', KEYS[4], ttl)
  -- Job.heartbeat, Job.prepare_for_execution, CompatJob.prepare_for_execution, the attempt
  redis.call('HSET', job, 'last_heartbeat', at, 'status', 'started', 'started_at', at, 'worker_name', worker)
  redis.call('LREM', KEYS[i + 1], 1, id)
  redis.call('ZREM', KEYS[i + 2], id)
  count(job, ARGV[10], 1)
  redis.call('PERSIST', job)
end
local function claim(i, id)
  redis.call('ZADD', KEYS[i + 2], now, id)
  local reply = answer(KEYS[i], id)
  -- rq 3.0 JOB_ID_PATTERN; an entry that is no job is quarantined by the caller, never started
  if starting and reply[3] == 'hash' and string.match(id, '^[A-Za-z0-9_%-]+$') then
    start(i, id)
    redis.call('SET', KEYS[1], KEYS[i] .. '\n' .. id .. '\n' .. ARGV[5] .. '\n' .. KEYS[4], 'EX', ARGV[2])
    reply[5] = {ARGV[5], clock[1], clock[2]}
  else
    redis.call('SET', KEYS[1], KEYS[i] .. '\n' .. id, 'EX', ARGV[2])
  end
  return reply
end
local last = redis.call('GET', KEYS[1])
if last then
  local parts = split(last)
  local queue, id, exec, worker_executions = parts[1], parts[2], parts[3], parts[4]
  for i = 5, #KEYS, 5 do
    if id and KEYS[i] == queue then
      -- Still in the intermediate list: this process never started it, because the
      -- reply of its take was lost. Hand it over again rather than another job.
      if redis.call('LPOS', KEYS[i + 1], id) then return claim(i, id) end
      -- Started by a take of this process whose reply never arrived (the process does not know
      -- the job), and not ended or recovered since: undo that start, and hand it over again.
      if exec and worker_executions and undoable(prefixes, KEYS[i + 4], id, exec, ARGV[11]) then
        unstart(prefixes, KEYS[i + 4], id, exec, worker_executions)
        redis.call('RPUSH', KEYS[i + 1], id)
        return claim(i, id)
      end
      break
    end
  end
end
for i = 5, #KEYS, 5 do
  -- A job this process's blocking wait moved into its hold list (its reply may be lost).
  local id = redis.call('LMOVE', KEYS[i + 3], KEYS[i + 1], 'LEFT', 'RIGHT')
  if id then return claim(i, id) end
end
for i = 5, #KEYS, 5 do
  local id = redis.call('LMOVE', KEYS[i], KEYS[i + 1], 'LEFT', 'RIGHT')
  if id then return claim(i, id) end
end
if ARGV[4] ~= '' then redis.call('ZADD', KEYS[2], now, ARGV[4]) end
return false
""")

# Put back what a stopping worker may hold without knowing: the job of a take whose reply it
# never read (started by that take or not), and a job its blocking wait moved into its hold list.
# KEYS: the taker record; ARGV: the job key prefix, the key prefixes of executions and of a job's
# execution registry, the attempts field, then per queue it serves: the queue, its intermediate
# list, its taken set, its hold list, its started registry.
_RELEASE = _Script(_LUA_COMMON + r"""
local prefixes = {job = ARGV[1], execution = ARGV[2], executions = ARGV[3], attempts = ARGV[4], done = ARGV[5]}
local known = ARGV[6]
local returned = 0
for i = 7, #ARGV, 5 do
  while redis.call('LMOVE', ARGV[i + 3], ARGV[i], 'RIGHT', 'LEFT') do returned = returned + 1 end
end
local last = redis.call('GET', KEYS[1])
redis.call('DEL', KEYS[1])
if not last then return returned end
local parts = split(last)
local queue, id, exec, worker_executions = parts[1], parts[2], parts[3], parts[4]
if not id then return returned end
for i = 7, #ARGV, 5 do
  if ARGV[i] == queue then
    -- Taken and not started, or started by that take and undoable: back at the front of its queue.
    local back = redis.call('LREM', ARGV[i + 1], 1, id) == 1
    if not back and exec and worker_executions and undoable(prefixes, ARGV[i + 4], id, exec, known) then
      unstart(prefixes, ARGV[i + 4], id, exec, worker_executions)
      back = true
    end
    if back then
      redis.call('ZREM', ARGV[i + 2], id)
      redis.call('LPUSH', queue, id)
      return returned + 1
    end
  end
end
return returned
""")

# A job whose start its take wrote, and which its worker then did not run (a stop, or Redis lost,
# before the job reached its handlers): undone and put back at the front of its queue, or, when
# ARGV[6] is 'intermediate', back in the intermediate list as taken (for the quarantine).
# KEYS: the queue, its intermediate list, its taken set, its started registry, the worker's
# executions set; ARGV: the job id, the execution id, the job key prefix, the key prefixes of
# executions and of a job's execution registry, where it goes, the attempts field.
_UNSTART = _Script(_LUA_COMMON + r"""
local prefixes = {job = ARGV[3], execution = ARGV[4], executions = ARGV[5], attempts = ARGV[7]}
local id = ARGV[1]
if not redis.call('ZSCORE', KEYS[4], id .. ':' .. ARGV[2]) then return 0 end
unstart(prefixes, KEYS[4], id, ARGV[2], KEYS[5])
if ARGV[6] == 'intermediate' then
  redis.call('RPUSH', KEYS[2], id)
  redis.call('ZADD', KEYS[3], redis.call('TIME')[1], id)
else
  redis.call('ZREM', KEYS[3], id)
  redis.call('LPUSH', KEYS[1], id)
end
return 1
""")

# A job in the intermediate list (or a dead taker's hold list) past the abandoned-job bound.
# KEYS: that list, the queue, the taken set, the started registry, the job hash; ARGV: the job id.
# Returns what was done: 'gone' (started or returned meanwhile), 'no hash' (the caller
# quarantines it), 'started' (a registered execution: the started registry recovers it),
# 'elsewhere' (its status says it is scheduled, finished...: not ours to run), 'queued'
# (already back in its queue) or 'returned' (pushed back to the front of its queue).
_RECOVER = _Script(r"""
local id = ARGV[1]
if not redis.call('LPOS', KEYS[1], id) then
  redis.call('ZREM', KEYS[3], id)
  return 'gone'
end
if redis.call('TYPE', KEYS[5]).ok ~= 'hash' then return 'no hash' end
local function drop(outcome)
  redis.call('LREM', KEYS[1], 1, id)
  redis.call('ZREM', KEYS[3], id)
  return outcome
end
local prefix = id .. ':'
for _, entry in ipairs(redis.call('ZRANGE', KEYS[4], 0, -1)) do
  if string.sub(entry, 1, #prefix) == prefix then return drop('started') end
end
local status = redis.call('HGET', KEYS[5], 'status')
local elsewhere = {started=1, finished=1, failed=1, deferred=1, scheduled=1, stopped=1, canceled=1}
if status and elsewhere[status] then return drop('elsewhere') end
if redis.call('LPOS', KEYS[2], id) then return drop('queued') end
drop('returned')
redis.call('LPUSH', KEYS[2], id)
return 'returned'
""")


# Forget an idle taker, unless it waited again (or holds a job) since the clean-up looked.
# KEYS: the holders set, the taker's hold list; ARGV: the taker, when it last waited as read.
_FORGET = _Script(r"""
local last_wait = tonumber(redis.call('ZSCORE', KEYS[1], ARGV[1]) or 0)
if redis.call('EXISTS', KEYS[2]) == 0 and last_wait <= tonumber(ARGV[2]) then
  return redis.call('ZREM', KEYS[1], ARGV[1])
end
return 0
""")


class _QueueWatch:
    """Wakes an idle worker when one of its queues gets a job, without taking the job.

    Redis has no blocking wait on several lists that leaves them as they are, so
    one thread per queue blocks in ``BLMOVE queue queue LEFT LEFT`` (a move of the
    first job onto itself: the list is unchanged) and ends the worker's wait when
    it returns. A watcher waits in Redis only while the worker does.
    """

    def __init__(self, connection: redis.Redis, keys: Iterable[str]) -> None:
        self.connection = connection
        self.keys = frozenset(keys)
        self.cond = threading.Condition()
        self.waits = 0  # one per wait of the worker
        self.armed = 0  # the wait in progress, 0 when the worker is not waiting
        self.ended = 0  # the last wait a watcher ended
        self.block = 1.0
        self.closed = False
        for key in sorted(self.keys):
            threading.Thread(target=self._watch, args=(key,), name=f"signal_queue-watch:{key}", daemon=True).start()

    def wait(self, seconds: float) -> None:
        """Return when a watched queue has a job (or may have: an error), or after ``seconds``."""
        with self.cond:
            self.waits += 1
            self.armed, self.block = self.waits, seconds
            self.cond.notify_all()
            try:
                self.cond.wait_for(lambda: self.ended == self.waits, seconds)
            finally:  # also when a stop signal ends the wait
                self.armed = 0

    def close(self) -> None:
        """Stop the watchers (each ends when its BLMOVE returns)."""
        with self.cond:
            self.closed = True
            self.cond.notify_all()

    def _watch(self, key: str) -> None:
        done = [0]  # the wait this watcher last ended, or saw a job during while the worker was busy
        while True:
            with self.cond:
                self.cond.wait_for(lambda: self.closed or (self.armed != 0 and self.armed != done[0]))
                if self.closed:
                    return
                wait, block = self.armed, self.block
            try:
                woke = self.connection.blmove(key, key, block, "LEFT", "LEFT") is not None  # type: ignore[arg-type]
            except redis.RedisError:
                woke = True  # the worker's own next call meets the error, and backs off
            with self.cond:
                if woke:
                    done[0] = self.armed or wait
                    if self.armed:
                        self.ended = self.armed
                        self.cond.notify_all()


@dataclass(frozen=True)
class Starter:
    """A worker whose takes start the job they take: what the start writes of it."""

    worker_name: str
    worker_key: str
    #: The worker's set of executions (rq 3.0 ``BaseWorker.executions_key``).
    executions_key: str
    heartbeat_ttl: int
    #: Called with a job its take started, as soon as it is loaded (before RQ's own bookkeeping of it):
    #: see :meth:`CompatWorker.started_by_take`.
    started: Callable[[Job, Queue], None] | None = None


@dataclass(frozen=True)
class StartedInTake:
    """A job its take also started: the execution the take registered, and when (Redis's clock)."""

    job_id: str
    queue: Queue
    execution_id: str
    at: dt.datetime
    #: The worker's set of executions, where the start noted the execution.
    executions_key: str
    #: True once the job went to what runs it (see :meth:`CompatWorker.started_by_take`): from then
    #: on it is never put back unstarted.
    handed: bool = False


@functools.cache
def _execution_prefixes() -> tuple[str, str]:
    """The key prefixes of an execution's hash and of a job's execution registry
    (rq 3.0 ``Execution.key``: ``rq:execution:<job id>:<id>``; ``ExecutionRegistry``: ``rq:executions:<job id>``)."""
    execution_key = Execution("e", "j", connection=None).key  # type: ignore[arg-type]
    registry_key = ExecutionRegistry("j", connection=None).key  # type: ignore[arg-type]
    return execution_key[: -len("j:e")], registry_key[: -len("j")]


def unstart(connection: redis.Redis, started: StartedInTake, to: str = "queue") -> bool:
    """Undo the start a take wrote for a job that never reached its handlers; put it back at the front of
    its queue (``to="queue"``) or in its intermediate list as taken (``"intermediate"``). False if the
    start is gone already (ended, or recovered by a clean-up)."""
    queue = started.queue
    keys = [queue.key, queue.intermediate_queue_key, TAKEN_KEY.format(queue.name), queue.started_job_registry.key,
            started.executions_key]
    args = [started.job_id, started.execution_id, Job.redis_job_namespace_prefix, *_execution_prefixes(), to,
            ATTEMPT_FIELD]
    return bool(_UNSTART(connection, keys, args))


def _taker_id() -> str:
    """Who took a job: this process (host, pid, and a random part against reused pids)."""
    return f"{socket.gethostname()}:{os.getpid()}:{os.urandom(4).hex()}"


class CompatQueue(Queue):
    """RQ's Queue, with a reliable take (see the module docstring) and a one-minute maintenance lock.

    ``taken`` is the job this process's worker took from a queue and has not
    finished (a worker process runs one worker at a time). It is noted at the
    moment RQ takes it, so that a worker which loses Redis before or while
    starting the job knows what to put back (:meth:`CompatWorker.return_untaken_job`).
    """

    taken: ClassVar[tuple[str, Queue] | None] = None
    #: The worker whose takes also start the job they take (set while its take runs; see :data:`_TAKE`).
    starter: ClassVar[Starter | None] = None
    #: The job this process's worker last read from a take, until it finished it: a fault may cut a job
    #: short, and its start must then stand (RQ's clean-up of abandoned jobs runs it again, reading
    #: its done marks), not be undone as that of a take whose reply was lost.
    read: ClassVar[str | None] = None
    #: The start written by this process's last take, until the job reaches its handlers
    #: (see :meth:`CompatWorker.return_untaken_job`).
    started: ClassVar[StartedInTake | None] = None
    #: Seconds a taken job may wait to be started before it goes back to its queue
    #: (SIGNAL_QUEUE_ABANDONED_AFTER, set by the worker); also how long a taker record lives.
    abandoned_after: ClassVar[int] = 30
    _taker: ClassVar[tuple[int, str] | None] = None
    _watch: ClassVar[_QueueWatch | None] = None

    def acquire_maintenance_lock(self) -> bool:
        # rq 3.0 Queue.acquire_maintenance_lock, with our TTL.
        return bool(self.connection.set(self.registry_cleaning_key, 1, nx=True, ex=MAINTENANCE_LOCK_TTL))

    @property
    def intermediate_queue(self) -> IntermediateQueue:
        # rq 3.0 Queue.intermediate_queue: BaseWorker.clean_registries calls its cleanup().
        return CompatIntermediateQueue(self.key, self.connection)

    @classmethod
    def taker(cls) -> str:
        """This process's taker id (a forked child is another taker)."""
        if cls._taker is None or cls._taker[0] != os.getpid():
            CompatQueue._taker = (os.getpid(), _taker_id())
        assert CompatQueue._taker is not None
        return CompatQueue._taker[1]

    @classmethod
    def dequeue_any(
        cls,
        queues: Iterable[Queue],
        timeout: int | None,
        connection: redis.Redis,
        job_class: type[Job] | None = None,
        serializer: Any = None,
        death_penalty_class: Any = None,
    ) -> tuple[Job, Queue] | None:
        """The first job of ``queues`` in their order, taken reliably, with its queue.

        As rq 3.0 ``Queue.dequeue_any``: with ``timeout`` None, None when the queues
        are empty; else wait up to ``timeout`` seconds for a job, then raise
        DequeueTimeout. A queue entry that cannot be a job is quarantined, and the
        next one is taken.
        """
        queues = list(queues)
        keys = [q.key for q in queues]
        # One queue: wait with a blocking move into this process's hold list, as RQ's BLMOVE
        # into the intermediate list, so a job arriving costs no more round trips than RQ's.
        hold = len(queues) == 1 and timeout is not None
        deadline = None if timeout is None else time.monotonic() + timeout
        waited: list[Any] | None = None
        while True:
            try:
                # After a wait, its take came back with it (see _wait).
                reply = waited if waited is not None else cls._take(connection, queues, hold)
                waited = None
                result = None if reply is None else cls._job_of(reply, queues, connection, job_class,
                                                                serializer, death_penalty_class)
                if result is not None and reply is not None:
                    CompatQueue.taken = (result[0].id, result[1])
                    CompatQueue.read = result[0].id
                    CompatQueue.started = cls._started_of(reply, result[0].id, result[1])
                    if CompatQueue.started is not None and cls.starter is not None and cls.starter.started:
                        cls.starter.started(*result)
                    return result
                if reply is not None:
                    continue  # that entry was quarantined: take the next
                if deadline is None:
                    return None
                left = deadline - time.monotonic()
                if left <= 0:
                    raise DequeueTimeout(timeout, keys)
                waited = cls._wait(connection, queues, left, hold)
            except DequeueTimeout:
                raise
            except redis.RedisError as exc:
                # rq 3.0's dequeue_job_and_maintain_ttl retries a connection error here itself, a log
                # line per try and never a new registration; a RedisFault passes that loop by.
                raise RedisFault(exc) from exc
            except BaseException:
                # A stop signal (RQ raises StopRequested wherever an idle worker is) or a bug
                # interrupted a take or a wait: a job may be ours although we never read the reply.
                # One handed to what runs it already stays started (it may be running).
                if CompatQueue.started is None or not CompatQueue.started.handed:
                    with contextlib.suppress(redis.RedisError):
                        cls.release(connection, queues)
                raise

    @classmethod
    def _take_call(cls, queues: Sequence[Queue], hold: bool) -> tuple[list[str], list[Any]]:
        """The keys and arguments of a take (:data:`_TAKE`) from ``queues``; it starts the job it takes
        for :attr:`starter`, if one is set."""
        taker = cls.taker()
        starter = cls.starter
        keys: list[str] = [TAKER_KEY.format(taker), HOLDERS_KEY.format(queues[0].name),
                           starter.worker_key if starter else "", starter.executions_key if starter else ""]
        for q in queues:
            keys += [q.key, q.intermediate_queue_key, TAKEN_KEY.format(q.name), HOLD_KEY.format(q.name, taker),
                     q.started_job_registry.key]
        args = ["", max(int(cls.abandoned_after), 1), Job.redis_job_namespace_prefix, taker if hold else ""]
        if starter is not None:
            args += [uuid.uuid4().hex, starter.worker_name, starter.heartbeat_ttl]
        else:
            args += ["", "", ""]
        args += [*_execution_prefixes(), ATTEMPT_FIELD, cls.read or "", DONE_FIELD]
        return keys, args

    @classmethod
    def _started_of(cls, reply: list[Any], job_id: str, queue: Queue) -> StartedInTake | None:
        """The start a take wrote (the reply's fifth item: execution id, Redis's seconds and
        microseconds), or None if it only took the job."""
        if len(reply) < 5 or not reply[4] or cls.starter is None:
            return None
        execution_id, seconds, micros = reply[4]
        at = dt.datetime.fromtimestamp(int(seconds), dt.timezone.utc).replace(microsecond=int(micros))
        return StartedInTake(job_id, queue, as_text(execution_id), at, cls.starter.executions_key)

    @classmethod
    def _take(cls, connection: redis.Redis, queues: Sequence[Queue], hold: bool) -> list[Any] | None:
        keys, args = cls._take_call(queues, hold)
        try:
            reply = _TAKE(connection, keys, args)
        except (redis.ConnectionError, redis.TimeoutError):
            # Asking again at once is safe, unlike a pop: if Redis ran the lost take, the same
            # job comes back. If Redis is down, this fails too and RQ's loop backs off.
            reply = _TAKE(connection, keys, args)
        return reply if reply else None

    @classmethod
    def _job_of(
        cls, reply: list[Any], queues: Sequence[Queue], connection: redis.Redis, job_class: type[Job] | None,
        serializer: Any, death_penalty_class: Any,
    ) -> tuple[Job, Queue] | None:
        """The job and queue a take returned (rq 3.0 ``Queue._fetch_dequeued_job``), or None once
        the entry is quarantined: RQ would drop a missing job's id without a trace."""
        queue_key, entry, kind, flat = as_text(reply[0]), reply[1], as_text(reply[2]), reply[3]
        job_cls: type[Job] = job_class or cls.job_class
        queue = cls._queue_of(queue_key, queues, connection, job_cls, serializer, death_penalty_class)
        job_id = entry_text(entry)
        reason = None
        if entry != job_id.encode() or not JOB_ID_PATTERN.fullmatch(job_id):
            # rq 3.0 Job.fetch would read "a:b" as job "a": another job than the one queued.
            reason = "it is not an RQ job id (letters, digits, '_' and '-')"
        elif kind == "none":
            reason = f"there is no job hash {Job.key_for(job_id)} (deleted, or expired)"
        elif kind != "hash":
            reason = f"{Job.key_for(job_id)} is a Redis {kind}, not a job hash"
        else:
            try:
                # rq 3.0 Job.fetch: the job, then Job.refresh's restore of its hash.
                job = job_cls(job_id, connection=connection, serializer=serializer)
                job.restore(dict(zip(flat[::2], flat[1::2], strict=True)))
                return job, queue
            except StopRequested:  # SIGTERM came during the restore: not the job's fault
                raise
            except Exception as exc:
                reason = f"its job hash cannot be read: {exc!r}"
                started = cls._started_of(reply, job_id, queue)
                if started is not None:  # the take started it: taken again, and not started, for the quarantine
                    unstart(connection, started, to="intermediate")
        quarantine(connection, queue.intermediate_queue_key, TAKEN_KEY.format(queue.name), queue.name, entry, reason)
        return None

    @classmethod
    def _queue_of(
        cls, queue_key: str, queues: Sequence[Queue], connection: redis.Redis, job_class: type[Job], serializer: Any,
        death_penalty_class: Any,
    ) -> Queue:
        """The queue ``queue_key`` as rq 3.0 ``dequeue_any`` makes it for each job (``Queue.from_queue_key``):
        the worker's own Queue object of it when it is made the same way (a worker makes its queues with
        its job class, serializer and death penalty), else a new one.

        Making one was a fifth of a worker's time from a job's arrival to its handing over, when idle.
        """
        for queue in queues:
            if (queue.key == queue_key and queue.connection is connection and queue.job_class is job_class
                    and queue.serializer is serializer and queue.death_penalty_class is death_penalty_class):
                return queue
        return cls.from_queue_key(queue_key, connection=connection, job_class=job_class, serializer=serializer,
                                  death_penalty_class=death_penalty_class)

    @classmethod
    def _wait(
        cls, connection: redis.Redis, queues: Sequence[Queue], seconds: float, hold: bool
    ) -> list[Any] | None:
        """Wait until a queue may have a job, or ``seconds`` passed; the reply of the take that
        followed, if one was sent with the wait (None: take now).

        One queue: a blocking move of its first job into this process's hold list,
        which the next take claims (and so would a take after a lost reply); a
        dead taker's hold list is emptied by the clean-up. That take goes in the
        same write as the move (a pipeline, no transaction): Redis runs it the
        moment the move returns, so a job arriving costs the worker one round trip,
        not two. Several queues: watcher threads (:class:`_QueueWatch`), and nothing
        is taken.
        """
        seconds = max(seconds, 0.01)
        if hold:
            [queue] = queues
            take_keys, args = cls._take_call(queues, hold)
            # A lost reply is no loss here: the next take claims what the move held, and a take
            # whose reply was lost hands the same job over again. That take meets the error
            # itself if Redis is down (and RQ's loop backs off).
            try:
                with connection.pipeline(transaction=False) as pipe:
                    pipe.blmove(queue.key, HOLD_KEY.format(queue.name, cls.taker()),
                                seconds, "LEFT", "RIGHT")  # type: ignore[arg-type]
                    pipe.evalsha(_TAKE.sha, len(take_keys), *take_keys, *args)
                    _, reply = pipe.execute(raise_on_error=False)
            except (redis.ConnectionError, redis.TimeoutError):
                return None
            if isinstance(reply, Exception):  # the script unknown (a restart, SCRIPT FLUSH): take again
                return None
            return cast("list[Any] | None", reply) or None
        keys = frozenset(q.key for q in queues)
        watch = CompatQueue._watch
        if watch is None or watch.connection is not connection or watch.keys != keys:
            if watch is not None:
                watch.close()
            watch = CompatQueue._watch = _QueueWatch(connection, keys)
        watch.wait(seconds)
        return None

    @classmethod
    def release(cls, connection: redis.Redis, queues: Sequence[Queue]) -> int:
        """Put back what this process took and never started (a take whose reply it missed, its
        hold lists), at the front of the queues; how many jobs went back."""
        taker = cls.taker()
        args: list[str] = [Job.redis_job_namespace_prefix, *_execution_prefixes(), ATTEMPT_FIELD, DONE_FIELD,
                           cls.read or ""]
        for q in queues:
            args += [q.key, q.intermediate_queue_key, TAKEN_KEY.format(q.name), HOLD_KEY.format(q.name, taker),
                     q.started_job_registry.key]
        return int(_RELEASE(connection, [TAKER_KEY.format(taker)], args))


class CompatIntermediateQueue(IntermediateQueue):
    """RQ's list of jobs taken from a queue and not started, recovered within the abandoned-job bound.

    RQ's own clean-up (rq 3.0 ``IntermediateQueue.cleanup``) records a job the
    first time it sees it there and, a minute later, fails it as "stuck"; a job
    whose hash is gone it drops. Here a job taken longer than
    ``CompatQueue.abandoned_after`` ago and still not started goes back to the
    front of its queue (its taker died or lost Redis), and an entry without a
    job hash is quarantined. So do the hold lists of takers that died waiting.
    """

    def cleanup(self, worker: Any, queue: Queue) -> None:
        # rq 3.0: called by BaseWorker.clean_registries, under the queue's maintenance lock.
        recover_taken(queue, CompatQueue.abandoned_after)


#: Seconds after its last wait that an idle taker with an empty hold list is forgotten.
HOLDER_FORGOTTEN_AFTER = 3600


def recover_taken(queue: Queue, abandoned_after: float) -> list[str]:
    """Return to ``queue`` its jobs taken more than ``abandoned_after`` seconds ago and never started:
    those in its intermediate list and those in hold lists; quarantine those without a job hash."""
    connection = queue.connection
    taken_key, holders_key = TAKEN_KEY.format(queue.name), HOLDERS_KEY.format(queue.name)
    seconds, micros = connection.time()
    now = seconds + micros / 1e6  # Redis's clock, as the take notes its time
    where: dict[bytes, str] = {}
    for entry in cast(list[bytes], connection.lrange(queue.intermediate_queue_key, 0, -1)):
        where[entry] = queue.intermediate_queue_key
    holders = cast(list[tuple[bytes, float]], connection.zrange(holders_key, 0, -1, withscores=True))
    for taker, last_wait in holders:
        hold_key = HOLD_KEY.format(queue.name, as_text(taker))
        held = cast(list[bytes], connection.lrange(hold_key, 0, -1))
        for entry in held:
            where[entry] = hold_key
        if not held and last_wait < now - max(HOLDER_FORGOTTEN_AFTER, 10 * abandoned_after):
            _FORGET(connection, [holders_key, hold_key], [taker, last_wait])
    if where:
        # A job moved there by someone else (RQ's own single-queue take, a take whose
        # claim never ran) counts from now.
        connection.zadd(taken_key, dict.fromkeys(where, now), nx=True)
    returned = []
    for entry in cast(list[bytes], connection.zrangebyscore(taken_key, "-inf", now - abandoned_after)):
        job_key = Job.redis_job_namespace_prefix.encode() + entry
        keys = [where.get(entry, queue.intermediate_queue_key), queue.key, taken_key,
                queue.started_job_registry.key, job_key]
        outcome = as_text(_RECOVER(connection, keys, [entry]))
        if outcome == "no hash":
            kind = as_text(connection.type(job_key))
            reason = (f"there is no job hash {as_text(job_key)} (deleted, or expired)" if kind == "none"
                      else f"{as_text(job_key)} is a Redis {kind}, not a job hash")
            quarantine(connection, keys[0], taken_key, queue.name, entry, reason)
        elif outcome == "returned":
            returned.append(entry_text(entry))
            logger.warning(
                "signal_queue: job %s was taken from queue %s over %s s ago and never started (its worker died "
                "or lost Redis); it is queued again", entry_text(entry), queue.name, abandoned_after,
            )
    return returned


def taken_count(queue: Queue) -> int:
    """Jobs taken from ``queue`` and not started: RQ's ``rq info`` counts them nowhere."""
    connection = queue.connection
    count = int(connection.llen(queue.intermediate_queue_key))
    for taker in cast(list[bytes], connection.zrange(HOLDERS_KEY.format(queue.name), 0, -1)):
        count += int(connection.llen(HOLD_KEY.format(queue.name, as_text(taker))))
    return count


# Front of the queue is the left end: RQ pushes at_front jobs with LPUSH and takes from the left.
# KEYS: intermediate list, queue, first-seen key, started registry, taken set, job hash; ARGV: job id,
# its stale executions. Writes RQ's own keys as rq 3.0 names them (Queue.intermediate_queue_key,
# IntermediateQueue.get_first_seen_key, StartedJobRegistry entries "job_id:execution_id"). A job whose
# status is no longer "queued" was started (a worker with several queues leaves a started job in the
# intermediate list): the started registry recovers it, so it is left alone.
_RETURN_UNTAKEN = """
if redis.call('HGET', KEYS[6], 'status') == 'queued' and redis.call('LREM', KEYS[1], 1, ARGV[1]) == 1 then
  redis.call('DEL', KEYS[3])
  redis.call('ZREM', KEYS[5], ARGV[1])
  for i = 2, #ARGV do redis.call('ZREM', KEYS[4], ARGV[i]) end
  redis.call('LPUSH', KEYS[2], ARGV[1])
  return 1
end
return 0
"""


class CompatScheduler(RQScheduler):
    """RQ's scheduler process, which ends when the worker that started it does.

    RQ's runs until it gets SIGTERM, which a worker killed by SIGKILL, the OOM
    killer or a crash never sends: it outlived its worker, holding the queues'
    scheduler locks. Also, once the worker is stopping (:attr:`stopping`), the
    worker's maintenance does not start a new one; and a SIGTERM that comes
    while one is being forked is not lost (RQ's child would run the worker's
    handler, and the worker then wait for it forever).
    """

    parent_pid = 0
    #: Set when the worker is asked to stop: no scheduler process is started any more.
    stopping = False

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        #: The write end of the scheduler process's wake pipe (made in that process, by work()).
        self._wake_fd: int | None = None

    def start(self) -> BaseProcess | None:
        # rq 3.0 RQScheduler.start forks the scheduler process from the worker (the worker's
        # maintenance calls it again, through acquire_locks, when the process has died).
        if self.stopping:
            # acquire_locks took them for a process that will not run
            self.release_locks()  # type: ignore[no-untyped-call]
            return None
        self.parent_pid = os.getpid()
        # Signals wait until the child has its own handlers (see work), and the worker's own
        # handler runs once the fork is done.
        blocked = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM, signal.SIGINT})
        try:
            process: BaseProcess = super().start()  # type: ignore[no-untyped-call]
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, blocked)
        return process

    def work(self) -> None:
        # rq 3.0 RQScheduler.work, in the scheduler process: the same loop, which also
        # ends when the worker is gone (on Linux the kernel sends SIGTERM at once).
        # The wait between rounds is on a pipe the SIGTERM handler writes to: a handler that took
        # a lock (threading.Event.set) could be interrupted by a second SIGTERM inside it, whose
        # handler then waited for that lock forever (seen: the kernel's and a stopping worker's).
        wake, self._wake_fd = os.pipe()
        os.set_blocking(self._wake_fd, False)
        self._install_signal_handlers()  # type: ignore[no-untyped-call]
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM, signal.SIGINT})
        die_with_parent(signal.SIGTERM)
        self.register_birth()
        while True:
            if self._stop_requested or orphaned(self.parent_pid):
                self.stop()  # type: ignore[no-untyped-call]
                break
            if self.should_reacquire_locks:
                self.acquire_locks()  # type: ignore[no-untyped-call]
            self.heartbeat()  # type: ignore[no-untyped-call]
            self.enqueue_scheduled_jobs()  # type: ignore[no-untyped-call]
            select.select([wake], [], [], self.interval)  # RQ sleeps here; the SIGTERM handler's byte ends the wait

    def request_stop(self, signum: Any = None, frame: Any = None) -> None:
        # rq 3.0 RQScheduler.request_stop, its SIGTERM/SIGINT handler: also ends the wait between
        # rounds, so a stopping worker does not wait a second for its scheduler (it joins it).
        super().request_stop(signum, frame)  # type: ignore[no-untyped-call]
        if self._wake_fd is not None:
            with contextlib.suppress(OSError):  # BlockingIOError: a full pipe has woken it already
                os.write(self._wake_fd, b"!")


class BackstopDeathPenalty(UnixSignalDeathPenalty):
    """RQ's job alarm, :attr:`MARGIN` seconds later than the job's timeout.

    For a worker that enforces each event's timeout itself (it kills the process
    running the handler): the alarm is only a backstop for the worker's own
    bookkeeping, and must not fire first.
    """

    MARGIN = 60

    def __init__(self, timeout: int, exception: type[Exception] = JobTimeoutException, **kwargs: Any) -> None:
        # rq 3.0 BaseDeathPenalty.__init__(timeout, exception, **kwargs); BaseWorker.perform_job
        # makes one per job with job.timeout and arms it around job.perform().
        super().__init__(timeout + self.MARGIN if timeout > 0 else timeout, exception, **kwargs)  # type: ignore[no-untyped-call]


#: Seconds a stopping worker waits for its RQ scheduler process to stop (it looks every second).
SCHEDULER_STOP_TIMEOUT = 2.0


class CompatWorker(SimpleWorker):
    """RQ's SimpleWorker (no work horse per job), with heartbeats from a thread.

    A thread renews the running job's entry in RQ's started registry every
    third of ``heartbeat_ttl``, so that when the worker dies (SIGKILL, the OOM
    killer) the job is found abandoned and run again by another worker,
    skipping the events it had finished. Its RQ scheduler process ends with
    it (:class:`CompatScheduler`), and :meth:`stop_soon` tells it at once when
    SIGTERM asks it to stop.
    """

    heartbeat_ttl = 30
    #: True while :meth:`perform_job` runs (see :meth:`_shutdown`).
    _performing = False

    @property
    def taking(self) -> tuple[str, Queue] | None:
        """The job taken from the queue and not finished yet (see :meth:`return_untaken_job`)."""
        return CompatQueue.taken

    @taking.setter
    def taking(self, value: tuple[str, Queue] | None) -> None:
        CompatQueue.taken = value

    _heartbeats: _Heartbeats | None = None

    #: The job :meth:`execute_job` started already, for :meth:`prepare_job_execution` to skip.
    _started: Job | None = None

    def dequeue_job_and_maintain_ttl(self, timeout: int | None, max_idle_time: int | None = None) -> Any:
        # rq 3.0 BaseWorker.dequeue_job_and_maintain_ttl, whose take (dequeue_any) starts the job it takes
        # for this worker (see _TAKE): the start costs no round trip of its own.
        CompatQueue.starter = Starter(
            self.name, self.key, self.executions_key, self.get_heartbeat_ttl(None),  # type: ignore[arg-type]
            self.started_by_take,
        )
        try:
            return super().dequeue_job_and_maintain_ttl(timeout, max_idle_time)
        finally:
            CompatQueue.starter = None

    def started_by_take(self, job: Job, queue: Queue) -> None:
        """``job`` was started by its take and is loaded: called before RQ logs it and runs it
        (:meth:`execute_job`). A subclass may hand it to what runs it from here, inside
        :meth:`handing_early`."""

    @contextlib.contextmanager
    def handing_early(self, handed: Callable[[], bool]) -> Iterator[None]:
        """Around handing the job its take started to what runs it, before :meth:`execute_job`;
        ``handed()`` says afterwards whether it went (or may have). From the block's start a stop
        waits for the job (it raises no StopRequested) and the job is never put back unstarted, so a
        SIGTERM that comes while the job is being handed cannot give it back while it runs; if it did
        not go, the job goes the usual way (and a stop that came meanwhile gives it back)."""
        started = CompatQueue.started
        self._performing = True
        if started is not None:
            CompatQueue.started = dataclasses.replace(started, handed=True)
        try:
            yield
        finally:
            if not handed():
                self._performing = False
                CompatQueue.started = started

    def execute_job(self, job: Job, queue: Queue) -> None:
        # rq 3.0 SimpleWorker.execute_job, plus the note of the job taken and the heartbeat thread, and
        # the execution registered in the transaction that starts the job (see _start).
        self.taking = (job.id, queue)
        execution = self._start(job)
        if self._heartbeats is None:
            self._heartbeats = _Heartbeats(self)
        self._heartbeats.watch(job, execution)
        self._performing = True
        CompatQueue.started = None  # from here the job may reach its handlers: no longer put back unstarted
        try:
            self.perform_job(job, queue, execution)
        finally:
            self._performing = False
            self._started = None
            self._heartbeats.unwatch()
        self.taking = None
        CompatQueue.read = None
        self.set_state(WorkerStatus.IDLE)

    def _start(self, job: Job) -> Any:
        """Register the job's execution and start the job, in one transaction: one round trip, not two.

        rq 3.0 ``executions.prepare_execution`` (what ``BaseWorker.prepare_execution``
        calls), then ``BaseWorker.prepare_job_execution`` (which ``perform_job`` calls
        first, and skips for this job). Like RQ's first step, it runs before
        ``perform_job``: if Redis refuses it, nothing was written, and the job is
        one taken and not started (see :meth:`return_untaken_job`).
        """
        started = CompatQueue.started
        if started is not None and started.job_id == job.id:
            execution = self._started_in_take(job, started)
            self._started = job
            self.procline(f"Processing {job.func_name} from {job.origin} since {time.time()}")  # type: ignore[no-untyped-call]
            return execution
        with self.connection.pipeline() as pipeline:
            heartbeat_ttl = self.get_heartbeat_ttl(job)
            execution = Execution.create(job, heartbeat_ttl, pipeline=pipeline, worker_name=self.name)
            self.executions[execution.id] = execution
            self.set_state(WorkerStatus.BUSY, pipeline=pipeline)
            self.heartbeat(heartbeat_ttl, pipeline=pipeline)
            job.heartbeat(now(), heartbeat_ttl, pipeline=pipeline)
            job.prepare_for_execution(self.name, pipeline=pipeline)
            pipeline.persist(job.key)
            if len(self.queues) == 1:  # as perform_job asks prepare_job_execution to
                pipeline.lrem(intermediate_key(job.origin), 1, job.id)
            pipeline.execute()
        self._started = job
        self.procline(f"Processing {job.func_name} from {job.origin} since {time.time()}")  # type: ignore[no-untyped-call]
        return execution

    def _started_in_take(self, job: Job, started: StartedInTake) -> Execution:
        """What the start a take wrote (see :data:`_TAKE`) leaves in this process: what RQ's own start sets
        on the execution, the worker and the job (rq 3.0 ``Execution.create``, ``set_state``, ``heartbeat``,
        ``Job.heartbeat``, ``Job.prepare_for_execution``), with the take's time."""
        execution = Execution(started.execution_id, job.id, connection=self.connection, worker_name=self.name)
        execution.created_at = execution.last_heartbeat = started.at
        execution._job = job
        self.executions[execution.id] = execution
        self._state = WorkerStatus.BUSY
        self.last_heartbeat = started.at
        job.worker_name = self.name
        job.last_heartbeat = job.started_at = started.at
        job._status = JobStatus.STARTED
        return execution

    def prepare_job_execution(self, job: Job, remove_from_intermediate_queue: bool = False) -> None:
        # rq 3.0 BaseWorker.prepare_job_execution, which perform_job calls first: _start did it.
        if self._started is job:
            return
        super().prepare_job_execution(job, remove_from_intermediate_queue)

    def handle_execution_ended(self, job: Job, queue: Queue, heartbeat_ttl: int) -> None:
        # rq 3.0 BaseWorker.handle_execution_ended: sets ended_at, and writes a heartbeat (a round trip) that
        # keeps the job's key alive while its success or failure callback runs. A SignalJob has no
        # callbacks (job.py refuses them), and the success transaction that follows saves the job
        # hash, last_heartbeat too.
        job.ended_at = job.last_heartbeat = now()

    def cleanup_execution(self, job: Job, pipeline: Any, execution: Any = None) -> None:
        # rq 3.0 BaseWorker.cleanup_execution: in the transaction that ends a job (success, failure,
        # retry). The worker is idle from then on: saying so there costs no round trip of its own.
        super().cleanup_execution(job, pipeline, execution)
        self.set_state(WorkerStatus.IDLE, pipeline=pipeline)

    def close_heartbeats(self) -> None:
        """End the heartbeat thread (the worker is done)."""
        if self._heartbeats is not None:
            self._heartbeats.close()
            self._heartbeats = None

    def get_heartbeat_ttl(self, job: Job, working_time: float = 0.0) -> int:
        # rq 3.0 BaseWorker.get_heartbeat_ttl: ours is renewed by the thread, not per job timeout.
        return self.heartbeat_ttl

    def _shutdown(self) -> None:
        # rq 3.0 BaseWorker._shutdown, run by the SIGTERM/SIGINT handler: a busy worker stops after
        # its job; an idle one gets StopRequested raised wherever it is. RQ's success transaction
        # sets the state to idle inside perform_job, whose bare except takes any exception for the
        # job's failure: a StopRequested raised there was swallowed, and the worker ran on, stopping,
        # handing every later job back to the queue (and a second signal's SystemExit likewise).
        # Inside perform_job the stop waits for the job's end, as for a busy worker; and
        # _stop_requested is set first, so that whatever else catches a StopRequested, the loop
        # ends at its next turn.
        self._stop_requested = True
        if not self._performing:
            super()._shutdown()  # type: ignore[no-untyped-call]
            return
        self.set_shutdown_requested_date()  # type: ignore[no-untyped-call]
        if self.scheduler:
            self.stop_scheduler()

    def handle_warm_shutdown_request(self) -> None:
        # rq 3.0 BaseWorker.request_stop calls this in the SIGTERM/SIGINT handler, before it
        # decides to stop at once (idle) or after the running job (busy).
        super().handle_warm_shutdown_request()  # type: ignore[no-untyped-call]
        if isinstance(self.scheduler, CompatScheduler):
            self.scheduler.stopping = True
        self.stop_soon()

    def stop_soon(self) -> None:
        """SIGTERM/SIGINT asked the worker to stop: called in the signal handler."""

    def unsubscribe(self) -> None:
        # rq 3.0 BaseWorker.unsubscribe, with the pubsub thread told to stop before the
        # UNSUBSCRIBE goes out: the reply then ends the thread's wait at once. In RQ's order
        # the reply often comes first, and the worker's exit waits out the 1 s join.
        if self.pubsub_thread:
            self.log.info("Worker %s: unsubscribing from channel %s", self.name, self.pubsub_channel_name)
            self.pubsub_thread.stop()
            self.pubsub.unsubscribe()
            self.pubsub_thread.join(timeout=1)
            self.pubsub.close()

    def stop_scheduler(self) -> None:
        # rq 3.0 BaseWorker.stop_scheduler (SIGTERM to the scheduler process, then join), with
        # the join bounded: a scheduler that does not stop must not keep its worker from exiting.
        process = self.scheduler._process if self.scheduler is not None else None
        if process is None or not process.pid:
            return
        with contextlib.suppress(OSError):
            os.kill(process.pid, signal.SIGTERM)
        process.join(SCHEDULER_STOP_TIMEOUT)
        if process.is_alive():
            self.log.warning("signal_queue: RQ's scheduler process %d did not stop; killing it", process.pid)
            with contextlib.suppress(OSError):
                os.kill(process.pid, signal.SIGKILL)
            process.join()

    def _start_scheduler(
        self,
        burst: bool = False,
        logging_level: str | None = "INFO",
        date_format: str = DEFAULT_LOGGING_DATE_FORMAT,
        log_format: str = DEFAULT_LOGGING_FORMAT,
    ) -> None:
        # rq 3.0 BaseWorker._start_scheduler, with CompatScheduler for RQScheduler. The worker's
        # maintenance restarts a scheduler that died through the same object (acquire_locks).
        self.scheduler = CompatScheduler(
            self.queues,
            connection=self.connection,
            logging_level=logging_level if logging_level is not None else self.log.level,
            date_format=date_format,
            log_format=log_format,
            serializer=self.serializer,
        )
        self.scheduler.acquire_locks()  # type: ignore[no-untyped-call]
        if self.scheduler.acquired_locks:
            if burst:
                try:
                    self.scheduler.register_birth()
                    self.scheduler.enqueue_scheduled_jobs()  # type: ignore[no-untyped-call]
                finally:
                    self.scheduler.release_locks()  # type: ignore[no-untyped-call]
                    self.scheduler.register_death()
            else:
                self.scheduler.start()

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
        started, CompatQueue.started = CompatQueue.started, None
        if started is not None and started.job_id == job_id and not started.handed:
            # Its take started it, and it never reached its handlers: undone, and queued again.
            self.executions.clear()
            return job_id if unstart(self.connection, started) else None
        keys = [
            queue.intermediate_queue_key,
            queue.key,
            queue.intermediate_queue.get_first_seen_key(job_id),
            queue.started_job_registry.key,
            TAKEN_KEY.format(queue.name),
            queue.job_class.key_for(job_id),
        ]
        # RQ registers the execution before it starts the job: an entry left by this worker
        # would later look abandoned while another worker runs the job, and run it twice.
        stale = [f"{job_id}:{execution_id}" for execution_id in self.executions]
        self.executions.clear()
        # One script, so the job is in one list or the other whatever happens to Redis meanwhile.
        if not self.connection.eval(_RETURN_UNTAKEN, len(keys), *keys, job_id, *stale):
            return None  # it was started (the started registry recovers it) or already returned
        return job_id


class _Heartbeats:
    """A worker's heartbeat thread: renews the running job's heartbeats every third of ``heartbeat_ttl`` or so.

    One thread for the worker's life, told of each job as it starts and ends: a
    thread started and joined per job cost two thread switches between jobs.
    Being told does not wake it (that too cost a switch per job): it looks
    every half interval, so a job's first heartbeat comes between one and one
    and a half intervals after its start, well within ``heartbeat_ttl``.
    """

    def __init__(self, worker: CompatWorker) -> None:
        self.worker = worker
        self._changed = threading.Condition()
        self._beating = threading.Lock()  # held while a heartbeat is sent
        self._current: tuple[Job, Any, float] | None = None
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="signal_queue-heartbeat", daemon=True)
        self._thread.start()

    def watch(self, job: Job, execution: Any) -> None:
        """Renew ``job``'s heartbeats from one interval from now until :meth:`unwatch`."""
        self._current = (job, execution, time.monotonic())

    def unwatch(self) -> None:
        """Stop renewing the job's heartbeats; one being sent is finished first (as a join would)."""
        with self._beating:
            self._current = None

    def close(self) -> None:
        with self._changed:
            self._closed = True
            self._changed.notify()
        self._thread.join(timeout=5)

    def _run(self) -> None:
        worker = self.worker
        interval = max(worker.heartbeat_ttl / 3, 0.5)
        failing: str | None = None
        beaten: tuple[Job, Any, float] | None = None  # the job last renewed, and when
        beaten_at = 0.0
        while True:
            with self._changed:
                # After a failure, try every half second: once Redis takes writes again, the
                # job's entry must be renewed before another worker's clean-up finds it expired.
                self._changed.wait(0.5 if failing else interval / 2)
                if self._closed:
                    return
            current = self._current
            if current is None:
                failing = None
                continue
            if current is not beaten:
                beaten, beaten_at, failing = current, current[2], None
            if not failing and time.monotonic() - beaten_at < interval:
                continue
            job, execution, _ = current
            with self._beating:
                if self._current is not current:
                    continue
                try:
                    # rq 3.0 BaseWorker.maintain_heartbeats: the job's, the execution's and the worker's.
                    worker.maintain_heartbeats(job, execution)
                    if isinstance(worker, FaultAwareWorker) and not worker.connection.sismember(
                        worker.redis_workers_keys, worker.key
                    ):
                        worker.register_again(worker.queued_seen)  # Redis lost it while this job ran
                except Exception as exc:
                    cause = transient_cause(exc)
                    if (cause or type(exc).__name__) != failing:  # one line per cause, not one per try
                        worker.log.warning("signal_queue: job %s heartbeat failed%s (%s: %s); retrying", job.id,
                                           f": Redis {describe(cause)}" if cause else "", type(exc).__name__, exc)
                    failing = cause or type(exc).__name__
                    continue
                beaten_at = time.monotonic()
            if failing:
                worker.log.warning("signal_queue: job %s heartbeat renewed again", job.id)
                failing = None


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

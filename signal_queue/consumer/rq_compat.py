"""Every use of RQ's non-public API in signal_queue, in one place.

Everything else in the package uses RQ's public API (``Queue``, ``Job.fetch``,
registries, ``enqueue_many``, ``get_current_job``...). What is here overrides
or calls RQ internals, each with the RQ code it mirrors; it was checked against
the RQ minor versions in :data:`CHECKED_RQ` (pyproject pins ``rq`` to them), and
``tests/test_rq_compat.py`` fails if the RQ code mirrored here changes.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import os
import signal
import threading
from multiprocessing.process import BaseProcess
from typing import Any, ClassVar

import rq
from rq import Queue, SimpleWorker
from rq.defaults import DEFAULT_LOGGING_DATE_FORMAT, DEFAULT_LOGGING_FORMAT
from rq.exceptions import DeserializationError
from rq.job import Job
from rq.results import Result
from rq.scheduler import RQScheduler
from rq.timeouts import JobTimeoutException, UnixSignalDeathPenalty
from rq.utils import as_text, str_to_date
from rq.worker import BaseWorker, WorkerStatus

from .lifeline import die_with_parent, orphaned

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
    "rq.scheduler.RQScheduler.start": "7995068483aebe44",
    "rq.scheduler.RQScheduler.work": "5d1810bdd4392089",
    "rq.scheduler.RQScheduler.request_stop": "3b064bb4d72ed53f",
    "rq.timeouts.BaseDeathPenalty.__init__": "a13b463409540ce1",
    "rq.job.Job.restore": "859daf950a3ede0b",
    "rq.job.Job.to_dict": "9e1a56a9cd4b57e5",  # the fields SignalJob's allow-list knows
    "rq.job.Job._deserialize_data": "00c06178d415b147",
    "rq.job.Job.prepare_for_execution": "4e8e0eca634da20b",
    "rq.queue.Queue.acquire_maintenance_lock": "ebdce3e6d60ef394",
    "rq.queue.Queue.dequeue_any": "2452e56ad5197396",
    "rq.intermediate_queue.IntermediateQueue.get_first_seen_key": "59872b5c87c5bd19",
    "rq.intermediate_queue.IntermediateQueue.should_be_cleaned_up": "adb9f8c95fc4d7b5",
    "rq.results.Result.create_failure": "f5b597594c3dcad3",
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
        # rq 3.0 Queue.dequeue_any: the worker's one call that takes a job.
        result = super().dequeue_any(*args, **kwargs)
        if result is not None:
            CompatQueue.taken = (result[0].id, result[1])
        return result


# Front of the queue is the left end: RQ pushes at_front jobs with LPUSH and takes from the left.
# KEYS: intermediate list, queue, first-seen key, started registry, job hash; ARGV: job id, its stale
# executions. Writes RQ's own keys as rq 3.0 names them (Queue.intermediate_queue_key,
# IntermediateQueue.get_first_seen_key, StartedJobRegistry entries "job_id:execution_id"). A job whose
# status is no longer "queued" was started (a worker with several queues leaves a started job in the
# intermediate list): the started registry recovers it, so it is left alone.
_RETURN_UNTAKEN = """
if redis.call('HGET', KEYS[5], 'status') == 'queued' and redis.call('LREM', KEYS[1], 1, ARGV[1]) == 1 then
  redis.call('DEL', KEYS[3])
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
        self._wake = threading.Event()

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
            self._wake.wait(self.interval)  # RQ sleeps: a SIGTERM then waits out the second

    def request_stop(self, signum: Any = None, frame: Any = None) -> None:
        # rq 3.0 RQScheduler.request_stop, its SIGTERM/SIGINT handler: also ends the wait between
        # rounds, so a stopping worker does not wait a second for its scheduler (it joins it).
        super().request_stop(signum, frame)  # type: ignore[no-untyped-call]
        self._wake.set()


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
        while not stop.wait(max(self.heartbeat_ttl / 3, 0.5)):
            try:
                # rq 3.0 BaseWorker.maintain_heartbeats: the job's, the execution's and the worker's.
                self.maintain_heartbeats(job, execution)
            except Exception as exc:
                self.log.warning("signal_queue: job %s heartbeat failed: %s", job.id, exc)

    def get_heartbeat_ttl(self, job: Job, working_time: float = 0.0) -> int:
        # rq 3.0 BaseWorker.get_heartbeat_ttl: ours is renewed by the thread, not per job timeout.
        return self.heartbeat_ttl

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
        keys = [
            queue.intermediate_queue_key,
            queue.key,
            queue.intermediate_queue.get_first_seen_key(job_id),
            queue.started_job_registry.key,
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


def stop_requested(worker: BaseWorker) -> bool:
    """True once SIGTERM/SIGINT asked ``worker`` to stop.

    rq 3.0 raises StopRequested when idle without setting ``_stop_requested``;
    ``request_stop`` always notes ``_shutdown_requested_date``.
    """
    return bool(worker._stop_requested or getattr(worker, "_shutdown_requested_date", None))

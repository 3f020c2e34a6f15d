"""Run an RQ worker for an app's deferred receivers.

``python worker.py`` and ``flask signal-queue worker`` both end in
:func:`run_worker`: load the app, import its receivers, and run an RQ worker
that uses :class:`~signal_queue.jobs.SignalJob` and the JSON serializer on the
bridge's queues, so ``rq info`` sees an ordinary RQ worker.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
import threading
import time
from collections.abc import Sequence
from typing import Any, ClassVar

import redis
from flask import Flask
from flask.cli import NoAppException, ScriptInfo
from rq import Queue, SimpleWorker, Worker
from rq.job import Job
from rq.serializers import JSONSerializer
from rq.worker import WorkerStatus

from .emit import state_for
from .exceptions import ConfigurationError
from .extension import hide_secrets, safe_url, url_secrets
from .jobs import SignalJob, bind_worker_app

logger = logging.getLogger("signal_queue.worker")

#: A running job's entry in RQ's started registry expires after this many
#: seconds unless its worker renews it; then another worker's maintenance
#: (every MAINTENANCE_INTERVAL s) finds it abandoned and RQ runs it again.
JOB_HEARTBEAT_TTL = 30  # SIGNAL_QUEUE_ABANDONED_AFTER; renewed every third of it
MAINTENANCE_INTERVAL = 15  # SIGNAL_QUEUE_MAINTENANCE_INTERVAL


# Front of the queue is the left end: RQ pushes at_front jobs with LPUSH and takes from the left.
# KEYS: intermediate list, queue, first-seen key, started registry; ARGV: job id, its stale executions.
_RETURN_UNTAKEN = """
if redis.call('LREM', KEYS[1], 1, ARGV[1]) == 1 then
  redis.call('DEL', KEYS[3])
  for i = 2, #ARGV do redis.call('ZREM', KEYS[4], ARGV[i]) end
  redis.call('LPUSH', KEYS[2], ARGV[1])
  return 1
end
return 0
"""


#: Seconds RQ's per-queue maintenance lock lives (RQ: 899). A worker killed, or Redis restarted,
#: in the middle of a clean-up leaves it held; no one recovers abandoned jobs until it expires.
MAINTENANCE_LOCK_TTL = 60


class WorkerQueue(Queue):
    """RQ's Queue as our workers use it: a one-minute maintenance lock, and a note of the job taken.

    ``taken`` is the job this process's worker took from a queue and has not
    finished (a worker process runs one worker at a time). It is noted at the
    moment RQ takes it, so that a worker which loses Redis before or while
    starting the job knows what to put back (see SignalWorker.return_untaken_job).
    """

    taken: ClassVar[tuple[str, Queue] | None] = None

    def acquire_maintenance_lock(self) -> bool:
        return bool(self.connection.set(self.registry_cleaning_key, 1, nx=True, ex=MAINTENANCE_LOCK_TTL))

    @classmethod
    def dequeue_any(cls, *args: Any, **kwargs: Any) -> tuple[Job, Queue] | None:
        result = super().dequeue_any(*args, **kwargs)
        if result is not None:
            WorkerQueue.taken = (result[0].id, result[1])
        return result


class _SignalWorkerDefaults:
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("queue_class", WorkerQueue)
        kwargs.setdefault("job_class", SignalJob)
        kwargs.setdefault("serializer", JSONSerializer)
        kwargs.setdefault("maintenance_interval", MAINTENANCE_INTERVAL)
        kwargs.setdefault("worker_ttl", MAINTENANCE_INTERVAL + 15)
        super().__init__(*args, **kwargs)


class SignalWorker(_SignalWorkerDefaults, SimpleWorker):
    """Runs events in the worker process itself (no fork per job).

    Fast, and the app stays loaded. A thread renews the running job's entry in
    RQ's started registry every JOB_HEARTBEAT_EVERY seconds, so that when the
    worker dies (SIGKILL, a segfault in a handler) the job is found abandoned
    within about a minute and run again by another worker, skipping the events
    it had finished.
    """

    heartbeat_ttl = JOB_HEARTBEAT_TTL

    @property
    def taking(self) -> tuple[str, Queue] | None:
        """The job taken from the queue and not finished yet (see return_untaken_job)."""
        return WorkerQueue.taken

    @taking.setter
    def taking(self, value: tuple[str, Queue] | None) -> None:
        WorkerQueue.taken = value

    def execute_job(self, job: Job, queue: Queue) -> None:
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

    def return_untaken_job(self) -> str | None:
        """After Redis came back: put the job this worker took but never started back on its queue.

        RQ moves a taken job to the queue's intermediate list and out of it in the
        atomic transaction that starts it. A worker that lost Redis in between
        leaves it there, and RQ's clean-up returns it only after a minute; this
        worker knows the job, so it returns it at once.
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

    def _beat(self, job: Job, execution: Any, stop: threading.Event) -> None:
        while not stop.wait(max(self.heartbeat_ttl / 3, 0.5)):
            try:
                self.maintain_heartbeats(job, execution)
            except (redis.RedisError, OSError) as exc:
                self.log.warning("signal_queue: job %s heartbeat failed: %s", job.id, exc)

    def get_heartbeat_ttl(self, job: Job, working_time: float = 0.0) -> int:
        return self.heartbeat_ttl


class ForkingSignalWorker(_SignalWorkerDefaults, Worker):
    """Forks a work horse per event, as RQ's default worker: isolated, and slower."""


WORKER_CLASSES: dict[str, type[Worker] | type[SimpleWorker]] = {
    "simple": SignalWorker,
    "fork": ForkingSignalWorker,
}


def import_receivers(app: Flask) -> None:
    """Import the modules named in ``SIGNAL_QUEUE_IMPORTS`` so their receivers register."""
    for module in state_for(app).imports:
        try:
            importlib.import_module(module)
        except ImportError as exc:
            raise ConfigurationError(f"SIGNAL_QUEUE_IMPORTS names {module!r}, which cannot be imported: {exc}") from exc


def build_worker(
    app: Flask,
    queues: Sequence[str] = (),
    *,
    url: str | None = None,
    worker_class: str = "simple",
    name: str | None = None,
) -> Worker | SimpleWorker:
    """An RQ worker bound to ``app``, listening on ``queues`` (default: all the bridge's queues)."""
    state = state_for(app)
    import_receivers(app)
    cls = WORKER_CLASSES.get(worker_class)
    if cls is None:
        raise ConfigurationError(
            f"unknown worker class {worker_class!r}; choose one of {', '.join(WORKER_CLASSES)}"
        )
    # Its own connection, without the emit side's short socket timeout:
    # the worker blocks on BLPOP and RQ sets a timeout that fits that.
    connection = redis.Redis.from_url(url or state.redis_url)
    bind_worker_app(app)
    worker = cls(
        list(queues) or state.queue_names(),
        connection=connection,
        name=name,
        maintenance_interval=state.maintenance_interval,
        # RQ blocks on the queue for worker_ttl - 15 s; this keeps an idle worker's
        # maintenance (which finds abandoned jobs) on its interval.
        worker_ttl=state.maintenance_interval + 15,
    )
    if isinstance(worker, SignalWorker):
        worker.heartbeat_ttl = state.abandoned_after
    return worker


def run_worker(
    app: Flask,
    queues: Sequence[str] = (),
    *,
    burst: bool = False,
    url: str | None = None,
    worker_class: str = "simple",
    name: str | None = None,
    logging_level: str = "INFO",
    max_jobs: int | None = None,
    with_scheduler: bool = True,
) -> bool:
    """Run a worker until stopped (or until the queues are empty, with ``burst``).

    If Redis goes away (RQ's worker quits on a Redis timeout, or fails in its
    bookkeeping), wait for it to answer again and start a new worker in this
    process: a Redis restart never needs the worker restarted.
    """
    redis_url = url or state_for(app).redis_url
    wait_for_redis(redis_url)
    while True:
        worker = build_worker(app, queues, url=url, worker_class=worker_class, name=name)
        try:
            worked = worker.work(
                burst=burst, logging_level=logging_level, max_jobs=max_jobs, with_scheduler=with_scheduler
            )
        except (redis.ConnectionError, redis.TimeoutError) as exc:
            logger.warning("signal_queue: worker lost Redis (%s)", hide_secrets(str(exc), redis_url))
        else:
            if burst or max_jobs is not None or _stopping(worker):
                return worked
        if _stopping(worker):
            return False
        wait_for_redis(redis_url)
        logger.warning("signal_queue: Redis answers again; starting a new worker")
        if isinstance(worker, SignalWorker) and (returned := worker.return_untaken_job()):
            logger.warning("signal_queue: job %s, taken but never started when Redis went away, is queued again",
                           returned)


def _stopping(worker: Worker | SimpleWorker) -> bool:
    """True once SIGTERM/SIGINT asked the worker to stop (RQ raises StopRequested when idle,
    without setting ``_stop_requested``; ``request_stop`` always notes the date)."""
    return bool(worker._stop_requested or getattr(worker, "_shutdown_requested_date", None))


def wait_for_redis(url: str, longest: float = 10.0) -> None:
    """Return when Redis at ``url`` answers PING; wait with backoff meanwhile.

    A wrong password or database, or a URL that does not parse, fails at once with
    :class:`ConfigurationError`: waiting would not fix it. Messages show the URL masked.
    """
    delay = 0.2
    while True:
        try:
            client = redis.Redis.from_url(url, socket_connect_timeout=2, socket_timeout=2)
        except ValueError as exc:
            raise ConfigurationError(f"Redis URL {safe_url(url)} is not valid: {hide_secrets(str(exc), url)}") from None
        try:
            client.ping()
            return
        except (redis.AuthenticationError, redis.ResponseError) as exc:
            raise ConfigurationError(
                f"Redis at {safe_url(url)} refused the worker: {type(exc).__name__}: {hide_secrets(str(exc), url)}"
            ) from None
        except (redis.ConnectionError, redis.TimeoutError, OSError) as exc:
            logger.warning("signal_queue: waiting for Redis at %s (%s); next try in %.1f s",
                           safe_url(url), hide_secrets(str(exc), url), delay)
        finally:
            client.close()
        time.sleep(delay)
        delay = min(delay * 2, longest)


def load_app(import_path: str | None) -> Flask:
    """Load an app as ``flask --app`` does: ``module``, ``module:app`` or ``module:create_app()``."""
    path = import_path or os.environ.get("SIGNAL_QUEUE_APP") or os.environ.get("FLASK_APP")
    if not path:
        raise ConfigurationError("no app to load: pass --app module:app, or set SIGNAL_QUEUE_APP or FLASK_APP")
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())
    return ScriptInfo(app_import_path=path, set_debug_flag=False).load_app()


def _log_to_stderr(level: str) -> None:
    """signal_queue's own log lines (one per event, outages) next to RQ's, unless the app set up logging."""
    root = logging.getLogger("signal_queue")
    if not root.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s %(message)s", "%H:%M:%S"))
        root.addHandler(handler)
        root.setLevel(level.upper())


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="worker.py", description="Run an RQ worker for a Flask app's @deferred signal receivers."
    )
    parser.add_argument("queues", nargs="*", help="queue names (default: all the app's deferred queues)")
    parser.add_argument("--app", help="module:app or module:create_app() (default: $SIGNAL_QUEUE_APP, then $FLASK_APP)")
    parser.add_argument(
        "--url",
        help="Redis URL (default: the app's SIGNAL_QUEUE_REDIS_URL, which the environment variable of that name "
        "sets); one with a password is visible to every user of the host in the process list: use the environment",
    )
    parser.add_argument("--burst", action="store_true", help="quit when the queues are empty")
    parser.add_argument("--worker-class", choices=sorted(WORKER_CLASSES), default="simple")
    parser.add_argument("--name", help="worker name shown by rq info")
    parser.add_argument("--max-jobs", type=int, help="quit after this many jobs")
    parser.add_argument("--logging-level", default="INFO")
    parser.add_argument("--no-scheduler", action="store_true", help="do not run RQ's scheduler (retry delays)")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None, app: Flask | None = None) -> int:
    """Entry point of ``python worker.py`` and, with the app already loaded, ``flask signal-queue worker``."""
    args = parse_args(argv)
    _log_to_stderr(args.logging_level)
    if args.url and url_secrets(args.url):
        logger.warning(
            "signal_queue: --url %s carries a password, which is visible to every user of this host in the "
            "process list (ps, /proc/<pid>/cmdline); set SIGNAL_QUEUE_REDIS_URL in the worker's environment "
            "(or the app's config) instead",
            safe_url(args.url),
        )
    try:
        run_worker(
            app or load_app(args.app),
            args.queues,
            burst=args.burst,
            url=args.url,
            worker_class=args.worker_class,
            name=args.name,
            logging_level=args.logging_level,
            max_jobs=args.max_jobs,
            with_scheduler=not args.no_scheduler,
        )
    except (ConfigurationError, NoAppException) as exc:
        print(f"worker: {exc}", file=sys.stderr)
        return 2
    return 0

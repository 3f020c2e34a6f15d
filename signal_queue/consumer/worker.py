"""The worker: an RQ worker that runs an app's deferred receivers, and survives Redis going away.

``python worker.py`` and ``flask signal-queue worker`` both end in
:func:`run_worker`: import the app's receivers, bind its :class:`~.run.Consumer`,
and run an RQ worker that uses :class:`~.job.SignalJob` and the JSON serializer
on the bridge's queues, so ``rq info`` and rq-dashboard see an ordinary RQ worker.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import logging
import os
import socket
import sys
import threading
import time
from collections.abc import Sequence
from typing import Any

import redis
from flask import Flask
from flask.cli import ScriptInfo
from redis.backoff import NoBackoff
from redis.retry import Retry
from rq import Queue, SimpleWorker, Worker
from rq.exceptions import StopRequested
from rq.job import Job
from rq.serializers import JSONSerializer

from ..exceptions import ConfigurationError
from ..wire.keys import PROBE_KEY, PROBE_TTL_MS
from ..wire.redis_connect import CLUSTER_UNSUPPORTED, RedisSource, cluster_enabled
from ..wire.redis_errors import Fault, classify
from ..wire.redis_identity import RedisIdentity, data_loss, read_identity, restarted_with_data
from .handler_process import HandlerProcess
from .job import SignalJob
from .rq_compat import (
    BackstopDeathPenalty,
    CompatQueue,
    CompatWorker,
    FaultAwareWorker,
    RedisFault,
    defer_maintenance,
    retire_worker,
    stop_requested,
)
from .run import Consumer, bind, bound, first_run_items, use_runner

logger = logging.getLogger("signal_queue.worker")


class _SignalWorkerDefaults:
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("queue_class", CompatQueue)
        kwargs.setdefault("job_class", SignalJob)
        kwargs.setdefault("serializer", JSONSerializer)
        super().__init__(*args, **kwargs)


class SignalWorker(_SignalWorkerDefaults, FaultAwareWorker, CompatWorker):
    """Runs events in one long-lived handler process that it supervises (no fork per job).

    The worker talks to RQ and Redis; the handlers run in a child forked once
    the app is loaded (:class:`~.handler_process.HandlerProcess`), which the
    worker kills and replaces when an event crashes it or overruns its timeout,
    blaming that event alone. A running job's entry in RQ's started registry
    expires after ``SIGNAL_QUEUE_ABANDONED_AFTER`` seconds unless this worker
    renews it (from its own thread, whatever the handler does); then another
    worker's maintenance (every ``SIGNAL_QUEUE_MAINTENANCE_INTERVAL`` seconds)
    finds it abandoned and RQ runs it again. On SIGTERM the running event may
    finish within ``SIGNAL_QUEUE_SHUTDOWN_GRACE`` seconds; the rest of its job
    goes back to the front of the queue at once.
    """

    # Each event's timeout is enforced by killing the handler process; RQ's alarm for the
    # whole job only guards the worker's own bookkeeping.
    death_penalty_class = BackstopDeathPenalty

    def __init__(self, *args: Any, consumer: Consumer | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        consumer = consumer or bound()
        if consumer is None:
            raise ConfigurationError("a SignalWorker needs the app's consumer: build it with build_worker()")
        #: The process the handlers run in.
        self.handlers = HandlerProcess(consumer)

    def work(self, *args: Any, **kwargs: Any) -> bool:
        # The handler process is forked first, from the loaded app, before RQ starts its threads.
        self.handlers.start()
        use_runner(self.handlers)
        try:
            return bool(super().work(*args, **kwargs))
        finally:
            use_runner(None)
            self.handlers.close()
            self.close_heartbeats()

    def stop_soon(self) -> None:
        # In the SIGTERM handler: the handler process starts no other event from now on.
        self.handlers.request_stop()

    def started_by_take(self, job: Job, queue: Queue) -> None:
        # The job is started in Redis (by its take) and passed the allow-list: a first attempt's
        # events go to the handler process now, while RQ logs the job and runs its bookkeeping up to
        # the job function, which follows them (HandlerProcess.run). A later attempt first reads the
        # done marks in the job function. The first job waits for RQ's one look at the Redis version.
        if not isinstance(job, SignalJob) or job.refusal is not None or job.attempt != 1:
            return
        if not self.redis_server_version:
            return
        found = first_run_items(job.func_name, job.args)
        if found is not None:
            with self.handing_early(self.handlers.holds_early):
                self.handlers.send_early(job.id, job.origin, *found)

    def execute_job(self, job: Job, queue: Queue) -> None:
        try:
            super().execute_job(job, queue)
        finally:
            self.handlers.drop_early()


class ForkingSignalWorker(_SignalWorkerDefaults, FaultAwareWorker, Worker):
    """Forks a work horse per job, as RQ's default worker: isolated, and slower."""


WORKER_CLASSES: dict[str, type[Worker] | type[SimpleWorker]] = {
    "simple": SignalWorker,
    "fork": ForkingSignalWorker,
}


def import_receivers(consumer: Consumer) -> None:
    """Import the modules named in ``SIGNAL_QUEUE_IMPORTS`` so their receivers register."""
    for module in consumer.imports:
        try:
            importlib.import_module(module)
        except ImportError as exc:
            raise ConfigurationError(f"SIGNAL_QUEUE_IMPORTS names {module!r}, which cannot be imported: {exc}") from exc


def build_worker(
    consumer: Consumer,
    queues: Sequence[str] = (),
    *,
    url: str | None = None,
    worker_class: str = "simple",
    name: str | None = None,
) -> Worker | SimpleWorker:
    """An RQ worker bound to ``consumer``'s app, on ``queues`` (default: all the bridge's queues)."""
    import_receivers(consumer)
    if not queues and (unlisted := consumer.unlisted_queues()):
        logger.warning(
            "signal_queue: receivers use queue(s) %s, which SIGNAL_QUEUE_QUEUES does not list; "
            "this worker takes from them last", ", ".join(unlisted),
        )
    cls = WORKER_CLASSES.get(worker_class)
    if cls is None:
        raise ConfigurationError(
            f"unknown worker class {worker_class!r}; choose one of {', '.join(WORKER_CLASSES)}"
        )
    # Its own connection, without the emit side's short socket timeout:
    # the worker blocks waiting for jobs and RQ sets a timeout that fits that.
    source = redis_source(consumer, url)
    connection = source.client()
    check_redis(connection, source.shown)
    bind(consumer)
    CompatQueue.abandoned_after = consumer.abandoned_after
    options: dict[str, Any] = {"consumer": consumer} if issubclass(cls, SignalWorker) else {}
    worker = cls(
        list(queues) or consumer.queue_names(),
        connection=connection,
        name=name,
        maintenance_interval=consumer.maintenance_interval,
        # RQ blocks on the queue for worker_ttl - 15 s; this keeps an idle worker's
        # maintenance (which finds abandoned jobs) on its interval.
        worker_ttl=consumer.maintenance_interval + 15,
        **options,
    )
    if isinstance(worker, SignalWorker):
        worker.heartbeat_ttl = consumer.abandoned_after
    return worker


#: The oldest Redis a worker takes jobs from: its take uses LMOVE and LPOS (Redis 6.2).
OLDEST_REDIS = (6, 2)


def redis_source(consumer: Consumer, url: str | None) -> RedisSource:
    """The worker's ``--url`` if given, else the app's (``SIGNAL_QUEUE_REDIS_CLIENT`` or ``SIGNAL_QUEUE_REDIS_URL``)."""
    return RedisSource(url, name="--url") if url else consumer.redis


def check_redis(connection: redis.Redis, shown: str) -> None:
    """Refuse, with the fix, a Redis Cluster node or a Redis too old for the worker's reliable take."""
    if cluster_enabled(connection):
        raise ConfigurationError(f"Redis at {shown} is a Redis Cluster node (cluster_enabled:1): {CLUSTER_UNSUPPORTED}")
    text = str(connection.info("server").get("redis_version", "0"))
    version = tuple(int(part) for part in text.split(".")[:2] if part.isdigit())
    if version < OLDEST_REDIS:
        raise ConfigurationError(
            f"Redis at {shown} is version {text}; a signal_queue worker needs Redis "
            f"{'.'.join(map(str, OLDEST_REDIS))} or newer (it takes jobs with LMOVE and LPOS): upgrade Redis"
        )


def run_worker(
    consumer: Consumer,
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

    Any Redis error that passes (Redis full, read-only, loading, busy, a lost
    master, a timeout, a lost connection) ends RQ's worker: this waits until
    Redis takes writes again and starts a new worker in this process, which
    registers itself again. A fault that needs a fix (a wrong password, an ACL
    denial, a TLS certificate not trusted; see :mod:`~signal_queue.wire.redis_errors`)
    raises :class:`ConfigurationError` naming it: the CLI exits 2.
    """
    watch = RedisWatch(redis_source(consumer, url))
    try:
        watch.wait_writable(then="starting the worker")
        watch.check_data(None)
        after_fault = False
        pause = 1.0
        while True:
            worker: Worker | SimpleWorker | None = None
            started = time.monotonic()
            fault: BaseException | None = None
            try:
                # Building an RQ worker talks to Redis too (CLIENT SETNAME), which may fail again.
                worker = build_worker(consumer, queues, url=url, worker_class=worker_class, name=name)
                if isinstance(worker, FaultAwareWorker):
                    worker.on_registration_lost = functools.partial(_registered_again, worker, watch)
                if after_fault:
                    defer_maintenance(worker)
                worked = worker.work(
                    burst=burst, logging_level=logging_level, max_jobs=max_jobs, with_scheduler=with_scheduler
                )
            except RedisFault as exc:  # out of RQ's loop, where it is not caught (not a stop request)
                fault = exc.error
            except redis.RedisError as exc:  # RQ's start (register_birth) or teardown (register_death)
                fault = getattr(worker, "redis_fault", None) or exc
            else:
                fault = getattr(worker, "redis_fault", None)
                if stop_requested(worker) and isinstance(worker, SignalWorker):
                    # SIGTERM between taking a job and starting it: it goes back on its queue
                    # now, for the next worker, not after the abandoned-job bound.
                    with contextlib.suppress(redis.RedisError):
                        if returned := worker.return_untaken_job():
                            logger.warning("signal_queue: job %s, taken but not started when the worker was "
                                           "stopped, is queued again", returned)
                if stop_requested(worker) or (fault is None and (burst or max_jobs is not None)):
                    return worked
            if worker is not None and stop_requested(worker):
                return False
            found = classify(fault, watch.source.url) if fault is not None else None
            if found is not None and not found.permanent:
                assert fault is not None
                watch.wait_writable(then="starting a new worker", stopped_by=(found, fault))
                if worker is not None:
                    retire_worker(worker)  # its teardown could not unregister it
            elif found is not None:
                raise watch.refused(found)
            else:
                # RQ logged the error with its traceback ("found an unhandled exception"); it is
                # not Redis's, so nothing here says Redis failed.
                pause = 1.0 if time.monotonic() - started > 60 else pause
                logger.warning(
                    "signal_queue: the worker stopped after an error%s (see the traceback above); "
                    "starting a new worker in %.0f s",
                    f" ({type(fault).__name__}: {watch.hide(str(fault))})" if fault is not None else "", pause,
                )
                time.sleep(pause)
                pause = min(pause * 2, 30.0)
                watch.wait_writable(then="starting a new worker")
            after_fault = found is not None
            watch.check_data(getattr(worker, "queued_seen", None))
            if isinstance(worker, SignalWorker):
                _return_untaken_job(worker)
    except StopRequested:  # SIGTERM while waiting for Redis
        return False


def _return_untaken_job(worker: SignalWorker) -> None:
    try:
        returned = worker.return_untaken_job()
    except redis.RedisError as exc:  # Redis failed again: RQ's own clean-up returns it within a minute
        logger.warning("signal_queue: could not queue again the job taken before Redis went away: %s", exc)
        return
    if returned:
        logger.warning("signal_queue: job %s, taken but never started when Redis went away, is queued again",
                       returned)


def _registered_again(worker: FaultAwareWorker, watch: RedisWatch, queued_before: int | None) -> None:
    watch.check_data(queued_before)
    logger.warning("signal_queue: Redis no longer listed worker %s (rq info showed it gone); registered it again",
                   worker.name)


class RedisWatch:
    """The worker's look at its Redis: wait until it takes writes, and tell when it lost its data.

    PING alone is answered by a Redis that is full or a read-only replica, where
    the worker's first write (registering itself) would fail; so readiness is a
    SET with a short expiry on a key of this worker's own (``sq:probe:<host>:<pid>``).
    """

    def __init__(self, source: RedisSource, longest: float = 5.0) -> None:
        self.source = source
        #: The Redis as log lines name it (passwords masked).
        self.shown = source.shown
        self.longest = longest
        self.probe_key = PROBE_KEY.format(f"{socket.gethostname()}:{os.getpid()}")
        #: Redis's run id and marker at the last look (see :mod:`signal_queue.wire.redis_identity`).
        self.identity: RedisIdentity | None = None
        self._unchecked: str | None = None
        self._lock = threading.Lock()  # the heartbeat thread may look too

    def hide(self, text: str) -> str:
        return self.source.hide(text)

    def client(self) -> redis.Redis:
        """A short-lived client that fails fast: no redis-py retries, 2 s timeouts."""
        return self.source.client(socket_connect_timeout=2, socket_timeout=2, retry=Retry(NoBackoff(), 0))

    def refused(self, fault: Fault) -> ConfigurationError:
        """The worker's exit line for a fault that waiting does not fix: the cause, and what to fix."""
        return ConfigurationError(
            f"{fault.line(self.shown, 'the worker')}; waiting will not fix this: {fault.fix}, "
            "then start the worker again"
        )

    def wait_writable(self, then: str, stopped_by: tuple[Fault, BaseException] | None = None) -> float:
        """Return when Redis takes a write; meanwhile retry with backoff (0.2 s doubling to ``longest``).

        Logs one line per cause (``stopped_by`` is the one that ended the worker),
        not one per try, and one when Redis takes writes again. A fault that needs
        a fix raises :class:`ConfigurationError`. Returns the seconds waited.
        """
        started = time.monotonic()
        logged: str | None = None
        if stopped_by is not None:
            fault, exc = stopped_by
            logged = fault.code
            logger.warning(
                "signal_queue: the worker stopped: Redis at %s %s (%s: %s); waiting until it takes writes again, "
                "retrying with backoff up to %.0f s",
                self.shown, fault.cause, type(exc).__name__, self.hide(str(exc)), self.longest,
            )
        delay = 0.2
        while True:
            client = self.client()
            try:
                client.set(self.probe_key, 1, px=PROBE_TTL_MS)
                break
            except (redis.RedisError, OSError) as exc:
                found = classify(exc, self.source.url)
                if found is None:
                    raise
                if found.permanent:
                    raise self.refused(found) from None
                if found.code != logged:
                    logger.warning(
                        "signal_queue: waiting for Redis at %s: it %s (%s: %s); retrying with backoff up to %.0f s",
                        self.shown, found.cause, type(exc).__name__, self.hide(str(exc)), self.longest,
                    )
                    logged = found.code
            finally:
                client.close()
            time.sleep(delay)
            delay = min(delay * 2, self.longest)
        waited = time.monotonic() - started
        if logged is not None:
            logger.warning("signal_queue: Redis at %s takes writes again (waited %.1f s); %s",
                           self.shown, waited, then)
        return waited

    def check_data(self, queued: int | None) -> None:
        """Read Redis's run id and marker; log one WARNING if Redis lost its data since the last look.

        ``queued`` is how many jobs this worker last saw waiting (its last heartbeat).
        """
        with self._lock:
            client = self.client()
            try:
                now = read_identity(client)
            except redis.RedisError as exc:
                if self._unchecked != type(exc).__name__:
                    logger.warning("signal_queue: cannot tell whether Redis at %s kept its data: %s: %s",
                                   self.shown, type(exc).__name__, self.hide(str(exc)))
                self._unchecked = type(exc).__name__
                return
            finally:
                client.close()
            self._unchecked = None
            before, self.identity = self.identity, now
        loss = data_loss(before, now)
        if loss is not None:
            reason, advice = loss
            if queued is None:
                lost = "the jobs queued before it may have been lost"
            elif queued == 0:
                lost = "no job was waiting when this worker last looked; any queued since may have been lost"
            else:
                lost = (f"the {queued} queued job(s) (each a batch of events) waiting when this worker last "
                        "looked may have been lost")
            logger.warning("signal_queue: %s; %s; %s", reason, lost, advice)
        elif restarted_with_data(before, now):
            assert before is not None
            logger.info("signal_queue: Redis at %s restarted (run id %s -> %s) and kept its data",
                        self.shown, before.run_id, now.run_id)


def load_app(import_path: str | None) -> Flask:
    """Load an app as ``flask --app`` does: ``module``, ``module:app`` or ``module:create_app()``."""
    path = import_path or os.environ.get("SIGNAL_QUEUE_APP") or os.environ.get("FLASK_APP")
    if not path:
        raise ConfigurationError("no app to load: pass --app module:app, or set SIGNAL_QUEUE_APP or FLASK_APP")
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())
    return ScriptInfo(app_import_path=path, set_debug_flag=False).load_app()


def log_to_stderr(level: str) -> None:
    """signal_queue's own log lines (one per batch job at INFO, one per event at DEBUG, outages) next to RQ's,
    unless the app set up logging."""
    root = logging.getLogger("signal_queue")
    if not root.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s %(message)s", "%H:%M:%S"))
        root.addHandler(handler)
        root.setLevel(level.upper())

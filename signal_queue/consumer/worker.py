"""The worker: an RQ worker that runs an app's deferred receivers, and survives Redis going away.

``python worker.py`` and ``flask signal-queue worker`` both end in
:func:`run_worker`: import the app's receivers, bind its :class:`~.run.Consumer`,
and run an RQ worker that uses :class:`~.job.SignalJob` and the JSON serializer
on the bridge's queues, so ``rq info`` and rq-dashboard see an ordinary RQ worker.
"""

from __future__ import annotations

import importlib
import logging
import os
import sys
import time
from collections.abc import Sequence
from typing import Any

import redis
from flask import Flask
from flask.cli import ScriptInfo
from rq import SimpleWorker, Worker
from rq.serializers import JSONSerializer

from ..exceptions import ConfigurationError
from ..wire.redis_url import hide_secrets, safe_url
from .job import SignalJob
from .rq_compat import CompatQueue, CompatWorker, stop_requested
from .run import Consumer, bind

logger = logging.getLogger("signal_queue.worker")


class _SignalWorkerDefaults:
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("queue_class", CompatQueue)
        kwargs.setdefault("job_class", SignalJob)
        kwargs.setdefault("serializer", JSONSerializer)
        super().__init__(*args, **kwargs)


class SignalWorker(_SignalWorkerDefaults, CompatWorker):
    """Runs events in the worker process itself (no fork per job): fast, and the app stays loaded.

    A running job's entry in RQ's started registry expires after
    ``SIGNAL_QUEUE_ABANDONED_AFTER`` seconds unless this worker renews it; then
    another worker's maintenance (every ``SIGNAL_QUEUE_MAINTENANCE_INTERVAL``
    seconds) finds it abandoned and RQ runs it again.
    """


class ForkingSignalWorker(_SignalWorkerDefaults, Worker):
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
    # the worker blocks on BLPOP and RQ sets a timeout that fits that.
    connection = redis.Redis.from_url(url or consumer.redis_url)
    bind(consumer)
    worker = cls(
        list(queues) or consumer.queue_names(),
        connection=connection,
        name=name,
        maintenance_interval=consumer.maintenance_interval,
        # RQ blocks on the queue for worker_ttl - 15 s; this keeps an idle worker's
        # maintenance (which finds abandoned jobs) on its interval.
        worker_ttl=consumer.maintenance_interval + 15,
    )
    if isinstance(worker, SignalWorker):
        worker.heartbeat_ttl = consumer.abandoned_after
    return worker


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

    If Redis goes away (RQ's worker quits on a Redis timeout, or fails in its
    bookkeeping), wait for it to answer again and start a new worker in this
    process: a Redis restart never needs the worker restarted.
    """
    redis_url = url or consumer.redis_url
    wait_for_redis(redis_url)
    while True:
        worker = build_worker(consumer, queues, url=url, worker_class=worker_class, name=name)
        try:
            worked = worker.work(
                burst=burst, logging_level=logging_level, max_jobs=max_jobs, with_scheduler=with_scheduler
            )
        except (redis.ConnectionError, redis.TimeoutError) as exc:
            logger.warning("signal_queue: worker lost Redis (%s)", hide_secrets(str(exc), redis_url))
        else:
            if burst or max_jobs is not None or stop_requested(worker):
                return worked
        if stop_requested(worker):
            return False
        wait_for_redis(redis_url)
        logger.warning("signal_queue: Redis answers again; starting a new worker")
        if isinstance(worker, SignalWorker) and (returned := worker.return_untaken_job()):
            logger.warning("signal_queue: job %s, taken but never started when Redis went away, is queued again",
                           returned)


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


def log_to_stderr(level: str) -> None:
    """signal_queue's own log lines (one per event, outages) next to RQ's, unless the app set up logging."""
    root = logging.getLogger("signal_queue")
    if not root.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s %(message)s", "%H:%M:%S"))
        root.addHandler(handler)
        root.setLevel(level.upper())

"""Run an RQ worker for an app's deferred receivers.

``python worker.py`` and ``flask signal-queue worker`` both end in
:func:`run_worker`: load the app, import its receivers, and run an RQ worker
that uses :class:`~signal_queue.jobs.SignalJob` and the JSON serializer on the
bridge's queues, so ``rq info`` sees an ordinary RQ worker.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Sequence
from typing import Any

import redis
from flask import Flask
from flask.cli import NoAppException, ScriptInfo
from rq import SimpleWorker, Worker
from rq.serializers import JSONSerializer

from .emit import state_for
from .exceptions import ConfigurationError
from .jobs import SignalJob, bind_worker_app


class _SignalWorkerDefaults:
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("job_class", SignalJob)
        kwargs.setdefault("serializer", JSONSerializer)
        super().__init__(*args, **kwargs)


class SignalWorker(_SignalWorkerDefaults, SimpleWorker):
    """Runs events in the worker process itself (no fork per job).

    Fast, and the app stays loaded. A handler that crashes the interpreter
    (segfault, ``os._exit``) takes the worker down with it; its job stays in
    RQ's started registry until it is found abandoned and handled again.
    """


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
    return cls(list(queues) or state.queue_names(), connection=connection, name=name)


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
    """Run a worker until stopped (or until the queues are empty, with ``burst``)."""
    worker = build_worker(app, queues, url=url, worker_class=worker_class, name=name)
    return worker.work(
        burst=burst, logging_level=logging_level, max_jobs=max_jobs, with_scheduler=with_scheduler
    )


def load_app(import_path: str | None) -> Flask:
    """Load an app as ``flask --app`` does: ``module``, ``module:app`` or ``module:create_app()``."""
    path = import_path or os.environ.get("SIGNAL_QUEUE_APP") or os.environ.get("FLASK_APP")
    if not path:
        raise ConfigurationError("no app to load: pass --app module:app, or set SIGNAL_QUEUE_APP or FLASK_APP")
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())
    return ScriptInfo(app_import_path=path, set_debug_flag=False).load_app()


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="worker.py", description="Run an RQ worker for a Flask app's @deferred signal receivers."
    )
    parser.add_argument("queues", nargs="*", help="queue names (default: all the app's deferred queues)")
    parser.add_argument("--app", help="module:app or module:create_app() (default: $SIGNAL_QUEUE_APP, then $FLASK_APP)")
    parser.add_argument("--url", help="Redis URL (default: the app's SIGNAL_QUEUE_REDIS_URL)")
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

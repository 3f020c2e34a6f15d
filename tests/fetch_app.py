"""An app whose receivers use two queues, so its worker serves both (RQ's multi-queue path).

Only worker and CLI subprocesses import it: a receiver with ``queue=`` changes the
queue list of every app in the process that imports it. The handlers write what
they ran to ``FAULT_LOG`` (not Redis, which a test may break):
``<queue> <n> <event id> <attempt> <job id> <unix time>``.
"""

from __future__ import annotations

import os
import time
from typing import Any

import click
from blinker import Namespace
from flask import Flask
from rq import get_current_job

from signal_queue import SignalQueue, current_event, deferred

bus = Namespace()
first = bus.signal("fetch-first")
second = bus.signal("fetch-second")
SECOND_QUEUE = "second"


def create_app() -> Flask:
    app = Flask(__name__)
    SignalQueue(app)

    @app.cli.command("emit")
    @click.argument("count", type=int)
    @click.option("--queues", default=2, help="1: the default queue only; 2: both queues, alternating.")
    def emit(count: int, queues: int) -> None:
        """Emit COUNT events, each sent as a job of its own."""
        outbox = app.extensions["signal_queue"].outbox
        with app.app_context():
            for n in range(count):
                (second if queues == 2 and n % 2 else first).send("cli", n=n)
                outbox.flush()

    return app


def _log(queue: str, n: int) -> None:
    job = get_current_job()
    line = f"{queue} {n} {current_event.id} {current_event.attempt} {job.id if job else '-'} {time.time():.6f}\n"
    # One write() of a short line with O_APPEND: lines from several processes never interleave.
    fd = os.open(os.environ["FAULT_LOG"], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line.encode())
    finally:
        os.close(fd)


@deferred(first)
def on_first(sender: Any, n: int) -> None:
    _log("signals", n)


@deferred(second, queue=SECOND_QUEUE)
def on_second(sender: Any, n: int) -> None:
    _log(SECOND_QUEUE, n)

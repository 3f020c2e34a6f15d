"""Apps for the worker benchmark: a trivial deferred receiver, the same as a plain RQ job and a Celery task."""

from __future__ import annotations

import os
from typing import Any

import redis
from blinker import Namespace
from celery import Celery
from flask import Flask

from signal_queue import SignalQueue, deferred

URL = os.environ.get("SIGNAL_QUEUE_REDIS_URL", "redis://127.0.0.1:6379/0")
DONE = "bench:done"

tick = Namespace().signal("bench-tick")

app = Flask(__name__)
SignalQueue(app)
_conn = redis.Redis.from_url(URL)


@deferred(tick)
def on_tick(sender: Any, n: int) -> None:
    """Trivial: the benchmark measures the machinery around it."""


def plain_job(n: int) -> None:
    """The same nothing, as a plain RQ job."""


celery = Celery("bench", broker=URL)
celery.conf.update(task_ignore_result=True, task_default_queue="bench", worker_prefetch_multiplier=64)


@celery.task(name="bench.tick")
def celery_tick(n: int) -> None:
    """The same nothing, as a Celery task; counts itself so the benchmark knows when all ran."""
    _conn.incr(DONE)

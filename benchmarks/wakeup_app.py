"""An app for the idle wake-up benchmark: one receiver per queue, each noting how late it started."""

from __future__ import annotations

import os
import time
from typing import Any

import redis
from blinker import Namespace
from flask import Flask

from signal_queue import SignalQueue, deferred

URL = os.environ.get("SIGNAL_QUEUE_REDIS_URL", "redis://127.0.0.1:6379/0")
QUEUES = ("signals", "second", "third")
LAGS = "bench:lag:{0}"

bus = Namespace()
pings = {name: bus.signal(f"ping-{name}") for name in QUEUES}

app = Flask(__name__)
app.config["SIGNAL_QUEUE_DELIVERY"] = "immediate"  # the job is in Redis when send() returns
SignalQueue(app)
_conn = redis.Redis.from_url(URL)


def _lag(queue: str, sent_at: float) -> None:
    _conn.rpush(LAGS.format(queue), time.time() - sent_at)


@deferred(pings["signals"])
def on_signals(sender: Any, sent_at: float) -> None:
    _lag("signals", sent_at)


@deferred(pings["second"], queue="second")
def on_second(sender: Any, sent_at: float) -> None:
    _lag("second", sent_at)


@deferred(pings["third"], queue="third")
def on_third(sender: Any, sent_at: float) -> None:
    _lag("third", sent_at)

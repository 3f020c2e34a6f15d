"""An app for the delivery-lag benchmark: default configuration, one receiver that notes how late it started.

The receiver notes its lag with one ``write`` to a local file opened in append
mode (``SIGNAL_QUEUE_BENCH_LAG_FILE``), a few microseconds, so the benchmark
measures signal_queue and not its own reporting. Without that variable it
pushes the lag to a Redis list (``bench:lag``) as earlier versions of the
benchmark did: one round trip per event, which about doubled a trivial event's
cost in the worker (``delivery_lag.py --report redis``).
"""

from __future__ import annotations

import os
import time
from typing import Any

import redis
from blinker import Namespace
from flask import Flask

from signal_queue import SignalQueue, current_event, deferred

URL = os.environ.get("SIGNAL_QUEUE_REDIS_URL", "redis://127.0.0.1:6379/0")
LAGS = "bench:lag"
LAG_FILE = os.environ.get("SIGNAL_QUEUE_BENCH_LAG_FILE", "")

tick = Namespace().signal("bench-lag")

app = Flask(__name__)
SignalQueue(app)  # the default configuration: background delivery
_conn = redis.Redis.from_url(URL)
_out: tuple[int, int] | None = None  # (pid, fd): the handler process opens its own


def _note(lag: float, event_id: str) -> None:
    global _out
    line = b"%.7f %s" % (lag, event_id.encode())
    if not LAG_FILE:
        _conn.rpush(LAGS, line)
        return
    if _out is None or _out[0] != os.getpid():
        _out = (os.getpid(), os.open(LAG_FILE, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600))
    os.write(_out[1], line + b"\n")  # one line per write: appends from any process stay whole


@deferred(tick)
def on_tick(sender: Any, sent_at: float) -> None:
    """Handler start minus the emit's own clock reading (same host, same clock), with the event's id."""
    _note(time.time() - sent_at, current_event.id)

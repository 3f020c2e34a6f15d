"""An app for the delivery-lag benchmark: default configuration, one receiver that notes how late it started."""

from __future__ import annotations

import os
import time
from typing import Any

import redis
from blinker import Namespace
from flask import Flask

from signal_queue import SignalQueue, deferred

URL = os.environ.get("SIGNAL_QUEUE_REDIS_URL", "redis://127.0.0.1:6379/0")
LAGS = "bench:lag"

tick = Namespace().signal("bench-lag")

app = Flask(__name__)
SignalQueue(app)  # the default configuration: background delivery
_conn = redis.Redis.from_url(URL)


@deferred(tick)
def on_tick(sender: Any, sent_at: float) -> None:
    """Handler start minus the emit's own clock reading (same host, same clock)."""
    _conn.rpush(LAGS, time.time() - sent_at)

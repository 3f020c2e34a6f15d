"""An app for poison-event tests: handlers that crash the interpreter, hold the GIL, or take their time.

Every handler writes what it does to the file named by ``FAULT_LOG`` (``start``
before, ``ran`` after, with the event id, the attempt and the pid), one
``O_APPEND`` write per line, so the evidence outlives the processes that crash.
"""

from __future__ import annotations

import ctypes
import os
import time
from typing import Any

from blinker import Namespace
from flask import Flask
from rq import Retry

from signal_queue import SignalQueue, current_event, deferred
from tests.fault_log import log

bus = Namespace()
step = bus.signal("poison-step")
segfault = bus.signal("poison-segfault")
exits = bus.signal("poison-exit")
spin = bus.signal("poison-spin")
hold = bus.signal("poison-hold")
slow = bus.signal("poison-slow")


def create_app(**config: Any) -> Flask:
    app = Flask(__name__)
    app.config.update(config)
    SignalQueue(app)

    @app.route("/a")
    def a() -> str:
        step.send("view", n=1)
        segfault.send("view")
        step.send("view", n=2)
        return "ok"

    @app.route("/b")
    def b() -> str:
        step.send("view", n=3)
        step.send("view", n=4)
        exits.send("view")
        return "ok"

    @app.route("/c")
    def c() -> str:
        for n in (5, 6, 7):
            step.send("view", n=n)
        return "ok"

    return app


@deferred(step)
def on_step(sender: Any, n: int) -> None:
    log("ran", n)


@deferred(segfault, retry=Retry(max=1, interval=0))
def on_segfault(sender: Any) -> None:
    """Reads address 0: SIGSEGV, as a bug in a C extension would."""
    log("start")
    ctypes.string_at(0)


@deferred(exits, retry=Retry(max=1, interval=0))
def on_exit(sender: Any) -> None:
    """Leaves the interpreter without unwinding, as a library calling exit() would."""
    log("start")
    os._exit(1)


@deferred(spin, timeout=1)
def on_spin(sender: Any) -> None:
    """Holds the GIL in C for hours: no alarm handler can run until it returns."""
    log("start")
    sum(range(10**12))
    log("ran")


@deferred(hold, timeout=30)
def on_hold(sender: Any, seconds: int) -> None:
    """Holds the GIL for ``seconds`` in C (libc's sleep through PyDLL, which keeps the GIL), then returns."""
    log("start")
    ctypes.PyDLL(None).sleep(seconds)
    log("ran")


@deferred(slow, timeout=60)
def on_slow(sender: Any, n: int, seconds: float, last_slow_attempt: int = 1_000) -> None:
    """Sleeps ``seconds`` on attempts up to ``last_slow_attempt``, returns at once on later ones."""
    log("start", n)
    if current_event.attempt <= last_slow_attempt:
        time.sleep(seconds)
    log("ran", n)

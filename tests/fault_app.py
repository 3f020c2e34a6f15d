"""An app for fault tests: each request emits K events; the handlers write what they ran to a file.

The file (``FAULT_LOG``), not Redis, records handled events, so a Redis that is
killed and restarted cannot lose the evidence.
"""

from __future__ import annotations

import os
import time
from typing import Any

from blinker import Namespace
from flask import Flask, jsonify

from signal_queue import SignalQueue, current_event, deferred

bus = Namespace()
fault = bus.signal("fault")
fault_audit = bus.signal("fault-audit")
slow_once = bus.signal("slow-once")
bulky = bus.signal("bulky")
K = 3


def create_app() -> Flask:
    app = Flask(__name__)
    SignalQueue(app)

    @app.route("/emit/<int:n>")
    def emit(n: int) -> str:
        # several signals per request: K - 1 on one, the last on another
        for k in range(K - 1):
            fault.send("view", n=n, k=k)
        fault_audit.send("view", n=n, k=K - 1)
        return "ok"

    @app.route("/stats")
    def stats() -> Any:
        state = app.extensions["signal_queue"]
        return jsonify(pid=os.getpid(), counters=dict(state.dispatcher.counters), pending=state.outbox.pending)

    return app


def _log(line: str) -> None:
    # One write() of a short line with O_APPEND: lines from several processes never interleave.
    fd = os.open(os.environ["FAULT_LOG"], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, (line + "\n").encode())
    finally:
        os.close(fd)


@deferred(fault)
def on_fault(sender: Any, n: int, k: int) -> None:
    _log(f"{n} {k} {current_event.id} {current_event.attempt}")


@deferred(fault_audit)
def on_fault_audit(sender: Any, n: int, k: int) -> None:
    _log(f"{n} {k} {current_event.id} {current_event.attempt}")


@deferred(slow_once, timeout=60)
def on_slow_once(sender: Any, tag: str) -> None:
    """Sleeps on its first attempt (so a test can kill the worker then); returns at once after."""
    if current_event.attempt == 1:
        _log(f"started {tag} {current_event.id} 1")
        time.sleep(30)
    _log(f"done {tag} {current_event.id} {current_event.attempt}")


@deferred(bulky)
def on_bulky(sender: Any, n: int, items: list[Any]) -> None:
    """An event whose kwargs take the worker a while to read (many small objects)."""
    _log(f"{n} {len(items)} {current_event.id} {current_event.attempt}")

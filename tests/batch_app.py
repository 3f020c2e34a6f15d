"""An app for tests of how the default worker runs a batch: crashes at any place in it, timeouts, shared requests.

Every handler writes what it does to the file named by ``FAULT_LOG`` (``start``
before, ``ran`` after, with the event id, the attempt, the pid and the event's
``n``), one ``O_APPEND`` write per line, so the evidence outlives the processes
that crash. ``observe`` writes what it sees of its contexts as one JSON word.
"""

from __future__ import annotations

import ctypes
import json
import os
import time
from typing import Any

from blinker import Namespace
from flask import Flask, g, request
from rq import Retry

from signal_queue import SignalQueue, current_event, deferred
from tests.fault_log import log

bus = Namespace()
step = bus.signal("batch-step")
crash = bus.signal("batch-crash")
nap = bus.signal("batch-nap")
linger = bus.signal("batch-linger")
mutate = bus.signal("batch-mutate")
observe = bus.signal("batch-observe")


def create_app(**config: Any) -> Flask:
    app = Flask(__name__)
    app.config.update(config)
    SignalQueue(app)

    @app.route("/orders/<int:order>")
    def order(order: int) -> str:
        """Five events of one request, one snapshot: every other one changes what it can of its contexts."""
        g.tenant = "acme"
        for n in range(5):
            (mutate if n % 2 else observe).send("view", n=n)
        return "ok"

    return app


@deferred(step)
def on_step(sender: Any, n: int) -> None:
    log("ran", n)


@deferred(crash, retry=Retry(max=1, interval=0))
def on_crash(sender: Any, n: int, how: str) -> None:
    """Ends the handler process without unwinding: a segfault (reads address 0) or os._exit."""
    log("start", n)
    if how == "segfault":
        ctypes.string_at(0)
    os._exit(1)


@deferred(nap, timeout=1)
def on_nap(sender: Any, n: int, seconds: float) -> None:
    """Timeout 1 s: returns at once with ``seconds=0``, is ended by its timeout with more than 1."""
    log("start", n)
    time.sleep(seconds)
    log("ran", n)


@deferred(linger, timeout=60)
def on_linger(sender: Any, n: int, seconds: float) -> None:
    """Timeout 60 s: sleeps ``seconds``."""
    log("start", n)
    time.sleep(seconds)
    log("ran", n)


@deferred(mutate)
def on_mutate(sender: Any, n: int) -> None:
    """Changes what a handler can change in place of its request, ``g`` and snapshot."""
    g.tenant = "changed"
    g.extra = n
    request.environ["batch.mutated"] = n
    request.environ["HTTP_X_TEST"] = "changed"
    assert request.view_args is not None
    request.view_args["order"] = -1
    request.batch_attribute = n  # type: ignore[attr-defined]
    assert current_event.request is not None
    current_event.request.view_args["order"] = -1
    current_event.request.headers.append(("X-Added", "1"))
    log("ran", n)


@deferred(observe)
def on_observe(sender: Any, n: int) -> None:
    """Writes what it sees: each one of a request must see the same."""
    snap = current_event.request
    assert snap is not None
    seen = {
        "g": {name: getattr(g, name) for name in sorted(vars(g)) if not name.startswith("_")},
        "path": request.path,
        "args": request.args.to_dict(),
        "view_args": request.view_args,
        "endpoint": request.endpoint,
        "rule": None if request.url_rule is None else request.url_rule.rule,
        "routing_exception": type(request.routing_exception).__name__ if request.routing_exception else None,
        "header": request.headers.get("X-Test"),
        "mutated": request.environ.get("batch.mutated"),
        "attribute": getattr(request, "batch_attribute", None),
        "snapshot_view_args": snap.view_args,
        "snapshot_headers": len(snap.headers),
        "remote_addr": request.remote_addr,
    }
    log("ran", n, json.dumps(seen, sort_keys=True, separators=(",", ":")))

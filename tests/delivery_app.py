"""An app factory for the delivery modes, with one ordinary and one discard_if_failed receiver."""

from __future__ import annotations

from typing import Any

from blinker import Namespace
from flask import Flask, abort

from signal_queue import SignalQueue, deferred
from tests.recording import record

bus = Namespace()
audit = bus.signal("delivery-audit")
welcome = bus.signal("delivery-welcome")


def create_app(**config: Any) -> Flask:
    app = Flask(__name__)
    app.config.update(config)
    SignalQueue(app)

    @app.route("/ok/<int:n>")
    def ok(n: int) -> str:
        for i in range(n):
            audit.send("view", i=i)
        welcome.send("view", i=0)
        return "ok"

    @app.route("/fail")
    def fail() -> str:
        audit.send("view", i=0)
        welcome.send("view", i=0)
        raise RuntimeError("the request failed")

    @app.route("/abort")
    def aborted() -> str:
        audit.send("view", i=0)
        welcome.send("view", i=0)
        abort(503)

    return app


@deferred(audit)
def on_audit(sender: Any, i: int) -> None:
    record("audit", sender, i=i)


@deferred(welcome, discard_if_failed=True)
def on_welcome(sender: Any, i: int) -> None:
    record("welcome", sender, i=i)

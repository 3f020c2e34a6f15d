"""A small app for error-path tests: one deferred receiver and one inline receiver on one signal."""

from __future__ import annotations

from typing import Any

from blinker import Namespace
from flask import Flask

from signal_queue import SignalQueue, deferred
from tests.recording import record

misc = Namespace().signal("misc")
inline_calls: list[Any] = []


def create_app(**config: Any) -> Flask:
    app = Flask(__name__)
    app.config.update(config)
    SignalQueue(app)

    @app.route("/emit/<value>")
    def emit(value: str) -> str:
        misc.send("view", value=value)
        return "ok"

    @app.route("/emit-object")
    def emit_object() -> str:
        misc.send("view", value={"nested": [1, object()]})
        return "ok"

    return app


@deferred(misc)
def on_misc(sender: Any, value: Any) -> None:
    record("misc", sender, value=value)


@misc.connect
def inline_receiver(sender: Any, **kwargs: Any) -> None:
    inline_calls.append(kwargs)

"""A small app for error-path tests: one deferred receiver and one inline receiver on one signal."""

from __future__ import annotations

from typing import Any

from blinker import Namespace
from flask import Flask
from rq import Retry

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


flaky = Namespace().signal("flaky")
slow = Namespace().signal("slow")


@deferred(flaky, retry=Retry(max=2, interval=0))
def on_flaky(sender: Any, fail_times: int) -> None:
    """Fails on its first ``fail_times`` attempts, then records the attempt that succeeded."""
    from signal_queue import current_event

    record("flaky-attempt", sender, attempt=current_event.attempt)
    if current_event.attempt <= fail_times:
        raise RuntimeError(f"attempt {current_event.attempt} fails on purpose")


@deferred(slow, timeout=1)
def on_slow(sender: Any, seconds: float) -> None:
    import time

    time.sleep(seconds)
    record("slow-done", sender)


fixable = Namespace().signal("fixable")


@deferred(fixable)
def on_fixable(sender: Any, order_id: int) -> None:
    """Fails until the (test's) fix is deployed: a Redis flag stands for the deploy."""
    import redis as redis_client
    from flask import current_app

    conn = redis_client.Redis.from_url(current_app.config["SIGNAL_QUEUE_REDIS_URL"])
    if not conn.get("sq:test:fixed"):
        raise RuntimeError(f"order {order_id}: bug not fixed yet")
    record("fixable", sender, order_id=order_id)

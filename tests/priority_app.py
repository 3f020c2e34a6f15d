"""Receivers on three queues, for the queue order (``SIGNAL_QUEUE_QUEUES``)."""

from __future__ import annotations

from typing import Any

from blinker import Namespace
from flask import Flask

from signal_queue import SignalQueue, deferred
from tests.recording import record

signals = Namespace()
alert = signals.signal("alert")
report = signals.signal("report")
note = signals.signal("note")


def create_app(**config: Any) -> Flask:
    app = Flask(__name__)
    app.config.update(config)
    SignalQueue(app)
    return app


@deferred(alert, queue="critical")
def on_alert(sender: Any, n: int) -> None:
    record("alert", sender, n=n)


@deferred(report, queue="bulk")
def on_report(sender: Any, n: int) -> None:
    record("report", sender, n=n)


@deferred(note)  # the default queue
def on_note(sender: Any, n: int) -> None:
    record("note", sender, n=n)

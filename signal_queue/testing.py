"""Helpers for your own test suite: capture deferred events, assert on them, run them.

::

    from signal_queue.testing import capture_events

    def test_checkout_audits(app, client):
        with capture_events(app) as events:
            client.post("/checkout")
        [event] = events.filter(signal="order-placed")
        assert event.kwargs == {"order_id": 42}
        assert event.request["path"] == "/checkout"
        events.drain()          # runs the receivers now, as a worker would

Captured events are what a worker would receive: validated, encoded and sent
through ``json.dumps``/``json.loads``; :meth:`EventCapture.drain` runs them
with the same code a worker uses (rebuilt contexts, ``current_event``), so a
value that would fail in production fails in the test. Nothing reaches Redis.

As a pytest plugin (registered by the package), the ``deferred_events`` fixture
does the same for the ``app`` fixture your suite defines. Not thread-safe: use
one capture per test, from the test's thread.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from flask import Flask

from ._state import SignalQueueState, state_for
from .consumer.run import execute_event
from .producer.capture import PendingEvent, received_form

__all__ = ["CapturedEvent", "EventCapture", "capture_events"]


class CapturedEvent:
    """One deferred event, in the JSON form a worker would read."""

    def __init__(self, payload: dict[str, Any]) -> None:
        self.payload = payload

    @property
    def id(self) -> str:
        return str(self.payload["id"])

    @property
    def signal(self) -> str:
        return str(self.payload["signal"])

    @property
    def receiver(self) -> str:
        """``module:qualname`` of the deferred receiver."""
        return str(self.payload["receiver"])

    @property
    def sender(self) -> Any:
        return self.payload["sender"]

    @property
    def kwargs(self) -> dict[str, Any]:
        """The kwargs as JSON (plain values as sent; tagged ones as ``{"__sq__": ...}``)."""
        return dict(self.payload["kwargs"])

    @property
    def request(self) -> dict[str, Any] | None:
        """The request snapshot (method, path, headers with secrets redacted, client_ip, user, ...)."""
        request = self.payload["request"]
        return None if request is None else dict(request)

    @property
    def g(self) -> dict[str, Any]:
        return dict(self.payload["g"])

    def __repr__(self) -> str:
        return f"<CapturedEvent {self.signal} -> {self.receiver} {self.kwargs!r}>"


class EventCapture:
    """The events deferred while a capture is active on an app."""

    def __init__(self, app: Flask) -> None:
        self.app = app
        self.events: list[CapturedEvent] = []
        self._undrained: list[CapturedEvent] = []

    def add(self, event: PendingEvent, state: SignalQueueState) -> None:
        captured = CapturedEvent(received_form(event, state.codec))
        self.events.append(captured)
        self._undrained.append(captured)

    def filter(self, signal: str | None = None, receiver: str | None = None) -> list[CapturedEvent]:
        """Captured events of ``signal`` and/or ``receiver``."""
        return [
            e for e in self.events
            if (signal is None or e.signal == signal) and (receiver is None or e.receiver == receiver)
        ]

    def drain(self) -> int:
        """Run every captured event not run yet, in order, as a worker would; return how many ran.

        Events the receivers emit while draining are captured and run too.
        A receiver's exception propagates to the test.
        """
        consumer = state_for(self.app).consumer
        ran = 0
        while self._undrained:
            event = self._undrained.pop(0)
            execute_event(consumer, json.loads(json.dumps(event.payload)))
            ran += 1
        return ran

    def clear(self) -> None:
        self.events.clear()
        self._undrained.clear()

    def __len__(self) -> int:
        return len(self.events)

    def __iter__(self) -> Iterator[CapturedEvent]:
        return iter(self.events)


@contextmanager
def capture_events(app: Flask) -> Iterator[EventCapture]:
    """Capture ``app``'s deferred events instead of sending them, for the ``with`` block."""
    state = state_for(app)
    previous = state.capture
    capture = EventCapture(app)
    state.capture = capture
    try:
        yield capture
    finally:
        state.capture = previous


try:
    import pytest
except ImportError:  # pytest is optional: the helpers above work without it
    pass
else:

    @pytest.fixture
    def deferred_events(request: pytest.FixtureRequest) -> Iterator[EventCapture]:
        """Capture the deferred events of your ``app`` fixture during the test."""
        app = request.getfixturevalue("app")
        with capture_events(app) as capture:
            yield capture

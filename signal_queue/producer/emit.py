"""The forwarding receiver's body: capture an event and hand it to the app's producer.

Runs on the request thread, inside ``signal.send``, so it does only what must
happen at emit time (see :mod:`.capture`) and puts the event in the app's
outbox; formatting, JSON and Redis happen later (see :mod:`.outbox`). An
operational failure (Redis down) never raises here.
"""

from __future__ import annotations

import logging
from typing import Any

from flask import Flask, current_app

from ..exceptions import ConfigurationError, PayloadError
from ..wire.codec import Codec
from ..wire.receivers import DeferredReceiver, forwarding_muted
from .capture import PendingEvent, build_event
from .outbox import Outbox

logger = logging.getLogger("signal_queue")

#: Where an app keeps its :class:`Producer` (the extension's per-app state), in ``app.extensions``.
EXTENSION_KEY = "signal_queue"


class Producer:
    """An app's emit side: what :func:`build_event` needs, and where events go.

    The Flask glue makes one per app (its per-app state is a subclass) and
    keeps it in ``app.extensions``; :meth:`route` is where the glue diverts
    events in eager mode or to a test's capture.
    """

    def __init__(self, codec: Codec, max_event_bytes: int, outbox: Outbox) -> None:
        self.codec = codec
        self.max_event_bytes = max_event_bytes
        self.outbox = outbox

    def route(self, app: Flask, event: PendingEvent) -> None:
        """Send ``event`` on its way: to the outbox."""
        self.outbox.put(event)

    def raises_unsendable(self, app: Flask) -> bool:
        """Whether a kwarg that cannot be carried raises at emit (else the event is recorded as failed)."""
        return True

    def record_unsendable(self, event: PendingEvent, error: PayloadError) -> None:
        """An event sent with markers in place of what could not be carried: counted and logged."""
        self.outbox.dispatcher.counters["unsendable"] += 1
        logger.error(
            "signal_queue: %s; event %s is sent with that kwarg replaced, and the worker records it as failed "
            "(flask signal-queue failed shows it) instead of the request failing",
            error, event.id,
        )


def producer_for(app: Flask) -> Producer:
    """The producer of ``app``, or a :class:`ConfigurationError` telling the fix."""
    producer = app.extensions.get(EXTENSION_KEY)
    if producer is None:
        raise ConfigurationError(
            f"app {app.name!r} has deferred receivers but no SignalQueue; "
            "call SignalQueue(app) or sq.init_app(app)"
        )
    return producer  # type: ignore[no-any-return]


def app_for(sender: Any, receiver: DeferredReceiver) -> Flask:
    """The app whose queue gets the event: the current app, else a Flask app sender."""
    try:
        return current_app._get_current_object()  # type: ignore[attr-defined,no-any-return]
    except RuntimeError:  # no app context (one context lookup, where has_app_context() first would take two)
        pass
    if isinstance(sender, Flask):
        return sender
    raise ConfigurationError(
        f"signal {receiver.signal_name!r} was sent outside an application context, so deferred "
        f"receiver {receiver.name!r} cannot tell which app's queue to use; send it inside "
        "`with app.app_context():`"
    )


def emit(receiver: DeferredReceiver, sender: Any, kwargs: dict[str, Any]) -> None:
    """Forward one emit of ``receiver``'s signal to its app's producer."""
    if forwarding_muted():
        return
    app = app_for(sender, receiver)
    producer: Producer = app.extensions.get(EXTENSION_KEY) or producer_for(app)
    try:
        event = build_event(app, producer.codec, producer.max_event_bytes, receiver, sender, kwargs)
    except PayloadError as error:
        if producer.raises_unsendable(app):
            raise
        event = build_event(app, producer.codec, producer.max_event_bytes, receiver, sender, kwargs, lenient=True)
        producer.record_unsendable(event, error)
    producer.route(app, event)

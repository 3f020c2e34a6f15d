"""The forwarding receiver's body: capture an event and hand it to the app's producer.

Runs on the request thread, inside ``signal.send``, so it does only what must
happen at emit time (see :mod:`.capture`) and puts the event in the app's
outbox; formatting, JSON and Redis happen later (see :mod:`.outbox`). An
operational failure (Redis down) never raises here.
"""

from __future__ import annotations

from typing import Any

from flask import Flask, current_app, has_app_context

from ..exceptions import ConfigurationError
from ..wire.codec import Codec
from ..wire.receivers import DeferredReceiver, forwarding_muted
from .capture import PendingEvent, build_event
from .outbox import Outbox

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
    if has_app_context():
        return current_app._get_current_object()  # type: ignore[attr-defined,no-any-return]
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
    producer.route(app, build_event(app, producer.codec, producer.max_event_bytes, receiver, sender, kwargs))

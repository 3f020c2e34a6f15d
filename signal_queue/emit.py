"""The forwarding receiver's body: capture an event and hand it off.

Runs on the request thread, inside ``signal.send``. A programmer's mistake
(an app without the extension, a kwarg that cannot be JSON) raises here, where
it is seen; an operational failure (Redis down) never does.
"""

from __future__ import annotations

import datetime as dt
import uuid
from typing import TYPE_CHECKING, Any

from flask import Flask, current_app, has_app_context

from .context import capture_g, capture_request, rebuilding
from .event import Event
from .exceptions import ConfigurationError, PayloadError
from .serialization import Unserializable

if TYPE_CHECKING:
    from .extension import SignalQueueState
    from .registry import DeferredReceiver


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


def state_for(app: Flask) -> SignalQueueState:
    """The extension's state for ``app``, or a :class:`ConfigurationError` telling the fix."""
    state = app.extensions.get("signal_queue")
    if state is None:
        raise ConfigurationError(
            f"app {app.name!r} has deferred receivers but no SignalQueue; "
            "call SignalQueue(app) or sq.init_app(app)"
        )
    return state  # type: ignore[no-any-return]


def build_event(state: SignalQueueState, receiver: DeferredReceiver, sender: Any, kwargs: dict[str, Any]) -> Event:
    """Capture everything the handler will need, encoded as JSON-ready data."""
    codec = state.codec
    try:
        encoded = {key: codec.encode(value, key) for key, value in kwargs.items()}
    except Unserializable as exc:
        raise PayloadError(
            f"signal {receiver.signal_name!r}, deferred receiver {receiver.name!r}: "
            f"kwarg {exc.key} cannot be sent to a worker ({exc.reason}); "
            "deferred receivers get JSON data: pass ids, strings or numbers instead",
            signal=receiver.signal_name,
            receiver=receiver.name,
            key=exc.key,
        ) from None
    return Event(
        id=uuid.uuid4().hex,
        signal=receiver.signal_name,
        receiver=receiver.name,
        emitted_at=dt.datetime.now(dt.timezone.utc),
        sender=codec.encode_sender(sender),
        kwargs=encoded,
        request=capture_request(codec, state.trusted_proxies),
        g=capture_g(codec),
    )


def emit(receiver: DeferredReceiver, sender: Any, kwargs: dict[str, Any]) -> None:
    """Forward one emit of ``receiver``'s signal to its queue (or run it, in eager mode)."""
    if rebuilding.get():
        return
    app = app_for(sender, receiver)
    state = state_for(app)
    event = build_event(state, receiver, sender, kwargs)
    if state.eager:
        state.run_eagerly(app, event)
    else:
        state.dispatcher.deliver(receiver, event)

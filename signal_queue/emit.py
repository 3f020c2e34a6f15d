"""The forwarding receiver's body: capture an event and hand it off.

Runs on the request thread, inside ``signal.send``, so it does only what must
happen at emit time: validate and encode the kwargs (a value that cannot reach
the worker raises here, where the programmer sees it), copy the request once
per request, and put a :class:`~signal_queue.event.PendingEvent` in the app's
outbox. Formatting, JSON and Redis happen later (see :mod:`signal_queue.outbox`).
An operational failure (Redis down) never raises here.
"""

from __future__ import annotations

import itertools
import os
import time
from typing import TYPE_CHECKING, Any

from flask import Flask, current_app, has_app_context

from .context import capture_g, capture_request, current_user_id, rebuilding
from .event import PendingEvent
from .exceptions import ConfigurationError, PayloadError
from .serialization import Unserializable

if TYPE_CHECKING:
    from .extension import SignalQueueState
    from .registry import DeferredReceiver

# Event ids: a random per-process prefix and a counter. Unique per emit and
# receiver, and far cheaper on the request thread than uuid4().
_id_prefix = os.urandom(8).hex()
_id_counter = itertools.count()


def _reset_ids() -> None:
    global _id_prefix, _id_counter
    _id_prefix = os.urandom(8).hex()
    _id_counter = itertools.count()


os.register_at_fork(after_in_child=_reset_ids)


def new_event_id() -> str:
    return f"{_id_prefix}{next(_id_counter):08x}"


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


def build_event(
    app: Flask, state: SignalQueueState, receiver: DeferredReceiver, sender: Any, kwargs: dict[str, Any]
) -> PendingEvent:
    """Validate and encode what the handler will need; raise :class:`PayloadError` for a bad kwarg."""
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
    raw = capture_request(codec, state.trusted_proxies)
    return PendingEvent(
        receiver,
        new_event_id(),
        time.time(),
        codec.encode_sender(sender),
        encoded,
        raw,
        capture_g(codec),
        current_user_id(app) if raw is not None else None,
    )


def emit(receiver: DeferredReceiver, sender: Any, kwargs: dict[str, Any]) -> None:
    """Forward one emit of ``receiver``'s signal to its app's outbox (or run it, in eager mode)."""
    if rebuilding.get():
        return
    app = app_for(sender, receiver)
    state = state_for(app)
    event = build_event(app, state, receiver, sender, kwargs)
    if state.eager:
        state.run_eagerly(app, event)
    else:
        state.outbox.put(event)

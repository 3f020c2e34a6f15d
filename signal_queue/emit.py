"""The forwarding receiver's body: capture an event and hand it off.

Runs on the request thread, inside ``signal.send``, so it does only what must
happen at emit time: validate and encode the kwargs (a value that cannot reach
the worker raises here, where the programmer sees it), copy the request once
per request, and put a :class:`~signal_queue.event.PendingEvent` in the app's
outbox. Formatting, JSON and Redis happen later (see :mod:`signal_queue.outbox`).
An operational failure (Redis down) never raises here.
"""

from __future__ import annotations

import json
import time
from typing import TYPE_CHECKING, Any

from flask import Flask
from flask.globals import _cv_app

from .context import capture_g, capture_request, current_user_id, rebuilding
from .event import PendingEvent
from .exceptions import ConfigurationError, PayloadError
from .serialization import Codec, Unserializable

if TYPE_CHECKING:
    from .extension import SignalQueueState
    from .registry import DeferredReceiver

def app_for(sender: Any, receiver: DeferredReceiver) -> Flask:
    """The app whose queue gets the event: the current app, else a Flask app sender."""
    app_ctx = _cv_app.get(None)
    if app_ctx is not None:
        return app_ctx.app
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


_PLAIN = frozenset({str, int, float, bool, type(None)})


def build_event(
    app: Flask, state: SignalQueueState, receiver: DeferredReceiver, sender: Any, kwargs: dict[str, Any]
) -> PendingEvent:
    """Validate and encode what the handler will need; raise :class:`PayloadError` for a bad kwarg.

    This runs on the request thread for every emit, so plain values take a
    fast path and everything costly is left to :meth:`PendingEvent.to_dict`.
    """
    codec = state.codec
    encoded = kwargs
    size = 0
    for value in kwargs.values():
        if type(value) is str:
            size += _json_size_bound(value)
        elif type(value) not in _PLAIN:
            encoded = _encode_kwargs(codec, receiver, kwargs)
            size = _json_size_bound(encoded)
            break
    if size > state.max_event_bytes:
        _refuse_size(state, receiver, encoded)  # measures exactly, raises only if really over
    app_ctx = _cv_app.get(None)
    g_obj = app_ctx.g if app_ctx is not None else None
    raw = capture_request(state.trusted_proxies)
    return PendingEvent(
        receiver,
        time.time(),
        sender if type(sender) in _PLAIN else codec.encode_sender(sender),
        encoded,
        raw,
        {} if g_obj is None else capture_g(codec, g_obj),
        None if raw is None or g_obj is None else current_user_id(app, g_obj),
    )


def _json_size_bound(value: Any) -> int:
    """About the size of ``value`` (already encoded) as JSON, without encoding it on the request thread.

    Exact for ASCII text, an upper bound for other text (``\\uXXXX``), a few bytes
    under for ASCII that JSON escapes; numbers count 8. Only when it exceeds the
    cap does :func:`_refuse_size` pay for ``json.dumps``.
    """
    kind = type(value)
    if kind is str:
        return len(value) + 2 if value.isascii() else 6 * len(value) + 2
    if kind is dict:
        return 2 + sum(len(k) + 4 + _json_size_bound(v) for k, v in value.items())
    if kind is list:
        return 2 + sum(_json_size_bound(v) + 1 for v in value)
    return 8


def _refuse_size(state: SignalQueueState, receiver: DeferredReceiver, encoded: dict[str, Any]) -> None:
    sizes = sorted(((len(json.dumps(v)), k) for k, v in encoded.items()), reverse=True)
    total = sum(n for n, _ in sizes)
    if total <= state.max_event_bytes:
        return
    raise PayloadError(
        f"signal {receiver.signal_name!r}, deferred receiver {receiver.name!r}: the kwargs take {total} bytes "
        f"as JSON, over SIGNAL_QUEUE_MAX_EVENT_BYTES ({state.max_event_bytes}); the largest is "
        f"{sizes[0][1]!r} ({sizes[0][0]} bytes). Send an id and load the data in the receiver",
        signal=receiver.signal_name,
        receiver=receiver.name,
        key=sizes[0][1],
    )


def _encode_kwargs(codec: Codec, receiver: DeferredReceiver, kwargs: dict[str, Any]) -> dict[str, Any]:
    try:
        return {key: codec.encode(value, key) for key, value in kwargs.items()}
    except Unserializable as exc:
        raise PayloadError(
            f"signal {receiver.signal_name!r}, deferred receiver {receiver.name!r}: "
            f"kwarg {exc.key} cannot be sent to a worker ({exc.reason}); "
            "deferred receivers get JSON data: pass ids, strings or numbers instead",
            signal=receiver.signal_name,
            receiver=receiver.name,
            key=exc.key,
        ) from None


def emit(receiver: DeferredReceiver, sender: Any, kwargs: dict[str, Any]) -> None:
    """Forward one emit of ``receiver``'s signal to its app's outbox (or run it, in eager mode)."""
    if rebuilding.get():
        return
    app = app_for(sender, receiver)
    state = app.extensions.get("signal_queue") or state_for(app)
    event = build_event(app, state, receiver, sender, kwargs)
    if state.capture is not None:
        state.capture.add(event, state)
    elif state.eager:
        state.run_eagerly(app, event)
    else:
        state.outbox.put(event)

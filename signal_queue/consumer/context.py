"""Rebuild, in the worker, the contexts a deferred handler ran in at emit time.

The worker pushes a fresh app context and, when the event was sent during a
request, a request context built from the snapshot the producer took, so a
receiver that read ``request``, ``g`` or ``current_user`` inline reads the
same values here. Inside the handler, :data:`current_event` is the event.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any, cast

from flask import Flask, g
from werkzeug.local import LocalProxy

from ..wire.codec import Codec
from ..wire.event import REQUEST_ID_ENVIRON_KEY, Event
from ..wire.receivers import muted

_current_event: ContextVar[Event] = ContextVar("signal_queue.current_event")


def _get_current_event() -> Event:
    try:
        return _current_event.get()
    except LookupError:
        raise RuntimeError(
            "current_event is only available inside a deferred receiver run by signal_queue"
        ) from None


#: The event being handled, inside a deferred receiver (worker or eager mode).
current_event: Event = cast(Event, LocalProxy(_get_current_event))


@contextmanager
def handling(event: Event) -> Iterator[None]:
    """Make ``event`` the :data:`current_event` for the block."""
    token = _current_event.set(event)
    try:
        yield
    finally:
        _current_event.reset(token)


@contextmanager
def rebuilt_context(app: Flask, event: Event, codec: Codec) -> Iterator[None]:
    """Push an app context and, if one was captured, a request context like the emit's.

    ``request.remote_addr`` is the client address as the app saw it at emit
    time; ``g`` gets the captured attributes; a Flask-Login user is reloaded
    by the app's ``user_loader``. Pushing and popping the contexts, and rebuilding ``g`` and the
    user, forward no signals.
    """
    snap = event.request
    if snap is None:
        ctx: Any = app.app_context()
    else:
        ctx = app.test_request_context(
            path=snap.path,
            base_url=f"{snap.scheme}://{snap.host}{snap.root_path}",
            query_string=snap.query_string,
            method=snap.method,
            headers=[h for h in snap.headers if h[0].lower() not in ("host", "content-length")],
            environ_base={"REMOTE_ADDR": snap.client_ip or "", REQUEST_ID_ENVIRON_KEY: snap.request_id},
        )
    with muted():
        ctx.push()
    try:
        # Like pushing the contexts, rebuilding g and the user (the app's user_loader) emits nothing.
        with muted():
            for name, value in event.g.items():
                setattr(g, name, codec.decode(value))
            if snap is not None:
                _restore_login_user(app, snap.user)
        yield
    finally:
        with muted():
            ctx.pop()


def _restore_login_user(app: Flask, user_id: str | None) -> None:
    """Load the emit's user as Flask-Login's ``current_user`` will show it (anonymous without one).

    The worker never lets Flask-Login load the user itself: that reads a session
    the worker does not have and sends ``user_accessed``, which a deferred
    receiver of it would take as a new event.

    Flask-Login has no public way to call the ``user_loader`` or to set the
    current user without logging in (``login_user`` changes the session and
    sends ``user_logged_in``), so this reads ``_user_callback`` and sets
    ``g._login_user``, the two names Flask-Login 0.6 itself uses for this.
    """
    manager = getattr(app, "login_manager", None)
    if manager is None or "current_user" in g:
        return
    loader = getattr(manager, "_user_callback", None)
    user = loader(user_id) if loader is not None and user_id is not None else None
    g._login_user = user if user is not None else manager.anonymous_user()

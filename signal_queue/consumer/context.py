"""Rebuild, in the worker, the contexts a deferred handler ran in at emit time.

The worker pushes a fresh app context and, when the event was sent during a
request, a request context built from the snapshot the producer took, so a
receiver that read ``request``, ``g`` or ``current_user`` inline reads the
same values here. Inside the handler, :data:`current_event` is the event.
"""

from __future__ import annotations

import io
import re
import sys
from contextvars import ContextVar
from typing import Any, cast

from flask import Flask, g
from flask.ctx import AppContext, RequestContext
from flask.testing import EnvironBuilder
from werkzeug.local import LocalProxy

from ..wire.codec import Codec
from ..wire.event import REQUEST_ID_ENVIRON_KEY, URL_PLAIN_CHARS, Event, RequestSnapshot
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


def handling(event: Event) -> _Handling:
    """Make ``event`` the :data:`current_event` for the block."""
    return _Handling(event)


class _Handling:
    """The block of :func:`handling` (a class: cheaper to enter than a generator, once per event)."""

    __slots__ = ("_event", "_token")

    def __init__(self, event: Event) -> None:
        self._event = event

    def __enter__(self) -> None:
        self._token = _current_event.set(self._event)

    def __exit__(self, *exc_info: object) -> None:
        _current_event.reset(self._token)


class _Built:
    """A WSGI environ built for a snapshot, its body, and the URL match of its first request context."""

    __slots__ = ("body", "environ", "routed")

    def __init__(self, environ: dict[str, Any], body: bytes) -> None:
        self.environ, self.body = environ, body
        #: (url_rule, view_args) or (routing_exception,) once a request context of it was matched.
        self.routed: tuple[Any, ...] | None = None


#: WSGI environs already built, by what they are built from: one batch's (see :func:`rebuilt_context`).
Environs = dict[tuple[Any, ...], _Built]


#: What :func:`plain_environ` builds without werkzeug: a host of lower-case ASCII labels with an optional
#: port as written (IRI-to-URI encoding and urlsplit change nothing in it), paths of the characters URL
#: handling leaves as they are (no escape, query or fragment), header names and values of printable ASCII.
_PLAIN_HOST = re.compile(r"[a-z0-9-]{1,63}(?:\.[a-z0-9-]{1,63})*(?::([1-9][0-9]{0,4}))?")
_PLAIN_PATH = re.compile(f"/[{URL_PLAIN_CHARS}]*")
_PLAIN_TEXT = re.compile(r"[ -~]*")
_PLAIN_NAME = re.compile(r"[!#$%&'*+\-.0-9A-Z^_`a-z|~]+")
#: Bodies werkzeug's EnvironBuilder makes up for these content types (an empty form): it builds those.
_FORM_TYPES = ("multipart/form-data", "application/x-www-form-urlencoded")


def plain_environ(snap: RequestSnapshot) -> dict[str, Any] | None:
    """The WSGI environ :func:`werkzeug_environ` builds for a plain snapshot, or None.

    werkzeug's builder parses and re-encodes every part (the URL, the IRI, the
    headers) and was most of a rebuilt request's cost in the handler process,
    a third of an idle event's time from its job's arrival to its handler. For
    what re-encoding leaves as it is (see :data:`_PLAIN_HOST`) this builds the
    same dict directly; for anything else it steps aside (None) and the builder
    is used. ``tests/test_snapshot.py`` compares the two on thousands of snapshots.
    """
    host, path, root = snap.host, snap.path, snap.root_path
    port = _PLAIN_HOST.fullmatch(host)
    if (
        port is None
        or snap.scheme not in ("http", "https")
        or _PLAIN_PATH.fullmatch(path) is None
        or path.startswith("//")
        or (root and (_PLAIN_PATH.fullmatch(root) is None or root.startswith("//")))
        or not snap.query_string.isascii()
        or not snap.method.isascii()
    ):
        return None
    port_text = port.group(1)
    if port_text is not None and int(port_text) > 65535:
        return None
    content_type = None
    combined: dict[str, list[str]] = {}
    for name, value in snap.headers:
        lower = name.lower()
        if lower in ("host", "content-length"):
            continue  # as _environ leaves them out
        if _PLAIN_NAME.fullmatch(name) is None or _PLAIN_TEXT.fullmatch(value) is None:
            return None
        if lower == "content-type":
            if content_type is None:
                content_type = value
            continue
        combined.setdefault("HTTP_" + name.upper().replace("-", "_"), []).append(value)
    if content_type is not None and content_type.partition(";")[0].strip() in _FORM_TYPES:
        return None
    environ: dict[str, Any] = {
        "REMOTE_ADDR": snap.client_ip or "",
        REQUEST_ID_ENVIRON_KEY: snap.request_id,
        "REQUEST_METHOD": snap.method,
        "SCRIPT_NAME": root.rstrip("/"),
        "PATH_INFO": path,
        "QUERY_STRING": snap.query_string,
        "REQUEST_URI": path,
        "RAW_URI": path,
        "SERVER_NAME": host.partition(":")[0],
        "SERVER_PORT": port_text or ("443" if snap.scheme == "https" else "80"),
        "HTTP_HOST": host,
        "SERVER_PROTOCOL": "HTTP/1.1",
        "wsgi.version": (1, 0),
        "wsgi.url_scheme": snap.scheme,
        "wsgi.input": io.BytesIO(),
        "wsgi.errors": sys.stderr,
        "wsgi.multithread": False,
        "wsgi.multiprocess": False,
        "wsgi.run_once": False,
    }
    if content_type is not None:
        environ["CONTENT_TYPE"] = content_type
    for key, values in combined.items():
        environ[key] = ", ".join(values)
    return environ


def werkzeug_environ(app: Flask, snap: RequestSnapshot) -> dict[str, Any]:
    """The WSGI environ of a request like the snapshot's, built by Flask's ``EnvironBuilder``
    (as ``app.test_request_context`` builds it)."""
    builder = EnvironBuilder(
        app,
        path=snap.path,
        base_url=f"{snap.scheme}://{snap.host}{snap.root_path}",
        query_string=snap.query_string,
        method=snap.method,
        headers=[h for h in snap.headers if h[0].lower() not in ("host", "content-length")],
        environ_base={"REMOTE_ADDR": snap.client_ip or "", REQUEST_ID_ENVIRON_KEY: snap.request_id},
    )
    try:
        return builder.get_environ()
    finally:
        builder.close()


def _environ(app: Flask, snap: RequestSnapshot, environs: Environs | None) -> tuple[dict[str, Any], _Built | None]:
    """The WSGI environ of a request like the snapshot's: :func:`plain_environ`'s, else :func:`werkzeug_environ`'s.

    Building it is most of the cost of a rebuilt request, so ``environs`` keeps
    each one built; every event gets its own copy (and its own empty body stream).
    """
    key = (snap.method, snap.scheme, snap.host, snap.root_path, snap.path, snap.query_string,
           tuple(snap.headers), snap.client_ip, snap.request_id)
    built = environs.get(key) if environs is not None else None
    if built is None:
        environ = plain_environ(snap)
        if environ is None:
            environ = werkzeug_environ(app, snap)
        if environs is None:
            return environ, None
        stream = environ.get("wsgi.input")
        built = environs[key] = _Built(environ, stream.getvalue() if isinstance(stream, io.BytesIO) else b"")
    environ = dict(built.environ)
    environ["wsgi.input"] = io.BytesIO(built.body)
    return environ, built


class _RoutedOnce(RequestContext):
    """A request context whose URL match (Flask's ``match_request`` hook) is made once per built environ.

    Matching the URL was a sixth of a rebuilt event's cost in the handler process;
    the same environ matches the same rule. Each context still gets its own
    request, and its own copy of the view args (a receiver may change them).
    """

    def __init__(self, app: Flask, environ: dict[str, Any], built: _Built) -> None:
        super().__init__(app, environ)
        self._built = built

    def match_request(self) -> None:
        routed, request = self._built.routed, self.request
        if routed is None:
            super().match_request()
            exc = request.routing_exception
            view_args = request.view_args
            self._built.routed = (exc,) if exc is not None else (
                request.url_rule, None if view_args is None else dict(view_args))
        elif len(routed) == 1:
            request.routing_exception = routed[0]
        else:
            request.url_rule, view_args = routed
            request.view_args = None if view_args is None else dict(view_args)


def rebuilt_context(app: Flask, event: Event, codec: Codec, environs: Environs | None = None) -> _Rebuilt:
    """Push an app context and, if one was captured, a request context like the emit's.

    ``request.remote_addr`` is the client address as the app saw it at emit
    time; ``g`` gets the captured attributes; a Flask-Login user is reloaded
    by the app's ``user_loader``. Pushing and popping the contexts, and rebuilding ``g`` and the
    user, forward no signals. ``environs`` (one per batch) keeps the WSGI environs built, for the
    next events of the same request; each event still gets its own contexts, ``request`` and ``g``.
    """
    return _Rebuilt(app, event, codec, environs)


class _Rebuilt:
    """The block of :func:`rebuilt_context` (a class: cheaper to enter than a generator, once per event)."""

    __slots__ = ("app", "codec", "ctx", "environs", "event")

    def __init__(self, app: Flask, event: Event, codec: Codec, environs: Environs | None) -> None:
        self.app, self.event, self.codec, self.environs = app, event, codec, environs
        self.ctx: Any = None

    def __enter__(self) -> None:
        app, event = self.app, self.event
        snap = event.request
        if snap is None:
            ctx: AppContext | RequestContext = app.app_context()
        else:
            environ, built = _environ(app, snap, self.environs)
            ctx = app.request_context(environ) if built is None else _RoutedOnce(app, environ, built)
        # Like pushing the contexts, rebuilding g and the user (the app's user_loader) emits nothing.
        with muted():
            ctx.push()
            try:
                for name, value in event.g.items():
                    setattr(g, name, self.codec.decode(value))
                if snap is not None:
                    _restore_login_user(app, snap.user)
            except BaseException:
                ctx.pop()
                raise
        self.ctx = ctx

    def __exit__(self, kind: object, exc: BaseException | None, tb: object) -> None:
        with muted():
            self.ctx.pop(exc)


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

"""Capture the request at emit time; rebuild app and request contexts in the worker.

Flask's contexts cannot cross a process boundary, and passing plain data is
safer than passing contexts (see ``flask.copy_current_request_context``). So
at emit time we copy what a receiver reads (path, method, headers with
secrets redacted, client IP, user, request id, ``g``) into a
:class:`~signal_queue.event.RequestSnapshot`, and the worker pushes a fresh
app context and a request context built from that snapshot.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any

from flask import Flask, Request, g
from flask.globals import _cv_request

from .event import Event, new_id
from .serialization import Codec, Unserializable

REQUEST_ID_HEADER = "X-Request-ID"
_REQUEST_ID_KEY = "signal_queue.request_id"
_VALID_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:@/+=-]{1,200}$")

try:
    from flask_login import current_user as _login_current_user
except ImportError:  # Flask-Login is optional
    _login_current_user = None

#: True while the worker pushes or pops the contexts it builds itself: the
#: signals Flask sends then (appcontext_pushed and friends) are not user
#: emits and must not be deferred again, or a receiver of them would loop.
rebuilding: ContextVar[bool] = ContextVar("signal_queue.rebuilding", default=False)


def client_ip(remote_addr: str | None, forwarded_for: str | None, trusted_hops: int) -> str | None:
    """The client address, trusting ``trusted_hops`` proxies' X-Forwarded-For entries.

    Same rule as werkzeug's ProxyFix: with N trusted proxies the client is the
    N-th address from the right; with fewer entries than that, or N = 0, the
    header is ignored (it is then whatever the client chose to send).
    """
    if trusted_hops <= 0 or not forwarded_for:
        return remote_addr
    values = [v.strip() for v in forwarded_for.split(",")]
    if len(values) < trusted_hops:
        return remote_addr
    return values[-trusted_hops] or remote_addr


def request_id(environ: dict[str, Any]) -> str:
    """The request's id: a well-formed ``X-Request-ID`` from the client, else a new one.

    Kept in the WSGI environ so every event of one request shares it.
    """
    rid = environ.get(_REQUEST_ID_KEY)
    if rid is None:
        sent = environ.get("HTTP_X_REQUEST_ID")
        rid = sent if sent and _VALID_REQUEST_ID.match(sent) else new_id()
        environ[_REQUEST_ID_KEY] = rid
    return str(rid)


def current_user_id(app: Flask, g_obj: Any) -> str | None:
    """``g.current_user`` if set, else Flask-Login's ``current_user.get_id()``, else None."""
    user = g_obj.__dict__.get("current_user")
    if user is not None:
        return user if isinstance(user, str) else _user_id(user)
    if _login_current_user is None or getattr(app, "login_manager", None) is None:
        return None
    if not getattr(_login_current_user, "is_authenticated", False):
        return None
    user_id = _login_current_user.get_id()
    return None if user_id is None else str(user_id)


def _user_id(user: Any) -> str:
    if isinstance(user, str):
        return user
    get_id = getattr(user, "get_id", None)
    if callable(get_id):
        return str(get_id())
    if getattr(user, "id", None) is not None:
        return str(user.id)
    return str(user)


def capture_g(codec: Codec, g_obj: Any) -> dict[str, Any]:
    """The public attributes of ``g`` that can be sent as JSON; others are left out."""
    captured: dict[str, Any] = {}
    for name, value in g_obj.__dict__.items():
        if name[0] == "_":
            continue
        if type(value) is str:
            captured[name] = value
            continue
        try:
            captured[name] = codec.encode(value, f"g.{name}")
        except Unserializable:
            continue
    return captured


#: WSGI keys a snapshot needs besides the HTTP_ headers.
_ENVIRON_KEYS = frozenset(
    {
        "REQUEST_METHOD", "SCRIPT_NAME", "PATH_INFO", "QUERY_STRING", "CONTENT_TYPE", "CONTENT_LENGTH",
        "REMOTE_ADDR", "SERVER_NAME", "SERVER_PORT", "wsgi.url_scheme",
    }
)
_RAW_KEY = "signal_queue.raw_request"


class RawRequest:
    """What the request thread keeps of a request: cheap to take, turned into a snapshot later.

    Taken once per request (cached in the environ) and shared by its events.
    It holds the WSGI environ itself; the sender copies the keys it needs and
    formats them off the request thread (headers never change after the
    request starts; a copy of a dict is atomic under the GIL).
    """

    __slots__ = ("_key", "_snapshot", "endpoint", "environ", "request_id", "trusted_hops", "view_args")

    def __init__(self, environ: dict[str, Any], endpoint: str | None, view_args: dict[str, Any], trusted_hops: int):
        self.environ = environ
        self.endpoint = endpoint
        self.view_args = view_args
        self.request_id = request_id(environ)
        self.trusted_hops = trusted_hops
        self._snapshot: dict[str, Any] | None = None
        self._key: str | None = None

    @property
    def key(self) -> str:
        """This request's key in a batch's table of snapshots: made by the bridge, unlike ``request_id``.

        Given when first asked for, off the request thread in the background mode.
        """
        key = self._key
        if key is None:
            key = self._key = new_id()
        return key

    def snapshot(self, codec: Codec, user: str | None) -> dict[str, Any]:
        """The JSON form of :class:`~signal_queue.event.RequestSnapshot` (cached but for the user)."""
        if self._snapshot is None:
            environ = {k: v for k, v in dict(self.environ).items() if k[:5] == "HTTP_" or k in _ENVIRON_KEYS}
            req = Request(environ, populate_request=False, shallow=True)
            self._snapshot = {
                "method": req.method,
                "scheme": req.scheme,
                "host": req.host,
                "root_path": req.root_path,
                "path": req.path,
                "query_string": req.query_string.decode("latin-1"),
                "url": req.url,
                "endpoint": self.endpoint,
                "view_args": _encode_view_args(codec, self.view_args),
                "headers": codec.headers(req.headers.items()),
                "remote_addr": req.remote_addr,
                "client_ip": client_ip(req.remote_addr, req.headers.get("X-Forwarded-For"), self.trusted_hops),
                "request_id": self.request_id,
            }
        return dict(self._snapshot, user=user)


def _encode_view_args(codec: Codec, view_args: dict[str, Any]) -> dict[str, Any]:
    encoded: dict[str, Any] = {}
    for key, value in view_args.items():
        try:
            encoded[key] = codec.encode(value, f"view_args.{key}")
        except Unserializable:
            encoded[key] = str(value)
    return encoded


def capture_request(trusted_hops: int) -> RawRequest | None:
    """The active request's :class:`RawRequest` (taken on its first event), or None outside a request."""
    ctx = _cv_request.get(None)
    if ctx is None:
        return None
    environ = ctx.request.environ
    raw: RawRequest | None = environ.get(_RAW_KEY)
    if raw is None:
        req = ctx.request
        raw = environ[_RAW_KEY] = RawRequest(environ, req.endpoint, dict(req.view_args or ()), trusted_hops)
    return raw


@contextmanager
def _quiet() -> Iterator[None]:
    token = rebuilding.set(True)
    try:
        yield
    finally:
        rebuilding.reset(token)


@contextmanager
def rebuilt_context(app: Flask, event: Event, codec: Codec) -> Iterator[None]:
    """Push an app context and, if one was captured, a request context like the emit's.

    ``request.remote_addr`` is the client IP resolved at emit time; ``g`` gets
    the captured attributes; a Flask-Login user is reloaded by the app's
    ``user_loader``.
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
            environ_base={"REMOTE_ADDR": snap.client_ip or "", _REQUEST_ID_KEY: snap.request_id},
        )
    with _quiet():
        ctx.push()
    try:
        for name, value in event.g.items():
            setattr(g, name, codec.decode(value))
        if snap is not None and snap.user is not None:
            _restore_login_user(app, snap.user)
        yield
    finally:
        with _quiet():
            ctx.pop()


def _restore_login_user(app: Flask, user_id: str) -> None:
    manager = getattr(app, "login_manager", None)
    if manager is None or "current_user" in g:
        return
    loader = getattr(manager, "_user_callback", None)
    user = loader(user_id) if loader is not None else None
    g._login_user = user if user is not None else manager.anonymous_user()

"""Capture at emit time: what a deferred handler will need, taken on the request thread.

Flask's contexts cannot cross a process boundary, and passing plain data is
safer than passing contexts (see ``flask.copy_current_request_context``). So
:func:`build_event` validates and encodes the kwargs (a value that cannot reach
the worker raises :class:`~signal_queue.exceptions.PayloadError` here, where
the programmer sees it), copies ``g`` and the user id, and keeps a cheap
reference to the request (:class:`RawRequest`); the result is a
:class:`PendingEvent`. Its JSON form, with the request snapshot (path, method,
headers with secrets redacted, client address, request id), is made later,
off the request thread in the background delivery mode.
"""

from __future__ import annotations

import datetime as dt
import json
import re
import time
from contextvars import ContextVar
from typing import Any

from flask import Flask, Request, g, has_app_context, has_request_context, request

from ..exceptions import PayloadError
from ..wire.codec import REDACTED, Codec, Unserializable
from ..wire.event import FORMAT_VERSION, REQUEST_ID_ENVIRON_KEY, new_id
from ..wire.receivers import DeferredReceiver

REQUEST_ID_HEADER = "X-Request-ID"
_VALID_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:@/+=-]{1,200}$")

try:
    import flask_login.signals as _login_signals
    from flask_login import current_user as _login_current_user
except ImportError:  # Flask-Login is optional
    _login_current_user = None
    _login_signals = None

#: The signals Flask-Login sends while it loads the user (``LoginManager._load_user``), before
#: ``current_user`` is set: reading ``current_user`` from inside one loads the user again, which
#: sends it again, and so on until ``RecursionError``. Their events take the user from their
#: ``user`` kwarg (the user being loaded), or have none. The header one is deprecated, and private.
_LOADING_SIGNALS: frozenset[int] = frozenset(
    id(getattr(_login_signals, name))
    for name in ("user_accessed", "session_protected", "user_loaded_from_cookie", "user_loaded_from_request",
                 "_user_loaded_from_header")
    if _login_signals is not None and hasattr(_login_signals, name)
)
#: Set while a capture reads ``current_user``: a signal sent by that load (an app's ``user_loader``
#: may send one) is captured without the user instead of loading it again, inside the load.
_reading_user: ContextVar[bool] = ContextVar("signal_queue.reading_user", default=False)


def request_id(environ: dict[str, Any]) -> str:
    """The request's id: a well-formed ``X-Request-ID`` from the client, else a new one.

    Kept in the WSGI environ so every event of one request shares it.
    """
    rid = environ.get(REQUEST_ID_ENVIRON_KEY)
    if rid is None:
        sent = environ.get("HTTP_X_REQUEST_ID")
        rid = sent if sent and _VALID_REQUEST_ID.match(sent) else new_id()
        environ[REQUEST_ID_ENVIRON_KEY] = rid
    return str(rid)


def current_user_id(
    app: Flask, g_obj: Any, signal: Any = None, kwargs: dict[str, Any] | None = None
) -> str | None:
    """``g.current_user`` if set, else Flask-Login's ``current_user.get_id()``, else None.

    For the signals Flask-Login sends while loading the user (``signal``), the user
    is the one in their ``user`` kwarg, if any: ``current_user`` is not known yet.
    """
    user = g_obj.__dict__.get("current_user")
    if user is not None:
        return user if isinstance(user, str) else _user_id(user)
    if _login_current_user is None or getattr(app, "login_manager", None) is None:
        return None
    if id(signal) in _LOADING_SIGNALS:
        loaded = (kwargs or {}).get("user")
        return None if loaded is None or not getattr(loaded, "is_authenticated", False) else _user_id(loaded)
    if _reading_user.get():
        return None
    token = _reading_user.set(True)
    try:
        if not getattr(_login_current_user, "is_authenticated", False):
            return None
        user_id = _login_current_user.get_id()
    finally:
        _reading_user.reset(token)
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
        if codec.secret(name):
            captured[name] = REDACTED
            continue
        if type(value) is str:
            captured[name] = value
            continue
        try:
            captured[name] = codec.encode(value, f"g.{name}")
        except Unserializable:
            continue
    return captured


#: Where werkzeug's ProxyFix keeps the environ values it rewrote (the peer's address, among them).
_PROXY_FIX_ORIGINAL = "werkzeug.proxy_fix.orig"

#: WSGI keys a snapshot needs besides the HTTP_ headers.
_ENVIRON_KEYS = frozenset(
    {
        "REQUEST_METHOD", "SCRIPT_NAME", "PATH_INFO", "QUERY_STRING", "CONTENT_TYPE", "CONTENT_LENGTH",
        "REMOTE_ADDR", "SERVER_NAME", "SERVER_PORT", "wsgi.url_scheme", _PROXY_FIX_ORIGINAL,
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

    __slots__ = ("_key", "_snapshot", "endpoint", "environ", "request_id", "view_args")

    def __init__(self, environ: dict[str, Any], endpoint: str | None, view_args: dict[str, Any]):
        self.environ = environ
        self.endpoint = endpoint
        self.view_args = view_args
        self.request_id = request_id(environ)
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
                # The peer that connected, and the client as the app sees it: REMOTE_ADDR
                # after werkzeug's ProxyFix, when the app uses it (one rule, the app's own).
                "remote_addr": (environ.get(_PROXY_FIX_ORIGINAL) or {}).get("REMOTE_ADDR", req.remote_addr),
                "client_ip": req.remote_addr,
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


def capture_request() -> RawRequest | None:
    """The active request's :class:`RawRequest` (taken on its first event), or None outside a request."""
    if not has_request_context():
        return None
    req: Request = request._get_current_object()  # type: ignore[attr-defined]
    environ = req.environ
    raw: RawRequest | None = environ.get(_RAW_KEY)
    if raw is None:
        raw = environ[_RAW_KEY] = RawRequest(environ, req.endpoint, dict(req.view_args or ()))
    return raw


class PendingEvent:
    """An event as the request thread leaves it: validated and encoded, not yet formatted.

    The costly parts (ISO time, request snapshot, JSON) are done by
    :meth:`to_dict`, off the request thread in the background delivery mode.
    """

    __slots__ = ("_id", "emitted", "g", "kwargs", "raw_request", "receiver", "sender", "user")

    def __init__(
        self,
        receiver: DeferredReceiver,
        emitted: float,
        sender: Any,
        kwargs: dict[str, Any],
        raw_request: RawRequest | None,
        g: dict[str, Any],
        user: str | None,
    ) -> None:
        self.receiver = receiver
        self._id: str | None = None
        self.emitted = emitted
        self.sender = sender
        self.kwargs = kwargs
        self.raw_request = raw_request
        self.g = g
        self.user = user

    @property
    def id(self) -> str:
        """Given when first asked for (off the request thread, in the background mode)."""
        if self._id is None:
            self._id = new_id()
        return self._id

    def to_dict(self, codec: Codec, shared: dict[str, dict[str, Any]] | None = None) -> dict[str, Any]:
        """The JSON form a worker reads with :meth:`Event.from_dict`.

        With ``shared`` (a batch's table of request snapshots by request id),
        the snapshot goes in the table once and the event refers to it.
        """
        raw = self.raw_request
        if shared is not None and raw is not None:
            # Keyed by an id the bridge made for this request, never by the client's
            # X-Request-ID: two requests may send the same one (a retry, or on purpose).
            key = raw.key
            if key not in shared:
                shared[key] = raw.snapshot(codec, None)
            snapshot: Any = {"ref": key, "user": self.user}
        else:
            snapshot = None if raw is None else raw.snapshot(codec, self.user)
        return {
            "v": FORMAT_VERSION,
            "id": self.id,
            "signal": self.receiver.signal_name,
            "receiver": self.receiver.name,
            "emitted_at": dt.datetime.fromtimestamp(self.emitted, dt.timezone.utc).isoformat(),
            "sender": self.sender,
            "kwargs": self.kwargs,
            "request": snapshot,
            "g": self.g,
        }


def received_form(event: PendingEvent, codec: Codec) -> dict[str, Any]:
    """``event`` as a worker receives it: through ``json.dumps``/``json.loads`` (eager mode, tests)."""
    return json.loads(json.dumps(event.to_dict(codec)))  # type: ignore[no-any-return]


_PLAIN = frozenset({str, int, float, bool, type(None)})


def build_event(
    app: Flask,
    codec: Codec,
    max_event_bytes: int,
    receiver: DeferredReceiver,
    sender: Any,
    kwargs: dict[str, Any],
    *,
    lenient: bool = False,
) -> PendingEvent:
    """Validate and encode what the handler will need; raise :class:`PayloadError` for a bad kwarg.

    This runs on the request thread for every emit, so plain values take a
    fast path and everything costly is left to :meth:`PendingEvent.to_dict`.
    ``app`` is the current app, whose app context is active. With ``lenient``,
    a kwarg that cannot be carried (or makes the event too large) is replaced by
    a marker the worker fails the event with, instead of raising.
    """
    encoded = kwargs
    size = 0
    for key, value in kwargs.items():
        if codec.secret(key):
            encoded = _encode_kwargs(codec, receiver, kwargs, lenient)
            size = _json_size_bound(encoded)
            break
        if type(value) is str:
            size += _json_size_bound(value)
        elif type(value) not in _PLAIN:
            encoded = _encode_kwargs(codec, receiver, kwargs, lenient)
            size = _json_size_bound(encoded)
            break
    if size > max_event_bytes:
        # Measures exactly, and acts only if really over.
        encoded = (_shrink if lenient else _refuse_size)(max_event_bytes, receiver, encoded)
    raw = capture_request()
    captured_g: dict[str, Any] = {}
    user = None
    if has_app_context():  # else the sender is the app, sent outside its context
        g_obj = g._get_current_object()
        captured_g = capture_g(codec, g_obj)
        if raw is not None:
            user = current_user_id(app, g_obj, receiver.signal, kwargs)
    return PendingEvent(
        receiver,
        time.time(),
        sender if type(sender) in _PLAIN else codec.encode_sender(sender),
        encoded,
        raw,
        captured_g,
        user,
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


def _sizes(encoded: dict[str, Any]) -> list[tuple[int, str]]:
    """(bytes as JSON, key) of each kwarg, the largest first."""
    return sorted(((len(json.dumps(v)), k) for k, v in encoded.items()), reverse=True)


def _refuse_size(max_event_bytes: int, receiver: DeferredReceiver, encoded: dict[str, Any]) -> dict[str, Any]:
    sizes = _sizes(encoded)
    total = sum(n for n, _ in sizes)
    if total <= max_event_bytes:
        return encoded
    raise PayloadError(
        f"signal {receiver.signal_name!r}, deferred receiver {receiver.name!r}: the kwargs take {total} bytes "
        f"as JSON, over SIGNAL_QUEUE_MAX_EVENT_BYTES ({max_event_bytes}); the largest is "
        f"{sizes[0][1]!r} ({sizes[0][0]} bytes). Send an id and load the data in the receiver",
        signal=receiver.signal_name,
        receiver=receiver.name,
        key=sizes[0][1],
    )


def _shrink(max_event_bytes: int, receiver: DeferredReceiver, encoded: dict[str, Any]) -> dict[str, Any]:
    """The kwargs with the largest replaced by markers until the event fits (lenient mode)."""
    sizes = _sizes(encoded)
    total = sum(n for n, _ in sizes)
    shrunk = dict(encoded)
    for size, key in sizes:
        if total <= max_event_bytes:
            break
        reason = f"it takes {size} bytes as JSON, over SIGNAL_QUEUE_MAX_EVENT_BYTES ({max_event_bytes})"
        shrunk[key] = Codec.unsendable(Unserializable(key, None, reason))
        total -= size
    return shrunk


def _encode_kwargs(codec: Codec, receiver: DeferredReceiver, kwargs: dict[str, Any], lenient: bool) -> dict[str, Any]:
    if lenient:
        encoded = {}
        for key, value in kwargs.items():
            try:
                encoded[key] = REDACTED if codec.secret(key) else codec.encode(value, key)
            except Unserializable as exc:
                encoded[key] = codec.unsendable(exc)
        return encoded
    try:
        return {key: REDACTED if codec.secret(key) else codec.encode(value, key) for key, value in kwargs.items()}
    except Unserializable as exc:
        raise PayloadError(
            f"signal {receiver.signal_name!r}, deferred receiver {receiver.name!r}: "
            f"kwarg {exc.key} cannot be sent to a worker ({exc.reason}); "
            "pass ids, strings or numbers instead, or carry the type with SignalQueue.register_type",
            signal=receiver.signal_name,
            receiver=receiver.name,
            key=exc.key,
        ) from None

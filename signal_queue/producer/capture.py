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
import math
import re
import time
from contextvars import ContextVar
from typing import Any

from flask import Flask, Request, g, request
from werkzeug.sansio.utils import get_current_url

from ..exceptions import PayloadError
from ..wire.codec import REDACTED, Codec, Unserializable, redact_path
from ..wire.event import FORMAT_VERSION, REQUEST_ID_ENVIRON_KEY, URL_PLAIN_CHARS, new_id
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

#: Paths and query strings made only of these characters are left as they are by werkzeug's URL
#: building (``quote`` with its safe characters, then ``uri_to_iri``, which only unquotes ``%XX``):
#: such a request's ``url`` is its host's prefix with them appended, no werkzeug call needed.
_PLAIN_PATH = re.compile(f"[{URL_PLAIN_CHARS}]*").fullmatch
_PLAIN_QUERY = re.compile(f"[?{URL_PLAIN_CHARS}]*").fullmatch
#: Entries kept by each cache below: header names and Host values come from clients.
_CACHE_MAX = 10_000
#: (scheme, Host header, SERVER_NAME, SERVER_PORT) -> (host, URL up to the path), as werkzeug makes them.
_hosts: dict[tuple[Any, Any, Any, Any], tuple[str, str]] = {}
#: WSGI environ key -> (header name as werkzeug spells it, lower-cased), or None for a key that is no header.
_header_names: dict[str, tuple[str, str] | None] = {}


class RawRequest:
    """What the request thread keeps of a request: cheap to take, turned into a snapshot later.

    Taken once per request (cached in the environ) and shared by its events.
    It holds a copy of the environ's keys a snapshot reads (text, for the most
    part), not the environ: the request's objects (the environ refers to the
    request, which refers to the environ) are freed when the request ends, not
    kept until the sender formats the snapshot off the request thread.
    """

    __slots__ = ("_key", "_snapshot", "endpoint", "environ", "request_id", "view_args")

    def __init__(self, environ: dict[str, Any], endpoint: str | None, view_args: dict[str, Any]):
        # environ.copy() first: atomic under the GIL, where another thread of the request may add keys.
        self.environ = {k: v for k, v in environ.copy().items() if k[:5] == "HTTP_" or k in _ENVIRON_KEYS}
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
        """The JSON form of :class:`~signal_queue.event.RequestSnapshot` (cached but for the user).

        Without a user, the cached dict itself: callers only read it.
        """
        snap = self._snapshot
        if snap is None:
            environ = self.environ
            snap = _plain_snapshot(environ, codec) or _werkzeug_snapshot(environ, codec)
            _redact_target(snap, self.view_args, codec)
            snap["endpoint"] = self.endpoint
            snap["view_args"] = _encode_view_args(codec, self.view_args)
            snap["request_id"] = self.request_id
            snap["user"] = None
            self._snapshot = snap
        return snap if user is None else dict(snap, user=user)


def _redact_target(snap: dict[str, Any], view_args: dict[str, Any], codec: Codec) -> None:
    """Secret-named path arguments and query parameters (``SIGNAL_QUEUE_REDACT_FIELDS``) as
    ``[REDACTED]`` in the snapshot's path, query string and URL: a token in a URL never reaches
    Redis or the spool. The worker's request matches the same rule, with ``[REDACTED]`` as the value."""
    secrets = codec.secret_values(view_args)
    path, query = snap["path"], snap["query_string"]
    new_path = redact_path(path, secrets) if secrets else path
    new_query = codec.redact_query(query)
    if new_path != path or new_query != query:
        snap["path"], snap["query_string"] = new_path, new_query
        snap["url"] = get_current_url(
            snap["scheme"], snap["host"], snap["root_path"], new_path, new_query.encode("latin-1")
        )


def _werkzeug_snapshot(environ: dict[str, Any], codec: Codec) -> dict[str, Any]:
    """The request's fields as werkzeug's ``Request`` reads them from ``environ`` (the keys
    :class:`RawRequest` keeps): any request."""
    req = Request(environ, populate_request=False, shallow=True)
    return {
        "method": req.method,
        "scheme": req.scheme,
        "host": req.host,
        "root_path": req.root_path,
        "path": req.path,
        "query_string": req.query_string.decode("latin-1"),
        "url": req.url,
        "headers": codec.headers(req.headers.items()),
        # The peer that connected, and the client as the app sees it: REMOTE_ADDR
        # after werkzeug's ProxyFix, when the app uses it (one rule, the app's own).
        "remote_addr": (environ.get(_PROXY_FIX_ORIGINAL) or {}).get("REMOTE_ADDR", req.remote_addr),
        "client_ip": req.remote_addr,
    }


def _plain_snapshot(environ: dict[str, Any], codec: Codec) -> dict[str, Any] | None:
    """The same fields as :func:`_werkzeug_snapshot` for a plain request, read straight from ``environ``.

    Building a werkzeug ``Request`` and its URL costs ~60 us a request, most of the sender's work
    (profiled). A request whose scheme is text and whose path, root path and query string are
    made of :data:`_PLAIN_PATH` characters needs none of it: werkzeug would leave them as they are.
    The host and the URL's start are werkzeug's own, cached by what they depend on. Anything else
    returns None, for werkzeug to read (``tests/test_snapshot.py`` checks the two agree).
    """
    scheme = environ.get("wsgi.url_scheme")
    root_path = environ.get("SCRIPT_NAME") or ""
    path = environ.get("PATH_INFO") or ""
    query = environ.get("QUERY_STRING", "")
    if not (
        type(scheme) is str and type(root_path) is str and type(path) is str and type(query) is str
        and _PLAIN_PATH(root_path) and _PLAIN_PATH(path) and _PLAIN_QUERY(query)
    ):
        return None
    where = (scheme, environ.get("HTTP_HOST"), environ.get("SERVER_NAME"), environ.get("SERVER_PORT"))
    host_prefix = _hosts.get(where)
    if host_prefix is None:
        host_prefix = _host_prefix(*where)
        if len(_hosts) < _CACHE_MAX:
            _hosts[where] = host_prefix
    host, prefix = host_prefix
    if not host:  # werkzeug's URL of an empty host depends on the path: its own reading
        return None
    root_path = root_path.rstrip("/")
    path = "/" + path.lstrip("/")
    url = f"{prefix}{root_path}{path}"
    if query:
        url = f"{url}?{query}"
    redact = codec.redact_headers
    headers = []
    names = _header_names
    for key, value in environ.items():
        try:
            name = names[key]
        except KeyError:
            name = _header_name(key)
        if name is not None and (value or key[0] == "H"):  # werkzeug skips empty CONTENT_TYPE/LENGTH
            headers.append([name[0], REDACTED if name[1] in redact else value])
    client = environ.get("REMOTE_ADDR")
    return {
        "method": environ.get("REQUEST_METHOD", "GET").upper(),
        "scheme": scheme,
        "host": host,
        "root_path": root_path,
        "path": path,
        "query_string": query,
        "url": url,
        "headers": headers,
        "remote_addr": (environ.get(_PROXY_FIX_ORIGINAL) or {}).get("REMOTE_ADDR", client),
        "client_ip": client,
    }


def _host_prefix(scheme: str, host: Any, server_name: Any, server_port: Any) -> tuple[str, str]:
    """werkzeug's host for these values, and its URL of the root path without the final ``/``."""
    environ = {"wsgi.url_scheme": scheme, "SCRIPT_NAME": "", "PATH_INFO": "", "QUERY_STRING": ""}
    for key, value in (("HTTP_HOST", host), ("SERVER_NAME", server_name), ("SERVER_PORT", server_port)):
        if value is not None:
            environ[key] = value
    req = Request(environ, populate_request=False, shallow=True)
    return req.host, req.url[:-1]


def _header_name(key: str) -> tuple[str, str] | None:
    """The header an environ key holds, as werkzeug's ``EnvironHeaders`` names it (None: not a header)."""
    if key[:5] == "HTTP_" and key not in ("HTTP_CONTENT_TYPE", "HTTP_CONTENT_LENGTH"):
        name = key[5:].replace("_", "-").title()
    elif key in ("CONTENT_TYPE", "CONTENT_LENGTH"):
        name = key.replace("_", "-").title()
    else:
        name = None
    found = None if name is None else (name, name.lower())
    if len(_header_names) < _CACHE_MAX:
        _header_names[key] = found
    return found


def _encode_view_args(codec: Codec, view_args: dict[str, Any]) -> dict[str, Any]:
    encoded: dict[str, Any] = {}
    for key, value in view_args.items():
        if codec.secret(key):
            encoded[key] = REDACTED
            continue
        if type(value) is str or type(value) is int:  # what URL converters give, mostly: JSON as it is
            encoded[key] = value
            continue
        try:
            encoded[key] = codec.encode(value, f"view_args.{key}")
        except Unserializable:
            encoded[key] = str(value)
    return encoded


def capture_request() -> RawRequest | None:
    """The active request's :class:`RawRequest` (taken on its first event), or None outside a request."""
    try:
        req: Request = request._get_current_object()  # type: ignore[attr-defined]
    except RuntimeError:  # outside a request
        return None
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
        if raw is None:
            snapshot: Any = None
        elif shared is not None:
            # Keyed by an id the bridge made for this request, never by the client's
            # X-Request-ID: two requests may send the same one (a retry, or on purpose).
            key = raw.key
            if key not in shared:
                shared[key] = raw.snapshot(codec, None)
            snapshot = {"ref": key, "user": self.user}
        else:
            snapshot = raw.snapshot(codec, self.user)
        receiver = self.receiver
        return {
            "v": FORMAT_VERSION,
            "id": self.id,
            "signal": receiver.signal_name,
            "receiver": receiver.name,
            "emitted_at": utc_isoformat(self.emitted),
            "sender": self.sender,
            "kwargs": self.kwargs,
            "request": snapshot,
            "g": self.g,
        }


_UTC = dt.timezone.utc
_second: tuple[int, str] = (0, "1970-01-01T00:00:00")


def utc_isoformat(timestamp: float) -> str:
    """``datetime.fromtimestamp(timestamp, utc).isoformat()``, the same text at a quarter of the cost.

    Rounded to the microsecond as ``datetime`` rounds (half to even); the date and time
    of the whole second are formatted once per second, not once per event.
    """
    global _second
    fraction, whole = math.modf(timestamp)
    micros = round(fraction * 1e6)
    second = int(whole)
    if micros >= 1_000_000:
        second, micros = second + 1, micros - 1_000_000
    elif micros < 0:
        second, micros = second - 1, micros + 1_000_000
    cached_second, text = _second
    if second != cached_second:
        text = dt.datetime.fromtimestamp(second, _UTC).isoformat()[:19]
        _second = (second, text)
    return f"{text}.{micros:06d}+00:00" if micros else f"{text}+00:00"


def received_form(event: PendingEvent, codec: Codec) -> dict[str, Any]:
    """``event`` as a worker receives it: through ``json.dumps``/``json.loads`` (eager mode, tests)."""
    return json.loads(json.dumps(event.to_dict(codec)))  # type: ignore[no-any-return]


_PLAIN = frozenset({str, int, float, bool, type(None)})
#: Senders sent as they are; a float goes through the codec, which tags a NaN or an infinity.
_PLAIN_SENDER = frozenset({str, int, bool, type(None)})


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
    secret = codec.secret
    for key, value in kwargs.items():
        kind = type(value)
        if kind is str and not secret(key):
            size += len(value) + 2 if value.isascii() else 6 * len(value) + 2
        elif kind not in _PLAIN or (kind is float and value - value) or secret(key):
            # A value to encode (or a NaN or infinity, which JSON has no word for), or a secret.
            encoded = _encode_kwargs(codec, receiver, kwargs, lenient)
            size = _json_size_bound(encoded)
            break
    if size > max_event_bytes:
        # Measures exactly, and acts only if really over.
        encoded = (_shrink if lenient else _refuse_size)(max_event_bytes, receiver, encoded)
    raw = capture_request()
    captured_g: dict[str, Any] = {}
    user = None
    try:
        g_obj = g._get_current_object()
    except RuntimeError:  # no app context: the sender is the app, sent outside its context
        pass
    else:
        captured_g = capture_g(codec, g_obj)
        if raw is not None:
            user = current_user_id(app, g_obj, receiver.signal, kwargs)
    return PendingEvent(
        receiver,
        time.time(),
        sender if type(sender) in _PLAIN_SENDER else codec.encode_sender(sender),
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

"""JSON encoding of what a signal carries: kwargs, senders and exceptions.

Everything that crosses Redis is JSON. Plain JSON values go as they are; a few
types Flask signals send (exceptions, responses, templates, the app, ``g``,
``request``), a few common Python types (datetime, UUID, Decimal, bytes, tuple,
set) and the floats JSON has no word for (NaN, infinities) are written as
tagged objects ``{"__sq__": tag, ...}`` and rebuilt in the worker. Anything
else is refused at emit time with the key that held it, so that a value that
cannot reach the worker fails where the programmer can see it, not later in a
log nobody reads.
"""

from __future__ import annotations

import base64
import datetime as dt
import math
import re
import sys
import traceback
import uuid
from collections.abc import Callable, Collection, Container, Iterable, Mapping, Sequence
from dataclasses import dataclass
from decimal import Decimal
from typing import Any, Protocol
from urllib.parse import unquote_plus

from flask import Flask, Request, current_app
from flask.sessions import SessionMixin
from jinja2 import Template
from werkzeug.local import LocalProxy
from werkzeug.wrappers import Response

TAG = "__sq__"
REDACTED = "[REDACTED]"
#: :data:`REDACTED` in a query string, percent-encoded: ``request.args`` reads it back as ``[REDACTED]``.
REDACTED_IN_URL = "%5BREDACTED%5D"
#: Deepest nesting of lists, dicts and tagged values carried: deeper data is refused at emit
#: (and in the worker) with its key path, not with a ``RecursionError`` from inside the codec.
MAX_DEPTH = 100
JSONScalar = (str, int, float, bool, type(None))


class Unserializable(TypeError):
    """A value at ``key`` cannot be encoded; the caller adds signal and receiver."""

    def __init__(self, key: str, value: Any, reason: str = "") -> None:
        self.key = key
        self.type_name = _type_name(type(value))
        self.reason = reason or f"{self.type_name} is not JSON-serializable"
        super().__init__(f"{key}: {self.reason}")


class RemoteException(Exception):
    """Stand-in for an exception whose type cannot be rebuilt in the worker.

    Instances are of a subclass named like the original type (same
    ``__module__`` and ``__qualname__``), so ``traceback.format_exception_only``
    prints the same text it printed in the request. ``type_name``,
    ``message`` and ``remote_traceback`` carry what was captured.
    """

    type_name: str = ""

    def __init__(self, message: str, remote_traceback: str) -> None:
        super().__init__(message)
        self.message = message
        self.remote_traceback = remote_traceback


class OpaqueSender:
    """Stand-in for a sender that is neither JSON, the app, nor an importable class or function.

    Carries the sender's type name and ``repr`` as they were at emit time.
    """

    def __init__(self, type_name: str, text: str) -> None:
        self.type_name = type_name
        self.text = text

    def __repr__(self) -> str:
        return self.text

    def __eq__(self, other: object) -> bool:
        return (
            isinstance(other, OpaqueSender)
            and (self.type_name, self.text) == (other.type_name, other.text)
        )

    def __hash__(self) -> int:
        return hash((self.type_name, self.text))


_standin_classes: dict[tuple[str, str], type[RemoteException]] = {}


def _type_name(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def resolve_loaded(module: str, qualname: str) -> Any:
    """Find ``module:qualname`` among modules already imported, never importing one.

    Redis is not a trust boundary: a name read from a job must not make the
    worker import code.
    """
    obj: Any = sys.modules.get(module)
    if obj is None:
        return None
    for part in qualname.split("."):
        if part == "<locals>":
            return None
        obj = getattr(obj, part, None)
        if obj is None:
            return None
    return obj


def _standin_class(module: str, qualname: str) -> type[RemoteException]:
    key = (module, qualname)
    cls = _standin_classes.get(key)
    if cls is None:
        name = qualname.rsplit(".", 1)[-1]
        cls = type(
            name,
            (RemoteException,),
            {"__module__": module, "__qualname__": qualname, "type_name": f"{module}.{qualname}"},
        )
        _standin_classes[key] = cls
    return cls


#: What a :class:`Carrier`'s ``encode`` returns for a value that is not of its kind.
NOT_MINE: Any = object()


class Carrier(Protocol):
    """A way to carry a kind of value that JSON and the built-in tags cannot (models, users...).

    ``encode`` returns the tagged JSON form (``{TAG: carrier.tag, ...}``), or
    :data:`NOT_MINE`; ``decode`` rebuilds the value in the worker, with the
    emit's contexts pushed, and raises ``ValueError`` saying why it cannot.
    Values inside the form go through ``codec.encode`` (which tags a NaN or an
    infinity: the job's JSON encoder would write those as null).
    """

    tag: str

    def encode(self, codec: Codec, value: Any, key: str, depth: int) -> Any: ...

    def decode(self, codec: Codec, value: Mapping[str, Any], depth: int) -> Any: ...


@dataclass(frozen=True)
class RegisteredType:
    """A type the app registered with ``SignalQueue.register_type``: its name on the wire and its converters."""

    cls: type
    name: str
    encode: Callable[[Any], Any]
    decode: Callable[[Any], Any]


class Codec:
    """Encodes values for a queue and decodes them in a worker.

    ``redact_headers`` names (lower case) the request and response headers whose values
    are replaced by ``[REDACTED]``; ``redact_fields`` are the words that make a field secret
    (see :meth:`secret`): its value never leaves the process; ``max_body`` caps the response body kept;
    ``globals_class`` is the app's ``app_ctx_globals_class`` (the type of ``g``);
    ``carriers`` carry what nothing else does (see :class:`Carrier`), tried in order.
    """

    def __init__(
        self,
        redact_headers: Iterable[str] = (),
        redact_fields: Iterable[str] = (),
        max_body: int = 64 * 1024,
        globals_class: type = Flask.app_ctx_globals_class,
        carriers: Sequence[Carrier] = (),
    ) -> None:
        self.redact_headers = frozenset(h.lower() for h in redact_headers)
        self.redact_fields = tuple(_normalized(f) for f in redact_fields if _normalized(f))
        # One search for any of the words (a regular expression runs in C), rather than a loop over them.
        self._secret_word = re.compile("|".join(map(re.escape, self.redact_fields)) or r"(?!)").search
        self._secret_names: dict[str, bool] = {}
        self.max_body = max_body
        self.carriers = list(carriers)
        self._carriers_by_tag = {c.tag: c for c in self.carriers}
        self._types: dict[str, RegisteredType] = {}
        self._encoders: list[tuple[type | tuple[type, ...], Callable[[Any, str, int], Any]]] = [
            (BaseException, lambda v, k, d: self.encode_exception(v)),
            (Flask, lambda v, k, d: {TAG: "app"}),
            (Response, self._encode_response),
            (Template, lambda v, k, d: {TAG: "template", "name": v.name}),
            (Request, lambda v, k, d: {TAG: "request"}),
            (globals_class, lambda v, k, d: {TAG: "g"}),
            (SessionMixin, lambda v, k, d: {TAG: "session"}),
            (dt.datetime, lambda v, k, d: {TAG: "datetime", "v": v.isoformat()}),
            (dt.date, lambda v, k, d: {TAG: "date", "v": v.isoformat()}),
            (dt.time, lambda v, k, d: {TAG: "time", "v": v.isoformat()}),
            (dt.timedelta, lambda v, k, d: {TAG: "timedelta", "v": v.total_seconds()}),
            (uuid.UUID, lambda v, k, d: {TAG: "uuid", "v": str(v)}),
            (Decimal, lambda v, k, d: {TAG: "decimal", "v": str(v)}),
            (bytes, lambda v, k, d: {TAG: "bytes", "v": base64.b64encode(v).decode("ascii")}),
            (tuple, lambda v, k, d: {TAG: "tuple", "items": self._encode_items(v, k, d)}),
            (frozenset, lambda v, k, d: {TAG: "frozenset", "items": self._encode_items(v, k, d)}),
            (set, lambda v, k, d: {TAG: "set", "items": self._encode_items(v, k, d)}),
        ]

    # -- encoding -----------------------------------------------------------------

    def encode(self, value: Any, key: str, depth: int = 0) -> Any:
        """Return a JSON-ready form of ``value``; raise :class:`Unserializable` naming ``key``."""
        if depth > MAX_DEPTH:
            raise Unserializable(key, value, f"it is nested deeper than {MAX_DEPTH} levels")
        if isinstance(value, LocalProxy):
            value = value._get_current_object()
        if isinstance(value, str):
            return str(value)  # drops str subclasses such as markupsafe.Markup
        if isinstance(value, JSONScalar):
            if isinstance(value, float) and not math.isfinite(value):
                # JSON has no NaN or infinity (Python's json writes them anyway, other encoders
                # write null): tagged, so the worker gets the same float whatever wrote the job.
                return {TAG: "float", "v": repr(float(value))}
            return value
        if isinstance(value, list):
            return self._encode_items(value, key, depth)
        if isinstance(value, dict):
            encoded = {}
            for k, v in value.items():
                if not isinstance(k, str):
                    raise Unserializable(f"{key}[{k!r}]", k, "dict keys must be strings")
                encoded[k] = REDACTED if self.secret(k) else self.encode(v, f"{key}[{k!r}]", depth + 1)
            if TAG in encoded:
                return {TAG: "dict", "items": encoded}
            return encoded
        for registered in self._types.values():
            if isinstance(value, registered.cls):
                return self._encode_registered(registered, value, key, depth)
        for cls, encoder in self._encoders:
            if isinstance(value, cls):
                return encoder(value, key, depth)
        for carrier in self.carriers:
            encoded = carrier.encode(self, value, key, depth)
            if encoded is not NOT_MINE:
                return encoded
        raise Unserializable(key, value)

    def secret(self, name: str) -> bool:
        """Whether a field (a kwarg, a dict key, a model column, an attribute of ``g`` or of a user)
        holds a secret: its name, lower case without ``_``, ``-``, ``.`` and spaces, contains one of
        ``redact_fields`` (``password_hash``, ``form_data["password"]``, ``reset_token``...)."""
        hit = self._secret_names.get(name)
        if hit is None:
            hit = self._secret_word(_normalized(name)) is not None
            if len(self._secret_names) < 10_000:  # names are few; a flood of new ones is not remembered
                self._secret_names[name] = hit
        return hit

    def secret_values(self, view_args: Any) -> set[str]:
        """The values, as text, of a URL rule's secret-named path arguments (for :func:`redact_path`)."""
        if type(view_args) is not dict and not isinstance(view_args, Mapping):  # an ABC check costs ~0.5 us
            return set()
        secret = self.secret
        return {
            str(value)
            for name, value in view_args.items()
            if isinstance(name, str) and secret(name) and isinstance(value, (str, int)) and str(value)
        }

    def redact_query(self, query: str) -> str:
        """``query`` with the values of secret-named parameters as ``[REDACTED]`` (percent-encoded);
        every other parameter as it was sent. Parsed only when a redacted word, ``%`` or ``+`` is in it."""
        if not query:
            return query
        if "%" not in query and "+" not in query:
            squeezed = query.lower().replace("_", "").replace("-", "").replace(".", "")  # as _normalized, in C
            if self._secret_word(squeezed) is None:
                return query
        parts = query.split("&")
        changed = False
        for i, part in enumerate(parts):
            name, eq, _ = part.partition("=")
            if eq and self.secret(unquote_plus(name)):
                parts[i] = f"{name}={REDACTED_IN_URL}"
                changed = True
        return "&".join(parts) if changed else query

    def encode_attributes(
        self, attributes: Mapping[str, Any], key: str, depth: int, skip: Container[str] = ()
    ) -> dict[str, Any]:
        """An object's public attributes as a carrier sends them: secrets as ``[REDACTED]``, the rest
        encoded, and what cannot be carried left out (as for ``g``)."""
        encoded: dict[str, Any] = {}
        for name, value in attributes.items():
            if name.startswith("_") or name in skip:
                continue
            if self.secret(name):
                encoded[name] = REDACTED
                continue
            try:
                encoded[name] = self.encode(value, f"{key}.{name}", depth + 1)
            except Unserializable:
                continue
        return encoded

    @staticmethod
    def unsendable(error: Unserializable) -> dict[str, Any]:
        """What stands in for a value that cannot be carried, when the app records such events
        instead of raising: the worker fails the event with this reason, never retrying it."""
        return {TAG: "unsendable", "key": error.key, "reason": error.reason}

    def register_type(
        self, cls: type, encode: Callable[[Any], Any], decode: Callable[[Any], Any], name: str | None = None
    ) -> RegisteredType:
        """Carry instances of ``cls`` (and its subclasses) as ``encode(value)``, rebuilt by ``decode``.

        ``name`` is how the wire names the type (default ``module:qualname``);
        give one that survives a rename of the class.
        """
        if not isinstance(cls, type):
            raise TypeError(f"register_type needs a class, got {cls!r}")
        if not (callable(encode) and callable(decode)):
            raise TypeError(f"register_type({cls.__qualname__}): encode and decode must be callables")
        name = name or f"{cls.__module__}:{cls.__qualname__}"
        existing = self._types.get(name)
        if existing is not None and existing.cls is not cls:
            raise ValueError(
                f"type name {name!r} is already registered for {existing.cls.__module__}.{existing.cls.__qualname__}"
            )
        registered = self._types[name] = RegisteredType(cls, name, encode, decode)
        return registered

    def _encode_registered(self, registered: RegisteredType, value: Any, key: str, depth: int) -> Any:
        try:
            plain = registered.encode(value)
        except Exception as exc:
            raise Unserializable(key, value, f"encoding it as type {registered.name!r} failed: {exc!r}") from None
        return {TAG: "type", "name": registered.name, "v": self.encode(plain, key, depth + 1)}

    def _decode_registered(self, value: Mapping[str, Any], depth: int) -> Any:
        name = value.get("name")
        registered = self._types.get(name) if isinstance(name, str) else None
        if registered is None:
            raise ValueError(f"type {name!r} is not registered in this worker (SignalQueue.register_type)")
        plain = self.decode(value.get("v"), depth + 1)
        try:
            return registered.decode(plain)
        except Exception as exc:
            raise ValueError(f"type {name!r}: decode failed: {exc!r}") from exc

    def _encode_items(self, items: Iterable[Any], key: str, depth: int = 0) -> list[Any]:
        return [self.encode(v, f"{key}[{i}]", depth + 1) for i, v in enumerate(items)]

    def encode_exception(self, exc: BaseException) -> dict[str, Any]:
        """Capture an exception's type, args, message and formatted traceback."""
        cls = type(exc)
        try:
            args: list[Any] | None = self._encode_items(exc.args, "args")
        except Unserializable:
            args = None
        notes = [str(n) for n in getattr(exc, "__notes__", ()) or ()]
        return {
            TAG: "exception",
            "module": cls.__module__,
            "qualname": cls.__qualname__,
            "args": args,
            "message": _safe_str(exc),
            "notes": notes,
            "format_only": "".join(traceback.format_exception_only(cls, exc)),
            "traceback": "".join(traceback.format_exception(cls, exc, exc.__traceback__)),
        }

    def _encode_response(self, response: Response, key: str, depth: int = 0) -> dict[str, Any]:
        body: str | None = None
        if not response.is_streamed:
            data = response.get_data()
            if len(data) <= self.max_body:
                body = base64.b64encode(data).decode("ascii")
        return {
            TAG: "response",
            "status": response.status,
            "headers": self.headers(response.headers.items()),
            "body": body,
        }

    def headers(self, items: Iterable[tuple[str, str]]) -> list[list[str]]:
        """Header pairs with the values of secret headers replaced."""
        return [
            [name, REDACTED if name.lower() in self.redact_headers else value]
            for name, value in items
        ]

    def encode_sender(self, sender: Any) -> Any:
        """Encode a signal's sender; never fails (see :func:`decode_sender`)."""
        if isinstance(sender, LocalProxy):
            sender = sender._get_current_object()
        if isinstance(sender, Flask):
            return {TAG: "app"}
        try:
            return self.encode(sender, "sender")
        except Unserializable:
            pass
        if isinstance(sender, type) or (callable(sender) and hasattr(sender, "__qualname__")):
            module = getattr(sender, "__module__", None)
            if module and "<locals>" not in sender.__qualname__:
                return {TAG: "ref", "module": module, "qualname": sender.__qualname__}
        return {TAG: "opaque", "type": _type_name(type(sender)), "repr": _safe_repr(sender)}

    # -- decoding -----------------------------------------------------------------

    def decode(self, value: Any, depth: int = 0) -> Any:
        """Rebuild a value written by :meth:`encode`; needs the worker's contexts pushed."""
        if depth > MAX_DEPTH:
            raise ValueError(f"a value is nested deeper than {MAX_DEPTH} levels")
        if isinstance(value, list):
            return [self.decode(v, depth + 1) for v in value]
        if not isinstance(value, dict):
            return value
        tag = value.get(TAG)
        if tag is None:
            return {k: self.decode(v, depth + 1) for k, v in value.items()}
        container = _CONTAINERS.get(tag)
        if container is not None:
            return container(self, value, depth)
        if tag == "exception":
            return self.decode_exception(value, depth)
        if tag == "type":
            return self._decode_registered(value, depth)
        carrier = self._carriers_by_tag.get(tag)
        if carrier is not None:
            return carrier.decode(self, value, depth + 1)
        decoder = _DECODERS.get(tag)
        if decoder is None:
            raise ValueError(f"unknown tag {tag!r}")
        return decoder(self, value)

    def decode_sender(self, value: Any) -> Any:
        """Rebuild a sender: the worker's app, a JSON value, a class or function, or a stand-in."""
        if isinstance(value, dict) and value.get(TAG) == "ref":
            found = resolve_loaded(str(value["module"]), str(value["qualname"]))
            if found is not None:
                return found
            return OpaqueSender("type", f"<{value['module']}.{value['qualname']}>")
        if isinstance(value, dict) and value.get(TAG) == "opaque":
            return OpaqueSender(str(value["type"]), str(value["repr"]))
        return self.decode(value)

    def decode_exception(self, value: Mapping[str, Any], depth: int = 0) -> BaseException:
        """Rebuild the captured exception, or a stand-in of the same name."""
        module, qualname = str(value["module"]), str(value["qualname"])
        message, text = str(value["message"]), str(value["traceback"])
        notes = [str(n) for n in value.get("notes") or ()]
        cls = resolve_loaded(module, qualname)
        exc: BaseException | None = None
        if isinstance(cls, type) and issubclass(cls, BaseException) and value["args"] is not None:
            try:
                exc = cls(*self.decode(value["args"], depth))
                if notes:
                    exc.__notes__ = list(notes)
                same = "".join(traceback.format_exception_only(cls, exc)) == value["format_only"]
            except Exception:
                exc, same = None, False
            if not same:
                exc = None
        if exc is None:
            exc = _standin_class(module, qualname)(message, text)
            if notes:
                exc.__notes__ = list(notes)
        exc.remote_traceback = text  # type: ignore[attr-defined]
        return exc


def _decode_response(codec: Codec, value: Mapping[str, Any]) -> Response:
    body = value.get("body")
    data = base64.b64decode(body) if body is not None else b""
    response: Response = current_app.response_class(data, status=value["status"])
    response.headers.clear()
    for name, header in value["headers"]:
        response.headers.add(name, header)
    return response


def _decode_template(codec: Codec, value: Mapping[str, Any]) -> Any:
    name = value.get("name")
    if name is None:
        return OpaqueSender("jinja2.environment.Template", "<Template from string>")
    return current_app.jinja_env.get_template(name)


def _current(name: str) -> Callable[[Codec, Mapping[str, Any]], Any]:
    import flask

    return lambda codec, value: getattr(flask, name)._get_current_object()


_DECODERS: dict[str, Callable[[Codec, Mapping[str, Any]], Any]] = {
    "app": lambda c, v: current_app._get_current_object(),  # type: ignore[attr-defined]
    "response": _decode_response,
    "template": _decode_template,
    "request": _current("request"),
    "g": _current("g"),
    "session": _current("session"),
    "unsendable": lambda c, v: _refuse_unsendable(v),
    "datetime": lambda c, v: dt.datetime.fromisoformat(v["v"]),
    "date": lambda c, v: dt.date.fromisoformat(v["v"]),
    "time": lambda c, v: dt.time.fromisoformat(v["v"]),
    "timedelta": lambda c, v: dt.timedelta(seconds=v["v"]),
    "uuid": lambda c, v: uuid.UUID(v["v"]),
    "decimal": lambda c, v: Decimal(v["v"]),
    "bytes": lambda c, v: base64.b64decode(v["v"]),
    "float": lambda c, v: _nonfinite(v["v"]),
}
# Tagged containers: their items are decoded one level deeper (see MAX_DEPTH).
_CONTAINERS: dict[str, Callable[[Codec, Mapping[str, Any], int], Any]] = {
    "tuple": lambda c, v, d: tuple(c.decode(v["items"], d)),
    "set": lambda c, v, d: set(c.decode(v["items"], d)),
    "frozenset": lambda c, v, d: frozenset(c.decode(v["items"], d)),
    "dict": lambda c, v, d: {k: c.decode(x, d + 1) for k, x in v["items"].items()},
}


def _nonfinite(text: Any) -> float:
    if text not in ("nan", "inf", "-inf"):
        raise ValueError(f"a tagged float must be nan, inf or -inf, got {text!r}")
    return float(text)


def _refuse_unsendable(value: Mapping[str, Any]) -> Any:
    raise ValueError(f"kwarg {value.get('key')} could not be carried to the worker: {value.get('reason')}")


def redact_path(path: str, values: Collection[str]) -> str:
    """``path`` with each segment that is one of ``values`` (the secret-named path arguments of its
    URL rule, as text) as ``[REDACTED]``; a value holding ``/`` (a ``<path:...>`` argument) wherever it is."""
    for value in sorted((v for v in values if "/" in v), key=len, reverse=True):
        path = path.replace(value, REDACTED)
    return "/".join(REDACTED if s in values else s for s in path.split("/"))


def _normalized(name: str) -> str:
    return "".join(ch for ch in name.lower() if ch not in "_-. ")


def _safe_str(obj: object) -> str:
    try:
        return str(obj)
    except Exception:
        return f"<unprintable {type(obj).__name__}>"


def _safe_repr(obj: object) -> str:
    try:
        text = repr(obj)
    except Exception:
        text = f"<unrepresentable {type(obj).__name__}>"
    return text[:500]

"""The event: what one emit of a signal carries to one deferred receiver, as it crosses Redis.

An :class:`Event` is plain data. The producer writes its JSON form (see
:class:`~signal_queue.producer.capture.PendingEvent`); the worker reads it back
with :meth:`Event.from_dict`, which checks every field and names the first one
that is wrong. A batch job carries each request's snapshot once, in a table the
events refer to by a key the bridge made (:func:`resolve_shared_request`).
"""

from __future__ import annotations

import datetime as dt
import itertools
import os
from dataclasses import dataclass, field, replace
from typing import Any

from ..exceptions import MalformedEvent

#: Version of the payload format; a worker refuses versions it does not know.
FORMAT_VERSION = 1

#: Where a request's id is kept in its WSGI environ (also in the worker's rebuilt request),
#: so every event of one request, and every event its handlers send, carries the same id.
REQUEST_ID_ENVIRON_KEY = "signal_queue.request_id"

#: The characters (a regex class's inside) that werkzeug's URL handling leaves as they are in a path:
#: its ``quote`` keeps them and, with no ``%``, there is nothing to unquote. A snapshot's path made of
#: them is read (producer) and rebuilt (worker) without a werkzeug call.
URL_PLAIN_CHARS = r"A-Za-z0-9_.~!$&'()*+,/:;=@-"

# Event and request ids: a random per-process prefix and a counter. Unique
# across processes and far cheaper on the request thread than uuid4().
_id_prefix = os.urandom(8).hex()
_id_counter = itertools.count()


def _reset_ids() -> None:
    global _id_prefix, _id_counter
    _id_prefix = os.urandom(8).hex()
    _id_counter = itertools.count()


os.register_at_fork(after_in_child=_reset_ids)


def new_id() -> str:
    """A new id, unique across processes (16 random hex digits, then a counter)."""
    return f"{_id_prefix}{next(_id_counter):08x}"


class Unset:
    """The type of :data:`UNSET`: no value given."""


UNSET = Unset()


@dataclass(frozen=True)
class RequestSnapshot:
    """The request as it was when the signal was sent."""

    method: str
    scheme: str
    host: str
    root_path: str
    path: str
    query_string: str
    url: str
    endpoint: str | None
    view_args: dict[str, Any]
    headers: list[tuple[str, str]]
    remote_addr: str | None
    client_ip: str | None
    request_id: str
    user: str | None = None

    @classmethod
    def from_dict(cls, raw: Any) -> RequestSnapshot:
        """Validate and build a snapshot from its JSON form (an event's ``request``); raise :class:`MalformedEvent`."""
        r = _Fields(raw, "request")
        return cls(
            method=r.get("method", str),
            scheme=r.get("scheme", str),
            host=r.get("host", str),
            root_path=r.get("root_path", str),
            path=r.get("path", str),
            query_string=r.get("query_string", str),
            url=r.get("url", str),
            endpoint=r.get("endpoint", str, optional=True),
            view_args=r.get("view_args", dict),
            headers=_header_pairs(r.get("headers", list)),
            remote_addr=r.get("remote_addr", str, optional=True),
            client_ip=r.get("client_ip", str, optional=True),
            request_id=r.get("request_id", str),
            user=r.get("user", str, optional=True),
        )

    def copy(self) -> RequestSnapshot:
        """A copy whose ``view_args`` and ``headers`` are its own (a handler may change them in place)."""
        fresh = object.__new__(RequestSnapshot)
        fresh.__dict__.update(self.__dict__, view_args=dict(self.view_args), headers=list(self.headers))
        return fresh


@dataclass(frozen=True)
class Event:
    """One emit of ``signal`` for one ``receiver``.

    ``sender`` and ``kwargs`` are in their encoded (JSON) form; the worker
    decodes them once the contexts they may refer to are pushed.
    """

    id: str
    signal: str
    receiver: str
    emitted_at: dt.datetime
    sender: Any
    kwargs: dict[str, Any]
    request: RequestSnapshot | None = None
    g: dict[str, Any] = field(default_factory=dict)
    attempt: int = 1

    @property
    def request_id(self) -> str | None:
        """The request id, when the signal was sent during a request."""
        return self.request.request_id if self.request else None

    @property
    def user(self) -> str | None:
        """The user id captured at emit time, if any."""
        return self.request.user if self.request else None

    def with_attempt(self, attempt: int) -> Event:
        return replace(self, attempt=attempt)

    @classmethod
    def from_dict(cls, data: Any, attempt: int = 1, request: RequestSnapshot | Unset | None = UNSET) -> Event:
        """Validate and build an event from its JSON form; raise :class:`MalformedEvent`.

        ``request``, when given, is the event's request snapshot already read (a batch reads
        each of its snapshots once, see :class:`SharedRequests`); its ``request`` key is then skipped.
        """
        d = _Fields(data, "event")
        version = d.get("v", int)
        if version != FORMAT_VERSION:
            raise MalformedEvent(
                f"event format version {version} is not supported by this worker "
                f"(it reads version {FORMAT_VERSION}); run a worker of the release that sent it"
            )
        emitted_raw = d.get("emitted_at", str)
        try:
            emitted_at = dt.datetime.fromisoformat(emitted_raw)
        except ValueError:
            raise MalformedEvent(f"event key 'emitted_at' is not an ISO datetime: {emitted_raw!r}") from None
        if emitted_at.tzinfo is None:
            raise MalformedEvent("event key 'emitted_at' has no timezone")
        if isinstance(request, Unset):
            raw_request = d.get("request", dict, optional=True)
            request = None if raw_request is None else RequestSnapshot.from_dict(raw_request)
        return cls(
            id=d.get("id", str),
            signal=d.get("signal", str),
            receiver=d.get("receiver", str),
            emitted_at=emitted_at,
            sender=d.get("sender", object, optional=True),
            kwargs=d.get("kwargs", dict),
            request=request,
            g=d.get("g", dict),
            attempt=attempt,
        )


def resolve_shared_request(payload: Any, shared: Any) -> Any:
    """An event of a batch with its request snapshot put back in place of the reference."""
    if not isinstance(payload, dict):
        return payload
    request = payload.get("request")
    if not (isinstance(request, dict) and "ref" in request):
        return payload
    if not isinstance(shared, dict) or not isinstance(shared.get(request["ref"]), dict):
        raise MalformedEvent(f"event refers to request {request.get('ref')!r}, which the batch does not carry")
    return dict(payload, request=dict(shared[request["ref"]], user=request.get("user")))


class SharedRequests:
    """A batch's request snapshots, each read once for all the events that refer to it.

    :meth:`snapshot_of` answers what ``Event.from_dict(resolve_shared_request(payload, shared))``
    would put in the event's ``request``, with the same errors, but reads a snapshot
    (one per request and user) once per batch instead of once per event.
    """

    def __init__(self, shared: Any) -> None:
        self.shared = shared
        self._read: dict[tuple[str, str | None], RequestSnapshot] = {}

    def snapshot_of(self, payload: Any) -> RequestSnapshot | Unset | None:
        """The snapshot of a batch's event, or ``UNSET`` when the event is not one that refers to a shared one."""
        if not isinstance(payload, dict):
            return UNSET
        request = payload.get("request")
        if not (isinstance(request, dict) and "ref" in request):
            return UNSET
        ref, user = request["ref"], request.get("user")
        if not (isinstance(ref, str) and (user is None or isinstance(user, str))):
            return UNSET  # read the slow way, which names what is wrong
        found = self._read.get((ref, user))
        if found is None:
            resolved = resolve_shared_request({"request": request}, self.shared)
            found = self._read[(ref, user)] = RequestSnapshot.from_dict(resolved["request"])
        return found.copy()


class _Fields:
    """Typed access to a decoded JSON object, naming the key that is wrong."""

    def __init__(self, data: Any, where: str) -> None:
        if not isinstance(data, dict):
            raise MalformedEvent(f"{where} must be a JSON object, got {type(data).__name__}")
        self.data = data
        self.where = where

    def get(self, key: str, kind: type, optional: bool = False) -> Any:
        value = self.data.get(key)
        if type(value) is kind:  # what JSON gives (a bool is not an int here): the worker reads many
            return value
        if key not in self.data:
            if optional:
                return None
            raise MalformedEvent(f"{self.where} key {key!r} is missing")
        value = self.data[key]
        if value is None and optional:
            return None
        if kind is not object and (not isinstance(value, kind) or isinstance(value, bool) != (kind is bool)):
            raise MalformedEvent(
                f"{self.where} key {key!r} must be {kind.__name__}, got {type(value).__name__}"
            )
        return value


def _header_pairs(raw: list[Any]) -> list[tuple[str, str]]:
    pairs = []
    for item in raw:
        if not (isinstance(item, list) and len(item) == 2 and all(isinstance(x, str) for x in item)):
            raise MalformedEvent("request key 'headers' must be a list of [name, value] strings")
        pairs.append((item[0], item[1]))
    return pairs

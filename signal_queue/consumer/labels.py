"""How a single-event job shows in rq-dashboard, ``rq info`` and RQ's logs: its description and meta.

A failed or retried event is an RQ job of its own (id = event id). Its description names the
request that sent the event, so an operator can tell which request failed from the list alone:

    user_logged_in -> app.audit:login: POST /login?next=/ (user 42, request 5f1c0e2a9d3b47aa00000007)

Its meta carries the same facts as fields (signal, receiver, request_id, emitted_at, attempt).

Tools that signal_queue does not control show both, and RQ's worker logs the description when
it starts the job. So both are short, and a secret never goes into either. Header values are
never used. Query parameters and path arguments whose names look secret
(``SIGNAL_QUEUE_REDACT_FIELDS``, as for kwargs) show as ``[REDACTED]``. Every part is clipped,
and characters that could be markup or a line break are escaped: rq-dashboard 0.9.0 renders a
job's description and metadata on its job page without escaping them.
"""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import Mapping
from typing import Any
from urllib.parse import parse_qsl, quote

from ..wire.codec import REDACTED, Codec, redact_path

#: The longest description written, in characters.
MAX_DESCRIPTION = 400
#: The longest text kept from one field (a user, a query value, a meta value).
MAX_PART = 80
#: The longest query string kept, once rebuilt.
MAX_QUERY = 120
#: The characters a path or query keeps as they are (the rest is percent-encoded).
_URL_SAFE = "/:@!$'()*+,;=-._~"
_METHOD = re.compile(r"[A-Z]{1,16}")


def describe_event(payload: Any, codec: Codec) -> str:
    """A failed or retried event's job description: ``signal -> receiver``, then the request, if any.

    The request's method, path and query get what room the rest leaves: the user and the request
    id, which tell the request apart, are never clipped off.
    """
    if not isinstance(payload, Mapping):
        return f"an event that is not a JSON object ({type(payload).__name__})"
    head = f"{_text(payload.get('signal'))} -> {_text(payload.get('receiver'))}"
    request = payload.get("request")
    if not isinstance(request, Mapping):
        return head
    method = request.get("method")
    method = method if isinstance(method, str) and _METHOD.fullmatch(method) else "?"
    target = shown_target(request, codec)
    who = [f"user {_text(request['user'], 40)}"] if request.get("user") is not None else []
    who.append(f"request {_text(request.get('request_id'), 64)}")
    tail = f" ({', '.join(who)})"
    room = MAX_DESCRIPTION - len(head) - len(tail) - 2  # at least 110: every part above is clipped
    return f"{head}: {_clip(f'{method} {target}', room)}{tail}"


def shown_target(request: Mapping[str, Any], codec: Codec) -> str:
    """A request snapshot's path and query as they may be shown (a job description, the CLI):
    percent-encoded, secret-named path arguments and query parameters as ``[REDACTED]``, clipped."""
    target = _path(request.get("path"), request.get("view_args"), codec)
    query = _query(request.get("query_string"), codec)
    return f"{target}?{query}" if query else target


def event_meta(payload: Any, attempt: int) -> dict[str, Any]:
    """A failed or retried event's job meta: what rq-dashboard's Metadata panel shows (JSON)."""
    data: Mapping[str, Any] = payload if isinstance(payload, Mapping) else {}
    request = data.get("request")
    request_id = request.get("request_id") if isinstance(request, Mapping) else None
    return {
        "signal": _field(data.get("signal")),
        "receiver": _field(data.get("receiver")),
        "request_id": _field(request_id),
        "emitted_at": _field(data.get("emitted_at")),
        "attempt": attempt,
    }


def emitted_at(payload: Any) -> dt.datetime | None:
    """When an event was emitted (UTC), or None if its payload does not say so readably."""
    raw = payload.get("emitted_at") if isinstance(payload, Mapping) else None
    try:
        when = dt.datetime.fromisoformat(raw) if isinstance(raw, str) else None
    except ValueError:
        return None
    if when is None or when.tzinfo is None:
        return None
    return when.astimezone(dt.timezone.utc)


def _path(path: Any, view_args: Any, codec: Codec) -> str:
    """The request path, percent-encoded, with the values of secret-named path arguments redacted."""
    if not isinstance(path, str):
        return "?"
    secrets = codec.secret_values(view_args)
    segments = [s if s == REDACTED else quote(s, safe=_URL_SAFE) for s in redact_path(path, secrets).split("/")]
    return _clip("/".join(segments), MAX_PART * 2)


def _query(query_string: Any, codec: Codec) -> str:
    """The query string rebuilt with the values of secret-named parameters redacted; clipped."""
    if not isinstance(query_string, str) or not query_string:
        return ""
    pairs = []
    for name, value in parse_qsl(query_string, keep_blank_values=True):
        shown = REDACTED if codec.secret(name) else _clip(quote(value, safe=_URL_SAFE), MAX_PART)
        pairs.append(f"{_clip(quote(name, safe=_URL_SAFE), MAX_PART)}={shown}")
    return _clip("&".join(pairs), MAX_QUERY)


def _field(value: Any) -> str | None:
    return None if value is None else _text(value, limit=200)


def _text(value: Any, limit: int = MAX_PART) -> str:
    """``value`` as one line of plain text: no control characters, no markup, clipped."""
    text = value if isinstance(value, str) else str(value)
    text = text.replace("<", "%3C").replace(">", "%3E")
    return _clip("".join(ch if ch.isprintable() else "?" for ch in text), limit)


def _clip(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"

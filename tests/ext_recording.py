"""What audit receivers of extensions' signals saw, inline and in the worker, written to Redis.

The catalogue's tests (tests/test_extension_signals.py) connect :func:`inline_audits`
for the signals of an app, whose module defers :func:`audit` on the same signals.
Both write a picture of what they were given to one Redis list, tagged with where
they ran, so a test can check that the worker's receiver saw what the inline one saw.
"""

from __future__ import annotations

import datetime as dt
import enum
import functools
import json
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import redis
import sqlalchemy
from flask import Flask, current_app, has_request_context, request

from signal_queue import current_event

SEEN = "sq:test:seen"

#: The attributes of a user an audit reads, where the user has them.
USER_ATTRS = ("id", "name", "email", "username", "active", "fs_uniquifier", "confirmed_at", "tf_primary_method")


def picture(value: Any) -> Any:
    """A JSON picture of ``value`` that is equal in the request process and in the worker."""
    if isinstance(value, Flask):
        return f"app:{value.name}"
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, enum.Enum):
        return {"enum": f"{type(value).__qualname__}.{value.name}"}
    if isinstance(value, (dt.datetime, dt.date)):
        return {type(value).__name__: value.isoformat()}
    if isinstance(value, dict):
        return {str(k): picture(v) for k, v in sorted(value.items())}
    if isinstance(value, (list, tuple, set, frozenset)):
        items = sorted(value, key=repr) if isinstance(value, (set, frozenset)) else value
        return {type(value).__name__: [picture(v) for v in items]}
    if isinstance(value, BaseException):
        return {"exception": f"{type(value).__module__}.{type(value).__qualname__}", "args": picture(value.args)}
    # __class__, not type(): a LocalProxy (Flask-Security sends current_user) reads as what it stands for.
    kind = value.__class__.__name__
    if callable(getattr(value, "get_id", None)):
        attrs = {name: picture(getattr(value, name)) for name in USER_ATTRS if hasattr(value, name)}
        return {"user": kind, "get_id": value.get_id(), "authenticated": value.is_authenticated, **attrs}
    if kind in ("Identity", "AnonymousIdentity"):
        # The needs an identity provides depend on whether receivers that add them ran first
        # (blinker does not order receivers): the catalogue's tests compare id and auth type.
        return {"identity": kind, "id": picture(value.id), "auth_type": picture(value.auth_type)}
    if kind == "Message":  # flask_mail.Message
        fields = ("subject", "sender", "recipients", "cc", "bcc", "reply_to", "body", "html", "date")
        return {"message": {name: picture(getattr(value, name)) for name in fields}}
    mapper = sqlalchemy.inspect(type(value), raiseerr=False)
    if mapper is not None:
        return {"model": kind, **{c.key: picture(getattr(value, c.key)) for c in mapper.column_attrs}}
    return {"type": kind, "repr": repr(value)}


def saw(where: str, signal: str, sender: Any, kwargs: dict[str, Any]) -> None:
    """Append what a receiver of ``signal`` was given, and where it ran, to the list in Redis."""
    entry = {
        "where": where,
        "signal": signal,
        "sender": picture(sender),
        "kwargs": {k: picture(v) for k, v in sorted(kwargs.items())},
        "path": request.path if has_request_context() else None,
    }
    redis.Redis.from_url(current_app.config["SIGNAL_QUEUE_REDIS_URL"]).rpush(SEEN, json.dumps(entry, sort_keys=True))


def audit(sender: Any, **kwargs: Any) -> None:
    """The deferred audit receiver: the apps defer it on every signal they test."""
    saw("worker", current_event.signal, sender, kwargs)


def _inline_audit(signal: str, sender: Any, **kwargs: Any) -> None:
    saw("inline", signal, sender, kwargs)


@contextmanager
def inline_audits(signals: Iterable[Any]) -> Iterator[None]:
    """Connect an inline audit receiver to each signal for the block (in the test's process only)."""
    receivers = [(signal, functools.partial(_inline_audit, signal.name)) for signal in signals]
    for signal, receiver in receivers:
        signal.connect(receiver, weak=False)
    try:
        yield
    finally:
        for signal, receiver in receivers:
            signal.disconnect(receiver)


def seen(conn: redis.Redis) -> list[dict[str, Any]]:
    return [json.loads(r) for r in conn.lrange(SEEN, 0, -1)]


def by_signal(entries: list[dict[str, Any]], where: str) -> dict[str, list[dict[str, Any]]]:
    """``where``'s entries grouped by signal, each without ``where``, in the order they were written."""
    out: dict[str, list[dict[str, Any]]] = {}
    for entry in entries:
        if entry["where"] == where:
            out.setdefault(entry["signal"], []).append({k: v for k, v in entry.items() if k != "where"})
    return out

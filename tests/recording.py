"""What deferred receivers in the test apps saw, written to Redis so a test can read it back."""

from __future__ import annotations

import json
import traceback
from typing import Any

import redis
from flask import Flask, current_app, g, has_request_context, request
from jinja2 import Template
from werkzeug.wrappers import Response

from signal_queue import current_event

RECORDS = "sq:test:records"


def describe(value: Any) -> Any:
    """A JSON picture of a value, equal in the request process and in the worker."""
    if isinstance(value, Flask):
        return f"app:{value.name}"
    if isinstance(value, BaseException):
        return {
            "exception": "".join(traceback.format_exception_only(type(value), value)),
            "args": [describe(a) for a in value.args],
        }
    if isinstance(value, Response):
        return {"status": value.status_code, "body": value.get_data(as_text=True)}
    if isinstance(value, Template):
        return f"template:{value.name}"
    if isinstance(value, dict):
        return {k: describe(v) for k, v in sorted(value.items())}
    if isinstance(value, (list, tuple, set, frozenset)):
        items = sorted(value, key=repr) if isinstance(value, (set, frozenset)) else value
        return {"type": type(value).__name__, "items": [describe(v) for v in items]}
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return {"type": type(value).__name__, "repr": repr(value)}


def record(name: str, sender: Any, **extra: Any) -> None:
    """Append what the receiver ``name`` sees to the records list."""
    entry = {
        "receiver": name,
        "signal": current_event.signal,
        "event_id": current_event.id,
        "attempt": current_event.attempt,
        "sender": describe(sender),
        "kwargs": {k: describe(v) for k, v in sorted(extra.items())},
        "app": current_app.name,
        "request": None,
        "g": {k: describe(v) for k, v in sorted(vars(g._get_current_object()).items()) if not k.startswith("_")},
    }
    if has_request_context():
        entry["request"] = {
            "method": request.method,
            "path": request.path,
            "query": request.query_string.decode(),
            "url": request.url,
            "remote_addr": request.remote_addr,
            "headers": dict(request.headers),
            "endpoint": request.endpoint,
            "request_id": current_event.request_id,
            "user": current_event.user,
        }
    url = current_app.config["SIGNAL_QUEUE_REDIS_URL"]
    redis.Redis.from_url(url).rpush(RECORDS, json.dumps(entry, sort_keys=True))


def records(conn: redis.Redis) -> list[dict[str, Any]]:
    return [json.loads(r) for r in conn.lrange(RECORDS, 0, -1)]

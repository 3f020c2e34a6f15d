"""Counters: what the bridge did, for `flask signal-queue info` and for Prometheus.

Totals across all processes live in one Redis hash, ``sq:stats``, updated
inside pipelines the bridge sends anyway (the enqueue MULTI, the worker's done
marks, the replay): counting costs no round trip. Events spooled, lost or
dropped happen while Redis is down, so they are counted first in the host's
count file next to the spool (shared by every process of the host, kept across
restarts; see :mod:`signal_queue.producer.ledger`) and added into ``sq:stats``
when Redis answers again. Each process also keeps its own counters
(``dispatcher.counters``). Everything here works while Redis is down: what only
Redis knows is then reported as unknown, and the local counts still are.
"""

from __future__ import annotations

import contextlib
import sqlite3
from dataclasses import dataclass
from typing import Any

import redis
from flask import Flask, Response, current_app

from ._state import SignalQueueState, state_for
from .producer.ledger import TOTALS as HOST_TOTALS
from .wire.keys import QUARANTINE_KEY, STATS_KEY
from .wire.redis_errors import Fault, classify

#: Redis totals, with their Prometheus help text.
TOTALS = {
    "enqueued": "Events written to RQ queues (batched jobs), by every app process",
    "replayed": "Events sent from an outage spool after Redis came back",
    "handled": "Events whose receiver returned, in workers",
    "failed": "Event attempts whose receiver raised or timed out, in workers",
    "spooled": "Events written to an outage spool, by every app process (this host's not yet in Redis included)",
    "lost": "Events lost: Redis failed and the spool could not be written, or went with a corrupt spool",
    "dropped": "Events dropped: more than SIGNAL_QUEUE_MAX_PENDING waited in memory",
}
#: This host's counts (the count file by its spool), with their help text.
HOST = {
    "spooled": "Events written to this host's outage spool, by all its processes",
    "lost": "Events this host lost: Redis failed and the spool could not be written, or a corrupt spool took them",
    "dropped": "Events this host dropped from a full outbox",
}
#: This process's counters, with their help text.
LOCAL = {
    "emitted": "Events this process's forwarding receivers took",
    "spooled": "Events this process wrote to the outage spool",
    "lost": "Events lost: Redis failed and the spool could not be written, or a corrupt spool it found took them",
    "dropped": "Events dropped: more than SIGNAL_QUEUE_MAX_PENDING waited in memory",
    "discarded": "Events of discard_if_failed receivers dropped because their request failed",
    "backpressure": "Times a request thread sent a batch because the sender lagged",
    "unsendable": "Events sent to be recorded as failed: a kwarg could not be carried (SIGNAL_QUEUE_UNSENDABLE)",
}


def totals(connection: Any) -> dict[str, int]:
    """The Redis totals (0 for counters never written)."""
    raw = connection.hgetall(STATS_KEY)
    found = {k.decode() if isinstance(k, bytes) else str(k): int(v) for k, v in raw.items()}
    return {name: found.get(name, 0) for name in TOTALS}


@dataclass
class Snapshot:
    """The counts one look can give: Redis's (None while it is unreachable) and this host's."""

    shared: dict[str, int] | None  # sq:stats, plus this host's counts Redis does not have yet
    redis_error: str | None
    refused: Fault | None  # Redis's fault, if it needs a fix (a wrong password, an ACL, TLS): not waited out
    host: dict[str, int]  # the count file: spooled, lost, dropped on this host, since it was made
    not_in_redis: dict[str, int]
    spool_batches: int | None  # None: the spool could not be read
    spool_events: int | None
    spool_error: str | None


def snapshot(state: SignalQueueState) -> Snapshot:
    """Read Redis's totals and the local ones; Redis being down, or refusing, is a result, not an error."""
    ledger = state.dispatcher.spool.ledger
    counts = ledger.read()
    host = {name: counts[name] for name in HOST_TOTALS}
    not_in_redis = {name: max(0, counts[name] - counts[f"published_{name}"]) for name in HOST_TOTALS}
    shared: dict[str, int] | None = None
    error = None
    refused = None
    try:
        shared = totals(state.connection)
    except redis.RedisError as exc:
        fault = classify(exc, state.redis.url)
        if fault is None:
            raise
        refused = fault if fault.permanent else None
        error = f"{type(exc).__name__}: {state.redis.hide(str(exc))}"
    else:
        for name, value in not_in_redis.items():
            shared[name] += value
    batches: int | None = None
    events: int | None = None
    spool_error = None
    try:
        batches, events = state.dispatcher.spool.depth()
    except (sqlite3.Error, OSError) as exc:
        spool_error = f"{type(exc).__name__}: {exc}"
    return Snapshot(shared, error, refused, host, not_in_redis, batches, events, spool_error)


def prometheus_text(app: Flask, seen: Snapshot | None = None) -> str:
    """The counters in Prometheus' text exposition format; the Redis totals only while Redis answers.

    ``seen``: a snapshot just taken (else one is taken now).
    """
    state = state_for(app)
    seen = seen or snapshot(state)
    lines = [
        "# HELP signal_queue_redis_up 1 if Redis answered this scrape, else 0 (its totals are then left out).",
        "# TYPE signal_queue_redis_up gauge",
        f"signal_queue_redis_up {0 if seen.shared is None else 1}",
        "# HELP signal_queue_redis_refused 1 if Redis refused this scrape or this process's last send for a reason "
        "waiting does not fix (a wrong password, an ACL denial, a TLS certificate not trusted); see the ERROR log.",
        "# TYPE signal_queue_redis_refused gauge",
        f"signal_queue_redis_refused {1 if seen.refused or state.dispatcher.refused else 0}",
    ]
    if seen.shared is not None:
        for name, help_text in TOTALS.items():
            metric = f"signal_queue_{name}_total"
            lines += [f"# HELP {metric} {help_text}.", f"# TYPE {metric} counter", f"{metric} {seen.shared[name]}"]
    for name, help_text in HOST.items():
        metric = f"signal_queue_host_{name}_total"
        lines += [
            f"# HELP {metric} {help_text} (the count file next to the spool).",
            f"# TYPE {metric} counter",
            f"{metric} {seen.host[name]}",
        ]
    for name, help_text in LOCAL.items():
        metric = f"signal_queue_process_{name}_total"
        lines += [
            f"# HELP {metric} {help_text} (this process).",
            f"# TYPE {metric} counter",
            f"{metric} {state.dispatcher.counters.get(name, 0)}",
        ]
    lines += [
        "# HELP signal_queue_spool_events Events waiting in this app's outage spool (NaN: it cannot be read).",
        "# TYPE signal_queue_spool_events gauge",
        f"signal_queue_spool_events {'NaN' if seen.spool_events is None else seen.spool_events}",
        "# HELP signal_queue_outbox_events Events waiting in this process's memory for the sender.",
        "# TYPE signal_queue_outbox_events gauge",
        f"signal_queue_outbox_events {state.outbox.pending}",
    ]
    if seen.shared is not None:
        with contextlib.suppress(redis.RedisError):  # Redis went away since: the gauge is left out
            quarantined = state.connection.llen(QUARANTINE_KEY)
            lines += [
                "# HELP signal_queue_quarantined_entries Queue entries no worker could load as a job (sq:quarantine).",
                "# TYPE signal_queue_quarantined_entries gauge",
                f"signal_queue_quarantined_entries {quarantined}",
            ]
    return "\n".join(lines) + "\n"


def metrics_view() -> Any:
    """A Flask view: ``app.add_url_rule("/metrics", view_func=metrics_view)``."""
    return Response(
        prometheus_text(current_app._get_current_object()),  # type: ignore[attr-defined]
        mimetype="text/plain; version=0.0.4",
    )

"""Counters: what the bridge did, for `flask signal-queue info` and for Prometheus.

Totals across all processes live in one Redis hash, ``sq:stats``, updated
inside pipelines the bridge sends anyway (the enqueue MULTI, the worker's done
marks, the replay): counting costs no round trip. Each process also keeps its
own counters (``dispatcher.counters``) for what cannot reach Redis: events
lost, dropped or spooled while it is down.
"""

from __future__ import annotations

from typing import Any

from flask import Flask, Response, current_app

from ._state import state_for
from .wire.keys import QUARANTINE_KEY, STATS_KEY

#: Redis totals, with their Prometheus help text.
TOTALS = {
    "enqueued": "Events written to RQ queues (batched jobs), by every app process",
    "replayed": "Events sent from an outage spool after Redis came back",
    "handled": "Events whose receiver returned, in workers",
    "failed": "Event attempts whose receiver raised or timed out, in workers",
}
#: This process's counters, with their help text.
LOCAL = {
    "emitted": "Events this process's forwarding receivers took",
    "spooled": "Events this process wrote to the outage spool",
    "lost": "Events lost: Redis failed and the spool could not be written",
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


def prometheus_text(app: Flask) -> str:
    """The counters in Prometheus' text exposition format."""
    state = state_for(app)
    lines: list[str] = []
    shared = totals(state.connection)
    for name, help_text in TOTALS.items():
        metric = f"signal_queue_{name}_total"
        lines += [f"# HELP {metric} {help_text}.", f"# TYPE {metric} counter", f"{metric} {shared[name]}"]
    for name, help_text in LOCAL.items():
        metric = f"signal_queue_process_{name}_total"
        lines += [
            f"# HELP {metric} {help_text} (this process).",
            f"# TYPE {metric} counter",
            f"{metric} {state.dispatcher.counters.get(name, 0)}",
        ]
    events = state.dispatcher.spool.depth()[1]
    lines += [
        "# HELP signal_queue_spool_events Events waiting in this app's outage spool.",
        "# TYPE signal_queue_spool_events gauge",
        f"signal_queue_spool_events {events}",
        "# HELP signal_queue_quarantined_entries Queue entries no worker could load as a job (sq:quarantine).",
        "# TYPE signal_queue_quarantined_entries gauge",
        f"signal_queue_quarantined_entries {state.connection.llen(QUARANTINE_KEY)}",
        "# HELP signal_queue_outbox_events Events waiting in this process's memory for the sender.",
        "# TYPE signal_queue_outbox_events gauge",
        f"signal_queue_outbox_events {state.outbox.pending}",
    ]
    return "\n".join(lines) + "\n"


def metrics_view() -> Any:
    """A Flask view: ``app.add_url_rule("/metrics", view_func=metrics_view)``."""
    return Response(
        prometheus_text(current_app._get_current_object()),  # type: ignore[attr-defined]
        mimetype="text/plain; version=0.0.4",
    )

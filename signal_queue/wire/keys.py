"""The names signal_queue writes into Redis: job functions, keys and fields.

They are part of the wire format: jobs already queued name these, so a new
release keeps them (the job functions still read ``signal_queue.jobs.run_event(s)``,
the names of the first layout) and workers of one release read what apps of
another wrote.
"""

from __future__ import annotations

from collections.abc import Iterable

#: The job function of one event (a retry, or a requeued failure): RQ's retries apply to it.
RUN_EVENT = "signal_queue.jobs.run_event"
#: The job function of a batch of events.
RUN_EVENTS = "signal_queue.jobs.run_events"

#: The field of a job hash that counts how often a worker started the job.
ATTEMPT_FIELD = "sq_attempts"

#: Counters shared by every process, in one hash (see :mod:`signal_queue.metrics`).
STATS_KEY = "sq:stats"

#: Marks a batch job as enqueued, so a replay of the spool skips a batch whose reply was lost.
SENT_KEY = "sq:sent:{0}"
SENT_TTL = 7 * 24 * 3600

#: The indexes of a batch's finished events, so a rerun of the batch skips them.
DONE_KEY = "sq:done:{0}"
DONE_TTL = 7 * 24 * 3600

#: A key that only a loss of Redis's data removes: set once (no TTL) by the first app or worker
#: that finds it missing, with a random token as its value. Each side remembers the token with
#: Redis's run id; a different token (or none) after a reconnect means the queue went with it.
MARKER_KEY = "sq:marker"

#: A worker's own key (``<host>:<pid>``) that it writes, with a short expiry, to learn that
#: Redis takes writes again: PING is answered by a full or read-only Redis too.
PROBE_KEY = "sq:probe:{0}"
PROBE_TTL_MS = 10_000

#: Times RQ runs a batch job again after it raised or its worker died (finished events are skipped).
BATCH_RETRIES = 5

#: Seconds a batch job gets beyond its events' own timeouts, for spinning failures off.
BATCH_TIMEOUT_MARGIN = 60


def batch_timeout(event_timeouts: Iterable[int]) -> int:
    """A batch job's timeout: each event has its own alarm; the job's covers them all plus bookkeeping."""
    return sum(event_timeouts) + BATCH_TIMEOUT_MARGIN

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
#: Per count file next to a spool (its random id): the totals of it already added into STATS_KEY.
STATS_FROM_KEY = "sq:stats:from:{0}"
#: Kept this long after the last time its host added counts (seconds).
STATS_FROM_TTL = 400 * 24 * 3600

#: Marks a batch job as enqueued, so a replay of the spool skips a batch whose reply was lost.
#: Written in the transaction that enqueues the batch. The app deletes it once it knows the batch
#: is in no spool: with its next send after the reply came, or when the batch's spool row is gone.
SENT_KEY = "sq:sent:{0}"
#: Only markers whose reply was lost (their batch waits in a spool) or whose process died before
#: deleting them live this long: longer than any outage a spool is meant to bridge.
SENT_TTL = 7 * 24 * 3600

#: The field of a batch job's hash that lists its finished events (",0,1,2"), so a rerun of the
#: batch skips them. A field, not a key: the marks last exactly as long as the job can run again.
DONE_FIELD = "sq_done"
#: Where 0.1.0 kept the marks (a set with a TTL): still read, so that a batch an
#: earlier worker began is not run twice by a worker of this release.
DONE_KEY = "sq:done:{0}"

#: A key that only a loss of Redis's data removes: set once (no TTL) by the first app or worker
#: that finds it missing, with a random token as its value. Each side remembers the token with
#: Redis's run id; a different token (or none) after a reconnect means the queue went with it.
MARKER_KEY = "sq:marker"

#: A worker's own key (``<host>:<pid>``) that it writes, with a short expiry, to learn that
#: Redis takes writes again: PING is answered by a full or read-only Redis too.
PROBE_KEY = "sq:probe:{0}"
PROBE_TTL_MS = 10_000

#: Jobs taken off queue ``<name>`` by a worker and not started yet: job id -> the time (Unix seconds) it
#: was taken. A job left there longer than SIGNAL_QUEUE_ABANDONED_AFTER goes back to its queue.
TAKEN_KEY = "sq:taken:{0}"

#: The last job a worker process took: its queue key, a newline, the job id. A take whose reply
#: was lost hands the same job again instead of another one.
TAKER_KEY = "sq:taker:{0}"

#: Where an idle worker of one queue moves the job it waited for (a blocking move, as RQ's into
#: the intermediate list), until its next take claims it: queue name, then the worker process.
HOLD_KEY = "sq:hold:{0}:{1}"
#: The worker processes that waited on queue ``<name>``, with when they last did, so that the
#: clean-up finds a hold list whose worker died.
HOLDERS_KEY = "sq:holders:{0}"

#: Queue entries that cannot be a job (no job hash, a key of another type, not a job id):
#: one JSON object per entry, newest first (see :mod:`signal_queue.consumer.quarantine`).
QUARANTINE_KEY = "sq:quarantine"
#: The most entries the quarantine list keeps (the oldest go first).
QUARANTINE_MAX = 10_000

#: Times RQ runs a batch job again after it raised or its worker died (finished events are skipped).
BATCH_RETRIES = 5

#: Seconds a batch job gets beyond its events' own timeouts, for spinning failures off.
BATCH_TIMEOUT_MARGIN = 60


def batch_timeout(event_timeouts: Iterable[int]) -> int:
    """A batch job's timeout: each event has its own alarm; the job's covers them all plus bookkeeping."""
    return sum(event_timeouts) + BATCH_TIMEOUT_MARGIN

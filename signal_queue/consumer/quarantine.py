"""Queue entries that cannot be a job, kept with the reason instead of vanishing.

A queue list holds job ids; the job itself is the hash ``rq:job:<id>``. An id
whose hash is gone (deleted, expired, never written), a key of another type, or
an entry that is not an RQ job id at all cannot be run, failed or retried: RQ
drops such an entry without a trace. A signal_queue worker moves it to the list
:data:`~signal_queue.wire.keys.QUARANTINE_KEY` instead, one JSON line each, newest
first, with the queue, the reason and the time; ``flask signal-queue failed``
lists them with the failed events and ``purge --failed`` deletes them.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
from collections.abc import Iterable
from typing import Any

import redis

from ..wire.keys import QUARANTINE_KEY, QUARANTINE_MAX

logger = logging.getLogger("signal_queue.worker")

# KEYS: the intermediate list the entry was taken into, the queue's taken set, the quarantine list.
# ARGV: the entry as it is in the list, the JSON line, the most lines kept.
# Only the taker that still holds the entry moves it, so it is quarantined once.
_QUARANTINE = """
if redis.call('LREM', KEYS[1], 1, ARGV[1]) == 1 then
  redis.call('ZREM', KEYS[2], ARGV[1])
  redis.call('LPUSH', KEYS[3], ARGV[2])
  redis.call('LTRIM', KEYS[3], 0, tonumber(ARGV[3]) - 1)
  return 1
end
return 0
"""


def entry_text(entry: bytes) -> str:
    """A queue entry as text for people: UTF-8 when it is, else with its bad bytes escaped."""
    return entry.decode("utf-8", "backslashreplace")


def quarantine(
    connection: redis.Redis, intermediate_key: str, taken_key: str, queue: str, entry: bytes, reason: str
) -> bool:
    """Move ``entry`` (taken from ``queue`` into ``intermediate_key``) to the quarantine list; log it."""
    line = json.dumps(
        {
            "job_id": entry_text(entry),
            "queue": queue,
            "reason": reason,
            "at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        }
    )
    moved = bool(
        connection.eval(_QUARANTINE, 3, intermediate_key, taken_key, QUARANTINE_KEY, entry, line, QUARANTINE_MAX)
    )
    if moved:
        logger.error(
            "signal_queue: entry %r of queue %s is not a job that can run (%s); it is in the quarantine list %s "
            "(flask signal-queue failed shows it)", entry_text(entry), queue, reason, QUARANTINE_KEY,
        )
    return moved


def quarantined(connection: redis.Redis) -> list[dict[str, Any]]:
    """The quarantined entries, newest first: job_id, queue, reason and at (ISO time)."""
    rows = []
    for raw in connection.lrange(QUARANTINE_KEY, 0, -1):
        try:
            row = json.loads(raw)
        except ValueError:
            row = None
        if not isinstance(row, dict):
            row = {"job_id": None, "queue": None, "reason": f"unreadable quarantine line {raw[:80]!r}", "at": None}
        rows.append(row)
    return rows


def purge_quarantined(connection: redis.Redis, queue_names: Iterable[str]) -> int:
    """Delete the quarantined entries of ``queue_names`` (and unreadable lines); how many went."""
    names = set(queue_names)
    gone = 0
    for raw in connection.lrange(QUARANTINE_KEY, 0, -1):
        try:
            row = json.loads(raw)
        except ValueError:
            row = None
        if not isinstance(row, dict) or row.get("queue") in names:
            gone += int(connection.lrem(QUARANTINE_KEY, 1, raw))  # type: ignore[arg-type]
    return gone

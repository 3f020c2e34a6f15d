"""Whether Redis still holds what it held: its run id and the marker key, as both sides read them.

A Redis without persistence that restarts comes back empty, and every queued
job is gone without an error anywhere: clients just reconnect. The app and the
worker each remember Redis's ``run_id`` (new at every start) and the value of
:data:`~.keys.MARKER_KEY` (a random token only a loss of data removes) from
their last look, and compare after a reconnect. A new run id with the marker
intact is a restart with persistence: nothing lost. A marker gone is a loss,
and :func:`data_loss` says which.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import Any

import redis

from .keys import MARKER_KEY

#: What to do about a restart that lost the queue.
PERSISTENCE_ADVICE = "configure persistence (appendonly yes) so that a restart keeps the queue"
#: What to do about data gone from a Redis that did not restart.
KEEP_DATA_ADVICE = "use maxmemory-policy noeviction and never FLUSHALL/FLUSHDB the queue's Redis"


@dataclass(frozen=True)
class RedisIdentity:
    """Redis's run id (None where an ACL refuses INFO) and the marker's value, read together."""

    run_id: str | None
    marker: str


def read_identity(connection: redis.Redis) -> RedisIdentity:
    """One round trip: INFO's run id, and the marker (set first if missing). Raises Redis errors."""
    token = f"{os.urandom(8).hex()} {time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())}"
    with connection.pipeline(transaction=False) as pipe:
        pipe.info("server")
        pipe.set(MARKER_KEY, token, nx=True)
        pipe.get(MARKER_KEY)
        info, created, marker = pipe.execute(raise_on_error=False)
    if isinstance(marker, Exception):
        raise marker
    if marker is None:  # missing, and it could not be set (a full or read-only Redis)
        raise created if isinstance(created, Exception) else redis.ResponseError(f"{MARKER_KEY} could not be set")
    run_id: Any = None
    if isinstance(info, dict):
        run_id = info.get("run_id")
    elif not isinstance(info, redis.exceptions.NoPermissionError):
        raise info
    return RedisIdentity(str(run_id) if run_id else None, marker.decode() if isinstance(marker, bytes) else str(marker))


def data_loss(before: RedisIdentity | None, now: RedisIdentity) -> tuple[str, str] | None:
    """Why Redis no longer holds what it held when ``before`` was read, with the fix; None if it does."""
    if before is None or before.marker == now.marker:
        return None
    if before.run_id is None or now.run_id is None:
        return (
            f"Redis lost its data: marker {MARKER_KEY} gone (run id unknown: INFO is not permitted); "
            "it restarted without persistence or was emptied",
            f"{PERSISTENCE_ADVICE}; {KEEP_DATA_ADVICE}",
        )
    if before.run_id != now.run_id:
        return (
            f"Redis restarted without its data: run id {before.run_id} -> {now.run_id} and marker {MARKER_KEY} gone",
            PERSISTENCE_ADVICE,
        )
    return (
        f"Redis lost its data without restarting (run id {now.run_id}, marker {MARKER_KEY} gone): "
        "the database was emptied or keys were evicted",
        KEEP_DATA_ADVICE,
    )


def restarted_with_data(before: RedisIdentity | None, now: RedisIdentity) -> bool:
    """True if Redis restarted (a new run id) and kept its data (the same marker)."""
    return (
        before is not None and before.marker == now.marker
        and before.run_id is not None and now.run_id is not None and before.run_id != now.run_id
    )

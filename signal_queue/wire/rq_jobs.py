"""RQ's job storage, written directly: a batch job stored as RQ's own enqueue stores it, at a tenth of the cost.

``Queue.enqueue_many`` builds a ``Job`` object per job and turns it into hash fields
(``Job.to_dict``), and RQ's JSON serializer uses the standard library's encoder and
zlib's default level: for the app's batch jobs this was the sender's largest cost after
the request snapshots (profiled: ~8 us per event of RQ and ~3 us of JSON). This module
writes the keys RQ writes when it enqueues a job with the JSON serializer and a
``Retry`` (the ``rq:queues`` set, the ``rq:job:<id>`` hash, the ``rq:queue:<name>`` list),
with the same hash fields and values: RQ (``Job.fetch``, ``Queue.count``, ``Queue.jobs``,
its registries and its worker), ``rq info`` and rq-dashboard read the jobs as their own.
``tests/test_rq_jobs.py`` compares the hash with the one RQ writes for the same job and
reads the jobs back through RQ's public API.

It is the one module that knows RQ's storage format, as ``consumer/rq_compat.py`` is the
one that uses RQ's private code. :data:`MIRRORED` holds digests of the RQ code whose
output it reproduces; an RQ release that changes that code fails the test until this
module has been read against it.
"""

from __future__ import annotations

import datetime as dt
import json
import zlib
from collections.abc import Sequence
from typing import Any

import orjson
from rq.job import Job, JobStatus
from rq.queue import Queue

#: Where RQ keeps a job's hash, a queue's list of job ids, and the set of every queue's key.
JOB_KEY = Job.redis_job_namespace_prefix + "{0}"
QUEUE_KEY = Queue.redis_queue_namespace_prefix + "{0}"
QUEUES_KEY = Queue.redis_queues_keys

#: zlib's fastest level: the data field is read with ``zlib.decompress`` whatever the level; level 1
#: takes a third of the default level's time for a few percent more bytes (see docs/architecture.md).
COMPRESSION_LEVEL = 1

#: How RQ writes times in a job hash (``rq.utils.utcformat``).
TIME_FORMAT = "%Y-%m-%dT%H:%M:%S.%fZ"

#: The RQ code whose output this module reproduces, with the first 16 hex digits of the SHA-256
#: of its source as checked (rq 3.0.0), compared with the installed RQ by tests/test_rq_jobs.py.
MIRRORED = {
    "rq.queue.Queue.enqueue_many": "4ae661d624a6619b",  # SADD rq:queues, then each job
    "rq.queue.Queue._enqueue_async_job": "3c3efebb37300756",  # status, save, cleanup, push
    "rq.queue.Queue._prepare_for_queue": "cd8e2a0821239b02",  # origin, enqueued_at, status
    "rq.queue.Queue._persist_job": "2e7cc7271d3636b9",
    "rq.queue.Queue.push_job_id": "da2f59b7ff9acf0c",  # RPUSH
    "rq.job.Job.create": "dcdde04c5a0562de",  # a Retry's max and intervals
    "rq.job.Job.to_dict": "9e1a56a9cd4b57e5",  # the hash fields
    "rq.job.Job.data.fget": "7b6b6e3c008b4eb5",  # (function, instance, args, kwargs)
    "rq.job.Job.cleanup": "16734aeb1eeab579",  # nothing for a job without a ttl
    "rq.serializers.JSONSerializer.dumps": "bb04c87a16ace76d",
    "rq.utils.utcformat": "c29988f57cd73de7",
}


def rq_time(when: dt.datetime | None = None) -> str:
    """``when`` (default: now) as RQ writes a time into a job hash."""
    return (when or dt.datetime.now(dt.timezone.utc)).strftime(TIME_FORMAT)


def json_bytes(value: Any) -> bytes:
    """``value`` as JSON text (UTF-8), as ``json.loads`` reads it back.

    Encoded by orjson (compact) when it can; the standard library's encoder takes
    what orjson refuses (an integer past 64 bits, a key that is not a string).
    """
    try:
        return orjson.dumps(value)
    except TypeError:  # orjson.JSONEncodeError is one
        return json.dumps(value).encode("utf-8")


def job_data(function: str, args: bytes) -> bytes:
    """The ``data`` field of a job calling ``function(*args)``: its JSON call tuple, compressed.

    What RQ's JSON serializer makes of ``(function, None, args, {})``, with ``args``
    given as JSON text (:func:`json_bytes` of the list): a batch's events are encoded
    one by one as they are formatted, so none waits as a dict for the others.
    """
    return zlib.compress(b"[" + json_bytes(function) + b",null," + args + b",{}]", COMPRESSION_LEVEL)


def job_hash(
    data: bytes,
    *,
    origin: str,
    description: str,
    timeout: int,
    result_ttl: int,
    failure_ttl: int,
    retries: int,
    now: str,
) -> dict[str, bytes | str | int]:
    """The fields RQ writes for a job enqueued on ``origin`` with ``Retry(max=retries)``, in its order,
    but for the 8 it writes empty ("": callbacks, worker, start and end times, group).

    RQ reads a missing field as an empty one (rq 3.0 ``Job.restore`` reads each with ``obj.get``,
    mirrored in :mod:`signal_queue.consumer.rq_compat`) and writes them when the job starts. In
    Redis's hashtable encoding a field costs ~70 bytes: ~560 bytes less per waiting job.

    ``now`` (see :func:`rq_time`) is both its creation and its enqueue time.
    """
    return {
        "created_at": now,
        "data": data,
        "retries_left": retries,
        "retry_intervals": "[0]",
        "origin": origin,
        "description": description,
        "enqueued_at": now,
        "timeout": timeout,
        "result_ttl": result_ttl,
        "failure_ttl": failure_ttl,
        "status": JobStatus.QUEUED.value,
    }


#: Writes batch jobs as ``Queue.enqueue_many`` writes them (per queue: ``SADD rq:queues``, each
#: job's hash, one ``RPUSH`` of their ids, in order), with the caller's bookkeeping, in one atomic
#: step and one command (a MULTI/EXEC pipeline of the same commands costs the app about twice the
#: CPU: redis-py packs and parses each command). Each job's marker key is set to 1 for ARGV[1]
#: seconds, the keys after the jobs' are deleted, and ARGV[3] is added to field ARGV[2] of KEYS[2].
#: The first command writes: a Redis that refuses writes (full, read-only) refuses the script
#: before anything is written. Returns how many jobs were already waiting in the busiest queue.
#: KEYS: rq:queues, the counts' hash, then per queue its key and per job its hash's key and its
#: marker's key, then the keys to delete. ARGV: marker TTL, counts field, increment, number of
#: queues, then per queue its number of jobs and per job its id, number of fields, fields.
ENQUEUE_SCRIPT = """
local k, a, waiting = 3, 5, 0
for _ = 1, tonumber(ARGV[4]) do
    local queue = KEYS[k]
    redis.call('SADD', KEYS[1], queue)
    local jobs = tonumber(ARGV[a])
    local ids = {}
    k, a = k + 1, a + 1
    for j = 1, jobs do
        local fields = tonumber(ARGV[a + 1]) * 2
        ids[j] = ARGV[a]
        redis.call('HSET', KEYS[k], unpack(ARGV, a + 2, a + 1 + fields))
        redis.call('SET', KEYS[k + 1], 1, 'EX', ARGV[1])
        k, a = k + 2, a + 2 + fields
    end
    waiting = math.max(waiting, redis.call('RPUSH', queue, unpack(ids)) - jobs)
end
for i = k, #KEYS, 1000 do
    redis.call('DEL', unpack(KEYS, i, math.min(i + 999, #KEYS)))
end
redis.call('HINCRBY', KEYS[2], ARGV[2], ARGV[3])
return waiting
"""


def enqueue_call(
    queues: dict[str, list[tuple[str, dict[str, bytes | str | int]]]],
    *,
    marker: str,
    marker_ttl: int,
    counts: str,
    field: str,
    increment: int,
    delete: Sequence[str] = (),
) -> tuple[list[str], list[bytes | str | int]]:
    """KEYS and ARGV of :data:`ENQUEUE_SCRIPT` for ``queues`` (queue name: jobs as (job id, :func:`job_hash`)).

    ``marker`` is the format of a job's marker key (``{0}``: the job id).
    """
    keys: list[str] = [QUEUES_KEY, counts]
    args: list[bytes | str | int] = [marker_ttl, field, increment, len(queues)]
    for queue, jobs in queues.items():
        keys.append(QUEUE_KEY.format(queue))
        args.append(len(jobs))
        for job_id, fields in jobs:
            keys += (JOB_KEY.format(job_id), marker.format(job_id))
            args += (job_id, len(fields))
            for item in fields.items():
                args += item
    keys += delete
    return keys, args

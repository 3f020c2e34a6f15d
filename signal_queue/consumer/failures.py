"""Failed events: find them in RQ's failed registries and send them back; and the quarantined entries."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

import redis
from rq import Queue
from rq.exceptions import NoSuchJobError
from rq.job import Job
from rq.serializers import JSONSerializer

from ..wire.codec import Codec
from ..wire.keys import RUN_EVENT, RUN_EVENTS
from .job import SignalJob, worker_settings
from .labels import shown_target
from .quarantine import quarantined
from .run import Consumer


def signal_queues(connection: redis.Redis, names: Iterable[str]) -> list[Queue]:
    """The RQ queues ``names`` as a worker reads them: JSON, and jobs loaded through :class:`SignalJob`."""
    return [Queue(name, connection=connection, serializer=JSONSerializer, job_class=SignalJob) for name in names]


def receivers_of(job: Job) -> set[str]:
    """The receiver names a job's events are for ('' for data that is not an event)."""
    try:
        args: Any = job.args
    except Exception:
        return {""}
    if job.func_name == RUN_EVENT and args and isinstance(args[0], dict):
        return {str(args[0].get("receiver", ""))}
    if job.func_name == RUN_EVENTS and args and isinstance(args[0], list):
        return {str(e.get("receiver", "")) for e in args[0] if isinstance(e, dict)}
    return {""}


def iter_failed(
    connection: redis.Redis,
    queue_names: Iterable[str],
    *,
    receiver: str | None = None,
    ids: set[str] | None = None,
) -> Iterator[tuple[Queue, Job]]:
    """The failed jobs of ``queue_names`` (with their queue), filtered by receiver and id."""
    for queue in signal_queues(connection, queue_names):
        for job_id in queue.failed_job_registry.get_job_ids():
            if ids and job_id not in ids:
                continue
            try:
                job = SignalJob.fetch(job_id, connection=connection, serializer=JSONSerializer)
            except NoSuchJobError:
                continue
            if receiver and receiver not in receivers_of(job):
                continue
            yield queue, job


def failed_events(
    connection: redis.Redis, queue_names: Iterable[str], codec: Codec, receiver: str | None = None
) -> list[dict[str, Any]]:
    """One row per failed job: its event's signal, receiver, request path, user, request id and error.

    The path is shown as a job description shows it: secret-named path arguments and query
    parameters (``codec``'s redaction) as ``[REDACTED]``.
    """
    rows: list[dict[str, Any]] = []
    for queue, job in iter_failed(connection, queue_names, receiver=receiver):
        result = job.latest_result()
        error = (result.exc_string or "") if result is not None else ""
        event: dict[str, Any] = {}
        try:
            if job.func_name == RUN_EVENT and isinstance(job.args[0], dict):
                event = job.args[0]
        except Exception:
            event = {}
        raw_request = event.get("request")
        request: dict[str, Any] = raw_request if isinstance(raw_request, dict) else {}
        rows.append(
            {
                "job_id": job.id,
                "queue": queue.name,
                "events": 1 if job.func_name == RUN_EVENT else len(receivers_of(job)),
                "signal": event.get("signal"),
                "receiver": event.get("receiver") or ", ".join(sorted(receivers_of(job) - {""})) or None,
                "path": shown_target(request, codec) if "path" in request else None,
                "user": request.get("user"),
                "request_id": request.get("request_id"),
                "emitted_at": event.get("emitted_at"),
                "ended_at": job.ended_at.isoformat() if job.ended_at else None,
                "error": error.strip().splitlines()[-1] if error.strip() else "",
                "quarantined": False,
            }
        )
    return rows


def requeue(queue: Queue, job: Job, consumer: Consumer) -> None:
    """Send a failed job back to its queue with RQ's ``FailedJobRegistry.requeue`` (same id and history),
    with the timeout and TTLs this worker gives it: a job refused because a setting was lowered since
    it was enqueued runs after the requeue."""
    settings = worker_settings(job, consumer)
    if settings:
        job.connection.hset(job.key, mapping={name: str(value) for name, value in settings.items()})
    queue.failed_job_registry.requeue(job.id)


def quarantined_entries(connection: redis.Redis, queue_names: Iterable[str]) -> list[dict[str, Any]]:
    """The quarantined entries of ``queue_names`` (not jobs: nothing to requeue), as rows like
    :func:`failed_events`' with ``quarantined`` true and the reason as the error."""
    names = set(queue_names)
    return [
        {
            "job_id": entry.get("job_id"),
            "queue": entry.get("queue"),
            "events": 0,
            "signal": None,
            "receiver": None,
            "path": None,
            "user": None,
            "request_id": None,
            "emitted_at": None,
            "ended_at": entry.get("at"),
            "error": entry.get("reason") or "",
            "quarantined": True,
        }
        for entry in quarantined(connection)
        if entry.get("queue") in names or entry.get("queue") is None
    ]

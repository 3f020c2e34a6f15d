"""Failed events: find them in RQ's failed registries and send them back."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING, Any

from rq import Queue
from rq.exceptions import NoSuchJobError
from rq.job import Job
from rq.serializers import JSONSerializer

from .jobs import RUN_EVENT, RUN_EVENTS, SignalJob

if TYPE_CHECKING:
    from .extension import SignalQueueState


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
    state: SignalQueueState,
    queue_names: Iterable[str],
    *,
    receiver: str | None = None,
    ids: set[str] | None = None,
) -> Iterator[tuple[Queue, Job]]:
    """The failed jobs of ``queue_names`` (with their queue), filtered by receiver and id."""
    for name in queue_names:
        queue = state.dispatcher.queue(name)
        for job_id in queue.failed_job_registry.get_job_ids():
            if ids and job_id not in ids:
                continue
            try:
                job = SignalJob.fetch(job_id, connection=state.connection, serializer=JSONSerializer)
            except NoSuchJobError:
                continue
            if receiver and receiver not in receivers_of(job):
                continue
            yield queue, job


def requeue_failed(
    state: SignalQueueState,
    queue_names: Iterable[str],
    *,
    receiver: str | None = None,
    ids: set[str] | None = None,
    progress: Callable[[int], None] | None = None,
) -> list[str]:
    """Requeue failed jobs of ``queue_names`` matching the filters; return their ids.

    Uses RQ's ``FailedJobRegistry.requeue``, so the job keeps its id and history.
    """
    requeued = []
    for queue, job in iter_failed(state, queue_names, receiver=receiver, ids=ids):
        queue.failed_job_registry.requeue(job.id)
        requeued.append(job.id)
        if progress is not None:
            progress(len(requeued))
    return requeued


def failed_events(
    state: SignalQueueState, queue_names: Iterable[str], receiver: str | None = None
) -> list[dict[str, Any]]:
    """One row per failed job: its event's signal, receiver, request path, user, request id and error."""
    rows: list[dict[str, Any]] = []
    for queue, job in iter_failed(state, queue_names, receiver=receiver):
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
                "path": request.get("path"),
                "user": request.get("user"),
                "request_id": request.get("request_id"),
                "emitted_at": event.get("emitted_at"),
                "ended_at": job.ended_at.isoformat() if job.ended_at else None,
                "error": error.strip().splitlines()[-1] if error.strip() else "",
            }
        )
    return rows

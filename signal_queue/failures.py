"""Failed events: find them in RQ's failed registries and send them back."""

from __future__ import annotations

from collections.abc import Iterable
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


def requeue_failed(
    state: SignalQueueState, queue_names: Iterable[str], *, receiver: str | None = None, ids: set[str] | None = None
) -> list[str]:
    """Requeue failed jobs of ``queue_names`` matching the filters; return their ids.

    Uses RQ's ``FailedJobRegistry.requeue``, so the job keeps its id and history.
    """
    requeued = []
    for name in queue_names:
        queue = Queue(name, connection=state.connection, serializer=JSONSerializer, job_class=SignalJob)
        registry = queue.failed_job_registry
        for job_id in registry.get_job_ids():
            if ids and job_id not in ids:
                continue
            try:
                job = SignalJob.fetch(job_id, connection=state.connection, serializer=JSONSerializer)
            except NoSuchJobError:
                continue
            if receiver and receiver not in receivers_of(job):
                continue
            registry.requeue(job_id)
            requeued.append(job_id)
    return requeued

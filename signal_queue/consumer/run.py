"""Running events in the worker: the job functions RQ calls, and what they do per event.

RQ calls :func:`run_events` (a batch) or :func:`run_event` (one event) with the
job's arguments and nothing else, so the worker binds a :class:`Consumer`, the
app's settings for running events, before it starts (:func:`bind`). Eager mode
and the testing helpers call :func:`execute_event` with a consumer directly.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import datetime as dt
import inspect
import logging
import signal
import threading
import time
import traceback
from collections.abc import Callable, Coroutine, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import redis
from flask import Flask
from rq import Queue, Retry
from rq.job import Job, JobStatus, get_current_job
from rq.serializers import JSONSerializer
from rq.timeouts import JobTimeoutException

from ..exceptions import EventRejected, MalformedEvent, ReceiverSignatureMismatch
from ..wire.codec import Codec
from ..wire.event import Event, resolve_shared_request
from ..wire.keys import ATTEMPT_FIELD, DONE_KEY, DONE_TTL, RUN_EVENT, RUN_EVENTS, STATS_KEY
from ..wire.receivers import DeferredReceiver, receivers
from .context import handling, rebuilt_context
from .rq_compat import record_failure_result

logger = logging.getLogger("signal_queue")


@dataclass
class Consumer:
    """An app's worker side: what running its events needs, handed over by the Flask glue."""

    app: Flask
    codec: Codec
    default_queue: str
    default_timeout: int
    default_retry: Retry | None
    result_ttl: int
    failure_ttl: int
    #: Sends the events the handlers emitted; called before a job counts as done.
    send_emitted: Callable[[], object] = lambda: None
    #: Modules to import so their receivers register (``SIGNAL_QUEUE_IMPORTS``).
    imports: Sequence[str] = field(default_factory=tuple)
    #: The worker's Redis and its recovery timings.
    redis_url: str = ""
    abandoned_after: int = 30
    maintenance_interval: int = 15
    #: ``SIGNAL_QUEUE_QUEUES``: the queues in the order workers take from them (priority first).
    queue_order: Sequence[str] = field(default_factory=tuple)

    def queue_names(self) -> list[str]:
        """The queues in the order a worker takes from them: ``SIGNAL_QUEUE_QUEUES`` as given, then
        the default queue and every other queue a registered receiver names, if the list left them
        out (alphabetically), so that no receiver's events wait for a worker that never comes."""
        listed = list(dict.fromkeys(self.queue_order))
        others = [name for name in (self.default_queue, *sorted(receivers.queues())) if name not in listed]
        return [*listed, *dict.fromkeys(others)]

    def unlisted_queues(self) -> list[str]:
        """Queues in use that ``SIGNAL_QUEUE_QUEUES`` (when it is set) does not name."""
        return [name for name in self.queue_names() if self.queue_order and name not in self.queue_order]

    def timeout_of(self, receiver: DeferredReceiver | None) -> int:
        return (receiver.timeout if receiver is not None else None) or self.default_timeout


_bound: Consumer | None = None


def bind(consumer: Consumer | None) -> None:
    """Set the consumer whose app jobs run in, in this worker process."""
    global _bound
    _bound = consumer


def bound() -> Consumer | None:
    """The consumer bound in this process, if any."""
    return _bound


def _bound_or_fail() -> Consumer:
    if _bound is None:
        raise EventRejected(
            "this process has no Flask app bound; start workers with `python worker.py --app ...` "
            "or `flask signal-queue worker`"
        )
    return _bound


def _attempt(job: Job | None) -> int:
    """1 for a job's first run, 2 for the next... (counted by the worker's job class)."""
    return int(getattr(job, "attempt", 1))


def run_event(payload: Any) -> None:
    """Job function for one event (a retry, or a requeued failure): RQ's retries apply to it."""
    consumer = _bound_or_fail()
    job = get_current_job()
    attempt = _attempt(job)
    started = time.perf_counter()
    try:
        execute_event(consumer, payload, attempt)
    except Exception as exc:
        _log_event(payload, attempt, started, "failed", exc)
        _count(job, "failed")
        raise
    else:
        _log_event(payload, attempt, started, "handled", None)
        _count(job, "handled")
    finally:
        consumer.send_emitted()


def _count(job: Job | None, outcome: str) -> None:
    if job is not None:
        # RQ's own bookkeeping of this job reports Redis being away, if it is.
        with contextlib.suppress(redis.RedisError):
            job.connection.hincrby(STATS_KEY, outcome, 1)


def run_events(payloads: Any, requests: Any = None) -> None:
    """Job function for a batch: run each event once, in order; spin failures off as their own jobs.

    Each finished event is marked in ``sq:done:<job id>`` (in pipelines, every
    few events), so a rerun of the batch after a crashed worker skips what was
    done; an event that fails becomes a single-event job that RQ retries with
    the receiver's ``Retry`` or records in the failed registry, so it never
    makes the rest of the batch run again.
    """
    consumer = _bound_or_fail()
    job = get_current_job()
    if job is None:
        raise EventRejected("run_events runs only as an RQ job")
    if not isinstance(payloads, list):
        raise MalformedEvent(f"a batch job's argument must be a list of events, got {type(payloads).__name__}")
    attempt = _attempt(job)
    marks = _DoneMarks(job, attempt)
    for index, payload in enumerate(payloads):
        if index in marks.done:
            continue
        receiver = None
        started = time.perf_counter()
        try:
            payload = resolve_shared_request(payload, requests)
            event, receiver = resolve_event(payload, attempt)
            with event_timeout(consumer.timeout_of(receiver)):
                run_resolved(consumer, event, receiver)
        except EventRejected as exc:  # retrying cannot help: straight to the failed registry
            _log_event(payload, attempt, started, "rejected", exc)
            marks.failed += 1
            record_failed_event(consumer, job, payload, receiver, attempt, _exc_text(exc), retryable=False)
        except Exception as exc:
            _log_event(payload, attempt, started, "failed", exc)
            marks.failed += 1
            record_failed_event(consumer, job, payload, receiver, attempt, _exc_text(exc), retryable=True)
        else:
            _log_event(payload, attempt, started, "handled", None)
            marks.handled += 1
        marks.add(index)
    consumer.send_emitted()
    marks.flush()


#: The job functions a worker runs, by the name stored in Redis (see :mod:`signal_queue.wire.keys`).
JOB_FUNCTIONS: dict[str, Callable[..., None]] = {RUN_EVENT: run_event, RUN_EVENTS: run_events}


def execute_event(consumer: Consumer, payload: Any, attempt: int = 1) -> None:
    """Validate ``payload``, rebuild the emit's contexts and call the registered receiver."""
    event, receiver = resolve_event(payload, attempt)
    run_resolved(consumer, event, receiver)


def resolve_event(payload: Any, attempt: int) -> tuple[Event, DeferredReceiver]:
    """The event in ``payload`` and its registered receiver, or :class:`EventRejected`."""
    event = Event.from_dict(payload).with_attempt(attempt)
    return event, receivers.get(event.receiver, event.signal)


def run_resolved(consumer: Consumer, event: Event, receiver: DeferredReceiver) -> None:
    codec = consumer.codec
    with rebuilt_context(consumer.app, event, codec):
        try:
            sender = codec.decode_sender(event.sender)
            kwargs = {key: codec.decode(value) for key, value in event.kwargs.items()}
        except (KeyError, TypeError, ValueError) as exc:
            raise MalformedEvent(f"event {event.id}: cannot decode its arguments: {exc!r}") from exc
        try:
            inspect.signature(receiver.func).bind(sender, **kwargs)
        except TypeError as exc:
            raise ReceiverSignatureMismatch(
                f"receiver {receiver.name!r} no longer accepts this event's arguments "
                f"(sender, {', '.join(sorted(kwargs)) or 'no kwargs'}): {exc}; fix the receiver "
                "and requeue the job"
            ) from None
        with handling(event):
            result = receiver.func(sender, **kwargs)
            if inspect.iscoroutine(result):
                _run_coroutine(result)


def _run_coroutine(coro: Coroutine[Any, Any, Any]) -> Any:
    """Run an async receiver to completion, also when a loop already runs here (eager mode)."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(coro)
    outcome: dict[str, Any] = {}
    ctx = contextvars.copy_context()

    def target() -> None:
        try:
            outcome["value"] = ctx.run(asyncio.run, coro)
        except BaseException as exc:
            outcome["error"] = exc

    thread = threading.Thread(target=target, name="signal_queue-eager-async")
    thread.start()
    thread.join()
    if "error" in outcome:
        raise outcome["error"]
    return outcome.get("value")


events_logger = logging.getLogger("signal_queue.events")


def _log_event(payload: Any, attempt: int, started: float, outcome: str, exc: BaseException | None) -> None:
    """One structured line per event run: id, signal, receiver, attempt, duration, outcome."""
    if not events_logger.isEnabledFor(logging.INFO):
        return
    data = payload if isinstance(payload, dict) else {}
    fields = {
        "event_id": data.get("id"),
        "signal": data.get("signal"),
        "receiver": data.get("receiver"),
        "attempt": attempt,
        "duration_ms": round((time.perf_counter() - started) * 1000, 3),
        "outcome": outcome,
    }
    if exc is not None:
        fields["error"] = f"{type(exc).__name__}: {exc}"
    events_logger.info(
        " ".join(f"{k}={v}" for k, v in fields.items()), extra={"signal_queue": fields}
    )


def _exc_text(exc: BaseException) -> str:
    return "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))


@contextmanager
def event_timeout(seconds: int) -> Iterator[None]:
    """End one event's handler after ``seconds`` with :class:`JobTimeoutException`.

    Nests inside RQ's own alarm for the batch job: the outer timer is paused
    and given back, less the time spent, afterwards. Works in the main thread
    only (where RQ's SimpleWorker runs jobs); elsewhere (eager mode) it is a no-op.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def expire(signum: int, frame: Any) -> None:
        raise JobTimeoutException(f"Task exceeded maximum timeout value ({seconds} seconds)")

    started = time.monotonic()
    outer_handler = signal.signal(signal.SIGALRM, expire)
    outer_left, _ = signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, outer_handler)
        if outer_left > 0:
            signal.setitimer(signal.ITIMER_REAL, max(outer_left - (time.monotonic() - started), 0.001))


class _DoneMarks:
    """Which events of a batch job have finished, kept in Redis so a rerun skips them."""

    FLUSH_EVERY = 20

    def __init__(self, job: Job | None, attempt: int) -> None:
        self.job = job
        self.key = DONE_KEY.format(job.id) if job is not None else None
        self.done: set[int] = set()
        self.handled = 0
        self.failed = 0
        self._unsaved: list[int] = []
        if job is not None and self.key is not None and attempt > 1:
            self.done = {int(i) for i in job.connection.smembers(self.key)}

    def add(self, index: int) -> None:
        self._unsaved.append(index)
        if len(self._unsaved) >= self.FLUSH_EVERY:
            self.flush()

    def flush(self) -> None:
        """Save the marks; while Redis is away, wait for it rather than forget them.

        A forgotten mark would make a rerun of the batch run finished events
        again; the job's own timeout still bounds the wait.
        """
        if not self._unsaved or self.job is None or self.key is None:
            return
        delay = 0.1
        while True:
            try:
                with self.job.connection.pipeline(transaction=False) as pipe:
                    pipe.sadd(self.key, *self._unsaved)
                    pipe.expire(self.key, DONE_TTL)
                    if self.handled:
                        pipe.hincrby(STATS_KEY, "handled", self.handled)
                    if self.failed:
                        pipe.hincrby(STATS_KEY, "failed", self.failed)
                    pipe.execute()
                self.handled = self.failed = 0
                break
            except (redis.ConnectionError, redis.TimeoutError) as exc:
                logger.warning("signal_queue: cannot save done marks of job %s (%s); retrying", self.job.id, exc)
                time.sleep(delay)
                delay = min(delay * 2, 5.0)
        self._unsaved.clear()


def record_failed_event(
    consumer: Consumer,
    job: Job,
    payload: Any,
    receiver: DeferredReceiver | None,
    attempt: int,
    exc_string: str,
    *,
    retryable: bool,
) -> None:
    """Give one failed event of a batch to RQ as its own job (id = event id).

    With retries left (the receiver's ``Retry``, else ``SIGNAL_QUEUE_RETRY``) it
    is enqueued, or scheduled after the backoff interval, and RQ retries it from
    there; otherwise, or if the worker rejected it, it goes to RQ's failed
    registry with the error, where ``rq requeue`` or our ``requeue`` find it.
    """
    retry = (receiver.retry or consumer.default_retry) if retryable and receiver is not None else None
    event_id = payload.get("id") if isinstance(payload, dict) and isinstance(payload.get("id"), str) else None
    queue = Queue(job.origin, connection=job.connection, serializer=JSONSerializer, job_class=type(job))
    retries_left = 0 if retry is None else retry.max - (attempt - 1)
    next_retry = None
    if retries_left > 1:
        next_retry = Retry(max=retries_left - 1, interval=list(retry.intervals[attempt:]) or 0)  # type: ignore[union-attr]
    new = queue.create_job(
        RUN_EVENT,
        args=(payload,),
        job_id=event_id,
        timeout=consumer.timeout_of(receiver),
        result_ttl=consumer.result_ttl,
        failure_ttl=consumer.failure_ttl,
        retry=next_retry,
        description=job.description if receiver is None else f"{receiver.signal_name} -> {receiver.name}",
        status=JobStatus.QUEUED if retries_left > 0 else JobStatus.FAILED,
    )
    with job.connection.pipeline() as pipe:
        if retries_left > 0:
            assert retry is not None
            interval = Retry.get_interval(attempt - 1, retry.intervals)
            if interval > 0:
                when = dt.datetime.now(dt.timezone.utc) + dt.timedelta(seconds=interval)
                queue.schedule_job(new, when, pipeline=pipe)
            else:
                queue.enqueue_job(new, pipeline=pipe)
        else:
            queue.failed_job_registry.add(new, ttl=consumer.failure_ttl, exc_string=exc_string, pipeline=pipe)
            record_failure_result(new, consumer.failure_ttl, exc_string, pipe)
        pipe.hset(new.key, ATTEMPT_FIELD, attempt)
        pipe.execute()
    logger.warning(
        "signal_queue: event %s (%s) failed on attempt %d; %s",
        event_id,
        receiver.name if receiver else "rejected",
        attempt,
        "retrying" if retries_left > 0 else "recorded in the failed registry",
    )

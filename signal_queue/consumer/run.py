"""Running events in the worker: the job functions RQ calls, and what they do per event.

RQ calls :func:`run_events` (a batch) or :func:`run_event` (one event) with the
job's arguments and nothing else, so the worker binds a :class:`Consumer`, the
app's settings for running events, before it starts (:func:`bind`). Eager mode
and the testing helpers call :func:`execute_event` with a consumer directly.

The job functions keep the books (done marks, counters, failures spun off as
their own jobs, events handed back by a stopping worker); an :class:`EventRunner`
runs the handlers and reports one :class:`Outcome` per event. The default
worker binds one that runs them in a supervised child process
(:mod:`.handler_process`); RQ's forking worker runs them here, in its work horse
(:class:`InProcess`).
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import datetime as dt
import functools
import inspect
import json
import logging
import signal
import threading
import time
import traceback
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import redis
from flask import Flask
from rq import Queue, Retry
from rq.job import Job, JobStatus, get_current_job
from rq.serializers import JSONSerializer
from rq.timeouts import JobTimeoutException

from ..exceptions import EventRejected, MalformedEvent, ReceiverSignatureMismatch, UnknownReceiver
from ..wire.codec import Codec
from ..wire.event import UNSET, Event, SharedRequests, new_id, resolve_shared_request
from ..wire.keys import (
    ATTEMPT_FIELD,
    BATCH_RETRIES,
    DONE_FIELD,
    DONE_KEY,
    RUN_EVENT,
    RUN_EVENTS,
    STATS_KEY,
    batch_timeout,
)
from ..wire.receivers import DeferredReceiver, muted, receivers
from ..wire.redis_connect import RedisSource
from ..wire.redis_errors import retry_while_transient
from .context import Environs, handling, rebuilt_context
from .labels import describe_event, emitted_at, event_meta
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
    #: Sends the events the handlers emitted; called before an event counts as done.
    send_emitted: Callable[[], object] = lambda: None
    #: Makes the app's emit side usable in a process forked from this one (the handler process).
    after_fork: Callable[[], object] = lambda: None
    #: Modules to import so their receivers register (``SIGNAL_QUEUE_IMPORTS``).
    imports: Sequence[str] = field(default_factory=tuple)
    #: Where the worker's Redis clients come from (``SIGNAL_QUEUE_REDIS_CLIENT``, else the URL),
    #: and its recovery timings.
    redis: RedisSource = field(default_factory=RedisSource)
    abandoned_after: int = 30
    maintenance_interval: int = 15
    #: Seconds a stopping worker lets the running event finish (``SIGNAL_QUEUE_SHUTDOWN_GRACE``).
    shutdown_grace: float = 7.0
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
        """Seconds an event of ``receiver`` may run (its ``timeout``, else ``SIGNAL_QUEUE_JOB_TIMEOUT``)."""
        return (receiver.timeout if receiver is not None else None) or self.default_timeout


#: How an event's run ended (the ``outcome`` of its log line).
HANDLED = "handled"
FAILED = "failed"  # the handler raised (its own timeout too): retried with its receiver's retries
REJECTED = "rejected"  # the worker will not run it (EventRejected): straight to the failed registry
CRASHED = "crashed"  # the process running the handler died (a segfault, os._exit): retried
TIMED_OUT = "timeout"  # it ran past its timeout and the process running it was killed: retried


@dataclass(frozen=True)
class Failure:
    """Why an event did not succeed: the exception's type, message and the text RQ records."""

    module: str
    qualname: str
    message: str
    #: The formatted traceback (or, for a crash, what the supervisor saw), as RQ's exc_string.
    text: str

    @classmethod
    def of(cls, exc: BaseException) -> Failure:
        kind = type(exc)
        try:
            message = str(exc)
        except Exception:
            message = f"<{kind.__name__} whose str() failed>"
        return cls(kind.__module__, kind.__qualname__, message, _exc_text(exc))

    @property
    def summary(self) -> str:
        """``Type: message``, as the event's log line shows it."""
        return f"{self.qualname.rsplit('.', 1)[-1]}: {self.message}"


@dataclass(frozen=True)
class Outcome:
    """What became of one event of a job (``index`` into the job's events)."""

    index: int
    kind: str
    seconds: float
    #: ``time.monotonic()`` when the handler returned (the next event starts then).
    finished_at: float = 0.0
    failure: Failure | None = None
    #: The exception itself, when it was raised in this process (re-raised for RQ by :func:`run_event`).
    exception: BaseException | None = field(default=None, compare=False)


@dataclass(frozen=True)
class Unfinished:
    """The events a stopping worker did not run, to go back to the queue (see :func:`hand_back`)."""

    items: list[tuple[int, Any]]
    #: True if the first of them had started and was stopped part-way (it runs again, as a new attempt).
    cut: bool


class EventRunner(Protocol):
    """Runs a job's events and reports each one's :class:`Outcome` to ``settle``, in order.

    Returns the events left unrun because the worker is stopping, or None when
    every event was reported.
    """

    def run(
        self,
        consumer: Consumer,
        attempt: int,
        items: Sequence[tuple[int, Any]],
        requests: Any,
        settle: Callable[[Outcome], None],
    ) -> Unfinished | None: ...


class EventsHere:
    """Runs the events of one job in this process, one after the other, each under its own timeout.

    What the events of a job share is worked out once per job: each request
    snapshot is read once, and the WSGI environ of each request built once
    (see :func:`~.context.rebuilt_context`); the SIGALRM handler that ends an
    event at its timeout is installed once. Each event still gets its own app
    context, request context, ``g`` and snapshot. Use it as a context manager
    (it holds SIGALRM meanwhile) around :meth:`run`.
    """

    def __init__(self, consumer: Consumer, requests: Any, attempt: int) -> None:
        self.consumer = consumer
        self.attempt = attempt
        self._shared = SharedRequests(requests)
        self._environs: Environs = {}
        self._alarm = EventAlarm()

    def __enter__(self) -> EventsHere:
        self._alarm.__enter__()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._alarm.__exit__()

    def run(self, index: int, payload: Any) -> Outcome:
        """Run event ``index`` (``payload``, as the job carries it): its handler, in rebuilt contexts."""
        started = time.perf_counter()
        kind = HANDLED
        error: BaseException | None = None
        try:
            request = self._shared.snapshot_of(payload)
            data = resolve_shared_request(payload, self._shared.shared) if request is UNSET else payload
            event = Event.from_dict(data, self.attempt, request)
            receiver = receivers.get(event.receiver, event.signal)
            self._alarm.arm(self.consumer.timeout_of(receiver))
            try:
                run_resolved(self.consumer, event, receiver, self._environs)
            finally:
                self._alarm.disarm()
        except EventRejected as exc:  # retrying cannot help
            kind, error = REJECTED, exc
        except Exception as exc:
            kind, error = FAILED, exc
        seconds = time.perf_counter() - started
        if error is None:
            return Outcome(index, kind, seconds, time.monotonic())
        return Outcome(index, kind, seconds, time.monotonic(), Failure.of(error), error)


def run_here(consumer: Consumer, index: int, payload: Any, requests: Any, attempt: int) -> Outcome:
    """Run one event in this process: its handler, in rebuilt contexts, under its own timeout."""
    with EventsHere(consumer, requests, attempt) as here:
        return here.run(index, payload)


class InProcess:
    """Runs events in this process, one after the other: RQ's forking worker's work horse does this."""

    def run(
        self,
        consumer: Consumer,
        attempt: int,
        items: Sequence[tuple[int, Any]],
        requests: Any,
        settle: Callable[[Outcome], None],
    ) -> Unfinished | None:
        with EventsHere(consumer, requests, attempt) as here:
            for index, payload in items:
                outcome = here.run(index, payload)
                # What the handler sent reaches Redis before its event counts as done.
                consumer.send_emitted()
                settle(outcome)
        return None


_bound: Consumer | None = None
_runner: EventRunner = InProcess()


def bind(consumer: Consumer | None) -> None:
    """Set the consumer whose app jobs run in, in this worker process."""
    global _bound
    _bound = consumer


def bound() -> Consumer | None:
    """The consumer bound in this process, if any."""
    return _bound


def use_runner(runner: EventRunner | None) -> None:
    """Run the handlers of this process's jobs with ``runner`` (None: in this process)."""
    global _runner
    _runner = runner if runner is not None else InProcess()


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


class HandlerTraceback(Exception):
    """The traceback of a handler that raised in the handler process: the cause of what RQ records."""


def run_event(payload: Any) -> None:
    """Job function for one event (a retry, or a requeued failure): RQ's retries apply to it."""
    consumer = _bound_or_fail()
    job = get_current_job()
    attempt = _attempt(job)
    outcomes: list[Outcome] = []
    left = _runner.run(consumer, attempt, [(0, payload)], None, outcomes.append)
    if left is not None and job is not None:
        hand_back(consumer, job, attempt, left, None)
        return
    [outcome] = outcomes
    _log_event(payload, attempt, outcome)
    _count(job, "handled" if outcome.kind == HANDLED else "failed")
    if outcome.kind != HANDLED and job is not None:
        _label(consumer, job, payload, attempt)
    if outcome.exception is not None:
        raise outcome.exception
    if outcome.failure is not None:
        # Raised in the handler process: RQ records a stand-in of the same type and message,
        # caused by the handler's own traceback.
        failure = outcome.failure
        raise consumer.codec.decode_exception(
            {"module": failure.module, "qualname": failure.qualname, "args": None, "message": failure.message,
             "traceback": failure.text, "notes": [], "format_only": ""}
        ) from HandlerTraceback(failure.text)


def _label(consumer: Consumer, job: Job, payload: Any, attempt: int) -> None:
    """Name the request in a failing single-event job's description and meta, with this attempt.

    RQ saves the description with the rest of the job when it records the failure or the
    retry; the meta, which RQ's failure path leaves as it was, is written here (one write, on
    failure only). A job requeued by another tool, or by an earlier release, gets them too.
    """
    job.description = describe_event(payload, consumer.codec)
    job.meta = event_meta(payload, attempt)
    with contextlib.suppress(redis.RedisError):  # RQ's own bookkeeping of the failure reports Redis away
        job.connection.hset(job.key, "meta", _json_meta(job.meta))


def _json_meta(meta: dict[str, Any]) -> bytes:
    """A job's meta as RQ's JSON serializer writes it (our jobs' serializer; never pickle)."""
    return json.dumps(meta).encode("utf-8")


def _count(job: Job | None, outcome: str) -> None:
    if job is not None:
        # RQ's own bookkeeping of this job reports Redis being away, if it is.
        with contextlib.suppress(redis.RedisError):
            job.connection.hincrby(STATS_KEY, outcome, 1)


def run_events(payloads: Any, requests: Any = None) -> None:
    """Job function for a batch: run each event once, in order; spin failures off as their own jobs.

    Each finished event is marked in the job's hash (field ``sq_done``, in
    pipelines, every few events), so a rerun of the batch after a crashed
    worker skips what was done; an event that fails becomes a single-event job
    that RQ retries with the receiver's ``Retry`` or records in the failed
    registry, so it never makes the rest of the batch run again. Events a stopping worker did not
    run go back to the front of the queue as a new batch job (:func:`hand_back`).
    """
    consumer = _bound_or_fail()
    job = get_current_job()
    if job is None:
        raise EventRejected("run_events runs only as an RQ job")
    if not isinstance(payloads, list):
        raise MalformedEvent(f"a batch job's argument must be a list of events, got {type(payloads).__name__}")
    attempt = _attempt(job)
    marks = _DoneMarks(job, attempt)
    items = [(index, payload) for index, payload in enumerate(payloads) if index not in marks.done]
    tally = _Tally(time.perf_counter())

    def settle(outcome: Outcome) -> None:
        payload = payloads[outcome.index]
        # A handled event's line is at DEBUG (the job's line, at INFO, counts it); a failure's at WARNING.
        _log_event(payload, attempt, outcome, logging.DEBUG)
        if outcome.kind == HANDLED:
            tally.handled += 1
            marks.add(outcome.index)
        else:
            tally.failed += 1
            assert outcome.failure is not None
            marks.note(outcome.index, handled=False)
            record_failed_event(
                consumer, job, with_request(payload, requests), receiver_of(payload), attempt,
                outcome.failure.text, retryable=outcome.kind != REJECTED, marks=marks, ran=wall_times(outcome),
            )

    try:
        left = _runner.run(consumer, attempt, items, requests, settle)
        if left is not None:
            hand_back(consumer, job, attempt, left, requests, marks)
            tally.handed_back = len(left.items)
    except BaseException:
        marks.save_once()  # what finished is not run again by a rerun, if Redis takes it
        raise
    marks.flush()
    _log_job(job, attempt, len(payloads) - len(items), items, tally)


@dataclass
class _Tally:
    """What became of a batch job's events, for its log line."""

    started: float
    handled: int = 0
    failed: int = 0
    handed_back: int = 0


def receiver_of(payload: Any) -> DeferredReceiver | None:
    """The registered receiver an event names, or None."""
    if not isinstance(payload, dict):
        return None
    try:
        return receivers.get(str(payload.get("receiver")), str(payload.get("signal")))
    except UnknownReceiver:
        return None


def with_request(payload: Any, requests: Any) -> Any:
    """A batch's event with its request snapshot in place (as its own job carries it), if it can be."""
    try:
        return resolve_shared_request(payload, requests)
    except MalformedEvent:
        return payload


def hand_back(
    consumer: Consumer, job: Job, attempt: int, left: Unfinished, requests: Any, marks: _DoneMarks | None = None
) -> str:
    """Put the events a stopping worker did not run back at the front of the job's queue.

    They go as a new batch job (with the request snapshots they refer to), not
    as this job again: RQ finishes this job as usual, and the handover and this
    job's done marks for those events are written in one transaction, so an
    event is in exactly one of the two jobs whatever happens next. The new job
    counts as started ``attempt`` times if its first event was cut part-way,
    else ``attempt - 1``: events that never started keep their attempt number.
    """
    events = [payload for _, payload in left.items]
    refs = {
        p["request"]["ref"]
        for p in events
        if isinstance(p, dict) and isinstance(p.get("request"), dict) and "ref" in p["request"]
    }
    shared = {k: v for k, v in requests.items() if k in refs} if isinstance(requests, dict) else {}
    found = [receiver_of(p) for p in events]
    names = sorted({f"{r.signal_name} -> {r.name}" for r in found if r is not None})
    queue = Queue(job.origin, connection=job.connection, serializer=JSONSerializer, job_class=type(job))
    new = queue.create_job(
        RUN_EVENTS,
        args=(events, shared),
        job_id=f"sqb{new_id()}",
        timeout=batch_timeout(consumer.timeout_of(r) for r in found),
        result_ttl=consumer.result_ttl,
        failure_ttl=consumer.failure_ttl,
        retry=Retry(max=BATCH_RETRIES),
        description=f"{len(events)} event(s): {', '.join(names) or 'unknown receivers'} "
        f"(the rest of job {job.id}, handed back by a stopping worker)",
        status=JobStatus.QUEUED,
    )
    started = attempt if left.cut else attempt - 1
    with job.connection.pipeline() as pipe:
        queue.enqueue_job(new, pipeline=pipe, at_front=True)
        if started:
            pipe.hset(new.key, ATTEMPT_FIELD, started)
        if marks is not None:
            for index, _ in left.items:
                marks.note(index, handled=None)
            marks.save_into(pipe)
        pipe.execute()
    if marks is not None:
        marks.saved()
    logger.warning(
        "signal_queue: stopping; %d event(s) of job %s not run here are back at the front of queue %s as job %s",
        len(events), job.id, queue.name, new.id,
    )
    return new.id


def first_run_items(func_name: str | None, args: Any) -> tuple[list[tuple[int, Any]], Any] | None:
    """The events (with their indexes) and request snapshots that :func:`run_events` or :func:`run_event`
    hand their runner on a job's first attempt, from the job's function and arguments; None if
    they would refuse them."""
    if func_name == RUN_EVENTS and isinstance(args, (list, tuple)) and 1 <= len(args) <= 2:
        payloads = args[0]
        if isinstance(payloads, list):
            return list(enumerate(payloads)), args[1] if len(args) == 2 else None
    if func_name == RUN_EVENT and isinstance(args, (list, tuple)) and len(args) == 1:
        return [(0, args[0])], None
    return None


#: The job functions a worker runs, by the name stored in Redis (see :mod:`signal_queue.wire.keys`).
JOB_FUNCTIONS: dict[str, Callable[..., None]] = {RUN_EVENT: run_event, RUN_EVENTS: run_events}


def execute_event(consumer: Consumer, payload: Any, attempt: int = 1) -> None:
    """Validate ``payload``, rebuild the emit's contexts and call the registered receiver."""
    event, receiver = resolve_event(payload, attempt)
    run_resolved(consumer, event, receiver)


def resolve_event(payload: Any, attempt: int) -> tuple[Event, DeferredReceiver]:
    """The event in ``payload`` and its registered receiver, or :class:`EventRejected`."""
    event = Event.from_dict(payload, attempt)
    return event, receivers.get(event.receiver, event.signal)


def run_resolved(
    consumer: Consumer, event: Event, receiver: DeferredReceiver, environs: Environs | None = None
) -> None:
    codec = consumer.codec
    with rebuilt_context(consumer.app, event, codec, environs):
        try:
            # Decoding runs the app's code (user_loader, register_type decoders): what it sends is
            # not the receiver's own emit, so it is not deferred again (a loader would loop).
            with muted():
                sender = codec.decode_sender(event.sender)
                kwargs = {key: codec.decode(value) for key, value in event.kwargs.items()}
        except (KeyError, TypeError, ValueError) as exc:
            raise MalformedEvent(f"event {event.id}: cannot decode its arguments: {type(exc).__name__}: {exc}") from exc
        _check_signature(receiver, kwargs)
        with handling(event):
            result = receiver.func(sender, **kwargs)
            if inspect.iscoroutine(result):
                _run_coroutine(result)


@functools.lru_cache(maxsize=1024)
def _signature(func: Callable[..., Any]) -> inspect.Signature:
    """A receiver's signature, worked out once: inspect.signature costs more than a trivial handler."""
    return inspect.signature(func)


#: (receiver function, kwarg names) that bind: whether a call binds depends on the names only.
_binds: set[tuple[Callable[..., Any], frozenset[str]]] = set()


def _check_signature(receiver: DeferredReceiver, kwargs: dict[str, Any]) -> None:
    """Raise :class:`ReceiverSignatureMismatch` unless ``receiver(sender, **kwargs)`` binds."""
    key = (receiver.func, frozenset(kwargs))
    if key in _binds:
        return
    try:
        _signature(receiver.func).bind(None, **kwargs)
    except TypeError as exc:
        raise ReceiverSignatureMismatch(
            f"receiver {receiver.name!r} no longer accepts this event's arguments "
            f"(sender, {', '.join(sorted(kwargs)) or 'no kwargs'}): {exc}; fix the receiver "
            "and requeue the job"
        ) from None
    if len(_binds) >= 4096:
        _binds.clear()
    _binds.add(key)


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


def _log_event(payload: Any, attempt: int, outcome: Outcome, handled_level: int = logging.INFO) -> None:
    """One structured line per event run: id, signal, receiver, attempt, duration, outcome.

    At ``handled_level`` when the event was handled (INFO for a single-event job,
    DEBUG for a batch's events, which the batch's own INFO line counts), at WARNING
    when it failed or was rejected. The record is made here and handed to the
    logger's handlers as ``Logger.log`` would, without its look up the stack for the
    caller (this function, always).
    """
    level = handled_level if outcome.kind == HANDLED else logging.WARNING
    if not events_logger.isEnabledFor(level):
        return
    data = payload if isinstance(payload, dict) else {}
    fields = {
        "event_id": data.get("id"),
        "signal": data.get("signal"),
        "receiver": data.get("receiver"),
        "attempt": attempt,
        "duration_ms": round(outcome.seconds * 1000, 3),
        "outcome": outcome.kind,
    }
    message = (
        f"event_id={fields['event_id']} signal={fields['signal']} receiver={fields['receiver']} "
        f"attempt={attempt} duration_ms={fields['duration_ms']} outcome={outcome.kind}"
    )
    if outcome.failure is not None:
        fields["error"] = outcome.failure.summary
        message += f" error={fields['error']}"
    events_logger.handle(events_logger.makeRecord(
        events_logger.name, level, __file__, _LOG_LINE, message, (), None, "_log_event",
        {"signal_queue": fields},
    ))


#: The line _log_event's records name (Logger.info would find it on the stack).
_LOG_LINE = _log_event.__code__.co_firstlineno


def _log_job(job: Job, attempt: int, skipped: int, items: Sequence[tuple[int, Any]], tally: _Tally) -> None:
    """One structured INFO line per batch job: its id, queue, attempt, what became of its events, and
    the receivers that ran them (``signal->receiver(count)``), in the ``signal_queue`` record attribute too.

    ``skipped`` events were done by an earlier run of the job (its done marks).
    """
    if not events_logger.isEnabledFor(logging.INFO):
        return
    names: dict[tuple[str, str], int] = {}
    for _, payload in items:
        data = payload if isinstance(payload, dict) else {}
        key = (str(data.get("signal")), str(data.get("receiver")))  # what Redis held: maybe not text
        names[key] = names.get(key, 0) + 1
    fields = {
        "job_id": job.id,
        "queue": job.origin,
        "attempt": attempt,
        "events": len(items),
        "handled": tally.handled,
        "failed": tally.failed,
        "handed_back": tally.handed_back,
        "skipped": skipped,
        "duration_ms": round((time.perf_counter() - tally.started) * 1000, 3),
        "receivers": ",".join(f"{signal}->{receiver}({count})" for (signal, receiver), count in names.items()),
    }
    message = " ".join(f"{key}={value}" for key, value in fields.items()
                       if value or key in ("events", "handled", "failed"))
    events_logger.handle(events_logger.makeRecord(
        events_logger.name, logging.INFO, __file__, _JOB_LOG_LINE, message, (), None, "_log_job",
        {"signal_queue": fields},
    ))


_JOB_LOG_LINE = _log_job.__code__.co_firstlineno


def wall_times(outcome: Outcome) -> tuple[dt.datetime, dt.datetime]:
    """When an event's handler started and ended (UTC), from its duration and monotonic end."""
    now = dt.datetime.now(dt.timezone.utc)
    late = time.monotonic() - outcome.finished_at if outcome.finished_at else 0.0
    ended = now - dt.timedelta(seconds=max(late, 0.0))
    return ended - dt.timedelta(seconds=max(outcome.seconds, 0.0)), ended


def _exc_text(exc: BaseException) -> str:
    return "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))


class EventAlarm:
    """Ends each event of a job at its timeout with :class:`JobTimeoutException` (SIGALRM).

    Setting a timer is a system call, which costs more than a trivial handler,
    so the timer is not set and cleared around every event: :meth:`arm` notes
    the running event's deadline, and the timer is set only when none is
    pending or the one pending would fire after that deadline. A timer that
    fires before the running event's deadline (it was set for an earlier
    event) is set again for the rest; one that fires between events does
    nothing. The signal handler is installed once per job. It nests inside
    RQ's own alarm for the job (in a work horse): the outer timer is paused
    meanwhile and given back, less the time spent, at the end. It works in the
    main thread only (where RQ's workers run jobs); elsewhere (eager mode) it
    does nothing.
    """

    #: A timer this close to the deadline counts as at it (timers and clocks differ by a little).
    TOLERANCE = 0.001

    def __init__(self) -> None:
        self._active = False
        self._seconds = 0
        self._deadline: float | None = None  # of the running event (time.monotonic())
        self._fires_at: float | None = None  # when the timer set will fire, if one is
        self._outer_handler: Any = None
        self._outer_left = 0.0
        self._started = 0.0

    def __enter__(self) -> EventAlarm:
        if threading.current_thread() is threading.main_thread():
            self._started = time.monotonic()
            self._outer_handler = signal.signal(signal.SIGALRM, self._expire)
            self._outer_left, _ = signal.setitimer(signal.ITIMER_REAL, 0)
            self._active = True
        return self

    def __exit__(self, *exc_info: object) -> None:
        if not self._active:
            return
        self._active = False
        self._deadline = self._fires_at = None
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, self._outer_handler)
        if self._outer_left > 0:
            signal.setitimer(signal.ITIMER_REAL, max(self._outer_left - (time.monotonic() - self._started), 0.001))

    def arm(self, seconds: int) -> None:
        """End what runs from now with :class:`JobTimeoutException` after ``seconds`` (until :meth:`disarm`)."""
        if not self._active:
            return
        self._seconds = seconds
        deadline = self._deadline = time.monotonic() + seconds
        if self._fires_at is None or self._fires_at > deadline:
            self._set(deadline)

    def disarm(self) -> None:
        """The event ended: a timer that fires from now on does nothing (it stays set, for the next event)."""
        self._deadline = None

    def _set(self, at: float) -> None:
        self._fires_at = at
        signal.setitimer(signal.ITIMER_REAL, max(at - time.monotonic(), self.TOLERANCE))

    def _expire(self, signum: int, frame: Any) -> None:
        self._fires_at = None
        deadline = self._deadline
        if deadline is None:  # between events
            return
        if deadline - time.monotonic() > self.TOLERANCE:  # set for an earlier event
            self._set(deadline)
            return
        raise JobTimeoutException(f"Task exceeded maximum timeout value ({self._seconds} seconds)")


#: Appends done marks (",3,4") to the field ARGV[1] of the job hash KEYS[1], if the hash still exists:
#: a job deleted meanwhile (RQ's clean-up, a purge) must not come back as a hash holding only marks.
_ADD_MARKS = """
if redis.call('EXISTS', KEYS[1]) == 1 then
  redis.call('HSET', KEYS[1], ARGV[1], (redis.call('HGET', KEYS[1], ARGV[1]) or '') .. ARGV[2])
end
return 1
"""


def parse_marks(value: bytes | str | None) -> set[int]:
    """The event indexes in a job's ``sq_done`` field (",0,1,2"); what is not a number is ignored."""
    text = value.decode("ascii", "replace") if isinstance(value, bytes) else value or ""
    return {int(part) for part in text.split(",") if part.isdigit()}


class _DoneMarks:
    """Which events of a batch job have finished, kept in the job's hash so a rerun skips them.

    A field of the hash (:data:`DONE_FIELD`), not a key of its own: the marks
    exist as long as the job can run again, and go with it (at once when RQ
    deletes a finished job, ``SIGNAL_QUEUE_RESULT_TTL`` 0), with no TTL to
    guess. Saved in one pipeline every :attr:`FLUSH_EVERY` events, or sooner once
    :attr:`FLUSH_AFTER` seconds passed since the last save (so slow events are
    marked one by one), with the ``handled`` and ``failed`` counters.
    """

    FLUSH_EVERY = 20
    FLUSH_AFTER = 0.05

    def __init__(self, job: Job | None, attempt: int) -> None:
        self.job = job
        self.key = job.key if job is not None else None
        self.done: set[int] = set()
        self.handled = 0
        self.failed = 0
        self._unsaved: list[int] = []
        self._saved_at = time.monotonic()
        if job is not None and attempt > 1:
            with job.connection.pipeline(transaction=False) as pipe:
                pipe.hget(job.key, DONE_FIELD)
                pipe.smembers(DONE_KEY.format(job.id))  # a batch a worker of 0.1.0 began
                field, legacy = pipe.execute()
            self.done = parse_marks(field) | {int(i) for i in legacy if i.isdigit()}

    def add(self, index: int) -> None:
        """Event ``index`` was handled: count it, and save the marks when it is time."""
        self.note(index, handled=True)
        if len(self._unsaved) >= self.FLUSH_EVERY or time.monotonic() - self._saved_at >= self.FLUSH_AFTER:
            self.flush()

    def note(self, index: int, handled: bool | None) -> None:
        """Note event ``index`` as done without saving (``handled`` True or False counts it; None: handed back).

        A failed or handed-back event's mark is saved in the transaction that gives it to its new job.
        """
        self._unsaved.append(index)
        if handled is True:
            self.handled += 1
        elif handled is False:
            self.failed += 1

    def save_into(self, pipe: Any) -> None:
        """Add the unsaved marks and counts to ``pipe``; call :meth:`saved` once it ran."""
        if self.key is None:
            return
        if self._unsaved:
            pipe.eval(_ADD_MARKS, 1, self.key, DONE_FIELD, "".join(f",{i}" for i in self._unsaved))
        if self.handled:
            pipe.hincrby(STATS_KEY, "handled", self.handled)
        if self.failed:
            pipe.hincrby(STATS_KEY, "failed", self.failed)

    def saved(self) -> None:
        self._unsaved.clear()
        self.handled = self.failed = 0
        self._saved_at = time.monotonic()

    def flush(self) -> None:
        """Save the marks; while Redis is away, wait for it rather than forget them.

        A forgotten mark would make a rerun of the batch run finished events
        again; the job's own timeout still bounds the wait.
        """
        if not (self._unsaved or self.handled or self.failed) or self.job is None:
            return
        # Full, read-only, loading, busy or away: Redis takes the marks later.
        retry_while_transient(lambda: self.save_once(quiet=False), f"save the done marks of job {self.job.id}", logger)

    def save_once(self, quiet: bool = True) -> None:
        """One try at saving the marks (``quiet``: a Redis error is ignored, as on the way out of a failed job)."""
        if not (self._unsaved or self.handled or self.failed) or self.job is None:
            return
        try:
            with self.job.connection.pipeline(transaction=False) as pipe:
                self.save_into(pipe)
                pipe.execute()
        except redis.RedisError:
            if not quiet:
                raise
            return
        self.saved()


def record_failed_event(
    consumer: Consumer,
    job: Job,
    payload: Any,
    receiver: DeferredReceiver | None,
    attempt: int,
    exc_string: str,
    *,
    retryable: bool,
    marks: _DoneMarks | None = None,
    ran: tuple[dt.datetime, dt.datetime] | None = None,
) -> None:
    """Give one failed event of a batch to RQ as its own job (id = event id).

    With retries left (the receiver's ``Retry``, else ``SIGNAL_QUEUE_RETRY``) it
    is enqueued, or scheduled after the backoff interval, and RQ retries it from
    there; otherwise, or if the worker rejected it, it goes to RQ's failed
    registry with the error, where ``rq requeue`` or our ``requeue`` find it.
    The batch's done ``marks`` are saved in the same transaction, so a rerun of
    the batch cannot run the event again next to its own job.

    The job reads as if RQ had run it alone: its description names the request
    and its meta holds the event's facts (:mod:`.labels`); one recorded as
    failed has the batch's creation and enqueue times and, as ``started_at`` and
    ``ended_at``, when its handler ran (``ran``: start and end, UTC), so
    rq-dashboard shows when it failed.
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
        description=describe_event(payload, consumer.codec),
        meta=event_meta(payload, attempt),
        status=JobStatus.QUEUED if retries_left > 0 else JobStatus.FAILED,
    )
    new.created_at = job.created_at or new.created_at
    if retries_left <= 0:
        started, ended = ran or (dt.datetime.now(dt.timezone.utc),) * 2
        new.enqueued_at = job.enqueued_at or emitted_at(payload) or new.created_at
        new.started_at, new.ended_at = started, ended
        new.worker_name = job.worker_name
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
            pipe.hset(new.key, "meta", _json_meta(new.meta))  # the registry saves the job without it
            record_failure_result(new, consumer.failure_ttl, exc_string, pipe)
        pipe.hset(new.key, ATTEMPT_FIELD, attempt)
        if marks is not None:
            marks.save_into(pipe)
        pipe.execute()
    if marks is not None:
        marks.saved()
    logger.warning(
        "signal_queue: event %s (%s) failed on attempt %d; %s",
        event_id,
        receiver.name if receiver else "rejected",
        attempt,
        "retrying" if retries_left > 0 else "recorded in the failed registry",
    )

"""What a worker runs: the RQ job class and the one job function it allows.

RQ imports and calls whatever function a job names, so Redis would be a code
execution boundary. :class:`SignalJob` closes it: the only function it will
call is :func:`run_event`, it never resolves callbacks named in Redis, and
:func:`run_event` runs only receivers registered with ``@deferred``.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import datetime as dt
import inspect
import json
import logging
import signal
import threading
import time
import traceback
from collections.abc import Callable, Coroutine, Iterable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import redis
from flask import Flask
from rq import Queue, Retry
from rq.exceptions import DeserializationError
from rq.job import Job, JobStatus, get_current_job
from rq.results import Result
from rq.serializers import JSONSerializer
from rq.timeouts import JobTimeoutException
from rq.utils import as_text, now, str_to_date

from .context import rebuilt_context
from .event import Event, _current_event, resolve_shared_request
from .exceptions import EventRejected, MalformedEvent, ReceiverSignatureMismatch, UnknownReceiver
from .metrics import STATS_KEY
from .registry import receivers

if TYPE_CHECKING:
    from .registry import DeferredReceiver

logger = logging.getLogger("signal_queue")

#: The job functions a signal_queue worker runs: one event, or a batch of events.
RUN_EVENT = "signal_queue.jobs.run_event"
RUN_EVENTS = "signal_queue.jobs.run_events"
_ALLOWED = {RUN_EVENT: "run_event", RUN_EVENTS: "run_events"}
_ATTEMPT_FIELD = "sq_attempts"

_worker_app: Flask | None = None


def bind_worker_app(app: Flask | None) -> None:
    """Set the app that jobs run in, in this worker process."""
    global _worker_app
    _worker_app = app


#: Times RQ runs a batch job again after it raised or its worker died (finished events are skipped).
BATCH_RETRIES = 5

#: Seconds a batch job gets beyond its events' own timeouts, for spinning failures off.
BATCH_TIMEOUT_MARGIN = 60


def batch_timeout(event_timeouts: Iterable[int]) -> int:
    """A batch job's timeout: each event has its own alarm; the job's covers them all plus bookkeeping."""
    return sum(event_timeouts) + BATCH_TIMEOUT_MARGIN


class SignalJob(Job):
    """An RQ job that can only run :func:`run_event`/:func:`run_events`, and counts its attempts.

    Redis is not a trust boundary, so loading a job is an allow-list: the job
    hash may hold only the fields signal_queue and RQ write for such a job,
    each of the right type, and the settings a worker acts on (timeout,
    result and failure TTLs, retries) no larger than this worker would set.
    Anything else (webhooks, callbacks, dependencies, repeats, unknown fields)
    is never handed to RQ: the job loads without it and is refused when run,
    so it lands in RQ's failed registry with the reason.
    """

    _sq_attempts: int = 0
    _refusal: str | None = None

    @property
    def func(self) -> Callable[..., Any]:
        if self._refusal is not None:
            raise EventRejected(f"job {self.id} was refused and not run: {self._refusal}")
        name = self.func_name
        if name not in _ALLOWED or self.instance is not None:
            raise UnknownReceiver(
                f"job {self.id} names function {name!r}; a signal_queue worker runs only "
                f"{RUN_EVENT} and {RUN_EVENTS} jobs for registered @deferred receivers"
            )
        return globals()[_ALLOWED[name]]  # type: ignore[no-any-return]

    @property
    def refusal(self) -> str | None:
        """Why this worker will not run the job (fields or values it did not write), or None."""
        return self._refusal

    # Callbacks are named in Redis too; this worker never resolves them.
    @property
    def success_callback(self) -> None:
        return None

    @property
    def failure_callback(self) -> None:
        return None

    @property
    def stopped_callback(self) -> None:
        return None

    def _deserialize_data(self) -> None:
        try:
            super()._deserialize_data()  # type: ignore[no-untyped-call]
        except DeserializationError as exc:
            raise DeserializationError(
                f"job {self.id}: data is not a JSON job written by signal_queue "
                f"({exc.__cause__!r})"
            ) from exc.__cause__

    def restore(self, raw_data: Any) -> Any:
        fields = {as_text(k): v for k, v in raw_data.items()}
        problems = [f"field {name!r} {problem}" for name, problem in _field_problems(fields)]
        clean = {name: value for name, value in fields.items() if name in _FIELDS and not _FIELDS[name](value)}
        clean.setdefault("data", b"")
        result = super().restore(clean)
        attempts = clean.get(_ATTEMPT_FIELD)
        self._sq_attempts = int(attempts) if attempts else 0
        if not problems:
            problems = _data_problems(self)
        if not problems and _worker_app is not None:
            problems = _settings_problems(self, _worker_app)
        self._refusal = "; ".join(problems) if problems else None
        if self._refusal is not None:
            self.retries_left = None  # a refused job can never succeed: not retried
            if problems and not _data_readable(self):
                # Keep the stored data as it is, for inspection; RQ's logging reads these.
                self._func_name, self._instance, self._args, self._kwargs = RUN_EVENT, None, (), {}
        return result

    def prepare_for_execution(self, worker_name: str, pipeline: Any) -> None:
        # Counted in the pipeline RQ already sends, so it costs no round trip;
        # it counts every start, including one a killed worker never finished.
        super().prepare_for_execution(worker_name, pipeline)
        if self._refusal is None:
            pipeline.hincrby(self.key, _ATTEMPT_FIELD, 1)

    @property
    def attempt(self) -> int:
        """1 for the first run of this job, 2 for the next, and so on."""
        return self._sq_attempts + 1


def _date(value: bytes) -> str | None:
    if value:
        try:
            str_to_date(value)
        except (TypeError, ValueError):
            return f"is not a UTC time as RQ writes it: {value[:40]!r}"
    return None


def _int(least: int) -> Callable[[bytes], str | None]:
    def check(value: bytes) -> str | None:
        try:
            number = int(value)
        except (TypeError, ValueError):
            return f"must be a whole number, got {value[:40]!r}"
        return None if number >= least else f"must be >= {least}, got {number}"

    return check


def _text(value: bytes) -> str | None:
    try:
        value.decode("utf-8")
    except UnicodeDecodeError:
        return "is not UTF-8 text"
    return None


def _empty(value: bytes) -> str | None:
    return None if not value else f"must be empty (signal_queue never sets it), got {value[:60]!r}"


def _status(value: bytes) -> str | None:
    try:
        JobStatus(as_text(value))
    except ValueError:
        return f"is not an RQ job status: {value[:40]!r}"
    return None


def _int_list(value: bytes) -> str | None:
    try:
        items = json.loads(value)
    except ValueError:
        items = None
    if not isinstance(items, list) or not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in items):
        return f"must be a JSON list of whole numbers >= 0, got {value[:60]!r}"
    return None


def _flag(value: bytes) -> str | None:
    return None if value in (b"0", b"1") else f"must be 0 or 1, got {value[:40]!r}"


def _anything(value: bytes) -> str | None:
    return None


#: Every field a signal_queue job hash may hold (what the bridge and RQ write for such
#: a job over its life), with its check. Nothing else is read: see SignalJob.
_FIELDS: dict[str, Callable[[bytes], str | None]] = {
    "data": _anything,  # checked once decoded (_data_problems)
    "created_at": _date,
    "enqueued_at": _date,
    "started_at": _date,
    "ended_at": _date,
    "last_heartbeat": _date,
    "origin": _text,
    "description": _text,
    "worker_name": _text,
    "status": _status,
    "success_callback_name": _empty,
    "failure_callback_name": _empty,
    "stopped_callback_name": _empty,
    "group_id": _empty,
    "timeout": _int(1),
    "result_ttl": _int(-1),
    "failure_ttl": _int(1),
    "retries_left": _int(0),
    "number_of_retries": _int(0),
    "retry_intervals": _int_list,
    "enqueue_at_front": _flag,
    "enqueue_at_front_on_retry": _flag,
    "meta": _anything,  # read with the JSON serializer, never pickle
    "result": _anything,  # likewise
    "exc_info": _anything,  # text
    _ATTEMPT_FIELD: _int(0),
}


def _field_problems(fields: dict[str, Any]) -> list[tuple[str, str]]:
    problems = []
    if "data" not in fields:
        problems.append(("data", "is missing: the job hash carries no event"))
    for name, value in sorted(fields.items()):
        check = _FIELDS.get(name)
        if check is None:
            problems.append((name, "is not one that signal_queue writes (the job was changed in Redis)"))
        elif (problem := check(value)) is not None:
            problems.append((name, problem))
    return problems


def _data_readable(job: Job) -> bool:
    try:
        job.func_name  # noqa: B018 -- decodes the data
    except DeserializationError:
        return False
    return True


def _data_problems(job: Job) -> list[str]:
    """What is wrong with the job's call: the function, instance and arguments it names."""
    try:
        name, instance, args, kwargs = job.func_name, job.instance, job.args, job.kwargs
    except DeserializationError as exc:
        return [f"its data is not a JSON job written by signal_queue ({exc.__cause__!r})"]
    if name not in _ALLOWED or instance is not None:
        return [f"field 'data' names function {name!r}; a signal_queue worker runs only {RUN_EVENT} and {RUN_EVENTS}"]
    arity = (1,) if name == RUN_EVENT else (1, 2)
    if not isinstance(args, list) or len(args) not in arity or kwargs:
        return [f"field 'data' does not hold the arguments of {name}"]
    return []


def _settings_problems(job: SignalJob, app: Flask) -> list[str]:
    """Settings the worker would act on that are larger than it sets itself (a job cannot outlive its
    TTLs, outrun its alarm or retry more than its receiver allows because Redis said so)."""
    from .emit import state_for

    dispatcher = state_for(app).dispatcher
    timeouts, retries = _event_limits(job, dispatcher.default_timeout)
    limits = {
        "timeout": (job.timeout, timeouts),
        "result_ttl": (job.result_ttl, dispatcher.result_ttl),
        "failure_ttl": (job.failure_ttl, dispatcher.failure_ttl),
        "retries_left": (job.retries_left, retries),
    }
    problems = []
    for name, (value, most) in limits.items():
        if value is None:
            continue
        if (most == -1 and value != -1) or (most != -1 and (value == -1 or int(value) > most)):
            problems.append(f"field {name!r} is {value}, more than this worker sets ({most})")
    return problems


def _event_limits(job: Job, default_timeout: int) -> tuple[int, int]:
    """The timeout and retries this worker gives the job's events (a batch, or one event)."""
    events = job.args[0] if job.func_name == RUN_EVENTS else [job.args[0]]
    if not isinstance(events, list):
        return 0, 0
    longest = max([default_timeout, *(r.timeout or 0 for r in receivers)])
    timeouts, most_retries = [], 0
    for payload in events:
        data = payload if isinstance(payload, dict) else {}
        try:
            receiver = receivers.get(str(data.get("receiver")), str(data.get("signal")))
        except UnknownReceiver:
            timeouts.append(longest)  # it is rejected when run; this bound only caps the alarm
            continue
        timeouts.append(receiver.timeout or default_timeout)
        retry = receiver.retry
        most_retries = max(most_retries, retry.max if retry is not None else 0)
    if job.func_name == RUN_EVENTS:
        return batch_timeout(timeouts), BATCH_RETRIES
    return timeouts[0], max(most_retries, _default_retries())


def _default_retries() -> int:
    from .emit import state_for

    retry = state_for(_worker_app).default_retry if _worker_app is not None else None
    return retry.max if retry is not None else 0


def _worker_app_or_fail() -> Flask:
    if _worker_app is None:
        raise EventRejected(
            "this process has no Flask app bound; start workers with `python worker.py --app ...` "
            "or `flask signal-queue worker`"
        )
    return _worker_app


def run_event(payload: Any) -> None:
    """Job function for one event (a retry, or a requeued failure): RQ's retries apply to it."""
    job = get_current_job()
    attempt = job.attempt if isinstance(job, SignalJob) else 1
    app = _worker_app_or_fail()
    started = time.perf_counter()
    try:
        execute_event(app, payload, attempt)
    except Exception as exc:
        _log_event(payload, attempt, started, "failed", exc)
        _count(job, "failed")
        raise
    else:
        _log_event(payload, attempt, started, "handled", None)
        _count(job, "handled")
    finally:
        _send_emitted(app)


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
    app = _worker_app_or_fail()
    job = get_current_job()
    if job is None:
        raise EventRejected("run_events runs only as an RQ job")
    if not isinstance(payloads, list):
        raise MalformedEvent(f"a batch job's argument must be a list of events, got {type(payloads).__name__}")
    attempt = job.attempt if isinstance(job, SignalJob) else 1
    marks = _DoneMarks(job, attempt)
    for index, payload in enumerate(payloads):
        if index in marks.done:
            continue
        receiver = None
        started = time.perf_counter()
        try:
            payload = resolve_shared_request(payload, requests)
            event, receiver = resolve_event(payload, attempt)
            with event_timeout(receiver.timeout or state_timeout(app)):
                run_resolved(app, event, receiver)
        except EventRejected as exc:  # retrying cannot help: straight to the failed registry
            _log_event(payload, attempt, started, "rejected", exc)
            marks.failed += 1
            record_failed_event(app, job, payload, receiver, attempt, _exc_text(exc), retryable=False)
        except Exception as exc:
            _log_event(payload, attempt, started, "failed", exc)
            marks.failed += 1
            record_failed_event(app, job, payload, receiver, attempt, _exc_text(exc), retryable=True)
        else:
            _log_event(payload, attempt, started, "handled", None)
            marks.handled += 1
        marks.add(index)
    _send_emitted(app)
    marks.flush()


def _send_emitted(app: Flask) -> None:
    """Events the handlers sent reach Redis before their job counts as done."""
    from .emit import state_for

    state_for(app).outbox.flush()


def execute_event(app: Flask, payload: Any, attempt: int = 1) -> None:
    """Validate ``payload``, rebuild the emit's contexts and call the registered receiver."""
    event, receiver = resolve_event(payload, attempt)
    run_resolved(app, event, receiver)


def resolve_event(payload: Any, attempt: int) -> tuple[Event, DeferredReceiver]:
    """The event in ``payload`` and its registered receiver, or :class:`EventRejected`."""
    event = Event.from_dict(payload).with_attempt(attempt)
    return event, receivers.get(event.receiver, event.signal)


def run_resolved(app: Flask, event: Event, receiver: DeferredReceiver) -> None:
    from .emit import state_for

    codec = state_for(app).codec
    with rebuilt_context(app, event, codec):
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
        token = _current_event.set(event)
        try:
            result = receiver.func(sender, **kwargs)
            if inspect.iscoroutine(result):
                _run_coroutine(result)
        finally:
            _current_event.reset(token)


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


def state_timeout(app: Flask) -> int:
    from .emit import state_for

    return state_for(app).dispatcher.default_timeout


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
    TTL = 7 * 24 * 3600

    def __init__(self, job: Job | None, attempt: int) -> None:
        self.job = job
        self.key = f"sq:done:{job.id}" if job is not None else None
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
                    pipe.expire(self.key, self.TTL)
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
    app: Flask,
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
    from .emit import state_for

    state = state_for(app)
    retry = (receiver.retry or state.default_retry) if retryable and receiver is not None else None
    event_id = payload.get("id") if isinstance(payload, dict) and isinstance(payload.get("id"), str) else None
    queue = Queue(job.origin, connection=job.connection, serializer=JSONSerializer, job_class=SignalJob)
    retries_left = 0 if retry is None else retry.max - (attempt - 1)
    next_retry = None
    if retries_left > 1:
        next_retry = Retry(max=retries_left - 1, interval=list(retry.intervals[attempt:]) or 0)  # type: ignore[union-attr]
    new = queue.create_job(
        RUN_EVENT,
        args=(payload,),
        job_id=event_id,
        timeout=(receiver.timeout if receiver else None) or state.dispatcher.default_timeout,
        result_ttl=state.dispatcher.result_ttl,
        failure_ttl=state.dispatcher.failure_ttl,
        retry=next_retry,
        description=job.description if receiver is None else f"{receiver.signal_name} -> {receiver.name}",
        status=JobStatus.QUEUED if retries_left > 0 else JobStatus.FAILED,
    )
    with job.connection.pipeline() as pipe:
        if retries_left > 0:
            assert retry is not None
            interval = Retry.get_interval(attempt - 1, retry.intervals)
            if interval > 0:
                queue.schedule_job(new, now() + dt.timedelta(seconds=interval), pipeline=pipe)
            else:
                queue.enqueue_job(new, pipeline=pipe)
        else:
            queue.failed_job_registry.add(new, ttl=state.dispatcher.failure_ttl, exc_string=exc_string, pipeline=pipe)
            Result.create_failure(new, state.dispatcher.failure_ttl, exc_string, pipeline=pipe)
        pipe.hset(new.key, _ATTEMPT_FIELD, attempt)
        pipe.execute()
    logger.warning(
        "signal_queue: event %s (%s) failed on attempt %d; %s",
        event_id,
        receiver.name if receiver else "rejected",
        attempt,
        "retrying" if retries_left > 0 else "recorded in the failed registry",
    )

"""The job class of a signal_queue worker: an allow-list of what a job in Redis may say.

RQ imports and calls whatever function a job names, so Redis would be a code
execution boundary. :class:`SignalJob` closes it: the only functions it will
call are the bridge's job functions (:mod:`.run`), it never resolves callbacks
or webhooks, and loading a job is an allow-list: the hash may hold only the
fields signal_queue and RQ write for such a job, each of the right type, and
the settings a worker acts on (timeout, result and failure TTLs, retries) no
larger than this worker would set. Anything else is never handed to RQ: the
job loads without it and is refused when run, so it lands in RQ's failed
registry with the reason, and the worker goes on.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from typing import Any

from rq.exceptions import DeserializationError
from rq.job import Job, JobStatus

from ..exceptions import EventRejected, UnknownReceiver
from ..wire.keys import ATTEMPT_FIELD, BATCH_RETRIES, DONE_FIELD, RUN_EVENT, RUN_EVENTS, batch_timeout
from ..wire.receivers import receivers
from .rq_compat import CompatJob, parse_rq_time
from .run import JOB_FUNCTIONS, Consumer, bound


class SignalJob(CompatJob):
    """An RQ job that can only run the bridge's job functions, and counts its attempts."""

    _sq_attempts: int = 0
    _refusal: str | None = None

    @property
    def func(self) -> Callable[..., Any]:
        if self._refusal is not None:
            raise EventRejected(f"job {self.id} was refused and not run: {self._refusal}")
        name = self.func_name
        function = JOB_FUNCTIONS.get(name or "")
        if function is None or self.instance is not None:
            raise UnknownReceiver(
                f"job {self.id} names function {name!r}; a signal_queue worker runs only "
                f"{RUN_EVENT} and {RUN_EVENTS} jobs for registered @deferred receivers"
            )
        return function

    @property
    def refusal(self) -> str | None:
        """Why this worker will not run the job (fields or values it did not write), or None."""
        return self._refusal

    @property
    def attempt(self) -> int:
        """1 for the first run of this job, 2 for the next, and so on."""
        return self._sq_attempts + 1

    def load(self, fields: dict[str, Any]) -> Any:
        found = _field_problems(fields)
        problems = [f"field {name!r} {problem}" for name, problem in found]
        wrong = {name for name, _ in found}
        clean = {name: value for name, value in fields.items() if name not in wrong}
        clean.setdefault("data", b"")
        result = self.load_checked(clean)
        attempts = clean.get(ATTEMPT_FIELD)
        self._sq_attempts = int(attempts) if attempts else 0
        if not problems:
            problems = _data_problems(self)
        consumer = bound()
        if not problems and consumer is not None:
            problems = _settings_problems(self, consumer)
            self.result_ttl = kept_for(self.result_ttl, consumer.result_ttl)
        self._refusal = "; ".join(problems) if problems else None
        if self._refusal is not None:
            self.retries_left = None  # a refused job can never succeed: not retried
            if not _data_readable(self):
                # Keep the stored data as it is, for inspection; RQ's logging reads the call.
                self.set_call(RUN_EVENT, ())
        return result

    def starting(self, pipeline: Any) -> None:
        # Counted in the pipeline RQ already sends, so it costs no round trip;
        # it counts every start, including one a killed worker never finished.
        if self._refusal is None:
            pipeline.hincrby(self.key, ATTEMPT_FIELD, 1)


def _date(value: bytes) -> str | None:
    if value:
        try:
                parse_rq_time(value)
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
        JobStatus(value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value))
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


_MARKS = re.compile(rb"(,\d{1,9})*")


def _marks(value: bytes) -> str | None:
    if _MARKS.fullmatch(value) is None:
        return f"must be a list of event indexes (',0,1'), got {value[:60]!r}"
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
    ATTEMPT_FIELD: _int(0),
    DONE_FIELD: _marks,
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
    if name not in JOB_FUNCTIONS or instance is not None:
        return [f"field 'data' names function {name!r}; a signal_queue worker runs only {RUN_EVENT} and {RUN_EVENTS}"]
    arity = (1,) if name == RUN_EVENT else (1, 2)
    if not isinstance(args, list) or len(args) not in arity or kwargs:
        return [f"field 'data' does not hold the arguments of {name}"]
    return []


def worker_settings(job: Job, consumer: Consumer) -> dict[str, int]:
    """The timeout and TTLs this worker gives ``job``: what a requeue writes back, so that a job
    enqueued before a setting was lowered is not refused again for the old value."""
    if not _data_readable(job) or not job.args:
        return {}
    timeout, _ = _event_limits(job, consumer)
    return {"timeout": timeout, "result_ttl": consumer.result_ttl, "failure_ttl": consumer.failure_ttl}


def kept_for(asked: int | None, most: int) -> int:
    """How long the worker keeps a finished job that asks for ``asked`` seconds: never longer than
    its own ``SIGNAL_QUEUE_RESULT_TTL`` (``most``; -1 is forever). Not a reason to refuse the job:
    a job queued before the setting was lowered (the default was 500 s) runs, and is not kept."""
    if asked is None or asked == -1:
        return most
    return asked if most == -1 else min(asked, most)


def _settings_problems(job: Job, consumer: Consumer) -> list[str]:
    """Settings the worker would act on that are larger than it sets itself (a job cannot outrun its
    alarm, outlive its failure TTL or retry more than its receiver allows because Redis said so; its
    result TTL is cut to the worker's own instead, see :func:`kept_for`)."""
    timeouts, retries = _event_limits(job, consumer)
    limits = {
        "timeout": (job.timeout, timeouts),
        "failure_ttl": (job.failure_ttl, consumer.failure_ttl),
        "retries_left": (job.retries_left, retries),
    }
    problems = []
    for name, (value, most) in limits.items():
        if value is None:
            continue
        if (most == -1 and value != -1) or (most != -1 and (value == -1 or int(value) > most)):
            problems.append(f"field {name!r} is {value}, more than this worker sets ({most})")
    return problems


def _event_limits(job: Job, consumer: Consumer) -> tuple[int, int]:
    """The timeout and retries this worker gives the job's events (a batch, or one event)."""
    events = job.args[0] if job.func_name == RUN_EVENTS else [job.args[0]]
    if not isinstance(events, list):
        return 0, 0
    timeouts, most_retries = [], 0
    for payload in events:
        data = payload if isinstance(payload, dict) else {}
        try:
            receiver = receivers.get(str(data.get("receiver")), str(data.get("signal")))
        except UnknownReceiver:
            # It is rejected when run; this bound only caps the alarm.
            timeouts.append(max([consumer.default_timeout, *(r.timeout or 0 for r in receivers)]))
            continue
        timeouts.append(consumer.timeout_of(receiver))
        retry = receiver.retry or consumer.default_retry
        most_retries = max(most_retries, retry.max if retry is not None else 0)
    if job.func_name == RUN_EVENTS:
        return batch_timeout(timeouts), BATCH_RETRIES
    return timeouts[0], most_retries

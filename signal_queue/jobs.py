"""What a worker runs: the RQ job class and the one job function it allows.

RQ imports and calls whatever function a job names, so Redis would be a code
execution boundary. :class:`SignalJob` closes it: the only function it will
call is :func:`run_event`, it never resolves callbacks named in Redis, and
:func:`run_event` runs only receivers registered with ``@deferred``.
"""

from __future__ import annotations

import asyncio
import contextvars
import inspect
import threading
from collections.abc import Callable, Coroutine
from typing import Any

from flask import Flask
from rq.exceptions import DeserializationError
from rq.job import Job, get_current_job

from .context import rebuilt_context
from .event import Event, _current_event
from .exceptions import EventRejected, MalformedEvent, ReceiverSignatureMismatch, UnknownReceiver
from .registry import receivers

#: The job function name every signal_queue job carries.
RUN_EVENT = "signal_queue.jobs.run_event"
_ATTEMPT_FIELD = "sq_attempts"

_worker_app: Flask | None = None


def bind_worker_app(app: Flask | None) -> None:
    """Set the app that jobs run in, in this worker process."""
    global _worker_app
    _worker_app = app


class SignalJob(Job):
    """An RQ job that can only run :func:`run_event`, and counts its attempts."""

    _sq_attempts: int = 0

    @property
    def func(self) -> Callable[..., Any]:
        name = self.func_name
        if name != RUN_EVENT or self.instance is not None:
            raise UnknownReceiver(
                f"job {self.id} names function {name!r}; a signal_queue worker runs only "
                f"{RUN_EVENT} jobs for registered @deferred receivers"
            )
        return run_event

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
        result = super().restore(raw_data)
        attempts = raw_data.get(_ATTEMPT_FIELD.encode()) or raw_data.get(_ATTEMPT_FIELD)
        self._sq_attempts = int(attempts) if attempts else 0
        return result

    def prepare_for_execution(self, worker_name: str, pipeline: Any) -> None:
        # Counted in the pipeline RQ already sends, so it costs no round trip;
        # it counts every start, including one a killed worker never finished.
        super().prepare_for_execution(worker_name, pipeline)
        pipeline.hincrby(self.key, _ATTEMPT_FIELD, 1)

    @property
    def attempt(self) -> int:
        """1 for the first run of this job, 2 for the next, and so on."""
        return self._sq_attempts + 1


def run_event(payload: Any) -> None:
    """The RQ job function: run one event in the worker's app."""
    if _worker_app is None:
        raise EventRejected(
            "this process has no Flask app bound; start workers with `python worker.py --app ...` "
            "or `flask signal-queue worker`"
        )
    job = get_current_job()
    attempt = job.attempt if isinstance(job, SignalJob) else 1
    execute_event(_worker_app, payload, attempt)


def execute_event(app: Flask, payload: Any, attempt: int = 1) -> None:
    """Validate ``payload``, rebuild the emit's contexts and call the registered receiver."""
    from .emit import state_for

    event = Event.from_dict(payload).with_attempt(attempt)
    receiver = receivers.get(event.receiver, event.signal)
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

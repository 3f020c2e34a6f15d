"""The Flask extension object: ``SignalQueue(app)``, or ``sq.init_app(app)`` in an app factory."""

from __future__ import annotations

import weakref
from collections.abc import Callable
from typing import Any

from flask import Flask

from ._cli import signal_queue_cli
from ._state import DEFAULTS, SignalQueueState, from_env, state_for
from .exceptions import ConfigurationError
from .producer.emit import EXTENSION_KEY
from .producer.outbox import install_request_hooks
from .wire.codec import Codec


class SignalQueue:
    """Defers an app's ``@deferred`` receivers to RQ workers.

    One object can serve several apps, as Flask's extension pattern asks: all
    per-app state lives in ``app.extensions["signal_queue"]``.
    """

    def __init__(self, app: Flask | None = None) -> None:
        self._types: list[_TypeEntry] = []
        self._apps: weakref.WeakSet[Flask] = weakref.WeakSet()
        if app is not None:
            self.init_app(app)

    def register_type(
        self,
        cls: type,
        *,
        encode: Callable[[Any], Any],
        decode: Callable[[Any], Any],
        name: str | None = None,
    ) -> None:
        """Let kwargs of type ``cls`` (and its subclasses) reach deferred receivers.

        ``encode(value)`` returns what is sent (anything the bridge can carry:
        JSON, datetimes, other registered types...); the worker calls
        ``decode(sent)`` to rebuild the value. ``name`` is how jobs name the type
        (default ``module:qualname``): give one that survives a rename of the
        class. Used by the app, the worker, eager mode and the testing helpers
        alike; a ``decode`` that raises fails that event, naming the type::

            sq.register_type(Money, encode=lambda m: [str(m.amount), m.currency],
                             decode=lambda v: Money(Decimal(v[0]), v[1]), name="money")
        """
        entry = (cls, encode, decode, name)
        _register(Codec(), entry)  # the same checks as for an app, before any app has it
        for other in self._types:
            if other[0] is not cls and _wire_name(other) == _wire_name(entry):
                raise ConfigurationError(
                    f"register_type({cls.__qualname__}): type name {_wire_name(entry)!r} is already registered "
                    f"for {other[0].__module__}.{other[0].__qualname__}"
                )
        for app in self._apps:
            _register(state_for(app).codec, entry)
        self._types.append(entry)

    def init_app(self, app: Flask) -> None:
        """Set the extension up on ``app``: read its config, make its outbox, add ``flask signal-queue``.

        Each key is read from ``app.config``; one the app does not set is taken
        from the environment variable of the same name, then from
        :data:`~signal_queue._state.DEFAULTS`. ``docs/configuration.md`` says more of each.

        - ``SIGNAL_QUEUE_REDIS_URL``: Redis for the queue (``redis://``, ``rediss://``, ``unix://``).
        - ``SIGNAL_QUEUE_QUEUE``: default RQ queue name.
        - ``SIGNAL_QUEUE_QUEUES``: the queues in the order workers take from them (priority first).
        - ``SIGNAL_QUEUE_REDACT_HEADERS``: header names whose values are replaced.
        - ``SIGNAL_QUEUE_REDACT_FIELDS``: words that make a kwarg, dict key, model column or attribute
          secret (``password``, ``token``...): its value is sent as ``[REDACTED]``.
        - ``SIGNAL_QUEUE_EAGER``: run handlers inline after a JSON round trip (tests).
        - ``SIGNAL_QUEUE_RETRY``, ``SIGNAL_QUEUE_JOB_TIMEOUT``: defaults for ``@deferred``.
        - ``SIGNAL_QUEUE_RESULT_TTL``, ``SIGNAL_QUEUE_FAILURE_TTL``: how long RQ keeps records.
        - ``SIGNAL_QUEUE_SOCKET_TIMEOUT``: Redis connect and read timeout, seconds.
        - ``SIGNAL_QUEUE_IMPORTS``: modules the worker imports for their receivers.
        - ``SIGNAL_QUEUE_MAX_RESPONSE_BODY``: largest response body carried to the worker.
        - ``SIGNAL_QUEUE_DELIVERY``: ``background``, ``after_response`` or ``immediate``.
        - ``SIGNAL_QUEUE_BATCH_SIZE``: most events in one RQ job.
        - ``SIGNAL_QUEUE_LINGER``: least seconds between two background sends while jobs wait for a
          worker; while the workers keep up, the sender sends as soon as it can (group commit).
        - ``SIGNAL_QUEUE_MAX_PENDING``: most events waiting in memory for Redis.
        - ``SIGNAL_QUEUE_SPOOL_PATH``: the outage spool (default: in the instance folder).
        - ``SIGNAL_QUEUE_MAX_EVENT_BYTES``: largest kwargs of one event, as JSON.
        - ``SIGNAL_QUEUE_ABANDONED_AFTER``: seconds after which a dead worker's job is run again,
          whether it was running or only taken off its queue.
        - ``SIGNAL_QUEUE_MAINTENANCE_INTERVAL``: seconds between a worker's registry clean-ups.
        - ``SIGNAL_QUEUE_UNSENDABLE``: a kwarg that cannot be carried raises at emit (``raise``), or the
          event is recorded as failed and the request goes on (``record``); ``auto`` (default) raises in
          debug, testing, eager and capture mode and records otherwise.
        - ``SIGNAL_QUEUE_SHUTDOWN_GRACE``: seconds a stopping worker lets its running event finish
          (keep it under the orchestrator's stop timeout: compose 10 s, Kubernetes 30 s).

        The client address a receiver sees is ``request.remote_addr`` as the app
        sees it; behind proxies, use werkzeug's ``ProxyFix``.
        """
        if EXTENSION_KEY in app.extensions:
            raise ConfigurationError(
                f"SignalQueue is already set up on app {app.name!r}; call init_app once per app"
            )
        for key, default in DEFAULTS.items():
            app.config.setdefault(key, from_env(key, default))
        state = app.extensions[EXTENSION_KEY] = SignalQueueState(app)
        for entry in self._types:
            _register(state.codec, entry)
        self._apps.add(app)
        install_request_hooks(app, state.outbox)
        if "signal-queue" not in app.cli.commands:
            app.cli.add_command(signal_queue_cli)

    @staticmethod
    def state(app: Flask) -> SignalQueueState:
        """The extension's state for ``app``."""
        return state_for(app)

    @staticmethod
    def close(app: Flask) -> None:
        """Send what ``app`` has pending, stop its sender thread and release its Redis connections
        and spool file: for app factories and tests that make many apps. Events the app emits
        afterwards are still sent, on the emitting thread."""
        state_for(app).close()


_TypeEntry = tuple[type, Callable[[Any], Any], Callable[[Any], Any], str | None]


def _register(codec: Codec, entry: _TypeEntry) -> None:
    cls, encode, decode, name = entry
    try:
        codec.register_type(cls, encode, decode, name)
    except (TypeError, ValueError) as exc:
        raise ConfigurationError(f"register_type({getattr(cls, '__qualname__', cls)!r}): {exc}") from None


def _wire_name(entry: _TypeEntry) -> str:
    cls, _, _, name = entry
    return name or f"{cls.__module__}:{cls.__qualname__}"

"""The extension's per-app state: configuration read once, the app's producer and consumer."""

from __future__ import annotations

import importlib
import os
from collections.abc import Iterable
from typing import Any, Protocol, cast

import redis
from flask import Flask

from ._decorators import make_retry
from .consumer.run import Consumer, execute_event
from .exceptions import ConfigurationError
from .producer.capture import PendingEvent, received_form
from .producer.dispatcher import Dispatcher
from .producer.emit import Producer, producer_for
from .producer.outbox import DELIVERY_MODES, Outbox
from .producer.spool import Spool
from .wire.codec import Codec
from .wire.models import ModelCarrier
from .wire.principal import IdentityCarrier
from .wire.redis_connect import ClientFactory, RedisSource
from .wire.users import UserCarrier


class EventSink(Protocol):
    """What takes an app's events instead of its outbox while a test captures them."""

    def add(self, event: PendingEvent, state: SignalQueueState) -> None: ...

DEFAULT_REDACT_HEADERS = (
    "Authorization",
    "Proxy-Authorization",
    "Cookie",
    "Set-Cookie",
    "X-Api-Key",
    "X-Auth-Token",
    "X-CSRF-Token",
    "X-CSRFToken",
    "X-XSRF-Token",
)

#: Words that make a field secret (a kwarg, a dict key, a model column, an attribute of ``g`` or of a
#: user), matched in its name lower-cased without ``_ - .``: its value is sent as "[REDACTED]".
DEFAULT_REDACT_FIELDS = ("password", "passwd", "secret", "token", "apikey", "privatekey", "credential", "totp")

#: Every key the extension reads, with its default. A key not set in the app's
#: config is taken from the environment variable of the same name, if set.
DEFAULTS: dict[str, Any] = {
    "SIGNAL_QUEUE_REDIS_URL": "redis://localhost:6379/0",
    "SIGNAL_QUEUE_REDIS_CLIENT": "",
    "SIGNAL_QUEUE_QUEUE": "signals",
    "SIGNAL_QUEUE_QUEUES": (),
    "SIGNAL_QUEUE_REDACT_HEADERS": DEFAULT_REDACT_HEADERS,
    "SIGNAL_QUEUE_REDACT_FIELDS": DEFAULT_REDACT_FIELDS,
    "SIGNAL_QUEUE_EAGER": False,
    "SIGNAL_QUEUE_RETRY": 0,
    "SIGNAL_QUEUE_JOB_TIMEOUT": 180,
    "SIGNAL_QUEUE_RESULT_TTL": 0,
    "SIGNAL_QUEUE_FAILURE_TTL": 365 * 24 * 3600,
    "SIGNAL_QUEUE_SOCKET_TIMEOUT": 1.0,
    "SIGNAL_QUEUE_IMPORTS": (),
    "SIGNAL_QUEUE_MAX_RESPONSE_BODY": 64 * 1024,
    "SIGNAL_QUEUE_DELIVERY": "background",
    "SIGNAL_QUEUE_BATCH_SIZE": 100,
    "SIGNAL_QUEUE_LINGER": 0.015,
    "SIGNAL_QUEUE_MAX_PENDING": 100_000,
    "SIGNAL_QUEUE_SPOOL_PATH": "",
    "SIGNAL_QUEUE_MAX_EVENT_BYTES": 256 * 1024,
    "SIGNAL_QUEUE_ABANDONED_AFTER": 30,
    "SIGNAL_QUEUE_MAINTENANCE_INTERVAL": 15,
    "SIGNAL_QUEUE_UNSENDABLE": "auto",
    "SIGNAL_QUEUE_SHUTDOWN_GRACE": 7.0,
}

#: What ``SIGNAL_QUEUE_UNSENDABLE`` may say about a kwarg that cannot be carried to a worker.
UNSENDABLE_POLICIES = ("auto", "raise", "record")


#: Keys of earlier releases that are refused now, with the fix.
REMOVED = {
    "SIGNAL_QUEUE_TRUSTED_PROXIES": (
        "the client address is request.remote_addr as the app itself sees it; behind proxies, "
        "wrap the app in werkzeug's ProxyFix: app.wsgi_app = ProxyFix(app.wsgi_app, x_for=N)"
    ),
}


class SignalQueueState(Producer):
    """Per-app state, kept in ``app.extensions["signal_queue"]``: the producer, plus the consumer."""

    def __init__(self, app: Flask) -> None:
        config = app.config
        for key, fix in REMOVED.items():
            if key in config or key in os.environ:
                raise ConfigurationError(f"{key} is no longer read: {fix}")
        self.queue_name: str = _str(config, "SIGNAL_QUEUE_QUEUE")
        self.redis_url: str = _redis_url(config)
        #: Where every Redis client of this app comes from: SIGNAL_QUEUE_REDIS_CLIENT, else the URL.
        self.redis = RedisSource(self.redis_url, *_client_factory(config), name="SIGNAL_QUEUE_REDIS_URL")
        _bool(config, "SIGNAL_QUEUE_EAGER")
        self._config = config
        codec = Codec(
            _names(config, "SIGNAL_QUEUE_REDACT_HEADERS"),
            redact_fields=_names(config, "SIGNAL_QUEUE_REDACT_FIELDS"),
            max_body=_int(config, "SIGNAL_QUEUE_MAX_RESPONSE_BODY", minimum=0),
            globals_class=app.app_ctx_globals_class,
            carriers=(UserCarrier(), ModelCarrier(), IdentityCarrier()),
        )
        timeout = config["SIGNAL_QUEUE_SOCKET_TIMEOUT"]
        if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or timeout <= 0:
            raise ConfigurationError(f"SIGNAL_QUEUE_SOCKET_TIMEOUT must be seconds > 0, got {timeout!r}")
        connection = self.redis.client(socket_timeout=timeout, socket_connect_timeout=timeout)
        try:
            default_retry = make_retry(config["SIGNAL_QUEUE_RETRY"])
        except ConfigurationError as exc:
            raise ConfigurationError(f"SIGNAL_QUEUE_RETRY: {exc}") from None
        job_timeout = _int(config, "SIGNAL_QUEUE_JOB_TIMEOUT", minimum=1)
        result_ttl = _int(config, "SIGNAL_QUEUE_RESULT_TTL", minimum=-1)
        failure_ttl = _int(config, "SIGNAL_QUEUE_FAILURE_TTL", minimum=1)
        self.dispatcher = Dispatcher(
            connection,
            codec,
            self.queue_name,
            default_timeout=job_timeout,
            result_ttl=result_ttl,
            failure_ttl=failure_ttl,
            batch_size=_int(config, "SIGNAL_QUEUE_BATCH_SIZE", minimum=1),
            spool=Spool(self.spool_path(app)),
            source=self.redis,
        )
        self.unsendable: str = config["SIGNAL_QUEUE_UNSENDABLE"]
        if self.unsendable not in UNSENDABLE_POLICIES:
            raise ConfigurationError(
                f"SIGNAL_QUEUE_UNSENDABLE must be one of {', '.join(UNSENDABLE_POLICIES)}, got {self.unsendable!r}"
            )
        mode = config["SIGNAL_QUEUE_DELIVERY"]
        if mode not in DELIVERY_MODES:
            raise ConfigurationError(f"SIGNAL_QUEUE_DELIVERY must be one of {', '.join(DELIVERY_MODES)}, got {mode!r}")
        linger = config["SIGNAL_QUEUE_LINGER"]
        if isinstance(linger, bool) or not isinstance(linger, (int, float)) or not 0 <= linger <= 10:
            raise ConfigurationError(f"SIGNAL_QUEUE_LINGER must be seconds from 0 to 10, got {linger!r}")
        outbox = Outbox(app, self.dispatcher, mode, float(linger), _int(config, "SIGNAL_QUEUE_MAX_PENDING", minimum=1))
        super().__init__(codec, _int(config, "SIGNAL_QUEUE_MAX_EVENT_BYTES", minimum=1), outbox)
        self.consumer = Consumer(
            app=app,
            codec=codec,
            default_queue=self.queue_name,
            default_timeout=job_timeout,
            default_retry=default_retry,
            result_ttl=result_ttl,
            failure_ttl=failure_ttl,
            send_emitted=outbox.flush,
            after_fork=outbox.after_fork,
            imports=tuple(_names(config, "SIGNAL_QUEUE_IMPORTS")),
            queue_order=tuple(_names(config, "SIGNAL_QUEUE_QUEUES")),
            redis=self.redis,
            abandoned_after=_int(config, "SIGNAL_QUEUE_ABANDONED_AFTER", minimum=2),
            maintenance_interval=_int(config, "SIGNAL_QUEUE_MAINTENANCE_INTERVAL", minimum=1),
            shutdown_grace=_seconds(config, "SIGNAL_QUEUE_SHUTDOWN_GRACE"),
        )
        #: An active signal_queue.testing capture, which takes events instead of the outbox.
        self.capture: EventSink | None = None

    @staticmethod
    def spool_path(app: Flask) -> str:
        """``SIGNAL_QUEUE_SPOOL_PATH``, else ``signal_queue_spool.sqlite3`` in the app's instance folder."""
        path = app.config["SIGNAL_QUEUE_SPOOL_PATH"]
        if not isinstance(path, str):
            raise ConfigurationError(f"SIGNAL_QUEUE_SPOOL_PATH must be a file path, got {path!r}")
        return path or os.path.join(app.instance_path, "signal_queue_spool.sqlite3")

    @property
    def eager(self) -> bool:
        """Read at each emit, so a test may switch it with ``app.config["SIGNAL_QUEUE_EAGER"]``."""
        return bool(self._config["SIGNAL_QUEUE_EAGER"])

    @property
    def connection(self) -> redis.Redis:
        return self.dispatcher.connection

    def queue_names(self) -> list[str]:
        """The queues in the order workers take from them (see :meth:`Consumer.queue_names`)."""
        return self.consumer.queue_names()

    def route(self, app: Flask, event: PendingEvent) -> None:
        """A test's capture takes the event; in eager mode it runs now; else it goes to the outbox."""
        if self.capture is not None:
            self.capture.add(event, self)
        elif self._config["SIGNAL_QUEUE_EAGER"]:  # self.eager, without a property call on each emit
            # The same JSON round trip a worker sees.
            execute_event(self.consumer, received_form(event, self.codec))
        else:
            self.outbox.put(event)

    def raises_unsendable(self, app: Flask) -> bool:
        """``raise``, or ``auto`` while a developer is looking: debug, testing, eager or a test's capture.
        Otherwise (``record``, or ``auto`` in production) the request does not fail for an audit."""
        if self.unsendable == "auto":
            return bool(app.debug or app.testing or self.eager or self.capture is not None)
        return self.unsendable == "raise"

    def close(self) -> None:
        """Stop the sender thread after sending what is pending; release Redis and the spool."""
        self.outbox.close()


def state_for(app: Flask) -> SignalQueueState:
    """The extension's state for ``app``, or a :class:`ConfigurationError` telling the fix."""
    return cast(SignalQueueState, producer_for(app))


def from_env(key: str, default: Any) -> Any:
    raw = os.environ.get(key)
    if raw is None:
        return default
    if isinstance(default, bool):
        return raw.strip().lower() in ("1", "true", "yes", "on")
    if isinstance(default, int):
        try:
            return int(raw)
        except ValueError:
            raise ConfigurationError(f"environment variable {key}={raw!r} must be a whole number") from None
    if isinstance(default, float):
        try:
            return float(raw)
        except ValueError:
            raise ConfigurationError(f"environment variable {key}={raw!r} must be a number") from None
    if isinstance(default, tuple):
        return tuple(part.strip() for part in raw.split(",") if part.strip())
    return raw


def _str(config: Any, key: str) -> str:
    value = config[key]
    if not isinstance(value, str) or not value:
        raise ConfigurationError(f"{key} must be a non-empty string, got {value!r}")
    return value


def _redis_url(config: Any) -> str:
    """``SIGNAL_QUEUE_REDIS_URL``; a wrong value is described, never echoed (it may hold a password)."""
    value = config["SIGNAL_QUEUE_REDIS_URL"]
    if not isinstance(value, str) or not value:
        what = "an empty string" if value == "" else f"a value of type {type(value).__name__}"
        raise ConfigurationError(f"SIGNAL_QUEUE_REDIS_URL must be a non-empty string, got {what}")
    return value


def _client_factory(config: Any) -> tuple[ClientFactory | None, str]:
    """``SIGNAL_QUEUE_REDIS_CLIENT``: a callable, or the import path ``module:name`` of one (and its name)."""
    value = config["SIGNAL_QUEUE_REDIS_CLIENT"]
    if value is None or value == "":
        return None, ""
    if callable(value):
        return value, f"{getattr(value, '__module__', '?')}:{getattr(value, '__qualname__', type(value).__name__)}"
    if not isinstance(value, str):
        raise ConfigurationError(
            f"SIGNAL_QUEUE_REDIS_CLIENT must be a callable or its import path 'module:name', got {value!r}"
        )
    module, colon, name = value.partition(":")
    if not colon or not module or not name:
        raise ConfigurationError(f"SIGNAL_QUEUE_REDIS_CLIENT {value!r} must be an import path 'module:name'")
    try:
        found: Any = importlib.import_module(module)
        for part in name.split("."):
            found = getattr(found, part)
    except (ImportError, AttributeError) as exc:
        raise ConfigurationError(f"SIGNAL_QUEUE_REDIS_CLIENT {value!r} cannot be imported: {exc}") from None
    if not callable(found):
        raise ConfigurationError(f"SIGNAL_QUEUE_REDIS_CLIENT {value!r} is a {type(found).__name__}, not a callable")
    return found, value


def _int(config: Any, key: str, minimum: int) -> int:
    value = config[key]
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigurationError(f"{key} must be a whole number >= {minimum}, got {value!r}")
    return value


def _seconds(config: Any, key: str) -> float:
    value = config[key]
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < float("inf"):
        raise ConfigurationError(f"{key} must be a number of seconds >= 0, got {value!r}")
    return float(value)


def _bool(config: Any, key: str) -> bool:
    value = config[key]
    if not isinstance(value, bool):
        raise ConfigurationError(f"{key} must be True or False, got {value!r}")
    return value


def _names(config: Any, key: str) -> Iterable[str]:
    value = config[key]
    if isinstance(value, str) or not all(isinstance(v, str) for v in value):
        raise ConfigurationError(f"{key} must be a list of strings, got {value!r}")
    return list(value)

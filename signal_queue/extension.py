"""The Flask extension: configuration, per-app state, CLI registration."""

from __future__ import annotations

import os
import re
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote_plus

import redis
from flask import Flask

from .decorators import make_retry
from .enqueue import Dispatcher
from .event import PendingEvent, received_form
from .exceptions import ConfigurationError
from .outbox import DELIVERY_MODES, Outbox, install_request_hooks
from .serialization import Codec
from .spool import Spool

if TYPE_CHECKING:
    from .testing import EventCapture

#: Request and response headers whose values never leave the process.
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

#: Every key the extension reads, with its default. A key not set in the app's
#: config is taken from the environment variable of the same name, if set.
DEFAULTS: dict[str, Any] = {
    "SIGNAL_QUEUE_REDIS_URL": "redis://localhost:6379/0",
    "SIGNAL_QUEUE_QUEUE": "signals",
    "SIGNAL_QUEUE_TRUSTED_PROXIES": 0,
    "SIGNAL_QUEUE_REDACT_HEADERS": DEFAULT_REDACT_HEADERS,
    "SIGNAL_QUEUE_EAGER": False,
    "SIGNAL_QUEUE_RETRY": 0,
    "SIGNAL_QUEUE_JOB_TIMEOUT": 180,
    "SIGNAL_QUEUE_RESULT_TTL": 500,
    "SIGNAL_QUEUE_FAILURE_TTL": 365 * 24 * 3600,
    "SIGNAL_QUEUE_SOCKET_TIMEOUT": 1.0,
    "SIGNAL_QUEUE_IMPORTS": (),
    "SIGNAL_QUEUE_MAX_RESPONSE_BODY": 64 * 1024,
    "SIGNAL_QUEUE_DELIVERY": "background",
    "SIGNAL_QUEUE_BATCH_SIZE": 100,
    "SIGNAL_QUEUE_LINGER": 0.01,
    "SIGNAL_QUEUE_MAX_PENDING": 100_000,
    "SIGNAL_QUEUE_SPOOL_PATH": "",
    "SIGNAL_QUEUE_MAX_EVENT_BYTES": 256 * 1024,
    "SIGNAL_QUEUE_ABANDONED_AFTER": 30,
    "SIGNAL_QUEUE_MAINTENANCE_INTERVAL": 15,
}


#: What a password is shown as.
MASK = "***"


def safe_url(url: str) -> str:
    """``url`` as every message, log line and CLI output shows it: passwords replaced by ``***``.

    Masks the userinfo's password (``redis://user:***@host``; a userinfo without ``:``
    is masked whole, as some clients read it as a password) and the value of any query
    parameter whose name contains ``password`` (``?password=***``, ``?ssl_password=***``),
    for every scheme and also for URLs that urllib or redis-py cannot parse: the userinfo
    is taken to end at the last ``@``, so a password holding an unencoded ``/``, ``?``,
    ``#`` or ``@`` is masked whole. When in doubt it masks more (a query holding an ``@``
    is shown from the host on as userinfo), never less.
    """
    return _mask_url(url)[0]


def url_secrets(url: str) -> list[str]:
    """The secrets :func:`safe_url` masks in ``url`` (empty when it shows ``url`` unchanged)."""
    return _mask_url(url)[1]


def hide_secrets(text: str, url: str) -> str:
    """``text``, a message about ``url`` (a redis-py or urllib error), with ``url``'s secrets masked.

    Such messages may quote part of the URL: redis-py's "Port could not be cast to integer
    value as '...'" quotes what follows the first ``:`` of an unparsable userinfo, the
    start of a password that holds a ``/``. So each secret, decoded or not, and each of its
    pieces between URL delimiters (3 characters or more) is replaced.
    """
    pieces: set[str] = set()
    for secret in url_secrets(url):
        for form in (secret, unquote_plus(secret)):
            pieces.add(form)
            pieces.update(p for p in re.split(r"[/?#@:&;=]", form) if len(p) >= 3)
    for piece in sorted(pieces, key=len, reverse=True):
        if piece:
            text = text.replace(piece, MASK)
    return text


def _mask_url(url: str) -> tuple[str, list[str]]:
    secrets: list[str] = []
    scheme, sep, rest = url.partition("://")
    if not sep:
        scheme, rest = "", url
    userinfo, at, tail = rest.rpartition("@")
    if at and userinfo:
        user, colon, password = userinfo.partition(":")
        if colon and password:
            secrets.append(password)
            userinfo = f"{user}:{MASK}"
        elif not colon:
            secrets.append(user)
            userinfo = MASK
        head = f"{userinfo}@"
    else:
        head, tail = "", rest
    path, question, query = tail.partition("?")
    if question:
        shown: list[str] = []
        in_secret = False
        for part in query.split("&"):
            name, equals, value = part.partition("=")
            if equals and "password" in unquote_plus(name).lower():
                in_secret = True
                secrets.append(value)
                shown.append(f"{name}={MASK}")
            elif in_secret and not equals:
                secrets.append(part)  # an unencoded "&" in the password: redis-py reads less, we hide all
            else:
                in_secret = False
                shown.append(part)
        tail = f"{path}?{'&'.join(shown)}"
    return f"{scheme}{sep}{head}{tail}", [s for s in secrets if s]


class SignalQueueState:
    """Per-app state, kept in ``app.extensions["signal_queue"]``."""

    def __init__(self, app: Flask) -> None:
        config = app.config
        self.queue_name: str = _str(config, "SIGNAL_QUEUE_QUEUE")
        self.redis_url: str = _redis_url(config)
        self.trusted_proxies: int = _int(config, "SIGNAL_QUEUE_TRUSTED_PROXIES", minimum=0)
        self.max_event_bytes: int = _int(config, "SIGNAL_QUEUE_MAX_EVENT_BYTES", minimum=1)
        self.abandoned_after: int = _int(config, "SIGNAL_QUEUE_ABANDONED_AFTER", minimum=2)
        self.maintenance_interval: int = _int(config, "SIGNAL_QUEUE_MAINTENANCE_INTERVAL", minimum=1)
        _bool(config, "SIGNAL_QUEUE_EAGER")
        self._config = config
        self.imports: tuple[str, ...] = tuple(_names(config, "SIGNAL_QUEUE_IMPORTS"))
        redact = _names(config, "SIGNAL_QUEUE_REDACT_HEADERS")
        self.codec = Codec(redact, max_body=_int(config, "SIGNAL_QUEUE_MAX_RESPONSE_BODY", minimum=0))
        timeout = config["SIGNAL_QUEUE_SOCKET_TIMEOUT"]
        if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or timeout <= 0:
            raise ConfigurationError(f"SIGNAL_QUEUE_SOCKET_TIMEOUT must be seconds > 0, got {timeout!r}")
        try:
            connection = redis.Redis.from_url(
                self.redis_url, socket_timeout=timeout, socket_connect_timeout=timeout
            )
        except ValueError as exc:
            raise ConfigurationError(
                f"SIGNAL_QUEUE_REDIS_URL {safe_url(self.redis_url)!r} is not valid: "
                f"{hide_secrets(str(exc), self.redis_url)}"
            ) from None
        try:
            self.default_retry = make_retry(config["SIGNAL_QUEUE_RETRY"])
        except ConfigurationError as exc:
            raise ConfigurationError(f"SIGNAL_QUEUE_RETRY: {exc}") from None
        self.dispatcher = Dispatcher(
            connection,
            self.codec,
            self.queue_name,
            default_timeout=_int(config, "SIGNAL_QUEUE_JOB_TIMEOUT", minimum=1),
            result_ttl=_int(config, "SIGNAL_QUEUE_RESULT_TTL", minimum=-1),
            failure_ttl=_int(config, "SIGNAL_QUEUE_FAILURE_TTL", minimum=1),
            batch_size=_int(config, "SIGNAL_QUEUE_BATCH_SIZE", minimum=1),
            spool=Spool(self.spool_path(app)),
        )
        mode = config["SIGNAL_QUEUE_DELIVERY"]
        if mode not in DELIVERY_MODES:
            raise ConfigurationError(f"SIGNAL_QUEUE_DELIVERY must be one of {', '.join(DELIVERY_MODES)}, got {mode!r}")
        linger = config["SIGNAL_QUEUE_LINGER"]
        if isinstance(linger, bool) or not isinstance(linger, (int, float)) or not 0 <= linger <= 10:
            raise ConfigurationError(f"SIGNAL_QUEUE_LINGER must be seconds from 0 to 10, got {linger!r}")
        self.outbox = Outbox(
            app, self.dispatcher, mode, float(linger), _int(config, "SIGNAL_QUEUE_MAX_PENDING", minimum=1)
        )
        #: An active signal_queue.testing capture, which takes events instead of the outbox.
        self.capture: EventCapture | None = None

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
        """The default queue, then every queue a registered receiver names."""
        from .registry import receivers

        return [self.queue_name, *sorted(receivers.queues() - {self.queue_name})]

    def run_eagerly(self, app: Flask, event: PendingEvent) -> None:
        """Eager mode: run the handler now, after the same JSON round trip a worker sees."""
        from .jobs import execute_event

        execute_event(app, received_form(event, self.codec))


class SignalQueue:
    """Defers ``@deferred`` receivers of an app to RQ workers.

    ``SignalQueue(app)``, or ``sq = SignalQueue()`` then ``sq.init_app(app)`` in
    an app factory. Reads these config keys (each defaults to the environment
    variable of the same name, then to :data:`DEFAULTS`):

    - ``SIGNAL_QUEUE_REDIS_URL``: Redis for the queue (``redis://``, ``rediss://``, ``unix://``).
    - ``SIGNAL_QUEUE_QUEUE``: default RQ queue name.
    - ``SIGNAL_QUEUE_TRUSTED_PROXIES``: X-Forwarded-For hops to trust for the client IP.
    - ``SIGNAL_QUEUE_REDACT_HEADERS``: header names whose values are replaced.
    - ``SIGNAL_QUEUE_EAGER``: run handlers inline after a JSON round trip (tests).
    - ``SIGNAL_QUEUE_RETRY``, ``SIGNAL_QUEUE_JOB_TIMEOUT``: defaults for ``@deferred``.
    - ``SIGNAL_QUEUE_RESULT_TTL``, ``SIGNAL_QUEUE_FAILURE_TTL``: how long RQ keeps records.
    - ``SIGNAL_QUEUE_SOCKET_TIMEOUT``: Redis connect and read timeout, seconds.
    - ``SIGNAL_QUEUE_IMPORTS``: modules the worker imports for their receivers.
    - ``SIGNAL_QUEUE_MAX_RESPONSE_BODY``: largest response body carried to the worker.
    - ``SIGNAL_QUEUE_DELIVERY``: ``background``, ``after_response`` or ``immediate``.
    - ``SIGNAL_QUEUE_BATCH_SIZE``: most events in one RQ job.
    - ``SIGNAL_QUEUE_LINGER``: seconds the background sender lets a batch gather.
    - ``SIGNAL_QUEUE_MAX_PENDING``: most events waiting in memory for Redis.
    - ``SIGNAL_QUEUE_SPOOL_PATH``: the outage spool (default: in the instance folder).
    - ``SIGNAL_QUEUE_MAX_EVENT_BYTES``: largest kwargs of one event, as JSON.
    - ``SIGNAL_QUEUE_ABANDONED_AFTER``: seconds after which a dead worker's job is run again.
    - ``SIGNAL_QUEUE_MAINTENANCE_INTERVAL``: seconds between a worker's registry clean-ups.
    """

    def __init__(self, app: Flask | None = None) -> None:
        if app is not None:
            self.init_app(app)

    def init_app(self, app: Flask) -> None:
        if "signal_queue" in app.extensions:
            raise ConfigurationError(
                f"SignalQueue is already set up on app {app.name!r}; call init_app once per app"
            )
        for key, default in DEFAULTS.items():
            app.config.setdefault(key, _from_env(key, default))
        state = app.extensions["signal_queue"] = SignalQueueState(app)
        install_request_hooks(app, state.outbox)

        from .cli import signal_queue_cli

        if "signal-queue" not in app.cli.commands:
            app.cli.add_command(signal_queue_cli)

    @staticmethod
    def state(app: Flask) -> SignalQueueState:
        """The extension's state for ``app``."""
        from .emit import state_for

        return state_for(app)


def _from_env(key: str, default: Any) -> Any:
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


def _int(config: Any, key: str, minimum: int) -> int:
    value = config[key]
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigurationError(f"{key} must be a whole number >= {minimum}, got {value!r}")
    return value


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

"""Which Redis errors pass by themselves, and which need someone to fix something; for app and worker alike.

A Redis that is full, read-only, loading, busy, away or slow refuses for a
while and then takes writes again: waiting helps (a *transient* fault). A wrong
password, an ACL that denies a command, a TLS certificate the client does not
trust, or a URL that names what Redis does not have refuse for good: nothing
changes until someone fixes Redis or the URL (a *permanent* fault). The worker
waits out the first and exits 2 on the second; the app spools its events on
both, and logs the second at ERROR with its cause. :func:`classify` tells them
apart; an error it returns None for is not about Redis at all (a bug).
"""

from __future__ import annotations

import logging
import math
import re
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

import redis

from .redis_connect import CLUSTER_UNSUPPORTED, SentinelRefused, cluster_refusal
from .redis_url import hide_secrets

#: A lost or refused connection.
CONNECTION = "CONNECTION"
#: No reply within the socket timeout.
TIMEOUT = "TIMEOUT"

#: Each transient cause (Redis's error code, or one of the two above), as a log line says it after "Redis".
CAUSES = {
    "OOM": "is full: used memory is over maxmemory and the policy evicts nothing (OOM)",
    "READONLY": "is a read-only replica (READONLY)",
    "LOADING": "is loading its dataset into memory (LOADING)",
    "MASTERDOWN": "is a replica that lost its master (MASTERDOWN)",
    "BUSY": "is busy running a script or function (BUSY)",
    "MISCONF": "refuses writes because it cannot save to disk (MISCONF; Redis's log says why)",
    "NOREPLICAS": "has fewer replicas than min-replicas-to-write (NOREPLICAS)",
    TIMEOUT: "does not answer in time (timeout)",
    CONNECTION: "cannot be reached (connection lost or refused)",
}

# Codes redis-py turns into classes whose message no longer starts with the code.
_BY_CLASS: tuple[tuple[type[redis.RedisError], str], ...] = (
    (redis.exceptions.OutOfMemoryError, "OOM"),
    (redis.exceptions.ReadOnlyError, "READONLY"),
    (redis.exceptions.BusyLoadingError, "LOADING"),
    (redis.exceptions.MasterDownError, "MASTERDOWN"),
)

#: Redis's words for an authentication error, whose code older redis-py releases do not keep.
_BY_MESSAGE = (
    ("invalid username-password pair", "WRONGPASS"),
    ("invalid password", "WRONGPASS"),
    ("Authentication required", "NOAUTH"),
)

#: What Redis says when an ACL denies a command, also one a script runs (then it is a plain
#: ResponseError: "The user executing the script can't run this command or subcommand").
_ACL_DENIALS = ("NOPERM", "can't run this command", "no permissions to")

# What redis-py puts before the error of one command of a pipeline: "Command # 2 (HSET h f 1) of
# pipeline caused error: ..."; the command's arguments may be an event's data, so only its name is kept.
_PIPELINE = "Command # "
_PIPELINE_ERROR = " of pipeline caused error: "

# The SSL errors of a connection that ended midway (the server restarted): not about certificates.
_SSL_PASSING = (ssl.SSLEOFError, ssl.SSLZeroReturnError, ssl.SSLSyscallError, ssl.SSLWantReadError,
                ssl.SSLWantWriteError)

_LONGEST = 300  # characters of Redis's (or OpenSSL's) own words kept in a cause


@dataclass(frozen=True)
class Fault:
    """What one Redis error says: whether waiting helps, and its cause in one line (secrets masked)."""

    #: True if waiting does not help: someone must fix Redis or the URL.
    permanent: bool
    #: Transient: a key of :data:`CAUSES`. Permanent: Redis's error code (WRONGPASS, NOAUTH, NOPERM, ERR)
    #: or OpenSSL's reason (CERTIFICATE_VERIFY_FAILED...), which the app logs once per change of.
    code: str
    #: One line: "authentication failed (WRONGPASS): AuthenticationError: invalid username-password pair...".
    cause: str
    #: Permanent: what to fix.
    fix: str = ""
    #: Permanent: Redis said no (True), or the client could not talk to it (TLS, not Redis: False).
    by_redis: bool = True

    def line(self, shown: str, who: str) -> str:
        """The fault as ``who`` ("the app", "the worker") says it: "Redis at <shown> refused the worker: ...".

        ``shown`` names the Redis with its secrets already masked (``RedisSource.shown``).
        """
        if self.permanent and self.by_redis:
            return f"Redis at {shown} refused {who}: {self.cause}"
        if self.permanent:
            return f"{who} cannot use Redis at {shown}: {self.cause}"
        return f"Redis at {shown} {self.cause}"


def classify(exc: BaseException, url: str = "") -> Fault | None:
    """What ``exc`` (a redis-py error, an OSError, or one that wraps either) says about Redis; None if nothing.

    ``url`` is the URL the client used: its secrets are masked in the cause.
    """
    chain = _chain(exc)
    tls = next((e for e in chain if isinstance(e, ssl.SSLError) and not isinstance(e, _SSL_PASSING)), None)
    if tls is not None:
        return _tls_fault(tls, url)
    found = next((e for e in chain if isinstance(e, (redis.RedisError, OSError))), None)
    if found is None:
        return None
    code = error_code(found)
    if isinstance(found, SentinelRefused):
        return _permanent(found, url, "a sentinel refused the credentials", "SENTINEL_AUTH",
                          "fix sentinel_username / sentinel_password in SIGNAL_QUEUE_REDIS_URL, or the sentinels' "
                          "requirepass / ACL")
    if cluster_refusal(found):
        return _permanent(found, url, "it is a Redis Cluster node", "CLUSTER", CLUSTER_UNSUPPORTED, by_redis=False)
    if isinstance(found, (redis.AuthenticationError, redis.exceptions.AuthenticationWrongNumberOfArgsError)):
        what = ("authentication required: Redis wants a password and the URL gives none" if code == "NOAUTH"
                else "authentication failed")
        return _permanent(found, url, what, code or "AUTH", "fix the user and password in SIGNAL_QUEUE_REDIS_URL, "
                          "or set them in Redis (requirepass, ACL SETUSER)")
    if isinstance(found, (redis.exceptions.AuthorizationError, redis.exceptions.NoPermissionError)) or (
        isinstance(found, redis.ResponseError) and any(m in str(found) for m in _ACL_DENIALS)
    ):
        return _permanent(found, url, "an ACL denies a command or key it needs", "NOPERM",
                          "give the Redis user the command named here, the keys rq:* and sq:* and the channels "
                          "rq:* (ACL SETUSER), or use another user in SIGNAL_QUEUE_REDIS_URL")
    if code in CAUSES:
        return Fault(False, code, CAUSES[code])
    if "max number of clients reached" in str(found):  # a ConnectionError since redis-py 4, a ResponseError before
        return Fault(False, CONNECTION, CAUSES[CONNECTION])
    if isinstance(found, redis.exceptions.InvalidResponse):
        return _permanent(found, url, "the server does not speak Redis's protocol", "PROTOCOL",
                          "point SIGNAL_QUEUE_REDIS_URL at a Redis server", by_redis=False)
    if isinstance(found, redis.ResponseError):
        return _permanent(found, url, "a command was refused", code or "ERR",
                          "fix SIGNAL_QUEUE_REDIS_URL (its database number) or Redis's configuration")
    if isinstance(found, (redis.TimeoutError, TimeoutError)):
        hint = ""
        if any("handshake" in str(e) for e in chain):
            hint = "; a TLS handshake timed out: if Redis does not speak TLS on that port, the URL must be redis://"
        return Fault(False, TIMEOUT, CAUSES[TIMEOUT] + hint)
    if isinstance(found, (redis.ConnectionError, OSError)):
        unreadable = (FileNotFoundError, PermissionError, IsADirectoryError)
        if url.startswith(("rediss:", "rediss+sentinel:")) and any(isinstance(e, unreadable) for e in chain):
            # A TLS connection opens no file but its certificates: a missing ssl_ca_certs or ssl_certfile.
            return _permanent(found, url, "a TLS file the URL names cannot be read", "TLS_FILE",
                              "fix ssl_ca_certs, ssl_certfile or ssl_keyfile in SIGNAL_QUEUE_REDIS_URL", by_redis=False)
        hint = ""
        if url.startswith(("redis:", "redis+sentinel:")) and any(isinstance(e, ConnectionResetError) for e in chain):
            hint = "; if Redis speaks TLS on that port, the URL must be rediss://"
        return Fault(False, CONNECTION, CAUSES[CONNECTION] + hint)
    return None


def transient_cause(exc: BaseException) -> str | None:
    """The key in :data:`CAUSES` if ``exc`` is Redis refusing for a while; None otherwise."""
    fault = classify(exc)
    return fault.code if fault is not None and not fault.permanent else None


T = TypeVar("T")


def retry_while_transient(action: Callable[[], T], what: str, log: logging.Logger, within: float = math.inf) -> T:
    """``action()``, tried again while Redis refuses for a while (a transient cause), with a backoff from
    0.05 s doubling to 2 s: one WARNING per cause ("cannot <what>: Redis ...; retrying"), one when it
    went through after. Any other error is raised at once; a transient one once ``within`` seconds passed."""
    deadline = time.monotonic() + within
    delay = 0.05
    waiting: str | None = None
    while True:
        try:
            result = action()
            break
        except redis.RedisError as exc:
            cause = transient_cause(exc)
            if cause is None or time.monotonic() + delay > deadline:
                raise
            if cause != waiting:  # one line per cause, not one per try
                log.warning("signal_queue: cannot %s: Redis %s (%s: %s); retrying",
                            what, describe(cause), type(exc).__name__, exc)
                waiting = cause
            time.sleep(delay)
            delay = min(delay * 2, 2.0)
    if waiting is not None:
        log.warning("signal_queue: %s: done once Redis took it", what)
    return result


def describe(cause: str) -> str:
    """A transient cause as a log line says it: "is full: used memory is over maxmemory..."."""
    return CAUSES.get(cause, cause)


def error_code(exc: BaseException) -> str | None:
    """The Redis error code of ``exc`` (``OOM``, ``BUSY``...), whichever redis-py release parsed it."""
    for cls, code in _BY_CLASS:
        if isinstance(exc, cls):
            return code
    status = getattr(exc, "status_code", None)  # redis-py >= 6 keeps it
    if isinstance(status, str) and status:
        return status
    text = _message(exc)
    if text.startswith("Transaction discarded because of: "):  # EXECABORT names the first refusal
        text = text.split(": ", 1)[1].lstrip("-")
    word = text.split(" ", 1)[0]
    if word.isupper() and word.isalpha():
        return word
    # redis-py < 6 drops the code of an authentication error and keeps only Redis's words.
    return next((code for words, code in _BY_MESSAGE if text.startswith(words)), None)


def _chain(exc: BaseException) -> list[BaseException]:
    """``exc`` and what it was raised from or during (redis-py wraps socket and SSL errors)."""
    chain: list[BaseException] = []
    current: BaseException | None = exc
    while current is not None and current not in chain and len(chain) < 6:
        chain.append(current)
        current = current.__cause__ or current.__context__
    return chain


def _message(exc: BaseException) -> str:
    """``exc``'s text on one line, a pipeline's "Command # 2 (HSET key ...) of ..." cut to the command's name."""
    text = " ".join(str(exc).split())
    if text.startswith(_PIPELINE) and _PIPELINE_ERROR in text:
        head, text = text.split(_PIPELINE_ERROR, 1)
        command = head.partition("(")[2].split(" ", 1)[0].rstrip(")")
        text = f"{text} (in {command})" if command else text
    return text


def _permanent(exc: BaseException, url: str, what: str, code: str, fix: str, *, by_redis: bool = True) -> Fault:
    text = hide_secrets(_message(exc), url).rstrip(".")
    if len(text) > _LONGEST:
        text = text[:_LONGEST] + "..."
    return Fault(True, code, f"{what} ({code}): {type(exc).__name__}: {text}", fix, by_redis)


def _tls_fault(exc: ssl.SSLError, url: str) -> Fault:
    code = exc.reason if isinstance(exc.reason, str) and exc.reason else "SSL"
    if isinstance(exc, ssl.SSLCertVerificationError):
        what, detail = "TLS certificate verification failed", exc.verify_message or str(exc)
        fix = ("give ssl_ca_certs= the CA that signed Redis's certificate, and a host name that certificate holds, "
               "in SIGNAL_QUEUE_REDIS_URL; or give Redis a certificate the client trusts")
    else:
        what, detail = "the TLS handshake failed", exc.strerror or str(exc)
        fix = ("match the TLS settings of SIGNAL_QUEUE_REDIS_URL (rediss://, ssl_certfile, ssl_keyfile, "
               "ssl_ca_certs) to Redis's (tls-port, tls-auth-clients)")
    text = re.sub(r"^\[SSL: \w+\] | \(_ssl\.c:\d+\)\.?$", "", " ".join(str(detail).split()))
    text = hide_secrets(text, url)[:_LONGEST]
    return Fault(True, code, f"{what} ({code}): {type(exc).__name__}: {text}", fix, by_redis=False)

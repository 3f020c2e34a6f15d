"""Which Redis errors a worker waits out, and which stop it.

A Redis that is full, read-only, loading, busy or away refuses the worker for
a while and then takes writes again: the worker waits (:func:`transient_cause`).
A wrong password, an ACL that denies a command, or a Redis that does not know a
command refuses it for good: waiting would not help, and the worker exits
(:func:`is_refusal`). Anything else is not about Redis's state at all.
"""

from __future__ import annotations

import redis

#: A lost or refused connection.
CONNECTION = "CONNECTION"
#: No reply within the socket timeout.
TIMEOUT = "TIMEOUT"

#: Each cause a worker waits out (Redis's error code, or one of the two above), as the log says it.
CAUSES = {
    "OOM": "is full: used memory is over maxmemory and the policy evicts nothing (OOM)",
    "READONLY": "is a read-only replica (READONLY)",
    "LOADING": "is loading its dataset into memory (LOADING)",
    "MASTERDOWN": "is a replica that lost its master (MASTERDOWN)",
    "BUSY": "is busy running a script or function (BUSY)",
    "MISCONF": "refuses writes because it cannot save to disk (MISCONF)",
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


def error_code(exc: BaseException) -> str | None:
    """The Redis error code of ``exc`` (``OOM``, ``BUSY``...), whichever redis-py release parsed it."""
    for cls, code in _BY_CLASS:
        if isinstance(exc, cls):
            return code
    status = getattr(exc, "status_code", None)  # redis-py >= 6 keeps it
    if isinstance(status, str) and status:
        return status
    text = str(exc)
    if text.startswith("Command # ") and "caused error: " in text:  # a pipeline names the command first
        text = text.split("caused error: ", 1)[1]
    if text.startswith("Transaction discarded because of: "):  # EXECABORT names the first refusal
        text = text.split(": ", 1)[1].lstrip("-")
    word = text.split(" ", 1)[0]
    return word if word.isupper() and word.isalpha() else None


def transient_cause(exc: BaseException) -> str | None:
    """The key in :data:`CAUSES` if ``exc`` is Redis refusing for a while; None otherwise."""
    if isinstance(exc, (redis.AuthenticationError, redis.exceptions.AuthorizationError)):
        return None
    code = error_code(exc)
    if code in CAUSES:
        return code
    if isinstance(exc, redis.TimeoutError):
        return TIMEOUT
    if isinstance(exc, redis.ConnectionError):
        return CONNECTION
    return None


def is_refusal(exc: BaseException) -> bool:
    """True if Redis refused for good: a wrong password, an ACL denial, a command it does not know."""
    if isinstance(exc, (redis.AuthenticationError, redis.exceptions.AuthorizationError)):
        return True
    return isinstance(exc, redis.ResponseError) and transient_cause(exc) is None


#: What Redis says when an ACL denies a command, also one a script runs (then it is a plain
#: ResponseError: "The user executing the script can't run this command or subcommand").
_ACL_DENIALS = ("NOPERM", "can't run this command", "no permissions to")


def refusal_name(exc: BaseException) -> str:
    """The kind of a refusal for good, as the worker's exit line names it."""
    if isinstance(exc, redis.exceptions.NoPermissionError) or any(m in str(exc) for m in _ACL_DENIALS):
        return "NoPermissionError (an ACL denies a command the worker needs)"
    return type(exc).__name__


def describe(cause: str) -> str:
    """A cause as a log line says it: "is full: used memory is over maxmemory..."."""
    return CAUSES.get(cause, cause)

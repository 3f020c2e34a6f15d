"""The errors signal_queue raises.

::

    SignalQueueError
    ├── ConfigurationError        the app or a receiver is set up wrongly (raised at setup)
    │   └── ReceiverNotAddressable  a receiver cannot be found again by ``module:qualname``
    ├── PayloadError              an event cannot be turned into JSON (raised at emit time)
    ├── DeliveryError             Redis refused or could not be reached (never raised into a request)
    ├── HandlerCrashed            the process running a handler died (a segfault, os._exit); retried
    └── EventRejected             the worker will not run a job (recorded in RQ's failed registry)
        ├── MalformedEvent          the job's data is not a valid event
        ├── UnknownReceiver         the job names a receiver not registered with ``@deferred``
        └── ReceiverSignatureMismatch  the receiver no longer accepts the event's arguments
"""

from __future__ import annotations


class SignalQueueError(Exception):
    """Base class of every error signal_queue raises."""


class ConfigurationError(SignalQueueError):
    """The application, a signal or a receiver is set up in a way that cannot work."""


class ReceiverNotAddressable(ConfigurationError):
    """A receiver cannot be named by ``module:qualname`` and so cannot run in a worker."""


class PayloadError(SignalQueueError, TypeError):
    """An event holds a value that cannot be sent as JSON.

    Raised at emit time, before anything is enqueued, so nothing is half-sent.
    """

    def __init__(self, message: str, *, signal: str, receiver: str, key: str) -> None:
        super().__init__(message)
        self.signal = signal
        self.receiver = receiver
        self.key = key


class DeliveryError(SignalQueueError):
    """The event could not be handed to Redis (connection refused, timeout, auth...)."""


class HandlerCrashed(SignalQueueError):
    """The process running an event's handler died while it ran (a signal such as SIGSEGV, or an exit).

    Recorded as that event's failed attempt (RQ's failed registry after its
    last retry); the worker itself carries on.
    """


class EventRejected(SignalQueueError):
    """The worker refuses to run a job; RQ records it as failed with this message."""


class MalformedEvent(EventRejected):
    """The job's data is not an event this version of signal_queue understands."""


class UnknownReceiver(EventRejected):
    """The job names a receiver that is not registered with ``@deferred`` in this worker."""


class ReceiverSignatureMismatch(EventRejected):
    """The receiver's signature no longer accepts the event's sender and kwargs."""

"""signal_queue: run Flask/Blinker signal receivers in RQ workers instead of in the request."""

from __future__ import annotations

from .decorators import deferred
from .event import Event, RequestSnapshot, current_event
from .exceptions import (
    ConfigurationError,
    DeliveryError,
    EventRejected,
    MalformedEvent,
    PayloadError,
    ReceiverNotAddressable,
    ReceiverSignatureMismatch,
    SignalQueueError,
    UnknownReceiver,
)
from .extension import SignalQueue
from .serialization import OpaqueSender, RemoteException

__version__ = "0.1.0"

__all__ = [
    "ConfigurationError",
    "DeliveryError",
    "Event",
    "EventRejected",
    "MalformedEvent",
    "OpaqueSender",
    "PayloadError",
    "ReceiverNotAddressable",
    "ReceiverSignatureMismatch",
    "RemoteException",
    "RequestSnapshot",
    "SignalQueue",
    "SignalQueueError",
    "UnknownReceiver",
    "current_event",
    "deferred",
]

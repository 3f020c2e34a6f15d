"""signal_queue: run Flask/Blinker signal receivers in RQ workers instead of in the request."""

from __future__ import annotations

from ._decorators import deferred
from ._extension import SignalQueue
from .consumer.context import current_event
from .exceptions import (
    ConfigurationError,
    DeliveryError,
    EventRejected,
    HandlerCrashed,
    MalformedEvent,
    PayloadError,
    ReceiverNotAddressable,
    ReceiverSignatureMismatch,
    SignalQueueError,
    UnknownReceiver,
)
from .wire.codec import OpaqueSender, RemoteException
from .wire.event import Event, RequestSnapshot

__version__ = "0.1.0"

__all__ = [
    "ConfigurationError",
    "DeliveryError",
    "Event",
    "EventRejected",
    "HandlerCrashed",
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

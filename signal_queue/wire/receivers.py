"""The receivers registered with ``@deferred``: the worker's allow-list.

A job read from Redis names a receiver by ``module:qualname``; the worker runs
it only if that name was registered here, for that signal, when the app and
its receiver modules were imported. Nothing named in a job is ever imported.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any

from rq import Retry

from ..exceptions import UnknownReceiver

_muted: ContextVar[bool] = ContextVar("signal_queue.forwarding_muted", default=False)


def forwarding_muted() -> bool:
    """True inside :func:`muted`: forwarding receivers then take no events."""
    return _muted.get()


def muted() -> _Muted:
    """Forward nothing in this block (like blinker's ``Signal.muted``, for every deferred receiver).

    The worker pushes and pops the contexts it builds itself inside it: the
    signals Flask sends then (``appcontext_pushed`` and friends) are not user
    emits and must not be deferred again, or a receiver of them would loop.
    """
    return _Muted()


class _Muted:
    """The block of :func:`muted` (a class: the worker enters a few for each event it runs)."""

    __slots__ = ("_token",)

    def __enter__(self) -> None:
        self._token = _muted.set(True)

    def __exit__(self, *exc_info: object) -> None:
        _muted.reset(self._token)


@dataclass(frozen=True)
class DeferredReceiver:
    """A receiver function, the signal it is deferred on, and its job options."""

    name: str
    func: Callable[..., Any]
    signal: Any
    signal_name: str
    sender: Any
    queue: str | None
    retry: Retry | None
    timeout: int | None
    discard_if_failed: bool
    forwarder: Callable[..., Any]


class ReceiverRegistry:
    """Deferred receivers by ``(receiver name, signal name)``; safe to use from threads."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._receivers: dict[tuple[str, str], DeferredReceiver] = {}

    def add(self, receiver: DeferredReceiver) -> DeferredReceiver | None:
        """Register ``receiver``; return the one it replaces (a module imported again)."""
        with self._lock:
            key = (receiver.name, receiver.signal_name)
            previous = self._receivers.get(key)
            self._receivers[key] = receiver
            return previous

    def remove(self, name: str, signal_name: str) -> DeferredReceiver | None:
        with self._lock:
            return self._receivers.pop((name, signal_name), None)

    def get(self, name: str, signal_name: str) -> DeferredReceiver:
        """The receiver a job names, or :class:`UnknownReceiver` saying why not."""
        found = self._receivers.get((name, signal_name))
        if found is not None:
            return found
        signals = sorted(s for (n, s) in self._receivers if n == name)
        if signals:
            raise UnknownReceiver(
                f"receiver {name!r} is registered with @deferred for signal(s) "
                f"{', '.join(map(repr, signals))}, not for {signal_name!r}"
            )
        raise UnknownReceiver(
            f"receiver {name!r} (signal {signal_name!r}) is not registered with @deferred in "
            "this worker; only registered receivers can run. Check that the worker imports the "
            "module that defines it (the app's imports, or SIGNAL_QUEUE_IMPORTS)"
        )

    def queues(self) -> set[str]:
        """Queue names set explicitly by receivers (``@deferred(..., queue=...)``)."""
        return {r.queue for r in self._receivers.values() if r.queue}

    def __iter__(self) -> Iterator[DeferredReceiver]:
        return iter(list(self._receivers.values()))

    def __len__(self) -> int:
        return len(self._receivers)


#: The process-wide registry ``@deferred`` writes to.
receivers = ReceiverRegistry()

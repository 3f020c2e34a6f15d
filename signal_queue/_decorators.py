"""``@deferred``: register a receiver to run in a worker, and connect its forwarder.

The decorated function is returned unchanged. What Blinker calls instead is a
small forwarding receiver that captures the event and hands it to the queue.
Blinker connects weakly by default and a forwarder is a closure nobody else
holds, so it is connected with ``weak=False`` and also kept in the registry.
"""

from __future__ import annotations

import inspect
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from blinker import ANY, Signal
from rq import Retry

from .exceptions import ConfigurationError, ReceiverNotAddressable
from .producer.emit import emit
from .producer.outbox import install_hooks_everywhere
from .wire.receivers import DeferredReceiver, receivers

F = TypeVar("F", bound=Callable[..., Any])

#: Largest wait between retries, in seconds.
MAX_RETRY_INTERVAL = 600


def receiver_name(func: Callable[..., Any]) -> str:
    """``module:qualname`` of a module-level function, or :class:`ReceiverNotAddressable`."""
    module = getattr(func, "__module__", None)
    qualname = getattr(func, "__qualname__", None)
    if not isinstance(module, str) or not isinstance(qualname, str):
        raise ReceiverNotAddressable(
            f"{func!r} has no __module__/__qualname__; @deferred needs a module-level function"
        )
    if "<lambda>" in qualname or "<locals>" in qualname or "." in qualname:
        raise ReceiverNotAddressable(
            f"receiver {module}:{qualname} cannot be found again by name in a worker; "
            "@deferred needs a function defined at module level (not a lambda, a nested "
            "function or a method)"
        )
    if module == "__main__":
        module = _main_module_name()
    return f"{module}:{qualname}"


def _main_module_name() -> str:
    main = sys.modules.get("__main__")
    spec = getattr(main, "__spec__", None)
    if spec is not None and spec.name:
        return str(spec.name)
    path = getattr(main, "__file__", None)
    if path:
        return Path(path).stem
    raise ReceiverNotAddressable(
        "receivers defined in an interactive session cannot run in a worker; "
        "move them into an importable module"
    )


def signal_name(signal: Any) -> str:
    """The name a signal is known by in events, or :class:`ConfigurationError`."""
    if not isinstance(signal, Signal):
        raise ConfigurationError(f"@deferred expects a blinker signal, got {signal!r}")
    name = getattr(signal, "name", None)
    if not isinstance(name, str) or not name:
        raise ConfigurationError(
            f"@deferred needs a named signal ({signal!r} has no name); "
            "create it with blinker.Namespace().signal('name') or blinker.signal('name')"
        )
    return name


def make_retry(retry: int | Retry | None) -> Retry | None:
    """``retry=N`` means N retries with exponential backoff (1 s, 2 s, 4 s, ...)."""
    if retry is None or isinstance(retry, Retry):
        return retry
    if isinstance(retry, bool) or not isinstance(retry, int) or retry < 0:
        raise ConfigurationError(f"retry must be a number of retries >= 0 or an rq.Retry, got {retry!r}")
    if retry == 0:
        return None
    return Retry(max=retry, interval=[min(2**i, MAX_RETRY_INTERVAL) for i in range(retry)])


def deferred(
    signal: Signal,
    *,
    sender: Any = ANY,
    queue: str | None = None,
    retry: int | Retry | None = None,
    timeout: int | None = None,
    discard_if_failed: bool = False,
) -> Callable[[F], F]:
    """Run the decorated receiver of ``signal`` in an RQ worker instead of inline.

    :param sender: only events from this sender, as ``signal.connect(sender=...)``.
    :param queue: RQ queue name; default ``SIGNAL_QUEUE_QUEUE``.
    :param retry: number of retries with exponential backoff, or an :class:`rq.Retry`;
        default ``SIGNAL_QUEUE_RETRY``.
    :param timeout: seconds before a running handler is stopped and the attempt fails;
        default ``SIGNAL_QUEUE_JOB_TIMEOUT``.
    :param discard_if_failed: hold this receiver's events until the request ends and drop
        them if it failed (5xx or an unhandled exception), as a transaction's on-commit hook would.
    """
    name_of_signal = signal_name(signal)
    retry_policy = make_retry(retry)
    if timeout is not None and (isinstance(timeout, bool) or not isinstance(timeout, int) or timeout <= 0):
        raise ConfigurationError(f"timeout must be a whole number of seconds > 0, got {timeout!r}")
    if queue is not None and (not isinstance(queue, str) or not queue):
        raise ConfigurationError(f"queue must be a non-empty string, got {queue!r}")

    def decorate(func: F) -> F:
        if not callable(func):
            raise ConfigurationError(f"@deferred({name_of_signal!r}) must decorate a function")
        name = receiver_name(func)
        is_async = inspect.iscoroutinefunction(func)
        holder: list[DeferredReceiver] = []

        # The forwarder has the handler's kind, so that code which sends the
        # signal with send() or send_async() keeps working as it did inline.
        if is_async:

            async def forward_async(sender: Any, **kwargs: Any) -> None:
                emit(holder[0], sender, kwargs)

            forwarder: Callable[..., Any] = forward_async
        else:

            def forward(sender: Any, **kwargs: Any) -> None:
                emit(holder[0], sender, kwargs)

            forwarder = forward

        forwarder.__qualname__ = forwarder.__name__ = f"deferred:{name}"
        entry = DeferredReceiver(
            name=name,
            func=func,
            signal=signal,
            signal_name=name_of_signal,
            sender=sender,
            queue=queue,
            retry=retry_policy,
            timeout=timeout,
            discard_if_failed=discard_if_failed,
            forwarder=forwarder,
        )
        holder.append(entry)
        previous = receivers.add(entry)
        if previous is not None:
            previous.signal.disconnect(previous.forwarder)
        signal.connect(forwarder, sender=sender, weak=False)
        if discard_if_failed:
            install_hooks_everywhere()
        return func

    return decorate

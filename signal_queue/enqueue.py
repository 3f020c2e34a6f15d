"""The one place that talks to Redis on the emit side.

Every event reaches RQ through :meth:`Dispatcher.deliver`, which translates
Redis errors into a logged :class:`~signal_queue.exceptions.DeliveryError`
and never raises them into the request. Batching and the outage spool hook in
here, not in receivers.
"""

from __future__ import annotations

import logging
import threading
from collections import Counter
from typing import TYPE_CHECKING, Any

import redis
from rq import Queue
from rq.serializers import JSONSerializer

from .event import Event
from .exceptions import DeliveryError
from .jobs import RUN_EVENT, SignalJob

if TYPE_CHECKING:
    from .registry import DeferredReceiver

logger = logging.getLogger("signal_queue")


class Dispatcher:
    """Enqueues events as RQ jobs, one job per event, id = event id."""

    def __init__(
        self,
        connection: redis.Redis,
        default_queue: str,
        *,
        default_retry: Any,
        default_timeout: int | None,
        result_ttl: int,
        failure_ttl: int,
    ) -> None:
        self.connection = connection
        self.default_queue = default_queue
        self.default_retry = default_retry
        self.default_timeout = default_timeout
        self.result_ttl = result_ttl
        self.failure_ttl = failure_ttl
        self.counters: Counter[str] = Counter()
        self._queues: dict[str, Queue] = {}
        self._lock = threading.Lock()

    def queue(self, name: str) -> Queue:
        """The RQ queue ``name`` on this connection, with the JSON serializer."""
        q = self._queues.get(name)
        if q is None:
            with self._lock:
                q = self._queues.setdefault(
                    name,
                    Queue(name, connection=self.connection, serializer=JSONSerializer, job_class=SignalJob),
                )
        return q

    def deliver(self, receiver: DeferredReceiver, event: Event) -> bool:
        """Enqueue ``event``; on a Redis failure log it and return False, never raise."""
        try:
            self.enqueue(receiver, event)
        except DeliveryError as exc:
            self.counters["delivery_failed"] += 1
            logger.error(
                "signal_queue: event %s (signal %r, receiver %r) was not delivered: %s",
                event.id,
                event.signal,
                event.receiver,
                exc,
            )
            return False
        self.counters["enqueued"] += 1
        return True

    def enqueue(self, receiver: DeferredReceiver, event: Event) -> None:
        """Enqueue ``event`` or raise :class:`DeliveryError`."""
        retry = receiver.retry if receiver.retry is not None else self.default_retry
        try:
            self.queue(receiver.queue or self.default_queue).enqueue_call(
                RUN_EVENT,
                args=(event.to_dict(),),
                job_id=event.id,
                timeout=receiver.timeout or self.default_timeout,
                result_ttl=self.result_ttl,
                failure_ttl=self.failure_ttl,
                retry=retry,
                description=f"{event.signal} -> {event.receiver}",
            )
        except redis.RedisError as exc:
            raise DeliveryError(f"{type(exc).__name__}: {exc}") from exc
        except OSError as exc:
            raise DeliveryError(f"{type(exc).__name__}: {exc}") from exc

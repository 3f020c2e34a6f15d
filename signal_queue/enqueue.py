"""The one place that talks to Redis on the emit side.

:meth:`Dispatcher.deliver` turns pending events into RQ jobs of up to
``SIGNAL_QUEUE_BATCH_SIZE`` events each (a job costs ~20 Redis round trips
in a worker, so it is paid once per batch, not once per event) and writes all
of them with ``Queue.enqueue_many`` in one pipeline: one round trip. Redis
errors become a logged :class:`~signal_queue.exceptions.DeliveryError`,
never an exception in the request. The outage spool hooks in here.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Sequence
from typing import Any

import redis
from rq import Queue
from rq.queue import EnqueueData
from rq.serializers import JSONSerializer

from .event import PendingEvent
from .exceptions import DeliveryError
from .jobs import RUN_EVENTS, SignalJob
from .serialization import Codec

logger = logging.getLogger("signal_queue")

#: Least seconds between two log lines about lost events of one kind.
LOSS_LOG_INTERVAL = 10.0

#: Seconds a batch job gets beyond its events' own timeouts, for spinning failures off.
BATCH_TIMEOUT_MARGIN = 60


class Dispatcher:
    """Enqueues pending events as batched RQ jobs on their receivers' queues."""

    def __init__(
        self,
        connection: redis.Redis,
        codec: Codec,
        default_queue: str,
        *,
        default_timeout: int,
        result_ttl: int,
        failure_ttl: int,
        batch_size: int,
        max_events_per_send: int = 2000,
    ) -> None:
        self.connection = connection
        self.codec = codec
        self.default_queue = default_queue
        self.default_timeout = default_timeout
        self.result_ttl = result_ttl
        self.failure_ttl = failure_ttl
        self.batch_size = batch_size
        self.max_events_per_send = max_events_per_send
        self.counters: Counter[str] = Counter()
        #: False since the last delivery failed, until one succeeds.
        self.healthy = True
        self._unreported: Counter[str] = Counter()
        self._last_loss_log: dict[str, float] = {}
        self._queues: dict[str, Queue] = {}
        self._lock = threading.Lock()

    def queue(self, name: str) -> Queue:
        """The RQ queue ``name`` on this connection, with the JSON serializer."""
        q = self._queues.get(name)
        if q is None:
            with self._lock:
                q = self._queues.setdefault(
                    name, Queue(name, connection=self.connection, serializer=JSONSerializer, job_class=SignalJob)
                )
        return q

    def deliver(self, events: Sequence[PendingEvent]) -> bool:
        """Enqueue ``events``; on a Redis failure log them and return False, never raise."""
        if not events:
            return True
        try:
            self.enqueue(events)
        except DeliveryError as exc:
            self.healthy = False
            self.report_loss("delivery_failed", events, f"were not delivered: {exc}")
            return False
        self.healthy = True
        self.counters["enqueued"] += len(events)
        return True

    def report_loss(self, counter: str, events: Sequence[PendingEvent], what: str) -> None:
        """Count lost events and log it: at once, then at most every LOSS_LOG_INTERVAL seconds.

        An outage would otherwise write a line per flush; each line names a few
        of the events so that one can be traced.
        """
        self.counters[counter] += len(events)
        self._unreported[counter] += len(events)
        now = time.monotonic()
        if now - self._last_loss_log.get(counter, -LOSS_LOG_INTERVAL) < LOSS_LOG_INTERVAL:
            return
        sample = ", ".join(f"{e.id} ({e.receiver.signal_name} -> {e.receiver.name})" for e in events[:3])
        logger.error(
            "signal_queue: %d event(s) %s; %d such events in all since start; e.g. %s",
            self._unreported[counter], what, self.counters[counter], sample,
        )
        self._last_loss_log[counter] = now
        self._unreported[counter] = 0

    def job_data(self, events: Sequence[PendingEvent]) -> EnqueueData:
        """One batch job: its events, a description ``rq info`` can show, a timeout that fits them all."""
        requests: dict[str, dict[str, Any]] = {}
        payloads = [e.to_dict(self.codec, requests) for e in events]
        # Each event has its own alarm in the worker; the job's covers them all plus bookkeeping.
        timeout = sum(e.receiver.timeout or self.default_timeout for e in events) + BATCH_TIMEOUT_MARGIN
        names = sorted({f"{e.receiver.signal_name} -> {e.receiver.name}" for e in events})
        return Queue.prepare_data(
            RUN_EVENTS,
            args=(payloads, requests),
            timeout=timeout,
            result_ttl=self.result_ttl,
            failure_ttl=self.failure_ttl,
            description=f"{len(events)} event(s): {', '.join(names)}",
        )

    def enqueue(self, events: Sequence[PendingEvent]) -> None:
        """Enqueue ``events`` in one pipeline or raise :class:`DeliveryError`."""
        by_queue: dict[str, list[PendingEvent]] = defaultdict(list)
        for event in events:
            by_queue[event.receiver.queue or self.default_queue].append(event)
        try:
            with self.connection.pipeline(transaction=False) as pipe:
                for name, queued in by_queue.items():
                    size = self.batch_size
                    datas = [self.job_data(queued[i : i + size]) for i in range(0, len(queued), size)]
                    self.queue(name).enqueue_many(datas, pipeline=pipe)
                pipe.execute()
        except (redis.RedisError, OSError) as exc:
            raise DeliveryError(f"{type(exc).__name__}: {exc}") from exc



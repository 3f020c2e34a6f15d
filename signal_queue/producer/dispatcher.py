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
import os
import sqlite3
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Sequence
from typing import Any

import redis
from rq import Queue, Retry
from rq.queue import EnqueueData
from rq.serializers import JSONSerializer

from ..exceptions import DeliveryError
from ..wire.codec import Codec
from ..wire.event import new_id
from ..wire.keys import BATCH_RETRIES, RUN_EVENTS, SENT_KEY, SENT_TTL, STATS_KEY, batch_timeout
from ..wire.redis_identity import RedisIdentity, data_loss, read_identity
from .capture import PendingEvent
from .spool import Spool, SpooledBatch

logger = logging.getLogger("signal_queue")

#: Least seconds between two log lines about lost events of one kind.
LOSS_LOG_INTERVAL = 10.0


class CircuitBreaker:
    """Stops trying Redis for a while after a failure, so each request does not pay the timeout.

    Open for 1 s after a failure, doubling with each failure in a row up to 30 s;
    the first try after that (half-open) closes it again on success.
    """

    def __init__(self, first: float = 1.0, longest: float = 30.0) -> None:
        self.first = first
        self.longest = longest
        self.failures = 0
        self._open_until = 0.0

    def allow(self) -> bool:
        return time.monotonic() >= self._open_until

    def failed(self) -> None:
        self.failures += 1
        self._open_until = time.monotonic() + min(self.first * 2 ** (self.failures - 1), self.longest)

    def succeeded(self) -> None:
        self.failures = 0
        self._open_until = 0.0

    @property
    def retry_in(self) -> float:
        return max(0.0, self._open_until - time.monotonic())


class Dispatcher:
    """Enqueues pending events as batched RQ jobs; spools them when Redis cannot take them."""

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
        spool: Spool,
        max_events_per_send: int = 2000,
    ) -> None:
        self.connection = connection
        self.codec = codec
        self.default_queue = default_queue
        self.default_timeout = default_timeout
        self.result_ttl = result_ttl
        self.failure_ttl = failure_ttl
        self.batch_size = batch_size
        self.spool = spool
        self.max_events_per_send = max_events_per_send
        self.breaker = CircuitBreaker()
        self.counters: Counter[str] = Counter()
        #: True when this process spooled batches that may still wait for a replay.
        self.spool_dirty = spool.depth()[0] > 0 if os.path.exists(spool.path) else False
        self._unreported: Counter[str] = Counter()
        self._last_loss_log: dict[str, float] = {}
        self._queues: dict[str, Queue] = {}
        self._lock = threading.Lock()
        self._watch_reconnects(connection)

    def close(self) -> None:
        """Close the spool's file and this process's Redis connections (they reopen if used again)."""
        self.spool.close()
        self.connection.close()

    @property
    def healthy(self) -> bool:
        """False while the circuit breaker is open."""
        return self.breaker.failures == 0

    def queue(self, name: str) -> Queue:
        """The RQ queue ``name`` on this connection, with the JSON serializer."""
        q = self._queues.get(name)
        if q is None:
            with self._lock:
                q = self._queues.setdefault(
                    name, Queue(name, connection=self.connection, serializer=JSONSerializer)
                )
        return q

    # -- sending --------------------------------------------------------------------

    def deliver(self, events: Sequence[PendingEvent]) -> bool:
        """Enqueue ``events``, or spool them if Redis fails (or failed moments ago); never raise."""
        if not events:
            return True
        batches = self.prepare(events)
        error = f"Redis is unavailable (circuit open for {self.breaker.retry_in:.1f} s more)"
        if self.breaker.allow():
            try:
                self.send(batches)
            except DeliveryError as exc:
                self.breaker.failed()
                error = str(exc)
            else:
                self.breaker.succeeded()
                if self._reconnected:
                    self.check_redis_data()
                self.counters["enqueued"] += len(events)
                return True
        self.spool_batches(batches, events, error)
        return False

    def prepare(self, events: Sequence[PendingEvent]) -> list[SpooledBatch]:
        """Group events by queue into batch jobs with their final job ids."""
        by_queue: dict[str, list[PendingEvent]] = defaultdict(list)
        for event in events:
            by_queue[event.receiver.queue or self.default_queue].append(event)
        size = self.batch_size
        return [
            self.batch(name, queued[i : i + size])
            for name, queued in by_queue.items()
            for i in range(0, len(queued), size)
        ]

    def batch(self, queue: str, events: Sequence[PendingEvent]) -> SpooledBatch:
        """One batch job: its events, a description ``rq info`` can show, a timeout that fits them all."""
        requests: dict[str, dict[str, Any]] = {}
        payloads = [e.to_dict(self.codec, requests) for e in events]
        timeout = batch_timeout(e.receiver.timeout or self.default_timeout for e in events)
        names = sorted({f"{e.receiver.signal_name} -> {e.receiver.name}" for e in events})
        job = {
            "args": [payloads, requests],
            "timeout": timeout,
            "result_ttl": self.result_ttl,
            "failure_ttl": self.failure_ttl,
            "description": f"{len(events)} event(s): {', '.join(names)}",
        }
        return SpooledBatch(f"sqb{new_id()}", queue, job, len(events))

    def send(self, batches: Sequence[SpooledBatch]) -> None:
        """Enqueue ``batches`` atomically (MULTI/EXEC), each with its sent-marker, or raise DeliveryError.

        The marker ``sq:sent:<job id>`` lets a replay tell a batch that did reach
        Redis (the reply was lost) from one that did not.
        """
        by_queue: dict[str, list[EnqueueData]] = defaultdict(list)
        for b in batches:
            by_queue[b.queue].append(
                Queue.prepare_data(
                    RUN_EVENTS,
                    args=tuple(b.job["args"]),
                    timeout=b.job["timeout"],
                    result_ttl=b.job["result_ttl"],
                    failure_ttl=b.job["failure_ttl"],
                    description=b.job["description"],
                    job_id=b.job_id,
                    retry=Retry(max=BATCH_RETRIES),
                )
            )
        try:
            with self.connection.pipeline(transaction=True) as pipe:
                for name, datas in by_queue.items():
                    self.queue(name).enqueue_many(datas, pipeline=pipe)
                for b in batches:
                    pipe.set(SENT_KEY.format(b.job_id), 1, ex=SENT_TTL)
                pipe.hincrby(STATS_KEY, "enqueued", sum(b.events for b in batches))
                pipe.execute()
        except (redis.RedisError, OSError) as exc:
            raise DeliveryError(f"{type(exc).__name__}: {exc}") from exc

    # -- Redis restarted empty ------------------------------------------------------------

    def _watch_reconnects(self, connection: redis.Redis) -> None:
        """Note every new connection to Redis, so the next successful send checks Redis's data.

        redis-py reconnects by itself (its retries) after Redis restarted: a restart
        that emptied the queue raises nothing here. redis-py calls ``redis_connect_func``
        to set up each new connection; ours does what it did, then notes the reconnect.
        """
        #: Redis's run id and marker when this process last looked (see :meth:`check_redis_data`).
        self.redis_seen: RedisIdentity | None = None
        self._reconnected = False
        self._seen_at = ""
        self._sent_at_seen = 0
        self._checking = threading.Lock()
        kwargs = connection.connection_pool.connection_kwargs
        setup = kwargs.get("redis_connect_func")

        def connected(conn: Any) -> None:
            if setup is not None:
                setup(conn)
            else:
                conn.on_connect()
            self._reconnected = True

        kwargs["redis_connect_func"] = connected

    def check_redis_data(self) -> None:
        """After a new connection (the first, or one after Redis went away): did Redis lose its data?

        One round trip, on the thread that sent (the sender thread, in the default
        mode), once per new connection; never raises. Logs one WARNING per loss.
        """
        if not self._checking.acquire(blocking=False):
            return  # another thread is looking
        try:
            self._reconnected = False
            try:
                now = read_identity(self.connection)
            except (redis.RedisError, OSError) as exc:
                logger.debug("signal_queue: cannot read Redis's run id and marker: %s", exc)
                return
            before, self.redis_seen = self.redis_seen, now
            sent = self.counters["enqueued"] + self.counters["replayed"]
            loss = data_loss(before, now)
            if loss is not None:
                reason, advice = loss
                logger.warning(
                    "signal_queue: %s; up to %d queued event(s) this process sent since %s may have been lost "
                    "(those no worker had run yet); %s",
                    reason, sent - self._sent_at_seen, self._seen_at, advice,
                )
            self._sent_at_seen = sent
            self._seen_at = time.strftime("%H:%M:%S")
        finally:
            self._checking.release()

    # -- the spool --------------------------------------------------------------------

    def spool_batches(self, batches: Sequence[SpooledBatch], events: Sequence[PendingEvent], error: str) -> None:
        """Keep batches on disk; if even that fails, count and log the loss loudly."""
        try:
            self.spool.put(batches)
        except (sqlite3.Error, OSError) as exc:
            self.report_loss(
                "lost", events,
                f"were LOST: Redis failed ({error}) and the spool {self.spool.path} could not be written "
                f"({type(exc).__name__}: {exc})",
            )
            return
        self.spool_dirty = True
        self.counters["spooled"] += len(events)
        self.report_loss("spooled_logged", events, f"were spooled to {self.spool.path}: {error}", level=logging.WARNING)

    def replay(self, limit: int = 50) -> int:
        """Send spooled batches while Redis takes them; return how many events went out.

        A batch whose sent-marker exists already reached Redis: it is dropped
        from the spool, not sent again.
        """
        sent = 0
        while self.breaker.allow():
            try:
                claimed = self.spool.claim(limit)
            except (sqlite3.Error, OSError) as exc:
                logger.error("signal_queue: cannot read the spool %s: %s", self.spool.path, exc)
                return sent
            if not claimed:
                self.spool_dirty = False
                return sent
            try:
                with self.connection.pipeline(transaction=False) as pipe:
                    for b in claimed:
                        pipe.exists(SENT_KEY.format(b.job_id))
                    arrived = pipe.execute()
                fresh = [b for b, there in zip(claimed, arrived, strict=True) if not there]
                if fresh:
                    self.send(fresh)
            except (redis.RedisError, OSError, DeliveryError) as exc:
                self.breaker.failed()
                self.spool.release(claimed)
                logger.warning("signal_queue: replay of the spool stopped, Redis failed again: %s", exc)
                return sent
            except BaseException:
                self.spool.release(claimed)  # not left claimed for CLAIM_TIMEOUT
                raise
            self.breaker.succeeded()
            if self._reconnected:
                self.check_redis_data()
            self.spool.delete(claimed)
            replayed = sum(b.events for b in fresh)
            if replayed:
                self.connection.hincrby(STATS_KEY, "replayed", replayed)
            self.counters["replayed"] += replayed
            self.counters["replay_skipped"] += sum(b.events for b in claimed) - replayed
            sent += replayed
        return sent

    def report_loss(
        self, counter: str, events: Sequence[PendingEvent], what: str, level: int = logging.ERROR
    ) -> None:
        """Count events and log it: at once, then at most every LOSS_LOG_INTERVAL seconds.

        An outage would otherwise write a line per flush; each line names a few
        of the events so that one can be traced.
        """
        if not counter.endswith("_logged"):
            self.counters[counter] += len(events)
        self._unreported[counter] += len(events)
        now = time.monotonic()
        if now - self._last_loss_log.get(counter, -LOSS_LOG_INTERVAL) < LOSS_LOG_INTERVAL:
            return
        sample = ", ".join(f"{e.id} ({e.receiver.signal_name} -> {e.receiver.name})" for e in events[:3])
        logger.log(
            level,
            "signal_queue: %d event(s) %s; e.g. %s",
            self._unreported[counter], what, sample,
        )
        self._last_loss_log[counter] = now
        self._unreported[counter] = 0

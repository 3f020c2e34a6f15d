"""The one place that talks to Redis on the emit side.

:meth:`Dispatcher.deliver` turns pending events into RQ jobs of up to
``SIGNAL_QUEUE_BATCH_SIZE`` events each (a job costs ~20 Redis round trips
in a worker, so it is paid once per batch, not once per event) and writes all
of them with one script, as ``Queue.enqueue_many`` would (:mod:`..wire.rq_jobs`):
one round trip. Redis
errors become a logged :class:`~signal_queue.exceptions.DeliveryError`,
never an exception in the request. The outage spool hooks in here, and so
does the reporting of an outage: its log lines (one per cause per
:data:`LOSS_LOG_INTERVAL`), the one line that sums it up when it is over, and
the host's counts of spooled and lost events (see :mod:`.ledger`), which are
added into Redis's ``sq:stats`` when it answers again. A fault that waiting does
not fix (a wrong password, an ACL denial, a TLS certificate not trusted; see
:mod:`~signal_queue.wire.redis_errors`) is handled as an outage, events spooled
and retried, but logged at ERROR with its cause, once per change of cause.
"""

from __future__ import annotations

import logging
import os
import sqlite3
import threading
import time
import weakref
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import redis
from rq import Queue
from rq.serializers import JSONSerializer

from ..exceptions import DeliveryError
from ..wire.codec import Codec
from ..wire.event import new_id
from ..wire.keys import (
    BATCH_RETRIES,
    RUN_EVENTS,
    SENT_KEY,
    SENT_TTL,
    STATS_FROM_KEY,
    STATS_FROM_TTL,
    STATS_KEY,
    batch_timeout,
)
from ..wire.redis_connect import RedisSource
from ..wire.redis_errors import Fault, classify
from ..wire.redis_identity import RedisIdentity, data_loss, read_identity
from ..wire.rq_jobs import ENQUEUE_SCRIPT, JOB_KEY, enqueue_call, job_data, job_hash, json_bytes, rq_time
from .capture import PendingEvent
from .ledger import TOTALS as LEDGER_TOTALS
from .spool import Spool, SpooledBatch, is_write_failure, sqlite_cause

logger = logging.getLogger("signal_queue")

#: Least seconds between two log lines of one cause (events spooled, lost to a full disk, ...).
LOSS_LOG_INTERVAL = 10.0
#: Seconds a replay waits after the spool could not be read, or could be read but not written.
SPOOL_RETRY = 1.0

# Adds a host's count file's totals into sq:stats, once: KEYS[2] remembers, per count
# file, the totals already added, so the same totals sent twice (two processes, or a
# process that died before noting it had sent them) add nothing the second time.
_PUBLISH_COUNTS = """
for i = 1, #ARGV - 1, 2 do
    local before = tonumber(redis.call('HGET', KEYS[2], ARGV[i]) or '0')
    local now = tonumber(ARGV[i + 1])
    if now > before then
        redis.call('HINCRBY', KEYS[1], ARGV[i], now - before)
        redis.call('HSET', KEYS[2], ARGV[i], now)
    end
end
redis.call('EXPIRE', KEYS[2], ARGV[#ARGV])
return 1
"""


class LogLimiter:
    """At most one line per cause per interval; what recurs meanwhile is counted into the cause's next line."""

    def __init__(self, interval: float) -> None:
        self.interval = interval
        self._last: dict[str, float] = {}
        self._held: Counter[str] = Counter()
        self._lock = threading.Lock()  # request threads (drops) and the sender both report

    def due(self, cause: str, count: int = 1) -> int:
        """Add ``count``; return the count to write now (with what was held back), or 0 to stay quiet."""
        now = time.monotonic()
        with self._lock:
            self._held[cause] += count
            if now - self._last.get(cause, -self.interval) < self.interval:
                return 0
            self._last[cause] = now
            return self._held.pop(cause)


@dataclass
class Outage:
    """What one process saw of one Redis outage, for the line that sums it up."""

    cause: str | None  # the first error; None: this process saw none, it replayed what others spooled
    began: float = 0.0  # time.monotonic()
    back: float | None = None  # when Redis took a write again
    spooled: int = 0
    lost: int = 0
    dropped: int = 0
    replayed: int = 0
    skipped: int = 0
    refused: str | None = None  # the cause of a fault that needed a fix, if Redis answered with one

    def summary(self, now: float) -> str:
        """What happened, in one line's words: how long, the first error, what this process did."""
        length = (self.back if self.back is not None else now) - self.began
        if self.cause is None:
            seen = "this process saw no outage itself"
        elif self.refused is not None:
            verb = "has refused" if self.back is None else "refused"
            seen = f"Redis {verb} this app for {length:.1f} s ({self.refused})"
        elif self.back is None:
            seen = f"Redis has been unavailable for {length:.1f} s (first error: {self.cause})"
        else:
            seen = f"Redis was unavailable for {length:.1f} s (first error: {self.cause})"
        return (
            f"{seen}; this process spooled {self.spooled} event(s), replayed {self.replayed} (and skipped "
            f"{self.skipped} already in Redis), lost {self.lost}, dropped {self.dropped}"
        )


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


#: Seconds the sent-markers of confirmed sends may wait for a next send to delete them, before an
#: idle sender deletes them with a round trip of its own.
MARKERS_WAIT = 0.5


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
        source: RedisSource | None = None,
    ) -> None:
        self.connection = connection
        #: Where ``connection`` came from: its URL masks the secrets in messages, ``shown`` names it.
        self.source = source or RedisSource()
        #: The fault needing a fix that Redis last answered this process with; None once it takes writes,
        #: or fails in a way that passes.
        self.refused: Fault | None = None
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
        self._log = LogLimiter(LOSS_LOG_INTERVAL)
        self._queues: dict[str, Queue] = {}
        self._lock = threading.Lock()
        self._watch_reconnects(connection)
        self._flag_lock = threading.Lock()
        self._spool_writes = 0  # spool writes so far: a replay clears spool_dirty only if none came meanwhile
        self._spool_retry_at = 0.0
        #: Job ids this process replayed whose rows it could not delete (a full disk).
        self._sent_not_deleted: dict[str, int] = {}  # job id: events
        self._outage: Outage | None = None
        #: Batches known to be in no spool (their send was confirmed, or their spool row deleted):
        #: their sent-markers are deleted with the next send, or by the idle sender.
        self._confirmed: list[str] = []
        self._confirmed_at = 0.0
        self._confirmed_lock = threading.Lock()
        self._publish = connection.register_script(_PUBLISH_COUNTS)
        self._enqueue = connection.register_script(ENQUEUE_SCRIPT)
        spool.on_lost = self._lost_with_spool
        #: Jobs that were waiting for a worker in the busiest queue of the last send, before its own
        #: (read from that send's RPUSH replies): the background sender lingers only while there are some.
        self.waiting = 0
        #: True when the spool may hold batches waiting for a replay.
        self.spool_dirty = False
        if os.path.exists(spool.path):
            try:
                self.spool_dirty = spool.depth()[0] > 0
            except (sqlite3.Error, OSError) as exc:
                self.spool_dirty = True  # the sender tries again later, and says what is wrong
                self._spool_trouble("open", exc)
            finally:
                # A preloading master (gunicorn --preload) must not hand an open connection to its children.
                spool.close()
        #: True when the count file has counts that Redis's sq:stats does not have yet.
        self.counts_unpublished = spool.ledger.exists and any(spool.ledger.unpublished().values())
        _dispatchers.add(self)

    def close(self) -> None:
        """Close the spool's file and this process's Redis connections (they reopen if used again).

        Closed during an outage, the process says what it saw of it: the lines
        held back by the rate limit are in that sum.
        """
        outage = self._outage
        if outage is not None and (outage.spooled or outage.lost or outage.dropped):
            logger.log(
                logging.ERROR if outage.lost or outage.dropped else logging.WARNING,
                "signal_queue: closing (pid %d) during an outage: %s; %s",
                os.getpid(), outage.summary(time.monotonic()), self._spool_state(),
            )
            self._outage = None
        if self.healthy:
            self.forget_markers()
        self.spool.close()
        self.connection.close()

    def after_fork(self) -> None:
        """In a forked child: fresh locks, and counts of its own (the parent's are the parent's)."""
        self._lock = threading.Lock()
        self._flag_lock = threading.Lock()
        self.counters = Counter()
        self._log = LogLimiter(LOSS_LOG_INTERVAL)
        self._outage = None
        self.refused = None
        self._sent_not_deleted = {}
        self._confirmed = []  # the parent's to delete
        self._confirmed_lock = threading.Lock()

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
        refused = self.refused
        if refused is not None:
            error = f"{refused.line(self.source.shown, 'the app')} (next try in {self.breaker.retry_in:.1f} s)"
        else:
            error = f"Redis is unavailable (circuit open for {self.breaker.retry_in:.1f} s more)"
        if self.breaker.allow():
            try:
                self.send(batches)
            except DeliveryError as exc:
                self.breaker.failed()
                error = self._failed(exc)
            else:
                self.breaker.succeeded()
                self._confirm([b.job_id for b in batches])  # never spooled: their markers can go
                if self._reconnected:
                    self.check_redis_data()
                self.counters["enqueued"] += len(events)
                if self._outage is not None:
                    self._redis_back()
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
        codec, default_timeout = self.codec, self.default_timeout
        # Each event is JSON as soon as it is formatted: a batch's dicts do not pile up until the
        # send (and get promoted by the garbage collector, which then collects in full more often).
        payloads, timeouts, found = [], [], {}
        for e in events:
            payloads.append(json_bytes(e.to_dict(codec, requests)))
            timeouts.append(e.receiver.timeout or default_timeout)
            found[id(e.receiver)] = e.receiver
        timeout = batch_timeout(timeouts)
        names = sorted({f"{r.signal_name} -> {r.name}" for r in found.values()})
        job = {
            "timeout": timeout,
            "result_ttl": self.result_ttl,
            "failure_ttl": self.failure_ttl,
            "description": f"{len(events)} event(s): {', '.join(names)}",
        }
        args = b"[[" + b",".join(payloads) + b"]," + json_bytes(requests) + b"]"
        return SpooledBatch(f"sqb{new_id()}", queue, args, job, len(events))

    def send(self, batches: Sequence[SpooledBatch]) -> None:
        """Enqueue ``batches`` atomically (one script), each with its sent-marker, or raise DeliveryError.

        The marker ``sq:sent:<job id>`` lets a replay tell a batch that did reach
        Redis (the reply was lost) from one that did not, once its job is gone.
        The same script deletes the markers of batches confirmed since the
        last send: they are in no spool, so nothing will ask.
        """
        with self._confirmed_lock:
            obsolete, self._confirmed = self._confirmed, []
        now = rq_time()
        by_queue: dict[str, list[tuple[str, dict[str, bytes | str | int]]]] = defaultdict(list)
        for b in batches:
            by_queue[b.queue].append((b.job_id, job_hash(
                job_data(RUN_EVENTS, b.args),
                origin=b.queue,
                timeout=b.job["timeout"],
                result_ttl=b.job["result_ttl"],
                failure_ttl=b.job["failure_ttl"],
                description=b.job["description"],
                retries=BATCH_RETRIES,
                now=now,
            )))
        keys, args = enqueue_call(
            by_queue, marker=SENT_KEY, marker_ttl=SENT_TTL, counts=STATS_KEY, field="enqueued",
            increment=sum(b.events for b in batches), delete=[SENT_KEY.format(job_id) for job_id in obsolete],
        )
        try:
            # One atomic command (see ENQUEUE_SCRIPT): RQ's writes, the sent-markers, the count.
            waiting = self._enqueue(keys=keys, args=args)
        except (redis.RedisError, OSError) as exc:
            self._confirm(obsolete)  # deleted or not: the next send deletes them (again)
            raise DeliveryError(f"{type(exc).__name__}: {exc}") from exc
        # RPUSH answers the list's length: what it holds beyond the jobs just pushed was waiting
        # for a worker. Read from the send's own reply, so knowing costs no round trip.
        self.waiting = int(waiting)

    # -- sent-markers no spool needs ---------------------------------------------------

    def _confirm(self, job_ids: Sequence[str]) -> None:
        """Note batches that are in no spool: their sent-markers are deleted with the next send."""
        if not job_ids:
            return
        with self._confirmed_lock:
            if not self._confirmed:
                self._confirmed_at = time.monotonic()
            self._confirmed.extend(job_ids)

    def markers_due(self, waited: float = MARKERS_WAIT) -> bool:
        """True if sent-markers no spool needs have waited ``waited`` seconds for a send to delete them."""
        return bool(self._confirmed) and time.monotonic() - self._confirmed_at >= waited

    def forget_markers(self, job_ids: Sequence[str] = ()) -> None:
        """Delete the sent-markers of ``job_ids`` and of every batch confirmed so far, in one round trip.

        Never raises: what Redis did not take waits for the next send (and expires after SENT_TTL).
        """
        with self._confirmed_lock:
            ids, self._confirmed = [*self._confirmed, *job_ids], []
        if not ids:
            return
        try:
            self.connection.delete(*(SENT_KEY.format(job_id) for job_id in ids))
        except (redis.RedisError, OSError) as exc:
            logger.debug("signal_queue: cannot delete %d sent-marker(s) yet: %s", len(ids), exc)
            self._confirm(ids)

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
        self._outage_begins(error)
        try:
            self.spool.put(batches)
        except (sqlite3.Error, OSError) as exc:
            self.report_loss(
                "lost", events,
                f"were LOST: Redis failed ({error}) and the spool {self.spool.path} could not be written "
                f"({type(exc).__name__}: {exc})",
                cause=sqlite_cause(exc),
            )
            return
        with self._flag_lock:
            self._spool_writes += 1
            self.spool_dirty = True
        self.counters["spooled"] += len(events)
        if self._outage is not None:
            self._outage.spooled += len(events)
        self.report_loss(
            "spooled", events, f"were spooled to {self.spool.path}: {error}",
            level=logging.WARNING, count=False,
        )

    def replay(self, limit: int = 50) -> int:
        """Send spooled batches while Redis takes them; return how many events went out.

        A batch whose job hash or sent-marker exists already reached Redis: it
        is dropped from the spool, not sent again. One process of the host
        replays at a time; the others leave it to that one (it sends their
        batches too).
        """
        if time.monotonic() < self._spool_retry_at:
            return 0
        with self.spool.ledger.replaying() as ours:
            if not ours:
                return 0
            return self._replay(limit)

    def _replay(self, limit: int) -> int:
        sent = 0
        while self.breaker.allow():
            writes = self._spool_writes
            try:
                claimed = self.spool.claim(limit)
            except (sqlite3.Error, OSError) as exc:
                if is_write_failure(exc):
                    return sent + self._replay_unclaimed(limit, exc)
                self._spool_trouble("read", exc)
                return sent
            if not claimed:
                with self._flag_lock:
                    if writes == self._spool_writes:  # nothing was spooled since the claim looked
                        self.spool_dirty = False
                self._replayed_all()
                return sent
            try:
                fresh = self._send_new(claimed)
            except (redis.RedisError, OSError, DeliveryError) as exc:
                self.spool.release(claimed)
                self._replay_failed(exc)
                return sent
            except BaseException:
                self.spool.release(claimed)  # not left claimed for CLAIM_TIMEOUT
                raise
            try:
                self.spool.delete(claimed)
            except (sqlite3.Error, OSError) as exc:
                # Sent, and left claimed: the sent-markers keep them from going again.
                self._sent_not_deleted.update((b.job_id, b.events) for b in claimed)
                self._spool_trouble("delete", exc)
                return sent + fresh
            for b in claimed:
                self._sent_not_deleted.pop(b.job_id, None)
            self.forget_markers([b.job_id for b in claimed])  # their rows are gone: no replay asks
            sent += fresh
        return sent

    def _replay_unclaimed(self, limit: int, error: BaseException) -> int:
        """Replay a spool that can be read but not written (a full disk): send each row once, keep it.

        Rows cannot be claimed, so only the host's one replayer sends (the caller
        holds its lock) and the sent-markers skip what went already. Rows are
        deleted when the disk takes writes again; until then a pass runs at most
        every SPOOL_RETRY seconds.
        """
        self._warn("replay-unclaimed:" + sqlite_cause(error), (
            f"the spool {self.spool.path} cannot be written ({type(error).__name__}: {error}); its batches are "
            "replayed without claiming them, and stay on disk until it can be written"
        ))
        self._spool_retry_at = time.monotonic() + SPOOL_RETRY
        sent, after = 0, 0
        while self.breaker.allow():
            try:
                rows = self.spool.read(after, limit)
            except (sqlite3.Error, OSError) as exc:
                self._spool_trouble("read", exc)
                return sent
            if not rows:
                self._replayed_all()
                return sent
            after = rows[-1].row or after
            todo = [b for b in rows if b.job_id not in self._sent_not_deleted]
            if todo:
                try:
                    sent += self._send_new(todo)
                except (redis.RedisError, OSError, DeliveryError) as exc:
                    self._replay_failed(exc)
                    return sent
                self._sent_not_deleted.update((b.job_id, b.events) for b in todo)
            try:
                self.spool.delete(rows)
            except (sqlite3.Error, OSError):
                continue  # still full: the rows wait, and are not sent again
            for b in rows:
                self._sent_not_deleted.pop(b.job_id, None)
            self.forget_markers([b.job_id for b in rows])
        return sent

    def _send_new(self, batches: Sequence[SpooledBatch]) -> int:
        """Send the batches that never reached Redis; count them; return how many events went.

        A batch reached Redis if its job hash is there (it waits, runs, or is kept) or its
        sent-marker is (its job ran and is gone).
        """
        with self.connection.pipeline(transaction=False) as pipe:
            for b in batches:
                pipe.exists(SENT_KEY.format(b.job_id), JOB_KEY.format(b.job_id))
            arrived = pipe.execute()
        fresh = [b for b, there in zip(batches, arrived, strict=True) if not there]
        if fresh:
            self.send(fresh)
        self.breaker.succeeded()
        if self._reconnected:
            self.check_redis_data()
        replayed = sum(b.events for b in fresh)
        skipped = sum(b.events for b in batches) - replayed
        if replayed:
            self.connection.hincrby(STATS_KEY, "replayed", replayed)
        self.counters["replayed"] += replayed
        self.counters["replay_skipped"] += skipped
        outage = self._outage
        if outage is None:
            outage = self._outage = Outage(None, began=time.monotonic())
        outage.replayed += replayed
        outage.skipped += skipped
        self._redis_back()
        return replayed

    def _replay_failed(self, exc: BaseException) -> None:
        self.breaker.failed()
        self._failed(exc)
        if self.refused is None:  # a refusal has its own line
            self._warn("replay-redis", f"replay of the spool stopped, Redis failed again: {exc}")

    def _failed(self, exc: BaseException) -> str:
        """Redis failed a send or a replay: the outage begins (or goes on). Returns the error as lines say it.

        A fault that needs a fix is logged at ERROR, with its cause and what to fix,
        when it begins and when its cause changes: not per try.
        """
        fault = classify(exc, self.source.url)
        error = str(exc) if isinstance(exc, DeliveryError) else f"{type(exc).__name__}: {exc}"
        if fault is None or not fault.permanent:
            self.refused = None
            self._outage_begins(error)
            return error
        with self._flag_lock:
            new = self.refused is None or self.refused.code != fault.code
            self.refused = fault
        error = fault.line(self.source.shown, "the app")
        if new:
            logger.error(
                "signal_queue: %s (pid %d); waiting will not fix this: %s. Meanwhile every event is kept in the "
                "spool %s and sent once Redis takes it: the app tries again every %.0f s at most, without a "
                "restart (after a change to SIGNAL_QUEUE_REDIS_URL, the restarted app sends them)",
                error, os.getpid(), fault.fix, self.spool.path, self.breaker.longest,
            )
        self._outage_begins(error)
        if self._outage is not None:
            self._outage.refused = fault.cause
        return error

    def _spool_trouble(self, what: str, exc: BaseException) -> None:
        """The spool could not be used: one line per cause per interval, and a pause before the next try."""
        self._spool_retry_at = time.monotonic() + SPOOL_RETRY
        cause = sqlite_cause(exc)
        count = self._log.due(f"spool-{what}:{cause}")
        if count:
            logger.error(
                "signal_queue: cannot %s the spool %s (%s: %s)%s", what, self.spool.path, type(exc).__name__, exc,
                f"; {count} time(s) since the last line" if count > 1 else "",
            )

    def _warn(self, cause: str, message: str) -> None:
        count = self._log.due(cause)
        if count:
            since = f" ({count} time(s) since the last line)" if count > 1 else ""
            logger.warning("signal_queue: %s%s", message, since)

    # -- an outage, start to end -------------------------------------------------------------

    def _outage_begins(self, cause: str) -> None:
        """A failure: the start of an outage, or more of the one not yet summed up."""
        outage = self._outage
        if outage is None or outage.cause is None:
            self._outage = Outage(cause, began=time.monotonic())
            if outage is not None:  # it had only replayed: keep those counts
                self._outage.replayed, self._outage.skipped = outage.replayed, outage.skipped
        else:
            outage.back = None  # failed again before the spool was empty: the same outage

    def _redis_back(self) -> None:
        self.refused = None
        outage = self._outage
        if outage is not None and outage.back is None:
            outage.back = time.monotonic()
        if not self.spool_dirty:
            self._outage_over()

    def _replayed_all(self) -> None:
        """Nothing in the spool is left to send (though rows may wait for deletion on a full disk).

        A process whose batches another one replayed has not written to Redis
        since its outage began: a PING tells it whether the outage is over.
        """
        outage = self._outage
        if outage is None:
            return
        if outage.back is None:
            try:
                self.connection.ping()
            except (redis.RedisError, OSError):
                self.breaker.failed()
                return
            self.breaker.succeeded()
            self.refused = None
            outage.back = time.monotonic()
        self._outage_over()

    def _outage_over(self) -> None:
        """One line per process per outage, with every count the rate-limited lines held back."""
        with self._flag_lock:
            outage, self._outage = self._outage, None
        if outage is None:
            return
        if outage.spooled or outage.lost or outage.dropped or outage.replayed or outage.skipped:
            logger.log(
                logging.ERROR if outage.lost or outage.dropped else logging.WARNING,
                "signal_queue: outage over (pid %d): %s; %s",
                os.getpid(), outage.summary(time.monotonic()), self._spool_state(),
            )
        self.publish_counts()

    @property
    def sent_not_deleted(self) -> int:
        """Events this process replayed from rows it could not delete yet (a full disk): not waiting."""
        return sum(list(self._sent_not_deleted.values()))  # a copy: the replaying thread may change it

    def _spool_state(self) -> str:
        try:
            events = self.spool.depth()[1]
        except (sqlite3.Error, OSError) as exc:
            return f"the spool {self.spool.path} cannot be read ({type(exc).__name__}: {exc})"
        sent = self.sent_not_deleted
        if sent:
            return (f"the spool {self.spool.path} holds {events} event(s), {sent} of them sent already (their rows "
                    "go once it can be written)")
        return f"the spool {self.spool.path} holds {events} event(s)"

    def _lost_with_spool(self, events: int, why: str) -> None:
        """The spool told us a corrupt file took ``events`` with it (the count file has them already)."""
        self.counters["lost"] += events
        if self._outage is not None:
            self._outage.lost += events
        self.counts_unpublished = True

    # -- counts ---------------------------------------------------------------------------------

    def publish_counts(self) -> None:
        """Add the count file's totals (spooled, lost, dropped on this host) into Redis's sq:stats, once."""
        ledger = self.spool.ledger
        if not ledger.exists:
            self.counts_unpublished = False
            return
        try:
            totals = ledger.read()
            argv: list[Any] = [x for name in LEDGER_TOTALS for x in (name, totals[name])]
            self._publish(keys=[STATS_KEY, STATS_FROM_KEY.format(ledger.id)], args=[*argv, STATS_FROM_TTL])
            ledger.mark_published(totals)
        except (redis.RedisError, OSError) as exc:
            self.breaker.failed()  # the sender tries again once Redis takes a batch
            self._warn("publish", f"cannot add this host's spool counts into Redis yet: {exc}")
            return
        self.counts_unpublished = False

    def report_loss(
        self,
        counter: str,
        events: Sequence[PendingEvent],
        what: str,
        level: int = logging.ERROR,
        *,
        cause: str = "",
        count: bool = True,
    ) -> None:
        """Count events and log it: at once, then at most every LOSS_LOG_INTERVAL seconds per cause.

        An outage would otherwise write a line per flush; each line says how many
        events it stands for and names a few of them, so that one can be traced.
        ``lost`` and ``dropped`` go into the host's count file too.
        """
        if count:
            self.counters[counter] += len(events)
            if counter in ("lost", "dropped"):
                self.spool.ledger.add(**{counter: len(events)})
                self.counts_unpublished = True
                if self._outage is not None:
                    setattr(self._outage, counter, getattr(self._outage, counter) + len(events))
        held = self._log.due(f"{counter}:{cause}", len(events))
        if not held:
            return
        sample = ", ".join(f"{e.id} ({e.receiver.signal_name} -> {e.receiver.name})" for e in events[:3])
        logger.log(level, "signal_queue: %d event(s) %s; e.g. %s", held, what, sample)


_dispatchers: weakref.WeakSet[Dispatcher] = weakref.WeakSet()


def _after_fork_in_child() -> None:
    for dispatcher in list(_dispatchers):
        dispatcher.after_fork()


os.register_at_fork(after_in_child=_after_fork_in_child)

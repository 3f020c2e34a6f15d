"""Between the request thread and Redis: delivery modes, per-request holding, the background sender.

Delivery modes (``SIGNAL_QUEUE_DELIVERY``):

``background`` (default)
    The request thread appends the event to an in-memory queue; a sender
    thread sends whatever has gathered as batched RQ jobs in one pipeline. While
    the workers keep up (the last send found no job waiting in its queue), that
    is group commit: at once when the sender is idle, else as soon as the
    previous send is back. While jobs wait for a worker (and for a second after),
    or after a failed send, a send begins ``SIGNAL_QUEUE_LINGER`` seconds after
    the previous one ended, so that events gather into larger jobs. The request
    never waits for Redis. Lost if the process dies before the sender ran (see docs/guarantees.md).
``after_response``
    Events are held on the request and sent in one pipeline when the
    response is closed (after the body went out), on the request's thread.
``immediate``
    Each event is sent as it is emitted, on the request thread.

Events of receivers with ``discard_if_failed=True`` are held until the
request's outcome is known, and dropped if it failed (a 5xx response or an
unhandled exception), like django-rq's COMMIT_MODE.
"""

from __future__ import annotations

import atexit
import logging
import os
import threading
import time
import weakref
from collections import deque
from typing import Any

from flask import Flask, Response, has_request_context
from flask import request as request_proxy

from ..wire.receivers import receivers
from .capture import PendingEvent
from .dispatcher import Dispatcher

logger = logging.getLogger("signal_queue")

DELIVERY_MODES = ("background", "after_response", "immediate")
#: Pending events past which the request thread sends a batch itself.
BACKPRESSURE_AT = 2000
#: Seconds the sender keeps lingering after a send that found the workers behind (or failed):
#: without it, the small jobs of group commit would bring the backlog straight back.
BEHIND_HOLD = 1.0
_HELD = "signal_queue.held"
_OUTCOME = "signal_queue.outcome"
_FAILED, _OK = "failed", "ok"


class Outbox:
    """Takes events from the request thread and gets them to the :class:`Dispatcher`."""

    def __init__(self, app: Flask, dispatcher: Dispatcher, mode: str, linger: float, max_pending: int) -> None:
        self._app = weakref.ref(app)
        self.dispatcher = dispatcher
        self.mode = mode
        self.linger = linger
        self.max_pending = max_pending
        self._fast_limit = min(BACKPRESSURE_AT, max_pending)
        self._pending: deque[PendingEvent] = deque()
        self._wake = threading.Event()
        self._lock = threading.Lock()
        self._sending = threading.Lock()  # one flush at a time; drain() waits on it
        self._thread: threading.Thread | None = None
        self._pid = os.getpid()
        self._closed = False
        self._idle = False
        self._sent_at = 0.0  # time.monotonic() when the sender thread's last send ended
        # Until when a send waits LINGER after the previous one: BEHIND_HOLD after the last send that
        # found jobs waiting for a worker or failed (see _step), and for a new process's first events (_run).
        self._behind_until = 0.0
        _outboxes.add(self)
        # No sender thread yet, even if a previous process left spooled batches: a
        # gunicorn --preload master makes the app and then forks, and its thread would
        # not be in the children. The first event in a process starts the sender,
        # which replays the spool.

    # -- request thread ---------------------------------------------------------

    def put(self, event: PendingEvent) -> None:
        """Accept one event; never blocks on Redis in the background mode."""
        self.dispatcher.counters["emitted"] += 1
        holds = self.mode == "after_response" or event.receiver.discard_if_failed
        if not holds:
            if self.mode != "background":
                if not self.dispatcher.deliver([event]) or (self._thread is None and self.dispatcher.spool_dirty):
                    self._start()  # the sender replays the spool when Redis is back
            elif self._thread is not None and len(self._pending) < self._fast_limit:
                # The hot path: one append. A forked child has no sender thread (after_fork, run
                # by os.register_at_fork, clears it): its first event takes the path below.
                self._pending.append(event)
                if self._idle:
                    self._wake.set()
            else:
                self._enqueue_background([event])
            return
        if has_request_context():
            environ = request_proxy.environ
            outcome = environ.get(_OUTCOME)
            if outcome == _FAILED and event.receiver.discard_if_failed:
                self.dispatcher.counters["discarded"] += 1
                return
            if outcome is None or _HELD in environ:
                environ.setdefault(_HELD, []).append(event)
                return
        self._deliver([event])

    def _deliver(self, events: list[PendingEvent]) -> None:
        if self.mode == "background":
            self._enqueue_background(events)
        elif not self.dispatcher.deliver(events) or (self._thread is None and self.dispatcher.spool_dirty):
            self._start()  # the sender replays the spool (left by an earlier process, or just written)

    def _enqueue_background(self, events: list[PendingEvent]) -> None:
        if self._closed:
            self.dispatcher.deliver(events)
            return
        if self._pid != os.getpid():
            self.after_fork()
        if len(self._pending) + len(events) > self.max_pending:
            self._drop(events)
            return
        self._pending.extend(events)
        if self._thread is None:
            self._start()
        elif len(self._pending) >= BACKPRESSURE_AT and self.dispatcher.healthy:
            # The sender is not keeping up (a CPU-bound request loop can starve it
            # of the GIL): this request sends what is pending itself, rather than
            # let memory grow until events are dropped. Never while Redis is failing.
            self.dispatcher.counters["backpressure"] += 1
            self.flush()
        elif self._idle:
            self._wake.set()

    def _drop(self, events: list[PendingEvent]) -> None:
        self.dispatcher.report_loss(
            "dropped", events, f"were dropped: the outbox is full ({self.max_pending}, SIGNAL_QUEUE_MAX_PENDING)"
        )

    # -- request outcome (after_request / teardown / response close) -----------------

    def request_finished(self, response: Response) -> Response:
        """``after_request``: note the outcome; send held events when the response is closed."""
        environ = request_proxy.environ
        environ[_OUTCOME] = _FAILED if response.status_code >= 500 else _OK
        if _HELD in environ or self.mode == "after_response":
            environ.setdefault(_HELD, [])
            response.call_on_close(lambda: self.flush_held(environ))
        return response

    def request_torn_down(self, exc: BaseException | None) -> None:
        """``teardown_request``: without a response (the exception propagated), decide now."""
        environ = request_proxy.environ
        if exc is not None and environ.get(_OUTCOME) is None:
            environ[_OUTCOME] = _FAILED
            self.flush_held(environ)
            environ.pop(_HELD, None)

    def flush_held(self, environ: dict[str, Any]) -> None:
        held: list[PendingEvent] = environ.get(_HELD) or []
        environ[_HELD] = []
        failed = environ.get(_OUTCOME) == _FAILED
        keep = [e for e in held if not (failed and e.receiver.discard_if_failed)]
        if len(keep) < len(held):
            self.dispatcher.counters["discarded"] += len(held) - len(keep)
        if keep:
            self._deliver(keep)

    # -- sender thread -------------------------------------------------------------

    def _start(self) -> None:
        with self._lock:
            if self._thread is None and not self._closed:
                self._thread = threading.Thread(target=self._run, name="signal_queue-sender", daemon=True)
                self._thread.start()

    def after_fork(self) -> None:
        """In a forked child (gunicorn --preload, a worker's handler process): start empty, with fresh locks.

        The child must not send its parent's events again, nor wait on a lock a parent's
        thread held at the fork. Run in every child by ``os.register_at_fork`` (below).
        """
        self._pid = os.getpid()
        self._pending.clear()
        self._thread = None
        self._lock = threading.Lock()
        self._sending = threading.Lock()
        self._wake = threading.Event()
        self._sent_at = 0.0
        self._behind_until = 0.0

    def _run(self) -> None:
        if not self._sent_at:
            # The first events of a process gather for LINGER, as if a send that found the workers
            # behind had just ended.
            self._sent_at = time.monotonic()
            self._behind_until = self._sent_at + BEHIND_HOLD
        # The app is held weakly: an app made by a factory and dropped takes its sender with it.
        while not self._closed and self._app() is not None:
            try:
                self._step()
            except Exception:
                # A dead sender would silently stop every later event of this process.
                logger.exception("signal_queue: the sender failed; it carries on in 1 s")
                time.sleep(1.0)

    def _step(self) -> None:
        dispatcher = self.dispatcher
        if not self._pending:
            if dispatcher.spool_dirty and dispatcher.breaker.allow():
                dispatcher.replay()  # Redis is back (or may be): send what was spooled
            elif dispatcher.counts_unpublished and dispatcher.healthy:
                dispatcher.publish_counts()  # this host's counts of spooled and lost events, into sq:stats
            elif dispatcher.markers_due() and dispatcher.healthy:
                dispatcher.forget_markers()  # no send came to delete them: a quiet app leaves none behind
            # Idle is announced before the last look, so an event put after
            # that look always finds _idle set and wakes us.
            self._idle = True
            if not self._pending:
                self._wake.wait(max(dispatcher.breaker.retry_in, 0.05) if dispatcher.spool_dirty else 1.0)
            self._idle = False
            self._wake.clear()
            return
        # Group commit while the workers keep up: the next send begins as soon as the previous
        # one is back, with what gathered during it. While they are behind (the last send found
        # jobs waiting in the queue, or failed), a send begins at least LINGER after the previous
        # one ended, so that events gather into larger jobs, which cost a worker less each;
        # an event that finds the sender idle that long still goes at once.
        now = time.monotonic()
        if now < self._behind_until:
            wait = self._sent_at + self.linger - now
            if wait > 0:
                self._wake.wait(wait)  # close() cuts it short; puts do not wake a sender that is not idle
                self._wake.clear()
        sent = False
        try:
            sent = self._send_some()
        finally:
            self._sent_at = now = time.monotonic()
            if not sent or self.dispatcher.waiting > 0:
                self._behind_until = now + BEHIND_HOLD

    def _send_some(self) -> bool:
        """One send: up to ``max_events_per_send`` of the pending events. False if Redis did not take them."""
        with self._sending:
            batch = self._take()
            return self.dispatcher.deliver(batch) if batch else True

    def _take(self) -> list[PendingEvent]:
        batch: list[PendingEvent] = []
        pending, most = self._pending, self.dispatcher.max_events_per_send
        try:
            while len(batch) < most:
                batch.append(pending.popleft())
        except IndexError:
            pass
        return batch

    def flush(self) -> int:
        """Send everything pending now; return how many events were taken.

        When it returns, every event put before the call has been handed to
        Redis (or logged as not delivered), also those a concurrent flush took.
        """
        taken = 0
        with self._sending:
            while self._pending:
                batch = self._take()
                taken += len(batch)
                self.dispatcher.deliver(batch)
        return taken

    @property
    def app(self) -> Flask | None:
        return self._app()

    @property
    def pending(self) -> int:
        return len(self._pending)

    def close(self, timeout: float = 5.0) -> None:
        """Send what is pending, stop the sender thread and let go of Redis and the spool.

        Events put after this are sent on the caller's thread, as in the
        ``immediate`` mode: a closed outbox loses nothing, it only stops working
        in the background.
        """
        self._closed = True
        self._wake.set()
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)
        self._thread = None
        deadline = time.monotonic() + timeout
        while self._pending and time.monotonic() < deadline:
            self.flush()
        _outboxes.discard(self)
        self.dispatcher.close()


_outboxes: weakref.WeakSet[Outbox] = weakref.WeakSet()


def _after_fork_in_child() -> None:
    for outbox in list(_outboxes):
        outbox.after_fork()


os.register_at_fork(after_in_child=_after_fork_in_child)


@atexit.register
def _close_all() -> None:
    for outbox in list(_outboxes):
        if outbox._pid == os.getpid():
            outbox.close()


_hooked: weakref.WeakKeyDictionary[Flask, Outbox] = weakref.WeakKeyDictionary()


def install_request_hooks(app: Flask, outbox: Outbox) -> None:
    """Let the outbox learn each request's outcome, where something holds events.

    Only the ``after_response`` mode and ``discard_if_failed`` receivers need
    it, so other apps do not pay two hooks per request. A receiver may be
    registered after the app served requests, when Flask's setup methods are
    closed, so the hooks go straight into the documented hook lists.
    """
    if app in _hooked:
        return
    if outbox.mode != "after_response" and not any(r.discard_if_failed for r in receivers):
        return
    _hooked[app] = outbox
    app.after_request_funcs.setdefault(None, []).append(outbox.request_finished)
    app.teardown_request_funcs.setdefault(None, []).append(outbox.request_torn_down)


def install_hooks_everywhere() -> None:
    """After a ``discard_if_failed`` receiver is registered: hook every app already set up."""
    for outbox in list(_outboxes):
        app = outbox.app
        if app is not None:
            install_request_hooks(app, outbox)

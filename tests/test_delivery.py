"""Delivery modes: background (default), after_response, immediate; discard_if_failed receivers."""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from typing import Any

import pytest
import redis

from tests.conftest import drain, queued_events, run_worker, wait_until
from tests.delivery_app import create_app
from tests.recording import records
from tests.redis_server import free_port

APP = "tests.delivery_app:create_app()"


def wait_for_events(conn: redis.Redis, count: int, timeout: float = 10.0) -> int:
    """The events queued once ``count`` are, or at ``timeout`` (the caller asserts how many)."""
    with contextlib.suppress(AssertionError):
        wait_until(f"{count} queued events", lambda: queued_events(conn) >= count, timeout)
    return queued_events(conn)


def test_background_sender_delivers_without_being_asked(conn: redis.Redis) -> None:
    """The default mode returns before Redis is touched; the sender thread delivers on its own."""
    app = create_app()
    assert app.test_client().get("/ok/3", buffered=True).status_code == 200
    assert wait_for_events(conn, 4) == 4
    jobs = conn.llen("rq:queue:signals")
    assert jobs == 1, "the request's events travel in one batch job"


def test_background_batches_span_requests(conn: redis.Redis) -> None:
    """Events of many requests are sent together: far fewer jobs than requests."""
    app = create_app(SIGNAL_QUEUE_LINGER=0.2)
    client = app.test_client()
    for _ in range(20):
        client.get("/ok/1", buffered=True)
    drain(app)
    assert queued_events(conn) == 40
    assert conn.llen("rq:queue:signals") <= 2


def test_immediate_mode_enqueues_during_the_request(conn: redis.Redis) -> None:
    """immediate: each event is in Redis as soon as it is emitted."""
    app = create_app(SIGNAL_QUEUE_DELIVERY="immediate")
    app.test_client().get("/ok/2", buffered=True)
    assert queued_events(conn) == 3
    assert conn.llen("rq:queue:signals") == 3, "one job per emit"


def test_after_response_mode_sends_once_when_the_response_closes(conn: redis.Redis) -> None:
    """after_response: nothing before the response is closed, then all events in one pipeline."""
    app = create_app(SIGNAL_QUEUE_DELIVERY="after_response")
    response = app.test_client().get("/ok/4")
    assert queued_events(conn) == 0, "held until the response is closed"
    response.close()
    assert queued_events(conn) == 5
    assert conn.llen("rq:queue:signals") == 1


@pytest.mark.parametrize("mode", ["background", "after_response", "immediate"])
def test_discard_if_failed_drops_only_that_receiver_on_failure(conn: redis.Redis, redis_url: str, mode: str) -> None:
    """A 5xx or an exception drops discard_if_failed events; the others still run; success keeps both."""
    app = create_app(SIGNAL_QUEUE_DELIVERY=mode)
    client = app.test_client()
    assert client.get("/fail", buffered=True).status_code == 500
    assert client.get("/abort", buffered=True).status_code == 503
    assert client.get("/ok/1", buffered=True).status_code == 200
    drain(app)
    run_worker(APP, redis_url)
    seen = sorted((r["receiver"], r["request"]["path"]) for r in records(conn))
    assert seen == [("audit", "/abort"), ("audit", "/fail"), ("audit", "/ok/1"), ("welcome", "/ok/1")]
    assert app.extensions["signal_queue"].dispatcher.counters["discarded"] == 2


def test_discard_if_failed_when_the_exception_propagates(conn: redis.Redis) -> None:
    """With PROPAGATE_EXCEPTIONS the response never exists; teardown decides and still drops."""
    app = create_app(PROPAGATE_EXCEPTIONS=True)
    with pytest.raises(RuntimeError):
        app.test_client().get("/fail")
    drain(app)
    assert queued_events(conn) == 1
    assert app.extensions["signal_queue"].dispatcher.counters["discarded"] == 1


def test_full_outbox_drops_with_one_log_line(caplog: pytest.LogCaptureFixture) -> None:
    """Past SIGNAL_QUEUE_MAX_PENDING events are dropped and counted; the log is not flooded."""
    app = create_app(
        SIGNAL_QUEUE_REDIS_URL=f"redis://127.0.0.1:{free_port()}/0",
        SIGNAL_QUEUE_MAX_PENDING=3,
        SIGNAL_QUEUE_LINGER=10,
        SIGNAL_QUEUE_SOCKET_TIMEOUT=0.2,
    )
    with caplog.at_level(logging.ERROR, logger="signal_queue"):
        for _ in range(5):
            assert app.test_client().get("/ok/1", buffered=True).status_code == 200
    counters = app.extensions["signal_queue"].dispatcher.counters
    assert counters["dropped"] == 7
    assert caplog.text.count("the outbox is full") == 1
    assert "1 event(s) were dropped: the outbox is full (3, SIGNAL_QUEUE_MAX_PENDING)" in caplog.text
    app.extensions["signal_queue"].outbox._pending.clear()


def test_backpressure_sends_from_the_request_thread_when_the_sender_lags(conn: redis.Redis) -> None:
    """Past BACKPRESSURE_AT pending events, emitting sends a batch itself instead of growing memory."""
    from signal_queue.producer.outbox import BACKPRESSURE_AT
    from tests.delivery_app import audit

    app = create_app(SIGNAL_QUEUE_LINGER=10)  # a sender that waits 10 s, as a starved one would
    outbox = app.extensions["signal_queue"].outbox
    with app.app_context():
        for i in range(BACKPRESSURE_AT + 10):
            audit.send("loop", i=i)
        assert outbox.pending < BACKPRESSURE_AT
    assert queued_events(conn) >= BACKPRESSURE_AT
    assert app.extensions["signal_queue"].dispatcher.counters["backpressure"] >= 1
    drain(app)
    assert queued_events(conn) == BACKPRESSURE_AT + 10


def test_an_event_that_finds_the_sender_idle_goes_at_once(conn: redis.Redis) -> None:
    """SIGNAL_QUEUE_LINGER is the least time between two sends, not a wait before each one: an event
    emitted when the sender has not sent for that long is in Redis long before LINGER (10 s) is over."""
    from tests.delivery_app import audit

    app = create_app(SIGNAL_QUEUE_LINGER=10)
    outbox = app.extensions["signal_queue"].outbox
    outbox._sent_at = time.monotonic() - 60  # the sender's last send ended a minute ago
    with app.app_context():
        audit.send("idle", i=1)
    assert wait_for_events(conn, 1, timeout=5) == 1, "sent at once, not after the linger"
    app.extensions["signal_queue"].close()


def hold_sends(dispatcher: Any) -> tuple[threading.Event, threading.Event, list[int]]:
    """Make each of ``dispatcher``'s sends note its events, set ``entered`` and wait for ``release``."""
    send, entered, release, sends = dispatcher.send, threading.Event(), threading.Event(), []

    def held_send(batches: list[Any]) -> None:
        sends.append(sum(b.events for b in batches))
        entered.set()
        assert release.wait(10)
        send(batches)

    dispatcher.send = held_send
    return entered, release, sends


@pytest.mark.parametrize("linger", [0, 10])
def test_events_emitted_while_a_send_is_on_its_way_go_together_in_the_next(conn: redis.Redis, linger: int) -> None:
    """Group commit, whatever LINGER is while no job waits for a worker: the first event goes at once;
    the 20 emitted while that send is on its way gather and go in one send, one job, as soon as it
    is back (not LINGER after it)."""
    from tests.delivery_app import audit

    app = create_app(SIGNAL_QUEUE_LINGER=linger)
    outbox = app.extensions["signal_queue"].outbox
    outbox._sent_at = time.monotonic() - 60  # not a new process's first events, which gather
    entered, release, sends = hold_sends(app.extensions["signal_queue"].dispatcher)
    with app.app_context():
        audit.send("first", i=0)
        assert entered.wait(10), "the first event was sent at once"
        for i in range(1, 21):
            audit.send("meanwhile", i=i)
        release.set()
        assert wait_for_events(conn, 21, timeout=5) == 21, "sent right after the first send, not after LINGER"
    assert sends == [1, 20]
    assert conn.llen("rq:queue:signals") == 2
    app.extensions["signal_queue"].close()


def test_while_jobs_wait_for_a_worker_the_sender_lingers(conn: redis.Redis) -> None:
    """A send whose queue already held jobs no worker had taken (read from its RPUSH reply, no extra
    round trip) makes the next sends wait LINGER, so that events gather into larger jobs."""
    from tests.delivery_app import audit

    app = create_app(SIGNAL_QUEUE_LINGER=10)
    state = app.extensions["signal_queue"]
    state.outbox._sent_at = time.monotonic() - 60  # not a new process's first events, which gather
    with app.app_context():
        audit.send("first", i=0)
        wait_until("the first event's send", lambda: state.dispatcher.counters["enqueued"] == 1, timeout=5)
        assert state.dispatcher.waiting == 0, "the queue was empty"
        assert state.outbox._behind_until < time.monotonic()
        audit.send("second", i=1)  # no worker took the first job
        wait_until("the second event's send", lambda: state.dispatcher.counters["enqueued"] == 2, timeout=5)
        assert state.dispatcher.waiting == 1
        wait_until("the sender to linger", lambda: state.outbox._behind_until > time.monotonic(), timeout=5)
    drain(app)
    assert conn.llen("rq:queue:signals") == 2
    state.close()

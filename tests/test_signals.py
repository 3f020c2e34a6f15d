"""Built-in and custom signals reach deferred handlers in a real worker, with their sender and kwargs."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from typing import Any

import pytest
import redis

from tests.conftest import drain, queued_events, run_worker
from tests.recording import describe, records
from tests.signal_app import AppError, app, order_kwargs

APP = "tests.signal_app:app"
SENDER = "app:tests.signal_app"


def by_receiver(recs: list[dict[str, Any]], name: str) -> list[dict[str, Any]]:
    return [r for r in recs if r["receiver"] == name]


@pytest.fixture
def client(redis_url: str) -> Iterator[Any]:
    app.config["SIGNAL_QUEUE_EAGER"] = False
    yield app.test_client()
    app.config["SIGNAL_QUEUE_EAGER"] = False


def test_builtin_signals_run_in_the_worker_not_in_the_request(client: Any, conn: redis.Redis, redis_url: str) -> None:
    """Every Flask built-in signal is deferred; the request records nothing; the worker records all."""
    assert client.get("/page").status_code == 200
    assert client.get("/boom").status_code == 500
    drain(app)
    assert records(conn) == []
    assert queued_events(conn) == 16

    run_worker(APP, redis_url)

    recs = records(conn)
    assert Counter(r["receiver"] for r in recs) == {
        "request_started": 2,
        "request_finished": 2,
        "request_tearing_down": 2,
        "appcontext_pushed": 2,
        "appcontext_popped": 2,
        "appcontext_tearing_down": 2,
        "before_render_template": 1,
        "template_rendered": 1,
        "message_flashed": 1,
        "got_request_exception": 1,
    }
    # The worker's own contexts emitted nothing new: the queue is empty, nothing failed.
    assert conn.llen("rq:queue:signals") == 0
    assert conn.zcard("rq:failed:signals") == 0
    assert {r["sender"] for r in recs} == {SENDER}

    finished = {r["request"]["path"]: r["kwargs"]["response"] for r in by_receiver(recs, "request_finished")}
    assert finished["/page"] == {"status": 200, "body": "<p>hello, alice</p>"}
    assert finished["/boom"]["status"] == 500

    [exc] = by_receiver(recs, "got_request_exception")
    assert exc["kwargs"]["exception"] == {
        "exception": "tests.signal_app.AppError: ('bad thing', 42)\n",
        "args": ["bad thing", 42],
    }
    assert exc["request"]["path"] == "/boom" and exc["request"]["endpoint"] == "boom"

    [flashed] = by_receiver(recs, "message_flashed")
    assert flashed["kwargs"] == {"message": "saved", "category": "info"}
    assert flashed["g"] == {"current_user": "alice"}

    [rendered] = by_receiver(recs, "template_rendered")
    assert rendered["kwargs"]["template"] == "template:page.html"
    assert rendered["kwargs"]["greeting"] == "hello"
    assert rendered["kwargs"]["g"] == {"type": "_AppCtxGlobals", "repr": "<flask.g of 'tests.signal_app'>"}
    [before] = by_receiver(recs, "before_render_template")
    assert before["kwargs"] == {"template": "template:page.html", "greeting": "hello"}

    for popped in by_receiver(recs, "appcontext_popped"):
        assert popped["request"] is None, "appcontext_popped is sent after the request is gone"
    teardown = {r["request"]["path"]: r["kwargs"] for r in by_receiver(recs, "request_tearing_down")}
    assert teardown["/page"] == {"exc": None}
    assert len({r["event_id"] for r in recs}) == len(recs)


def test_custom_signal_kwargs_round_trip(client: Any, conn: redis.Redis, redis_url: str) -> None:
    """Tagged types (Decimal, datetime, UUID, tuple, set, bytes, a dict with the tag key) come back equal."""
    assert client.post("/order/5").status_code == 200
    drain(app)
    run_worker(APP, redis_url)
    [rec] = by_receiver(records(conn), "order_placed")
    assert rec["sender"] == "shop"
    assert rec["kwargs"] == describe(order_kwargs(5))
    assert rec["request"]["endpoint"] == "order" and rec["request"]["method"] == "POST"


def test_senders_follow_the_documented_rule(client: Any, conn: redis.Redis, redis_url: str) -> None:
    """An object sender becomes an OpaqueSender, a class sender is found again, None stays None."""
    client.get("/senders")
    drain(app)
    run_worker(APP, redis_url)
    senders = [r["sender"] for r in by_receiver(records(conn), "order_placed")]
    assert senders == [
        {"type": "OpaqueSender", "repr": "<Opaque thing>"},
        describe(AppError),
        None,
    ]


def test_async_view_send_and_send_async(client: Any, conn: redis.Redis, redis_url: str) -> None:
    """An async view can send_async to an async deferred receiver and send to a sync one."""
    assert client.get("/async").status_code == 200
    drain(app)
    run_worker(APP, redis_url)
    recs = records(conn)
    [async_rec] = by_receiver(recs, "async_signal")
    assert async_rec["sender"] == "async-view" and async_rec["kwargs"] == {"n": 1}
    assert async_rec["request"]["path"] == "/async"
    [sync_rec] = by_receiver(recs, "order_placed")
    assert sync_rec["sender"] == "from-async"


def test_handler_sending_a_signal_defers_a_new_event(client: Any, conn: redis.Redis, redis_url: str) -> None:
    """A signal a handler sends on purpose becomes a new event, with the original request's snapshot."""
    client.get("/chain")
    drain(app)
    assert queued_events(conn) == 7  # chain_start + 3 request and 3 appcontext signals
    run_worker(APP, redis_url)
    recs = records(conn)
    [start] = by_receiver(recs, "chain_start")
    [nxt] = by_receiver(recs, "chain_next")
    assert nxt["kwargs"] == {"step": 2} and nxt["sender"] == "worker"
    assert nxt["request"]["path"] == "/chain"
    assert nxt["request"]["request_id"] == start["request"]["request_id"]
    assert nxt["g"] == {"current_user": "carol"}
    assert nxt["event_id"] != start["event_id"]


def _comparable(recs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out = []
    for r in recs:
        r = dict(r, event_id=None)
        if r["request"]:
            r["request"] = dict(r["request"], request_id=None)
        out.append(r)
    return sorted(out, key=lambda r: (r["receiver"], str(r["request"]), str(r["kwargs"])))


def drive() -> None:
    client = app.test_client()
    client.get("/page")
    client.get("/boom")
    client.post("/order/9", headers={"Authorization": "Bearer s3cret", "X-Request-ID": "req-1"})
    client.get("/senders")
    client.get("/chain")


def test_eager_mode_gives_the_same_results_as_the_worker(client: Any, conn: redis.Redis, redis_url: str) -> None:
    """Eager mode runs handlers inline after the JSON round trip, seeing what the worker sees."""
    drive()
    drain(app)
    run_worker(APP, redis_url)
    from_worker = records(conn)
    conn.flushall()

    app.config["SIGNAL_QUEUE_EAGER"] = True
    drive()
    eager = records(conn)
    drain(app)
    assert conn.llen("rq:queue:signals") == 0, "eager mode enqueues nothing"
    assert len(from_worker) > 20
    assert _comparable(eager) == _comparable(from_worker)

"""The benchmark app: one view that emits N signals, with the receivers a user might pick instead.

``make_app(variant, n)`` builds it; ``BENCH_VARIANT`` and ``BENCH_N`` pick one
for gunicorn (``benchmarks.apps:env_app()``). Every variant's view does the same
work; only what listens to the signals differs. ``floor_bridge`` is not a
product: it is the least a bridge of signal_queue's shape does (see
:class:`FloorBridge`), a floor to read signal_queue's figures against.
"""

from __future__ import annotations

import os
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from blinker import Namespace
from flask import Flask, g, request

from benchmarks.lag_floor import FloorSender
from signal_queue import SignalQueue, deferred

VARIANTS = (
    "baseline",
    "inline_append",
    "inline_20ms",
    "naive_enqueue",
    "celery_delay",
    "thread_pool",
    "floor_bridge",
    "signal_queue",
    "signal_queue_after_response",
    "signal_queue_immediate",
)

bus = Namespace()
# signal_queue's variants send SQ_SIGNALS (deferred receivers); the others send SIGNALS,
# so that the two never meet in one process.
SIGNALS = [bus.signal(f"bench-{i}") for i in range(5)]
SQ_SIGNALS = [bus.signal(f"bench-sq-{i}") for i in range(5)]
LOG_DIR = tempfile.mkdtemp(prefix="sq-bench-")


def append_line(sender: Any, **kwargs: Any) -> None:
    """The article's receiver: one line appended to a file (what inline receivers do)."""
    with open(os.path.join(LOG_DIR, "access_audit.log"), "a") as log_file:
        log_file.write(f"[{time.time()}] {getattr(g, 'current_user', 'anonymous')} {request.path} {kwargs}\n")


def slow_call(sender: Any, **kwargs: Any) -> None:
    """A stand-in for an HTTP call or a slow query."""
    time.sleep(0.02)


def noop_job(**kwargs: Any) -> None:
    """What the naive bridge and Celery run in their workers."""


# signal_queue's receivers, one per signal, as a user would write them.
@deferred(SQ_SIGNALS[0])
def sq_receiver_0(sender: Any, **kwargs: Any) -> None: ...
@deferred(SQ_SIGNALS[1])
def sq_receiver_1(sender: Any, **kwargs: Any) -> None: ...
@deferred(SQ_SIGNALS[2])
def sq_receiver_2(sender: Any, **kwargs: Any) -> None: ...
@deferred(SQ_SIGNALS[3])
def sq_receiver_3(sender: Any, **kwargs: Any) -> None: ...
@deferred(SQ_SIGNALS[4])
def sq_receiver_4(sender: Any, **kwargs: Any) -> None: ...


_connected: list[Any] = []


def _connect(receiver: Any) -> None:
    for sig in SIGNALS:
        sig.connect(receiver, weak=False)
        _connected.append((sig, receiver))


def disconnect_all() -> None:
    while _connected:
        sig, receiver = _connected.pop()
        sig.disconnect(receiver)


def make_app(variant: str, n: int, redis_url: str) -> Flask:
    """The app for ``variant`` with a view that sends ``n`` signals."""
    if variant not in VARIANTS:
        raise SystemExit(f"unknown variant {variant!r}; one of {', '.join(VARIANTS)}")
    disconnect_all()
    app = Flask(f"bench_{variant}")
    uses_sq = variant.startswith("signal_queue")
    if uses_sq:
        delivery = {"signal_queue": "background"}.get(variant, variant.removeprefix("signal_queue_"))
        app.config.update(SIGNAL_QUEUE_REDIS_URL=redis_url, SIGNAL_QUEUE_DELIVERY=delivery)
        SignalQueue(app)
    elif variant == "inline_append":
        _connect(append_line)
    elif variant == "inline_20ms":
        _connect(slow_call)
    elif variant == "naive_enqueue":
        import redis
        from rq import Queue

        queue = Queue("naive", connection=redis.Redis.from_url(redis_url))

        def enqueue(sender: Any, **kwargs: Any) -> None:
            queue.enqueue(noop_job, **kwargs)

        _connect(enqueue)
    elif variant == "celery_delay":
        from celery import Celery

        celery = Celery("bench", broker=redis_url, backend=None)
        celery.conf.task_ignore_result = True
        task = celery.task(name="bench.noop")(noop_job)

        def delay(sender: Any, **kwargs: Any) -> None:
            task.delay(**kwargs)

        _connect(delay)
    elif variant == "floor_bridge":
        bridge = FloorBridge(redis_url, "floor:events")
        app.extensions["floor_bridge"] = bridge
        _connect(bridge.receiver)
    elif variant == "thread_pool":
        pool = ThreadPoolExecutor(max_workers=2)

        def submit(sender: Any, **kwargs: Any) -> None:
            pool.submit(append_line_off_request, kwargs)

        _connect(submit)
    signals = SQ_SIGNALS[:n] if uses_sq else [] if variant == "baseline" else SIGNALS[:n]

    @app.route("/orders/<int:order_id>")
    def order(order_id: int) -> dict[str, Any]:
        g.current_user = request.args.get("user", "guest")
        for sig in signals:
            sig.send("orders", order_id=order_id, action="view")
        return {"status": "ok", "order": order_id}

    return app


class FloorBridge(FloorSender):
    """The least a thread-based bridge in Python can do per event, for a floor to compare with.

    The receiver puts (time, sender, kwargs, path, user) in a deque and wakes an idle
    sender thread, which sends what gathered as one orjson list with one RPUSH
    (:class:`~benchmarks.lag_floor.FloorSender`). No validation, no headers, no ids, no
    redaction, no RQ job, no spool: nothing signal_queue promises, only its shape (the
    request thread hands over, a thread sends in batches).
    """

    def receiver(self, sender: Any, **kwargs: Any) -> None:
        self.put((time.time(), sender, kwargs, request.path, g.get("current_user")))


def flush(app: Flask) -> None:
    """Send what ``app``'s background sender holds (signal_queue's outbox, the floor bridge's), and wait."""
    state = app.extensions.get("signal_queue")
    if state is not None:
        state.outbox.flush()
    bridge = app.extensions.get("floor_bridge")
    if bridge is not None:
        bridge.flush()


def append_line_off_request(kwargs: dict[str, Any]) -> None:
    """The thread pool's job: the same file append, without the request (it is gone)."""
    with open(os.path.join(LOG_DIR, "pool.log"), "a") as log_file:
        log_file.write(f"[{time.time()}] {kwargs}\n")


def env_app() -> Flask:
    """For gunicorn: the variant and N from BENCH_VARIANT and BENCH_N."""
    return make_app(os.environ["BENCH_VARIANT"], int(os.environ["BENCH_N"]), os.environ["SIGNAL_QUEUE_REDIS_URL"])

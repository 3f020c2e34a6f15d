"""An app with deferred receivers on every Flask built-in signal and on custom signals."""

from __future__ import annotations

import asyncio
from typing import Any

from blinker import Namespace
from flask import (
    Flask,
    appcontext_popped,
    appcontext_pushed,
    appcontext_tearing_down,
    before_render_template,
    flash,
    g,
    got_request_exception,
    message_flashed,
    render_template,
    request_finished,
    request_started,
    request_tearing_down,
    template_rendered,
)

from signal_queue import SignalQueue, deferred
from tests.recording import record

signals = Namespace()
order_placed = signals.signal("order-placed")
async_signal = signals.signal("async-signal")
chain_start = signals.signal("chain-start")
chain_next = signals.signal("chain-next")


class AppError(Exception):
    """An exception type the worker can rebuild (importable, same args)."""


class Opaque:
    def __repr__(self) -> str:
        return "<Opaque thing>"


def create_app() -> Flask:
    app = Flask(__name__)
    app.secret_key = "test"
    SignalQueue(app)

    @app.route("/page")
    def page() -> str:
        g.current_user = "alice"
        flash("saved", "info")
        return render_template("page.html", greeting="hello")

    @app.route("/boom")
    def boom() -> str:
        raise AppError("bad thing", 42)

    @app.route("/order/<int:order_id>", methods=["POST"])
    def order(order_id: int) -> dict[str, Any]:
        from tests.signal_app import order_kwargs

        order_placed.send("shop", **order_kwargs(order_id))
        return {"ok": True}

    @app.route("/senders")
    def senders() -> str:
        order_placed.send(Opaque(), **order_kwargs(1))
        order_placed.send(AppError, **order_kwargs(2))
        order_placed.send(None, **order_kwargs(3))
        return "ok"

    @app.route("/async")
    async def async_view() -> str:
        await asyncio.sleep(0)
        await async_signal.send_async("async-view", n=1)
        order_placed.send("from-async", **order_kwargs(7))
        return "ok"

    @app.route("/chain")
    def chain() -> str:
        g.current_user = "carol"
        chain_start.send("view", step=1)
        return "ok"

    return app


def order_kwargs(order_id: int) -> dict[str, Any]:
    import datetime as dt
    import uuid
    from decimal import Decimal

    return {
        "order_id": order_id,
        "total": Decimal("12.50"),
        "placed_at": dt.datetime(2026, 11, 24, 12, 0, tzinfo=dt.timezone.utc),
        "ref": uuid.UUID("12345678-1234-5678-1234-567812345678"),
        "items": ("apple", "pear"),
        "tags": {"a", "b"},
        "blob": b"\x00\x01",
        "meta": {"__sq__": "not a tag", "nested": [1, 2.5, None, True]},
    }


app = create_app()


@deferred(request_started, sender=app)
def on_request_started(sender: Any, **kwargs: Any) -> None:
    record("request_started", sender, **kwargs)


@deferred(request_finished, sender=app)
def on_request_finished(sender: Any, response: Any, **kwargs: Any) -> None:
    record("request_finished", sender, response=response, **kwargs)


@deferred(got_request_exception, sender=app)
def on_exception(sender: Any, exception: BaseException, **kwargs: Any) -> None:
    record("got_request_exception", sender, exception=exception, **kwargs)


@deferred(request_tearing_down, sender=app)
def on_request_tearing_down(sender: Any, **kwargs: Any) -> None:
    record("request_tearing_down", sender, **kwargs)


@deferred(before_render_template, sender=app)
def on_before_render(sender: Any, template: Any, context: dict[str, Any], **kwargs: Any) -> None:
    record("before_render_template", sender, template=template, greeting=context["greeting"], **kwargs)


@deferred(template_rendered, sender=app)
def on_template_rendered(sender: Any, template: Any, context: dict[str, Any], **kwargs: Any) -> None:
    record("template_rendered", sender, template=template, greeting=context["greeting"], g=context["g"], **kwargs)


@deferred(message_flashed, sender=app)
def on_flash(sender: Any, message: str, category: str) -> None:
    record("message_flashed", sender, message=message, category=category)


@deferred(appcontext_pushed, sender=app)
def on_appcontext_pushed(sender: Any, **kwargs: Any) -> None:
    record("appcontext_pushed", sender, **kwargs)


@deferred(appcontext_popped, sender=app)
def on_appcontext_popped(sender: Any, **kwargs: Any) -> None:
    record("appcontext_popped", sender, **kwargs)


@deferred(appcontext_tearing_down, sender=app)
def on_appcontext_tearing_down(sender: Any, **kwargs: Any) -> None:
    record("appcontext_tearing_down", sender, **kwargs)


@deferred(order_placed)
def on_order(sender: Any, **kwargs: Any) -> None:
    record("order_placed", sender, **kwargs)


@deferred(async_signal)
async def on_async(sender: Any, n: int) -> None:
    await asyncio.sleep(0)
    record("async_signal", sender, n=n)


@deferred(chain_start)
def on_chain_start(sender: Any, step: int) -> None:
    record("chain_start", sender, step=step)
    chain_next.send("worker", step=step + 1)


@deferred(chain_next)
def on_chain_next(sender: Any, step: int) -> None:
    record("chain_next", sender, step=step)

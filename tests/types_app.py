"""An app with a kwarg type of its own (``Money``), registered with ``SignalQueue.register_type``,
a plain (not SQLAlchemy) Flask-Login user, and a kwarg no one can carry."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

from blinker import Namespace
from flask import Flask
from flask_login import LoginManager, UserMixin

from signal_queue import SignalQueue, deferred
from tests.recording import record

signals = Namespace()
paid = signals.signal("paid")
greeted = signals.signal("greeted")


@dataclass(frozen=True)
class Money:
    amount: Decimal
    currency: str


class Broken:
    """A type whose registered decoder fails in the worker."""

    def __init__(self, value: str) -> None:
        self.value = value


class Member(UserMixin):
    def __init__(self, user_id: str, name: str) -> None:
        self.id = user_id
        self.name = name


sq = SignalQueue()
sq.register_type(Money, encode=lambda m: [m.amount, m.currency], decode=lambda v: Money(*v), name="money")
sq.register_type(Broken, encode=lambda b: {"value": b.value}, decode=lambda v: Broken(v["no-such-key"]), name="broken")


def create_app(**config: Any) -> Flask:
    app = Flask(__name__)
    app.secret_key = "types"
    app.config.update(config)
    sq.init_app(app)
    login = LoginManager(app)

    @login.user_loader
    def load(user_id: str) -> Member | None:
        users = json.loads(os.environ.get("TYPES_USERS", "{}"))  # the users the test says exist now
        return Member(user_id, users[user_id]) if user_id in users else None

    @app.route("/pay/<amount>")
    def pay(amount: str) -> str:
        paid.send("shop", price=Money(Decimal(amount), "EUR"), note="ok")
        return "paid"

    @app.route("/pay-object")
    def pay_object() -> str:
        paid.send("shop", price=object(), note="unsendable")
        return "paid"

    @app.route("/pay-broken")
    def pay_broken() -> str:
        paid.send("shop", price=Broken("x"), note="broken")
        return "paid"

    @app.route("/greet/<user_id>/<name>")
    def greet(user_id: str, name: str) -> str:
        greeted.send("site", user=Member(user_id, name))
        return "hi"

    return app


@deferred(paid)
def on_paid(sender: Any, price: Any, note: str) -> None:
    record("paid", sender, price=repr(price), kind=type(price).__name__, note=note)


@deferred(greeted)
def on_greeted(sender: Any, user: Any) -> None:
    record("greeted", sender, kind=type(user).__name__, id=user.get_id(), user_name=user.name)

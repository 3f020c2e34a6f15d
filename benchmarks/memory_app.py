"""The app of the Redis memory benchmark: a logged-in user's request that sends one deferred signal.

``python worker.py --app benchmarks.memory_app:app`` runs its worker. The
request is a realistic one (see :data:`HEADERS`): ten headers, two of them
secrets that the snapshot redacts, a user that Flask-Login loads from the
``Authorization`` header, and a path with a query string.
"""

from __future__ import annotations

import os
from typing import Any

from blinker import Namespace
from flask import Flask, request
from flask_login import LoginManager, UserMixin, current_user

from signal_queue import SignalQueue, deferred

order_viewed = Namespace().signal("order-viewed")


class Member(UserMixin):
    """A user as an app's loader builds it: an id, a name, an e-mail address."""

    def __init__(self, user_id: str) -> None:
        self.id = user_id
        self.name = f"member {user_id}"
        self.email = f"member{user_id}@example.com"


def load(user_id: str) -> Member | None:
    return Member(user_id) if user_id.isdigit() else None


def headers(i: int) -> dict[str, str]:
    """Headers as a browser behind a proxy sends them: with Host (the test client adds it) and the
    Cookie of :func:`cookie`, ten; a bearer token and the cookie are redacted in the snapshot."""
    return {
        "User-Agent": "Mozilla/5.0 (X11; Linux x86_64; rv:128.0) Gecko/20100101 Firefox/128.0",
        "Accept": "text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8",
        "Accept-Language": "en-GB,en;q=0.7",
        "Accept-Encoding": "gzip, deflate, br",
        "Referer": "https://shop.example.com/orders?page=1",
        "Authorization": f"Bearer {100 + i % 1000}.tok{i:010d}",
        "X-Request-Id": f"req-{i:012d}",
        "X-Forwarded-For": f"203.0.113.{i % 250}",
    }


def cookie(i: int) -> str:
    """The session cookie's value (the test client sends the Cookie header from its own jar)."""
    return f"eyJfdXNlcl9pZCI6IjEyMyJ9.Zk{i:08d}.abcdefghijklmnopqrstuvwx"


def path(i: int) -> str:
    return f"/shop/orders/{10_000 + i}?tab=items&page={1 + i % 5}"


def create_app() -> Flask:
    app = Flask(__name__)
    app.secret_key = "memory-benchmark"
    app.config["SIGNAL_QUEUE_REDIS_URL"] = os.environ.get("SIGNAL_QUEUE_REDIS_URL", "redis://127.0.0.1:6379/0")
    SignalQueue(app)
    login = LoginManager(app)
    login.user_loader(load)

    @login.request_loader
    def from_token(req: Any) -> Member | None:
        token = req.headers.get("Authorization", "").removeprefix("Bearer ")
        return load(token.split(".", 1)[0]) if token else None

    @app.get("/shop/orders/<int:order_id>")
    def order(order_id: int) -> dict[str, Any]:
        order_viewed.send(app, order_id=order_id, viewer=current_user.get_id(), tab=request.args.get("tab"))
        return {"order": order_id}

    return app


@deferred(order_viewed)
def audit_view(sender: Any, order_id: int, viewer: str | None, tab: str | None) -> None:
    """Trivial: the benchmark measures what the events leave in Redis, not the handler."""


app = create_app()

"""An app for the rq-dashboard tests: receivers that fail (once, or every attempt) and one that waits.

The routes carry secrets where requests do (a query parameter, a path argument, a header, a
kwarg); the tests check that none of them reaches a job's description or meta.
"""

from __future__ import annotations

from typing import Any

import redis
from blinker import Namespace
from flask import Flask, current_app, g
from rq import Retry

from signal_queue import SignalQueue, deferred

bus = Namespace()
logged_in = bus.signal("user_logged_in")
reset_asked = bus.signal("password_reset_asked")
paid = bus.signal("payment_made")
report = bus.signal("report_asked")

#: The Redis key the waiting receiver polls; a test sets it to let the receiver return.
RELEASE_KEY = "sq:test:release"
#: The key the waiting receiver sets once it runs, so a test knows the worker is busy.
WAITING_KEY = "sq:test:waiting"


def create_app(**config: Any) -> Flask:
    app = Flask(__name__)
    app.config.update(config)
    SignalQueue(app)

    @app.route("/login", methods=["POST"])
    def login() -> str:
        g.current_user = "42"
        logged_in.send("auth", password="s3cr3t-kwarg")
        return "ok"

    @app.route("/reset/<token>")
    def reset(token: str) -> str:
        g.current_user = "7"
        reset_asked.send("auth", token=token)
        return "ok"

    @app.route("/pay", methods=["POST"])
    def pay() -> str:
        paid.send("shop", amount=3)
        return "ok"

    @app.route("/report")
    def report_view() -> str:
        report.send("reports")
        return "ok"

    return app


@deferred(logged_in)
def audit_login(sender: Any, password: str) -> None:
    # Markup in an exception message, as when one quotes what a client sent.
    raise RuntimeError("audit store down for <img src=x onerror=alert(1)>")


@deferred(reset_asked)
def mail_reset_link(sender: Any, token: str) -> None:
    raise RuntimeError("mail server down")


@deferred(paid, retry=Retry(max=1, interval=0))
def book_payment(sender: Any, amount: int) -> None:
    raise RuntimeError(f"ledger refused {amount}")


@deferred(report)
def build_report(sender: Any) -> None:
    """Waits until the test releases it (at most 60 s), so the worker stays busy meanwhile."""
    conn = redis.Redis.from_url(current_app.config["SIGNAL_QUEUE_REDIS_URL"])
    conn.set(WAITING_KEY, 1)
    conn.blpop([RELEASE_KEY], timeout=60)

"""An app whose deferred receiver records the rebuilt request: headers, client IP, user."""

from __future__ import annotations

from typing import Any

from blinker import Namespace
from flask import Flask, current_app, g, has_request_context, request
from flask_login import LoginManager, UserMixin, current_user, login_user
from werkzeug.middleware.proxy_fix import ProxyFix

from signal_queue import SignalQueue, current_event, deferred
from tests.recording import record

probe = Namespace().signal("probe")
USERS = {"42": "Ada Lovelace"}


class User(UserMixin):
    def __init__(self, user_id: str) -> None:
        self.id = user_id
        self.name = USERS[user_id]


def create_app(proxies: int = 0, **config: Any) -> Flask:
    """``proxies``: X-Forwarded-For hops the app trusts, with werkzeug's ProxyFix."""
    app = Flask(__name__)
    if proxies:
        app.wsgi_app = ProxyFix(app.wsgi_app, x_for=proxies)  # type: ignore[method-assign]
    app.secret_key = "test"
    app.config.update(config)
    SignalQueue(app)
    login = LoginManager(app)

    @login.user_loader
    def load_user(user_id: str) -> User | None:
        return User(user_id) if user_id in USERS else None

    @app.route("/probe/<name>", methods=["GET", "POST"])
    def view(name: str) -> str:
        g.tenant = "acme"
        g.not_json = object()
        probe.send("view")
        return "ok"

    @app.route("/login-probe")
    def login_probe() -> str:
        login_user(User("42"))
        probe.send("view")
        return "ok"

    return app


@deferred(probe)
def on_probe(sender: Any) -> None:
    extra: dict[str, Any] = {"has_request": has_request_context(), "app_name": current_app.name}
    if has_request_context():
        extra["login_user"] = current_user.get_id() if current_user.is_authenticated else None
        extra["login_name"] = getattr(current_user, "name", None)
        extra["client_ip"] = current_event.request.client_ip if current_event.request else None
        extra["peer"] = current_event.request.remote_addr if current_event.request else None
        extra["args"] = request.args.to_dict()
    extra["emitted_at_tz"] = str(current_event.emitted_at.tzinfo)
    record("probe", sender, **extra)

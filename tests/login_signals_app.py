"""An app that defers an audit receiver on each of Flask-Login's signals; Flask-Login drives them.

Users are plain ``UserMixin`` objects that the ``user_loader`` and the
``request_loader`` (header ``X-Token: <id>``) build from :data:`USERS`, so the
worker reloads the same ones.
"""

from __future__ import annotations

from typing import Any

from blinker import Namespace
from flask import Flask, request
from flask_login import (
    LoginManager,
    UserMixin,
    confirm_login,
    current_user,
    fresh_login_required,
    login_required,
    login_user,
    logout_user,
    session_protected,
    user_accessed,
    user_loaded_from_cookie,
    user_loaded_from_request,
    user_logged_in,
    user_logged_out,
    user_login_confirmed,
    user_needs_refresh,
    user_unauthorized,
)

from signal_queue import SignalQueue, deferred
from tests.ext_recording import audit

USERS = {"1": "ada", "2": "grace"}

SIGNALS = (
    user_logged_in,
    user_logged_out,
    user_loaded_from_cookie,
    user_loaded_from_request,
    user_login_confirmed,
    user_unauthorized,
    user_needs_refresh,
    user_accessed,
    session_protected,
)


class Member(UserMixin):
    def __init__(self, user_id: str, name: str) -> None:
        self.id = user_id
        self.name = name
        self.email = f"{name}@example.com"


def load(user_id: str) -> Member | None:
    return Member(user_id, USERS[user_id]) if user_id in USERS else None


#: Sent by :func:`load_and_tell`, a user_loader that sends a signal of the app's own.
user_seen = Namespace().signal("user-seen")


def load_and_tell(user_id: str) -> Member | None:
    user_seen.send("loader", user_id=user_id)
    return load(user_id)


def create_app(loader_sends: bool = False) -> Flask:
    app = Flask(__name__)
    app.secret_key = "login-signals"
    SignalQueue(app)
    for signal in SIGNALS:  # for this app only: other tests' apps send these signals too
        deferred(signal, sender=app)(audit)
    login = LoginManager(app)
    login.user_loader(load_and_tell if loader_sends else load)
    if loader_sends:
        deferred(user_seen)(audit)

    @login.request_loader
    def from_header(req: Any) -> Member | None:
        token = req.headers.get("X-Token")
        return load(token) if token else None

    @app.post("/login/<user_id>")
    def log_in(user_id: str) -> str:
        login_user(load(user_id), remember=True)
        return "in"

    @app.get("/me")
    def me() -> str:
        return str(current_user.get_id())

    @app.get("/private")
    @login_required
    def private() -> str:
        return "private"

    @app.get("/fresh")
    @fresh_login_required
    def fresh() -> str:
        return "fresh"

    @app.post("/confirm")
    def confirm() -> str:
        confirm_login()
        return "confirmed"

    @app.post("/logout")
    def log_out() -> str:
        logout_user()
        return request.path

    return app

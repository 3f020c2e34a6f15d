"""An app that defers an audit receiver on Flask-Principal's two signals, used as its docs say.

Logging in sends ``identity_changed`` with an ``Identity``; Flask-Principal then sends
``identity_loaded``, and sends it again on each request, from the identity in the session.
"""

from __future__ import annotations

from typing import Any

from blinker import Namespace
from flask import Flask, current_app, session
from flask_principal import (
    AnonymousIdentity,
    Identity,
    ItemNeed,
    Principal,
    RoleNeed,
    UserNeed,
    identity_changed,
    identity_loaded,
)

from signal_queue import SignalQueue, deferred
from tests.ext_recording import audit
from tests.recording import record

SIGNALS = (identity_changed, identity_loaded)

elevated = Namespace().signal("elevated")


def add_needs(sender: Any, identity: Identity) -> None:
    """The app's own identity_loaded receiver, inline as Flask-Principal's docs have it."""
    if identity.auth_type == "password":
        identity.provides.add(UserNeed(identity.id))


def create_app() -> Flask:
    app = Flask(__name__)
    app.secret_key = "principal-signals"
    SignalQueue(app)
    for signal in SIGNALS:  # for this app only: other tests' apps send these signals too
        deferred(signal, sender=app)(audit)
    Principal(app)
    identity_loaded.connect(add_needs, app, weak=False)

    @app.post("/login/<user_id>")
    def log_in(user_id: str) -> str:
        identity_changed.send(current_app._get_current_object(), identity=Identity(user_id, "password"))
        return "in"

    @app.get("/page")
    def page() -> str:
        return "page"

    @app.post("/logout")
    def log_out() -> str:
        for key in ("identity.name", "identity.auth_type"):
            session.pop(key, None)
        identity_changed.send(current_app._get_current_object(), identity=AnonymousIdentity())
        return "out"

    @app.post("/elevate/<user_id>")
    def elevate(user_id: str) -> str:
        identity = Identity(user_id, "token")
        identity.provides.update({RoleNeed("admin"), ItemNeed("update", 27, "posts"), ("custom", "need")})
        identity.display_name = "Ada"
        identity.session_token = object()  # named like a secret: sent as [REDACTED], whatever it is
        elevated.send("security", identity=identity)
        return "elevated"

    return app


@deferred(elevated)
def on_elevated(sender: Any, identity: Identity) -> None:
    needs = " | ".join(sorted(map(repr, identity.provides)))
    record(
        "elevated", sender, kind=type(identity).__name__, id=identity.id, auth_type=identity.auth_type,
        needs=needs, display_name=identity.display_name, has_token=hasattr(identity, "session_token"),
    )

"""An app whose signals carry secrets by name: a password in a form, a token, a model's password hash."""

from __future__ import annotations

import os
from typing import Any

from blinker import Namespace
from flask import Flask, g, request
from flask_sqlalchemy import SQLAlchemy

from signal_queue import SignalQueue, deferred
from tests.recording import record

bus = Namespace()
signed_up = bus.signal("signed-up")
reset_asked = bus.signal("reset-asked")
db = SQLAlchemy()


class Account(db.Model):  # type: ignore[name-defined,misc]
    id = db.Column(db.Integer, primary_key=True)
    email = db.Column(db.String(120))
    password_hash = db.Column(db.String(200))


def create_app(**config: Any) -> Flask:
    app = Flask(__name__)
    app.config.update(
        SQLALCHEMY_DATABASE_URI=f"sqlite:///{os.environ.get('SECRET_DB', '/tmp/secret-app.sqlite3')}", **config
    )
    db.init_app(app)
    SignalQueue(app)

    @app.route("/signup")
    def signup() -> str:
        account = Account(email="ada@example.com", password_hash="pbkdf2:sha256$hunter2-hash")
        db.session.add(account)
        db.session.commit()
        g.api_key = "k-hunter2-key"
        g.tenant = "acme"
        signed_up.send(
            "site",
            form_data={"email": "ada@example.com", "password": "hunter2", "password_confirm": "hunter2"},
            confirm_token="tok-hunter2",
            account=account,
        )
        return "ok"

    @app.route("/reset/<reset_token>/<int:step>")
    def reset(reset_token: str, step: int) -> str:
        reset_asked.send("site", step=step)
        return "ok"

    with app.app_context():
        db.create_all()
    return app


@deferred(signed_up)
def on_signed_up(sender: Any, form_data: Any, confirm_token: Any, account: Any) -> None:
    record(
        "signed-up", sender, form=form_data, token=confirm_token,
        account={"email": account.email, "password_hash": account.password_hash},
    )


@deferred(reset_asked)
def on_reset_asked(sender: Any, step: int) -> None:
    record("reset-asked", sender, step=step, args=request.args.to_dict(), view_args=request.view_args)

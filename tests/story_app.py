"""An app whose audit receivers use Flask-Login's and Flask-SQLAlchemy's own signals.

The receivers' bodies are the same inline and deferred: ``STORY_DEFERRED=1``
marks them ``@deferred``, otherwise they are connected as ordinary receivers.
``STORY_DB`` is the SQLite file, ``STORY_LOG`` the audit log they append to.
"""

from __future__ import annotations

import os
from typing import Any

from flask import Flask, request
from flask_login import LoginManager, UserMixin, login_user, logout_user, user_logged_in
from flask_sqlalchemy import SQLAlchemy
from flask_sqlalchemy.track_modifications import models_committed

from signal_queue import SignalQueue, deferred

db = SQLAlchemy()
LOG = os.environ.get("STORY_LOG", "story.log")


class User(UserMixin, db.Model):  # type: ignore[name-defined,misc]
    id = db.Column(db.Integer, primary_key=True)
    email = db.Column(db.String(120), nullable=False)


def audit_login(sender: Any, user: Any, **extra: Any) -> None:
    with open(LOG, "a") as log:
        log.write(f"login {user.id} {user.email} {request.path} {request.remote_addr}\n")


def audit_changes(sender: Any, changes: Any) -> None:
    with open(LOG, "a") as log:
        for obj, change in changes:
            log.write(f"{change} {type(obj).__name__} {obj.id} {obj.email} {request.path} {request.remote_addr}\n")


if os.environ.get("STORY_DEFERRED") == "1":
    deferred(user_logged_in)(audit_login)
    deferred(models_committed)(audit_changes)
else:
    user_logged_in.connect(audit_login)
    models_committed.connect(audit_changes)


def create_app() -> Flask:
    app = Flask(__name__)
    app.config.update(
        SECRET_KEY="story",
        SQLALCHEMY_DATABASE_URI=f"sqlite:///{os.environ.get('STORY_DB', '/tmp/story.sqlite3')}",
        SQLALCHEMY_TRACK_MODIFICATIONS=True,
    )
    db.init_app(app)
    SignalQueue(app)
    login = LoginManager(app)

    @login.user_loader
    def load_user(user_id: str) -> User | None:
        return db.session.get(User, int(user_id))

    @app.post("/register")
    def register() -> str:
        user = User(email=request.args["email"])
        db.session.add(user)
        db.session.commit()
        return str(user.id)

    @app.post("/login/<int:user_id>")
    def log_in(user_id: int) -> str:
        login_user(db.session.get(User, user_id))
        return "in"

    @app.post("/rename/<int:user_id>")
    def rename(user_id: int) -> str:
        db.session.get(User, user_id).email = request.args["email"]
        db.session.commit()
        return "renamed"

    @app.post("/logout")
    def log_out() -> str:
        logout_user()
        return "out"

    @app.post("/delete/<int:user_id>")
    def delete(user_id: int) -> str:
        db.session.delete(db.session.get(User, user_id))
        db.session.commit()
        return "deleted"

    with app.app_context():
        db.create_all()
    return app

"""An app that defers an audit receiver on every signal of Flask-Security (the maintained
Flask-Security-Too) and of the Flask-Principal it sends through; Flask-Security drives them.

``SECURITY_SIGNALS_DB`` is the SQLite file, shared by the test's app and its worker. Users
are Flask-Security's SQLAlchemy models (``fsqla_v4`` where the release has it, else ``fsqla_v3``).
Flask-Security's own views send the signals, called with JSON as a single-page app calls them;
``create_app(passwordless=True)`` turns on the (deprecated) passwordless login, whose ``/login``
sends ``login_instructions_sent``. ``wan_registered`` and ``wan_deleted`` need a WebAuthn
authenticator, so ``/webauthn/<name>`` sends them exactly as ``flask_security/webauthn.py`` does.
"""

from __future__ import annotations

import os
import warnings
from typing import Any

import blinker
import flask_security.signals
from flask import Flask, request
from flask_mail import Mail
from flask_principal import identity_changed, identity_loaded
from flask_security import Security, SQLAlchemyUserDatastore, UsernameUtil, auth_required, current_user
from flask_sqlalchemy import SQLAlchemy

from signal_queue import SignalQueue, deferred
from tests.ext_recording import audit

try:
    from flask_security.models import fsqla_v4 as fsqla
    from flask_security.tokens import RefreshTokenErrors
except ImportError:  # before Flask-Security-Too 5.9: no refresh tokens
    from flask_security.models import fsqla_v3 as fsqla  # type: ignore[no-redef]

    RefreshTokenErrors = None

#: Every signal of the installed release's signals module, in the order it defines them.
SECURITY_SIGNALS = tuple(v for v in vars(flask_security.signals).values() if isinstance(v, blinker.NamedSignal))
SIGNALS = (*SECURITY_SIGNALS, identity_changed, identity_loaded)

db = SQLAlchemy()
fsqla.FsModels.set_db_info(db)


class Role(db.Model, fsqla.FsRoleMixin):  # type: ignore[name-defined,misc]
    pass


class User(db.Model, fsqla.FsUserMixin):  # type: ignore[name-defined,misc]
    pass


RefreshTracker: Any = None
if hasattr(fsqla, "FsRefreshTrackerMixin"):

    class FsRefreshTracker(db.Model, fsqla.FsRefreshTrackerMixin):  # type: ignore[name-defined,misc]
        pass

    RefreshTracker = FsRefreshTracker

class PlainUsernames(UsernameUtil):
    """Usernames of 4 to 32 letters and digits, checked without an HTML sanitizer: Flask-Security's
    own needs nh3 (bleach before 5.7), which the username signals do not need to be tested."""

    def normalize(self, username: str) -> str | None:
        return username.strip() or None

    def validate(self, username: str) -> tuple[str | None, str | None]:
        if not username:
            return None, None
        if not (username.isalnum() and 4 <= len(username) <= 32):
            return "a username is 4 to 32 letters and digits", None
        return None, username


mail = Mail()
#: With the one register_type line of docs/extensions.md for refresh_tracker_revoked's refresh_errors.
sq = SignalQueue()
if RefreshTokenErrors is not None:
    sq.register_type(RefreshTokenErrors, encode=lambda e: e.name, decode=lambda n: RefreshTokenErrors[n])
#: Without it.
plain = SignalQueue()


def create_app(passwordless: bool = False, register_types: bool = True) -> Flask:
    app = Flask(__name__)
    app.config.update(
        SECRET_KEY="security-signals",
        SQLALCHEMY_DATABASE_URI=f"sqlite:///{os.environ['SECURITY_SIGNALS_DB']}",
        WTF_CSRF_ENABLED=False,
        MAIL_SUPPRESS_SEND=True,
        MAIL_DEFAULT_SENDER="security@example.com",
        SECURITY_PASSWORD_SALT="salt",
        SECURITY_EMAIL_VALIDATOR_ARGS={"check_deliverability": False},
        SECURITY_PASSWORD_HASH="plaintext",
        SECURITY_REGISTERABLE=True,
        SECURITY_CONFIRMABLE=True,
        SECURITY_RECOVERABLE=True,
        SECURITY_CHANGEABLE=True,
        SECURITY_CHANGE_EMAIL=True,
        SECURITY_USERNAME_ENABLE=True,
        SECURITY_USERNAME_RECOVERY=True,
        SECURITY_CHANGE_USERNAME=True,
        SECURITY_TWO_FACTOR=True,
        SECURITY_TWO_FACTOR_ENABLED_METHODS=["email"],
        SECURITY_UNIFIED_SIGNIN=True,
        SECURITY_US_ENABLED_METHODS=["password", "email"],
        SECURITY_TOTP_SECRETS={"1": "TjQ9Qa31VOrfEzuPy4VHQWPCTmRzCnFzMKLxXYiZu9B"},
        SECURITY_TOTP_ISSUER="signal_queue",
        SECURITY_RETURN_GENERIC_RESPONSES=True,
        SECURITY_REFRESH_TOKEN=True,
        SECURITY_REFRESH_TOKEN_COOKIE_NAME=None,
        SECURITY_PASSWORDLESS=passwordless,
    )
    db.init_app(app)
    mail.init_app(app)
    (sq if register_types else plain).init_app(app)
    for signal in SIGNALS:  # for this app (the last one made) only: other tests' apps send these signals too
        deferred(signal, sender=app)(audit)
    models = {"refresh_tracker_model": RefreshTracker} if RefreshTracker is not None else {}
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "The passwordless feature was deprecated", DeprecationWarning)
        Security(app, SQLAlchemyUserDatastore(db, User, Role, **models), username_util_cls=PlainUsernames)

    @app.get("/protected")
    @auth_required()
    def protected() -> str:
        return "protected"

    @app.post("/webauthn/<name>")
    @auth_required()
    def webauthn(name: str) -> str:
        """wan_registered and wan_deleted need an authenticator: sent here exactly as webauthn.py sends them."""
        flask_security.signals.wan_registered.send(app, user=current_user, name=name)
        flask_security.signals.wan_deleted.send(app, user=current_user, name=name)
        return request.path

    with app.app_context():
        db.create_all()
    return app

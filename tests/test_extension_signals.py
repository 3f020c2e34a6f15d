"""The catalogue (docs/extensions.md): popular extensions' own signals, driven by the real
extension, reach a deferred receiver in a real worker as they reach an inline receiver."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import redis
from flask import Flask

from signal_queue import PayloadError
from signal_queue._state import DEFAULT_REDACT_FIELDS
from signal_queue.metrics import prometheus_text
from signal_queue.wire.codec import Codec
from tests import (
    login_signals_app,
    mail_signals_app,
    principal_signals_app,
    security_signals_app,
    sqla_signals_app,
)
from tests.conftest import ROOT, drain, run_worker
from tests.ext_recording import by_signal, inline_audits, seen
from tests.recording import records

_SECRET = Codec(redact_fields=DEFAULT_REDACT_FIELDS).secret


def as_redacted(value: Any) -> Any:
    """What an inline receiver saw, with the fields the bridge keeps from Redis as [REDACTED]."""
    if isinstance(value, dict):
        return {k: "[REDACTED]" if _SECRET(k) else as_redacted(v) for k, v in value.items()}
    if isinstance(value, list):
        return [as_redacted(v) for v in value]
    return value


#: Flask-Security's views whose URL rule ends in ``/<token>`` (flask_security/views.py).
_TOKEN_LINK = re.compile(
    r"^/(login|us-setup|tf-setup|reset|change-email|confirm|wan-register|wan-signin|wan-verify)/[^/]+$"
)


def token_path(path: str | None) -> str | None:
    """A Flask-Security link's path as the worker sees it: its ``<token>`` argument as [REDACTED]."""
    return None if path is None else _TOKEN_LINK.sub(r"/\1/[REDACTED]", path)


def compare(conn: redis.Redis) -> tuple[dict[str, list[dict[str, Any]]], dict[str, list[dict[str, Any]]]]:
    entries = seen(conn)
    return by_signal(entries, "inline"), by_signal(entries, "worker")


def test_every_flask_login_signal_reaches_the_worker_as_it_reaches_inline(conn: redis.Redis, redis_url: str) -> None:
    """Each of Flask-Login's nine signals, sent by Flask-Login itself: the worker sees what inline sees."""
    app = login_signals_app.create_app()
    client = app.test_client()
    with inline_audits(login_signals_app.SIGNALS):
        statuses = [
            client.get("/private").status_code,  # user_accessed, user_unauthorized
            client.post("/login/1").status_code,  # user_logged_in
            client.get("/me").status_code,  # user_accessed
            # another address with the same session: user_accessed, session_protected (basic: not fresh)
            client.get("/me", environ_base={"REMOTE_ADDR": "10.9.9.9"}).status_code,
            client.get("/fresh", environ_base={"REMOTE_ADDR": "10.9.9.9"}).status_code,  # user_needs_refresh
            client.post("/confirm").status_code,  # user_login_confirmed
        ]
        remember = client.get_cookie("remember_token")
        assert remember is not None
        statuses.append(client.post("/logout").status_code)  # user_accessed, user_logged_out
        by_cookie = app.test_client()
        by_cookie.set_cookie("remember_token", remember.value)
        statuses.append(by_cookie.get("/me").status_code)  # user_accessed, user_loaded_from_cookie
        statuses.append(app.test_client().get("/me", headers={"X-Token": "2"}).status_code)  # ..._from_request
    assert statuses == [401, 200, 200, 200, 401, 200, 200, 200, 200]
    drain(app)
    run_worker("tests.login_signals_app:create_app()", redis_url)
    inline, worker = compare(conn)
    assert sorted(inline) == sorted(s.name for s in login_signals_app.SIGNALS), "every signal was sent"
    assert worker == inline
    assert conn.zcard("rq:failed:signals") == 0
    ada = {"user": "Member", "get_id": "1", "authenticated": True, "id": "1", "name": "ada", "email": "ada@example.com"}
    assert [e["kwargs"] for e in worker["logged-in"]] == [{"user": ada}]
    assert [e["kwargs"] for e in worker["logged-out"]] == [{"user": ada}]
    assert [e["kwargs"] for e in worker["loaded-from-cookie"]] == [{"user": ada}]
    assert worker["loaded-from-request"][0]["kwargs"]["user"]["name"] == "grace"
    # Once per request that loads the user, as inline. /confirm never reads current_user, but the
    # forwarding receiver of user_login_confirmed does, to capture the user: that loads it.
    assert [e["path"] for e in worker["accessed"]] == [
        "/private", "/me", "/me", "/fresh", "/confirm", "/logout", "/me", "/me"
    ]


def test_a_user_loader_that_sends_a_deferred_signal_does_not_recurse(conn: redis.Redis, redis_url: str) -> None:
    """The capture of the user while the user_loader runs does not load the user again and again."""
    app = login_signals_app.create_app(loader_sends=True)
    client = app.test_client()
    assert client.post("/login/1").status_code == 200
    assert client.get("/me").status_code == 200
    drain(app)
    run_worker("tests.login_signals_app:create_app(loader_sends=True)", redis_url)
    # The view's load of the user runs the loader; capturing the user for that event loads it once
    # more (the user is not set until the first load returns), and that second event has no user.
    assert [e["kwargs"] for e in by_signal(seen(conn), "worker")["user-seen"]] == [{"user_id": "1"}] * 2
    assert conn.zcard("rq:failed:signals") == 0


def test_flask_sqlalchemy_changes_reach_the_worker_by_value(
    conn: redis.Redis, redis_url: str, tmp_path: Path, monkeypatch: Any
) -> None:
    """models_committed and before_models_committed: inserts, an update and a delete, two per commit."""
    monkeypatch.setenv("SQLA_SIGNALS_DB", str(tmp_path / "books.sqlite3"))
    app = sqla_signals_app.create_app()
    client = app.test_client()
    with inline_audits(sqla_signals_app.SIGNALS):
        assert client.post("/books").status_code == 200
        assert client.post("/reprice-and-drop").status_code == 200
    drain(app)
    run_worker("tests.sqla_signals_app:create_app()", redis_url)
    inline, worker = compare(conn)
    assert worker == inline
    assert conn.zcard("rq:failed:signals") == 0
    [added, changed] = [e["kwargs"]["changes"] for e in worker["models-committed"]]
    assert added == {"list": [
        {"tuple": [{"model": "Book", "id": 1, "title": "Notes",
                    "price": {"type": "Decimal", "repr": "Decimal('12.50')"},
                    "published": {"datetime": "1843-10-01T09:30:00"}, "in_print": True}, "insert"]},
        {"tuple": [{"model": "Book", "id": 2, "title": "Sketch", "price": None, "published": None, "in_print": False},
                   "insert"]},
    ]}
    assert sorted((c["tuple"][0]["id"], c["tuple"][1], c["tuple"][0]["title"]) for c in changed["list"]) == [
        (1, "update", "Notes"), (2, "delete", "Sketch")
    ]
    # Before the commit's flush, new rows have no id yet: inline and in the worker alike.
    [before_added, _] = [e["kwargs"]["changes"] for e in worker["before-models-committed"]]
    assert [c["tuple"][0]["id"] for c in before_added["list"]] == [None, None]


def test_flask_principal_identities_reach_the_worker_as_identities(conn: redis.Redis, redis_url: str) -> None:
    """identity_changed and identity_loaded: the worker gets an Identity (or AnonymousIdentity) again."""
    app = principal_signals_app.create_app()
    client = app.test_client()
    with inline_audits(principal_signals_app.SIGNALS):
        assert client.post("/login/7").status_code == 200  # (no identity yet), identity_changed, ..._loaded
        assert client.get("/page").status_code == 200  # identity_loaded, from the session
        assert client.post("/logout").status_code == 200  # identity_loaded, identity_changed, identity_loaded
    drain(app)
    run_worker("tests.principal_signals_app:create_app()", redis_url)
    inline, worker = compare(conn)
    assert worker == inline
    assert conn.zcard("rq:failed:signals") == 0
    assert [e["kwargs"]["identity"] for e in worker["identity-changed"]] == [
        {"identity": "Identity", "id": "7", "auth_type": "password"},
        {"identity": "AnonymousIdentity", "id": None, "auth_type": None},
    ]
    assert [(e["path"], e["kwargs"]["identity"]["identity"]) for e in worker["identity-loaded"]] == [
        ("/login/7", "Identity"), ("/page", "Identity"), ("/logout", "Identity"), ("/logout", "AnonymousIdentity")
    ]


def test_an_identity_keeps_its_class_needs_and_attributes(conn: redis.Redis, redis_url: str) -> None:
    """Need and ItemNeed come back as themselves, other needs as tuples; a secret attribute comes as [REDACTED]."""
    app = principal_signals_app.create_app()
    assert app.test_client().post("/elevate/7").status_code == 200
    drain(app)
    run_worker("tests.principal_signals_app:create_app()", redis_url)
    [rec] = records(conn)
    assert rec["kwargs"] == {
        "kind": "Identity", "id": "7", "auth_type": "token", "display_name": "Ada", "has_token": True,
        "needs": "('custom', 'need') | ItemNeed(method='update', value=27, type='posts') | "
                 "Need(method='role', value='admin')",
    }


def test_flask_mail_message_reaches_the_worker_with_one_register_type_line(conn: redis.Redis, redis_url: str) -> None:
    """email_dispatched: with the one register_type line for Message, the worker's message reads as inline."""
    app = mail_signals_app.create_app(register=True)
    with inline_audits(mail_signals_app.SIGNALS):
        assert app.test_client().post("/welcome").status_code == 200
    drain(app)
    run_worker("tests.mail_signals_app:create_app(register=True)", redis_url)
    inline, worker = compare(conn)
    assert worker == inline
    [event] = worker["email-dispatched"]
    message = event["kwargs"]["message"]["message"]
    assert (message["subject"], message["sender"], message["cc"]) == (
        "Welcome", "Shop <shop@example.com>", {"list": ["audit@example.com"]}
    )
    assert message["recipients"] == {"list": ["ada@example.com", {"tuple": ["Grace", "grace@example.com"]}]}


def test_flask_mail_message_without_the_line_is_recorded_as_failed_not_a_500(conn: redis.Redis, redis_url: str) -> None:
    """Without the line, the message cannot be carried: no 500 in production, the event is in the failed registry."""
    app = mail_signals_app.create_app(register=False)
    with inline_audits(mail_signals_app.SIGNALS):
        assert app.test_client().post("/welcome").status_code == 200
    drain(app)
    run_worker("tests.mail_signals_app:create_app(register=False)", redis_url)
    inline, worker = compare(conn)
    assert len(inline["email-dispatched"]) == 1 and worker == {}
    assert "\nsignal_queue_process_unsendable_total 1\n" in prometheus_text(app), "counted"
    [failed] = failed_rows(redis_url, "tests.mail_signals_app:create_app(register=False)")
    assert "kwarg message could not be carried to the worker: flask_mail.Message is not JSON-serializable" in (
        failed["error"]
    )
    app.testing = True  # while a developer looks, it raises at emit instead
    with app.test_request_context(), pytest.raises(PayloadError, match="kwarg message cannot be sent"):
        mail_signals_app.mail.send(mail_signals_app.Message("Hi", recipients=["ada@example.com"]))


def failed_rows(url: str, app: str) -> list[dict[str, Any]]:
    """``flask signal-queue failed --json``, run as a user would."""
    env = dict(os.environ, PYTHONPATH=str(ROOT), SIGNAL_QUEUE_REDIS_URL=url)
    out = subprocess.run(
        [sys.executable, "-m", "flask", "--app", app, "signal-queue", "failed", "--json"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=60,
    )
    assert out.returncode == 0, out.stderr
    rows: list[dict[str, Any]] = json.loads(out.stdout)
    return rows


class SecurityClient:
    """Flask-Security's JSON API through the test client, and a worker that keeps up."""

    def __init__(self, app: Flask, conn: redis.Redis, redis_url: str, worker_app: str) -> None:
        self.app, self.conn, self.redis_url, self.worker_app = app, conn, redis_url, worker_app
        self.client = app.test_client()

    def call(self, method: str, url: str, body: dict[str, Any] | None = None, status: int = 200) -> Any:
        response = self.client.open(url, method=method, json=body, headers={"Accept": "application/json"})
        assert response.status_code == status, (url, response.status_code, response.get_data(as_text=True)[:500])
        return response.get_json()["response"] if response.is_json else None

    def sent(self, signal: str, key: str) -> Any:
        """The ``key`` kwarg of the last ``signal`` the inline receiver saw (a token a user would get by mail)."""
        return [e for e in seen(self.conn) if e["where"] == "inline" and e["signal"] == signal][-1]["kwargs"][key]

    def keep_up(self) -> None:
        """Run the worker now, before the next request changes what the events' users read."""
        drain(self.app)
        run_worker(self.worker_app, self.redis_url)


# Flask-Security's own code warns: its two-factor forms pass SelectField choices as wtforms 3.3
# deprecates (5.9), and 5.6 calls its own deprecated get_token_status.
@pytest.mark.filterwarnings("ignore:Passing SelectField choices as tuples:DeprecationWarning")
@pytest.mark.filterwarnings("ignore:'get_token_status' is deprecated:DeprecationWarning")
def test_every_flask_security_signal_reaches_the_worker_as_it_reaches_inline(
    conn: redis.Redis, redis_url: str, tmp_path: Path, monkeypatch: Any
) -> None:
    """Every signal of the installed Flask-Security-Too (and Flask-Principal's), sent by its views:
    the worker sees what an inline receiver sees: users reloaded, identities, refresh trackers, tokens."""
    monkeypatch.setenv("SECURITY_SIGNALS_DB", str(tmp_path / "security.sqlite3"))
    app = security_signals_app.create_app()
    fs = SecurityClient(app, conn, redis_url, "tests.security_signals_app:create_app()")
    pw = "battery horse staple"
    refresh_tokens = security_signals_app.RefreshTokenErrors is not None
    with inline_audits(security_signals_app.SIGNALS):
        ada = {"email": "ada@example.com", "password": pw, "password_confirm": pw, "username": "adalovelace"}
        fs.call("POST", "/register", ada)  # user_registered
        fs.call("POST", "/register", dict(ada, username="someoneelse"))  # user_not_registered (generic responses)
        fs.call("POST", "/confirm", {"email": "ada@example.com"})  # confirm_instructions_sent
        fs.keep_up()
        fs.call("GET", f"/confirm/{fs.sent('user-registered', 'confirm_token')}", status=302)  # user_confirmed
        fs.call("POST", "/login", {"email": "ada@example.com", "password": "wrong password"}, 400)  # ..._failed_authn
        fs.call("GET", "/protected", status=401)  # user_unauthenticated
        # user_authenticated, identity_changed, identity_loaded, refresh_tracker_created
        first = fs.call("POST", "/login?include_auth_token", {"email": "ada@example.com", "password": pw})
        if refresh_tokens:
            old = first["user"]["refresh_token"]
            fs.call("POST", "/refresh-token", {"refresh_token": old})
            fs.call("POST", "/refresh-token", {"refresh_token": old}, 400)  # reused: refresh_tracker_revoked
        fs.call("POST", "/change", {"password": pw, "new_password": pw + "!", "new_password_confirm": pw + "!"})
        fs.call("POST", "/change-email", {"email": "ada@lovelace.org"})  # change_email_instructions_sent
        fs.keep_up()
        fs.call("GET", f"/change-email/{fs.sent('change-email-instructions-sent', 'token')}", status=302)
        fs.keep_up()
        fs.call("POST", "/change-username", {"username": "countess"})  # username_changed
        fs.call("POST", "/webauthn/key1")  # wan_registered, wan_deleted
        state = fs.call("POST", "/us-setup", {"chosen_method": "email"})["state"]  # us_security_token_sent
        fs.call("POST", f"/us-setup/{state}", {"passcode": fs.sent("us-security-token-sent", "token")})
        fs.call("POST", "/tf-setup", {"setup": "email"})  # tf_security_token_sent
        fs.keep_up()
        fs.call("POST", "/tf-validate", {"code": fs.sent("tf-security-token-sent", "token")})  # tf_profile_changed
        fs.call("POST", "/logout")
        fs.call("POST", "/recover-username", {"email": "ada@lovelace.org"})  # username_recovery_email_sent
        fs.call("POST", "/reset", {"email": "ada@lovelace.org"})  # reset_password_instructions_sent
        fs.call("POST", f"/reset/{fs.sent('password-reset-instructions-sent', 'token')}",
                {"password": pw + "?", "password_confirm": pw + "?"})  # password_reset
        fs.call("POST", "/login", {"email": "ada@lovelace.org", "password": pw + "?"})  # tf_security_token_sent
        fs.keep_up()
        code = fs.sent("tf-security-token-sent", "token")
        second = fs.call("POST", "/tf-validate?include_auth_token", {"code": code})  # tf_code_confirmed, ...
        fs.keep_up()
        fs.call("POST", "/tf-setup", {"setup": "disable"})  # tf_disabled
        fs.call("POST", "/logout", {"refresh_token": second["user"]["refresh_token"]} if refresh_tokens else None)
        fs.keep_up()

        passwordless = security_signals_app.create_app(passwordless=True)
        SecurityClient(passwordless, conn, redis_url, "").call("POST", "/login", {"email": "ada@lovelace.org"})
        fs.app = passwordless
        fs.keep_up()  # login_instructions_sent
    inline, worker = compare(conn)
    assert sorted(inline) == sorted({s.name for s in security_signals_app.SIGNALS}), "every signal was sent"
    # The one difference: the new user has no id yet when Flask-Security sends user_registered (its
    # views commit after the response); the worker's user_loader reloads the committed row, id and all.
    [registered] = worker["user-registered"]
    assert (inline["user-registered"][0]["kwargs"]["user"]["id"], registered["kwargs"]["user"]["id"]) == (None, 1)
    inline["user-registered"][0]["kwargs"]["user"]["id"] = 1
    # Tokens and passwords (confirm_token, form_data["password"]...) stay in the process, and so do the
    # tokens in Flask-Security's links (/confirm/<token>, /reset/<token>...).
    redacted = {
        name: [dict(e, kwargs=as_redacted(e["kwargs"]), path=token_path(e["path"])) for e in events]
        for name, events in inline.items()
    }
    assert worker == redacted
    assert worker != inline, "Flask-Security's signals carry secrets, which the worker sees as [REDACTED]"
    assert conn.zcard("rq:failed:signals") == 0
    assert registered["kwargs"]["user"] == {
        "user": "User", "get_id": registered["kwargs"]["user"]["fs_uniquifier"], "authenticated": True, "id": 1,
        "email": "ada@example.com", "username": "adalovelace", "active": True,
        "fs_uniquifier": registered["kwargs"]["user"]["fs_uniquifier"], "confirmed_at": None,
        "tf_primary_method": None,
    }
    # Flask-Security sends the password in form_data: it never leaves the process (SIGNAL_QUEUE_REDACT_FIELDS).
    assert registered["kwargs"]["form_data"]["password"] == "[REDACTED]"
    [confirmed] = worker["user-confirmed"]
    assert confirmed["kwargs"]["user"]["confirmed_at"] is not None
    assert worker["change-email"][0]["kwargs"]["old_email"] == "ada@example.com"
    assert worker["change-email"][0]["kwargs"]["user"]["email"] == "ada@lovelace.org"
    assert [e["kwargs"]["identity"]["identity"] for e in worker["identity-changed"]][-1] == "AnonymousIdentity"
    if refresh_tracker := worker.get("refresh-tracker-revoked"):
        assert [e["kwargs"]["refresh_errors"] for e in refresh_tracker] == [
            {"enum": "RefreshTokenErrors.GEN_MISMATCH"}, None
        ]
        assert refresh_tracker[0]["kwargs"]["refresh_tracker"]["model"] == "FsRefreshTracker"


@pytest.mark.skipif(security_signals_app.RefreshTokenErrors is None, reason="refresh tokens came in Flask-Security 5.9")
def test_flask_security_refresh_errors_without_the_line_are_recorded_as_failed(
    conn: redis.Redis, redis_url: str, tmp_path: Path, monkeypatch: Any
) -> None:
    """Without the line for RefreshTokenErrors, a revoke for a reused refresh token is recorded as failed, not a 500."""
    monkeypatch.setenv("SECURITY_SIGNALS_DB", str(tmp_path / "security.sqlite3"))
    app = security_signals_app.create_app(register_types=False)
    worker_app = "tests.security_signals_app:create_app(register_types=False)"
    fs = SecurityClient(app, conn, redis_url, worker_app)
    pw = "battery horse staple"
    with inline_audits(security_signals_app.SIGNALS):
        fs.call("POST", "/register", {"email": "ada@example.com", "password": pw, "password_confirm": pw,
                                      "username": "adalovelace"})
        fs.call("GET", f"/confirm/{fs.sent('user-registered', 'confirm_token')}", status=302)
        old = fs.call("POST", "/login?include_auth_token", {"email": "ada@example.com", "password": pw})
        fs.call("POST", "/refresh-token", {"refresh_token": old["user"]["refresh_token"]})
        fs.call("POST", "/refresh-token", {"refresh_token": old["user"]["refresh_token"]}, 400)
    fs.keep_up()
    inline, worker = compare(conn)
    assert len(inline["refresh-tracker-revoked"]) == 1 and "refresh-tracker-revoked" not in worker
    [row] = failed_rows(redis_url, worker_app)
    assert (row["signal"], row["path"]) == ("refresh-tracker-revoked", "/refresh-token")
    assert "kwarg refresh_errors could not be carried to the worker: flask_security.tokens.RefreshTokenErrors" in (
        row["error"]
    )

"""An app that defers an audit receiver on Flask-Mail's ``email_dispatched``; ``mail.send`` drives it.

``create_app(register=True)`` uses the one-line ``register_type`` of docs/extensions.md
for ``flask_mail.Message``; without it, the message is a kwarg the bridge cannot carry.
"""

from __future__ import annotations

from flask import Flask
from flask_mail import Mail, Message, email_dispatched

from signal_queue import SignalQueue, deferred
from tests.ext_recording import audit

SIGNALS = (email_dispatched,)

mail = Mail()
plain = SignalQueue()
with_message = SignalQueue()
with_message.register_type(
    Message, name="flask_mail.Message",
    encode=lambda m: {k: getattr(m, k) for k in ("subject", "sender", "recipients", "cc", "bcc", "reply_to",
                                                 "body", "html", "date", "extra_headers")},
    decode=lambda fields: Message(**fields),
)


def create_app(register: bool = True) -> Flask:
    app = Flask(__name__)
    app.config.update(MAIL_SUPPRESS_SEND=True, MAIL_DEFAULT_SENDER=("Shop", "shop@example.com"))
    mail.init_app(app)
    (with_message if register else plain).init_app(app)
    deferred(email_dispatched, sender=app)(audit)  # for this app only: other tests' apps send mail too

    @app.post("/welcome")
    def welcome() -> str:
        mail.send(Message(
            "Welcome", recipients=["ada@example.com", ("Grace", "grace@example.com")], cc=["audit@example.com"],
            body="Hello", html="<p>Hello</p>", extra_headers={"X-Campaign": "welcome"},
        ))
        return "sent"

    return app

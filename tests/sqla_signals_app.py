"""An app that defers an audit receiver on Flask-SQLAlchemy's two signals; commits drive them.

``SQLA_SIGNALS_DB`` is the SQLite file, shared by the test's app and its worker.
"""

from __future__ import annotations

import datetime as dt
import os
from decimal import Decimal

from flask import Flask, request
from flask_sqlalchemy import SQLAlchemy
from flask_sqlalchemy.track_modifications import before_models_committed, models_committed

from signal_queue import SignalQueue, deferred
from tests.ext_recording import audit

db = SQLAlchemy()
SIGNALS = (models_committed, before_models_committed)


class Book(db.Model):  # type: ignore[name-defined,misc]
    id = db.Column(db.Integer, primary_key=True)
    title = db.Column(db.String(200), nullable=False)
    price = db.Column(db.Numeric(10, 2))
    published = db.Column(db.DateTime)
    in_print = db.Column(db.Boolean, default=True)


def create_app() -> Flask:
    app = Flask(__name__)
    app.config.update(
        SQLALCHEMY_DATABASE_URI=f"sqlite:///{os.environ['SQLA_SIGNALS_DB']}",
        SQLALCHEMY_TRACK_MODIFICATIONS=True,
    )
    db.init_app(app)
    SignalQueue(app)
    for signal in SIGNALS:  # for this app only: other tests' apps send these signals too
        deferred(signal, sender=app)(audit)

    @app.post("/books")
    def add_books() -> str:
        when = dt.datetime(1843, 10, 1, 9, 30)
        db.session.add_all([
            Book(title="Notes", price=Decimal("12.50"), published=when),
            Book(title="Sketch", price=None, published=None, in_print=False),
        ])
        db.session.commit()
        return request.path

    @app.post("/reprice-and-drop")
    def reprice_and_drop() -> str:
        db.session.get(Book, 1).price = Decimal("20.00")
        db.session.delete(db.session.get(Book, 2))
        db.session.commit()
        return request.path

    with app.app_context():
        db.create_all()
    return app

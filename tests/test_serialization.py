"""The JSON codec: exceptions rebuilt or stood in for, with the same printed text."""

from __future__ import annotations

import json
import traceback

from flask import Flask

from signal_queue import OpaqueSender, RemoteException
from signal_queue.wire.codec import Codec


class Unprintable(Exception):
    pass


def round_trip(codec: Codec, value: object) -> object:
    app = Flask(__name__)
    encoded = json.loads(json.dumps(codec.encode(value, "value")))
    with app.app_context():
        return codec.decode(encoded)


def raised(exc: BaseException) -> BaseException:
    try:
        raise exc
    except BaseException as caught:
        return caught


def test_exception_with_a_type_the_worker_lacks_becomes_a_same_named_stand_in() -> None:
    """A type that is not importable in the worker gives a RemoteException printing the same text."""
    codec = Codec()
    exc = raised(Unprintable("boom", 1))
    encoded = codec.encode(exc, "e")
    encoded["module"] = "not_imported.anywhere"
    with Flask(__name__).app_context():
        rebuilt = codec.decode(json.loads(json.dumps(encoded)))
    assert isinstance(rebuilt, RemoteException)
    assert type(rebuilt).__module__ == "not_imported.anywhere"
    assert type(rebuilt).__qualname__ == "Unprintable"
    assert traceback.format_exception_only(type(rebuilt), rebuilt) == [
        "not_imported.anywhere.Unprintable: ('boom', 1)\n"
    ]
    assert "raise exc" in rebuilt.remote_traceback


def test_exception_with_unserializable_args_keeps_its_text() -> None:
    """Args that are not JSON: a stand-in of the same type name, with the same message."""
    exc = raised(ValueError(object()))
    rebuilt = round_trip(Codec(), exc)
    assert isinstance(rebuilt, RemoteException) and not isinstance(rebuilt, ValueError)
    assert traceback.format_exception_only(type(rebuilt), rebuilt) == traceback.format_exception_only(
        type(exc), exc
    )


def test_rebuildable_exception_keeps_type_args_and_notes() -> None:
    """An importable type with JSON args comes back as that type, with its notes."""
    exc = raised(KeyError("missing"))
    exc.add_note("while loading the cart")
    rebuilt = round_trip(Codec(), exc)
    assert type(rebuilt) is KeyError and rebuilt.args == ("missing",)
    assert traceback.format_exception_only(type(rebuilt), rebuilt) == traceback.format_exception_only(
        type(exc), exc
    )


def test_opaque_sender_keeps_type_and_repr() -> None:
    """An arbitrary object sender becomes an OpaqueSender with its type name and repr."""
    codec = Codec()

    class Thing:
        def __repr__(self) -> str:
            return "<Thing 7>"

    encoded = json.loads(json.dumps(codec.encode_sender(Thing())))
    sender = codec.decode_sender(encoded)
    assert sender == OpaqueSender(f"{__name__}.test_opaque_sender_keeps_type_and_repr.<locals>.Thing", "<Thing 7>")
    assert repr(sender) == "<Thing 7>"

"""Flask-Principal identities as kwargs: carried by value, rebuilt in the worker.

``identity_changed`` and ``identity_loaded`` send ``identity=<Identity>``, and
Flask-Security sends ``identity_changed`` on every login and logout. An
identity is a small value: its ``id``, its ``auth_type`` and the needs it
``provides``. So it is carried as it was when the forwarding receiver ran. The
worker builds an instance of the same class (an ``AnonymousIdentity`` stays
anonymous) with the same id, auth type and needs (``Need`` and ``ItemNeed``
tuples again), plus the other public attributes that can be carried (such as
the ``identity.user`` that Flask-Security sets, a user reloaded like any
user kwarg); attributes that cannot be carried are left out.

Without Flask-Principal installed the carrier matches nothing.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from .codec import NOT_MINE, TAG, Codec, resolve_loaded

try:
    from flask_principal import Identity, ItemNeed, Need
except ImportError:  # Flask-Principal is optional
    Identity = ItemNeed = Need = None

#: The attributes every identity has; the others are carried when they can be.
_OWN = ("id", "auth_type", "provides")


class IdentityCarrier:
    """The codec's carrier of Flask-Principal identities (tag ``identity``)."""

    tag = "identity"

    def encode(self, codec: Codec, value: Any, key: str, depth: int) -> Any:
        if Identity is None or not isinstance(value, Identity):
            return NOT_MINE
        cls = type(value)
        needs = [_encode_need(codec, need, f"{key}.provides", depth + 1) for need in value.provides]
        extra = codec.encode_attributes(vars(value), key, depth, skip=_OWN)
        return {
            TAG: "identity",
            "class": f"{cls.__module__}:{cls.__qualname__}",
            "id": codec.encode(value.id, f"{key}.id", depth + 1),
            "auth_type": codec.encode(value.auth_type, f"{key}.auth_type", depth + 1),
            "provides": needs,
            "attrs": extra,
        }

    def decode(self, codec: Codec, value: Mapping[str, Any], depth: int) -> Any:
        if Identity is None:
            raise ValueError("the event carries a Flask-Principal identity, but Flask-Principal is not installed")
        module, _, qualname = str(value.get("class")).partition(":")
        cls = resolve_loaded(module, qualname)
        if not (isinstance(cls, type) and issubclass(cls, Identity)):
            cls = Identity
        needs, attrs = value.get("provides"), value.get("attrs")
        if not isinstance(needs, list) or not isinstance(attrs, dict):
            raise ValueError(f"identity {module}:{qualname}: its needs or attributes are malformed")
        identity = object.__new__(cls)  # AnonymousIdentity's __init__ takes no id
        identity.__dict__.update({name: codec.decode(attr, depth + 1) for name, attr in attrs.items()})
        identity.id = codec.decode(value.get("id"), depth + 1)
        identity.auth_type = codec.decode(value.get("auth_type"), depth + 1)
        identity.provides = {_decode_need(codec, need, depth + 1) for need in needs}
        return identity


def _encode_need(codec: Codec, need: Any, key: str, depth: int) -> list[Any]:
    """``[kind, items]``: kind ``Need`` or ``ItemNeed`` for Flask-Principal's own tuples, else ``""``."""
    for kind, cls in (("ItemNeed", ItemNeed), ("Need", Need)):
        if isinstance(need, cls):
            return [kind, codec.encode(list(need), key, depth + 1)]
    return ["", codec.encode(need, key, depth + 1)]


def _decode_need(codec: Codec, need: Any, depth: int) -> Any:
    if not (isinstance(need, list) and len(need) == 2):
        raise ValueError(f"a need of an identity is malformed: {need!r}")
    kind, items = need
    decoded = codec.decode(items, depth + 1)
    if kind == "Need":
        return Need(*decoded)
    if kind == "ItemNeed":
        return ItemNeed(*decoded)
    return decoded

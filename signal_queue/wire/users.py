"""Flask-Login users as kwargs: carried by id, reloaded in the worker by the app's ``user_loader``.

``user_logged_in`` and its siblings send ``user=<the user object>``. The worker
reloads it as Flask-Login reloads ``current_user``: through the app's
``user_loader``. A user deleted since (the loader returns None) still reaches
the receiver as an object with the id and the attributes captured at emit (a
detached model instance when the user is a SQLAlchemy model), so an audit of
"deleted the account" can still read ``user.email``.

A value counts as a user when the app has a ``LoginManager`` and the value has
``get_id()``; the anonymous user is carried as such.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from flask import current_app, has_app_context

from .codec import NOT_MINE, TAG, Codec, Unserializable, resolve_loaded
from .models import encode_columns, instance_state, rebuild


class CapturedUser:
    """A user the worker could not reload (deleted since): its id and the attributes captured at emit."""

    is_authenticated = True
    is_active = True
    is_anonymous = False

    def __init__(self, user_id: str, type_name: str, attrs: Mapping[str, Any]) -> None:
        self.__dict__.update(attrs)
        self.id_at_emit = user_id
        self.type_name = type_name

    def get_id(self) -> str:
        return self.id_at_emit

    def __repr__(self) -> str:
        return f"<CapturedUser {self.type_name} id={self.id_at_emit!r}>"


class UserCarrier:
    """The codec's carrier of Flask-Login users (tag ``user``)."""

    tag = "user"

    def encode(self, codec: Codec, value: Any, key: str, depth: int) -> Any:
        if isinstance(value, type) or not callable(getattr(value, "get_id", None)):
            return NOT_MINE
        if not has_app_context() or getattr(current_app, "login_manager", None) is None:
            return NOT_MINE
        try:
            user_id = value.get_id()
        except Exception as exc:
            raise Unserializable(key, value, f"its get_id() raised {exc!r}") from None
        cls = type(value)
        state = instance_state(value)
        if state is not None:
            attrs: Any = encode_columns(codec, value, state, key, depth)
        else:
            attrs = codec.encode_attributes(vars(value), key, depth)
        return {
            TAG: "user",
            "id": None if user_id is None else str(user_id),
            "class": f"{cls.__module__}:{cls.__qualname__}",
            "attrs": attrs,
        }

    def decode(self, codec: Codec, value: Mapping[str, Any], depth: int) -> Any:
        manager = getattr(current_app, "login_manager", None)
        if manager is None:
            raise ValueError("the event carries a Flask-Login user, but this worker's app has no LoginManager")
        user_id = value.get("id")
        if user_id is None:
            return manager.anonymous_user()
        # Flask-Login has no public way to call the user_loader; this is the name it uses itself.
        loader = getattr(manager, "_user_callback", None)
        user = loader(str(user_id)) if loader is not None else None
        if user is not None:
            return user
        return self._captured(codec, str(user_id), value, depth)

    @staticmethod
    def _captured(codec: Codec, user_id: str, value: Mapping[str, Any], depth: int) -> Any:
        attrs = value.get("attrs")
        type_name = str(value.get("class"))
        if isinstance(attrs, dict) and attrs.get(TAG) == "model":
            return rebuild(codec, attrs, depth + 1)
        decoded = {k: codec.decode(v, depth + 1) for k, v in attrs.items()} if isinstance(attrs, dict) else {}
        module, _, qualname = type_name.partition(":")
        cls = resolve_loaded(module, qualname)
        if isinstance(cls, type) and callable(getattr(cls, "get_id", None)):
            user: Any = object.__new__(cls)  # the app's own class, without running its __init__
            user.__dict__.update(decoded)
            return user
        return CapturedUser(user_id, type_name, decoded)

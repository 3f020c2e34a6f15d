"""SQLAlchemy model instances as kwargs: carried by value, rebuilt detached in the worker.

An audit of a change must read the row as it was when the signal was sent:
``models_committed`` reports a delete after the row is gone, and an update may
be overwritten before the worker runs. So the mapped class and its column
attributes (primary key included) are captured at emit, and the worker builds
an instance of the same class whose attributes read those values. It belongs
to no session; a receiver that needs the live row loads it by primary key
(``db.session.get(Model, obj.id)``). Relationships are not carried.

Works for Flask-SQLAlchemy's ``db.Model`` and plain declarative classes alike;
without SQLAlchemy installed the carrier matches nothing.
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping
from typing import Any

from .codec import NOT_MINE, REDACTED, TAG, Codec, Unserializable, resolve_loaded

try:
    import sqlalchemy
    from sqlalchemy.orm import InstanceState, Mapper, make_transient_to_detached
    from sqlalchemy.orm.attributes import set_committed_value
except ImportError:  # SQLAlchemy is optional
    sqlalchemy = None  # type: ignore[assignment]


def instance_state(value: Any) -> Any:
    """The SQLAlchemy state of a mapped instance, or None for anything else."""
    if sqlalchemy is None or isinstance(value, type):
        return None
    state = sqlalchemy.inspect(value, raiseerr=False)
    return state if isinstance(state, InstanceState) else None


def encode_columns(codec: Codec, value: Any, state: Any, key: str, depth: int) -> dict[str, Any]:
    """The mapped class and column values of ``value`` as they are now, without loading anything
    a deleted row could not give (an attribute that is neither loaded nor loadable is left out)."""
    cls = type(value)
    if "<locals>" in cls.__qualname__:
        raise Unserializable(key, value, "its model class is defined inside a function, so a worker cannot find it")
    columns: dict[str, Any] = {}
    for attr in state.mapper.column_attrs:
        name = attr.key
        if name in state.dict:
            current = state.dict[name]
        else:
            try:
                current = getattr(value, name)
            except Exception:  # expired on a deleted row, detached...: not known at emit
                continue
        columns[name] = REDACTED if codec.secret(name) else codec.encode(current, f"{key}.{name}", depth + 1)
    return {TAG: "model", "class": f"{cls.__module__}:{cls.__qualname__}", "columns": columns}


def rebuild(codec: Codec, value: Mapping[str, Any], depth: int) -> Any:
    """An instance of the captured class, detached, whose columns read the captured values."""
    module, _, qualname = str(value.get("class")).partition(":")
    cls = resolve_loaded(module, qualname)
    mapper = sqlalchemy.inspect(cls, raiseerr=False) if sqlalchemy is not None and isinstance(cls, type) else None
    if not isinstance(mapper, Mapper):
        raise ValueError(f"model class {module}:{qualname} is not a mapped class loaded in this worker")
    columns = value.get("columns")
    if not isinstance(columns, dict):
        raise ValueError(f"model {module}:{qualname}: its columns are not a JSON object")
    # SQLAlchemy's own way to make an instance without calling __init__, as its loader does.
    obj = mapper.class_manager.new_instance()
    known = {attr.key for attr in mapper.column_attrs}
    for name, encoded in columns.items():
        if name not in known:
            raise ValueError(f"model {module}:{qualname} has no column {name!r} in this worker")
        set_committed_value(obj, name, codec.decode(encoded, depth + 1))
    # With its primary key it gets an identity and is detached; without, it stays transient.
    with contextlib.suppress(Exception):
        make_transient_to_detached(obj)
    return obj


class ModelCarrier:
    """The codec's carrier of SQLAlchemy model instances (tag ``model``)."""

    tag = "model"

    def encode(self, codec: Codec, value: Any, key: str, depth: int) -> Any:
        state = instance_state(value)
        if state is None:
            return NOT_MINE
        return encode_columns(codec, value, state, key, depth)

    def decode(self, codec: Codec, value: Mapping[str, Any], depth: int) -> Any:
        return rebuild(codec, value, depth)

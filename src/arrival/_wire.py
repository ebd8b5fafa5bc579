"""How the client and the server put arrival's values and errors into protocol payloads.

The protocol carries plain data (``protocol/events.py``); this module turns the model's
dataclasses into it and back, and an ``arrival.errors`` exception into an ``Error``
frame and back, so a remote call raises the same typed error as the embedded engine.
"""

from __future__ import annotations

from typing import Any, TypeVar

import msgspec

from arrival import errors
from arrival._codec import RecordTuple
from arrival.protocol import Error

__all__ = [
    "decode_bodies",
    "decode_error",
    "decode_receipts",
    "encode_error",
    "from_plain",
    "record",
    "to_plain",
]

T = TypeVar("T")


def to_plain(value: Any) -> Any:
    """A dataclass, enum or tuple as MessagePack-ready builtins."""
    return msgspec.to_builtins(value)


def from_plain(data: Any, kind: type[T]) -> T:
    """``data`` converted to ``kind``; a malformed payload raises ValidationError."""
    return msgspec.convert(data, kind)


def record(data: Any) -> RecordTuple:
    ts, mid, key, headers, body = data
    return (float(ts), mid, key, dict(headers) if headers else None, bytes(body))


def decode_receipts(data: Any) -> list[tuple[int, int]]:
    """Ack receipts (offset, attempt) from a request; ValidationError if malformed."""
    return msgspec.convert(data, list[tuple[int, int]])


def decode_bodies(data: Any) -> list[bytes]:
    """Message bodies from a request; ValidationError if malformed."""
    return msgspec.convert(data, list[bytes])


def encode_error(request_id: int | None, exc: BaseException) -> Error:
    """The Error frame for ``exc``: its class name, message and plain attributes."""
    fields: dict[str, Any] = {}
    for k, v in getattr(exc, "__dict__", {}).items():
        try:
            fields[k] = msgspec.to_builtins(v)
        except (TypeError, msgspec.EncodeError):
            continue
    kind = type(exc).__name__
    if not isinstance(exc, errors.ArrivalError):
        kind = "ArrivalError"  # an internal failure: its type means nothing to the client
    return Error(id=request_id, kind=kind, message=str(exc), fields=fields)


def decode_error(frame: Error) -> errors.ArrivalError:
    """The exception an Error frame names; ``ArrivalError`` for a kind we don't know."""
    cls = getattr(errors, frame.kind, None)
    if not (isinstance(cls, type) and issubclass(cls, errors.ArrivalError)):
        cls = errors.ArrivalError
    exc = cls.__new__(cls)
    Exception.__init__(exc, frame.message)
    for k, v in frame.fields.items():
        if isinstance(v, dict):  # e.g. QueueSpecConflict.differences: name -> (ours, theirs)
            v = {dk: tuple(dv) if isinstance(dv, list) else dv for dk, dv in v.items()}
        try:
            setattr(exc, k, v)
        except AttributeError:
            continue
    return exc

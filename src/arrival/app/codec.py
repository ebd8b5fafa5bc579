"""Typed messages: bodies encoded and decoded by the codec their ``content-type`` names.

A handler's first parameter says what it wants: ``bytes`` (or no annotation) the raw body,
``str`` the body as UTF-8, the message itself (``arrival.aio.Message``), or any type
msgspec can decode into (a ``msgspec.Struct``, a dataclass, ``dict[str, int]``...) or a
pydantic model. The codec is named by the message's ``content-type`` header:
``application/json`` (the default when there is none) or ``application/msgpack``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import msgspec

from arrival.errors import UndecodableMessage, UsageError

__all__ = [
    "CONTENT_TYPE",
    "JSON",
    "MSGPACK",
    "decode",
    "decoder_for",
    "encode",
]

CONTENT_TYPE = "content-type"
JSON = "application/json"
MSGPACK = "application/msgpack"
_ALIASES = {
    "application/json": JSON,
    "text/json": JSON,
    "application/msgpack": MSGPACK,
    "application/x-msgpack": MSGPACK,
    "application/vnd.msgpack": MSGPACK,
}


def _canonical(content_type: str | None) -> str:
    if content_type is None:
        return JSON
    base = content_type.split(";", 1)[0].strip().lower()
    found = _ALIASES.get(base)
    if found is None:
        raise UndecodableMessage(
            f"content-type {content_type!r} is not one arrival decodes; "
            f"send {JSON!r} or {MSGPACK!r}, or take the raw body (annotate it as bytes)"
        )
    return found


def _pydantic_model(tp: Any) -> bool:
    return isinstance(tp, type) and hasattr(tp, "model_validate_json") and hasattr(tp, "model_dump")


def encode(obj: Any, content_type: str | None = None) -> tuple[bytes, str | None]:
    """``(body, content-type)`` for ``obj``: bytes go as they are (no content-type unless
    given); anything else is encoded as JSON, or MessagePack when ``content_type`` says so.
    Pydantic models are dumped in their JSON mode first."""
    if isinstance(obj, (bytes, bytearray, memoryview)):
        return bytes(obj), content_type
    codec = _canonical(content_type) if content_type is not None else JSON
    if _pydantic_model(type(obj)):
        obj = obj.model_dump(mode="json")
    try:
        if codec == MSGPACK:
            return msgspec.msgpack.encode(obj), MSGPACK
        return msgspec.json.encode(obj), JSON
    except (TypeError, msgspec.EncodeError) as exc:
        raise UsageError(f"cannot encode a {type(obj).__name__} as {codec}: {exc}") from None


def decoder_for(tp: Any) -> Callable[[bytes, str | None], Any]:
    """A function ``(body, content_type) -> value of tp``, raising UndecodableMessage."""
    if tp is bytes or tp is Any:
        return lambda body, _ct: body
    if tp is str:

        def text(body: bytes, _ct: str | None) -> str:
            try:
                return body.decode()
            except UnicodeDecodeError as exc:
                raise UndecodableMessage(f"the body is not UTF-8 text: {exc}") from None

        return text
    if _pydantic_model(tp):

        def model(body: bytes, ct: str | None) -> Any:
            codec = _canonical(ct)
            try:
                if codec == JSON:
                    return tp.model_validate_json(body)
                return tp.model_validate(msgspec.msgpack.decode(body))
            except (ValueError, msgspec.DecodeError) as exc:  # pydantic's error is one
                raise UndecodableMessage(f"not a valid {tp.__name__} ({codec}): {exc}") from None

        return model
    try:
        json_dec = msgspec.json.Decoder(tp)
        msgpack_dec = msgspec.msgpack.Decoder(tp)
    except TypeError as exc:
        raise UsageError(f"a handler cannot take messages as {tp!r}: {exc}") from None

    def typed(body: bytes, ct: str | None) -> Any:
        codec = _canonical(ct)
        try:
            return json_dec.decode(body) if codec == JSON else msgpack_dec.decode(body)
        except msgspec.DecodeError as exc:
            name = getattr(tp, "__name__", repr(tp))
            raise UndecodableMessage(f"not a valid {name} ({codec}): {exc}") from None

    return typed


def decode(body: bytes, tp: Any, content_type: str | None = None) -> Any:
    """Decode ``body`` into ``tp`` with the codec ``content_type`` names (JSON if None)."""
    return decoder_for(tp)(body, content_type)

"""Encoding of record batches: one msgpack array per batch, encoded and decoded at once."""

from __future__ import annotations

import msgspec

from arrival.errors import CorruptData

__all__ = ["RecordTuple", "decode_batch", "encode_batch"]

RecordTuple = tuple[float, str | None, str | None, dict[str, str] | None, bytes]
"""(timestamp, id, key, headers, body) of one stored message."""

_enc = msgspec.msgpack.Encoder()
_dec = msgspec.msgpack.Decoder(list[RecordTuple])


def encode_batch(records: list[RecordTuple]) -> bytes:
    return _enc.encode(records)


def decode_batch(data: bytes, where: str) -> list[RecordTuple]:
    try:
        return _dec.decode(data)
    except msgspec.DecodeError as exc:
        raise CorruptData(f"{where} does not decode ({exc}): the store is damaged") from exc

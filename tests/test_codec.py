"""Typed message bodies: arrival.encode / arrival.decode and the content-type header."""

from __future__ import annotations

import dataclasses

import msgspec
import pytest

import arrival
from arrival.errors import UndecodableMessage, UsageError


class Point(msgspec.Struct):
    x: int
    y: int


@dataclasses.dataclass
class Label:
    text: str


def test_round_trips_through_both_codecs() -> None:
    for ct in (None, "application/json", "application/msgpack"):
        body, got_ct = arrival.encode(Point(1, 2), ct)
        assert got_ct == (ct or "application/json")
        assert arrival.decode(body, Point, got_ct) == Point(1, 2)
    body, ct = arrival.encode(Label("hi"))
    assert (body, ct) == (b'{"text":"hi"}', "application/json")
    assert arrival.decode(body, Label, ct) == Label("hi")
    assert arrival.decode(b"[1,2]", list[int]) == [1, 2]


def test_bytes_pass_through_and_content_type_parameters_are_ignored() -> None:
    assert arrival.encode(b"raw") == (b"raw", None)
    assert arrival.encode(bytearray(b"raw"), "application/octet-stream") == (
        b"raw",
        "application/octet-stream",
    )
    assert arrival.decode(b'{"x":1,"y":2}', Point, "Application/JSON; charset=utf-8") == Point(1, 2)


def test_a_pydantic_model_encodes_in_json_mode() -> None:
    pydantic = pytest.importorskip("pydantic")

    class Event(pydantic.BaseModel):  # type: ignore[misc, name-defined]
        name: str
        tags: set[str]

    body, ct = arrival.encode(Event(name="a", tags={"t"}))
    assert ct == "application/json"
    assert arrival.decode(body, Event, ct) == Event(name="a", tags={"t"})
    packed, ct = arrival.encode(Event(name="b", tags=set()), "application/msgpack")
    assert arrival.decode(packed, Event, ct).name == "b"


@pytest.mark.parametrize(
    ("body", "tp", "ct", "match"),
    [
        (b"{", Point, None, "truncated"),
        (b'{"x": "1", "y": 2}', Point, None, "Expected `int`"),
        (b"\xc1", Point, "application/msgpack", "not a valid Point"),
        (b"{}", Point, "text/xml", "not one arrival decodes"),
        (b"\xff", str, None, "not UTF-8"),
    ],
)
def test_bad_bodies_raise_undecodable_message(
    body: bytes, tp: object, ct: str | None, match: str
) -> None:
    with pytest.raises(UndecodableMessage, match=match):
        arrival.decode(body, tp, ct)


def test_what_cannot_be_encoded_or_taken_is_a_usage_error() -> None:
    with pytest.raises(UsageError, match="cannot encode a object"):
        arrival.encode(object())
    with pytest.raises(UsageError, match="not one arrival decodes"):
        arrival.encode({"a": 1}, "text/csv")
    with pytest.raises(UsageError, match="cannot take messages"):
        arrival.decode(b"{}", object())

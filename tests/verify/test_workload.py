"""The verify workload's pieces: message bodies, outcomes, and merging worker histories."""

from __future__ import annotations

from pathlib import Path

import msgspec
import pytest

from arrival.errors import (
    BrokerUnreachable,
    LeaseExpired,
    ProducerFenced,
    StorageError,
    UnknownQueue,
)
from arrival.verify.history import Ack, Send, Txn
from arrival.verify.runner import merge
from arrival.verify.workload import body_of, intact, outcome_of, output_body


def test_a_body_names_its_id_and_key_and_has_the_size_asked() -> None:
    b = body_of("p0.1-7", "k3", 64)
    assert b.startswith(b"p0.1-7 k3 ")
    assert len(b) == 64
    assert body_of("p0.1-7", "k3", 64) == b
    assert body_of("p0.1-8", "k3", 64) != b


def test_intact_tells_a_swapped_or_damaged_body() -> None:
    b = body_of("p0.1-7", "k3", 64)
    assert intact("p0.1-7", "k3", b, 64)
    assert not intact("p0.1-8", "k3", b, 64)
    assert not intact("p0.1-7", "k4", b, 64)
    assert not intact("p0.1-7", "k3", b[:-1] + b"!", 64)
    assert intact("p0.1-7/0", "k3", output_body(b), 64)
    assert not intact("p0.1-7/0", "k3", b, 64)


@pytest.mark.parametrize(
    ("exc", "outcome"),
    [
        (ProducerFenced("producer", "p", "fenced"), "fail"),
        (UnknownQueue("q"), "fail"),
        (LeaseExpired("q", 1, 1, "expired"), "fail"),
        (BrokerUnreachable("gone"), "info"),
        (StorageError("fsync failed"), "info"),  # a failed fsync may still have written
    ],
)
def test_only_errors_that_prove_nothing_happened_are_definite(exc: Exception, outcome: str) -> None:
    assert outcome_of(exc) == outcome


def _write(path: Path, events: list[object], tail: bytes = b"") -> None:
    enc = msgspec.json.Encoder()
    path.write_bytes(b"".join(enc.encode(e) + b"\n" for e in events) + tail)


def test_merge_keeps_outcomes_and_turns_unanswered_operations_indeterminate(
    tmp_path: Path,
) -> None:
    _write(
        tmp_path / "p0.1.jsonl",
        [
            Send(1.0, 0.0, "q", "p0.1-0", "k0", "info"),
            Send(1.0, 1.5, "q", "p0.1-0", "k0", "ok"),
            Send(2.0, 0.0, "q", "p0.1-1", "k0", "info"),  # killed before the answer
        ],
        tail=b'{"type":"send","time":3.0,"en',  # a line cut short by SIGKILL
    )
    _write(
        tmp_path / "c0.1.jsonl",
        [
            Ack(4.0, 0.0, "q", "g", "c0.1", "p0.1-0", 1, "info"),
            Ack(4.0, 4.1, "q", "g", "c0.1", "p0.1-0", 1, "fail"),
            Ack(5.0, 0.0, "q", "g", "c0.1", "p0.1-1", 1, "info"),
            Txn(6.0, 0.0, "t", "info", [("q", "g", "p0.1-1")], [("out", "p0.1-1/0")]),
        ],
    )
    events = merge(iter(sorted(tmp_path.glob("*.jsonl"))), end=9.0)
    sends = sorted((e.id, e.outcome, e.end) for e in events if isinstance(e, Send))
    assert sends == [("p0.1-0", "ok", 1.5), ("p0.1-1", "info", 9.0)]
    acks = sorted((e.id, e.outcome, e.end) for e in events if isinstance(e, Ack))
    assert acks == [("p0.1-0", "fail", 4.1), ("p0.1-1", "info", 9.0)]
    (txn,) = [e for e in events if isinstance(e, Txn)]
    assert (txn.outcome, txn.end) == ("info", 9.0)


def test_merge_refuses_a_damaged_line_that_is_not_the_last(tmp_path: Path) -> None:
    path = tmp_path / "p0.1.jsonl"
    _write(path, [Send(1.0, 1.5, "q", "p0.1-0", "k0", "ok")])
    path.write_bytes(b"garbage\n" + path.read_bytes())
    with pytest.raises(msgspec.DecodeError):
        merge(iter([path]), end=9.0)

"""The history of a verify run: every operation, its outcome and every fault, in time.

A message id is ``producer-counter``; a send's outcome is ``ok`` (acknowledged), ``fail``
(definitely not stored) or ``info`` (indeterminate: timeout, dropped connection, crash).
Deliveries record the group, the consumer session and the attempt; the final drain's
deliveries have ``session="drain"``. The audit lists what the broker stores at the end.
Events are msgspec Structs, written as JSON lines (``dump``/``load``).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import IO, Literal

import msgspec

__all__ = [
    "Ack",
    "Audit",
    "Deliver",
    "Effect",
    "Event",
    "Fault",
    "Outcome",
    "Register",
    "Send",
    "Txn",
    "dump",
    "load",
]

Outcome = Literal["ok", "fail", "info"]


class Send(msgspec.Struct, tag="send", frozen=True):
    """A send invoked at ``time`` and answered at ``end``."""

    time: float
    end: float
    queue: str
    id: str  # producer-counter
    key: str
    outcome: Outcome
    producer: str = ""
    epoch: int = 0  # the producer's epoch, for fencing (0: not idempotent)
    error: str = ""  # the error's type and message, when it did not end ok


class Register(msgspec.Struct, tag="register", frozen=True):
    """A producer (or transactional id) opened ``epoch``, answered at ``end``."""

    time: float
    end: float
    producer: str
    epoch: int


class Deliver(msgspec.Struct, tag="deliver", frozen=True):
    """A delivery, recorded at ``time`` once the receive returned."""

    time: float
    queue: str
    group: str
    session: str  # a consumer's run; "drain" for the final drain
    id: str
    key: str
    attempt: int
    intact: bool = True  # the body matches the id
    since: float = 0.0  # when the receive was called (0: unknown): it happened in [since, time]


class Ack(msgspec.Struct, tag="ack", frozen=True):
    """An ack (or nack, ``kind``) of a delivery, its outcome known at ``end``."""

    time: float
    end: float
    queue: str
    group: str
    session: str
    id: str
    attempt: int
    outcome: Outcome
    kind: Literal["ack", "nack"] = "ack"


class Txn(msgspec.Struct, tag="txn", frozen=True):
    """A transaction's commit: invoked at ``time``, answered at ``end``, acking
    ``inputs`` (queue, group, id) and sending ``outputs`` (queue, id)."""

    time: float
    end: float
    tid: str
    outcome: Outcome
    inputs: list[tuple[str, str, str]] = []
    outputs: list[tuple[str, str]] = []
    epoch: int = 0


class Effect(msgspec.Struct, tag="effect", frozen=True):
    """A side effect committed for input ``id`` (an inbox row, say), from the audit."""

    queue: str
    group: str
    id: str
    name: str = ""


class Audit(msgspec.Struct, tag="audit", frozen=True):
    """What the broker stores at the end: (queue, id) once per stored copy, for every
    message of the queues listed (a run keeps what it stores: no retention trims)."""

    stored: list[tuple[str, str]]
    queues: list[str] = []  # the queues it covers (a queue the store lost is empty)


class Fault(msgspec.Struct, tag="fault", frozen=True):
    time: float
    kind: str  # "kill", "power-loss", "pause", "cut", ...
    detail: str = ""
    session: str = ""  # the consumer session it hit, if one


Event = Send | Register | Deliver | Ack | Txn | Effect | Audit | Fault

_encoder = msgspec.json.Encoder()
_decoder = msgspec.json.Decoder(Event)


def dump(events: Iterable[Event], out: IO[bytes]) -> None:
    for e in events:
        out.write(_encoder.encode(e) + b"\n")


def load(lines: Iterable[bytes]) -> Iterator[Event]:
    for line in lines:
        if line.strip():
            yield _decoder.decode(line)

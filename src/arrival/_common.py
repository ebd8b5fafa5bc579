"""What the sync and async APIs share: opening a backend, checking arguments, messages.

The two APIs differ only in how they wait; every decision is made by the engine.
"""

from __future__ import annotations

import os
import random
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from arrival._clock import Clock
from arrival._codec import RecordTuple
from arrival.engine import Engine, Send
from arrival.errors import NotSupported, UsageError
from arrival.model import QueueSpec
from arrival.semantics.spec import UNSET, resolve_spec
from arrival.storage.base import Storage
from arrival.storage.memory import MemoryStorage

__all__ = ["Envelope", "MessageBase", "MessageContext", "open_engine", "to_send"]

DEFAULT_URL = "./data"


def open_engine(
    url: str | os.PathLike[str] | Storage | None,
    *,
    clock: Clock | None = None,
    rng: random.Random | None = None,
) -> tuple[Engine, str]:
    """Open the backend ``url`` names: ``memory:``, a directory path, or a Storage."""
    if url is None:
        url = os.environ.get("ARRIVAL_URL", DEFAULT_URL)
    if not isinstance(url, (str, os.PathLike)):
        return Engine(url, clock=clock, rng=rng), repr(url)
    text = os.fspath(url)
    if text == "memory:":
        return Engine(MemoryStorage(), clock=clock, rng=rng), text
    scheme, sep, _rest = text.partition("://")
    if sep:
        if scheme in ("arrival", "arrivals", "nats"):
            raise NotSupported(
                f"can't connect to {text!r}: this arrival release has the embedded engine "
                f"only; connect to a directory (e.g. './data') or 'memory:'"
            )
        raise UsageError(
            f"can't connect to {text!r}: unknown scheme {scheme!r}; use a directory path, "
            f"'memory:', 'arrival://host:port' or 'nats://host:port'"
        )
    if text.startswith("file:"):
        text = text[len("file:") :]
    from arrival.storage.sqlite import SqliteStorage

    return Engine(SqliteStorage(text), clock=clock, rng=rng), text


def queue_spec(name: str, guarantee: str, options: dict[str, Any]) -> QueueSpec:
    return resolve_spec(name, guarantee, **{k: v for k, v in options.items() if v is not UNSET})


@dataclass(frozen=True, slots=True)
class Envelope:
    """A message to send in a batch: ``producer.send_batch(q, [Envelope(b"..", key="k")])``."""

    body: bytes
    key: str | None = None
    headers: Mapping[str, str] | None = None
    id: str | None = None


def _body(body: object) -> bytes:
    if isinstance(body, bytes):
        return body
    if isinstance(body, (bytearray, memoryview)):
        return bytes(body)
    if isinstance(body, str):
        raise TypeError("a message body is bytes: encode the str first, e.g. text.encode()")
    raise TypeError(f"a message body is bytes, not {type(body).__name__}")


def to_send(body: object, key: object, headers: object, mid: object) -> Send:
    """Check one message's fields and return them as the engine takes them."""
    b = _body(body)
    if key is not None and not isinstance(key, str):
        raise TypeError(f"key must be a str or None, not {type(key).__name__}")
    if mid is not None and not isinstance(mid, str):
        raise TypeError(f"id must be a str or None, not {type(mid).__name__}")
    h: dict[str, str] | None = None
    if headers:
        if not isinstance(headers, Mapping):
            raise TypeError("headers must be a mapping of str to str")
        h = {}
        for k, v in headers.items():
            if not isinstance(k, str) or not isinstance(v, str):
                raise TypeError(f"headers must map str to str; got {k!r}: {v!r}")
            h[k] = v
    return (mid, key, h, b)


def batch_to_send(items: object) -> list[Send]:
    out: list[Send] = []
    for item in items:  # type: ignore[attr-defined]
        if isinstance(item, Envelope):
            out.append(to_send(item.body, item.key, item.headers, item.id))
        else:
            out.append((None, None, None, _body(item)))
    return out


class MessageContext:
    """What every message from one consumer shares: one object, not five fields each."""

    __slots__ = ("engine", "epoch", "group", "member", "queue")

    def __init__(self, engine: Engine, member: int, queue: str, group: str) -> None:
        self.engine = engine
        self.member = member
        self.epoch = engine.epoch
        self.queue = queue
        self.group = group


class MessageBase:
    """A delivered message: its content, its attempt and the lease it is held under."""

    __slots__ = ("_ctx", "_rec", "attempt", "lease_deadline", "offset")

    def __init__(
        self, ctx: MessageContext, offset: int, attempt: int, deadline: float, rec: RecordTuple
    ) -> None:
        self._ctx = ctx
        self._rec = rec
        self.offset = offset
        self.attempt = attempt  # 1 on first delivery
        self.lease_deadline = deadline  # engine clock; 0 when there is no lease (at-most-once)

    @property
    def queue(self) -> str:
        return self._ctx.queue

    @property
    def group(self) -> str:
        return self._ctx.group

    @property
    def _engine(self) -> Engine:
        return self._ctx.engine

    @property
    def _member(self) -> int:
        return self._ctx.member

    @property
    def _epoch(self) -> int:
        return self._ctx.epoch

    def __repr__(self) -> str:
        return (
            f"<{type(self).__name__} {self.queue}/{self.group} offset={self.offset} "
            f"id={self.id!r} key={self.key!r} attempt={self.attempt} {len(self.body)} bytes>"
        )

    @property
    def body(self) -> bytes:
        return self._rec[4]

    @property
    def key(self) -> str | None:
        return self._rec[2]

    @property
    def id(self) -> str:
        """The producer's id for the message, or ``queue:offset`` when it gave none."""
        mid = self._rec[1]
        return mid if mid is not None else f"{self.queue}:{self.offset}"

    @property
    def headers(self) -> dict[str, str]:
        h = self._rec[3]
        return dict(h) if h else {}

    @property
    def timestamp(self) -> float:
        """When the broker accepted the message (seconds since the epoch)."""
        return self._rec[0]

    @property
    def redelivered(self) -> bool:
        return self.attempt > 1

    @property
    def lease_lost(self) -> bool:
        """True once this delivery's lease expired or was released: another consumer may
        get the message, so skip side effects that must not happen twice."""
        return not self._engine.is_leased(self._member, self._epoch, self.offset, self.attempt)

    @property
    def receipt(self) -> tuple[str, str, int, int, int]:
        """(queue, group, offset, attempt, broker epoch): what an ack is checked against."""
        return (self.queue, self.group, self.offset, self.attempt, self._epoch)

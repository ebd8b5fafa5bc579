"""The events of the arrival wire protocol: what a connection sends and receives.

Each event is one frame. Payload values are plain data (str, int, float, bytes, lists,
dicts), so the protocol knows nothing of queues or messages: the client and the server
give meaning to ``Request.op`` and its ``args``. A batch of messages travels as one
``Request`` (or ``Reply``/``Push``) carrying a list: batches are the unit on the wire.
"""

from __future__ import annotations

from typing import Any

import msgspec

__all__ = ["Error", "Event", "Goodbye", "Hello", "Push", "Reply", "Request", "Welcome"]


class Hello(msgspec.Struct, tag="hello", frozen=True):
    """Client -> server, first frame after the preface."""

    client: str  # a name for logs, e.g. "arrival-python/0.1.0"
    token: str | None = None  # authentication, when the server requires it


class Welcome(msgspec.Struct, tag="welcome", frozen=True):
    """Server -> client: the handshake succeeded."""

    server: str
    broker_epoch: int
    max_frame: int  # the largest frame either side may send, in bytes


class Request(msgspec.Struct, tag="req", frozen=True):
    """Client -> server. ``id`` grows by one per request; replies may come in any order."""

    id: int
    op: str
    args: dict[str, Any] = {}


class Reply(msgspec.Struct, tag="rep", frozen=True):
    """Server -> client: the result of request ``id``."""

    id: int
    result: Any = None


class Push(msgspec.Struct, tag="push", frozen=True):
    """Server -> client, unasked: deliveries for a consumer the client subscribed."""

    stream: int
    data: Any = None


class Error(msgspec.Struct, tag="err", frozen=True):
    """The typed error of request ``id`` (None: of the connection, which then closes).

    ``kind`` names an ``arrival.errors`` class; ``fields`` carries its attributes."""

    id: int | None
    kind: str
    message: str
    fields: dict[str, Any] = {}


class Goodbye(msgspec.Struct, tag="bye", frozen=True):
    """Either side: the connection ends cleanly after this frame."""

    reason: str = ""


Event = Hello | Welcome | Request | Reply | Push | Error | Goodbye

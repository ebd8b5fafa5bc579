"""Frozen value types shared by every layer: guarantees, queue specs, stats and descriptions."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

__all__ = [
    "Backoff",
    "BrokerStats",
    "ConsumerStats",
    "DropPolicy",
    "GroupStats",
    "Guarantee",
    "Histogram",
    "QueueDescription",
    "QueueSpec",
    "QueueStats",
    "Record",
    "StoredMessage",
]


class Guarantee(enum.StrEnum):
    AT_MOST_ONCE = "at-most-once"
    AT_LEAST_ONCE = "at-least-once"
    EXACTLY_ONCE = "exactly-once"

    @property
    def durable(self) -> bool:
        return self is not Guarantee.AT_MOST_ONCE


class DropPolicy(enum.StrEnum):
    """What a full at-most-once queue drops: the oldest queued message or the new one."""

    OLDEST = "oldest"
    NEWEST = "newest"


# Defaults, with why.
DEFAULT_ACK_TIMEOUT_S = 30.0  # long enough for a typical handler; extend() covers slow ones
DEFAULT_MAX_DELIVERIES = 10  # failed attempts before a message is dead-lettered
DEFAULT_CAPACITY = 100_000  # at-most-once: bounds memory at ~100 MB for 1 KB messages
DEFAULT_MAX_MESSAGE_BYTES = 1 << 20  # 1 MiB: larger payloads belong in blob storage
DEFAULT_RETENTION_S = 0.0  # acked by every group -> deletable at once
DEFAULT_DEDUP_WINDOW_S = 7 * 86400.0  # ids and producer state: a week, not minutes


@dataclass(frozen=True, slots=True)
class Backoff:
    """Delay before redelivering a failed message: exponential, capped, with jitter.

    Failure n waits ``min(max_s, initial_s * multiplier**(n-1))`` scaled down by up to
    ``jitter`` (a fraction): jitter spreads retries of many messages that failed together.
    """

    initial_s: float = 1.0
    multiplier: float = 2.0
    max_s: float = 300.0
    jitter: float = 0.5


@dataclass(frozen=True, slots=True)
class QueueSpec:
    """A queue's declared contract and settings; persisted with the queue.

    Build one through ``broker.create_queue``, which fills defaults per guarantee and
    refuses settings that would weaken the guarantee.
    """

    name: str
    guarantee: Guarantee
    ack_timeout: float = DEFAULT_ACK_TIMEOUT_S
    max_deliveries: int | None = DEFAULT_MAX_DELIVERIES
    dead_letter: str | None = None
    backoff: Backoff = field(default_factory=Backoff)
    retention: float = DEFAULT_RETENTION_S
    capacity: int | None = None
    drop: DropPolicy = DropPolicy.OLDEST
    conflate: bool = False
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES
    dedup: bool = False
    dedup_window: float = DEFAULT_DEDUP_WINDOW_S


@dataclass(frozen=True, slots=True)
class Record:
    """One message as stored: what the producer sent plus the broker's timestamp."""

    timestamp: float
    id: str | None
    key: str | None
    headers: dict[str, str] | None
    body: bytes


@dataclass(frozen=True, slots=True)
class StoredMessage:
    """A message as the queue holds it, read without consuming it (``broker.peek``)."""

    offset: int
    id: str | None
    key: str | None
    headers: dict[str, str]
    body: bytes
    timestamp: float


@dataclass(frozen=True, slots=True)
class GroupStats:
    group: str
    backlog: int  # messages retained and not yet settled by this group
    in_flight: int  # leased and not yet settled
    waiting_retry: int  # nacked or expired, waiting for their backoff
    delivered: int  # deliveries since the broker opened (redeliveries included)
    acked: int
    redelivered: int
    nacked: int
    expired: int
    dead_lettered: int
    dropped: int  # at-most-once: dropped before this group received them
    # seconds since the oldest message this group has not settled was stored (the engine's
    # clock); 0.0 when it has settled everything. A growing age means a stuck consumer.
    oldest_unacked_age: float = 0.0
    consumers: int = 0  # consumers of this group open now


@dataclass(frozen=True, slots=True)
class ConsumerStats:
    queue: str
    group: str
    member: int
    received: int  # deliveries to this consumer
    acked: int
    nacked: int
    rejected: int
    in_flight: int  # leased to this consumer now


@dataclass(frozen=True, slots=True)
class QueueStats:
    name: str
    guarantee: Guarantee
    first_offset: int  # oldest retained message
    end_offset: int  # one past the newest durable message
    stored: int  # messages retained
    sent: int  # accepted since the broker opened
    dropped: int  # at-most-once: dropped on overflow since the broker opened
    groups: tuple[GroupStats, ...]


@dataclass(frozen=True, slots=True)
class BrokerStats:
    backend: str
    epoch: int  # times the data directory was opened
    queues: int
    commits: int  # store commits since the broker opened
    fsyncs: int  # of which durable (fsynced); concurrent sends share one


@dataclass(frozen=True, slots=True)
class Histogram:
    """Observations in fixed buckets, as ``Engine.fsync_histogram()`` returns them.

    ``counts[i]`` observations were at most ``bounds[i]`` seconds (and above the bound
    before it); ``counts[-1]``, one more than ``bounds``, were above the last bound.
    """

    bounds: tuple[float, ...]
    counts: tuple[int, ...]
    sum_s: float

    @property
    def count(self) -> int:
        return sum(self.counts)


@dataclass(frozen=True, slots=True)
class QueueDescription:
    """What a queue promises, by which mechanism, and its limits right now."""

    name: str
    guarantee: Guarantee
    promise: str
    mechanism: tuple[str, ...]
    limits: dict[str, str]
    spec: QueueSpec

    def __str__(self) -> str:
        lines = [f"{self.name}: {self.guarantee}", f"  promise: {self.promise}", "  mechanism:"]
        lines += [f"    - {m}" for m in self.mechanism]
        lines.append("  limits:")
        lines += [f"    {k}: {v}" for k, v in self.limits.items()]
        return "\n".join(lines)

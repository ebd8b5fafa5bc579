"""Queue specs: defaults per guarantee, validation, the weakening check, diff and describe.

Invariants enforced here, for every declared queue:
1. An at-least-once or exactly-once queue never drops a message it acknowledged: no
   capacity, no drop policy, no conflation, and a dead-letter queue whenever a
   delivery budget can run out.
2. An at-most-once queue never redelivers: no delivery budget, lease or dead-letter queue.
3. Every number is in range, with its unit in the message when it is not.
"""

from __future__ import annotations

import math
import re
from dataclasses import fields
from typing import Any, Final

import msgspec

from arrival.errors import GuaranteeMismatch, InvalidQueueSpec, QueueSpecConflict
from arrival.model import (
    DEFAULT_CAPACITY,
    DEFAULT_MAX_DELIVERIES,
    Backoff,
    DropPolicy,
    Guarantee,
    QueueDescription,
    QueueSpec,
)

__all__ = [
    "UNSET",
    "check_compatible",
    "dead_letter_spec",
    "decode_spec",
    "describe",
    "encode_spec",
    "resolve_spec",
    "validate_queue_name",
]


class _Unset:
    def __repr__(self) -> str:
        return "UNSET"


UNSET: Final[Any] = _Unset()
"""Marks an option the caller did not pass, so defaults can differ per guarantee."""

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:\-]{0,199}")
MAX_ACK_TIMEOUT_S = 12 * 3600.0  # a lease longer than this is a stuck consumer, not a slow one
MAX_MESSAGE_BYTES_LIMIT = 64 << 20

_REDELIVERY_OPTIONS = (
    "ack_timeout",
    "max_deliveries",
    "dead_letter",
    "backoff",
    "retention",
    "dedup",
    "dedup_window",
)
_OVERFLOW_OPTIONS = ("capacity", "drop", "conflate")


def validate_queue_name(name: object) -> str:
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise InvalidQueueSpec(
            str(name),
            "a queue name is 1-200 characters of letters, digits, '.', '_', ':' and '-', "
            "starting with a letter or digit",
        )
    return name


def resolve_spec(name: str, guarantee: str | Guarantee, **options: Any) -> QueueSpec:
    """Fill defaults for ``guarantee`` and refuse settings that would weaken it.

    ``options`` holds every option of ``create_queue``; ``UNSET`` marks those not passed.
    """
    validate_queue_name(name)
    try:
        g = Guarantee(guarantee)
    except ValueError:
        choices = ", ".join(repr(x.value) for x in Guarantee)
        raise InvalidQueueSpec(
            name, f"unknown guarantee {guarantee!r}: choose one of {choices}"
        ) from None
    unknown = set(options) - {f.name for f in fields(QueueSpec)}
    if unknown:
        raise InvalidQueueSpec(name, f"unknown option(s): {', '.join(sorted(unknown))}")
    given = {k: v for k, v in options.items() if v is not UNSET}

    if g is Guarantee.AT_MOST_ONCE:
        bad = [k for k in _REDELIVERY_OPTIONS if k in given]
        if bad:
            raise InvalidQueueSpec(
                name,
                f"{', '.join(bad)} cannot apply to an at-most-once queue: it hands each "
                f"message out once and never redelivers it. Declare the queue "
                f"at-least-once if messages must be retried",
            )
        given.setdefault("capacity", DEFAULT_CAPACITY)
        given["max_deliveries"] = None
        given["dead_letter"] = None
    else:
        bad = [k for k in _OVERFLOW_OPTIONS if k in given and given[k] not in (None, False)]
        if bad:
            raise InvalidQueueSpec(
                name,
                f"{', '.join(bad)} would let a {g} queue drop messages it acknowledged; "
                f"use an at-most-once queue for bounded, lossy traffic",
            )
        given.pop("capacity", None)
        given.pop("drop", None)
        given.pop("conflate", None)
        if g is Guarantee.EXACTLY_ONCE:
            if given.get("dedup", True) is not True:
                raise InvalidQueueSpec(
                    name,
                    "dedup=False would let an exactly-once queue store a retried send "
                    "twice; declare the queue at-least-once if duplicates are acceptable",
                )
            given["dedup"] = True
        budget = given.get("max_deliveries", DEFAULT_MAX_DELIVERIES)
        if "dead_letter" not in given:
            given["dead_letter"] = f"{name}.dlq"
            if not _NAME.fullmatch(given["dead_letter"]):
                raise InvalidQueueSpec(
                    name,
                    f"the default dead-letter queue name {name + '.dlq'!r} is longer than "
                    f"200 characters; pass dead_letter='...' explicitly",
                )
        elif given["dead_letter"] is None and budget is not None:
            raise InvalidQueueSpec(
                name,
                f"dead_letter=None with max_deliveries={budget} would discard a message "
                f"after its last failed attempt; name a dead-letter queue, or pass "
                f"max_deliveries=None to retry without limit",
            )
    if "drop" in given:
        try:
            given["drop"] = DropPolicy(given["drop"])
        except ValueError:
            raise InvalidQueueSpec(
                name, f"drop must be 'oldest' or 'newest', not {given['drop']!r}"
            ) from None
    if "backoff" in given and not isinstance(given["backoff"], Backoff):
        raise InvalidQueueSpec(name, "backoff must be an arrival.Backoff(...)")
    spec = QueueSpec(name=name, guarantee=g, **given)
    _check_ranges(spec)
    return spec


def _is_int(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_number(x: object) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _check_ranges(s: QueueSpec) -> None:
    def bad(problem: str) -> InvalidQueueSpec:
        return InvalidQueueSpec(s.name, problem)

    b = s.backoff
    for what, x, unit in (
        ("ack_timeout", s.ack_timeout, " of seconds"),
        ("retention", s.retention, " of seconds"),
        ("backoff.initial_s", b.initial_s, " of seconds"),
        ("backoff.multiplier", b.multiplier, ""),
        ("backoff.max_s", b.max_s, " of seconds"),
        ("backoff.jitter", b.jitter, " (a fraction)"),
    ):
        if not _is_number(x):
            raise bad(f"{what} must be a finite number{unit}, not {x!r}")
    if not 0 < s.ack_timeout <= MAX_ACK_TIMEOUT_S:
        raise bad(
            f"ack_timeout must be in (0, {MAX_ACK_TIMEOUT_S:.0f}] seconds, not {s.ack_timeout}"
        )
    if s.max_deliveries is not None and (not _is_int(s.max_deliveries) or s.max_deliveries < 1):
        raise bad(f"max_deliveries must be an int >= 1 or None, not {s.max_deliveries!r}")
    if s.dead_letter is not None:
        validate_queue_name(s.dead_letter)
        if s.dead_letter == s.name:
            raise bad("a queue cannot be its own dead-letter queue")
    if b.initial_s < 0 or b.multiplier < 1 or b.max_s < b.initial_s or not 0 <= b.jitter <= 1:
        raise bad(
            "backoff needs initial_s >= 0, multiplier >= 1, max_s >= initial_s and "
            f"0 <= jitter <= 1 (got {b})"
        )
    if s.retention < 0:
        raise bad(f"retention must be >= 0 seconds, not {s.retention}")
    if s.guarantee is Guarantee.AT_MOST_ONCE and s.capacity is None:
        raise bad("an at-most-once queue is bounded: capacity must be an int >= 1 messages")
    if s.capacity is not None and (not _is_int(s.capacity) or s.capacity < 1):
        raise bad(f"capacity must be an int >= 1 messages, not {s.capacity!r}")
    if not isinstance(s.dedup, bool):
        raise bad(f"dedup must be True or False, not {s.dedup!r}")
    if not _is_number(s.dedup_window) or s.dedup_window <= 0:
        raise bad(f"dedup_window must be a number of seconds > 0, not {s.dedup_window!r}")
    if not isinstance(s.conflate, bool):
        raise bad(f"conflate must be True or False, not {s.conflate!r}")
    if not _is_int(s.max_message_bytes) or not (
        1 <= s.max_message_bytes <= MAX_MESSAGE_BYTES_LIMIT
    ):
        raise bad(
            f"max_message_bytes must be in [1, {MAX_MESSAGE_BYTES_LIMIT}], "
            f"not {s.max_message_bytes!r}"
        )


def dead_letter_spec(origin: QueueSpec) -> QueueSpec:
    """The spec of ``origin``'s dead-letter queue: as durable as the origin, never dropping.

    A dead-letter queue has no dead-letter queue of its own and retries without limit.
    """
    if origin.dead_letter is None:
        raise ValueError(f"queue {origin.name!r} has no dead-letter queue")
    return QueueSpec(
        name=origin.dead_letter,
        guarantee=origin.guarantee,
        ack_timeout=origin.ack_timeout,
        max_deliveries=None,
        dead_letter=None,
        backoff=origin.backoff,
        retention=0.0,
        max_message_bytes=origin.max_message_bytes + 4096,  # room for provenance headers
        dedup=False,  # a dead letter is appended once, in the commit that settles it
    )


def check_compatible(stored: QueueSpec, declared: QueueSpec) -> None:
    """Raise if ``declared`` differs from the ``stored`` spec, naming every difference."""
    if stored == declared:
        return
    diffs = {
        f.name: (getattr(stored, f.name), getattr(declared, f.name))
        for f in fields(QueueSpec)
        if getattr(stored, f.name) != getattr(declared, f.name)
    }
    if stored.guarantee != declared.guarantee:
        raise GuaranteeMismatch(stored.name, diffs)
    raise QueueSpecConflict(stored.name, diffs)


def encode_spec(spec: QueueSpec) -> bytes:
    return msgspec.json.encode(spec)


def decode_spec(data: bytes) -> QueueSpec:
    return msgspec.json.decode(data, type=QueueSpec)


def describe(spec: QueueSpec, facts: dict[str, str]) -> QueueDescription:
    """What ``spec`` promises and how; ``facts`` adds the backend's limits right now."""
    limits = dict(facts)
    if spec.guarantee is Guarantee.AT_MOST_ONCE:
        promise = (
            "each message is delivered at most once to each consumer group; it may be "
            "lost on a crash, a disconnect or overflow, and is never duplicated"
        )
        mechanism: tuple[str, ...] = (
            "held in memory, never waits for fsync",
            "auto-ack: a message counts as processed when it is handed out",
            f"bounded at {spec.capacity} messages per group, dropping the {spec.drop} "
            "on overflow (counted in stats)",
        )
        if spec.conflate:
            mechanism += ("conflated by key: only the latest message per key is kept",)
        limits.update(capacity=str(spec.capacity), drop=str(spec.drop))
    else:
        if spec.guarantee is Guarantee.EXACTLY_ONCE:
            promise = (
                "every acknowledged send is stored once and processed once per consumer "
                "group: a retried send is not stored again, an ack returns only once it is "
                "durable and the group never gets the message again, and a transaction's "
                "sends and acks take effect together or not at all. A redelivery (after a "
                "crash before the ack) is invisible to effects made in a transaction or "
                "recorded through the inbox"
            )
        else:
            promise = (
                "every acknowledged send is delivered to each consumer group until a "
                "consumer acks it; a message may be delivered more than once"
            )
        budget = (
            f"after {spec.max_deliveries} failed attempts (nack or lease expiry) or a "
            f"reject, the message moves to {spec.dead_letter!r} with its provenance"
            if spec.max_deliveries is not None
            else "failed messages are retried without limit"
            + (f"; reject moves them to {spec.dead_letter!r}" if spec.dead_letter else "")
        )
        mechanism = (
            "send returns after the message is fsynced (group commit shares one fsync "
            "among concurrent sends)",
            f"lease of {spec.ack_timeout:g} s per delivery (extend() to hold longer); "
            "expiry, nack or a lost consumer make it available again",
            f"redelivery backoff: exponential from {spec.backoff.initial_s:g} s, x"
            f"{spec.backoff.multiplier:g}, capped at {spec.backoff.max_s:g} s, "
            f"jitter {spec.backoff.jitter:.0%}",
            budget,
            "per-key order: a group never has two messages of one key in flight",
            "releases on shutdown or disconnect do not spend the delivery budget",
        )
        if spec.guarantee is Guarantee.EXACTLY_ONCE:
            mechanism += (
                "idempotent producers: a retried send (same producer, epoch and sequence) "
                "gets its original result; producer state lives in the same commit as the "
                "messages it guards",
                "acks are confirmed commits: ack() returns after the ack is fsynced",
                "transactions: sends to any queues and acks of messages from any queues "
                "commit in one atomic write; consumers read committed messages only; "
                "reopening a transactional id fences the previous holder",
            )
        if spec.dedup:
            mechanism += (
                f"a send whose id is already stored is acknowledged and not stored again; "
                f"ids are remembered while the message is retained and at least "
                f"{spec.dedup_window:g} s after it was stored",
            )
            limits["dedup_window"] = f"{spec.dedup_window:g} s"
        limits.update(
            max_deliveries=str(spec.max_deliveries) if spec.max_deliveries else "unlimited",
            ack_timeout=f"{spec.ack_timeout:g} s",
            retention=f"deleted {spec.retention:g} s after every group acked it",
        )
    limits["max_message_bytes"] = str(spec.max_message_bytes)
    return QueueDescription(
        name=spec.name,
        guarantee=spec.guarantee,
        promise=promise,
        mechanism=mechanism,
        limits=limits,
        spec=spec,
    )

"""How arrival's queues map onto JetStream: names, subjects, stream and consumer settings,
and message headers. Pure functions, no connection: tested on their own.

One queue is one stream; one consumer group is one durable pull consumer on it. Names
are escaped so that every queue name arrival accepts is a valid, distinct stream name:
letters and digits stay, ``-`` ``.`` ``:`` ``_`` ``~`` become ``_h`` ``_d`` ``_c`` ``_u``
``_t``, and the namespace (letters and digits only) goes in front.
"""

from __future__ import annotations

import base64
import re
import uuid
from typing import Any, Final

from arrival.errors import UsageError
from arrival.model import Backoff, DropPolicy, Guarantee, QueueSpec
from arrival.semantics.spec import encode_spec

__all__ = [
    "H_ID",
    "H_KEY",
    "META_SPEC",
    "backoff_waits",
    "consumer_config",
    "consumer_name",
    "decode_headers",
    "encode_headers",
    "escape",
    "key_token",
    "stream_config",
    "stream_name",
    "subject",
    "unescape",
]

H_ID: Final = "Arrival-Id"  # the message's id, as the producer gave it
H_KEY: Final = "Arrival-Key"  # its key
META_SPEC: Final = "arrival-spec"  # stream metadata: the queue's spec, as JSON
META_DLQ: Final = "arrival-dlq"  # stream metadata: the stream is a dead-letter queue
META_SETTLED: Final = "arrival-settled"  # stream metadata: exactly-once settle markers
META_KEYS: Final = "arrival-keys"  # stream metadata: the per-key gates of consumer groups
NAMESPACE = re.compile(r"[A-Za-z0-9]{1,32}")
MAX_STREAM_NAME = 255
DEFAULT_DUPLICATE_WINDOW_S = 120.0  # JetStream's own default: covers a producer's retries
MAX_ACK_PENDING = 20_000  # deliveries a group may have leased at once
BACKOFF_STEPS = 8  # redelivery waits spelled out to JetStream; the last one repeats
HEADER_OVERHEAD = 512  # room for arrival's and JetStream's headers in a stored message

_QUEUE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:\-]{0,199}")
_ESC = {"-": "_h", ".": "_d", ":": "_c", "_": "_u", "~": "_t"}
_UNESC = {v[1]: k for k, v in _ESC.items()}


def escape(name: str) -> str:
    out = []
    for ch in name:
        if ch.isascii() and ch.isalnum():
            out.append(ch)
        elif ch in _ESC:
            out.append(_ESC[ch])
        else:
            raise UsageError(f"{name!r} has a character JetStream names can't carry: {ch!r}")
    return "".join(out)


def unescape(text: str) -> str:
    out = []
    it = iter(text)
    for ch in it:
        if ch == "_":
            out.append(_UNESC[next(it)])
        else:
            out.append(ch)
    return "".join(out)


def stream_name(namespace: str, queue: str) -> str:
    name = f"{namespace}_{escape(queue)}"
    if len(name) > MAX_STREAM_NAME:
        raise UsageError(
            f"queue name {queue!r} is too long for a JetStream stream name once escaped "
            f"({len(name)} > {MAX_STREAM_NAME} characters); choose a shorter name"
        )
    return name


def queue_of_stream(namespace: str, stream: str) -> str | None:
    """The queue a stream holds, if it is one of ``namespace``'s; else None."""
    prefix = f"{namespace}_"
    if not stream.startswith(prefix):
        return None
    try:
        queue = unescape(stream[len(prefix) :])
    except (KeyError, StopIteration):
        return None
    if not _QUEUE_NAME.fullmatch(queue) or stream_name(namespace, queue) != stream:
        return None
    return queue


def consumer_name(group: str) -> str:
    return escape(group)


def key_token(key: str) -> str:
    """A key as one subject token ("_" first: the empty key has a token too)."""
    return "_" + base64.urlsafe_b64encode(key.encode()).decode().rstrip("=")


def subject(namespace: str, queue: str, key: str | None = None, *, conflate: bool = False) -> str:
    """Where a message of ``queue`` is published. Each key has a subject of its own: the
    next message of a key is found by subject (per-key order), and a conflated queue
    keeps only the latest message per subject."""
    base = f"{namespace}.q.{escape(queue)}"
    if key is not None:
        return f"{base}.k.{key_token(key)}"
    if conflate:  # keyless messages are not conflated: each gets a subject of its own
        return f"{base}.n.{uuid.uuid4().hex}"
    return base


def backoff_waits(spec: QueueSpec) -> list[float] | None:
    """JetStream's BackOff for ``spec``: how long after the n-th delivery the server sends
    the message again if no ack came: the lease plus the backoff after n failures.
    JetStream waits fixed times, so the jitter is applied as its mean."""
    b: Backoff = spec.backoff
    if b.initial_s <= 0:
        return None
    mean = 1.0 - b.jitter / 2
    waits = []
    delay = b.initial_s
    for _ in range(BACKOFF_STEPS):
        waits.append(round(spec.ack_timeout + min(delay, b.max_s) * mean, 3))
        delay *= b.multiplier
    return waits


def stream_config(
    namespace: str, spec: QueueSpec, *, replicas: int, atomic: bool
) -> dict[str, Any]:
    """The JetStream stream configuration (the API's JSON) holding queue ``spec``."""
    base = f"{namespace}.q.{escape(spec.name)}"
    config: dict[str, Any] = {
        "name": stream_name(namespace, spec.name),
        "subjects": [base, base + ".>"],
        "retention": "limits",
        "max_msg_size": spec.max_message_bytes + HEADER_OVERHEAD,
        "allow_direct": True,
        "metadata": {META_SPEC: encode_spec(spec).decode()},
    }
    if spec.guarantee is Guarantee.AT_MOST_ONCE:
        config.update(
            storage="memory",
            num_replicas=1,
            discard="new" if spec.drop is DropPolicy.NEWEST else "old",
            duplicate_window=_ns(1.0),
        )
        if spec.capacity is not None:
            config["max_msgs"] = spec.capacity
        if spec.conflate:
            config["max_msgs_per_subject"] = 1
        return config
    window = DEFAULT_DUPLICATE_WINDOW_S
    if spec.dedup or spec.guarantee is Guarantee.EXACTLY_ONCE:
        window = max(window, spec.dedup_window)
    config.update(
        storage="file",
        num_replicas=replicas,
        discard="old",  # never reached: no limits are set on a durable queue
        duplicate_window=_ns(window),
    )
    if atomic:
        config["allow_atomic"] = True
    return config


def consumer_config(spec: QueueSpec, group: str, *, latest: bool) -> dict[str, Any]:
    """The durable pull consumer of ``group`` on ``spec``'s stream."""
    config: dict[str, Any] = {
        "durable_name": consumer_name(group),
        "deliver_policy": "new" if latest else "all",
        "replay_policy": "instant",
    }
    if spec.guarantee is Guarantee.AT_MOST_ONCE:
        config["ack_policy"] = "none"
        return config
    config.update(
        ack_policy="explicit",
        ack_wait=_ns(spec.ack_timeout),
        max_deliver=-1,  # the budget is kept by arrival, which dead-letters with provenance
        max_ack_pending=MAX_ACK_PENDING,
    )
    waits = backoff_waits(spec)
    if waits is not None:
        config["backoff"] = [_ns(w) for w in waits]
    return config


def _ns(seconds: float) -> int:
    return int(seconds * 1_000_000_000)


_BAD_HEADER_NAME = re.compile(r"[^\x21-\x39\x3b-\x7e]")  # printable ASCII but ':'


def encode_headers(
    mid: str | None, key: str | None, headers: dict[str, str] | None
) -> dict[str, str] | None:
    """The NATS headers carrying a message's id, key and headers."""
    if not headers and mid is None and key is None:
        return None
    out: dict[str, str] = {}
    if headers:
        for name, value in headers.items():
            if name.lower().startswith("nats-") or name in (H_ID, H_KEY):
                raise UsageError(
                    f"header {name!r} is reserved on JetStream (names starting with 'Nats-', "
                    f"{H_ID!r} and {H_KEY!r}); rename it"
                )
            if not name or _BAD_HEADER_NAME.search(name):
                raise UsageError(
                    f"header name {name!r} can't travel in a NATS header: use printable "
                    f"ASCII without spaces or ':'"
                )
            if "\r" in value or "\n" in value:
                raise UsageError(f"header {name!r} has a line break, which NATS can't carry")
            if value != value.strip(" \t"):
                raise UsageError(
                    f"header {name!r} starts or ends with blanks, which NATS drops: strip them"
                )
            out[name] = value
    if mid is not None:
        out[H_ID] = mid
    if key is not None:
        out[H_KEY] = key
    return out


def decode_headers(
    raw: dict[str, str] | None,
) -> tuple[str | None, str | None, dict[str, str] | None]:
    """(id, key, headers) of a stored message's NATS headers."""
    if not raw:
        return None, None, None
    mid = key = None
    headers: dict[str, str] = {}
    for name, value in raw.items():
        if name == H_ID:
            mid = value
        elif name == H_KEY:
            key = value
        elif not name.lower().startswith("nats-"):
            headers[name] = value
    return mid, key, headers or None

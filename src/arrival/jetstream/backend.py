"""``arrival.connect("nats://host:4222")``: the broker operations on NATS JetStream.

JetStream keeps the messages, the consumer positions and the leases, replicated by Raft
on a cluster; this backend keeps arrival's contract on top of it (docs/cluster.md):

- a queue is a stream (file storage, R3 on a cluster, for durable queues; memory for
  at-most-once), its spec in the stream's metadata; a group is a durable pull consumer;
- a durable send waits for the stream's PubAck; sends of several messages go as one
  atomic batch (nats-server 2.12+); each carries a ``Nats-Msg-Id`` so that a retry is
  stored once within the stream's duplicate window;
- the delivery budget, backoff and dead-lettering with provenance are arrival's: the
  consumer never gives up on its own (``max_deliver=-1``); a nack past the budget, or a
  delivery that arrives past it (after lease expiries), is published to the dead-letter
  stream and then acked;
- acks are JetStream double acks (confirmed by the server) unless the settle is
  recorded already; on exactly-once queues a lease record per message lets only the
  newest delivery settle, once;
- per-key order: a gate per group and key (compare-and-set entries in a stream) lets
  a key's next message out only once the one before it is settled.

nats-py is asyncio-only: its client runs on an event loop in a thread of its own, and
each operation returns a ``Future`` that the loop completes, so the blocking and the
asyncio APIs share it.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import dataclasses
import datetime
import itertools
import json
import random
import threading
import time
import urllib.request
import uuid
from collections import deque
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, TypeVar
from urllib.parse import parse_qs, urlsplit

import nats
import nats.errors
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

from arrival._backend import Backend, Where
from arrival._codec import RecordTuple
from arrival._pending import Future, Pending, Ready
from arrival.engine import (
    DLQ_GROUP,
    H_ATTEMPTS,
    H_DEAD_AT,
    H_FAILURES,
    H_FIRST_FAILURE,
    H_LAST_ERROR,
    H_LAST_FAILURE,
    H_ORIGIN_GROUP,
    H_ORIGIN_OFFSET,
    H_ORIGIN_QUEUE,
    H_QUARANTINED,
    H_REASON,
    H_REPLAY_GROUP,
    H_REPLAYS,
    DeadMessage,
    Delivery,
    ProducerSeq,
    Send,
    TxnAcks,
    _check_id,
    check_size,
    dead_message,
)
from arrival.errors import (
    AlreadySettled,
    ArrivalError,
    BrokerUnreachable,
    ClosedError,
    GuaranteeUnavailable,
    InvalidQueueSpec,
    LeaseExpired,
    NotSupported,
    ProducerFenced,
    TransactionTimedOut,
    UnknownQueue,
    UsageError,
)
from arrival.jetstream import mapping
from arrival.model import (
    BrokerStats,
    ConsumerStats,
    GroupStats,
    Guarantee,
    QueueDescription,
    QueueSpec,
    QueueStats,
    StoredMessage,
)
from arrival.semantics.retry import DeadLetter, decide_retry
from arrival.semantics.spec import (
    check_compatible,
    dead_letter_spec,
    decode_spec,
    describe,
    validate_queue_name,
)

__all__ = ["NatsBackend", "NatsOptions", "parse_nats_url"]

T = TypeVar("T")

API = "$JS.API"
API_TIMEOUT_S = 5.0  # one JetStream API request
OP_DEADLINE_S = 30.0  # how long an operation keeps retrying while the cluster recovers
RETRY_PAUSE_S = 0.25
MAX_BATCH = 1000  # JetStream's limit of messages in one atomic batch
PULL_EXPIRES_S = 5.0  # a long poll's pull request, renewed while receive() waits
ATOMIC_VERSION = (2, 12, 0)
MIN_VERSION = (2, 10, 0)
TXN_BUCKET_SUFFIX = "_txn"
MAX_UNANSWERED = 10_000  # at-most-once sends whose answers are collected (read your writes)
TRIM_EVERY_S = 30.0  # how often a client deletes what every group acked (retention)
SETTLE_S = 2.0  # how long a receive waits for them
GIVE_BACK_S = 0.05  # how long a receive waits for a message this connection just gave back
PULL_GRACE_S = 1.0  # how long past its timeout an at-most-once receive waits for its pull's end

ERR_STREAM_NOT_FOUND = 10059
ERR_CONSUMER_NOT_FOUND = 10014
ERR_STREAM_NAME_IN_USE = 10058
ERR_NO_CLUSTER = 10074  # replicas > 1 not supported in non-clustered mode
ERR_INSUFFICIENT_RESOURCES = 10023
ERR_BATCH_DUPLICATE = 10201  # an atomic batch repeats a message id already stored
ERR_MSG_NOT_FOUND = 10037
ERR_WRONG_LAST_SEQUENCE = 10071  # a Nats-Expected-Last-Subject-Sequence did not hold
SETTLED_SUFFIX = "__settled"  # the stream of exactly-once lease records, per namespace
SETTLED_MAX_AGE_S = 7 * 24 * 3600.0  # how long a record fences a stale delivery's settle
MAX_GATES_REMEMBERED = 100_000  # gates this client took, kept to open them in one write
KEYS_SUFFIX = "__keys"  # the stream of per-key gates (one entry per group and key)


@dataclass(frozen=True)
class NatsOptions:
    """What ``nats://`` URLs carry besides the servers (``?name=value&...``).

    ``namespace``: prefix of every stream arrival makes (letters and digits);
    ``replicas``: stream replicas of durable queues (default: 3 on a cluster, else 1);
    ``monitor``: the servers' monitoring URLs (``http://host:8222``, comma-separated),
    read to check that they fsync before acknowledging (``sync_interval: always``);
    ``fsync``: ``verify`` (default) refuses a durable queue unless every server is seen
    to fsync before acknowledging; ``trust`` takes the operator's word for it.
    """

    servers: tuple[str, ...]
    namespace: str = "arrival"
    replicas: int | None = None
    monitor: tuple[str, ...] = ()
    fsync: str = "verify"


def parse_nats_url(url: str) -> NatsOptions:
    """``nats://h1:4222,h2:4222?namespace=app&monitor=http://h1:8222`` → options."""
    text, _, query = url.partition("?")
    servers = []
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        if "://" not in part:
            part = "nats://" + part
        parts = urlsplit(part)
        try:
            _port = parts.port
        except ValueError:
            raise UsageError(
                f"bad port in NATS server URL {part!r}; use nats://host:4222"
            ) from None
        if parts.scheme not in ("nats", "tls") or not parts.hostname:
            raise UsageError(f"not a NATS server URL: {part!r}; use nats://host:4222")
        servers.append(part)
    if not servers:
        raise UsageError(f"no NATS server in {url!r}; use nats://host:4222")
    opts: dict[str, Any] = {}
    for name, values in parse_qs(query, keep_blank_values=True).items():
        value = values[-1]
        if name == "namespace":
            if not mapping.NAMESPACE.fullmatch(value):
                raise UsageError(
                    f"namespace {value!r}: use 1-32 letters and digits (it prefixes stream names)"
                )
            opts["namespace"] = value
        elif name == "replicas":
            if value not in ("1", "3", "5"):
                raise UsageError(f"replicas={value!r}: use 1, 3 or 5")
            opts["replicas"] = int(value)
        elif name == "monitor":
            opts["monitor"] = tuple(v.strip() for v in value.split(",") if v.strip())
        elif name == "fsync":
            if value not in ("verify", "trust"):
                raise UsageError(f"fsync={value!r}: use 'verify' or 'trust'")
            opts["fsync"] = value
        else:
            raise UsageError(
                f"unknown option {name!r} in {url!r}; known: namespace, replicas, monitor, fsync"
            )
    return NatsOptions(servers=tuple(servers), **opts)


class JetStreamError(ArrivalError):
    """An error answer of the JetStream API."""

    def __init__(self, code: int, err_code: int, description: str) -> None:
        super().__init__(f"JetStream: {description} (error {err_code})")
        self.code = code
        self.err_code = err_code
        self.retriable = code in (503, 408)


def _version(text: str) -> tuple[int, ...]:
    nums = []
    for part in text.split("-")[0].split("."):
        try:
            nums.append(int(part))
        except ValueError:
            break
    return tuple(nums)


def _status(msg: Msg) -> str | None:
    """The status of a pull's status message; None for a delivery (which has an ack
    subject, whatever its headers and body)."""
    h = msg.headers
    if not h or msg.data or (msg.reply or "").startswith("$JS.ACK."):
        return None
    return h.get("Status")


_Outgoing = tuple[str, dict[str, str] | None, bytes]  # (subject, NATS headers, body)


Admission = Literal["yes", "wait", "stale", "settled"]


@dataclass
class _Held:
    msg: Msg
    deadline: float  # our lease: the wall-clock time until which an ack is accepted
    failures_before: int
    keepalive: asyncio.TimerHandle | None = None
    key: str | None = None  # its key: settling it opens the key's gate for the next one
    delivery: int = 0  # JetStream's delivery count of this delivery
    lease: int = 0  # exactly-once: the revision of its lease record this delivery took
    given: int = 0  # times it was given back (released) before: not attempts


@dataclass
class _Member:
    id: int
    queue: str
    group: str
    spec: QueueSpec
    stream: str
    consumer: str
    inbox: str
    sub: Subscription | None = None
    buffer: deque[tuple[Msg, float]] = field(default_factory=deque)
    arrived: asyncio.Event = field(default_factory=asyncio.Event)
    pull_left: int = 0  # messages the outstanding pull request may still bring
    no_wait: bool = False  # it is a no_wait request: the server answers it at once
    pull_until: float = 0.0
    pull_gen: int = 0  # the latest pull request's number: its answers come to inbox.<n>
    receiving: bool = False  # a receive() is running on this member
    pull_sub: Subscription | None = None  # at-most-once: the latest pull's own inbox
    arrive_cb: Callable[[Msg], Awaitable[None]] | None = None
    held: dict[tuple[int, int], _Held] = field(default_factory=dict)
    # per-key order: deliveries waiting for their key's gate, by key token, in sequence
    # order (seq, msg, arrived, key); the tokens whose gate may have opened
    blocked: dict[str, list[tuple[int, Msg, float, str]]] = field(default_factory=dict)
    woken: set[str] = field(default_factory=set)
    gate_sub: Subscription | None = None
    tender: asyncio.Task[None] | None = None
    floor: int = 0  # the consumer's ack floor (a stream sequence) when last read
    parked: bool = False  # a delivery was set to wait since the last pull
    closed: bool = False
    received: int = 0
    acked: int = 0
    nacked: int = 0
    rejected: int = 0


class NatsBackend(Backend):
    """The broker operations on NATS JetStream, through one nats-py connection."""

    def __init__(self, url: str, *, reconnect: float = 30.0, token: str | None = None) -> None:
        self.url = url
        self.options = parse_nats_url(url)
        self._reconnect = reconnect
        self._token = token
        self._rng = random.Random()
        self._specs: dict[str, QueueSpec] = {}
        self._members: dict[int, _Member] = {}
        self._member_ids = itertools.count(1)
        self._closed = False
        self._fsync: str | None = None  # "always", "interval Ns", or None: not known
        self._replicas: int | None = self.options.replicas
        self._txn_stream = f"KV_{self.options.namespace}{TXN_BUCKET_SUFFIX}"  # a KV bucket
        self._made: set[str] = set()  # arrival's own streams known to exist
        self._settled_stream = f"{self.options.namespace}{SETTLED_SUFFIX}"
        self._keys_stream = f"{self.options.namespace}{KEYS_SUFFIX}"
        self._gate_revs: dict[tuple[str, int], int] = {}  # gates this client took: revision
        self._gate_done: dict[str, int] = {}  # each gate's "done" as last read here
        self._txn_gens: dict[str, int] = {}
        self._unanswered: set[asyncio.Task[None]] = set()
        self._gave_back = 0.0  # when this connection last NAKed a message due at once
        self._trim_every = TRIM_EVERY_S
        self._trimmer: asyncio.Task[None] | None = None
        self._commits = 0
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._run_loop, name="arrival-nats", daemon=True)
        self._thread.start()
        self._nc: NatsClient | None = None
        self.server_version: tuple[int, ...] = ()
        try:
            self._call(self._connect()).wait()
        except BaseException:
            self._stop_loop()
            raise

    # -- the loop thread ----------------------------------------------------------------
    def _run_loop(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._loop.run_forever()

    def _stop_loop(self) -> None:
        if self._loop.is_closed():
            return
        # operations still running end with ClosedError, rather than vanish with the loop
        with contextlib.suppress(Exception):
            asyncio.run_coroutine_threadsafe(_cancel_all(), self._loop).result(5)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)
        if not self._thread.is_alive():
            self._loop.close()

    def _call(self, coro: Coroutine[Any, Any, T]) -> Future[T]:
        """Run ``coro`` on the loop; its result or error completes the returned Future."""
        fut: Future[T] = Future()

        def start() -> None:
            task = self._loop.create_task(coro)

            def done(t: asyncio.Task[T]) -> None:
                if t.cancelled():
                    fut.set_exception(ClosedError("the broker"))
                elif (exc := t.exception()) is not None:
                    fut.set_exception(exc)
                else:
                    fut.set_result(t.result())

            task.add_done_callback(done)

        try:
            self._loop.call_soon_threadsafe(start)
        except RuntimeError:
            coro.close()
            fut.set_exception(ClosedError("the broker"))
        return fut

    # -- connection ---------------------------------------------------------------------
    async def _connect(self) -> None:
        wait = 0.5
        # nats-py reads 0 attempts as "no limit": one attempt is the least there is
        attempts = max(1, int(self._reconnect / wait))
        try:
            nc = await nats.connect(
                servers=list(self.options.servers),
                name="arrival",
                connect_timeout=5,
                allow_reconnect=self._reconnect > 0,
                max_reconnect_attempts=attempts,
                reconnect_time_wait=wait,
                token=self._token,
                error_cb=self._on_error,
            )
        except (TimeoutError, OSError, nats.errors.Error) as exc:
            raise BrokerUnreachable(
                f"can't connect to {self.url!r}: {exc or type(exc).__name__}"
            ) from exc
        self._nc = nc
        self._trimmer = asyncio.get_running_loop().create_task(self._trimming())
        info = nc._server_info  # the INFO the server sent: version, jetstream
        if not info.get("jetstream"):
            await nc.close()
            raise NotSupported(
                f"the NATS server at {self.url!r} runs without JetStream; start it with "
                f"-js (or a 'jetstream {{}}' block in its configuration)"
            )
        self.server_version = _version(str(info.get("version", "0")))
        if self.server_version < MIN_VERSION:
            await nc.close()
            raise NotSupported(
                f"nats-server {info.get('version')} is too old: arrival needs 2.10 or newer"
            )

    async def _on_error(self, exc: Exception) -> None:
        return None  # reconnects are nats-py's; operations see their own errors

    @property
    def nc(self) -> NatsClient:
        if self._nc is None or self._closed:
            raise ClosedError("the broker")
        return self._nc

    @property
    def epoch(self) -> int:
        return 1

    @property
    def closed(self) -> bool:
        return self._closed or self._nc is None or self._nc.is_closed

    def now(self) -> float:
        return time.time()

    # -- the JetStream API --------------------------------------------------------------
    async def _api(self, subject: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
        """One JetStream API request (``$JS.API.<subject>``)."""
        payload = json.dumps(body).encode() if body is not None else b""
        verb = subject.split(".")[0].lower()

        def once() -> Awaitable[Msg]:
            return self.nc.request(f"{API}.{subject}", payload, timeout=API_TIMEOUT_S)

        return await self._retrying(f"answer a {verb} request", once)

    async def _retrying(self, what: str, once: Callable[[], Awaitable[Msg]]) -> dict[str, Any]:
        """JetStream's JSON answer to ``once()``, which is repeated while the answer is a
        retriable error or does not come (a cluster electing a leader), for up to
        OP_DEADLINE_S. Repeating is safe for what is sent here: API requests, and
        publishes that carry a Nats-Msg-Id."""
        deadline = time.monotonic() + OP_DEADLINE_S
        while True:
            try:
                reply = await once()
                answer: dict[str, Any] = json.loads(reply.data)
                err = answer.get("error")
                if err is None:
                    return answer
                exc = JetStreamError(err.get("code", 0), err.get("err_code", 0), err["description"])
                if not exc.retriable:
                    raise exc
                error: Exception = exc
            except (nats.errors.TimeoutError, nats.errors.NoRespondersError) as exc:
                error = exc
            except nats.errors.ConnectionClosedError as exc:
                raise self._lost(exc) from exc
            if time.monotonic() > deadline:
                raise BrokerUnreachable(
                    f"JetStream at {self.url!r} did not {what} within {OP_DEADLINE_S:g} s "
                    f"({error or type(error).__name__}): is a quorum of its servers up?"
                )
            await asyncio.sleep(RETRY_PAUSE_S)

    def _lost(self, exc: BaseException) -> ArrivalError:
        if self._closed:
            return ClosedError("the broker")
        return BrokerUnreachable(f"lost the connection to {self.url!r}: {exc}")

    # -- queues -------------------------------------------------------------------------
    def _stream(self, queue: str) -> str:
        return mapping.stream_name(self.options.namespace, queue)

    async def _load_spec(self, queue: str) -> QueueSpec:
        spec = self._specs.get(queue)
        if spec is not None:
            return spec
        try:
            info = await self._api(f"STREAM.INFO.{self._stream(queue)}")
        except JetStreamError as exc:
            if exc.err_code == ERR_STREAM_NOT_FOUND:
                raise UnknownQueue(queue) from None
            raise
        spec = self._spec_of(queue, info)
        self._specs[queue] = spec
        return spec

    def _spec_of(self, queue: str, info: dict[str, Any]) -> QueueSpec:
        meta = (info.get("config") or {}).get("metadata") or {}
        text = meta.get(mapping.META_SPEC)
        if text is None:
            raise UsageError(
                f"stream {self._stream(queue)!r} exists but was not made by arrival "
                f"(no {mapping.META_SPEC!r} metadata); use another queue name or namespace"
            )
        return decode_spec(text.encode())

    async def _check_fsync(self, spec: QueueSpec) -> None:
        """Refuse a durable queue unless the servers fsync before they acknowledge."""
        if spec.guarantee is Guarantee.AT_MOST_ONCE or self.options.fsync == "trust":
            return
        state = await self._fsync_state()
        if state == "always":
            return
        if state is None:
            seen = (
                "the servers' fsync policy can't be read: no ?monitor= URL was given"
                if not self.options.monitor
                else "the servers' fsync policy can't be read from "
                + ", ".join(self.options.monitor)
            )
        else:
            seen = f"the NATS servers fsync only every {state}, after acknowledging"
        raise GuaranteeUnavailable(
            spec.name,
            spec.guarantee,
            f"{seen}, so a power loss could lose an acknowledged message. Run every server "
            f"with 'jetstream {{ sync_interval: always }}' and connect with "
            f"'?monitor=http://host:8222' (each server's monitoring port) so arrival can "
            f"check it, or with '?fsync=trust' if you vouch for it",
        )

    async def _fsync_state(self) -> str | None:
        if self._fsync is not None:
            return self._fsync
        if not self.options.monitor:
            return None
        loop = asyncio.get_running_loop()
        states = []
        for url in self.options.monitor:
            try:
                varz = await loop.run_in_executor(None, _read_varz, url)
            except (OSError, ValueError):
                return None
            config = (varz.get("jetstream") or {}).get("config") or {}
            if config.get("sync_always"):
                states.append("always")
            else:
                states.append(f"{config.get('sync_interval', 120_000_000_000) / 1e9:g} s")
        worst = next((s for s in states if s != "always"), "always")
        self._fsync = worst
        return worst

    def create_queue(self, spec: QueueSpec) -> Pending[QueueSpec]:
        return self._call(self._create_queue(spec))

    async def _create_queue(self, spec: QueueSpec) -> QueueSpec:
        try:
            stored = await self._load_spec(spec.name)
        except UnknownQueue:
            stored = None
        if stored is not None:
            check_compatible(stored, spec)
            return stored
        await self._check_contract(spec)
        if spec.dead_letter is not None:
            try:
                dl = await self._load_spec(spec.dead_letter)
            except UnknownQueue:
                dl = await self._make_stream(dead_letter_spec(spec), dlq=True)
            if dl.guarantee is Guarantee.AT_MOST_ONCE:
                raise InvalidQueueSpec(
                    spec.name,
                    f"dead_letter {spec.dead_letter!r} is an at-most-once queue, which "
                    f"may drop what it is given; name a durable queue",
                )
        return await self._make_stream(spec)

    async def _check_contract(self, spec: QueueSpec) -> None:
        await self._check_fsync(spec)
        if spec.guarantee is Guarantee.EXACTLY_ONCE and self.server_version < ATOMIC_VERSION:
            raise GuaranteeUnavailable(
                spec.name,
                spec.guarantee,
                f"nats-server {'.'.join(map(str, self.server_version))} has no atomic "
                f"batch publish, which a transaction's outputs need: use nats-server 2.12 "
                f"or newer",
            )

    async def _make_stream(self, spec: QueueSpec, *, dlq: bool = False) -> QueueSpec:
        atomic = self.server_version >= ATOMIC_VERSION
        replicas = self._replicas if self._replicas is not None else 3
        while True:
            config = mapping.stream_config(
                self.options.namespace, spec, replicas=replicas, atomic=atomic
            )
            if dlq:  # its letters stay until replayed or purged: never trimmed
                config["metadata"][mapping.META_DLQ] = "1"
            try:
                await self._api(f"STREAM.CREATE.{config['name']}", config)
                break
            except JetStreamError as exc:
                if (
                    exc.err_code in (ERR_NO_CLUSTER, ERR_INSUFFICIENT_RESOURCES)
                    and self._replicas is None
                    and replicas > 1
                ):
                    replicas = 1  # a single server: R1 is all there is
                    continue
                if exc.err_code == ERR_STREAM_NAME_IN_USE:  # made by someone else just now
                    self._specs.pop(spec.name, None)
                    stored = await self._load_spec(spec.name)
                    check_compatible(stored, spec)
                    return stored
                raise
        if spec.guarantee is not Guarantee.AT_MOST_ONCE and self._replicas is None:
            self._replicas = replicas
        self._specs[spec.name] = spec
        return spec

    def spec(self, queue: str) -> Pending[QueueSpec]:
        spec = self._specs.get(queue)
        if spec is not None:
            return Ready(spec)
        return self._call(self._load_spec(queue))

    def is_durable(self, queue: str) -> Pending[bool]:
        return self._call(self._is_durable(queue))

    async def _is_durable(self, queue: str) -> bool:
        return (await self._load_spec(queue)).guarantee is not Guarantee.AT_MOST_ONCE

    def describe(self, queue: str) -> Pending[QueueDescription]:
        return self._call(self._describe(queue))

    async def _describe(self, queue: str) -> QueueDescription:
        spec = await self._load_spec(queue)
        info = await self._api(f"STREAM.INFO.{self._stream(queue)}")
        config = info.get("config") or {}
        cluster = info.get("cluster") or {}
        facts = {
            "backend": "NATS JetStream",
            "stream": str(config.get("name")),
            "storage": str(config.get("storage")),
            "replicas": str(config.get("num_replicas", 1)),
        }
        if cluster.get("leader"):
            facts["leader"] = str(cluster["leader"])
        d = describe(spec, facts)
        limits = dict(d.limits)
        fsync = await self._fsync_state()
        mechanism = _jetstream_mechanism(spec, config, fsync, self.options)
        limits.update(_jetstream_limits(spec, config))
        if spec.guarantee is not Guarantee.AT_MOST_ONCE:
            limits["fsync"] = fsync or ("trusted" if self.options.fsync == "trust" else "unknown")
        return QueueDescription(
            name=d.name,
            guarantee=d.guarantee,
            promise=d.promise,
            mechanism=mechanism,
            limits=limits,
            spec=spec,
        )

    def queue_names(self) -> Pending[list[str]]:
        return self._call(self._queue_names())

    async def _queue_names(self) -> list[str]:
        names: list[str] = []
        offset = 0
        while True:
            answer = await self._api("STREAM.NAMES", {"offset": offset})
            streams = answer.get("streams") or []
            for s in streams:
                q = mapping.queue_of_stream(self.options.namespace, s)
                if q is not None:
                    names.append(q)
            offset += len(streams)
            if not streams or offset >= answer.get("total", 0):
                break
        return sorted(names)

    def peek(self, queue: str, limit: int, start: int | None) -> Pending[list[StoredMessage]]:
        return self._call(self._peek(queue, limit, start))

    async def _peek(self, queue: str, limit: int, start: int | None) -> list[StoredMessage]:
        await self._load_spec(queue)
        await self._settle_sends()
        out = []
        first = 1 if start is None else start + 1
        for seq, ts, raw, body in await self._read(self._stream(queue), first, limit):
            mid, key, headers = mapping.decode_headers(raw)
            out.append(StoredMessage(seq - 1, mid, key, headers or {}, body, ts))
        return out

    async def _read(
        self, stream: str, start: int, limit: int
    ) -> list[tuple[int, float, dict[str, str] | None, bytes]]:
        """Up to ``limit`` stored messages from sequence ``start`` on, by direct gets."""
        out: list[tuple[int, float, dict[str, str] | None, bytes]] = []
        seq = max(1, start)
        while len(out) < limit:
            try:
                reply = await self.nc.request(
                    f"{API}.DIRECT.GET.{stream}",
                    json.dumps({"seq": seq, "next_by_subj": ">"}).encode(),
                    timeout=API_TIMEOUT_S,
                )
            except nats.errors.NoRespondersError:
                raise UnknownQueue(
                    mapping.queue_of_stream(self.options.namespace, stream) or stream
                ) from None
            except nats.errors.TimeoutError as exc:
                raise BrokerUnreachable(f"JetStream at {self.url!r} did not answer a read") from exc
            h = reply.headers or {}
            status = h.get("Status")
            if status is not None:
                if status == "404":
                    break
                raise JetStreamError(int(status), 0, h.get("Description", "direct get failed"))
            got = int(h["Nats-Sequence"])
            out.append((got, _timestamp(h.get("Nats-Time-Stamp")), h, reply.data))
            seq = got + 1
        return out

    def info(self) -> Pending[BrokerStats]:
        return self._call(self._info())

    async def _info(self) -> BrokerStats:
        names = await self._queue_names()
        return BrokerStats(
            backend=f"nats-server {'.'.join(map(str, self.server_version))} at {self.url}",
            epoch=self.epoch,
            queues=len(names),
            commits=self._commits,
            fsyncs=self._commits if self._fsync == "always" else 0,
        )

    def stats(self, queue: str) -> Pending[QueueStats]:
        return self._call(self._stats(queue))

    async def _stats(self, queue: str) -> QueueStats:
        spec = await self._load_spec(queue)
        await self._settle_sends()
        stream = self._stream(queue)
        info = await self._api(f"STREAM.INFO.{stream}")
        state = info.get("state") or {}
        groups = []
        listed = await self._api(f"CONSUMER.LIST.{stream}", {"offset": 0})
        now = time.time()
        for ci in listed.get("consumers") or []:
            name = mapping.unescape(ci["name"])
            pending = int(ci.get("num_pending", 0))
            in_flight = int(ci.get("num_ack_pending", 0))
            delivered = (ci.get("delivered") or {}).get("consumer_seq", 0)
            floor = ci.get("ack_floor") or {}
            oldest = 0.0
            if pending or in_flight:
                first = floor.get("stream_seq", 0) + 1
                got = await self._read(stream, first, 1)
                if got:
                    oldest = max(0.0, now - got[0][1])
            groups.append(
                GroupStats(
                    group=name,
                    backlog=pending + in_flight,
                    in_flight=in_flight,
                    waiting_retry=int(ci.get("num_redelivered", 0)),
                    delivered=int(delivered),
                    acked=int(floor.get("consumer_seq", 0)),
                    redelivered=int(ci.get("num_redelivered", 0)),
                    nacked=sum(
                        m.nacked
                        for m in self._members.values()
                        if m.stream == stream and m.group == name
                    ),
                    expired=0,
                    dead_lettered=0,
                    dropped=0,
                    oldest_unacked_age=oldest,
                    consumers=sum(
                        1
                        for m in self._members.values()
                        if m.stream == stream and m.group == name and not m.closed
                    ),
                )
            )
        first = int(state.get("first_seq", 1))
        last = int(state.get("last_seq", 0))
        return QueueStats(
            name=queue,
            guarantee=spec.guarantee,
            first_offset=first - 1,
            end_offset=last,
            stored=int(state.get("messages", 0)),
            sent=last,
            dropped=0,
            groups=tuple(sorted(groups, key=lambda g: g.group)),
        )

    async def _trim(self, queue: str) -> int:
        """Delete ``queue``'s messages that every group has acked and that were stored
        more than ``retention`` seconds ago; the number deleted. A queue no group
        consumes yet, an at-most-once queue and a dead-letter queue keep everything."""
        spec = await self._load_spec(queue)
        if spec.guarantee is Guarantee.AT_MOST_ONCE:
            return 0
        stream = self._stream(queue)
        info = await self._api(f"STREAM.INFO.{stream}")
        if ((info.get("config") or {}).get("metadata") or {}).get(mapping.META_DLQ):
            return 0
        floor: int | None = None
        offset = 0
        while True:
            page = await self._api(f"CONSUMER.LIST.{stream}", {"offset": offset})
            consumers = page.get("consumers") or []
            for ci in consumers:  # all before ack_floor are acked by that group
                acked = int((ci.get("ack_floor") or {}).get("stream_seq", 0))
                floor = acked if floor is None else min(floor, acked)
            offset += len(consumers)
            if not consumers or offset >= page.get("total", 0):
                break
        if not floor:
            return 0
        upto = floor + 1  # a purge up to a sequence keeps that one and later ones
        if spec.retention > 0:
            newer = await self._first_since(stream, time.time() - spec.retention)
            if newer is not None:
                upto = min(upto, newer)
        answer = await self._api(f"STREAM.PURGE.{stream}", {"seq": upto})
        return int(answer.get("purged", 0))

    async def _first_since(self, stream: str, t: float) -> int | None:
        """The sequence of the first message stored at or after time ``t``."""
        when = datetime.datetime.fromtimestamp(t, datetime.UTC).isoformat()
        request = {"start_time": when.replace("+00:00", "Z")}
        reply = await self._direct_get(stream, None, request)
        return None if reply is None else int((reply.headers or {})["Nats-Sequence"])

    async def _trimming(self) -> None:
        """Every TRIM_EVERY_S, trim the durable queues this connection has used."""
        while not self._closed:
            await asyncio.sleep(self._trim_every)
            for queue in list(self._specs):
                with contextlib.suppress(ArrivalError, nats.errors.Error, OSError):
                    await self._trim(queue)

    # -- producing ----------------------------------------------------------------------
    def register_producer(self, producer: str) -> Pending[int]:
        _check_id("a producer id", producer)
        # an epoch of our own: ids of a new epoch never collide with an earlier one's
        return Ready(time.time_ns() // 1000)

    def send(
        self,
        queue: str,
        messages: Sequence[Send] | None,
        bodies: Sequence[bytes] | None,
        producer: ProducerSeq | None,
    ) -> Pending[int | None]:
        if messages is None:
            assert bodies is not None
            messages = [(None, None, None, b) for b in bodies]
        spec = self._specs.get(queue)
        if spec is not None and spec.guarantee is Guarantee.AT_MOST_ONCE:
            # encoded here, so that what NATS can't carry is refused to the caller
            self._loop.call_soon_threadsafe(self._fire, self._encoded(spec, messages))
            return Ready(None)
        return self._call(self._send(queue, list(messages), producer))

    @staticmethod
    def _check_sizes(spec: QueueSpec, messages: Sequence[Send]) -> None:
        for _mid, _key, headers, body in messages:
            check_size(spec.name, spec.max_message_bytes, headers, body)

    def _encoded(self, spec: QueueSpec, messages: Sequence[Send]) -> list[_Outgoing]:
        """(subject, NATS headers, body) of each message; refuses what NATS can't carry."""
        self._check_sizes(spec, messages)
        ns = self.options.namespace
        return [
            (
                mapping.subject(ns, spec.name, key, conflate=spec.conflate),
                mapping.encode_headers(mid, key, headers),
                body,
            )
            for mid, key, headers, body in messages
        ]

    def _fire(self, outgoing: list[_Outgoing]) -> None:
        """At-most-once: published without the caller waiting, never repeated. The
        stream's answers are collected here, so that this connection's own receives,
        stats and peeks see its earlier sends (``_settle_sends``)."""
        for subj, h, body in outgoing:
            if len(self._unanswered) < MAX_UNANSWERED:
                task = self._loop.create_task(self._publish_quietly(subj, body, h, True))
                self._unanswered.add(task)
                task.add_done_callback(self._unanswered.discard)
            else:  # a burst past the bound: not tracked, still sent in order
                self._loop.create_task(self._publish_quietly(subj, body, h, False))

    async def _publish_quietly(
        self, subj: str, body: bytes, h: dict[str, str] | None, answered: bool
    ) -> None:
        with contextlib.suppress(nats.errors.Error, OSError, asyncio.TimeoutError):
            if answered:
                await self.nc.request(subj, body, headers=h, timeout=SETTLE_S)
            else:
                await self.nc.publish(subj, body, headers=h)

    async def _settle_sends(self) -> None:
        """Wait (a little) for the stream to answer this connection's at-most-once sends."""
        if self._unanswered:
            await asyncio.wait(list(self._unanswered), timeout=SETTLE_S)

    async def _send(
        self, queue: str, messages: list[Send], producer: ProducerSeq | None
    ) -> int | None:
        spec = await self._load_spec(queue)
        if spec.guarantee is Guarantee.AT_MOST_ONCE:
            self._fire(self._encoded(spec, messages))
            return None
        self._check_sizes(spec, messages)  # the headers are encoded once, by _publish
        if producer is not None:
            pid, epoch, seq = producer
            base = f"p:{pid}:{epoch}:{seq}"
        else:
            base = "a:" + uuid.uuid4().hex
        records = [(time.time(), mid, key, headers, body) for mid, key, headers, body in messages]
        ids = [self._msg_id(spec, base, i, r[1]) for i, r in enumerate(records)]
        return await self._publish(spec, records, ids)

    @staticmethod
    def _msg_id(spec: QueueSpec, base: str, i: int, mid: str | None) -> str:
        if spec.dedup and mid is not None:
            return "i:" + mid
        return f"{base}:{i}"

    async def _publish(
        self, spec: QueueSpec, records: Sequence[RecordTuple], ids: list[str]
    ) -> int:
        """Store ``records`` durably, each once; the first one's sequence."""
        ns = self.options.namespace
        msgs = []
        for (_ts, mid, key, headers, body), msg_id in zip(records, ids, strict=True):
            h = mapping.encode_headers(mid, key, headers) or {}
            h["Nats-Msg-Id"] = msg_id
            msgs.append((mapping.subject(ns, spec.name, key, conflate=spec.conflate), h, body))
        first: int | None = None  # a sequence: offsets are sequences - 1 (they start at 0)
        # a batch repeating a stored id is refused whole (error 10201), and then sent
        # message by message, each duplicate answering with its original's sequence
        atomic = self.server_version >= ATOMIC_VERSION
        for start in range(0, len(msgs), MAX_BATCH):
            chunk = msgs[start : start + MAX_BATCH]
            if atomic and len(chunk) > 1:
                got = await self._publish_batch(chunk)
            else:
                got = await self._publish_each(chunk)
            first = got if first is None else first
        self._commits += 1
        assert first is not None
        return first - 1

    async def _publish_each(self, msgs: list[tuple[str, dict[str, str], bytes]]) -> int:
        acks = await asyncio.gather(*(self._publish_one(s, h, b) for s, h, b in msgs))
        return acks[0]  # a duplicate answers with its original's sequence

    async def _publish_one(self, subj: str, h: dict[str, str], body: bytes) -> int:
        def once() -> Awaitable[Msg]:
            return self.nc.request(subj, body, headers=h, timeout=API_TIMEOUT_S)

        return int((await self._retrying("store a message", once))["seq"])

    async def _publish_batch(self, msgs: list[tuple[str, dict[str, str], bytes]]) -> int:
        """All of ``msgs`` or none, as one atomic batch (nats-server 2.12+)."""
        last = len(msgs)

        async def once() -> Msg:
            batch = uuid.uuid4().hex  # a repeat is a new batch of the same messages
            for n, (subj, h, body) in enumerate(msgs[:-1], 1):
                hb = dict(h, **{"Nats-Batch-Id": batch, "Nats-Batch-Sequence": str(n)})
                await self.nc.publish(subj, body, headers=hb)
            subj, h, body = msgs[-1]
            hb = dict(h, **{"Nats-Batch-Id": batch, "Nats-Batch-Sequence": str(last)})
            hb["Nats-Batch-Commit"] = "1"
            return await self.nc.request(subj, body, headers=hb, timeout=API_TIMEOUT_S)

        try:
            answer = await self._retrying("commit a batch", once)
        except JetStreamError as exc:
            if exc.err_code != ERR_BATCH_DUPLICATE:
                raise
            # stored before (a batch is all or nothing): each id answers with its
            # original sequence
            return await self._publish_each(msgs)
        return int(answer["seq"]) - last + 1

    # -- transactions -------------------------------------------------------------------
    def begin_transaction(self, tid: str) -> Pending[tuple[int, int]]:
        # in this process a newer holder fences at once; across processes, the KV entry
        gen = self._txn_gens[tid] = self._txn_gens.get(tid, 0) + 1
        return self._call(self._begin(tid, gen))

    async def _ensure_stream(self, stream: str, config: dict[str, Any]) -> None:
        """Make one of arrival's own streams on first use (once per connection)."""
        if stream in self._made:
            return
        try:
            await self._api(f"STREAM.INFO.{stream}")
        except JetStreamError as exc:
            if exc.err_code != ERR_STREAM_NOT_FOUND:
                raise
            config = {
                "name": stream,
                "storage": "file",
                "num_replicas": self._replicas if self._replicas is not None else 1,
                "allow_direct": True,
                "max_msgs_per_subject": 1,
                **config,
            }
            try:
                await self._api(f"STREAM.CREATE.{stream}", config)
            except JetStreamError as exc2:
                if exc2.err_code != ERR_STREAM_NAME_IN_USE:
                    raise
        self._made.add(stream)

    async def _ensure_txn_bucket(self) -> str:
        """The KV bucket of transactional ids (made on first use), by name."""
        name = self._txn_stream[3:]
        await self._ensure_stream(
            self._txn_stream,
            {
                "subjects": [f"$KV.{name}.>"],
                "discard": "new",
                "allow_rollup_hdrs": True,
                "deny_delete": True,
            },
        )
        return name

    async def _begin(self, tid: str, gen: int) -> tuple[int, int]:
        """A new holder of ``tid``: its KV entry's next revision fences every earlier one."""
        _check_id("a transactional id", tid)
        name = await self._ensure_txn_bucket()
        subj = f"$KV.{name}.{mapping.escape(tid)}"

        def once() -> Awaitable[Msg]:
            return self.nc.request(subj, str(time.time()).encode(), timeout=API_TIMEOUT_S)

        answer = await self._retrying("open a transactional id", once)
        return (gen, int(answer["seq"]))

    async def _fenced(self, tid: str, revision: int) -> bool:
        name = self._txn_stream[3:]
        reply = await self._direct_get(f"KV_{name}", f"$KV.{name}.{mapping.escape(tid)}")
        if reply is None:
            return True
        return int((reply.headers or {}).get("Nats-Sequence", "0")) != revision

    def end_transaction(self, tid: str, epoch: tuple[int, int]) -> Pending[None]:
        return Ready(None)

    def commit_transaction(
        self,
        tid: str,
        epoch: tuple[int, int],
        started: float,
        timeout: float,
        sends: Sequence[tuple[str, list[RecordTuple]]],
        acks: TxnAcks,
        keep: bool,
    ) -> Pending[None]:
        return self._call(self._commit(tid, epoch, started, timeout, list(sends), acks))

    async def _commit(
        self,
        tid: str,
        epoch: tuple[int, int],
        started: float,
        timeout: float,
        sends: list[tuple[str, list[RecordTuple]]],
        acks: TxnAcks,
    ) -> None:
        """The outputs, each queue's as one atomic batch with ids derived from the inputs
        (so a redelivered input's transaction repeats them and JetStream stores them
        once), then the inputs' double acks."""
        if time.time() - started > timeout:
            raise TransactionTimedOut(tid, timeout)
        if self._txn_gens.get(tid) != epoch[0] or await self._fenced(tid, epoch[1]):
            raise ProducerFenced("transactional id", tid, "a newer holder opened it")
        _check_id("a transactional id", tid)
        held = []
        for member_id, _ep, receipts in acks:
            m0 = self._members.get(member_id)
            if m0 is not None and m0.spec.guarantee is Guarantee.AT_MOST_ONCE:
                continue  # handed out is processed: nothing to ack
            for off, attempt in dict.fromkeys(receipts):
                m = self._settling(member_id, off, attempt)
                held.append((m, off, attempt, self._holding(m, off, attempt)))
        if held:
            inputs = sorted(f"{m.stream}/{m.consumer}/{off}" for m, off, _a, _h in held)
            base = "t:" + uuid.uuid5(uuid.NAMESPACE_URL, "|".join(inputs)).hex
        else:
            base = f"t:{tid}:{epoch[1]}:{uuid.uuid4().hex}"
        for qi, (queue, records) in enumerate(sends):
            spec = await self._load_spec(queue)
            ids = [self._msg_id(spec, f"{base}:{qi}", i, r[1]) for i, r in enumerate(records)]
            await self._publish(spec, records, ids)
        exact = [x for x in held if x[0].spec.guarantee is Guarantee.EXACTLY_ONCE]
        if exact:
            await self._claim(exact)
        await asyncio.gather(*(self._ack_one(m, off, attempt, h) for m, off, attempt, h in held))

    # -- exactly-once leases: a record per delivered message ------------------------------
    # JetStream takes an ack (or a NAK) from any delivery of a pending message, also from
    # one whose lease ran out and that was delivered again since: a consumer paused while
    # a delivery sat in its socket finds it there on waking, its lease clock fresh. On an
    # exactly-once queue arrival keeps the lease itself: a record per message, {"d": the
    # delivery that holds it, "settled": who settled it}, in the namespace's settled
    # stream, changed only by compare-and-set. A delivery takes the record when it is
    # handed out (an older one may no longer), and settling is a compare-and-set from the
    # revision it took (all inputs of a commit in one atomic batch): the newest delivery
    # settles, once; a superseded one fails with LeaseExpired.
    async def _ensure_settled_stream(self) -> None:
        await self._ensure_stream(
            self._settled_stream,
            {
                "subjects": [f"{self.options.namespace}.settled.>"],
                "max_age": int(SETTLED_MAX_AGE_S * 1e9),
                "discard": "old",
                "allow_atomic": self.server_version >= ATOMIC_VERSION,
                "metadata": {mapping.META_SETTLED: "1"},
            },
        )

    def _lease_subject(self, m: _Member, seq: int) -> str:
        return f"{self.options.namespace}.settled.{m.stream}.{m.consumer}.{seq}"

    async def _lease_read(self, subj: str) -> tuple[int, int, str]:
        """(revision, holding delivery, settled by) of a lease record; zeros if none."""
        reply = await self._direct_get(self._settled_stream, subj)
        if reply is None:
            return 0, 0, ""
        v = json.loads(reply.data)
        revision = int((reply.headers or {})["Nats-Sequence"])
        return revision, int(v["d"]), str(v.get("settled", ""))

    async def _take_lease(self, m: _Member, seq: int, delivery: int) -> int | Admission:
        """The record's revision once delivery ``delivery`` of ``seq`` holds it; "stale"
        if a later delivery does, "settled" if the message was settled."""
        await self._ensure_settled_stream()
        subj = self._lease_subject(m, seq)
        known: tuple[int, int, str] | None = (0, 0, "") if delivery == 1 else None
        while True:  # (a first delivery expects no record: one write, no read)
            revision, holder, settled = known or await self._lease_read(subj)
            known = None
            if settled:
                return "settled"
            if holder > delivery:
                return "stale"
            taken = await self._cas(subj, revision, {"d": delivery})
            if taken:
                return taken

    async def _take_first_leases(self, m: _Member, msgs: Sequence[Msg]) -> dict[int, int]:
        """The lease records of the first deliveries among ``msgs`` (exactly-once), taken
        in one atomic batch per 1,000 (none of them can have a record yet), by id(msg);
        if a batch is refused, its messages take theirs one by one as they are handed
        out."""
        if m.spec.guarantee is not Guarantee.EXACTLY_ONCE or self.server_version < ATOMIC_VERSION:
            return {}
        firsts = [msg for msg in msgs if _meta(msg.reply)[0] == 1]
        if len(firsts) < 2:
            return {}
        await self._ensure_settled_stream()
        body = json.dumps({"d": 1}).encode()
        h = {"Nats-Expected-Last-Subject-Sequence": "0"}
        out: dict[int, int] = {}
        for start in range(0, len(firsts), MAX_BATCH):
            chunk = firsts[start : start + MAX_BATCH]
            batch = [(self._lease_subject(m, _meta(msg.reply)[1]), h, body) for msg in chunk]
            try:
                first = await self._publish_batch(batch)
            except JetStreamError as exc:
                if exc.err_code != ERR_WRONG_LAST_SEQUENCE:
                    raise
                continue
            out.update((id(msg), first + i) for i, msg in enumerate(chunk))
        return out

    async def _claim(self, held: Sequence[tuple[_Member, int, int, _Held]]) -> None:
        """Settle these deliveries for good, before their acks: each one's lease record
        is set to settled from the revision its delivery took (all of them or none, as
        one atomic batch). If a later delivery took one since, or another settled it,
        this fails with LeaseExpired. A repeat of this very claim (its answer lost) finds
        its own token."""
        token = uuid.uuid4().hex
        msgs = [
            (
                self._lease_subject(m, off + 1),
                {"Nats-Expected-Last-Subject-Sequence": str(h.lease)},
                json.dumps({"d": h.delivery, "settled": token}).encode(),
            )
            for m, off, _a, h in held
        ]
        try:
            if len(msgs) == 1:
                await self._publish_one(*msgs[0])
            else:
                await self._publish_batch(msgs)
            return
        except JetStreamError as exc:
            if exc.err_code != ERR_WRONG_LAST_SEQUENCE:
                raise
        lost = []
        for (m, off, attempt, h), (subj, _h, _b) in zip(held, msgs, strict=True):
            _rev, holder, settled = await self._lease_read(subj)
            if settled == token or (not settled and holder == h.delivery):
                continue  # settled by this very claim, or still ours (another one lost)
            lost.append((m, off, attempt, "settled by another delivery" if settled else ""))
            m.held.pop((off, attempt), None)
            if h.keepalive is not None:
                h.keepalive.cancel()
            if settled:
                # settled by another delivery, which may not have opened its key's gate
                # nor acked it yet: doing both once more ends its redeliveries
                if h.key is not None:
                    await self._open_gate(m, h.key, off + 1)
                with contextlib.suppress(nats.errors.Error):
                    await h.msg.ack()
        if lost:
            m, off, attempt, how = lost[0]
            raise LeaseExpired(
                m.queue, off, attempt, how or "its lease ran out: it was delivered again"
            )

    # -- per-key order: one gate per group and key ----------------------------------------
    # JetStream has no per-key lease, so arrival keeps one: an entry per (group, key) in
    # the namespace's keys stream, {"held": seq, "done": seq}, changed only by
    # compare-and-set (Nats-Expected-Last-Subject-Sequence). A delivery of a keyed
    # message is handed out only if the gate holds it, or takes it: when it is free and
    # the message is the key's first one after "done" (found by subject, each key having
    # one). Settling it (ack, dead letter) opens the gate before the ack, so that a lost
    # ack's redelivery finds it settled (and acks it again). A delivery that must wait
    # stays with its client (kept alive with in-progress pings, so it spends no attempt)
    # until the gate moves.
    async def _ensure_keys_stream(self) -> None:
        ns = self.options.namespace
        await self._ensure_stream(
            self._keys_stream,
            {
                "subjects": [f"{ns}.keys.>", f"{ns}.given.>"],
                "discard": "old",
                "metadata": {mapping.META_KEYS: "1"},
            },
        )

    def _gate_subject(self, m: _Member, key: str) -> str:
        ns = self.options.namespace
        return f"{ns}.keys.{m.stream}.{m.consumer}.{mapping.key_token(key)}"

    async def _gate_read(self, subj: str) -> tuple[int, int, int, int]:
        """(revision, held, holder's delivery count, done) of a gate; zeros for one never
        written."""
        reply = await self._direct_get(self._keys_stream, subj)
        if reply is None:
            return 0, 0, 0, 0
        v = json.loads(reply.data)
        revision = int((reply.headers or {})["Nats-Sequence"])
        return revision, int(v["held"]), int(v.get("delivery", 0)), int(v["done"])

    async def _gate_write(
        self, subj: str, revision: int, held: int, delivery: int, done: int
    ) -> int:
        """The gate's new revision if it was still at ``revision`` and now holds (held,
        done); else 0."""
        return await self._cas(subj, revision, {"held": held, "delivery": delivery, "done": done})

    async def _cas(self, subj: str, revision: int, value: dict[str, Any]) -> int:
        """Store ``value`` as the latest of ``subj`` if that is still at ``revision`` (0:
        none yet): its new revision, or 0 if it moved meanwhile (or this very write
        landed and its answer was lost: the caller reads it again)."""
        h = {"Nats-Expected-Last-Subject-Sequence": str(revision)}
        try:
            return await self._publish_one(subj, h, json.dumps(value).encode())
        except JetStreamError as exc:
            if exc.err_code != ERR_WRONG_LAST_SEQUENCE:
                raise
            return 0

    async def _admit(self, m: _Member, key: str, seq: int, delivery: int) -> Admission:
        """Whether delivery number ``delivery`` of ``seq`` (of ``key``) may be handed out:
        "yes" if the gate holds it already (or an earlier delivery of it: the gate now
        names this one), or if the gate is free and it is the key's next message (taken
        now); "wait" while another message holds the key; "stale" for a copy superseded
        by a later delivery of it, which holds the gate; "settled" if it was settled
        already (the gate opened at its ack or dead letter; this delivery is a copy from
        before that, or JetStream's answer to a lost ack): it is acked, not handed out."""
        subj = self._gate_subject(m, key)
        floor_read = False
        while True:
            # the gate and the key's next message after the "done" last seen, side by side
            guess = max(self._gate_done.get(subj, 0), m.floor)
            (revision, held, holder, done), first = await asyncio.gather(
                self._gate_read(subj), self._first_of_key(m, key, guess)
            )
            if len(self._gate_done) >= MAX_GATES_REMEMBERED:
                self._gate_done.clear()
            self._gate_done[subj] = done
            if seq <= done:
                return "settled"
            if held == seq:
                if delivery < holder:
                    return "stale"
                if delivery == holder:
                    return "yes"
                taken = await self._gate_write(subj, revision, seq, delivery, done)
                if taken:
                    self._took_gate(subj, seq, taken)
                    return "yes"
                continue
            if held:
                return "wait"
            if max(done, m.floor) != guess:
                first = await self._first_of_key(m, key, max(done, m.floor))
            if first is not None and first < seq and not floor_read:
                # maybe one this group never gets (it joined later, or it was acked
                # before arrival kept the key's gate): read the consumer's ack floor
                info = await self._api(f"CONSUMER.INFO.{m.stream}.{m.consumer}")
                m.floor = max(m.floor, int(info.get("ack_floor", {}).get("stream_seq", 0)))
                floor_read = True
                continue
            if first != seq:
                return "wait"
            taken = await self._gate_write(subj, revision, seq, delivery, done)
            if taken:
                self._took_gate(subj, seq, taken)
                return "yes"

    def _took_gate(self, subj: str, seq: int, revision: int) -> None:
        if len(self._gate_revs) >= MAX_GATES_REMEMBERED:  # (settles then read the gate)
            self._gate_revs.clear()
        self._gate_revs[(subj, seq)] = revision

    async def _first_of_key(self, m: _Member, key: str, after: int) -> int | None:
        """The stream sequence of the key's first message after ``after``, if any."""
        request = {
            "seq": after + 1,
            "next_by_subj": mapping.subject(
                self.options.namespace, m.queue, key, conflate=m.spec.conflate
            ),
        }
        reply = await self._direct_get(m.stream, None, request)
        return None if reply is None else int((reply.headers or {})["Nats-Sequence"])

    async def _open_gate(self, m: _Member, key: str, seq: int, delivery: int | None = None) -> None:
        """``seq`` is settled: its key's gate lets the next message through. Given the
        settling ``delivery``, a later delivery holding the gate refuses it (LeaseExpired:
        the settle must not happen)."""
        subj = self._gate_subject(m, key)
        taken = self._gate_revs.pop((subj, seq), 0)
        # the gate as this client took it, if nothing changed it since: one write
        opened = taken and await self._gate_write(subj, taken, 0, 0, seq)
        while not opened:
            revision, held, holder, done = await self._gate_read(subj)
            if held != seq:
                return  # opened already (or this delivery never held it)
            if delivery is not None and holder > delivery:
                raise LeaseExpired(
                    m.queue, seq - 1, delivery, "its lease ran out: it was delivered again"
                )
            opened = await self._gate_write(subj, revision, 0, 0, max(done, seq))
        token = mapping.key_token(key)
        for other in self._members.values():  # this client's waiters learn it at once
            if other.stream == m.stream and other.consumer == m.consumer and token in other.blocked:
                other.woken.add(token)
                other.arrived.set()

    async def _gate(self, m: _Member, msg: Msg, arrived: float, seq: int, key: str) -> bool:
        """Whether a new delivery may be handed out now; if not, it waits in m.blocked."""
        token = mapping.key_token(key)
        waiting = m.blocked.get(token)
        if not (waiting and waiting[0][0] < seq):
            admission = await self._admit(m, key, seq, _meta(msg.reply)[0])
            if admission == "yes":
                return True
            if admission != "wait":
                await self._drop(m, msg, admission, key, seq)
                return False
        waiting = m.blocked.setdefault(token, [])
        waiting[:] = [w for w in waiting if w[0] != seq]  # a redelivery replaces its copy
        bisect.insort(waiting, (seq, msg, arrived, key), key=lambda w: w[0])
        m.parked = True
        if m.tender is None:
            m.tender = self._loop.create_task(self._tend(m))
        return False

    async def _drop(
        self, m: _Member, msg: Msg, admission: Admission, key: str | None, seq: int
    ) -> None:
        """A delivery not handed out: a settled message's is acked, and its key's gate
        opened (once more: its settler may have stopped before either), a superseded
        copy's is left to the delivery that holds it."""
        if admission == "settled":
            if key is not None:
                await self._open_gate(m, key, seq)
            with contextlib.suppress(nats.errors.Error):
                await msg.ack()

    async def _tend(self, m: _Member) -> None:
        """Keep the waiting deliveries alive (in-progress pings restart their ack wait)
        and look at their gates again now and then, in case a change went unheard."""
        step = max(0.05, min(m.spec.ack_timeout / 3, 1.0))
        try:
            while m.blocked and not m.closed:
                await asyncio.sleep(step)
                for waiting in list(m.blocked.values()):
                    for _s, msg, _a, _k in waiting:
                        with contextlib.suppress(nats.errors.Error):
                            await msg.in_progress()
                m.woken.update(m.blocked)
                m.arrived.set()
        finally:
            m.tender = None

    async def _direct_get(
        self, stream: str, subj: str | None, request: dict[str, Any] | None = None
    ) -> Msg | None:
        """A stored message read directly: the last one of ``subj``, or what ``request``
        asks for; None if there is none. Retried while the cluster recovers."""
        api = f"{API}.DIRECT.GET.{stream}" + (f".{subj}" if subj is not None else "")
        payload = json.dumps(request).encode() if request is not None else b""
        deadline = time.monotonic() + OP_DEADLINE_S
        while True:
            try:
                reply = await self.nc.request(api, payload, timeout=API_TIMEOUT_S)
            except (nats.errors.TimeoutError, nats.errors.NoRespondersError) as exc:
                if time.monotonic() > deadline:
                    raise BrokerUnreachable(
                        f"JetStream at {self.url!r} did not answer a read within "
                        f"{OP_DEADLINE_S:g} s ({exc!r}): is a quorum of its servers up?"
                    ) from exc
                await asyncio.sleep(RETRY_PAUSE_S)
                continue
            except nats.errors.ConnectionClosedError as exc:
                raise self._lost(exc) from exc
            status = (reply.headers or {}).get("Status")
            if status is None:
                return reply
            if status == "404":
                return None
            raise JetStreamError(int(status), 0, (reply.headers or {}).get("Description", status))

    # -- consuming ----------------------------------------------------------------------
    def join(self, queue: str, group: str, latest: bool) -> Pending[int]:
        return self._call(self._join(queue, group, latest))

    async def _join(self, queue: str, group: str, latest: bool) -> int:
        if group != DLQ_GROUP:
            validate_queue_name(group)
        spec = await self._load_spec(queue)
        stream = self._stream(queue)
        consumer = mapping.consumer_name(group)
        try:
            info = await self._api(f"CONSUMER.INFO.{stream}.{consumer}")
        except JetStreamError as exc:
            if exc.err_code != ERR_CONSUMER_NOT_FOUND:
                raise
            config = mapping.consumer_config(spec, group, latest=latest)
            info = await self._api(
                f"CONSUMER.CREATE.{stream}.{consumer}", {"stream_name": stream, "config": config}
            )
        m = _Member(
            next(self._member_ids), queue, group, spec, stream, consumer, self.nc.new_inbox()
        )
        m.floor = int(info.get("ack_floor", {}).get("stream_seq", 0))

        async def arrive(msg: Msg) -> None:
            self._arrive(m, msg)

        m.arrive_cb = arrive
        if spec.guarantee is not Guarantee.AT_MOST_ONCE:  # (at-most-once: one per pull)
            m.sub = await self.nc.subscribe(f"{m.inbox}.*", cb=arrive, pending_msgs_limit=-1)
        if spec.guarantee is not Guarantee.AT_MOST_ONCE:
            await self._ensure_keys_stream()
            gates = f"{self.options.namespace}.keys.{stream}.{consumer}"

            async def gate_moved(msg: Msg) -> None:
                token = msg.subject[len(gates) + 1 :]
                if token in m.blocked:
                    m.woken.add(token)
                    m.arrived.set()

            m.gate_sub = await self.nc.subscribe(f"{gates}.*", cb=gate_moved)
        self._members[m.id] = m
        return m.id

    def _arrive(self, m: _Member, msg: Msg) -> None:
        status = _status(msg)
        if status is not None and msg.subject != f"{m.inbox}.{m.pull_gen}":
            return  # the end of an earlier pull, late: it says nothing of the one now out
        if status is None and m.spec.guarantee is Guarantee.AT_MOST_ONCE and not m.receiving:
            # a pull's answer after its receive returned (its server was paused or failing
            # over): dropped, as a fault may lose an at-most-once message, rather than
            # handed out after messages the group received since
            return
        if status is not None:
            if status != "100":  # 404 no messages, 408 expired, 409 ...: this pull is over
                m.pull_left = 0
                m.no_wait = False
                m.arrived.set()
            return
        m.pull_left -= 1
        if m.pull_left <= 0:
            m.no_wait = False
        m.buffer.append((msg, time.time()))
        m.arrived.set()

    def leave(self, member: int) -> Pending[None]:
        return self._call(self._leave(member))

    async def _leave(self, member: int) -> None:
        m = self._members.pop(member, None)
        if m is None or m.closed:
            return
        m.closed = True
        m.arrived.set()  # wakes a receive waiting on this member
        for sub in (m.sub, m.gate_sub, m.pull_sub):
            if sub is not None:
                with contextlib.suppress(nats.errors.Error):
                    await sub.unsubscribe()
        if m.tender is not None:
            m.tender.cancel()
        if m.spec.guarantee is Guarantee.AT_MOST_ONCE:
            return
        # what this consumer holds goes back now rather than at its lease's end
        # (not those whose lease ran out: JetStream may have them with another consumer)
        now = time.time()
        pending = [h.msg for h in m.held.values() if h.deadline >= now]
        pending += [msg for msg, arrived in m.buffer if arrived + m.spec.ack_timeout >= now]
        pending += [msg for waiting in m.blocked.values() for _s, msg, _a, _k in waiting]
        m.held.clear()
        m.buffer.clear()
        m.blocked.clear()
        if pending:  # the server has them before this returns: a new consumer finds them
            pending.sort(key=lambda msg: _meta(msg.reply)[1])  # due again in stream order
            await self._give_back(m, pending)

    def member_stats(self, member: int) -> Pending[ConsumerStats]:
        m = self._members.get(member)
        if m is None:
            raise UsageError(f"no consumer {member} on this connection")
        return Ready(
            ConsumerStats(
                m.queue, m.group, m.id, m.received, m.acked, m.nacked, m.rejected, len(m.held)
            )
        )

    def _member(self, member: int) -> _Member:
        m = self._members.get(member)
        if m is None or m.closed:
            raise ClosedError("the consumer")
        return m

    def _settling(self, member: int, off: int, attempt: int) -> _Member:
        """The member a delivery is settled through, as the engine checks it."""
        if self.closed:
            raise ClosedError("the broker")
        m = self._members.get(member)
        if m is None or m.closed:
            raise LeaseExpired(
                "?" if m is None else m.queue,
                off,
                attempt,
                "the consumer was closed since this delivery",
            )
        if m.spec.guarantee is Guarantee.AT_MOST_ONCE:
            raise NotSupported(
                f"queue {m.queue!r} is at-most-once: a message counts as processed "
                f"when it is handed out, so it cannot be nacked, rejected or extended"
            )
        return m

    def receive(self, member: int, limit: int, timeout: float | None) -> Pending[list[Delivery]]:
        return self._call(self._receive(member, limit, timeout))

    async def _receive(self, member: int, limit: int, timeout: float | None) -> list[Delivery]:
        """Deliveries from this member's buffer, pulling more as needed. First a no_wait
        pull for up to ``limit`` (the server answers at once with what it has); if that
        brings nothing, a waiting pull for one message, so that no pull is left open to
        take messages after this receive returned (they would sit here, leased, while
        other consumers wait)."""
        m = self._member(member)
        m.receiving = True
        try:
            return await self._receiving(m, limit, timeout)
        finally:
            m.receiving = False
            if m.spec.guarantee is Guarantee.AT_MOST_ONCE:
                m.buffer.clear()  # (the same for what came beyond this receive's limit)

    async def _receiving(self, m: _Member, limit: int, timeout: float | None) -> list[Delivery]:
        if timeout is not None and time.monotonic() - self._gave_back < GIVE_BACK_S:
            # JetStream takes a NAK (nack, release) asynchronously: a receive right after
            # one waits a moment for the message to be due here again
            timeout = max(timeout, GIVE_BACK_S)
        end = None if timeout is None else time.monotonic() + timeout
        await self._settle_sends()
        asked = False
        while True:
            now = time.monotonic()
            if m.no_wait and m.pull_left > 0 and now < m.pull_until and len(m.buffer) < limit:
                # the server answers a no_wait pull at once, ending with a status when it
                # has fewer than asked: take all it has, not the first few to arrive
                m.arrived.clear()
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(m.arrived.wait(), m.pull_until - now)
                continue
            got = await self._take(m, limit)
            if got or m.closed:
                return got
            now = time.monotonic()
            if m.pull_left <= 0 or now >= m.pull_until:
                if not asked or m.parked:  # (what the last pull brought must wait: more)
                    m.parked = False
                    await self._pull(m, limit, 0.0)
                    asked = True
                elif end is not None and now >= end:
                    return []
                else:
                    await self._pull(m, 1, None if end is None else end - now)
            elif (
                end is not None
                and now >= end
                and not m.no_wait
                and (m.spec.guarantee is not Guarantee.AT_MOST_ONCE or now >= end + PULL_GRACE_S)
            ):
                # a pull is out already: what is there is on its way to us (at-most-once:
                # what it brings after this receive is dropped, so it waits for the pull's
                # end, the server's 408 at its expiry, a moment longer)
                return []
            m.arrived.clear()
            if m.buffer:
                continue
            if end is None or m.no_wait:
                until = m.pull_until
            elif m.spec.guarantee is Guarantee.AT_MOST_ONCE:
                until = min(end + PULL_GRACE_S, m.pull_until)
            else:
                until = min(end, m.pull_until)
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(m.arrived.wait(), max(0.0, until - now) + 0.001)

    async def _pull(self, m: _Member, limit: int, left: float | None) -> None:
        request: dict[str, Any] = {"batch": limit}
        if left is not None and left <= 0:
            request["no_wait"] = True
            expires = 0.0
        else:
            expires = PULL_EXPIRES_S if left is None else min(PULL_EXPIRES_S, max(left, 0.001))
            request["expires"] = int(expires * 1e9)
        m.pull_left = limit
        m.no_wait = expires == 0.0
        m.pull_until = time.monotonic() + expires + 1.0
        m.pull_gen += 1
        if m.spec.guarantee is Guarantee.AT_MOST_ONCE and m.arrive_cb is not None:
            # a subscription per pull: what an earlier pull brings late (its server paused
            # or failing over) is not taken for this one's, but dropped with its inbox
            earlier, m.pull_sub = (
                m.pull_sub,
                await self.nc.subscribe(
                    f"{m.inbox}.{m.pull_gen}", cb=m.arrive_cb, pending_msgs_limit=-1
                ),
            )
            if earlier is not None:
                with contextlib.suppress(nats.errors.Error):
                    await earlier.unsubscribe()
        try:
            await self.nc.publish(
                f"{API}.CONSUMER.MSG.NEXT.{m.stream}.{m.consumer}",
                json.dumps(request).encode(),
                reply=f"{m.inbox}.{m.pull_gen}",
            )
        except nats.errors.ConnectionClosedError as exc:
            raise self._lost(exc) from exc

    async def _take(self, m: _Member, limit: int) -> list[Delivery]:
        out: list[Delivery] = []
        while m.woken and len(out) < limit:  # a key's gate may have opened: its next one
            token = m.woken.pop()
            waiting = m.blocked.get(token)
            if not waiting:
                continue
            seq, msg, _arrived, key = waiting[0]
            admission = await self._admit(m, key, seq, _meta(msg.reply)[0])
            if admission == "wait":
                continue
            del waiting[0]
            if not waiting:
                del m.blocked[token]
            if admission != "yes":
                await self._drop(m, msg, admission, key, seq)
                if waiting:
                    m.woken.add(token)  # the next one may be free now
                continue
            # its lease starts now: JetStream's ack wait too, restarted by a ping first
            with contextlib.suppress(nats.errors.Error):
                await msg.in_progress()
            d = await self._deliver(m, msg, time.time(), admitted=True)
            if d is not None:
                out.append(d)
        batch: list[tuple[Msg, float]] = []
        while m.buffer and len(out) + len(batch) < limit:
            batch.append(m.buffer.popleft())
        if batch:  # each delivery's gate and lease are round trips: made side by side
            leases = await self._take_first_leases(m, [msg for msg, _a in batch])
            got = await asyncio.gather(
                *(
                    self._deliver(m, msg, arrived, lease=leases.get(id(msg)))
                    for msg, arrived in batch
                ),
                return_exceptions=True,
            )
            out.extend(d for d in got if d is not None and not isinstance(d, BaseException))
            errors = [e for e in got if isinstance(e, BaseException)]
            if errors and not out:
                raise errors[0]
        return out

    async def _deliver(
        self,
        m: _Member,
        msg: Msg,
        arrived: float,
        *,
        admitted: bool = False,
        lease: int | None = None,
    ) -> Delivery | None:
        """``lease``: the revision of its lease record, taken already (exactly-once)."""
        delivered, seq, ts = _meta(msg.reply)
        off = seq - 1
        mid, key, headers = mapping.decode_headers(msg.headers)
        spec = m.spec
        took: int | Admission | None = lease
        if key is not None and spec.guarantee is not Guarantee.AT_MOST_ONCE and not admitted:
            if spec.guarantee is Guarantee.EXACTLY_ONCE and took is None:  # (side by side)
                passed, took = await asyncio.gather(
                    self._gate(m, msg, arrived, seq, key),
                    self._take_lease(m, seq, delivered),
                )
            else:
                passed = await self._gate(m, msg, arrived, seq, key)
            if not passed:
                return None  # it waits here until the message before it of its key is settled
        if headers is not None and headers.get(H_REPLAY_GROUP, m.group) != m.group:
            # a replay for another group
            if spec.guarantee is not Guarantee.AT_MOST_ONCE:
                if key is not None:
                    await self._open_gate(m, key, seq)
                await msg.ack()
            return None
        record: RecordTuple = (ts, mid, key, headers, msg.data)
        if spec.guarantee is Guarantee.AT_MOST_ONCE:
            m.received += 1
            return (off, delivered, 0.0, record)
        given = await self._given(m, seq) if delivered > 1 else 0
        failures = delivered - 1 - given  # deliveries given back were not attempts
        if spec.max_deliveries is not None and failures >= spec.max_deliveries:
            # its leases ran out (or its consumers crashed) as often as the budget allows
            await self._dead_letter(
                m,
                msg,
                off,
                record,
                failures,  # the delivery that found the budget spent is not an attempt
                failures,
                f"failed {failures} of max_deliveries={spec.max_deliveries} attempts",
                "lease expired",
            )
            return None
        lease = 0
        if spec.guarantee is Guarantee.EXACTLY_ONCE:
            if took is None:
                took = await self._take_lease(m, seq, delivered)
            if not isinstance(took, int):
                await self._drop(m, msg, took, key, seq)
                return None
            lease = took
        deadline = arrived + spec.ack_timeout
        for earlier in range(1, delivered):  # this delivery's expired predecessors
            m.held.pop((off, earlier), None)
        m.held[(off, delivered)] = _Held(
            msg, deadline, failures, key=key, delivery=delivered, lease=lease, given=given
        )
        m.received += 1
        return (off, delivered, deadline, record)

    def _holding(self, m: _Member, off: int, attempt: int) -> _Held:
        h = m.held.get((off, attempt))
        if h is None:
            if any(o == off and a > attempt for o, a in m.held):  # redelivered since
                raise LeaseExpired(m.queue, off, attempt, "its lease ran out")
            raise AlreadySettled(m.queue, off, attempt)
        if time.time() > h.deadline:  # kept until its redelivery arrives: asked again, the same
            raise LeaseExpired(m.queue, off, attempt, "its lease ran out")
        return h

    def ack(self, member: int, epoch: int, receipts: Sequence[tuple[int, int]]) -> Pending[None]:
        m = self._members.get(member)
        if (m is not None and m.spec.guarantee is Guarantee.AT_MOST_ONCE) or not receipts:
            return Ready(None)
        m = self._settling(member, *receipts[0])
        receipts = list(dict.fromkeys(receipts))
        held = [(off, attempt, self._holding(m, off, attempt)) for off, attempt in receipts]
        for off, attempt, _h in held:
            m.held.pop((off, attempt), None)
        return self._call(self._ack_all(m, held))

    async def _ack_all(self, m: _Member, held: list[tuple[int, int, _Held]]) -> None:
        if m.spec.guarantee is Guarantee.EXACTLY_ONCE:
            await self._claim([(m, off, attempt, h) for off, attempt, h in held])
        await asyncio.gather(*(self._ack_one(m, off, attempt, h) for off, attempt, h in held))

    async def _ack_one(self, m: _Member, off: int, attempt: int, h: _Held) -> None:
        """The JetStream ack of a settled delivery. Where the settle is recorded already
        (an exactly-once lease record, a keyed message's gate), a lost ack only brings a
        redelivery that finds it settled and is acked again, never handed out: a plain
        ack does. Else a double ack, which returns once the server has recorded it (a
        plain ack can be lost with a failing consumer leader, unnoticed)."""
        m.held.pop((off, attempt), None)
        if h.keepalive is not None:
            h.keepalive.cancel()
        exactly = m.spec.guarantee is Guarantee.EXACTLY_ONCE
        if h.key is not None:  # first: if the ack is lost, the redelivery is let go
            await self._open_gate(m, h.key, off + 1, None if exactly else h.delivery)
        if exactly or h.key is not None:
            with contextlib.suppress(nats.errors.Error):
                await h.msg.ack()
        else:
            await self._ack_confirmed(m, off, h.msg)
        m.acked += 1
        await self._forget_given(m, h)

    async def _ack_confirmed(self, m: _Member, off: int, msg: Msg) -> None:
        """A double ack, retried while the consumer has no leader."""
        deadline = time.monotonic() + OP_DEADLINE_S
        while True:
            try:
                await msg.ack_sync(timeout=API_TIMEOUT_S)
                return
            except nats.errors.NoRespondersError as exc:  # the consumer's leader moves
                if time.monotonic() > deadline:
                    raise BrokerUnreachable(
                        f"JetStream had no leader for the consumer of {m.queue} within "
                        f"{OP_DEADLINE_S:g} s; message {off} may be delivered again"
                    ) from exc
                await asyncio.sleep(RETRY_PAUSE_S)
            except nats.errors.TimeoutError as exc:
                raise BrokerUnreachable(
                    f"JetStream did not confirm the ack of {m.queue}@{off}; it may be "
                    f"delivered again"
                ) from exc
            except nats.errors.ConnectionClosedError as exc:
                raise self._lost(exc) from exc

    def nack(
        self,
        member: int,
        epoch: int,
        off: int,
        attempt: int,
        delay: float | None,
        error: str | None,
    ) -> Pending[bool]:
        m = self._settling(member, off, attempt)
        h = self._holding(m, off, attempt)
        m.held.pop((off, attempt), None)
        m.nacked += 1
        return self._call(self._nack(m, off, attempt, h, delay, error))

    async def _nack(
        self, m: _Member, off: int, attempt: int, h: _Held, delay: float | None, error: str | None
    ) -> bool:
        if h.keepalive is not None:
            h.keepalive.cancel()
        failures = h.failures_before + 1
        decision = decide_retry(failures, m.spec.max_deliveries, m.spec.backoff, self._rng, delay)
        if isinstance(decision, DeadLetter):
            await self._dead_letter_held(
                m, off, attempt, h, failures, decision.reason, error or "nacked"
            )
            return True
        try:
            await h.msg.nak(delay=decision.delay_s if decision.delay_s > 0 else None)
            if decision.delay_s <= 0:  # due at once: the server has the NAK on return
                self._gave_back = time.monotonic()
                await self.nc.flush(timeout=int(API_TIMEOUT_S))
        except nats.errors.ConnectionClosedError as exc:
            raise self._lost(exc) from exc
        except (TimeoutError, nats.errors.TimeoutError):
            pass  # the NAK is sent; the redelivery comes when the server takes it
        return False

    def reject(self, member: int, epoch: int, off: int, attempt: int, reason: str) -> Pending[None]:
        m = self._settling(member, off, attempt)
        if m.spec.dead_letter is None:
            raise NotSupported(
                f"queue {m.queue!r} has no dead-letter queue, so a message cannot be "
                f"rejected; nack it to retry, or ack it to drop it deliberately"
            )
        h = self._holding(m, off, attempt)
        m.held.pop((off, attempt), None)
        m.rejected += 1
        return self._call(self._reject(m, off, attempt, h, reason))

    async def _reject(self, m: _Member, off: int, attempt: int, h: _Held, reason: str) -> None:
        if h.keepalive is not None:
            h.keepalive.cancel()
        await self._dead_letter_held(
            m, off, attempt, h, h.failures_before + 1, f"rejected: {reason}", reason
        )

    async def _dead_letter_held(
        self,
        m: _Member,
        off: int,
        attempt: int,
        h: _Held,
        failures: int,
        reason: str,
        error: str,
    ) -> None:
        """Dead-letter a delivery its consumer holds (nack past the budget, reject)."""
        _d, _seq, ts = _meta(h.msg.reply)
        mid, key, headers = mapping.decode_headers(h.msg.headers)
        record = (ts, mid, key, headers, h.msg.data)
        await self._dead_letter(m, h.msg, off, record, attempt, failures, reason, error)
        await self._forget_given(m, h)

    async def _dead_letter(
        self,
        m: _Member,
        msg: Msg,
        off: int,
        record: RecordTuple,
        attempts: int,
        failures: int,
        reason: str,
        error: str | None,
    ) -> None:
        """Publish the message to the dead-letter stream with its provenance, then ack it.
        The dead letter's id is derived from where it failed, so a repeat (a crash between
        the two steps) is stored once."""
        dlq = m.spec.dead_letter
        if dlq is None:
            raise NotSupported(f"queue {m.queue!r} has no dead-letter queue")
        spec = await self._load_spec(dlq)
        _ts, mid, key, headers, body = record
        now = time.time()
        h = dict(headers or {})
        h.pop(H_REPLAY_GROUP, None)
        h.update(
            {
                H_ORIGIN_QUEUE: m.queue,
                H_ORIGIN_GROUP: m.group,
                H_ORIGIN_OFFSET: str(off),
                H_ATTEMPTS: str(attempts),
                H_FAILURES: str(failures),
                H_REASON: reason,
                H_DEAD_AT: repr(now),
                H_LAST_FAILURE: repr(now),
            }
        )
        if failures == 1:  # the first failure is this one (earlier ones are not recorded)
            h[H_FIRST_FAILURE] = repr(now)
        if error is not None:
            h[H_LAST_ERROR] = error[:2000].replace("\r", " ").replace("\n", " ")
        if mid is None:
            mid = f"{m.queue}:{off}"
        letter_id = f"d:{m.stream}:{m.consumer}:{off}:{h.get(H_REPLAYS, '0')}"
        await self._publish(spec, [(now, mid, key, h, body)], [letter_id])
        if key is not None:
            await self._open_gate(m, key, off + 1)
        # if this ack is lost, the message comes again and is dead-lettered again under
        # the same letter id: stored once
        with contextlib.suppress(nats.errors.Error):
            await msg.ack_sync(timeout=API_TIMEOUT_S)

    def extend(
        self, member: int, epoch: int, off: int, attempt: int, seconds: float | None
    ) -> Pending[float]:
        m = self._settling(member, off, attempt)
        h = self._holding(m, off, attempt)
        want = m.spec.ack_timeout if seconds is None else seconds
        h.deadline = time.time() + want
        return self._call(self._extend(m, h))

    async def _extend(self, m: _Member, h: _Held) -> float:
        """Tell JetStream the work is in progress (which restarts its ack wait); for a
        lease longer than the ack wait, again before each one ends."""
        if h.keepalive is not None:
            h.keepalive.cancel()
            h.keepalive = None
        try:
            await h.msg.in_progress()
        except nats.errors.ConnectionClosedError as exc:
            raise self._lost(exc) from exc
        left = h.deadline - time.time()
        step = m.spec.ack_timeout / 2
        if left > m.spec.ack_timeout:
            h.keepalive = self._loop.call_later(
                step, lambda: self._loop.create_task(self._extend(m, h))
            )
        return h.deadline

    def release(self, member: int, epoch: int, off: int, attempt: int) -> Pending[None]:
        m = self._settling(member, off, attempt)
        h = self._holding(m, off, attempt)
        m.held.pop((off, attempt), None)
        return self._call(self._release(m, h))

    async def _release(self, m: _Member, h: _Held) -> None:
        if h.keepalive is not None:
            h.keepalive.cancel()
        await self._give_back(m, [h.msg])

    # -- giving back without spending an attempt ------------------------------------------
    # JetStream counts every delivery, so arrival counts the ones given back (release, a
    # consumer closing with messages in hand) in the keys stream, per group and message:
    # {"count": n, "last": the delivery counted last}; a redelivery's attempts are its
    # deliveries less those. The entry goes when the message is settled.
    def _given_subject(self, m: _Member, seq: int) -> str:
        return f"{self.options.namespace}.given.{m.stream}.{m.consumer}.{seq}"

    async def _given(self, m: _Member, seq: int) -> int:
        reply = await self._direct_get(self._keys_stream, self._given_subject(m, seq))
        return 0 if reply is None else int(json.loads(reply.data)["count"])

    async def _give_back(self, m: _Member, msgs: Sequence[Msg]) -> None:
        """Count these deliveries as given back, then NAK them (due at once)."""

        async def count(msg: Msg) -> None:
            delivered, seq, _ts = _meta(msg.reply)
            subj = self._given_subject(m, seq)
            while True:
                reply = await self._direct_get(self._keys_stream, subj)
                value = {"count": 0, "last": 0} if reply is None else json.loads(reply.data)
                if int(value["last"]) >= delivered:
                    return  # counted already (this write's answer was lost)
                revision = 0 if reply is None else int((reply.headers or {})["Nats-Sequence"])
                if await self._cas(
                    subj, revision, {"count": int(value["count"]) + 1, "last": delivered}
                ):
                    return

        with contextlib.suppress(ArrivalError):  # not counted: it spends an attempt
            await asyncio.gather(*(count(msg) for msg in msgs))
        self._gave_back = time.monotonic()
        for msg in msgs:
            with contextlib.suppress(nats.errors.Error, OSError):
                await msg.nak()
        with contextlib.suppress(nats.errors.Error, OSError, asyncio.TimeoutError):
            await self.nc.flush(timeout=int(API_TIMEOUT_S))

    async def _forget_given(self, m: _Member, h: _Held) -> None:
        """A settled message's count of give-backs is not needed any more."""
        if h.given:
            with contextlib.suppress(ArrivalError):
                await self._api(
                    f"STREAM.PURGE.{self._keys_stream}",
                    {"filter": self._given_subject(m, _meta(h.msg.reply)[1])},
                )

    def is_leased(self, member: int, epoch: int, off: int, attempt: int, deadline: float) -> bool:
        m = self._members.get(member)
        if m is None or m.closed:
            return False
        if m.spec.guarantee is Guarantee.AT_MOST_ONCE:
            return True
        h = m.held.get((off, attempt))
        return h is not None and time.time() <= h.deadline

    # -- dead letters -------------------------------------------------------------------
    async def _dlq_of(self, queue: str) -> QueueSpec:
        spec = await self._load_spec(queue)
        if spec.dead_letter is None:
            raise NotSupported(f"queue {queue!r} has no dead-letter queue")
        return await self._load_spec(spec.dead_letter)

    async def _letters(self, queue: str) -> list[DeadMessage]:
        dlq = await self._dlq_of(queue)
        stream = self._stream(dlq.name)
        out = []
        start = 1
        while True:
            got = await self._read(stream, start, 256)
            for seq, _ts, raw, body in got:
                mid, key, headers = mapping.decode_headers(raw)
                out.append(dead_message(seq - 1, mid, key, headers, body))
            if len(got) < 256:
                return out
            start = got[-1][0] + 1

    def dead_letters(self, queue: str, limit: int | None) -> Pending[list[DeadMessage]]:
        return self._call(self._dead_letters(queue, limit))

    async def _dead_letters(self, queue: str, limit: int | None) -> list[DeadMessage]:
        letters = await self._letters(queue)
        return letters if limit is None else letters[:limit]

    def replay_dead_letters(
        self, queue: str, where: Where, limit: int | None, dry_run: bool, max_replays: int | None
    ) -> Pending[tuple[list[DeadMessage], list[DeadMessage]]]:
        return self._call(self._replay(queue, where, limit, dry_run, max_replays))

    async def _replay(
        self, queue: str, where: Where, limit: int | None, dry_run: bool, max_replays: int | None
    ) -> tuple[list[DeadMessage], list[DeadMessage]]:
        origin = await self._load_spec(queue)
        dlq = await self._dlq_of(queue)
        chosen: list[DeadMessage] = []
        held: list[DeadMessage] = []
        for d in await self._letters(queue):
            if where is not None and not where(d):
                continue
            if max_replays is not None and d.replays >= max_replays:
                held.append(d)
                continue
            if limit is not None and len(chosen) >= limit:
                continue
            chosen.append(d)
        if dry_run:
            return chosen, held
        dstream = self._stream(dlq.name)
        for d in chosen:
            h = {k: v for k, v in d.headers.items() if not k.startswith("arrival-origin-")}
            for name in (
                H_ATTEMPTS,
                H_FAILURES,
                H_REASON,
                H_DEAD_AT,
                H_LAST_ERROR,
                H_LAST_FAILURE,
                H_QUARANTINED,
            ):
                h.pop(name, None)
            h[H_REPLAYS] = str(d.replays + 1)
            if d.origin_group:
                h[H_REPLAY_GROUP] = d.origin_group
            await self._publish(
                origin, [(time.time(), d.id, d.key, h, d.body)], [f"r:{dstream}:{d.offset}"]
            )
            await self._delete(dstream, d.offset)
        marked = []
        for d in held:
            if d.quarantined:
                marked.append(d)
                continue
            # the loop guard: re-filed at the end of the DLQ with the mark (stored
            # messages are never rewritten)
            h = dict(d.headers)
            h[H_QUARANTINED] = repr(time.time())
            off = await self._publish(
                dlq, [(time.time(), d.id, d.key, h, d.body)], [f"q:{dstream}:{d.offset}"]
            )
            await self._delete(dstream, d.offset)
            marked.append(dataclasses.replace(d, offset=off, headers=h, quarantined=True))
        return chosen, marked

    async def _delete(self, stream: str, offset: int) -> None:
        try:
            await self._api(f"STREAM.MSG.DELETE.{stream}", {"seq": offset + 1, "no_erase": True})
        except JetStreamError as exc:
            if exc.err_code != ERR_MSG_NOT_FOUND:
                raise

    def purge_dead_letters(self, queue: str, where: Where) -> Pending[int]:
        return self._call(self._purge(queue, where))

    async def _purge(self, queue: str, where: Where) -> int:
        dlq = await self._dlq_of(queue)
        stream = self._stream(dlq.name)
        n = 0
        for d in await self._letters(queue):
            if where is None or where(d):
                await self._delete(stream, d.offset)
                n += 1
        return n

    # -- closing ------------------------------------------------------------------------
    def close(self) -> Pending[None]:
        if self._closed:
            return Ready(None)
        fut: Future[None] = Future()

        def closing() -> None:
            # best effort: the loop ends anyway
            with contextlib.suppress(Exception):
                self._call(self._close()).wait(timeout=15)
            self._closed = True
            self._stop_loop()
            fut.set_result(None)

        threading.Thread(target=closing, name="arrival-nats-close", daemon=True).start()
        return fut

    async def _close(self) -> None:
        if self._trimmer is not None:
            self._trimmer.cancel()
        for member in list(self._members):
            with contextlib.suppress(Exception):
                await self._leave(member)
        if self._nc is not None and not self._nc.is_closed:
            with contextlib.suppress(Exception):
                await self._nc.flush(timeout=5)
            await self._nc.close()

    def abandon(self) -> None:
        """Drop the connection as a crash would: nothing held is given back, nothing
        buffered is sent (for tests of what survives a client's crash)."""
        self._closed = True

        async def drop() -> None:
            if self._nc is not None:
                transport = getattr(self._nc, "_transport", None)
                if transport is not None:
                    with contextlib.suppress(Exception):
                        transport.close()
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(self._nc.close(), 2)

        with contextlib.suppress(Exception):
            asyncio.run_coroutine_threadsafe(drop(), self._loop).result(5)
        self._stop_loop()


async def _cancel_all() -> None:
    tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
    for t in tasks:
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


def _read_varz(url: str) -> dict[str, Any]:
    with urllib.request.urlopen(url.rstrip("/") + "/varz", timeout=5) as r:  # noqa: S310
        data: dict[str, Any] = json.loads(r.read())
        return data


def _timestamp(text: str | None) -> float:
    """Seconds since the epoch of a stored message's ``Nats-Time-Stamp`` (RFC 3339 with
    nanoseconds, which ``datetime`` does not parse)."""
    if not text:
        return 0.0
    from datetime import datetime

    text = text.strip().replace(" ", "T", 1).removesuffix("Z")
    whole, _, frac = text.partition(".")
    frac = "".join(itertools.takewhile(str.isdigit, frac))
    base = datetime.fromisoformat(whole + "+00:00").timestamp()
    return base + (float("0." + frac) if frac else 0.0)


def _meta(reply: str | None) -> tuple[int, int, float]:
    """(times delivered, stream sequence, timestamp) of a delivery's ack subject."""
    if not reply:
        raise ArrivalError("a JetStream delivery without an ack subject")
    t = reply.split(".")
    if len(t) == 9:  # $JS.ACK.<stream>.<consumer>.<delivered>.<sseq>.<cseq>.<ts>.<pending>
        return int(t[4]), int(t[5]), int(t[7]) / 1e9
    # $JS.ACK.<domain>.<account>.<stream>.<consumer>.<delivered>.<sseq>.<cseq>.<ts>.<pending>...
    return int(t[6]), int(t[7]), int(t[9]) / 1e9


def _jetstream_mechanism(
    spec: QueueSpec, config: dict[str, Any], fsync: str | None, options: NatsOptions
) -> tuple[str, ...]:
    replicas = int(config.get("num_replicas", 1))
    out: tuple[str, ...]
    if spec.guarantee is Guarantee.AT_MOST_ONCE:
        out = (
            "a JetStream stream in memory (R1); send never waits for fsync or for an "
            "acknowledgement, and is never repeated",
            "a pull consumer with AckNone per group: a message counts as processed when "
            "the server hands it out",
        )
        if spec.capacity is not None:
            out += (
                f"bounded at {spec.capacity} messages for all groups together, dropping "
                f"the {spec.drop} on overflow",
            )
        if spec.conflate:
            out += ("conflated by key: one subject per key, at most one message per subject",)
        return out
    if fsync == "always":
        durable = "every server fsyncs before it acknowledges (sync_interval: always, checked)"
    elif options.fsync == "trust":
        durable = "the servers are trusted to fsync before acknowledging (?fsync=trust)"
    else:
        durable = "the servers' fsync policy is not known"
    quorum = (
        f"replicated to {replicas} servers by Raft: a send is acknowledged once a majority "
        f"({replicas // 2 + 1}) stored it"
        if replicas > 1
        else "one replica (a single server): its disk holds the only copy"
    )
    budget = (
        f"after {spec.max_deliveries} failed attempts (nack or lease expiry) or a reject, "
        f"the message moves to {spec.dead_letter!r} with its provenance: arrival keeps the "
        f"budget (JetStream's MaxDeliver is unlimited) and publishes the dead letter, then "
        f"acks the message"
        if spec.max_deliveries is not None
        else "failed messages are retried without limit"
        + (f"; reject moves them to {spec.dead_letter!r}" if spec.dead_letter else "")
    )
    out = (
        f"a JetStream stream on file storage; {quorum}; {durable}",
        "send returns after the stream's PubAck; each message carries a Nats-Msg-Id, so a "
        "retried send is stored once within the duplicate window; sends of several "
        "messages are one atomic batch (nats-server 2.12+)",
        f"lease of {spec.ack_timeout:g} s per delivery (a durable pull consumer per group, "
        f"AckExplicit); extend() holds it longer; expiry or nack make it available again, "
        f"and so does a lost consumer, once its lease ends; acks are double acks: ack() "
        f"returns once the server recorded it",
        f"redelivery backoff: exponential from {spec.backoff.initial_s:g} s, x"
        f"{spec.backoff.multiplier:g}, capped at {spec.backoff.max_s:g} s (a NAK with a "
        f"delay after a nack; JetStream's BackOff, at the mean jitter, after an expiry)",
        budget,
        "per-key order: a gate per group and key (compare-and-set entries in the "
        "namespace's keys stream) hands out a key's next message only once the one before "
        "it is settled; a delivery that waits stays with its client, kept alive",
        "a release (shutdown, close, circuit breaker) is counted in the keys stream and "
        "spends no attempt of the budget",
    )
    if spec.guarantee is Guarantee.EXACTLY_ONCE:
        out += (
            "acks are confirmed commits: a lease record per message (the namespace's settled "
            "stream): a delivery takes it "
            "when handed out, and ack() or a commit settles it by compare-and-set from that "
            "revision, so the newest delivery settles, once; a superseded one gets "
            "LeaseExpired",
            "transactions: each queue's outputs are one atomic batch with ids derived from "
            "the messages the transaction acks, then the acks; a redelivered message's "
            "transaction repeats the same ids and JetStream stores them once",
        )
    return out


def _jetstream_limits(spec: QueueSpec, config: dict[str, Any]) -> dict[str, str]:
    if spec.guarantee is Guarantee.AT_MOST_ONCE:
        return {"capacity_scope": "the whole stream, not each group"}
    window = int(config.get("duplicate_window", 0)) / 1e9
    out = {
        "duplicate_window": (
            f"{window:g} s: a send retried, or a transaction repeated, after this long is "
            f"stored again; the servers keep every id of the window in memory"
        ),
        "per_key_order": (
            "kept by arrival's gates, at about four round trips to the cluster per keyed "
            "message; a gate entry per group and key stays in the keys stream"
        ),
        "lost_consumer": (
            "a crashed consumer's messages come back when their lease ends: JetStream "
            "cannot tell a crashed client from a slow one"
        ),
        "retention": (
            f"deleted {spec.retention:g} s after every group acked it, by the clients' "
            f"trimming (every {TRIM_EVERY_S:g} s while one is connected)"
        ),
    }
    if spec.guarantee is Guarantee.EXACTLY_ONCE or spec.dedup:
        out["producer_state"] = (
            "none kept: a producer's retries are deduplicated by Nats-Msg-Id within the "
            "duplicate window, and a producer id is not fenced"
        )
    if spec.guarantee is Guarantee.EXACTLY_ONCE:
        out["settles"] = (
            f"a lease record per message, kept {SETTLED_MAX_AGE_S / 86400:g} days: a "
            f"delivery superseded longer ago than that could settle again"
        )
        out["transactions"] = (
            "atomic per queue; outputs to several queues are published one queue after "
            "another, and a crash between them is completed by the redelivery; at most 1000 "
            "messages per queue per transaction are atomic"
        )
    return out

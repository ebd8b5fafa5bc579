"""The verify workload: producers and consumers as separate processes, each writing its
own history file.

    python -m arrival.verify ROLE CONFIG-JSON

Roles: ``producer`` (uniquely numbered messages over 16-32 keys, open loop),
``consumer`` (receive, check, ack or nack), ``ctp`` (exactly-once
consume-transform-produce with ``Consumer.process``) and ``inbox`` (an inbox consumer
writing one effect row per message into SQLite).

Every operation is written *before* it is invoked, as an indeterminate event (``end=0``),
and again with its outcome once it returns; a process killed in between leaves the
indeterminate one, which is what its outcome is. Each event is one ``write(2)`` of one
line to a file opened for appending, so a SIGKILL never leaves half a line behind.
``SIGTERM`` asks a worker to stop: a producer stops sending and waits for its sends in
flight, a consumer finishes its current batch and closes (releasing its leases).

Times are ``time.monotonic()``: one clock for every process of the machine.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import random
import signal
import sqlite3
import threading
import time
from collections.abc import Callable
from typing import Any, Literal

import msgspec

import arrival
from arrival.errors import (
    ArrivalError,
    MessageTooLarge,
    ProducerFenced,
    ReceiptError,
    UnknownQueue,
    UsageError,
)
from arrival.verify.history import Ack, Deliver, Event, Outcome, Send, Txn

__all__ = ["body_of", "intact", "outcome_of"]

# errors that say for sure the operation did not take effect; any other is indeterminate
_DEFINITE = (ProducerFenced, MessageTooLarge, UnknownQueue, ReceiptError, UsageError)


def outcome_of(exc: BaseException) -> Outcome:
    """``fail`` when ``exc`` proves the operation did not take effect, else ``info``."""
    return "fail" if isinstance(exc, _DEFINITE) else "info"


def body_of(mid: str, key: str, size: int) -> bytes:
    """The body of message ``mid``: its id, key and filler derived from the id, so a
    consumer can tell a damaged or swapped body."""
    head = f"{mid} {key} ".encode()
    fill = hashlib.blake2b(mid.encode(), digest_size=32).hexdigest().encode()
    room = max(size - len(head), 0)
    return head + (fill * (room // len(fill) + 1))[:room]


def output_body(body: bytes) -> bytes:
    return b"out:" + body


def intact(mid: str, key: str, body: bytes, size: int) -> bool:
    """Whether ``body`` is what message ``mid`` was sent with (outputs of a transform
    carry their input's body behind ``out:``)."""
    base, slash, _n = mid.partition("/")
    expected = body_of(base, key, size)
    return body == (output_body(expected) if slash else expected)


class History:
    """One worker's history file: events appended, one ``write(2)`` each."""

    def __init__(self, path: str) -> None:
        self._fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        self._enc = msgspec.json.Encoder()
        self._lock = threading.Lock()

    def add(self, event: Event) -> None:
        line = self._enc.encode(event) + b"\n"
        with self._lock:
            os.write(self._fd, line)

    def close(self) -> None:
        os.close(self._fd)


class _Stop:
    def __init__(self) -> None:
        self.event = threading.Event()
        signal.signal(signal.SIGTERM, lambda *_: self.event.set())

    def __bool__(self) -> bool:
        return self.event.is_set()


def now() -> float:
    return time.monotonic()


def connect(url: str, patience: float = 60.0) -> arrival.Broker:
    """Connect, waiting out a server that is down (a worker may start during a restart)."""
    deadline = now() + patience
    while True:
        try:
            return arrival.connect(url)
        except ArrivalError:
            if now() > deadline:
                raise
            time.sleep(0.2)


# -- producer ------------------------------------------------------------------------


def producer(cfg: dict[str, Any]) -> None:
    """Send ``{name}-{n}`` messages over ``keys`` keys at ``rate`` per second in all (open
    loop: a thread per key, each on its own Poisson schedule), at most one in flight per
    key, until ``until`` (monotonic) or SIGTERM."""
    stop = _Stop()
    hist = History(cfg["history"])
    queue, name, size = cfg["queue"], cfg["name"], cfg["size"]
    keys = [f"k{i}" for i in range(cfg["keys"])]
    per_key = cfg["rate"] / len(keys)
    until = cfg["until"]
    broker = connect(cfg["url"])
    prod = broker.producer(id=cfg["producer_id"]) if cfg.get("producer_id") else None
    send = prod.send if prod is not None else broker.producer().send
    counter = iter(range(1 << 62))
    lock = threading.Lock()

    def run(key: str, rng: random.Random) -> None:
        due = now()
        while not stop and now() < until:
            due += rng.expovariate(per_key)
            wait = due - now()
            if wait > 0 and stop.event.wait(wait):
                return
            with lock:
                mid = f"{name}-{next(counter)}"
            t = now()
            hist.add(Send(t, 0.0, queue, mid, key, "info", producer=name))
            try:
                send(queue, body_of(mid, key, size), key=key, id=mid)
            except ArrivalError as exc:
                hist.add(
                    Send(
                        t, now(), queue, mid, key, outcome_of(exc), producer=name,
                        error=f"{type(exc).__name__}: {exc}",
                    )
                )  # fmt: skip
                if isinstance(exc, ProducerFenced):
                    return
                continue
            hist.add(Send(t, now(), queue, mid, key, "ok", producer=name))

    threads = [
        threading.Thread(target=run, args=(k, random.Random(f"{cfg['seed']}-{name}-{k}")))
        for k in keys
    ]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    broker.close()
    hist.close()


# -- consumers -----------------------------------------------------------------------


def _deliver(
    hist: History, msg: arrival.Message, session: str, size: int, since: float = 0.0
) -> None:
    """Record a delivery once the receive (called at ``since``) returned. A consumer
    paused between the broker handing a message out and this records it late: the
    checker orders a message's deliveries by attempt, and judges order by intervals."""
    hist.add(
        Deliver(
            now(),
            msg.queue,
            msg.group,
            session,
            msg.id,
            msg.key or "",
            msg.attempt,
            intact(msg.id, msg.key or "", msg.body, size),
            since,
        )
    )


def _settle(
    hist: History,
    msgs: list[arrival.Message],
    session: str,
    kind: Literal["ack", "nack"],
    call: Callable[[], None],
) -> None:
    """Settle ``msgs`` with ``call`` (one ack, nack or ack_batch), recording each
    message's settle before the call, as indeterminate, and after it with its outcome."""
    t = now()
    for m in msgs:
        hist.add(Ack(t, 0.0, m.queue, m.group, session, m.id, m.attempt, "info", kind))
    outcome: Outcome = "ok"
    try:
        call()
    except ArrivalError as exc:  # a stale receipt (LeaseExpired, AlreadySettled): fail
        outcome = outcome_of(exc)
    for m in msgs:
        hist.add(Ack(t, now(), m.queue, m.group, session, m.id, m.attempt, outcome, kind))


def consumer(cfg: dict[str, Any]) -> None:
    """Receive from ``queue`` as group ``group``; check each body; on a queue with acks,
    nack one in ``nack`` (redelivered at once) and ack the rest, one by one or as a batch."""
    stop = _Stop()
    hist = History(cfg["history"])
    session, size = cfg["session"], cfg["size"]
    rng = random.Random(f"{cfg['seed']}-{session}")
    acks = cfg["guarantee"] != "at-most-once"
    broker = connect(cfg["url"])
    cons = broker.consumer(cfg["queue"], cfg["group"])
    while not stop:
        since = now()
        try:
            msgs = cons.receive_batch(rng.randint(1, 16), timeout=0.5)
        except ArrivalError:
            time.sleep(0.1)
            continue
        for m in msgs:
            _deliver(hist, m, session, size, since)
        if not acks or not msgs:
            continue
        time.sleep(cfg.get("work_s", 0.0) * len(msgs))
        if rng.random() < 0.3:
            _settle(hist, msgs, session, "ack", functools.partial(cons.ack_batch, msgs))
            continue
        for m in msgs:
            if rng.random() < cfg.get("nack", 0.05):
                _settle(hist, [m], session, "nack", lambda m=m: m.nack(0.0))  # type: ignore[misc]
            else:
                _settle(hist, [m], session, "ack", m.ack)
    cons.close()
    broker.close()
    hist.close()


def ctp(cfg: dict[str, Any]) -> None:
    """Exactly-once consume-transform-produce: ``Consumer.process`` reads ``queue``
    (group ``group``) and sends one output per input to ``output``, id ``<input>/0``,
    in transactions of up to ``batch`` inputs."""
    stop = _Stop()
    hist = History(cfg["history"])
    session, size, out_q, tid = cfg["session"], cfg["size"], cfg["output"], cfg["tid"]
    broker = connect(cfg["url"])
    cons = broker.consumer(cfg["queue"], cfg["group"])
    # when the receive of the batch being handled began, at the latest: the previous
    # commit's end (process() receives the next batch after it). A handler paused before
    # it records its delivery does not make the delivery look later than it was.
    batch_since = [now()]

    def handler(msg: arrival.Message, out: arrival.Outputs) -> None:
        _deliver(hist, msg, session, size, since=batch_since[0])
        oid = f"{msg.id}/0"
        # the commit's fate is open until on_commit says otherwise
        hist.add(Txn(now(), 0.0, tid, "info", [(msg.queue, msg.group, msg.id)], [(out_q, oid)]))
        out.send(out_q, output_body(msg.body), key=msg.key, id=oid)

    def committed(msgs: list[arrival.Message]) -> None:
        t = now()
        batch_since[0] = t
        hist.add(
            Txn(
                t,
                t,
                tid,
                "ok",
                [(m.queue, m.group, m.id) for m in msgs],
                [(out_q, f"{m.id}/0") for m in msgs],
            )
        )

    while not stop:
        batch_since[0] = now()
        try:
            cons.process(
                handler,
                transactional_id=tid,
                batch=cfg.get("batch", 8),
                interval=0.05,
                stop=lambda: bool(stop),
                on_commit=committed,
            )
        except ProducerFenced:
            break
        except ArrivalError:
            time.sleep(0.1)
    cons.close()
    broker.close()
    hist.close()


def inbox(cfg: dict[str, Any]) -> None:
    """An exactly-once consumer whose effect is a row in SQLite, made once per message by
    ``arrival.inbox`` in the same local transaction as the inbox record."""
    stop = _Stop()
    hist = History(cfg["history"])
    session, size = cfg["session"], cfg["size"]
    db = sqlite3.connect(cfg["effects"], isolation_level="DEFERRED", timeout=30)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("CREATE TABLE IF NOT EXISTS effects (queue TEXT, grp TEXT, id TEXT)")
    db.commit()
    box = arrival.inbox(db)
    broker = connect(cfg["url"])
    cons = broker.consumer(cfg["queue"], cfg["group"])
    while not stop:
        since = now()
        try:
            msgs = cons.receive_batch(8, timeout=0.5)
        except ArrivalError:
            time.sleep(0.1)
            continue
        for m in msgs:
            _deliver(hist, m, session, size, since)

            def effect(m: arrival.Message = m) -> None:
                with box.once(m) as fresh:
                    if fresh:
                        db.execute("INSERT INTO effects VALUES (?, ?, ?)", (m.queue, m.group, m.id))

            _settle(hist, [m], session, "ack", effect)
    cons.close()
    broker.close()
    db.close()
    hist.close()


ROLES: dict[str, Callable[[dict[str, Any]], None]] = {
    "producer": producer,
    "consumer": consumer,
    "ctp": ctp,
    "inbox": inbox,
}


def main(argv: list[str]) -> None:
    if len(argv) != 2 or argv[0] not in ROLES:
        raise SystemExit(f"usage: python -m arrival.verify {{{','.join(ROLES)}}} JSON")
    ROLES[argv[0]](json.loads(argv[1]))

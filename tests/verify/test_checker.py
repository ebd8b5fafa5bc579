"""The checker on tiny hand-written histories: one per anomaly, each with the history
it must find guilty and the nearest one it must clear, and the verdict per guarantee."""

from __future__ import annotations

import io

import pytest

from arrival.verify import Ack, Audit, Deliver, Effect, Fault, Register, Send, Txn, check
from arrival.verify.checker import ANOMALIES, RULES
from arrival.verify.history import dump, load

Q, G = "q", "g"


def send(mid: str, outcome: str = "ok", t: float = 0.0, key: str = "k", **kw: object) -> Send:
    return Send(time=t, end=t + 0.1, queue=Q, id=mid, key=key, outcome=outcome, **kw)  # type: ignore[arg-type]


def deliver(mid: str, t: float, session: str = "c1", attempt: int = 1, **kw: object) -> Deliver:
    key = kw.pop("key", "k")
    return Deliver(
        time=t, queue=kw.pop("queue", Q), group=G, session=session, id=mid, key=key,  # type: ignore[arg-type]
        attempt=attempt, **kw,  # type: ignore[arg-type]
    )  # fmt: skip


def ack(mid: str, t: float, outcome: str = "ok", session: str = "c1", **kw: object) -> Ack:
    return Ack(
        time=t, end=t + 0.1, queue=Q, group=G, session=session, id=mid,
        attempt=kw.pop("attempt", 1), outcome=outcome, **kw,  # type: ignore[arg-type]
    )  # fmt: skip


def test_a_clean_history_is_ok_for_every_guarantee() -> None:
    history = [send("p-1"), send("p-2", t=1), deliver("p-1", 2), ack("p-1", 2.1)]
    history += [deliver("p-2", 3), ack("p-2", 3.1), Audit(stored=[(Q, "p-1"), (Q, "p-2")])]
    for g in RULES:
        r = check(history, g)
        assert r.ok, (g, r.forbidden)
        assert set(r.counts) == set(ANOMALIES)
        assert sum(r.counts.values()) == 0


def test_lost() -> None:
    history = [send("p-1"), send("p-2"), deliver("p-1", 1), ack("p-1", 1.1)]
    r = check(history, "at-least-once")
    assert r.examples["lost"] == [(Q, G, "p-2")]
    assert r.forbidden == {"lost": 1}
    assert check(history, "at-most-once").ok  # allowed there, and counted
    assert check(history, "at-most-once").counts["lost"] == 1
    # an indeterminate or failed send that never arrived is not lost
    assert check([send("p-1"), send("p-2", "info"), deliver("p-1", 1)], "exactly-once").ok


def test_observed_then_lost() -> None:
    base = [send("p-1"), deliver("p-1", 1), deliver("x-0", 2, session="drain")]
    base.append(send("x-0"))
    r = check(base, "at-least-once")
    assert r.forbidden == {"observed-then-lost": 1}
    # acked (or maybe acked): gone from the drain for a reason
    assert check([*base, ack("p-1", 1.1, "info")], "at-least-once").ok
    # in the drain again: not lost
    assert check([*base, deliver("p-1", 3, session="drain", attempt=2)], "at-least-once").ok


def test_phantom_and_corrupt() -> None:
    r = check([send("p-1"), deliver("p-1", 1), deliver("p-9", 2)], "at-most-once")
    assert r.forbidden == {"phantom": 1}
    r = check([send("p-1"), deliver("p-1", 1, intact=False)], "at-most-once")
    assert r.forbidden == {"corrupt": 1}


def test_aborted_read() -> None:
    r = check([send("p-1", "fail"), deliver("p-1", 1)], "at-least-once")
    assert r.forbidden == {"aborted-read": 1}
    # failed once, then retried with an unknown outcome: its delivery is fine
    assert check(
        [send("p-1", "fail"), send("p-1", "info", t=1), deliver("p-1", 2)], "at-least-once"
    ).ok
    failed_txn = Txn(time=0, end=0.1, tid="t", outcome="fail", outputs=[(Q, "in-1/0")])
    r = check([failed_txn, deliver("in-1/0", 1)], "exactly-once")
    assert r.forbidden == {"aborted-read": 1}


def test_dirty_read() -> None:
    txn = Txn(time=5, end=5.1, tid="t", outcome="ok", outputs=[(Q, "in-1/0")])
    r = check([txn, deliver("in-1/0", 1)], "exactly-once")
    assert r.forbidden == {"dirty-read": 1}
    assert check([txn, deliver("in-1/0", 5.05)], "exactly-once").ok  # during the commit
    assert check([txn, deliver("in-1/0", 1)], "at-least-once").counts["dirty-read"] == 1


def test_torn_transaction() -> None:
    txn = Txn(time=0, end=0.1, tid="t", outcome="ok", outputs=[(Q, "a/0"), (Q, "a/1")])
    seen = [deliver("a/0", 1), ack("a/0", 1.1), deliver("a/1", 1.5, session="drain")]
    assert check([txn, *seen], "exactly-once").ok
    r = check([txn, deliver("a/0", 1), deliver("a/0", 2, session="drain")], "exactly-once")
    assert "torn-transaction" in r.forbidden
    info = Txn(time=0, end=0.1, tid="t", outcome="info", outputs=[(Q, "a/0"), (Q, "a/1")])
    r = check([info, Audit(stored=[(Q, "a/1")])], "exactly-once")
    assert r.forbidden == {"torn-transaction": 1}  # unknown outcome: all or nothing still


def test_duplicate_in_storage() -> None:
    history = [send("p-1"), send("p-1", t=1), Audit(stored=[(Q, "p-1"), (Q, "p-1")])]
    assert check(history, "exactly-once").forbidden == {"duplicate-in-storage": 1}
    alo = check(history, "at-least-once")
    assert alo.ok
    assert alo.counts["duplicate-in-storage"] == 1


def test_duplicate_delivery_explained_or_not() -> None:
    base = [send("p-1"), deliver("p-1", 1), deliver("p-1", 5, session="c2", attempt=2)]
    # no ack: a lease ran out, a redelivery is what at-least-once does
    r = check(base, "at-least-once")
    assert (r.counts["duplicate-delivery-explained"], r.ok) == (1, True)
    # acked, and nothing in between explains the redelivery
    r = check([*base, ack("p-1", 1.1)], "at-least-once")
    assert r.forbidden == {"duplicate-delivery": 1}
    # ... unless the broker crashed before the ack was durable
    r = check([*base, ack("p-1", 1.1), Fault(time=3, kind="kill")], "at-least-once")
    assert r.ok
    # exactly-once: no excuse after a committed ack, faults or not
    r = check([*base, ack("p-1", 1.1), Fault(time=3, kind="kill")], "exactly-once")
    assert r.forbidden == {"duplicate-delivery": 1}
    txn = Txn(time=1, end=1.2, tid="t", outcome="ok", inputs=[(Q, G, "p-1")])
    assert check([*base, txn], "exactly-once").forbidden == {"duplicate-delivery": 1}
    assert check(base, "exactly-once").ok  # never acked: redelivered, once processed
    # at-most-once: never twice
    assert check(base, "at-most-once").forbidden == {"duplicate-delivery-explained": 1}


def test_duplicate_effect() -> None:
    e = Effect(queue=Q, group=G, id="p-1", name="charge")
    history = [send("p-1"), deliver("p-1", 1), ack("p-1", 1.1), e, e]
    assert check(history, "exactly-once").forbidden == {"duplicate-effect": 1}
    assert check(history, "at-least-once").ok
    assert check(history[:-1], "exactly-once").ok


def test_reorder_per_key_and_producer() -> None:
    history = [send("p-1"), send("p-2", t=1), deliver("p-2", 2), deliver("p-1", 3)]
    assert check(history, "at-least-once").forbidden == {"reorder": 1}
    # other keys, or other producers, have no order between them
    other_key = [send("p-1", key="a"), send("p-2", key="b"), deliver("p-2", 2, key="b")]
    other_key.append(deliver("p-1", 3, key="a"))
    assert check(other_key, "at-least-once").ok
    producers = [send("p-2"), send("r-1"), deliver("p-2", 2), deliver("r-1", 3)]
    assert check(producers, "at-least-once").ok
    # a redelivery of an earlier message is not a reorder: first deliveries count
    redelivered = [*history[:2], deliver("p-1", 2), deliver("p-2", 3), deliver("p-1", 4)]
    assert check(redelivered, "at-least-once").counts["reorder"] == 0


def test_zombie_write() -> None:
    fence = Register(time=1, end=1.1, producer="p", epoch=2)
    zombie = send("p-5", t=2, producer="p", epoch=1)
    assert check([fence, zombie], "exactly-once").forbidden == {"zombie-write": 1}
    early = send("p-5", t=0.5, producer="p", epoch=1)  # began before the fence
    assert check([fence, early], "exactly-once").ok
    refused = send("p-6", "fail", t=2, producer="p", epoch=1)
    assert check([fence, refused], "exactly-once").ok
    tfence = Register(time=1, end=1.1, producer="billing", epoch=7)
    txn = Txn(time=2, end=2.1, tid="billing", outcome="ok", epoch=6)
    assert check([tfence, txn], "exactly-once").forbidden == {"zombie-write": 1}


def test_faults_and_sends_are_counted_by_kind() -> None:
    history = [Fault(time=1, kind="kill"), Fault(time=2, kind="kill"), Fault(time=3, kind="cut")]
    history += [send("p-1"), send("p-2", "info"), send("p-3", "fail")]
    r = check(history, "at-least-once")
    assert r.faults == {"kill": 2, "cut": 1}
    assert r.sends == {"ok": 1, "info": 1, "fail": 1}


def test_history_round_trips_as_json_lines() -> None:
    history = [
        send("p-1", producer="p", epoch=3),
        Register(time=0, end=0.1, producer="p", epoch=3),
        deliver("p-1", 1),
        ack("p-1", 1.1, kind="nack"),
        Txn(time=2, end=2.1, tid="t", outcome="info", inputs=[(Q, G, "p-1")], outputs=[(Q, "x")]),
        Effect(queue=Q, group=G, id="p-1"),
        Audit(stored=[(Q, "p-1")]),
        Fault(time=3, kind="pause", detail="2 s"),
    ]
    buf = io.BytesIO()
    dump(history, buf)
    back = list(load(buf.getvalue().splitlines()))
    assert back == history


def test_unknown_guarantee_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown guarantee"):
        check([], "best-effort")

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


def test_torn_transaction_acks_without_outputs() -> None:
    """An input consumed by a transaction that may have committed, never seen again, and
    none of whose outputs exists: the acks took effect without the outputs."""
    txn = Txn(
        time=2, end=2.1, tid="t", outcome="ok", inputs=[(Q, G, "p-1")], outputs=[("o", "p-1/0")]
    )
    base = [send("p-1"), deliver("p-1", 1)]
    r = check([*base, txn], "exactly-once")
    assert r.forbidden == {"torn-transaction": 1}
    assert r.examples["torn-transaction"] == [(Q, G, "p-1", "acked without outputs")]
    # the output is there: whole
    out = Deliver(time=3, queue="o", group="i", session="c", id="p-1/0", key="k", attempt=1)
    assert check([*base, txn, out], "exactly-once").ok
    # a commit of unknown outcome whose input came back: nothing took effect, not torn
    info = Txn(
        time=2, end=2.1, tid="t", outcome="info", inputs=[(Q, G, "p-1")], outputs=[("o", "p-1/0")]
    )
    assert check([*base, info, deliver("p-1", 4, session="c2", attempt=2)], "exactly-once").ok
    # ... or it was left for the final drain
    assert check([*base, info, deliver("p-1", 4, session="drain", attempt=2)], "exactly-once").ok
    # ... but one that never came back and left no output is torn
    assert "torn-transaction" in check([*base, info], "exactly-once").forbidden


def test_an_input_committed_by_two_transactions_is_a_duplicate_effect() -> None:
    """Acks bound to their delivery attempt allow one commit per input: a late commit of a
    stale attempt that is accepted shows as a second committed transaction."""

    def commit(t: float, tid: str) -> Txn:
        return Txn(
            time=t,
            end=t + 0.1,
            tid=tid,
            outcome="ok",
            inputs=[(Q, G, "p-1")],
            outputs=[("o", "p-1/0")],
        )

    out = Deliver(time=9, queue="o", group="i", session="c", id="p-1/0", key="k", attempt=1)
    base = [send("p-1"), deliver("p-1", 1), deliver("p-1", 4, session="c2", attempt=2), out]
    r = check([*base, commit(5, "t2"), commit(6, "t1")], "exactly-once")
    assert r.forbidden == {"duplicate-effect": 1}
    assert r.examples["duplicate-effect"] == [(Q, G, "p-1", "committed twice")]
    assert check([*base, commit(5, "t2")], "exactly-once").ok
    refused = Txn(
        time=6, end=6.1, tid="t1", outcome="fail", inputs=[(Q, G, "p-1")], outputs=[("o", "p-1/0")]
    )
    assert check([*base, commit(5, "t2"), refused], "exactly-once").ok


def test_liveness_is_forbidden_for_every_guarantee() -> None:
    for g in RULES:
        r = check([], g)
        r.add("liveness", ["not settled"])
        assert r.forbidden == {"liveness": 1}


def test_a_delivery_recorded_late_is_ordered_by_its_attempt() -> None:
    """A consumer paused right after a receive records attempt 1 after another consumer
    got, acked and recorded attempt 2: the broker's order is by attempt, not by record."""
    history = [
        send("p-1"),
        deliver("p-1", 5, session="c2", attempt=2),
        ack("p-1", 5.1, session="c2", attempt=2),
        deliver("p-1", 6, session="c1", attempt=1),  # handed out before the pause
        ack("p-1", 6.1, outcome="fail", session="c1", attempt=1),
    ]
    r = check(history, "at-least-once")
    assert r.ok, r.forbidden
    assert r.counts["duplicate-delivery-explained"] == 1
    # ... while a real redelivery after a successful ack is still caught
    history[3] = deliver("p-1", 6, session="c1", attempt=3)
    assert check(history, "at-least-once").forbidden == {"duplicate-delivery": 1}


def test_reorder_is_judged_by_intervals_across_concurrent_consumers() -> None:
    """Two consumers receive at once: the later message's receive returning first proves
    nothing; only one that returned before the earlier one's receive began does."""
    overlapping = [
        send("p-1"),
        send("p-2", t=1),
        Deliver(time=5.2, queue=Q, group=G, session="c1", id="p-2", key="k", attempt=1, since=5.0),
        Deliver(time=5.3, queue=Q, group=G, session="c2", id="p-1", key="k", attempt=1, since=5.1),
    ]
    assert check(overlapping, "at-most-once").ok
    disjoint = [*overlapping[:3]]
    disjoint.append(
        Deliver(time=5.5, queue=Q, group=G, session="c2", id="p-1", key="k", attempt=1, since=5.25)
    )
    assert check(disjoint, "at-most-once").forbidden == {"reorder": 1}


def test_acknowledged_delivered_and_missing_from_the_audit_is_observed_then_lost() -> None:
    """A power cut that takes back a send acknowledged before its fsync: the consumers
    saw it before the cut, so only the audit shows it is gone."""
    history = [send("p-1"), send("p-2", t=1), deliver("p-1", 2), ack("p-1", 2.1)]
    history += [deliver("p-2", 3), ack("p-2", 3.1)]
    r = check([*history, Audit(stored=[(Q, "p-1")])], "at-least-once")
    assert r.forbidden == {"observed-then-lost": 1}
    assert r.examples["observed-then-lost"] == [(Q, "audit", "p-2")]
    assert check([*history, Audit(stored=[(Q, "p-1"), (Q, "p-2")])], "at-least-once").ok
    # a queue the audit does not cover, or an indeterminate send, proves nothing
    assert check([*history, Audit(stored=[("other", "x")])], "at-least-once").ok
    maybe = [send("p-1"), send("p-2", "info", t=1), *history[2:]]
    assert check([*maybe, Audit(stored=[(Q, "p-1")])], "exactly-once").ok


def test_one_message_acked_by_two_deliveries_is_a_duplicate_effect() -> None:
    """A stale ack (its lease expired, the message redelivered) that is accepted."""
    base = [send("p-1"), deliver("p-1", 1), deliver("p-1", 4, session="c2", attempt=2)]
    late = ack("p-1", 5, attempt=1)
    second = ack("p-1", 4.5, session="c2", attempt=2)
    r = check([*base, second, late], "exactly-once")
    assert r.forbidden == {"duplicate-effect": 1}
    assert r.examples["duplicate-effect"] == [(Q, G, "p-1", "acked twice")]
    refused = ack("p-1", 5, outcome="fail", attempt=1)
    assert check([*base, second, refused], "exactly-once").ok
    assert check([*base, second, late], "at-least-once").counts["duplicate-effect"] == 1


def test_a_queue_the_store_lost_is_covered_by_the_audit() -> None:
    history = [send("p-1"), deliver("p-1", 2), ack("p-1", 2.1)]
    r = check([*history, Audit(stored=[], queues=[Q])], "at-least-once")
    assert r.forbidden == {"observed-then-lost": 1}
    assert check([*history, Audit(stored=[])], "at-least-once").ok  # covers nothing


def test_an_ack_belongs_to_the_delivery_it_followed() -> None:
    """A power cut takes back an at-least-once ack and the attempt count with it: the
    broker hands out attempt 1 again. That second attempt 1's nack is what explains the
    next redelivery, not the first attempt 1's (lost) ack."""
    history = [
        send("p-1"),
        deliver("p-1", 1),
        ack("p-1", 1.1),
        Fault(time=2, kind="power-loss"),
        deliver("p-1", 5),
        ack("p-1", 5.1, kind="nack"),
        deliver("p-1", 5.3, session="c2", attempt=2),
    ]
    r = check(history, "at-least-once")
    assert r.ok, r.forbidden
    assert r.counts["duplicate-delivery-explained"] == 2


def test_a_redelivery_handed_out_before_the_committed_ack_is_not_after_it() -> None:
    """Attempt 2 goes to a consumer whose receive returns late; meanwhile attempt 3 is
    handed to another and its ack commits. Attempt 2 was handed out before that commit
    (its receive began before), so it is no duplicate after a committed ack."""
    history = [
        send("p-1"),
        deliver("p-1", 1, attempt=1),
        ack("p-1", 1.1, outcome="fail", attempt=1),
        Deliver(time=5.0, queue=Q, group=G, session="c1", id="p-1", key="k", attempt=3, since=4.9),
        ack("p-1", 5.0, attempt=3),
        Deliver(time=5.5, queue=Q, group=G, session="c2", id="p-1", key="k", attempt=2, since=4.8),
    ]
    assert check(history, "exactly-once").ok
    # a delivery whose receive began after the commit returned is a duplicate
    history.append(
        Deliver(time=6.0, queue=Q, group=G, session="c2", id="p-1", key="k", attempt=4, since=5.9)
    )
    assert check(history, "exactly-once").forbidden == {"duplicate-delivery": 1}

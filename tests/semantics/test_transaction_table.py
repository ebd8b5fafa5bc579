"""Unit tests of arrival.semantics.transactions: epochs, fencing and timeouts, as pure decisions."""

from __future__ import annotations

import pytest

from arrival.errors import ConflictError, ProducerFenced, TransactionTimedOut
from arrival.semantics.transactions import TransactionTable

T0 = 5_000.0
TIMEOUT = 30.0


def test_begin_returns_the_broker_epoch_and_a_growing_counter() -> None:
    t = TransactionTable(broker_epoch=4)
    epochs = [t.begin("a"), t.begin("b"), t.begin("a")]
    assert [e[0] for e in epochs] == [4, 4, 4]
    assert epochs[0][1] < epochs[1][1] < epochs[2][1]


def test_the_newest_holder_may_commit() -> None:
    t = TransactionTable(1)
    e = t.begin("billing")
    t.check("billing", e, T0, TIMEOUT, T0 + 1)  # does not raise
    t.check("billing", e, T0, TIMEOUT, T0 + 1)  # checking changes nothing


def test_begin_fences_every_earlier_holder_of_the_id() -> None:
    t = TransactionTable(1)
    first = t.begin("billing")
    second = t.begin("billing")
    third = t.begin("billing")
    for old in (first, second):
        with pytest.raises(ProducerFenced) as exc:
            t.check("billing", old, T0, TIMEOUT, T0)
        assert (exc.value.kind, exc.value.name) == ("transaction", "billing")
        assert "newer holder" in str(exc.value)
        assert isinstance(exc.value, ConflictError)
    t.check("billing", third, T0, TIMEOUT, T0)


def test_ids_fence_independently() -> None:
    t = TransactionTable(1)
    a = t.begin("a")
    t.begin("b")
    t.begin("b")
    t.check("a", a, T0, TIMEOUT, T0)  # opening "b" again does not touch "a"


def test_an_epoch_from_before_a_restart_is_fenced() -> None:
    before = TransactionTable(broker_epoch=1)
    e = before.begin("billing")
    after = TransactionTable(broker_epoch=2)
    with pytest.raises(ProducerFenced, match="restarted"):
        after.check("billing", e, T0, TIMEOUT, T0)
    # even when the new broker handed out the same counter to a new holder
    assert after.begin("billing")[1] == e[1]
    with pytest.raises(ProducerFenced, match="restarted"):
        after.check("billing", e, T0, TIMEOUT, T0)


def test_an_epoch_from_a_later_broker_is_fenced_too() -> None:
    t = TransactionTable(broker_epoch=2)
    t.begin("billing")
    with pytest.raises(ProducerFenced):
        t.check("billing", (3, 1), T0, TIMEOUT, T0)


def test_an_unknown_id_is_fenced() -> None:
    t = TransactionTable(1)
    with pytest.raises(ProducerFenced):
        t.check("never-begun", (1, 1), T0, TIMEOUT, T0)


def test_a_commit_within_the_timeout_is_allowed_up_to_the_limit() -> None:
    t = TransactionTable(1)
    e = t.begin("billing")
    t.check("billing", e, T0, TIMEOUT, T0 + TIMEOUT)  # exactly at the timeout: still allowed


def test_a_commit_after_the_timeout_is_refused() -> None:
    t = TransactionTable(1)
    e = t.begin("billing")
    with pytest.raises(TransactionTimedOut) as exc:
        t.check("billing", e, T0, TIMEOUT, T0 + TIMEOUT + 0.001)
    assert (exc.value.transactional_id, exc.value.timeout_s) == ("billing", TIMEOUT)
    assert "30 s" in str(exc.value)
    assert not exc.value.retriable


def test_fencing_is_reported_before_a_timeout() -> None:
    t = TransactionTable(1)
    old = t.begin("billing")
    t.begin("billing")
    with pytest.raises(ProducerFenced):  # the zombie learns it is fenced, not just late
        t.check("billing", old, T0, TIMEOUT, T0 + 10 * TIMEOUT)


def test_end_forgets_the_newest_holder() -> None:
    t = TransactionTable(1)
    e = t.begin("billing")
    t.end("billing", e)
    assert "billing" not in t.current
    with pytest.raises(ProducerFenced):
        t.check("billing", e, T0, TIMEOUT, T0)  # an ended transaction can't commit
    t.end("billing", e)  # ending twice is harmless


def test_end_by_an_older_holder_keeps_the_newer_one() -> None:
    t = TransactionTable(1)
    old = t.begin("billing")
    new = t.begin("billing")
    t.end("billing", old)  # the zombie aborts
    t.check("billing", new, T0, TIMEOUT, T0)
    assert t.current == {"billing": new[1]}


def test_end_with_an_epoch_from_another_broker_keeps_the_holder() -> None:
    t = TransactionTable(broker_epoch=2)
    e = t.begin("billing")
    t.end("billing", (1, e[1]))  # the same counter, handed out before a restart
    t.check("billing", e, T0, TIMEOUT, T0)


def test_the_table_stays_bounded_when_transactions_end() -> None:
    t = TransactionTable(1)
    for i in range(1000):
        tid = f"tx-{i}"
        t.end(tid, t.begin(tid))
    assert t.current == {}

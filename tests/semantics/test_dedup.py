"""Unit tests of arrival.semantics.dedup: idempotent-producer state and the message-id index.

Pure decisions: no engine, no store, no clock (``now`` is a number passed in).
"""

from __future__ import annotations

import msgspec
import pytest

from arrival.errors import (
    DedupHorizonPassed,
    ProducerFenced,
    SequenceError,
    StorageError,
    UsageError,
)
from arrival.semantics.dedup import RECENT, Duplicate, IdIndex, ProducerTable

T0 = 1_000.0
HORIZON = 100.0


def sent(table: ProducerTable, pid: str, epoch: int, seqs: range, queue: str = "q") -> None:
    """Record ``seqs`` as stored, send n at offset 10 * n (so offsets are recognisable)."""
    for seq in seqs:
        assert table.check(pid, epoch, seq, queue) is None
        table.record(pid, epoch, seq, queue, 10 * seq, T0)


# -- ProducerTable: registration and fencing ----------------------------------------------


def test_register_hands_out_growing_epochs_that_carry_the_broker_epoch() -> None:
    t = ProducerTable(HORIZON)
    epochs = [t.register("p", T0) for _ in range(3)]
    assert epochs == sorted(set(epochs))
    assert [e >> 32 for e in epochs] == [1, 1, 1]
    later = ProducerTable(HORIZON, broker_epoch=2)  # the broker restarted
    assert later.register("p", T0) > max(epochs)


def test_an_unknown_producer_is_refused_even_on_its_first_sequence() -> None:
    # registrations are durable before their epoch is handed out, so an unknown producer
    # expired: a retry of its very first send may be stored already
    t = ProducerTable(HORIZON)
    old = t.register("a", T0)
    newer = t.register("b", T0 + HORIZON)
    assert t.expire(T0 + HORIZON + 1) == ["a"]
    with pytest.raises(DedupHorizonPassed):
        t.check("a", old, 1, "q")
    assert t.check("b", newer, 1, "q") is None
    with pytest.raises(DedupHorizonPassed):
        t.check("b", newer + 1, 1, "q")  # an epoch this table never handed out


def test_a_newer_registration_fences_every_earlier_epoch() -> None:
    t = ProducerTable(HORIZON)
    e1 = t.register("p", T0)
    sent(t, "p", e1, range(1, 3))
    e2 = t.register("p", T0)
    for old_seq in (1, 2, 3):  # a retry, and a new send: both refused
        with pytest.raises(ProducerFenced) as exc:
            t.check("p", e1, old_seq, "q")
        assert exc.value.name == "p"
        assert f"epoch {e1} was replaced by epoch {e2}" in str(exc.value)
    assert t.check("p", e2, 1, "q") is None  # the new holder starts its own sequence


def test_a_registration_resets_the_sequence() -> None:
    t = ProducerTable(HORIZON)
    e1 = t.register("p", T0)
    sent(t, "p", e1, range(1, 6))
    e2 = t.register("p", T0)
    with pytest.raises(SequenceError, match=r"sends 1\.\.5 were lost"):
        t.check("p", e2, 6, "q")  # the new epoch does not continue the old sequence


def test_register_marks_the_producer_for_the_next_drain() -> None:
    t = ProducerTable(HORIZON)
    t.register("p", T0)
    drained = t.drain()
    assert list(drained) == ["p"]
    assert isinstance(drained["p"], bytes)
    assert t.drain() == {}  # nothing changed since


def test_epochs_keep_growing_after_a_producer_expired() -> None:
    t = ProducerTable(HORIZON)
    old = t.register("p", T0)
    assert t.expire(T0 + HORIZON + 1) == ["p"]
    new = t.register("p", T0 + HORIZON + 1)
    assert new > old
    sent(t, "p", new, range(1, 2))
    with pytest.raises(ProducerFenced):
        t.check("p", old, 2, "q")  # the zombie continues its old sequence


# -- ProducerTable: check -------------------------------------------------------------------


def test_first_send_and_each_next_sequence_are_new() -> None:
    t = ProducerTable(HORIZON)
    e = t.register("p", T0)
    for seq in range(1, 5):
        assert t.check("p", e, seq, "q") is None
        t.record("p", e, seq, "q", 100 + seq, T0)


def test_check_alone_does_not_advance_the_sequence() -> None:
    t = ProducerTable(HORIZON)
    e = t.register("p", T0)
    assert t.check("p", e, 1, "q") is None
    assert t.check("p", e, 1, "q") is None  # not recorded: still new
    with pytest.raises(SequenceError):
        t.check("p", e, 2, "q")  # 1 was never recorded: 2 is a gap


def test_a_retry_gets_the_original_queue_and_offset() -> None:
    t = ProducerTable(HORIZON)
    e = t.register("p", T0)
    t.record("p", e, 1, "orders", 7, T0)
    t.record("p", e, 2, "audit", 3, T0)
    t.record("p", e, 3, "orders", 8, T0)
    assert t.check("p", e, 1, "orders") == Duplicate("orders", 7)
    assert t.check("p", e, 2, "audit") == Duplicate("audit", 3)
    assert t.check("p", e, 3, "orders") == Duplicate("orders", 8)
    assert t.check("p", e, 4, "orders") is None  # the retries changed nothing


def test_the_same_sequence_to_another_queue_is_refused() -> None:
    t = ProducerTable(HORIZON)
    e = t.register("p", T0)
    t.record("p", e, 1, "orders", 0, T0)
    with pytest.raises(SequenceError) as exc:
        t.check("p", e, 1, "audit")
    assert (exc.value.producer, exc.value.seq) == ("p", 1)
    assert "'orders'" in str(exc.value)
    assert "'audit'" in str(exc.value)


def test_a_gap_is_refused_naming_the_lost_sequences() -> None:
    t = ProducerTable(HORIZON)
    e = t.register("p", T0)
    sent(t, "p", e, range(1, 4))
    with pytest.raises(SequenceError) as exc:
        t.check("p", e, 7, "q")
    msg = str(exc.value)
    assert "last stored sequence is 3" in msg
    assert "4..6 were lost" in msg
    assert "resend them in order" in msg
    assert t.check("p", e, 4, "q") is None  # the refusal recorded nothing


@pytest.mark.parametrize("seq", [0, -1, -(2**40)])
def test_sequences_start_at_1(seq: int) -> None:
    t = ProducerTable(HORIZON)
    e = t.register("p", T0)
    with pytest.raises(SequenceError, match="start at 1"):
        t.check("p", e, seq, "q")
    with pytest.raises(SequenceError, match="start at 1"):
        t.check("never-registered", 1, seq, "q")  # checked before the producer is looked up


def test_sequence_errors_are_usage_errors_and_not_retriable() -> None:
    t = ProducerTable(HORIZON)
    e = t.register("p", T0)
    with pytest.raises(UsageError) as exc:
        t.check("p", e, 0, "q")
    assert not exc.value.retriable


def test_results_older_than_the_last_recent_sends_are_forgotten() -> None:
    t = ProducerTable(HORIZON)
    e = t.register("p", T0)
    last = RECENT + 5
    sent(t, "p", e, range(1, last + 1))
    oldest_kept = last - RECENT + 1
    assert t.check("p", e, oldest_kept, "q") == Duplicate("q", 10 * oldest_kept)
    assert t.check("p", e, last, "q") == Duplicate("q", 10 * last)
    for forgotten in (1, oldest_kept - 1):
        with pytest.raises(SequenceError) as exc:
            t.check("p", e, forgotten, "q")
        assert f"older than the last {RECENT} sends" in str(exc.value)
        assert f"the last stored is {last}" in str(exc.value)


def test_an_unknown_producer_is_refused_at_any_sequence() -> None:
    t = ProducerTable(HORIZON)
    for seq in (1, 2):
        with pytest.raises(DedupHorizonPassed) as exc:
            t.check("ghost", 1, seq, "q")
        assert (exc.value.producer, exc.value.seq, exc.value.horizon_s) == ("ghost", seq, HORIZON)
    assert "100 s" in str(exc.value)


def test_an_epoch_newer_than_the_stored_one_is_refused() -> None:
    t = ProducerTable(HORIZON)
    e = t.register("p", T0)
    sent(t, "p", e, range(1, 4))
    for seq in (1, 2):  # an epoch the table never handed out: nothing can vouch for it
        with pytest.raises(DedupHorizonPassed):
            t.check("p", e + 1, seq, "q")
    assert t.check("p", e, 4, "q") is None  # the stored epoch carries on


# -- ProducerTable: expiry, drain, restore ------------------------------------------------


def test_a_producer_expires_only_when_idle_longer_than_the_horizon() -> None:
    t = ProducerTable(HORIZON)
    e = t.register("p", T0)
    t.record("p", e, 1, "q", 0, T0 + 50)  # the horizon counts from the last send
    assert t.expire(T0 + 50 + HORIZON) == []  # exactly at the horizon: still kept
    assert t.check("p", e, 1, "q") == Duplicate("q", 0)
    assert t.expire(T0 + 50 + HORIZON + 0.001) == ["p"]
    with pytest.raises(DedupHorizonPassed):
        t.check("p", e, 2, "q")


def test_expiry_keeps_active_producers() -> None:
    t = ProducerTable(HORIZON)
    idle = t.register("idle", T0)
    busy = t.register("busy", T0)
    t.record("busy", busy, 1, "q", 0, T0 + 90)
    assert t.expire(T0 + 150) == ["idle"]
    assert t.check("busy", busy, 1, "q") == Duplicate("q", 0)
    with pytest.raises(DedupHorizonPassed):  # forgotten: even seq 1 may be a retry
        t.check("idle", idle, 1, "q")
    fresh = t.register("idle", T0 + 150)  # a new incarnation starts over
    assert t.check("idle", fresh, 1, "q") is None


def test_drain_and_restore_round_trip_the_state() -> None:
    t = ProducerTable(HORIZON)
    t.register("p", T0)
    t.register("p", T0)
    e = t.register("p", T0)
    for seq in range(1, 4):
        t.record("p", e, seq, f"q{seq}", 10 * seq, T0 + seq)
    drained = t.drain()
    assert set(drained) == {"p"}
    u = ProducerTable(HORIZON)
    u.restore({p: s for p, s in drained.items() if s is not None})
    st = u.states["p"]
    assert (st.epoch, st.last_seq, st.last_send) == (e, 3, T0 + 3)
    assert list(st.recent) == [(1, "q1", 10), (2, "q2", 20), (3, "q3", 30)]
    assert st.recent.maxlen == RECENT
    assert u.check("p", e, 2, "q2") == Duplicate("q2", 20)
    assert u.check("p", e, 4, "q") is None
    with pytest.raises(ProducerFenced):
        u.check("p", e - 1, 1, "q")
    assert u.dirty == set()  # restoring is not a change to store again


def test_a_restored_table_keeps_only_the_recent_results() -> None:
    t = ProducerTable(HORIZON)
    e = t.register("p", T0)
    sent(t, "p", e, range(1, RECENT + 3))
    u = ProducerTable(HORIZON)
    state = t.drain()["p"]
    assert state is not None
    u.restore({"p": state})
    assert len(u.states["p"].recent) == RECENT
    with pytest.raises(SequenceError, match="older than"):
        u.check("p", e, 2, "q")
    assert u.check("p", e, 3, "q") == Duplicate("q", 30)


def test_drain_reports_expired_producers_as_deleted() -> None:
    t = ProducerTable(HORIZON)
    t.register("gone", T0)
    t.register("kept", T0 + 60)
    t.drain()
    assert t.expire(T0 + 120) == ["gone"]
    assert t.drain() == {"gone": None}
    assert t.drain() == {}


def test_a_producer_registered_again_after_expiry_is_stored_not_deleted() -> None:
    t = ProducerTable(HORIZON)
    t.register("p", T0)
    t.drain()
    t.expire(T0 + 2 * HORIZON)
    t.register("p", T0 + 2 * HORIZON)  # before the deletion was drained
    drained = t.drain()
    assert isinstance(drained["p"], bytes)


def test_restore_of_damaged_state_raises_storage_error_naming_the_producer() -> None:
    t = ProducerTable(HORIZON)
    with pytest.raises(StorageError, match="producer 'p'"):
        t.restore({"p": b"\xc1 not msgpack"})
    wrong_shape = msgspec.msgpack.encode({"epoch": 1})
    with pytest.raises(StorageError, match="producer 'p'"):
        t.restore({"p": wrong_shape})


# -- IdIndex --------------------------------------------------------------------------------

WINDOW = 60.0


def added(ix: IdIndex, *entries: tuple[str, int, float]) -> None:
    """Add ``entries`` and drain them: one stored set, as one commit makes."""
    for mid, off, ts in entries:
        ix.add(mid, off, ts)
    assert ix.drain() is not None


def decode_set(data: bytes) -> list[tuple[str, int]]:
    s = msgspec.msgpack.decode(data)
    return list(zip(s[0], s[1], strict=True))


def test_id_index_add_and_get() -> None:
    ix = IdIndex(WINDOW)
    assert len(ix) == 0
    assert ix.get("a") is None
    ix.add("a", 0, T0)
    ix.add("b", 1, T0 + 1)
    assert (ix.get("a"), ix.get("b"), ix.get("c")) == (0, 1, None)
    assert len(ix) == 2


def test_id_index_drain_returns_one_set_of_the_additions_once() -> None:
    ix = IdIndex(WINDOW)
    assert not ix.added
    ix.add("a", 0, T0)
    ix.add("b", 1, T0 + 1)
    assert ix.added
    first, last, ts, data = ix.drain()  # type: ignore[misc]
    assert (first, last, ts) == (0, 1, T0 + 1)  # stored at: its newest id's time
    assert decode_set(data) == [("a", 0), ("b", 1)]
    assert ix.drain() is None
    assert not ix.added
    ix.add("c", 2, T0 + 2)
    first, last, ts, data = ix.drain()  # type: ignore[misc]
    assert (first, last, ts, decode_set(data)) == (2, 2, T0 + 2, [("c", 2)])
    assert ix.get("a") == 0  # draining forgets nothing


def test_id_index_load_is_not_an_addition() -> None:
    source = IdIndex(WINDOW)
    source.add("a", 0, T0)
    row1 = source.drain()
    source.add("b", 4, T0 + 1)
    row2 = source.drain()
    assert row1 is not None
    assert row2 is not None
    ix = IdIndex(WINDOW)
    ix.load([row1, row2])
    assert (ix.get("a"), ix.get("b"), len(ix)) == (0, 4, 2)
    assert ix.drain() is None  # already stored: nothing to write back
    assert ix.expire(T0 + WINDOW + 5, low=10) == (T0 + 1, 5)  # loaded ids expire too
    assert len(ix) == 0


def test_id_index_refuses_an_unreadable_set() -> None:
    ix = IdIndex(WINDOW)
    with pytest.raises(StorageError, match="unreadable"):
        ix.load([(0, 0, T0, b"\xc1 not msgpack")])
    with pytest.raises(StorageError, match="damaged"):
        ix.load([(0, 1, T0, msgspec.msgpack.encode([["a", "b"], [0]]))])


def test_id_index_keeps_ids_within_the_window_even_when_deleted() -> None:
    ix = IdIndex(WINDOW)
    added(ix, ("a", 0, T0))
    assert ix.expire(T0 + WINDOW, low=100) is None  # stored exactly a window ago: kept
    assert ix.get("a") == 0


def test_id_index_never_expires_ids_not_yet_stored() -> None:
    ix = IdIndex(WINDOW)
    ix.add("a", 0, T0)  # not drained: its set is not in the store yet
    assert ix.expire(T0 + 10 * WINDOW, low=100) is None
    assert ix.get("a") == 0


def test_id_index_keeps_ids_of_retained_messages_past_the_window() -> None:
    ix = IdIndex(WINDOW)
    added(ix, ("a", 5, T0))
    assert ix.expire(T0 + 10 * WINDOW, low=5) is None  # offset 5 is still retained
    assert ix.get("a") == 5
    assert ix.expire(T0 + 10 * WINDOW, low=6) == (T0, 6)
    assert ix.get("a") is None
    assert len(ix) == 0


def test_id_index_forgets_a_whole_set_at_a_time() -> None:
    ix = IdIndex(WINDOW)
    added(ix, ("a", 0, T0), ("b", 1, T0 + 1))
    added(ix, ("c", 2, T0 + 2))
    added(ix, ("d", 3, T0 + 3), ("e", 4, T0 + 4))
    # the first set is old enough and deleted; the second is old enough but offset 2 is
    # still retained; so it stops there
    assert ix.expire(T0 + 4 + WINDOW + 0.5, low=2) == (T0 + 1, 2)
    assert [ix.get(m) for m in "abcde"] == [None, None, 2, 3, 4]
    assert ix.expire(T0 + 4 + WINDOW + 0.5, low=2) is None  # nothing more to forget
    # a set whose newest id is within the window is kept whole, however old the others
    assert ix.expire(T0 + 3.5 + WINDOW, low=5) == (T0 + 2, 3)
    assert [ix.get(m) for m in "cde"] == [None, 3, 4]
    assert ix.expire(T0 + 100 + WINDOW, low=5) == (T0 + 4, 5)
    assert len(ix) == 0


def test_id_index_expiry_stops_at_the_first_set_it_must_keep() -> None:
    ix = IdIndex(WINDOW)
    added(ix, ("young", 0, T0 + 50))  # offsets and times grow together in a queue
    added(ix, ("later", 1, T0 + 60))
    assert ix.expire(T0 + 50 + WINDOW, low=10) is None
    assert (ix.get("young"), ix.get("later")) == (0, 1)


def test_id_index_an_id_stored_again_after_expiry_survives_the_old_entry() -> None:
    ix = IdIndex(WINDOW)
    added(ix, ("a", 0, T0))
    assert ix.expire(T0 + WINDOW + 1, low=1) == (T0, 1)
    added(ix, ("a", 7, T0 + WINDOW + 2))
    assert ix.get("a") == 7
    assert ix.expire(T0 + WINDOW + 3, low=8) is None  # the new entry is within the window
    assert ix.get("a") == 7


def test_id_index_an_old_set_does_not_forget_a_newer_offset_of_its_id() -> None:
    ix = IdIndex(WINDOW)
    added(ix, ("a", 0, T0))
    added(ix, ("a", 3, T0 + 2 * WINDOW))  # a replayed copy, say
    assert ix.expire(T0 + WINDOW + 1, low=10) == (T0, 1)
    assert ix.get("a") == 3

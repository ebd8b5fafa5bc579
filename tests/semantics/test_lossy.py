"""Unit tests of arrival.semantics.lossy: bounded, conflating at-most-once buffers."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from arrival.model import DropPolicy
from arrival.semantics.lossy import LossyBuffer, LossyQueue

_unique = itertools.count()


def plain(capacity: int = 3, drop: DropPolicy = DropPolicy.OLDEST) -> LossyBuffer[str]:
    return LossyBuffer(capacity, drop, conflate=False)


def put_all(buf: LossyBuffer[str], *items: str) -> None:
    for item in items:
        buf.put(item, next(_unique))


# -- LossyBuffer --------------------------------------------------------------------------


def test_buffer_is_fifo() -> None:
    buf = plain(capacity=10)
    put_all(buf, "a", "b", "c")
    assert len(buf) == 3
    assert list(buf.items()) == ["a", "b", "c"]
    assert buf.take(10) == ["a", "b", "c"]
    assert buf.dropped == 0


def test_drop_oldest_keeps_the_newest_capacity_items() -> None:
    buf = plain(capacity=3, drop=DropPolicy.OLDEST)
    put_all(buf, "m1", "m2", "m3", "m4", "m5")
    assert len(buf) == 3
    assert buf.dropped == 2
    assert buf.take(10) == ["m3", "m4", "m5"]


def test_drop_newest_refuses_new_items_when_full() -> None:
    buf = plain(capacity=3, drop=DropPolicy.NEWEST)
    put_all(buf, "m1", "m2", "m3", "m4", "m5")
    assert len(buf) == 3
    assert buf.dropped == 2
    assert buf.take(10) == ["m1", "m2", "m3"]


def test_room_freed_by_take_is_reused_without_drops() -> None:
    buf = plain(capacity=2, drop=DropPolicy.NEWEST)
    put_all(buf, "a", "b")
    assert buf.take(1) == ["a"]
    put_all(buf, "c")
    assert buf.dropped == 0
    put_all(buf, "d")
    assert buf.dropped == 1
    assert buf.take(5) == ["b", "c"]


def test_take_removes_items_and_never_returns_them_twice() -> None:
    buf = plain(capacity=10)
    put_all(buf, *"abcde")
    assert buf.take(2) == ["a", "b"]
    assert buf.take(2) == ["c", "d"]
    assert buf.take(2) == ["e"]
    assert buf.take(2) == []
    assert len(buf) == 0


@pytest.mark.parametrize("limit", [0, -1])
def test_take_with_no_room_returns_nothing_and_keeps_items(limit: int) -> None:
    buf = plain(capacity=10)
    put_all(buf, "a", "b")
    assert buf.take(limit) == []
    assert len(buf) == 2


def test_conflation_replaces_in_place_and_counts() -> None:
    buf: LossyBuffer[str] = LossyBuffer(10, DropPolicy.OLDEST, conflate=True)
    buf.put("x1", "x")
    buf.put("y1", "y")
    buf.put("z1", "z")
    buf.put("x2", "x")
    buf.put("x3", "x")
    assert len(buf) == 3
    assert buf.conflated == 2
    assert buf.dropped == 0
    # x keeps its place in the queue (first), with its latest value
    assert list(buf.items()) == ["x3", "y1", "z1"]
    assert buf.take(10) == ["x3", "y1", "z1"]


def test_conflated_key_can_be_queued_again_after_take() -> None:
    buf: LossyBuffer[str] = LossyBuffer(10, DropPolicy.OLDEST, conflate=True)
    buf.put("x1", "x")
    assert buf.take(1) == ["x1"]
    buf.put("x2", "x")
    assert buf.conflated == 0
    assert buf.take(1) == ["x2"]


def test_conflation_with_full_buffer_and_drop_oldest() -> None:
    buf: LossyBuffer[str] = LossyBuffer(2, DropPolicy.OLDEST, conflate=True)
    buf.put("a1", "a")
    buf.put("b1", "b")
    buf.put("b2", "b")  # conflates: no drop although full
    assert (buf.dropped, buf.conflated) == (0, 1)
    buf.put("c1", "c")  # new key on a full buffer: the oldest key goes
    assert (buf.dropped, buf.conflated) == (1, 1)
    assert buf.take(10) == ["b2", "c1"]


def test_conflation_with_full_buffer_and_drop_newest() -> None:
    buf: LossyBuffer[str] = LossyBuffer(2, DropPolicy.NEWEST, conflate=True)
    buf.put("a1", "a")
    buf.put("b1", "b")
    buf.put("c1", "c")  # refused
    buf.put("a2", "a")  # still conflates into the queued key
    assert (buf.dropped, buf.conflated) == (1, 1)
    assert buf.take(10) == ["a2", "b1"]


def test_conflating_buffer_take_is_partial_and_oldest_first() -> None:
    buf: LossyBuffer[str] = LossyBuffer(10, DropPolicy.OLDEST, conflate=True)
    for k in "abcd":
        buf.put(k + "1", k)
    assert buf.take(3) == ["a1", "b1", "c1"]
    assert buf.take(3) == ["d1"]
    assert buf.take(3) == []


# -- LossyQueue ---------------------------------------------------------------------------


def key_of(item: tuple[str, str]) -> object:
    return item[0]


def test_queue_fans_out_to_every_group() -> None:
    q: LossyQueue[str] = LossyQueue(10, DropPolicy.OLDEST, conflate=False)
    g1 = q.add_group("g1", latest=False, key_of=lambda _: object())
    g2 = q.add_group("g2", latest=False, key_of=lambda _: object())
    for i, item in enumerate(["a", "b", "c"]):
        q.put(item, i)
    assert q.sent == 3
    assert g1.take(10) == ["a", "b", "c"]
    assert g2.take(1) == ["a"]
    # a take by one group leaves the others untouched
    assert g2.take(10) == ["b", "c"]
    assert g1.take(10) == []
    assert q.groups == {"g1": g1, "g2": g2}


def test_group_added_later_starts_with_retained_messages() -> None:
    q: LossyQueue[str] = LossyQueue(3, DropPolicy.OLDEST, conflate=False)
    for i, item in enumerate(["m1", "m2", "m3", "m4"]):
        q.put(item, i)
    late = q.add_group("late", latest=False, key_of=lambda _: object())
    assert late.take(10) == ["m2", "m3", "m4"]  # the last `capacity` still retained
    q.put("m5", 5)
    assert late.take(10) == ["m5"]


def test_group_added_later_with_latest_starts_empty() -> None:
    q: LossyQueue[str] = LossyQueue(3, DropPolicy.OLDEST, conflate=False)
    q.put("m1", 1)
    q.put("m2", 2)
    late = q.add_group("late", latest=True, key_of=lambda _: object())
    assert len(late) == 0
    assert late.take(10) == []
    q.put("m3", 3)
    assert late.take(10) == ["m3"]


def test_messages_taken_by_one_group_are_still_retained_for_new_groups() -> None:
    q: LossyQueue[str] = LossyQueue(5, DropPolicy.OLDEST, conflate=False)
    g1 = q.add_group("g1", latest=False, key_of=lambda _: object())
    q.put("a", 1)
    q.put("b", 2)
    assert g1.take(10) == ["a", "b"]
    g2 = q.add_group("g2", latest=False, key_of=lambda _: object())
    assert g2.take(10) == ["a", "b"]


def test_conflating_queue_gives_late_group_the_latest_per_key() -> None:
    q: LossyQueue[tuple[str, str]] = LossyQueue(10, DropPolicy.OLDEST, conflate=True)
    for item in [("x", "1"), ("y", "1"), ("x", "2"), ("z", "1"), ("y", "2")]:
        q.put(item, item[0])
    late = q.add_group("late", latest=False, key_of=key_of)
    assert late.take(10) == [("x", "2"), ("y", "2"), ("z", "1")]
    assert late.conflated == 0


def test_dropped_counts_drops_before_any_group_exists() -> None:
    q: LossyQueue[str] = LossyQueue(2, DropPolicy.OLDEST, conflate=False)
    for i in range(5):
        q.put(f"m{i}", i)
    assert q.dropped == 3
    assert q.sent == 5


def test_dropped_sums_group_drops_without_double_counting_retained() -> None:
    q: LossyQueue[str] = LossyQueue(2, DropPolicy.OLDEST, conflate=False)
    q.put("m0", 0)
    q.put("m1", 1)
    q.put("m2", 2)  # no group yet: the retained buffer drops m0
    assert q.dropped == 1
    g1 = q.add_group("g1", latest=False, key_of=lambda _: object())
    assert list(g1.items()) == ["m1", "m2"]
    q.put("m3", 3)  # g1 full: drops m1 (retained also drops, not counted again)
    assert (g1.dropped, q.dropped) == (1, 2)
    g2 = q.add_group("g2", latest=True, key_of=lambda _: object())
    q.put("m4", 4)  # g1 drops m2; g2 has room
    assert (g1.dropped, g2.dropped, q.dropped) == (2, 0, 3)
    assert g2.take(10) == ["m4"]
    q.put("m5", 5)
    q.put("m6", 6)
    q.put("m7", 7)  # g1 drops m3, m4, m5; g2 (emptied by take) drops only m5
    assert (g1.dropped, g2.dropped, q.dropped) == (5, 1, 7)
    assert g1.take(10) == ["m6", "m7"]
    assert g2.take(10) == ["m6", "m7"]


def test_group_that_keeps_up_drops_nothing() -> None:
    q: LossyQueue[str] = LossyQueue(2, DropPolicy.NEWEST, conflate=False)
    g = q.add_group("g", latest=False, key_of=lambda _: object())
    got: list[str] = []
    for i in range(10):
        q.put(f"m{i}", i)
        got += g.take(10)
    assert got == [f"m{i}" for i in range(10)]
    assert q.dropped == 0


# -- put_many: one step for a batch, the same result as putting one by one -----------------

batches = st.lists(st.lists(st.integers(0, 6), max_size=12), min_size=1, max_size=6)


@given(
    capacity=st.integers(1, 6),
    drop=st.sampled_from(DropPolicy),
    conflate=st.booleans(),
    batches=batches,
    takes=st.lists(st.integers(0, 4), min_size=6, max_size=6),
)
@settings(max_examples=300, deadline=None)
def test_buffer_put_many_equals_put_one_by_one(
    capacity: int,
    drop: DropPolicy,
    conflate: bool,
    batches: list[list[int]],
    takes: list[int],
) -> None:
    many: LossyBuffer[tuple[int, int]] = LossyBuffer(capacity, drop, conflate)
    one: LossyBuffer[tuple[int, int]] = LossyBuffer(capacity, drop, conflate)
    seq = 0
    for batch, take in zip(batches, takes, strict=False):
        items = []
        for key in batch:  # (key, sequence number): tells apart items of one key
            items.append((key, seq))
            seq += 1
        keys: list[object] = [k for k, _ in items]
        many.put_many(items, keys)
        for item in items:
            one.put(item, item[0])
        assert list(many.items()) == list(one.items())
        assert (many.dropped, many.conflated) == (one.dropped, one.conflated)
        assert len(many) == len(one) <= capacity
        assert many.take(take) == one.take(take)


def test_buffer_put_many_without_conflation_ignores_keys() -> None:
    buf = plain(capacity=3, drop=DropPolicy.OLDEST)
    buf.put_many(["a", "b"], [])
    buf.put_many(["c", "d", "e", "f", "g"], [])
    assert buf.dropped == 4
    assert buf.take(10) == ["e", "f", "g"]
    buf.put_many([], [])
    assert len(buf) == 0


def test_buffer_put_many_drop_newest_keeps_what_fits() -> None:
    buf = plain(capacity=4, drop=DropPolicy.NEWEST)
    buf.put_many(["a"], [])
    buf.put_many(["b", "c", "d", "e", "f"], [])
    assert buf.dropped == 2
    assert buf.take(10) == ["a", "b", "c", "d"]


@given(
    capacity=st.integers(1, 5),
    drop=st.sampled_from(DropPolicy),
    conflate=st.booleans(),
    batches=batches,
    group_at=st.integers(0, 6),
    latest=st.booleans(),
)
@settings(max_examples=200, deadline=None)
def test_queue_put_many_equals_put_one_by_one(
    capacity: int,
    drop: DropPolicy,
    conflate: bool,
    batches: list[list[int]],
    group_at: int,
    latest: bool,
) -> None:
    many: LossyQueue[tuple[int, int]] = LossyQueue(capacity, drop, conflate)
    one: LossyQueue[tuple[int, int]] = LossyQueue(capacity, drop, conflate)
    many.add_group("early", latest=False, key_of=lambda item: item[0])
    one.add_group("early", latest=False, key_of=lambda item: item[0])
    seq = 0
    for n, batch in enumerate(batches):
        if n == group_at:  # a group created midway
            many.add_group("late", latest=latest, key_of=lambda item: item[0])
            one.add_group("late", latest=latest, key_of=lambda item: item[0])
        items = []
        for key in batch:
            items.append((key, seq))
            seq += 1
        many.put_many(items, [k for k, _ in items])
        for item in items:
            one.put(item, item[0])
        assert (many.sent, many.dropped) == (one.sent, one.dropped)
        assert set(many.groups) == set(one.groups)
        for name, buf in many.groups.items():
            assert list(buf.items()) == list(one.groups[name].items())
        assert list(many.retained.items()) == list(one.retained.items())

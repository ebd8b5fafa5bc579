"""The storage conformance suite: every store keeps the contract of ``storage/base.py``.

Each test runs against the reference (``MemoryStorage``) and the durable store
(``SqliteStorage``). "Reopening" a store means what a restarting process does: close
it, then ``load()`` a new instance on the same data (for memory: the same object, which
outlives its engines; for SQLite: a new ``SqliteStorage`` on the same directory).

The Hypothesis state machine at the end drives both side by side with random write
sets and asserts that what they load back agrees exactly.
"""

from __future__ import annotations

import random
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from arrival.errors import CorruptData, StorageError
from arrival.storage.base import GroupRecord, Loaded, WriteSet
from arrival.storage.memory import MemoryStorage
from arrival.storage.sqlite import SqliteStorage

AnyStore = MemoryStorage | SqliteStorage

KINDS = ["memory", "sqlite"]

# A caller may use any meta key, "format" included: the store keeps its own apart.
RESERVED_META = "format"


class Harness:
    """Opens one store's data again and again, as a restarting process would."""

    def __init__(self, kind: str, path: Path) -> None:
        self.kind = kind
        self.path = path
        self._memory = MemoryStorage()
        self._opened: list[AnyStore] = []

    def new(self) -> AnyStore:
        """A store instance on this harness's data, not yet loaded."""
        store: AnyStore = self._memory if self.kind == "memory" else SqliteStorage(self.path)
        self._opened.append(store)
        return store

    def open(self) -> tuple[AnyStore, Loaded]:
        store = self.new()
        return store, store.load()

    def reopen(self, store: AnyStore) -> tuple[AnyStore, Loaded]:
        """Close ``store`` cleanly and load a new instance on the same data."""
        store.close()
        return self.open()

    def close_all(self) -> None:
        for store in self._opened:
            store.close()


@pytest.fixture(params=KINDS)
def harness(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Harness]:
    h = Harness(request.param, tmp_path / "data")
    yield h
    h.close_all()


def caller_meta(loaded: Loaded) -> dict[str, bytes]:
    return dict(loaded.meta)


def spec(name: str) -> bytes:
    return f'{{"name": "{name}", "guarantee": "at-least-once"}}'.encode()


# -- fresh store ------------------------------------------------------------------------


def test_fresh_store_loads_no_queues(harness: Harness) -> None:
    _store, loaded = harness.open()
    assert loaded.specs == {}
    assert loaded.batches == {}
    assert loaded.groups == {}
    assert caller_meta(loaded) == {}


@pytest.mark.parametrize(
    "harness",
    [
        "memory",
        "sqlite",
    ],
    indirect=True,
)
def test_fresh_store_meta_is_empty(harness: Harness) -> None:
    _store, loaded = harness.open()
    assert loaded.meta == {}


@pytest.mark.parametrize(
    "harness",
    [
        "memory",
        "sqlite",
    ],
    indirect=True,
)
def test_every_meta_key_belongs_to_the_caller(harness: Harness) -> None:
    store, _ = harness.open()
    store.commit(WriteSet(meta={"format": b"mine", "epoch": b"3"}))
    _store, loaded = harness.reopen(store)
    assert loaded.meta == {"format": b"mine", "epoch": b"3"}


def test_second_load_of_an_open_store_is_refused(harness: Harness) -> None:
    store, _ = harness.open()
    with pytest.raises(StorageError, match="already open"):
        store.load()


# -- commit, close, load ------------------------------------------------------------------


def test_commit_survives_close_and_reopen(harness: Harness) -> None:
    store, _ = harness.open()
    store.commit(
        WriteSet(
            meta={"epoch": b"1", "low:orders": b"0"},
            specs={"orders": spec("orders"), "audit": spec("audit")},
            # out of offset order on purpose: load() must sort by offset
            batches=[("orders", 10, 5, b"B"), ("orders", 0, 10, b"A"), ("audit", 0, 1, b"x")],
            groups=[
                GroupRecord("orders", "billing", 0, True, b"snap0"),
                GroupRecord("orders", "billing", 1, False, b"d1"),
                GroupRecord("orders", "ship", 0, True, b"s0"),
            ],
        )
    )
    store.commit(
        WriteSet(
            meta={"epoch": b"2"},
            batches=[("orders", 20, 1, b"D"), ("orders", 15, 5, b"C")],
            groups=[GroupRecord("orders", "billing", 2, False, b"d2")],
        )
    )
    _store, loaded = harness.reopen(store)
    assert caller_meta(loaded) == {"epoch": b"2", "low:orders": b"0"}
    assert loaded.specs == {"orders": spec("orders"), "audit": spec("audit")}
    assert loaded.batches == {
        "orders": [(0, 10), (10, 5), (15, 5), (20, 1)],
        "audit": [(0, 1)],
    }
    assert loaded.groups == {
        ("orders", "billing"): [(0, True, b"snap0"), (1, False, b"d1"), (2, False, b"d2")],
        ("orders", "ship"): [(0, True, b"s0")],
    }


def test_loaded_values_are_plain_bytes(harness: Harness) -> None:
    store, _ = harness.open()
    store.commit(
        WriteSet(
            meta={"m": b"v"},
            specs={"q": spec("q")},
            groups=[GroupRecord("q", "g", 0, True, b"s")],
        )
    )
    _store, loaded = harness.reopen(store)
    values = [loaded.meta["m"], loaded.specs["q"], loaded.groups["q", "g"][0][2]]
    assert [type(v) for v in values] == [bytes, bytes, bytes]
    assert type(loaded.groups["q", "g"][0][1]) is bool


def test_group_records_load_in_seq_order(harness: Harness) -> None:
    store, _ = harness.open()
    store.commit(WriteSet(groups=[GroupRecord("q", "g", 0, True, b"s0")]))
    for seq in range(1, 12):
        store.commit(WriteSet(groups=[GroupRecord("q", "g", seq, False, b"d%d" % seq)]))
    _store, loaded = harness.reopen(store)
    assert loaded.groups["q", "g"] == [(0, True, b"s0")] + [
        (seq, False, b"d%d" % seq) for seq in range(1, 12)
    ]


def test_later_meta_and_spec_values_replace_earlier_ones(harness: Harness) -> None:
    store, _ = harness.open()
    store.commit(WriteSet(meta={"epoch": b"1"}, specs={"q": b"v1"}))
    store.commit(WriteSet(meta={"epoch": b"2"}, specs={"q": b"v2"}))
    _store, loaded = harness.reopen(store)
    assert caller_meta(loaded) == {"epoch": b"2"}
    assert loaded.specs == {"q": b"v2"}


# -- read -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"\x00",
        bytes(range(256)),
        b"\x00\xff" * 5000,
        random.Random(7).randbytes(1 << 20),
    ],
    ids=["empty", "nul", "all-bytes", "binary-10k", "random-1MiB"],
)
def test_read_returns_exactly_the_bytes_committed(harness: Harness, data: bytes) -> None:
    store, _ = harness.open()
    store.commit(WriteSet(batches=[("q", 0, 1, b"before"), ("q", 1, 3, data)]))
    assert store.read("q", 1) == data
    store, _ = harness.reopen(store)
    got = store.read("q", 1)
    assert type(got) is bytes
    assert got == data
    assert store.read("q", 0) == b"before"


def test_read_sees_commits_made_after_open(harness: Harness) -> None:
    store, _ = harness.open()
    for first in range(0, 50, 5):
        store.commit(WriteSet(batches=[("q", first, 5, b"batch %d" % first)]))
        assert store.read("q", first) == b"batch %d" % first


def test_read_of_a_missing_batch_raises_storage_error(harness: Harness) -> None:
    store, _ = harness.open()
    store.commit(WriteSet(batches=[("q", 0, 3, b"abc")]))
    cases = [("q", 1), ("q", 3), ("q", -1), ("other", 0)]  # inside a batch, past it, no queue
    for queue, first in cases:
        with pytest.raises(StorageError) as exc:
            store.read(queue, first)
        assert not isinstance(exc.value, CorruptData), (queue, first)
        assert str(first) in str(exc.value)
        assert repr(queue) in str(exc.value)


# -- snapshots, drops, trims --------------------------------------------------------------


def test_snapshot_replaces_every_earlier_record_of_its_group(harness: Harness) -> None:
    store, _ = harness.open()
    store.commit(
        WriteSet(
            groups=[
                GroupRecord("q", "g", 0, True, b"s0"),
                GroupRecord("q", "g", 1, False, b"d1"),
                GroupRecord("q", "h", 0, True, b"other group"),
                GroupRecord("r", "g", 0, True, b"same group, other queue"),
            ]
        )
    )
    store.commit(WriteSet(groups=[GroupRecord("q", "g", 2, False, b"d2")]))
    store.commit(WriteSet(groups=[GroupRecord("q", "g", 3, True, b"s3")]))
    store, loaded = harness.reopen(store)
    assert loaded.groups == {
        ("q", "g"): [(3, True, b"s3")],
        ("q", "h"): [(0, True, b"other group")],
        ("r", "g"): [(0, True, b"same group, other queue")],
    }
    # within one write set: records before the snapshot go, records after it stay
    store.commit(
        WriteSet(
            groups=[
                GroupRecord("q", "g", 4, False, b"d4"),
                GroupRecord("q", "g", 5, True, b"s5"),
                GroupRecord("q", "g", 6, False, b"d6"),
            ]
        )
    )
    _store, loaded = harness.reopen(store)
    assert loaded.groups["q", "g"] == [(5, True, b"s5"), (6, False, b"d6")]
    assert loaded.groups["q", "h"] == [(0, True, b"other group")]


def test_spec_none_drops_the_queue_with_its_batches_and_groups(harness: Harness) -> None:
    store, _ = harness.open()
    store.commit(
        WriteSet(
            specs={"gone": spec("gone"), "kept": spec("kept")},
            batches=[("gone", 0, 2, b"g0"), ("gone", 2, 1, b"g2"), ("kept", 0, 1, b"k0")],
            groups=[
                GroupRecord("gone", "a", 0, True, b"ga"),
                GroupRecord("gone", "b", 0, True, b"gb"),
                GroupRecord("kept", "a", 0, True, b"ka"),
            ],
        )
    )
    store.commit(WriteSet(specs={"gone": None}))
    with pytest.raises(StorageError):
        store.read("gone", 0)
    store, loaded = harness.reopen(store)
    assert loaded.specs == {"kept": spec("kept")}
    assert loaded.batches == {"kept": [(0, 1)]}
    assert loaded.groups == {("kept", "a"): [(0, True, b"ka")]}
    with pytest.raises(StorageError):
        store.read("gone", 2)
    assert store.read("kept", 0) == b"k0"
    # a queue of the same name created again starts empty
    store.commit(WriteSet(specs={"gone": b"new"}, batches=[("gone", 0, 1, b"fresh")]))
    store, loaded = harness.reopen(store)
    assert loaded.specs["gone"] == b"new"
    assert loaded.batches["gone"] == [(0, 1)]
    assert store.read("gone", 0) == b"fresh"
    assert ("gone", "a") not in loaded.groups


def test_dropping_an_unknown_queue_is_harmless(harness: Harness) -> None:
    store, _ = harness.open()
    store.commit(WriteSet(specs={"q": spec("q")}, batches=[("q", 0, 1, b"x")]))
    store.commit(WriteSet(specs={"never-existed": None}))
    _store, loaded = harness.reopen(store)
    assert loaded.specs == {"q": spec("q")}
    assert loaded.batches == {"q": [(0, 1)]}


def test_trims_delete_exactly_the_batches_ending_at_or_below_the_offset(
    harness: Harness,
) -> None:
    store, _ = harness.open()
    layout = [(0, 3), (3, 2), (5, 5), (10, 1)]  # ends: 3, 5, 10, 11
    store.commit(
        WriteSet(
            batches=[("q", f, n, b"q%d" % f) for f, n in layout]
            + [("r", f, n, b"r%d" % f) for f, n in layout]
        )
    )
    store.commit(WriteSet(trims={"q": 5}))  # ends 3 and 5 are <= 5
    assert store.read("q", 5) == b"q5"
    with pytest.raises(StorageError):
        store.read("q", 3)
    store, loaded = harness.reopen(store)
    assert loaded.batches == {"q": [(5, 5), (10, 1)], "r": layout}
    store.commit(WriteSet(trims={"q": 9}))  # inside (5, 5): that batch stays whole
    store, loaded = harness.reopen(store)
    assert loaded.batches["q"] == [(5, 5), (10, 1)]
    assert store.read("q", 5) == b"q5"
    store.commit(WriteSet(trims={"q": 10, "nothing-here": 100}))
    store, loaded = harness.reopen(store)
    assert loaded.batches["q"] == [(10, 1)]
    assert loaded.batches["r"] == layout
    assert [store.read("r", f) for f, _ in layout] == [b"r0", b"r3", b"r5", b"r10"]


@pytest.mark.parametrize(
    "harness",
    [
        "memory",
        "sqlite",
    ],
    indirect=True,
)
def test_trimming_every_batch_leaves_no_batch_entry(harness: Harness) -> None:
    store, _ = harness.open()
    store.commit(WriteSet(specs={"q": spec("q")}, batches=[("q", 0, 2, b"ab")]))
    store.commit(WriteSet(trims={"q": 2}))
    _store, loaded = harness.reopen(store)
    assert loaded.specs == {"q": spec("q")}
    assert loaded.batches == {}


# -- durability flags -------------------------------------------------------------------


def test_unsynced_commits_are_visible_after_a_clean_reopen(harness: Harness) -> None:
    store, _ = harness.open()
    store.commit(WriteSet(specs={"q": spec("q")}, batches=[("q", 0, 1, b"synced")]))
    store.commit(
        WriteSet(
            meta={"lazy": b"yes"},
            batches=[("q", 1, 2, b"lazy")],
            groups=[GroupRecord("q", "g", 0, True, b"lazy group")],
            sync=False,
        )
    )
    store, loaded = harness.reopen(store)
    assert caller_meta(loaded) == {"lazy": b"yes"}
    assert loaded.batches == {"q": [(0, 1), (1, 2)]}
    assert loaded.groups == {("q", "g"): [(0, True, b"lazy group")]}
    assert store.read("q", 1) == b"lazy"


def test_sync_commits_count_fsyncs_and_unsynced_ones_do_not(harness: Harness) -> None:
    store, _ = harness.open()
    base_syncs, base_commits = store.syncs, store.commits
    store.commit(WriteSet(meta={"a": b"1"}, sync=True))
    assert (store.syncs - base_syncs, store.commits - base_commits) == (1, 1)
    store.commit(WriteSet(meta={"a": b"2"}, sync=False))
    store.commit(WriteSet(meta={"a": b"3"}, sync=False))
    assert (store.syncs - base_syncs, store.commits - base_commits) == (1, 3)
    store.commit(WriteSet(meta={"a": b"4"}))  # sync defaults to True
    assert (store.syncs - base_syncs, store.commits - base_commits) == (2, 4)


def test_many_commits_in_sequence(harness: Harness) -> None:
    store, _ = harness.open()
    store.commit(WriteSet(specs={"q": spec("q")}, groups=[GroupRecord("q", "g", 0, True, b"s")]))
    n = 400
    for i in range(n):
        store.commit(
            WriteSet(
                meta={"epoch": str(i).encode()},
                batches=[("q", 2 * i, 2, b"batch-%d" % i)],
                groups=[GroupRecord("q", "g", i + 1, False, b"d%d" % i)],
                sync=i % 50 == 0,
            )
        )
    store, loaded = harness.reopen(store)
    assert caller_meta(loaded) == {"epoch": str(n - 1).encode()}
    assert loaded.batches == {"q": [(2 * i, 2) for i in range(n)]}
    recs = loaded.groups["q", "g"]
    assert recs[0] == (0, True, b"s")
    assert recs[1:] == [(i + 1, False, b"d%d" % i) for i in range(n)]
    assert [store.read("q", 2 * i) for i in range(n)] == [b"batch-%d" % i for i in range(n)]


def test_an_empty_write_set_changes_nothing(harness: Harness) -> None:
    assert not WriteSet()
    store, _ = harness.open()
    store.commit(WriteSet(specs={"q": b"s"}, batches=[("q", 0, 1, b"x")]))
    store.commit(WriteSet())
    _store, loaded = harness.reopen(store)
    assert loaded.specs == {"q": b"s"}
    assert loaded.batches == {"q": [(0, 1)]}


@pytest.mark.parametrize(
    "harness",
    [
        "memory",
        "sqlite",
    ],
    indirect=True,
)
def test_a_closed_store_refuses_commit_and_read(harness: Harness) -> None:
    store, _ = harness.open()
    store.commit(WriteSet(batches=[("q", 0, 1, b"x")]))
    store.close()
    with pytest.raises(StorageError, match="closed"):
        store.commit(WriteSet(batches=[("q", 1, 1, b"late")]))
    with pytest.raises(StorageError, match="closed"):
        store.read("q", 0)


# -- memory checksums ---------------------------------------------------------------------


def test_memory_read_of_a_corrupted_batch_raises_corrupt_data() -> None:
    store = MemoryStorage()
    store.load()
    try:
        store.commit(WriteSet(batches=[("q", 0, 1, b"good"), ("q", 1, 1, b"bad")]))
        store.corrupt("q", 1)
        with pytest.raises(CorruptData, match=r"offset 1 of queue 'q'.*checksum"):
            store.read("q", 1)
        assert store.read("q", 0) == b"good"
        with pytest.raises(CorruptData):  # the damage stays: never a silent success later
            store.read("q", 1)
    finally:
        store.close()


# -- the two stores side by side ------------------------------------------------------------

QUEUES = ["a", "b", "c"]
GROUPS = ["g", "h"]
META_KEYS = ["epoch", "low:a", "x"]


class StoresAgree(RuleBasedStateMachine):
    """Random write sets applied to the reference and the durable store; every step
    reopens both and checks that they load the same state and read the same bytes.

    Firsts and seqs are never reused (the engine never reuses them; re-storing a key is
    outside the contract), but a write set lists its batches in random offset order.
    """

    def __init__(self) -> None:
        super().__init__()
        self.dir = Path(tempfile.mkdtemp(prefix="arrival-conformance-"))
        self.memory = MemoryStorage()
        self.memory.load()
        self.sqlite = SqliteStorage(self.dir / "data")
        self.sqlite.load()
        self.next_first = dict.fromkeys(QUEUES, 0)
        self.next_seq = {(q, g): 0 for q in QUEUES for g in GROUPS}
        self.steps = 0

    def teardown(self) -> None:
        self.memory.close()
        self.sqlite.close()
        shutil.rmtree(self.dir, ignore_errors=True)

    @rule(data=st.data())
    def commit(self, data: st.DataObject) -> None:
        ws = WriteSet(sync=data.draw(st.booleans(), "sync"))
        ws.meta = data.draw(
            st.dictionaries(st.sampled_from(META_KEYS), st.binary(max_size=8), max_size=2), "meta"
        )
        ws.specs = data.draw(
            st.dictionaries(
                st.sampled_from(QUEUES), st.none() | st.binary(min_size=1, max_size=8), max_size=2
            ),
            "specs",
        )
        batches = []
        for _ in range(data.draw(st.integers(0, 4), "n batches")):
            q = data.draw(st.sampled_from(QUEUES), "queue")
            first = self.next_first[q] + data.draw(st.integers(0, 2), "gap")
            count = data.draw(st.integers(1, 4), "count")
            self.next_first[q] = first + count
            batches.append((q, first, count, data.draw(st.binary(max_size=16), "data")))
        ws.batches = data.draw(st.permutations(batches), "batch order")
        for _ in range(data.draw(st.integers(0, 3), "n groups")):
            key = (data.draw(st.sampled_from(QUEUES)), data.draw(st.sampled_from(GROUPS)))
            seq = self.next_seq[key]
            self.next_seq[key] = seq + 1
            snapshot = data.draw(st.booleans(), "snapshot")
            ws.groups.append(GroupRecord(*key, seq, snapshot, data.draw(st.binary(max_size=8))))
        ws.trims = data.draw(
            st.dictionaries(st.sampled_from(QUEUES), st.integers(0, 40), max_size=2), "trims"
        )
        self.memory.commit(ws)
        self.sqlite.commit(ws)

    @invariant()
    def load_and_read_agree(self) -> None:
        self.memory.close()
        self.sqlite.close()
        mem = self.memory.load()
        self.sqlite = SqliteStorage(self.dir / "data")
        sql = self.sqlite.load()
        assert self.sqlite.commits == 0  # a new instance: proves we compare reopened state
        assert sql.meta == mem.meta
        assert sql.specs == mem.specs
        assert sql.batches == mem.batches
        assert sql.groups == mem.groups
        for q, index in sql.batches.items():
            assert index == sorted(index)
            for first, _count in index:
                assert self.sqlite.read(q, first) == self.memory.read(q, first)


TestStoresAgree = StoresAgree.TestCase
TestStoresAgree.settings = settings(
    max_examples=40,
    stateful_step_count=12,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)


# -- dedup state: producer states and message ids ------------------------------------------


def test_a_write_set_of_dedup_state_alone_is_not_empty() -> None:
    # the engine skips empty write sets: dedup-only changes must still be committed
    assert WriteSet(producers={"p": None})
    assert WriteSet(ids=[("q", 0, 0, 1.0, b"set")])
    assert WriteSet(id_trims={"q": (1.0, 1)})


def test_fresh_store_loads_no_dedup_state(harness: Harness) -> None:
    _store, loaded = harness.open()
    assert loaded.producers == {}
    assert loaded.ids == {}


def test_producer_states_survive_reopen_and_none_deletes_them(harness: Harness) -> None:
    store, _ = harness.open()
    store.commit(WriteSet(producers={"p1": b"s1", "p2": b"s2", "p3": b"\x00\xff"}))
    store.commit(WriteSet(producers={"p1": None, "p2": b"s2 v2", "never-stored": None}))
    store, loaded = harness.reopen(store)
    assert loaded.producers == {"p2": b"s2 v2", "p3": b"\x00\xff"}
    assert [type(v) for v in loaded.producers.values()] == [bytes, bytes]
    store.commit(WriteSet(producers={"p1": b"back"}, sync=False))
    _store, loaded = harness.reopen(store)
    assert loaded.producers == {"p1": b"back", "p2": b"s2 v2", "p3": b"\x00\xff"}


def test_id_sets_load_per_queue_ordered_by_time_then_offset(harness: Harness) -> None:
    store, _ = harness.open()
    store.commit(
        WriteSet(
            ids=[
                ("q", 2, 3, 10.5, b"b"),
                ("q", 0, 1, 10.0, b"a"),
                ("r", 0, 9, 3.25, b"r"),
                ("q", 8, 8, 20.0, b"y"),
                ("q", 5, 7, 20.0, b"x"),  # same time: the lower offset first
            ]
        )
    )
    store.commit(WriteSet(ids=[("q", 4, 4, 11.0, b"\x00" * 1000)]))
    _store, loaded = harness.reopen(store)
    assert loaded.ids == {
        "q": [
            (0, 1, 10.0, b"a"),
            (2, 3, 10.5, b"b"),
            (4, 4, 11.0, b"\x00" * 1000),
            (5, 7, 20.0, b"x"),
            (8, 8, 20.0, b"y"),
        ],
        "r": [(0, 9, 3.25, b"r")],
    }
    first, last, ts, data = loaded.ids["q"][0]
    assert (type(first), type(last), type(ts), type(data)) == (int, int, float, bytes)


def test_id_set_timestamps_round_trip_exactly(harness: Harness) -> None:
    stamps = [1_700_000_000.0, 1_700_000_000.123456789, 0.1 + 0.2, 5e-324, 2.0**52 + 0.5]
    store, _ = harness.open()
    store.commit(WriteSet(ids=[("q", i, i, ts, b"s") for i, ts in enumerate(stamps)]))
    _store, loaded = harness.reopen(store)
    assert sorted(ts for _f, _l, ts, _d in loaded.ids["q"]) == sorted(stamps)


def test_a_set_stored_again_at_its_first_offset_replaces_the_earlier_one(
    harness: Harness,
) -> None:
    store, _ = harness.open()
    store.commit(WriteSet(ids=[("q", 0, 2, 1.0, b"old"), ("r", 0, 2, 1.0, b"r")]))
    store.commit(WriteSet(ids=[("q", 0, 5, 50.0, b"new")]))
    _store, loaded = harness.reopen(store)
    assert loaded.ids == {"q": [(0, 5, 50.0, b"new")], "r": [(0, 2, 1.0, b"r")]}


def test_id_trims_forget_sets_at_or_before_a_time_and_wholly_below_an_offset(
    harness: Harness,
) -> None:
    store, _ = harness.open()
    rows = [(0, 1, 1.0, b"a"), (2, 3, 2.0, b"b"), (4, 5, 3.0, b"c"), (6, 7, 4.0, b"d")]
    store.commit(WriteSet(ids=[("q", *r) for r in rows] + [("r", *r) for r in rows]))
    store.commit(WriteSet(id_trims={"q": (2.0, 4)}))  # the time bound is inclusive
    store, loaded = harness.reopen(store)
    assert loaded.ids["q"] == rows[2:]
    store.commit(WriteSet(id_trims={"q": (4.0, 7)}))  # set (6, 7) reaches offset 7: kept
    store, loaded = harness.reopen(store)
    assert loaded.ids["q"] == [rows[3]]
    store.commit(WriteSet(id_trims={"q": (3.5, 100), "nothing-here": (100.0, 100)}))
    store, loaded = harness.reopen(store)
    assert loaded.ids["q"] == [rows[3]]  # stored after the time bound: kept
    assert loaded.ids["r"] == rows  # other queues untouched
    store.commit(WriteSet(id_trims={"q": (4.0, 8)}))
    _store, loaded = harness.reopen(store)
    assert "q" not in loaded.ids  # no empty entry for a queue without ids


def test_ids_added_and_trimmed_in_one_write_set(harness: Harness) -> None:
    store, _ = harness.open()
    store.commit(WriteSet(ids=[("q", 0, 0, 1.0, b"old")]))
    # the engine stores a commit's new ids and its trim of expired ones together
    store.commit(WriteSet(ids=[("q", 5, 5, 100.0, b"new")], id_trims={"q": (1.0, 1)}))
    _store, loaded = harness.reopen(store)
    assert loaded.ids == {"q": [(5, 5, 100.0, b"new")]}


def test_dropping_a_queue_drops_its_ids_but_keeps_producers(harness: Harness) -> None:
    store, _ = harness.open()
    store.commit(
        WriteSet(
            specs={"q": spec("q"), "r": spec("r")},
            ids=[("q", 0, 0, 1.0, b"a"), ("r", 0, 0, 1.0, b"b")],
            producers={"p": b"state"},
        )
    )
    store.commit(WriteSet(specs={"q": None}))
    store, loaded = harness.reopen(store)
    assert loaded.ids == {"r": [(0, 0, 1.0, b"b")]}
    assert loaded.producers == {"p": b"state"}
    store.commit(WriteSet(specs={"q": spec("q")}))  # created again: no ids of the old one
    _store, loaded = harness.reopen(store)
    assert "q" not in loaded.ids


@pytest.mark.parametrize("harness", ["sqlite"], indirect=True)
def test_a_failed_commit_stores_no_dedup_state(harness: Harness) -> None:
    store, _ = harness.open()
    store.commit(
        WriteSet(batches=[("q", 0, 1, b"x")], producers={"p": b"v1"}, ids=[("q", 0, 0, 1.0, b"a")])
    )
    with pytest.raises(StorageError):
        store.commit(  # (q, 0) is stored already: the whole write set is refused
            WriteSet(
                batches=[("q", 0, 1, b"again")],
                producers={"p": b"v2", "new": b"n"},
                ids=[("q", 1, 1, 2.0, b"b")],
                id_trims={"q": (5.0, 5)},
            )
        )
    _store, loaded = harness.reopen(store)
    assert loaded.producers == {"p": b"v1"}
    assert loaded.ids == {"q": [(0, 0, 1.0, b"a")]}


PRODUCERS = ["p", "q", "r"]


class DedupStoresAgree(RuleBasedStateMachine):
    """Random producer states, ids, id trims and queue drops applied to both stores; after
    every step both are reopened and must load the same dedup state."""

    def __init__(self) -> None:
        super().__init__()
        self.dir = Path(tempfile.mkdtemp(prefix="arrival-dedup-conformance-"))
        self.memory = MemoryStorage()
        self.memory.load()
        self.sqlite = SqliteStorage(self.dir / "data")
        self.sqlite.load()
        self.next_off = dict.fromkeys(QUEUES, 0)
        self.now = 0.0

    def teardown(self) -> None:
        self.memory.close()
        self.sqlite.close()
        shutil.rmtree(self.dir, ignore_errors=True)

    @rule(data=st.data())
    def commit(self, data: st.DataObject) -> None:
        ws = WriteSet(sync=data.draw(st.booleans(), "sync"))
        ws.producers = data.draw(
            st.dictionaries(
                st.sampled_from(PRODUCERS), st.none() | st.binary(max_size=12), max_size=3
            ),
            "producers",
        )
        for _ in range(data.draw(st.integers(0, 3), "n id sets")):
            q = data.draw(st.sampled_from(QUEUES), "queue")
            n = data.draw(st.integers(1, 4), "ids in the set")
            self.now += data.draw(st.floats(0, 5, allow_nan=False), "dt")
            blob = data.draw(st.binary(max_size=12), "set")
            first = self.next_off[q]
            ws.ids.append((q, first, first + n - 1, self.now, blob))
            self.next_off[q] += n
        ws.id_trims = data.draw(
            st.dictionaries(
                st.sampled_from(QUEUES),
                st.tuples(st.floats(0, self.now + 1, allow_nan=False), st.integers(0, 20)),
                max_size=2,
            ),
            "id trims",
        )
        if data.draw(st.booleans(), "drop a queue"):
            ws.specs = {data.draw(st.sampled_from(QUEUES), "dropped"): None}
        self.memory.commit(ws)
        self.sqlite.commit(ws)

    @invariant()
    def dedup_state_agrees(self) -> None:
        self.memory.close()
        self.sqlite.close()
        mem = self.memory.load()
        self.sqlite = SqliteStorage(self.dir / "data")
        sql = self.sqlite.load()
        assert sql.producers == mem.producers
        assert sql.ids == mem.ids


TestDedupStoresAgree = DedupStoresAgree.TestCase
TestDedupStoresAgree.settings = settings(
    max_examples=25,
    stateful_step_count=10,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)

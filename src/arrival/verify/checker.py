"""The offline checker: a history in, anomaly counts and a verdict per guarantee out.

Each anomaly is a pure function of the history; ``RULES`` says, per guarantee, which are
forbidden (one occurrence fails the run) and which are allowed but counted. The
definitions follow the verification design (docs/reliability.md):

- lost: acknowledged, never delivered to a group by the end of the final drain.
- observed-then-lost: delivered to a group, its ack never took effect (or may not
  have), and missing from that group's final drain; or acknowledged, delivered, and
  missing from the audit.
- phantom: delivered but never sent; corrupt: a body that does not match its id.
- aborted-read: delivered although every send of it definitely failed, or it is an
  output only of transactions that definitely failed.
- dirty-read: a transaction's output delivered before its commit was even invoked.
- torn-transaction: some but not all of a transaction's outputs visible; or its acks
  in effect without its outputs: an input that was consumed in a transaction that may
  have committed, never delivered again nor left for the final drain, and none of whose
  outputs is visible anywhere.
- duplicate-in-storage: one id stored twice in a queue (the audit).
- duplicate-delivery: one id delivered twice to one group, and nothing explains it: the
  earlier delivery's ack had committed (exactly-once: after any committed ack), with no
  fault in between. ``duplicate-delivery-explained``: a nack, a lease that ran out (no
  ack), an ack that failed or may not have taken effect, or a fault in between.
- duplicate-effect: two effects (inbox rows) for one input, one message acked
  successfully by two of its deliveries, or one input acked by two committed
  transactions.
- reorder: within a key and a producer, first deliveries out of send order.
- zombie-write: a send or commit accepted from an epoch fenced before it began.
- liveness: the run did not settle within its heal deadline (added by the runner).
- silent-corruption: a damaged copy of the data directory opened and read without an
  error, but not as the audit found it (added by the runner).
"""

from __future__ import annotations

import itertools
from collections import Counter, defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field

from arrival.verify.history import Ack, Audit, Deliver, Effect, Event, Fault, Register, Send, Txn

__all__ = ["ANOMALIES", "RULES", "Report", "check"]

ANOMALIES = (
    "lost",
    "observed-then-lost",
    "phantom",
    "corrupt",
    "aborted-read",
    "dirty-read",
    "torn-transaction",
    "duplicate-in-storage",
    "duplicate-delivery",
    "duplicate-delivery-explained",
    "duplicate-effect",
    "reorder",
    "zombie-write",
    "liveness",
    "silent-corruption",
)

F, C = "forbidden", "counted"
RULES: dict[str, dict[str, str]] = {
    "at-most-once": {
        "liveness": F,
        "lost": C,
        "phantom": F,
        "corrupt": F,
        "aborted-read": F,
        "duplicate-in-storage": F,
        "duplicate-delivery": F,
        "duplicate-delivery-explained": F,  # at most once: no excuse
        "reorder": F,
    },
    "at-least-once": {
        "liveness": F,
        "silent-corruption": F,
        "lost": F,
        "observed-then-lost": F,
        "phantom": F,
        "corrupt": F,
        "aborted-read": F,
        "duplicate-in-storage": C,
        "duplicate-delivery": F,
        "duplicate-delivery-explained": C,
        "duplicate-effect": C,
        "reorder": F,
    },
    "exactly-once": {
        "liveness": F,
        "silent-corruption": F,
        "lost": F,
        "observed-then-lost": F,
        "phantom": F,
        "corrupt": F,
        "aborted-read": F,
        "dirty-read": F,
        "torn-transaction": F,
        "duplicate-in-storage": F,
        "duplicate-delivery": F,
        "duplicate-delivery-explained": C,
        "duplicate-effect": F,
        "reorder": F,
        "zombie-write": F,
    },
}
"""Per guarantee: each anomaly it judges, forbidden or counted. Anomalies a guarantee
does not judge (a dirty read on at-least-once) are still counted in the report."""

_EXAMPLES = 5


@dataclass
class Report:
    guarantee: str
    counts: dict[str, int] = field(default_factory=dict)
    examples: dict[str, list[object]] = field(default_factory=dict)
    faults: dict[str, int] = field(default_factory=dict)
    sends: dict[str, int] = field(default_factory=dict)  # by outcome

    @property
    def forbidden(self) -> dict[str, int]:
        rules = RULES[self.guarantee]
        return {a: n for a, n in self.counts.items() if n and rules.get(a) == F}

    @property
    def ok(self) -> bool:
        return not self.forbidden

    def add(self, anomaly: str, found: Iterable[object]) -> None:
        items = list(found)
        self.counts[anomaly] = self.counts.get(anomaly, 0) + len(items)
        if items:
            self.examples.setdefault(anomaly, []).extend(items[:_EXAMPLES])


def _producer_and_counter(mid: str) -> tuple[str, int] | None:
    producer, sep, counter = mid.rpartition("-")
    if not sep or not counter.isdigit():
        return None
    return producer, int(counter)


def check(events: Iterable[Event], guarantee: str) -> Report:
    """Count every anomaly of the history and judge it by ``guarantee``'s rules."""
    if guarantee not in RULES:
        raise ValueError(f"unknown guarantee {guarantee!r}")
    sends: list[Send] = []
    registers: list[Register] = []
    delivers: list[Deliver] = []
    acks: list[Ack] = []
    txns: list[Txn] = []
    effects: list[Effect] = []
    faults: list[Fault] = []
    stored: list[tuple[str, str]] | None = None
    covered: set[str] = set()  # the queues the audit covers
    for e in events:
        if isinstance(e, Send):
            sends.append(e)
        elif isinstance(e, Deliver):
            delivers.append(e)
        elif isinstance(e, Ack):
            acks.append(e)
        elif isinstance(e, Txn):
            txns.append(e)
        elif isinstance(e, Effect):
            effects.append(e)
        elif isinstance(e, Fault):
            faults.append(e)
        elif isinstance(e, Register):
            registers.append(e)
        elif isinstance(e, Audit):
            stored = (stored or []) + [tuple(s) for s in e.stored]  # type: ignore[misc]
            covered.update(e.queues)
    report = Report(guarantee)
    report.faults = dict(Counter(f.kind for f in faults))
    report.sends = dict(Counter(s.outcome for s in sends))
    delivers.sort(key=lambda d: d.time)
    fault_times = sorted(f.time for f in faults)

    # what was sent, and how it ended: by (queue, id)
    outcomes: dict[tuple[str, str], set[str]] = defaultdict(set)
    for s in sends:
        outcomes[(s.queue, s.id)].add(s.outcome)
    txn_outputs: dict[tuple[str, str], list[Txn]] = defaultdict(list)
    for t in txns:
        for q, mid in t.outputs:
            outcomes[(q, mid)].add(t.outcome)
            txn_outputs[(q, mid)].append(t)
    acknowledged = {k for k, o in outcomes.items() if "ok" in o}

    by_group: dict[tuple[str, str], set[str]] = defaultdict(set)  # (queue, group) -> ids
    drained: dict[tuple[str, str], set[str]] = defaultdict(set)
    for d in delivers:
        by_group[(d.queue, d.group)].add(d.id)
        if d.session == "drain":
            drained[(d.queue, d.group)].add(d.id)

    # lost: acknowledged, never delivered to a group of its queue
    lost = []
    for (q, g), seen in sorted(by_group.items()):
        lost += [(q, g, mid) for (sq, mid) in sorted(acknowledged) if sq == q and mid not in seen]
    report.add("lost", lost)

    # observed-then-lost: seen by a group, ack not (surely) in effect, not in its drain
    settled: set[tuple[str, str, str]] = set()  # (queue, group, id) whose ack may be in effect
    committed_at: dict[tuple[str, str, str], float] = {}  # ... surely in effect, from when
    for a in acks:
        if a.kind == "ack" and a.outcome in ("ok", "info"):
            settled.add((a.queue, a.group, a.id))
        if a.kind == "ack" and a.outcome == "ok":
            key = (a.queue, a.group, a.id)
            committed_at[key] = min(committed_at.get(key, a.end), a.end)
    for t in txns:
        if t.outcome in ("ok", "info"):
            settled.update(t.inputs)
        if t.outcome == "ok":
            for q, g, mid in t.inputs:
                key = (q, g, mid)
                committed_at[key] = min(committed_at.get(key, t.end), t.end)
    observed_then_lost = [
        (q, g, mid)
        for (q, g), seen in sorted(by_group.items())
        if (q, g) in drained
        for mid in sorted(seen)
        if (q, g, mid) not in settled and mid not in drained[(q, g)]
    ]
    # ... or acknowledged, delivered, and then missing from the audit (which lists every
    # message of the queues it covers: the runs keep what they store)
    if stored is not None:
        audited = covered | {q for q, _ in stored}
        kept = set(stored)
        delivered = {(d.queue, d.id) for d in delivers}
        observed_then_lost += [
            (q, "audit", mid)
            for q, mid in sorted(acknowledged)
            if q in audited and (q, mid) not in kept and (q, mid) in delivered
        ]
    report.add("observed-then-lost", observed_then_lost)

    # phantom, corrupt, aborted and dirty reads
    report.add("phantom", sorted({(d.queue, d.id) for d in delivers} - set(outcomes)))
    report.add("corrupt", [(d.queue, d.group, d.id) for d in delivers if not d.intact])
    report.add(
        "aborted-read",
        sorted({(d.queue, d.id) for d in delivers if outcomes.get((d.queue, d.id)) == {"fail"}}),
    )
    first_sent: dict[tuple[str, str], float] = {}
    for s in sends:
        qid = (s.queue, s.id)
        first_sent[qid] = min(first_sent.get(qid, s.time), s.time)
    dirty = []
    for d in delivers:
        ts = txn_outputs.get((d.queue, d.id))
        if not ts or first_sent.get((d.queue, d.id), d.time + 1) <= d.time:
            continue  # not a transaction's output, or also sent on its own before
        if all(d.time < t.time for t in ts):
            dirty.append((d.queue, d.group, d.id))
    report.add("dirty-read", dirty)

    # torn transactions: some, not all, of its outputs visible
    visible = {(d.queue, d.id) for d in delivers} | set(stored or [])
    torn: list[object] = []
    for t in txns:
        shown = [o for o in t.outputs if tuple(o) in visible]
        if 0 < len(shown) < len(t.outputs):
            torn.append((t.tid, len(shown), len(t.outputs)))
    # ... or its acks without its outputs
    outputs_of: dict[tuple[str, str, str], set[tuple[str, str]]] = defaultdict(set)
    consumed_at: dict[tuple[str, str, str], float] = {}
    for t in txns:
        for i in t.inputs:
            key = (i[0], i[1], i[2])
            outputs_of[key].update((q, mid) for q, mid in t.outputs)
            if t.outcome in ("ok", "info") and t.outputs:
                consumed_at[key] = max(consumed_at.get(key, t.time), t.time)
    last_delivered: dict[tuple[str, str, str], float] = {}
    for d in delivers:
        last_delivered[(d.queue, d.group, d.id)] = d.time
    for key, t_consumed in sorted(consumed_at.items()):
        q, g, mid = key
        if last_delivered.get(key, 0.0) > t_consumed or mid in drained.get((q, g), ()):
            continue  # it came back: the ack did not take effect
        if not any(o in visible for o in outputs_of[key]):
            torn.append((q, g, mid, "acked without outputs"))
    report.add("torn-transaction", torn)

    # duplicates in storage and of effects: two effect rows, two successful acks of one
    # message by different deliveries, two committed transactions consuming one input
    ok_acks: dict[tuple[str, str, str], set[tuple[str, int]]] = defaultdict(set)
    for a in acks:
        if a.kind == "ack" and a.outcome == "ok":
            ok_acks[(a.queue, a.group, a.id)].add((a.session, a.attempt))
    if stored is not None:
        report.add("duplicate-in-storage", [k for k, n in Counter(stored).items() if n > 1])
    report.add(
        "duplicate-effect",
        [k for k, n in Counter((e.queue, e.group, e.id, e.name) for e in effects).items() if n > 1]
        + [(*k, "acked twice") for k, deliveries in sorted(ok_acks.items()) if len(deliveries) > 1]
        + [
            (*k, "committed twice")
            for k, n in Counter(
                (q, g, mid) for t in txns if t.outcome == "ok" for q, g, mid in t.inputs
            ).items()
            if n > 1
        ],
    )

    # duplicate deliveries, explained or not
    ack_of: dict[tuple[str, str, str, str, int], list[Ack]] = defaultdict(list)
    for a in acks:
        ack_of[(a.queue, a.group, a.session, a.id, a.attempt)].append(a)
    # a message's deliveries in the broker's order: by attempt (a consumer may record a
    # delivery late, after a pause), then by time (attempts restart after a crash)
    copies: dict[tuple[str, str, str], list[Deliver]] = defaultdict(list)
    for d in delivers:
        copies[(d.queue, d.group, d.id)].append(d)
    unexplained: list[object] = []
    explained: list[object] = []
    for key, ds in copies.items():
        ds.sort(key=lambda d: (d.attempt, d.time))
        for first, d in itertools.pairwise(ds):
            fault_between = any(first.time < ft <= d.time for ft in fault_times)
            # the acks of that delivery: its session and attempt, made after it (after a
            # crash the broker may hand out the same attempt number again)
            settle = ack_of.get((first.queue, first.group, first.session, first.id, first.attempt))
            # surely after: the redelivery's receive began once the ack had returned
            began = d.since or d.time
            acked_ok = any(
                a.kind == "ack" and a.outcome == "ok" and first.time <= a.time and a.end <= began
                for a in settle or []
            )
            committed = key in committed_at and committed_at[key] <= began
            # exactly-once: never after a committed ack; else only an ack no fault undid
            bad = committed if guarantee == "exactly-once" else acked_ok and not fault_between
            (unexplained if bad else explained).append((d.queue, d.group, d.id, d.attempt))
    report.add("duplicate-delivery", unexplained)
    report.add("duplicate-delivery-explained", explained)

    # reorder: per key and producer, a later message's first delivery surely before an
    # earlier one's: its receive returned before the other's receive was even called
    streams: dict[tuple[str, str, str, str], list[tuple[int, float, float, str]]] = defaultdict(
        list
    )
    for (q, g, mid), ds in copies.items():
        d = ds[0]
        pc = _producer_and_counter(mid)
        if pc is not None:
            streams[(q, g, d.key, pc[0])].append((pc[1], d.since or d.time, d.time, mid))
    reordered = []
    for (q, g, k, _p), items in sorted(streams.items()):
        by_time = sorted(items, key=lambda it: it[2])
        j, highest = 0, -1
        for counter, since, _t, mid in sorted(items, key=lambda it: it[1]):
            while j < len(by_time) and by_time[j][2] < since:
                highest = max(highest, by_time[j][0])
                j += 1
            if highest > counter:
                reordered.append((q, g, k, mid))
    report.add("reorder", reordered)

    # zombie writes: accepted from an epoch fenced before the write began
    fenced_from: dict[str, list[tuple[float, int]]] = defaultdict(list)
    for r in registers:
        fenced_from[r.producer].append((r.end, r.epoch))
    zombies: list[object] = []
    for s in sends:
        fences = fenced_from[s.producer] if s.producer else []
        if s.outcome == "ok" and s.epoch and any(e <= s.time and ep > s.epoch for e, ep in fences):
            zombies.append((s.producer, s.epoch, s.id))
    for t in txns:
        fences = fenced_from[t.tid]
        if t.outcome == "ok" and t.epoch and any(e <= t.time and ep > t.epoch for e, ep in fences):
            zombies.append((t.tid, t.epoch, "commit"))
    report.add("zombie-write", zombies)
    for anomaly in ANOMALIES:
        report.counts.setdefault(anomaly, 0)
    return report

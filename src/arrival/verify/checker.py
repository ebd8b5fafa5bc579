"""The offline checker: a history in, anomaly counts and a verdict per guarantee out.

Each anomaly is a pure function of the history; ``RULES`` says, per guarantee, which are
forbidden (one occurrence fails the run) and which are allowed but counted. The
definitions follow the verification design (docs/reliability.md):

- lost: acknowledged, never delivered to a group by the end of the final drain.
- observed-then-lost: delivered to a group, its ack never took effect (or may not
  have), and missing from that group's final drain.
- phantom: delivered but never sent; corrupt: a body that does not match its id.
- aborted-read: delivered although every send of it definitely failed, or it is an
  output only of transactions that definitely failed.
- dirty-read: a transaction's output delivered before its commit was even invoked.
- torn-transaction: some but not all of a transaction's outputs visible.
- duplicate-in-storage: one id stored twice in a queue (the audit).
- duplicate-delivery: one id delivered twice to one group, and nothing explains it: the
  earlier delivery's ack had committed (exactly-once: after any committed ack), with no
  fault in between. ``duplicate-delivery-explained``: a nack, a lease that ran out (no
  ack), an ack that failed or may not have taken effect, or a fault in between.
- duplicate-effect: two effects (inbox rows) for one input.
- reorder: within a key and a producer, first deliveries out of send order.
- zombie-write: a send or commit accepted from an epoch fenced before it began.
"""

from __future__ import annotations

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
)

F, C = "forbidden", "counted"
RULES: dict[str, dict[str, str]] = {
    "at-most-once": {
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
    report.add(
        "observed-then-lost",
        [
            (q, g, mid)
            for (q, g), seen in sorted(by_group.items())
            if (q, g) in drained
            for mid in sorted(seen)
            if (q, g, mid) not in settled and mid not in drained[(q, g)]
        ],
    )

    # phantom, corrupt, aborted and dirty reads
    report.add("phantom", sorted({(d.queue, d.id) for d in delivers} - set(outcomes)))
    report.add("corrupt", [(d.queue, d.group, d.id) for d in delivers if not d.intact])
    report.add(
        "aborted-read",
        sorted({(d.queue, d.id) for d in delivers if outcomes.get((d.queue, d.id)) == {"fail"}}),
    )
    dirty = []
    for d in delivers:
        ts = txn_outputs.get((d.queue, d.id))
        sent_before = any(s.queue == d.queue and s.id == d.id and s.time <= d.time for s in sends)
        if ts and not sent_before and all(d.time < t.time for t in ts):
            dirty.append((d.queue, d.group, d.id))
    report.add("dirty-read", dirty)

    # torn transactions: some, not all, of its outputs visible
    visible = {(d.queue, d.id) for d in delivers} | set(stored or [])
    torn = []
    for t in txns:
        shown = [o for o in t.outputs if tuple(o) in visible]
        if 0 < len(shown) < len(t.outputs):
            torn.append((t.tid, len(shown), len(t.outputs)))
    report.add("torn-transaction", torn)

    # duplicates in storage and of effects
    if stored is not None:
        report.add("duplicate-in-storage", [k for k, n in Counter(stored).items() if n > 1])
    report.add(
        "duplicate-effect",
        [k for k, n in Counter((e.queue, e.group, e.id, e.name) for e in effects).items() if n > 1],
    )

    # duplicate deliveries, explained or not
    ack_of: dict[tuple[str, str, str, str, int], list[Ack]] = defaultdict(list)
    for a in acks:
        ack_of[(a.queue, a.group, a.session, a.id, a.attempt)].append(a)
    firsts: dict[tuple[str, str, str], Deliver] = {}
    unexplained: list[object] = []
    explained: list[object] = []
    for d in delivers:
        key = (d.queue, d.group, d.id)
        first = firsts.get(key)
        if first is None:
            firsts[key] = d
            continue
        fault_between = any(first.time < ft <= d.time for ft in fault_times)
        settle = ack_of.get((first.queue, first.group, first.session, first.id, first.attempt))
        acked_ok = any(
            a.kind == "ack" and a.outcome == "ok" and a.end <= d.time for a in settle or []
        )
        committed = key in committed_at and committed_at[key] <= d.time
        # exactly-once: never after a committed ack; else only an ack no fault undid
        bad = committed if guarantee == "exactly-once" else acked_ok and not fault_between
        (unexplained if bad else explained).append((d.queue, d.group, d.id, d.attempt))
        firsts[key] = d
    report.add("duplicate-delivery", unexplained)
    report.add("duplicate-delivery-explained", explained)

    # reorder: per key and producer, first deliveries out of counter order
    last: dict[tuple[str, str, str, str], int] = {}
    reordered = []
    seen_first: set[tuple[str, str, str]] = set()
    for d in delivers:
        if (d.queue, d.group, d.id) in seen_first:
            continue
        seen_first.add((d.queue, d.group, d.id))
        pc = _producer_and_counter(d.id)
        if pc is None:
            continue
        k = (d.queue, d.group, d.key, pc[0])
        if k in last and pc[1] < last[k]:
            reordered.append((d.queue, d.group, d.key, d.id))
        last[k] = max(last.get(k, pc[1]), pc[1])
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

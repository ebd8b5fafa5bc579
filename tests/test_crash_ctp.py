"""Exactly-once consume-transform-produce, killed with SIGKILL at random moments.

The worker (``crash_workers/ctp.py``) consumes the exactly-once queue ``in`` with
``Consumer.process`` (one transactional id, ``batch`` inputs per transaction) and sends
one output per input to the exactly-once queue ``out``. The test fills ``in`` with
uniquely numbered messages, then runs the worker on the same data directory again and
again, killing it after a seeded random delay (or letting ``ARRIVAL_CRASHPOINTS`` kill it
around the writer's commits), until a run drains ``in`` and exits. Then it reads ``out``
to the end and checks the history (``check_ctp_history``, a pure function unit-tested
below on hand-made histories):

- lost: an input without an output;
- duplicate effect: an input with more than one output. With ``per-run`` output ids
  (``<input>@<run>``), a transaction whose outputs took effect without its acks would
  be re-processed and leave a second output, where derived ids (``<input>/0``, what
  ``process`` gives) would let id dedup hide it;
- phantom / corrupt: an output for no input, a body or id that does not match its
  input, an output of a run that never handled its input;
- handled again after a committed ack: the handler got an input after a transaction
  with it committed (its COMMIT line was reported, or its output is from an earlier run);
- stuck: ``in`` still has a backlog for the group after the final run.

The worker's handler sleeps a little per input (``CTP_HANDLER_SLEEP_S``), so most kills
land inside a transaction, between its first input and its commit; the test checks that
some did. Seeds: printed by every test and in every assertion message; rerun with
``ARRIVAL_CRASH_TEST_SEED=<seed>``. Where a kill lands also depends on timing, so a rerun
explores the same schedule, not the same interleaving.
"""

from __future__ import annotations

import os
import random
import signal
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest

import arrival
from test_crash import Run, Verdict, run_worker, skip_unless_slow_selected

IN_QUEUE, OUT_QUEUE, GROUP = "in", "out", "ctp"  # the names in crash_workers/ctp.py
AUDIT_GROUP = "audit"
FILL_CHUNK = 500
DRAIN_CHUNK = 1000
DRAIN_WAIT_S = 0.5
HANDLER_SLEEP_S = 0.001  # per input: a 50-input transaction stays open ~50 ms
KILL_AFTER_S = (0.02, 0.4)  # a run's life after READY; 2,000 inputs take ~2-4 s in all
EXTRA_ROUNDS = 5  # unarmed runs allowed after the kills to drain `in`


def body_of(n: int) -> bytes:
    return f"message {n}".encode()


def output_of(n: int) -> bytes:
    return b"out of " + body_of(n)


@pytest.fixture
def seed() -> int:
    value = int(os.environ.get("ARRIVAL_CRASH_TEST_SEED") or random.randrange(2**32))
    print(f"crash test seed: {value} (rerun with ARRIVAL_CRASH_TEST_SEED={value})")
    return value


def declare(broker: arrival.Broker) -> None:
    """As crash_workers/ctp.py declares them."""
    broker.create_queue(IN_QUEUE, "exactly-once", max_deliveries=None)
    broker.create_queue(OUT_QUEUE, "exactly-once", max_deliveries=None)


def fill(datadir: Path, n: int) -> None:
    with arrival.connect(datadir) as broker:
        declare(broker)
        producer = broker.producer()
        for lo in range(0, n, FILL_CHUNK):
            batch = [
                arrival.Envelope(body_of(i), id=str(i)) for i in range(lo, min(n, lo + FILL_CHUNK))
            ]
            producer.send_batch(IN_QUEUE, batch)


@dataclass(frozen=True)
class Output:
    id: str
    body: bytes
    run: str | None  # the "run" header: which worker run sent it


def audit(datadir: Path) -> tuple[list[Output], int]:
    """Read ``out`` to the end (a fresh group) and ``in``'s backlog for the worker's group."""
    outputs: list[Output] = []
    with arrival.connect(datadir) as broker:
        declare(broker)
        consumer = broker.consumer(OUT_QUEUE, AUDIT_GROUP)
        while msgs := consumer.receive_batch(DRAIN_CHUNK, timeout=DRAIN_WAIT_S):
            outputs.extend(Output(m.id, m.body, m.headers.get("run")) for m in msgs)
            consumer.ack_batch(msgs)
        consumer.close()
        groups = {g.group: g for g in broker.stats(IN_QUEUE).groups}
        backlog = groups[GROUP].backlog if GROUP in groups else -1
    return outputs, backlog


# =====================================================================================
# the check: a pure function over the recorded history
# =====================================================================================


def parse_input(body: bytes) -> int | None:
    prefix = output_of(0)[:-1]
    tail = body[len(prefix) :]
    return int(tail) if body.startswith(prefix) and tail.isdigit() else None


def check_ctp_history(
    n: int,
    runs: Sequence[Sequence[str]],
    outputs: Sequence[Output],
    backlog: int,
    ids: str,
) -> Verdict:
    """``runs``: each run's output lines, in run order (run ``r`` sent header ``r``)."""
    v = Verdict()
    handled: dict[int, list[int]] = {}  # input -> runs whose handler got it
    again_after_commit: set[tuple[int, int]] = set()  # (run, input)
    committed: set[int] = set()
    for r, lines in enumerate(runs):
        for line in lines:
            words = line.split()
            if words[:1] == ["GOT"]:
                got = int(words[1])
                if got in committed:
                    again_after_commit.add((r, got))
                handled.setdefault(got, []).append(r)
            elif words[:1] == ["COMMIT"]:
                committed.update(int(w) for w in words[1:])
    by_input: dict[int, list[Output]] = {}
    phantom: list[object] = []
    corrupt: list[object] = []
    for o in outputs:
        i = parse_input(o.body)
        if i is None or not 0 <= i < n:
            phantom.append(o)
            continue
        by_input.setdefault(i, []).append(o)
        run = int(o.run) if o.run is not None and o.run.isdigit() else -1
        want_id = f"{i}@{run}" if ids == "per-run" else f"{i}/0"
        if o.id != want_id or o.body != output_of(i):
            corrupt.append(o)
        if run not in handled.get(i, []):
            phantom.append(("output of a run that never handled it", o))
        elif any(later > run for later in handled[i]):
            again_after_commit.add((max(handled[i]), i))
    v.add("lost (an input without output)", set(range(n)) - set(by_input))
    v.add(
        "duplicate effect (an input with 2+ outputs)",
        [i for i, o in by_input.items() if len(o) > 1],
    )
    v.add("phantom", phantom)
    v.add("corrupt (id or body does not match the input)", corrupt)
    v.add("handled again after its transaction committed", again_after_commit)
    v.add("committed, yet without output", committed - set(by_input))
    if backlog != 0:
        v.add("stuck (backlog of `in` after the final run)", [backlog])
    v.allowed["inputs handled more than once (kills)"] = sum(
        1 for rs in handled.values() if len(rs) > 1
    )
    v.allowed["committed, never reported (killed between commit and report)"] = len(
        set(by_input) - committed
    )
    v.allowed["outputs"] = len(outputs)
    return v


# =====================================================================================
# the scenario
# =====================================================================================


def ctp_scenario(
    tmp_path: Path,
    seed: int,
    *,
    n: int,
    batch: int,
    kills: int,
    ids: str = "per-run",
    crashpoint: str | None = None,
) -> None:
    """Kill the worker ``kills`` times (by us after a random delay, or by ``crashpoint``
    around its commits), then let it run until ``in`` is drained; audit ``out``."""
    rng = random.Random(seed)
    tmp_path.mkdir(parents=True, exist_ok=True)
    datadir = tmp_path / "data"
    fill(datadir, n)
    ctx = f"seed {seed}, n={n}, batch={batch}, ids={ids}, crash point {crashpoint}"
    runs: list[Run] = []
    for r in range(kills + EXTRA_ROUNDS):
        armed = r < kills
        env = {"CTP_HANDLER_SLEEP_S": str(HANDLER_SLEEP_S)}
        kill_after: float | None = None
        if armed and crashpoint is not None:
            env |= {"ARRIVAL_CRASHPOINTS": crashpoint, "ARRIVAL_CRASH_SEED": str(seed + r)}
            kill_after = 10.0  # a backstop: the crash point is meant to fire first
        elif armed:
            kill_after = rng.uniform(*KILL_AFTER_S)
        run = run_worker(
            "ctp.py",
            [str(datadir), str(batch), str(r), ids],
            kill_after_s=kill_after,
            env=env,
            cwd=tmp_path,
        )
        done = run.returncode == 0 and run.lines[-1:] != [] and run.lines[-1].startswith("DONE")
        assert run.returncode == -signal.SIGKILL or done, (
            f"{ctx}: run {r} exited with {run.returncode}; stderr:\n{run.stderr[-3000:]}"
        )
        runs.append(run)
        if run.returncode == 0:
            break
    else:
        raise AssertionError(f"{ctx}: `in` was not drained in {EXTRA_ROUNDS} runs after the kills")
    outputs, backlog = audit(datadir)
    verdict = check_ctp_history(n, [r.lines for r in runs], outputs, backlog, ids)
    killed = [r for r in runs if r.returncode == -signal.SIGKILL]
    open_tx = sum(1 for r in killed if any(line.startswith("GOT") for line in r.lines[-1:]))
    print(
        f"{ctx}: {len(runs)} runs, {len(killed)} killed ({open_tx} with a transaction open); "
        f"{verdict.report()}"
    )
    assert verdict.ok, f"{ctx}: {verdict.report()}"
    if crashpoint is None:  # a crash point may let a run drain `in` before it fires
        assert len(killed) >= kills // 2, f"{ctx}: only {len(killed)} of {kills} runs were killed"
    if crashpoint is None or crashpoint.startswith("writer.before-commit"):
        # these kills land before a commit is durable: its inputs must come back
        assert verdict.allowed["inputs handled more than once (kills)"], (
            f"{ctx}: no kill ever interrupted an uncommitted transaction; the test tested little"
        )
    if crashpoint is None:
        assert open_tx, f"{ctx}: no kill landed inside a transaction"
    else:
        fired = sum(1 for r in killed if not r.killed_by_us)
        assert fired, f"{ctx}: the crash point never fired"


@pytest.mark.parametrize("batch", [1, 50])
def test_ctp_killed_keeps_every_effect_exactly_once(tmp_path: Path, seed: int, batch: int) -> None:
    ctp_scenario(tmp_path, seed, n=2000, batch=batch, kills=8)


@pytest.mark.parametrize(
    ("crashpoint", "ids"),
    [
        ("writer.before-commit=0.2", "per-run"),
        ("writer.after-commit=0.2", "derived"),
        ("writer.after-ack=0.2", "per-run"),
    ],
)
def test_ctp_crash_points_keep_every_effect_exactly_once(
    tmp_path: Path, seed: int, crashpoint: str, ids: str
) -> None:
    """The worker kills itself just before a commit, just after it (durable, not yet
    acknowledged: the transaction committed, the worker never learned it) and just after
    the acknowledgement."""
    ctp_scenario(tmp_path, seed, n=500, batch=10, kills=4, ids=ids, crashpoint=crashpoint)


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_ctp_long(tmp_path: Path, seed: int, request: pytest.FixtureRequest) -> None:
    skip_unless_slow_selected(request)
    for batch in (1, 7, 50, 200):
        ctp_scenario(tmp_path / f"b{batch}", seed + batch, n=10_000, batch=batch, kills=40)
    for point in ("writer.before-commit", "writer.after-commit", "writer.after-ack"):
        # about one fire per 50 commits at batch 1, per 5 at batch 50 (100 per drain)
        for batch, ids, p in ((1, "per-run", 0.02), (50, "derived", 0.2)):
            ctp_scenario(
                tmp_path / f"{point}-{batch}",
                seed,
                n=5000,
                batch=batch,
                kills=20,
                ids=ids,
                crashpoint=f"{point}={p}",
            )


# =====================================================================================
# the checker must be able to fail
# =====================================================================================


def _out(i: int, run: int, ids: str = "per-run") -> Output:
    return Output(f"{i}@{run}" if ids == "per-run" else f"{i}/0", output_of(i), str(run))


def test_checker_accepts_a_clean_history_with_redelivery_after_a_kill() -> None:
    runs = [["READY", "GOT 0 1", "COMMIT 0", "GOT 1 1"], ["READY", "GOT 1 1", "COMMIT 1", "DONE"]]
    v = check_ctp_history(2, runs, [_out(0, 0), _out(1, 1)], 0, "per-run")
    assert v.ok, v.report()
    assert v.allowed["inputs handled more than once (kills)"] == 1


def test_checker_flags_loss_duplicates_and_a_stuck_queue() -> None:
    runs = [["GOT 0 1", "GOT 1 1"], ["GOT 1 1", "COMMIT 1"]]
    v = check_ctp_history(2, runs, [_out(1, 0), _out(1, 1)], 1, "per-run")
    assert v.forbidden["lost (an input without output)"] == [0]
    assert v.forbidden["duplicate effect (an input with 2+ outputs)"] == [1]
    # the output of run 0 means its transaction committed: run 1 should not have had it
    assert v.forbidden["handled again after its transaction committed"] == [(1, 1)]
    assert v.forbidden["stuck (backlog of `in` after the final run)"] == [1]


def test_checker_flags_redelivery_after_a_reported_commit() -> None:
    runs = [["GOT 0 1", "COMMIT 0"], ["GOT 0 2", "COMMIT 0"]]
    v = check_ctp_history(1, runs, [_out(0, 0, "derived")], 0, "derived")
    assert v.forbidden == {"handled again after its transaction committed": [(1, 0)]}


def test_checker_flags_phantoms_corruption_and_unbacked_commits() -> None:
    runs = [["GOT 0 1", "GOT 1 1", "COMMIT 0 1"]]
    outputs = [
        Output("0@0", b"out of message 0 tampered", "0"),  # not an output of any input
        Output("1@7", output_of(1), "0"),  # id does not match its run
        _out(5, 0),  # no such input
    ]
    v = check_ctp_history(2, runs, outputs, 0, "per-run")
    assert v.forbidden["corrupt (id or body does not match the input)"] == [outputs[1]]
    assert len(v.forbidden["phantom"]) == 2
    assert v.forbidden["committed, yet without output"] == [0]
    v = check_ctp_history(1, [["GOT 0 1"]], [_out(0, 3)], 0, "per-run")
    assert v.forbidden["phantom"] == [("output of a run that never handled it", _out(0, 3))]

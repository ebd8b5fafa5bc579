"""The contracts hold through the worker runtime when its process is killed: a real
``arrival worker`` is SIGKILLed at random moments while it handles an at-least-once and
an exactly-once queue, then restarted; at the end nothing is lost, and the exactly-once
handler's outputs exist once each."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from collections import Counter
from pathlib import Path

import arrival

N = 400
KILLS = 5
SEED = int(os.environ.get("ARRIVAL_TEST_SEED", "20261129"))

APP = textwrap.dedent(
    """
    import os, time
    import arrival

    app = arrival.App("unused", name="crashy")

    @app.handler("orders", concurrency=2)
    def order(body: bytes) -> None:
        with open(os.environ["EFFECTS"], "a") as f:  # the side effect, made durable
            f.write(body.decode() + "\\n")
            f.flush()
            os.fsync(f.fileno())
        time.sleep(0.02)  # slow enough that every kill finds work in progress

    @app.handler("payments", batch=20)
    def pay(body: bytes, ctx: arrival.Context) -> None:
        time.sleep(0.005)
        ctx.send("ledger", body)
    """
)


def test_killed_workers_lose_nothing_and_exactly_once_outputs_exist_once(tmp_path: Path) -> None:
    rng = random.Random(SEED)
    data = tmp_path / "data"
    effects = tmp_path / "effects.txt"
    (tmp_path / "crashy_app.py").write_text(APP)
    with arrival.connect(str(data)) as b:
        b.create_queue("orders", "at-least-once", max_deliveries=None)
        b.create_queue("payments", "exactly-once", max_deliveries=None)
        b.create_queue("ledger", "exactly-once")
        p = b.producer()
        p.send_batch("orders", [f"o-{i}".encode() for i in range(N)])
        p.send_batch(
            "payments", [arrival.Envelope(f"p-{i}".encode(), id=f"p-{i}") for i in range(N)]
        )
    env = {**os.environ, "EFFECTS": str(effects), "PYTHONUNBUFFERED": "1"}
    kills = 0
    for _ in range(KILLS):
        worker = subprocess.Popen(
            [sys.executable, "-m", "arrival", "worker", "crashy_app:app", "--url", str(data)],
            cwd=tmp_path,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        try:
            assert worker.stdout is not None
            ready = worker.stdout.readline()
            assert ready.startswith(b"worker ready"), (
                ready,
                worker.stderr.read() if worker.stderr else b"",
            )
            time.sleep(rng.uniform(0.05, 0.4))  # mid-handler, mid-transaction, anywhere
            worker.send_signal(signal.SIGKILL)
            kills += 1
        finally:
            if worker.poll() is None:
                worker.kill()
            worker.communicate(timeout=30)
    assert kills == KILLS

    before_final = set(effects.read_text().split()) if effects.exists() else set()
    assert len(before_final) < N  # the kills came while work remained
    # a last worker, in this process, finishes what is left
    app = _final_app(effects)
    with arrival.connect(str(data)) as b:
        app.url = b
        app.run(until_idle=0.5)
        done = Counter(effects.read_text().split())
        ledger = b.peek("ledger", 10 * N)
        orders, payments = b.stats("orders").groups[0], b.stats("payments").groups[0]

    assert set(done) == {f"o-{i}" for i in range(N)}, f"lost (seed {SEED})"  # at-least-once
    assert (orders.backlog, payments.backlog) == (0, 0)
    ids = Counter(m.id for m in ledger)
    assert set(ids) == {f"p-{i}/0" for i in range(N)}, f"seed {SEED}"
    assert max(ids.values()) == 1, f"an output stored twice (seed {SEED})"  # exactly-once


def _final_app(effects: Path) -> arrival.App:
    app = arrival.App("unused", name="crashy")

    @app.handler("orders", concurrency=2)
    def order(body: bytes) -> None:
        with effects.open("a") as f:
            f.write(body.decode() + "\n")

    @app.handler("payments", batch=20)
    def pay(body: bytes, ctx: arrival.Context) -> None:
        ctx.send("ledger", body)

    return app

"""The runnable examples in examples/ run, and do what their account says.

Each example runs as a script (as a user would: no arguments, exit 0) and in-process,
where its ``main()`` returns the facts its account prints: those are checked against the
example's inputs. Each example's module-level ``app`` loads as ``arrival worker`` loads it,
and one runs under ``arrival worker`` for real.
"""

from __future__ import annotations

import importlib.util
import os
import queue
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import msgspec
import pytest

import arrival
from arrival.app.worker import load_app

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"
APP_EXAMPLES = ["analytics", "game", "notifications", "orders", "payments_app"]
SCRIPT_BOUND_S = 10.0  # each example promises to finish well within this


def example(name: str) -> Any:
    """The example's module, imported from its file (once)."""
    module_name = f"arrival_example_{name}"
    if module_name in sys.modules:
        return sys.modules[module_name]
    spec = importlib.util.spec_from_file_location(module_name, EXAMPLES / f"{name}.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    spec.loader.exec_module(module)
    return module


def run_script(name: str, *args: str, cwd: Path) -> tuple[subprocess.CompletedProcess[str], float]:
    started = time.monotonic()
    done = subprocess.run(
        [sys.executable, str(EXAMPLES / f"{name}.py"), *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        cwd=cwd,
    )
    return done, time.monotonic() - started


def test_payments_example_charges_each_payment_once(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, str(EXAMPLES / "payments.py"), str(tmp_path / "data")],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    out = done.stdout
    assert "stored: 3" in out  # the retried send was stored once
    assert "pay-2 (attempt 2): already charged, only acked" in out
    assert "receipts: ['pay-1/0', 'pay-2/0', 'pay-3/0']" in out
    assert "balances: {'alice': 8651, 'bob': 4300}" in out


# -- as scripts ---------------------------------------------------------------------------


def analytics_output(out: str) -> None:
    m = example("analytics")
    assert f"page views: {m.VIEWS:,} sent" in out
    assert f"the queue held at most {m.CAPACITY:,} (capacity {m.CAPACITY:,})" in out
    assert f"the newest view counted: #{m.VIEWS - 1:,} of #{m.VIEWS - 1:,}" in out
    assert "0 older than one already shown" in out


def game_output(out: str) -> None:
    assert "0 older than one already drawn; every player at its last position: True" in out
    assert "renderer: undecodable positions dropped: 1" in out
    if example("game").HAVE_PYDANTIC:
        assert "spectators (pydantic):" in out
    else:
        assert "spectators: skipped (pydantic is not installed)" in out


def notifications_output(out: str) -> None:
    assert "dead letters in emails.dlq: 2" in out
    assert "reset-carol: from emails/mailer after 3 attempt(s)" in out
    assert "dry run: would replay ['welcome-bob', 'reset-carol']" in out
    assert "dead letters left: 0" in out


def orders_output(out: str) -> None:
    assert f"worker 1 died with exit status {example('orders').CRASH_EXIT}" in out
    assert "order-3 (attempt" in out
    assert "delivered again, already shipped: only acked" in out
    assert "applied twice: none" in out


def payments_app_output(out: str) -> None:
    assert "stored: 3" in out
    assert "pay-2 (attempt 2): already charged: not charged again" in out
    assert "ledger entries: ['pay-1/0', 'pay-2/0', 'pay-3/0']" in out


OUTPUT_CHECKS = {
    "analytics": analytics_output,
    "game": game_output,
    "notifications": notifications_output,
    "orders": orders_output,
    "payments_app": payments_app_output,
}


@pytest.mark.parametrize("name", APP_EXAMPLES)
def test_example_runs_as_a_script_and_tells_what_happened(name: str, tmp_path: Path) -> None:
    done, elapsed = run_script(name, cwd=tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stderr == ""  # no traceback, no warning, no log noise
    assert elapsed < SCRIPT_BOUND_S, f"{name} took {elapsed:.1f} s"
    assert list(tmp_path.iterdir()) == []  # a temporary directory or memory: only
    OUTPUT_CHECKS[name](done.stdout)


def test_orders_crashing_worker_mode_exits_nonzero_if_it_does_not_crash(tmp_path: Path) -> None:
    # the hidden mode the example starts its first worker in: given an order that never
    # comes, it stops at its idle bound and says so instead of passing silently
    data = tmp_path / "data"
    with arrival.connect(data) as broker:
        broker.create_queue("orders", **example("orders").ORDERS)
    started = time.monotonic()
    done, _ = run_script(
        "orders", "--crash-after", "no-such-order", str(data), str(tmp_path / "w.db"), cwd=tmp_path
    )
    assert done.returncode == 1
    assert "worker 1 did not crash after no-such-order" in done.stderr
    assert time.monotonic() - started < 30


# -- in-process: the facts --------------------------------------------------------------


def test_analytics_slow_consumer_loses_old_views_not_memory() -> None:
    m = example("analytics")
    out = m.main()
    assert out.sent == m.VIEWS
    assert out.handled + out.dropped == out.sent  # each view counted or dropped, none lost
    assert out.dropped > 0  # the dashboard really fell behind
    assert out.max_stored <= m.CAPACITY
    assert out.last_view == m.VIEWS - 1  # drop="oldest": the newest survive
    assert out.gauges == {g: m.gauge_value(g, m.UPDATES - 1) for g in m.GAUGES}
    assert 0 < out.gauge_updates <= m.UPDATES * len(m.GAUGES)
    assert out.stale_updates == 0
    by_queue = {s.queue: s for s in out.stats}
    assert by_queue["pageviews"].handled == out.handled
    assert by_queue["metrics"].handled == out.gauge_updates
    assert all(s.guarantee == "at-most-once" for s in out.stats)
    assert out.ok


def test_game_newest_position_wins() -> None:
    m = example("game")
    out = m.main()
    assert out.sent == m.TICKS * len(m.PLAYERS)
    assert out.final == {p: (m.TICKS - 1, *m.position_at(p, m.TICKS - 1)) for p in m.PLAYERS}
    assert out.rendered == out.final
    assert out.stale == 0
    assert len(m.PLAYERS) <= out.drawn < out.sent  # conflation: stale positions skipped
    if m.HAVE_PYDANTIC:
        assert out.spectated == out.final
        assert set(out.stats) == {"renderer", "spectators"}
    else:
        assert out.spectated is None
        assert set(out.stats) == {"renderer"}
    # the off-map position does not decode: counted once per group, never retried
    assert all((s.undecodable, s.retried) == (1, 0) for s in out.stats.values())
    assert out.ok


def test_game_position_type_refuses_off_map_coordinates() -> None:
    m = example("game")
    body = msgspec.json.encode({"player": "p", "tick": 1, "x": m.MAP_SIZE + 1, "y": 0.0})
    with pytest.raises(arrival.errors.UndecodableMessage, match="Position"):
        arrival.decode(body, m.Position)
    if m.HAVE_PYDANTIC:
        with pytest.raises(arrival.errors.UndecodableMessage, match="SpectatorPosition"):
            arrival.decode(body, m.SpectatorPosition)


def test_notifications_dead_letters_then_replay() -> None:
    m = example("notifications")
    out = m.main()
    ids = [mid for mid, _ in m.OUTBOX]
    assert out.queued == len(ids)
    assert out.sent == Counter(ids)  # every e-mail sent, once, in the end
    letters = {d.id: d for d in out.dead_letters}
    assert set(letters) == {"welcome-bob", "reset-carol"}
    for d in letters.values():
        assert (d.origin_queue, d.origin_group) == ("emails", "mailer")
        assert d.first_failure is not None
        assert d.last_failure is not None
        assert d.first_failure <= d.last_failure
    # full mailbox: temporary, retried until the policy's attempts were spent
    # (attempts count deliveries: one given back when the breaker opened counts too)
    assert letters["reset-carol"].attempts >= m.RETRY.max_attempts
    assert (letters["reset-carol"].last_error or "").startswith("SmtpUnavailable: 452")
    # relay refused: permanent, dead-lettered on its first attempt that reached the relay
    assert (letters["welcome-bob"].last_error or "").startswith("SmtpRejected: 550")
    assert letters["welcome-bob"].attempts < m.RETRY.max_attempts
    assert set(out.sent_first_run) == set(ids) - set(letters)
    assert out.would_replay == out.replayed == [d.id for d in out.dead_letters]
    assert out.dead_letters_left == 0
    first = out.stats_first_run
    assert first.breaker_opened >= 1  # the outage opened it
    assert first.dead_lettered == 2
    assert first.handled == len(ids) - 2
    assert out.stats.handled == len(ids)  # counters add up over both runs
    assert out.stats.breaker_state == "closed"
    assert out.ok


def test_notifications_breaker_opens_at_the_outage() -> None:
    m = example("notifications")
    smtp = m.FakeSmtp(down_for_calls=m.BREAKER.failure_threshold)
    with arrival.connect("memory:") as broker:
        broker.create_queue("emails", **m.EMAILS)
        for i in range(5):
            broker.producer().send(
                "emails", msgspec.json.encode(m.Email(f"u{i}@example.com", "hi")), id=f"m{i}"
            )
        with m.quiet_runtime_logs():
            [stats] = m.make_app(broker, smtp).run(until_idle=0.5)
    assert stats.breaker_opened == 1
    assert stats.failed == m.BREAKER.failure_threshold
    assert sorted(smtp.sent) == [f"m{i}" for i in range(5)]


def test_orders_crash_does_not_apply_twice(tmp_path: Path) -> None:
    m = example("orders")
    out = m.main(str(tmp_path))
    assert out.crash_exit == m.CRASH_EXIT  # the first worker really died
    stocked = {o.item: m.STOCK[o.item] for o in m.BATCH}
    valid = [o for o in m.BATCH if o.units <= stocked[o.item]]
    assert out.shipments == {o.id: 1 for o in valid}  # one shipment row each
    expected = dict(m.STOCK)
    for o in valid:
        expected[o.item] -= o.units
    assert out.stock == expected
    assert out.skipped == ["order-3"]  # redelivered after the crash; the inbox knew it
    [letter] = out.dead_letters
    assert letter.id == "order-4"
    # OutOfStock is in dead_letter_on: one failure, no retry. Its delivery count may be 2:
    # the crashed worker may have held it (prefetched) when it died
    assert letter.headers["arrival-failures"] == "1"
    assert letter.attempts in (1, 2)
    assert (letter.last_error or "").startswith("OutOfStock:")
    assert (letter.origin_queue, letter.origin_group) == ("orders", "fulfilment")
    assert out.stats.dead_lettered == 1
    assert out.ok
    # the inbox holds one record per order that took effect, and none for the bad one
    db = sqlite3.connect(tmp_path / "warehouse.db")
    try:
        recorded = [r[0] for r in db.execute("SELECT message_id FROM arrival_inbox")]
    finally:
        db.close()
    assert sorted(recorded) == sorted(o.id for o in valid)


@pytest.mark.parametrize("where", ["memory", "disk"])
def test_payments_app_charges_once_and_ledger_ids_are_deterministic(
    where: str, tmp_path: Path
) -> None:
    m = example("payments_app")
    if where == "memory":
        out = m.main()
    else:
        out = m.main(str(tmp_path / "data"), str(tmp_path / "bank.db"))
    payments = m.PAYMENTS_SENT
    assert out.stored == len(payments)  # the retried send was stored once
    assert sorted(out.charges) == sorted(p.id for p in payments)  # each charged once
    expected = dict(m.BALANCES)
    for p in payments:
        expected[p.customer] -= p.cents
    assert out.balances == expected
    # one entry per payment, its id derived from the payment's: the aborted attempt's
    # entry and the retry's are the same message
    assert out.ledger == sorted(
        (f"{p.id}/0", m.LedgerEntry(p.id, p.customer, p.cents)) for p in payments
    )
    assert (out.stats.handled, out.stats.failed, out.stats.retried) == (len(payments), 1, 1)
    assert out.ok


# -- under arrival worker ---------------------------------------------------------------


@pytest.mark.parametrize("name", APP_EXAMPLES)
def test_module_level_app_loads_as_arrival_worker_does(
    name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(ROOT)
    monkeypatch.syspath_prepend(str(ROOT))
    loaded = load_app(f"examples.{name}:app")
    assert isinstance(loaded, arrival.App)
    assert loaded.url == "./data"  # arrival worker --url replaces it
    assert loaded.handlers  # every example has at least one
    assert not loaded.running
    sys.modules.pop(f"examples.{name}")  # the next test imports it afresh


def _lines(stream: Any, into: queue.Queue[str]) -> None:
    for line in stream:
        into.put(line)


def test_notifications_under_arrival_worker(tmp_path: Path) -> None:
    m = example("notifications")
    data = tmp_path / "data"
    with arrival.connect(data) as broker:
        broker.create_queue("emails", **m.EMAILS)
        producer = broker.producer()
        for mid, email in m.OUTBOX[:3]:
            producer.send("emails", msgspec.json.encode(email), id=mid)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("ARRIVAL_URL", None)
    worker = subprocess.Popen(
        [
            *(sys.executable, "-m", "arrival", "worker", "examples.notifications:app"),
            *("--url", str(data), "--log-level", "ERROR"),
        ],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    lines: queue.Queue[str] = queue.Queue()
    reader = threading.Thread(target=_lines, args=(worker.stdout, lines), daemon=True)
    reader.start()
    try:
        seen: list[str] = []
        deadline = time.monotonic() + 30
        while sum(line.startswith("sent ") for line in seen) < 3:
            remaining = deadline - time.monotonic()
            assert remaining > 0, f"the worker sent too little: {seen}"
            seen.append(lines.get(timeout=remaining))
        worker.send_signal(signal.SIGTERM)
        worker.wait(timeout=30)
    finally:
        if worker.poll() is None:
            worker.kill()
            worker.wait()
        reader.join(10)
        assert worker.stderr is not None
        err = worker.stderr.read()
        worker.stderr.close()
        assert worker.stdout is not None
        worker.stdout.close()
    while not lines.empty():
        seen.append(lines.get())
    assert worker.returncode == 0, err
    assert seen[0].startswith("worker ready: 1 handler(s)")
    sent = sorted(line.split()[1] for line in seen if line.startswith("sent "))
    assert sent == sorted(mid for mid, _ in m.OUTBOX[:3])
    assert any("worker stopped: 3 message(s) handled" in line for line in seen)

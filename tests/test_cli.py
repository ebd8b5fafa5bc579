"""The ``arrival`` command, through its entry point, on temporary data directories."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from typer.testing import CliRunner

import arrival
from arrival.cli.main import app

runner = CliRunner()


def run(*args: str) -> str:
    result = runner.invoke(app, list(args), catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result.output


def test_demo_shows_redelivery_dead_letter_replay_and_conflation(tmp_path: Path) -> None:
    out = run("demo", "--data", str(tmp_path / "demo"))
    assert "order-2 attempt 2: processed, acked (a redelivery)" in out
    assert "order-4 attempt 3: failed for the 3rd time -> dead-lettered" in out
    assert "order-4: from orders/billing after 3 attempts" in out
    assert "order-4 attempt 1 (replays: 1): processed, acked" in out
    assert "900 updates sent, 3 delivered" in out
    assert "pay-1 sent twice: offsets 0 and 0, 1 stored" in out
    assert "transaction aborted: no ledger entry" in out
    assert "committed on attempt 2: 1 ledger entry (pay-1/0) and the ack" in out
    # the demo's data is real: the queues and the replayed message's settle persist
    with arrival.connect(tmp_path / "demo") as broker:
        assert {"orders", "orders.dlq", "positions", "payments", "ledger"} <= set(broker.queues())
        assert broker.stats("ledger").end_offset == 1
        assert broker.consumer("payments", "billing").receive(timeout=0) is None
        assert broker.dead_letters("orders").list() == []
        billing = next(g for g in broker.stats("orders").groups if g.group == "billing")
        assert billing.backlog == 0


def test_queues_produce_consume_and_dlq(tmp_path: Path) -> None:
    url = str(tmp_path / "data")
    out = run(
        "queues", "create", "orders", "-g", "at-least-once", "--max-deliveries", "1", "--url", url
    )
    assert "orders: at-least-once" in out
    assert "sent at offset 0" in run("produce", "orders", '{"id": 1}', "--key", "k", "--url", url)
    assert "orders" in run("queues", "list", "--url", url)
    assert '{"id": 1}' in run("queues", "peek", "orders", "--url", url)
    inspected = json.loads(run("queues", "inspect", "orders", "--json", "--url", url))
    assert inspected["guarantee"] == "at-least-once"
    assert inspected["limits"]["max_deliveries"] == "1"

    # fail the message once: with max_deliveries=1 it is dead-lettered
    with arrival.connect(url) as broker:
        msg = broker.consumer("orders", "cli").receive(timeout=1)
        assert msg is not None
        msg.nack(error="boom")
    listed = json.loads(run("dlq", "list", "orders", "--json", "--url", url))
    assert [(d["origin_group"], d["last_error"]) for d in listed] == [("cli", "boom")]
    assert "would replay 1" in run("dlq", "replay", "orders", "--dry-run", "--url", url)
    assert "replayed 1" in run("dlq", "replay", "orders", "--url", url)
    consumed = run("consume", "orders", "--group", "cli", "--timeout", "0.2", "--url", url)
    assert "attempt=1" in consumed
    assert "purged 0" in run("dlq", "purge", "orders", "--yes", "--url", url)


def test_errors_are_one_clear_line_and_exit_2(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "arrival", "produce", "nowhere", "x", "--url", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 2
    assert "queue 'nowhere' does not exist" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_queues_create_with_dedup(tmp_path: Path) -> None:
    url = str(tmp_path / "data")
    out = run(
        "queues", "create", "jobs", "-g", "at-least-once", "--dedup", "--dedup-window", "3600",
        "--url", url,
    )  # fmt: skip
    assert "not stored again" in out
    assert "3600 s" in out
    out = run("queues", "create", "pay", "-g", "exactly-once", "--url", url)
    assert "exactly-once" in out
    assert "confirmed commits" in out

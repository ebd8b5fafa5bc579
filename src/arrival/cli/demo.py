"""``arrival demo``: the guarantees at work on the embedded engine, in a few seconds."""

from __future__ import annotations

import shutil
import tempfile

from rich.console import Console

import arrival

__all__ = ["run_demo"]


def run_demo(console: Console, data: str | None = None) -> dict[str, int]:
    """Run the demo in ``data`` (a fresh temporary directory by default).

    Returns what happened, for tests: redeliveries, dead letters, replays, positions.
    """
    own = data is None
    path = tempfile.mkdtemp(prefix="arrival-demo-") if data is None else data
    try:
        return _demo(console, path)
    finally:
        if own:
            shutil.rmtree(path, ignore_errors=True)


def _demo(console: Console, path: str) -> dict[str, int]:
    out = {
        "redelivered": 0,
        "dead_lettered": 0,
        "replayed": 0,
        "positions": 0,
        "payments_stored": 0,
        "ledger_entries": 0,
    }
    console.rule("[bold]arrival demo[/] — embedded engine, no server")
    console.print(f"data directory: [cyan]{path}[/]\n")
    with arrival.connect(path) as broker:
        broker.create_queue(
            "orders",
            guarantee="at-least-once",
            max_deliveries=3,
            ack_timeout=1.0,
            backoff=arrival.Backoff(initial_s=0.05, multiplier=2.0, max_s=0.2),
        )
        console.print("[bold]1.[/] declared queue [green]orders[/]:")
        console.print(str(broker.describe("orders")), style="dim", highlight=False)

        producer = broker.producer()
        for n in range(1, 5):
            offset = producer.send(
                "orders", f'{{"order": {n}}}'.encode(), key=f"customer-{n}", id=f"order-{n}"
            )
            console.print(f"[bold]2.[/] sent order-{n}: durable (fsynced) at offset {offset}")

        console.print(
            "\n[bold]3.[/] a worker processes them; order-2 fails once, order-4 always fails"
        )
        consumer = broker.consumer("orders", group="billing")
        done: set[str] = set()
        while len(done) < 4:
            msg = consumer.receive(timeout=2.0)
            if msg is None:
                break
            tag = f"  {msg.id} attempt {msg.attempt}"
            if msg.id == "order-2" and msg.attempt == 1:
                msg.nack(error="payment gateway timed out")
                console.print(f"{tag}: [yellow]failed, nacked[/] -> redelivered after backoff")
            elif msg.id == "order-4":
                msg.nack(error="KeyError: 'currency'")
                if msg.attempt >= 3:
                    console.print(f"{tag}: [red]failed for the 3rd time -> dead-lettered[/]")
                    done.add(msg.id)
                    out["dead_lettered"] += 1
                else:
                    console.print(f"{tag}: [yellow]failed, nacked[/]")
            else:
                msg.ack()
                out["redelivered"] += msg.redelivered
                note = " [green](a redelivery)[/]" if msg.redelivered else ""
                console.print(f"{tag}: [green]processed, acked[/]{note}")
                done.add(msg.id)

        dlq = broker.dead_letters("orders")
        console.print("\n[bold]4.[/] the dead-letter queue keeps the message with its provenance:")
        for d in dlq.list():
            console.print(
                f"  {d.id}: from {d.origin_queue}/{d.origin_group} after {d.attempts} "
                f"attempts; last error: {d.last_error!r}"
            )

        console.print("\n[bold]5.[/] after fixing the bug, replay it to the group that failed it:")
        replayed = dlq.replay()
        out["replayed"] = len(replayed)
        msg = consumer.receive(timeout=2.0)
        if msg is not None:
            msg.ack()
            console.print(
                f"  {msg.id} attempt {msg.attempt} (replays: "
                f"{msg.headers.get('arrival-replays')}): [green]processed, acked[/]"
            )
        consumer.close()

        console.print("\n[bold]6.[/] at-most-once, conflated: only the latest position per player")
        broker.create_queue("positions", guarantee="at-most-once", capacity=1000, conflate=True)
        for step in range(300):
            for player in ("ada", "bob", "cy"):
                producer.send("positions", f"{player}@{step}".encode(), key=player)
        positions = broker.consumer("positions", group="renderer").receive_batch(100, timeout=0)
        out["positions"] = len(positions)
        console.print(
            f"  900 updates sent, {len(positions)} delivered: "
            + ", ".join(m.body.decode() for m in positions)
        )

        console.print("\n[bold]7.[/] exactly-once: a retried send is stored once, and a")
        console.print("   transaction commits a ledger entry together with the payment's ack")
        broker.create_queue("payments", guarantee="exactly-once")
        broker.create_queue("ledger", guarantee="exactly-once")
        checkout = broker.producer(id="checkout")
        first = checkout.send("payments", b'{"cents": 1250}', key="alice", id="pay-1")
        again = checkout.send("payments", b'{"cents": 1250}', key="alice", id="pay-1")
        out["payments_stored"] = broker.stats("payments").sent
        console.print(
            f"  pay-1 sent twice: offsets {first} and {again}, {out['payments_stored']} stored"
        )
        payments = broker.consumer("payments", group="billing")
        msg = payments.receive(timeout=2.0)
        if msg is not None:
            with broker.transaction("billing-1") as tx:
                tx.send("ledger", b'{"alice": -1250}')
                tx.abort()
            console.print("  transaction aborted: [yellow]no ledger entry, payment not acked[/]")
            msg.release()
            msg = payments.receive(timeout=2.0)
        if msg is not None:
            with broker.transaction("billing-1") as tx:
                tx.send("ledger", b'{"alice": -1250}')
                tx.ack(msg)
            entries = broker.consumer("ledger", group="books").receive_batch(10, timeout=1.0)
            out["ledger_entries"] = len(entries)
            console.print(
                f"  committed on attempt {msg.attempt}: [green]{len(entries)} ledger entry[/] "
                f"({entries[0].id if entries else '-'}) and the ack, together"
            )
        info = broker.info()
        console.print(f"\n{info.fsyncs} fsyncs for {info.commits} commits. Done.")
    return out

"""Payments, exactly once: the essay's ``process_payment`` on arrival.

Run it: ``python examples/payments.py [DATA_DIR]`` (default: a fresh temporary directory).

What happens:
1. A checkout service sends payments to an exactly-once queue. It retries one send (as it
   would after a timeout): the broker stores it once.
2. The billing worker charges each payment in its own SQLite database. The charge and the
   payment's id are committed in one database transaction through the inbox, so a
   redelivered payment is never charged twice.
3. Then, in one broker transaction, it sends a receipt and acks the payment: both happen
   or neither. A retried handler produces the same receipt id, so the receipt queue
   stores it once.
4. A crash is simulated after the charge committed but before the ack: the payment comes
   back, the inbox recognises it, the customer is not charged again, and the receipt is
   sent once.
"""

from __future__ import annotations

import json
import sqlite3
import sys
import tempfile
from pathlib import Path

import arrival


def open_ledger(path: Path) -> sqlite3.Connection:
    db = sqlite3.connect(path)
    db.execute("CREATE TABLE IF NOT EXISTS accounts (customer TEXT PRIMARY KEY, cents INTEGER)")
    db.executemany(
        "INSERT OR IGNORE INTO accounts VALUES (?, ?)", [("alice", 10_000), ("bob", 5_000)]
    )
    db.commit()
    return db


def process_payment(
    broker: arrival.Broker, ledger: sqlite3.Connection, msg: arrival.Message, *, crash: bool
) -> bool:
    """Charge once, then send the receipt and ack together. Returns whether it charged."""
    payment = json.loads(msg.body)
    inbox = arrival.inbox(ledger)
    with inbox.once(msg, ack=False) as fresh:  # the charge and the id commit together
        if fresh:
            ledger.execute(
                "UPDATE accounts SET cents = cents - ? WHERE customer = ?",
                (payment["cents"], payment["customer"]),
            )
    if crash:
        # the process dies here: the charge is committed, the ack is not
        msg.release()
        return fresh
    with broker.transaction("billing-1") as tx:
        # no id given: the receipt's id derives from the payment's, the same on a retry
        tx.send("receipts", json.dumps({"paid": payment["id"]}).encode())
        tx.ack(msg)
    return fresh


def main(data: str) -> dict[str, int]:
    broker = arrival.connect(data)
    broker.create_queue("payments", guarantee="exactly-once", ack_timeout=30.0)
    broker.create_queue("receipts", guarantee="exactly-once")
    ledger = open_ledger(Path(data) / "ledger.db")

    checkout = broker.producer(id="checkout")
    payments = [
        {"id": "pay-1", "customer": "alice", "cents": 1_250},
        {"id": "pay-2", "customer": "bob", "cents": 700},
        {"id": "pay-3", "customer": "alice", "cents": 99},
    ]
    for p in payments:
        checkout.send("payments", json.dumps(p).encode(), key=p["customer"], id=p["id"])
    checkout.send("payments", json.dumps(payments[1]).encode(), key="bob", id="pay-2")  # retry
    print(f"sent {len(payments)} payments and one retry; stored: {broker.stats('payments').sent}")

    billing = broker.consumer("payments", group="billing")
    crashed_once = False
    charges = 0
    while (msg := billing.receive(timeout=0.5)) is not None:
        crash = msg.id == "pay-2" and not crashed_once
        crashed_once = crashed_once or crash
        charged = process_payment(broker, ledger, msg, crash=crash)
        charges += charged
        what = "charged" if charged else "already charged, only acked"
        print(f"{msg.id} (attempt {msg.attempt}): {what}{' -- then crashed' if crash else ''}")

    receipts = broker.consumer("receipts", group="mailer")
    got = [m.id for m in receipts.receive_batch(10, timeout=0.5)]
    balances = dict(ledger.execute("SELECT customer, cents FROM accounts ORDER BY customer"))
    print(f"receipts: {got}")
    print(f"balances: {balances}")
    broker.close()
    ledger.close()
    return {"charges": charges, "receipts": len(got), **balances}


if __name__ == "__main__":
    if len(sys.argv) > 1:
        result = main(sys.argv[1])
    else:
        with tempfile.TemporaryDirectory(prefix="arrival-payments-") as tmp:
            result = main(tmp)
    assert result == {"charges": 3, "receipts": 3, "alice": 8_651, "bob": 4_300}, result
    print("every payment charged once, every receipt sent once")

"""Payments with the worker runtime: exactly-once, a charge through the inbox, and a ledger
entry sent in the handler's transaction.

Run it: ``python examples/payments_app.py`` (on ``memory:``; about a second).
As a worker: ``BANK_DB=./bank.db arrival worker examples.payments_app:app --url ./data``
from the repository's root. ``examples/payments.py`` does the same by hand, without
``arrival.App``.

Why exactly-once: a payment must be neither lost nor charged twice, and the ledger must
hold exactly one entry per payment.

What happens:
1. Checkout sends three payments to an exactly-once queue with an idempotent producer,
   and retries one send (as after a timeout): the broker stores it once.
2. The billing handler charges each payment in the bank's SQLite database through the
   inbox (the charge and the payment id commit together), then sends a ledger entry with
   ``ctx.send``: on an exactly-once queue the runtime sends it in one transaction with
   the payment's ack.
3. On its first attempt at ``pay-2`` the handler fails after the charge committed and
   after ``ctx.send``, before the transaction commits (what a crash there would leave):
   the transaction is aborted, so the ledger entry and the ack vanish together. The
   payment comes back; the inbox skips the charge; the entry is sent again with the
   same id (``pay-2/0``: derived from the payment's id and its place among the
   handler's sends), and the ledger holds it once.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sqlite3
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import msgspec

import arrival

PAYMENTS: dict[str, Any] = {"guarantee": "exactly-once", "ack_timeout": 30.0}
LEDGER: dict[str, Any] = {"guarantee": "exactly-once"}

# A failed attempt is retried quickly here; the queue's own backoff starts at 1 s.
RETRY = arrival.RetryPolicy(
    max_attempts=5, backoff=arrival.Backoff(initial_s=0.05, max_s=0.5, jitter=0.5)
)


BALANCES = {"alice": 10_000, "bob": 5_000}  # a new bank database opens these accounts


class Payment(msgspec.Struct, frozen=True):
    id: str
    customer: str
    cents: int


class LedgerEntry(msgspec.Struct, frozen=True):
    payment: str
    customer: str
    cents: int


class SimulatedCrash(Exception):
    """Raised where a crash would stop the handler: after the charge, before the commit."""


@dataclass
class Bank:
    """Accounts in SQLite. ``fail_once`` names payments whose first attempt fails after the
    charge committed."""

    path: str
    fail_once: set[str] = field(default_factory=set)
    charges: list[str] = field(default_factory=list)  # payments actually charged
    _conn: sqlite3.Connection | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def connection(self) -> sqlite3.Connection:
        with self._lock:
            if self._conn is None:
                # used by one handler thread at a time (concurrency=1), never at once
                self._conn = sqlite3.connect(self.path, check_same_thread=False)
                self._conn.execute(
                    "CREATE TABLE IF NOT EXISTS accounts (customer TEXT PRIMARY KEY, cents INTEGER)"
                )
                self._conn.executemany(
                    "INSERT OR IGNORE INTO accounts VALUES (?, ?)", BALANCES.items()
                )
                self._conn.commit()
            return self._conn

    def open_accounts(self, balances: dict[str, int]) -> None:
        db = self.connection()
        db.executemany("INSERT OR REPLACE INTO accounts VALUES (?, ?)", balances.items())
        db.commit()

    def balances(self) -> dict[str, int]:
        rows = self.connection().execute("SELECT customer, cents FROM accounts ORDER BY customer")
        return dict(rows)

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None


def make_app(broker: str | arrival.Broker, bank: Bank) -> arrival.App:
    """The billing worker: one transactional handler on ``payments``."""
    # a stable instance name: a restarted worker fences its predecessor's transactions
    app = arrival.App(broker, name="billing", instance="billing-0")

    @app.handler("payments", retry=RETRY, **PAYMENTS)
    def charge(payment: Payment, ctx: arrival.Context) -> None:
        db = bank.connection()
        with arrival.inbox(db).once(ctx.message, ack=False) as fresh:  # the ack is in the tx
            if fresh:
                db.execute(
                    "UPDATE accounts SET cents = cents - ? WHERE customer = ?",
                    (payment.cents, payment.customer),
                )
        if fresh:
            bank.charges.append(payment.id)
        what = "charged" if fresh else "already charged: not charged again"
        print(f"  {payment.id} (attempt {ctx.attempt}): {what}", flush=True)
        # no id given: it derives from the payment's id, the same on every attempt
        ctx.send("ledger", LedgerEntry(payment.id, payment.customer, payment.cents))
        if payment.id in bank.fail_once:
            bank.fail_once.discard(payment.id)
            print(f"  {payment.id}: the handler fails before its transaction commits", flush=True)
            raise SimulatedCrash(f"stopped before committing {payment.id}")

    return app


# ``arrival worker examples.payments_app:app --url ./data`` runs this one.
app = make_app("./data", Bank(os.environ.get("BANK_DB", "bank.db")))

PAYMENTS_SENT = [
    Payment("pay-1", "alice", 1_250),
    Payment("pay-2", "bob", 700),
    Payment("pay-3", "alice", 99),
]


@dataclass(frozen=True)
class Outcome:
    stored: int  # payments the broker stored (sent: 3 and a retry)
    charges: list[str]  # payments charged, in order
    balances: dict[str, int]
    ledger: list[tuple[str, LedgerEntry]]  # (message id, entry), in ledger order
    stats: arrival.HandlerStats

    @property
    def ok(self) -> bool:
        paid = sorted(p.id for p in PAYMENTS_SENT)
        entries = sorted(entry.payment for _, entry in self.ledger)
        return sorted(self.charges) == paid and entries == paid


@contextlib.contextmanager
def quiet_runtime_logs() -> Iterator[None]:
    """The runtime logs each failure with its traceback; this example prints its own."""
    logger = logging.getLogger("arrival")
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        logger.setLevel(level)


def main(url: str = "memory:", bank_db: str = ":memory:") -> Outcome:
    bank = Bank(bank_db, fail_once={"pay-2"})
    bank.open_accounts(BALANCES)
    broker = arrival.connect(url)
    try:
        with quiet_runtime_logs():
            return _run(broker, bank)
    finally:
        broker.close()
        bank.close()


def _run(broker: arrival.Broker, bank: Bank) -> Outcome:
    broker.create_queue("payments", **PAYMENTS)
    broker.create_queue("ledger", **LEDGER)
    checkout = broker.producer(id="checkout")  # idempotent: a retried send is stored once
    for p in [*PAYMENTS_SENT, PAYMENTS_SENT[1]]:  # pay-2 twice: a retry after a timeout
        # JSON: what a handler decodes when a message names no content-type
        checkout.send("payments", msgspec.json.encode(p), key=p.customer, id=p.id)
    stored = broker.stats("payments").sent
    print(f"checkout sent {len(PAYMENTS_SENT)} payments and retried one; stored: {stored}")

    print("billing worker:")
    [stats] = make_app(broker, bank).run(until_idle=0.5)
    print(
        f"billing: {stats.handled} committed, {stats.failed} failed attempt(s), "
        f"{stats.retried} retried"
    )

    auditor = broker.consumer("ledger", group="audit")
    ledger: list[tuple[str, LedgerEntry]] = []
    # one key (customer) has one message in flight at a time: ack each to get the next
    while (msg := auditor.receive(timeout=0.2)) is not None:
        ledger.append((msg.id, arrival.decode(msg.body, LedgerEntry)))
        msg.ack()
    auditor.close()
    ledger.sort()
    print(f"ledger entries: {[mid for mid, _ in ledger]}")
    balances = bank.balances()
    print(f"balances: {balances}")
    return Outcome(stored, list(bank.charges), balances, ledger, stats)


if __name__ == "__main__":
    outcome = main()
    print("every payment charged once, one ledger entry each" if outcome.ok else "MISMATCH")
    sys.exit(0 if outcome.ok else 1)

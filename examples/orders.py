"""Orders: at-least-once, made idempotent with the inbox; a real crash applies nothing twice.

Run it: ``python examples/orders.py`` (in a fresh temporary directory; about two seconds).
As a worker: ``ORDERS_DB=./orders.db arrival worker examples.orders:app --url ./data``
from the repository's root.

Why at-least-once plus idempotency: an order must never be lost, and its effect (stock
taken, a shipment booked) must not happen twice. At-least-once keeps the order until the
handler acks it, so a crash before the ack delivers it again; the inbox makes that second
delivery harmless: the order's id is recorded in the warehouse's own SQLite database in
the same transaction as the effect, so a redelivered order finds its id and is only acked.

What happens:
1. Five orders are queued (a durable queue in a data directory).
2. A worker process takes them. The warehouse is busy on the first try of ``order-2``
   (a temporary error: the retry policy nacks it, and it comes back after a backoff).
   ``order-4`` asks for more than is in stock (a permanent error: dead-lettered at once).
   Then the worker process really dies (``os._exit``) right after ``order-3``'s effect
   committed and before its ack.
3. A new worker starts. ``order-3`` is delivered again; the inbox knows it, so the stock
   is not taken twice. Every order is shipped once, the bad one waits in ``orders.dlq``.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sqlite3
import subprocess
import sys
import tempfile
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgspec

import arrival

ORDERS: dict[str, Any] = {"guarantee": "at-least-once", "ack_timeout": 30.0, "max_deliveries": 5}
CRASH_EXIT = 70  # the crashing worker's exit status


class Order(msgspec.Struct, frozen=True):
    id: str
    customer: str
    item: str
    units: int


class WarehouseBusy(Exception):
    """The warehouse system timed out: trying again later works."""


class OutOfStock(Exception):
    """Not enough units: retrying the same order will not help."""


RETRY = arrival.RetryPolicy(
    max_attempts=4,
    backoff=arrival.Backoff(initial_s=0.05, multiplier=2.0, max_s=0.5, jitter=0.5),
    dead_letter_on=(OutOfStock,),
)

STOCK = {"widget": 10, "gadget": 5}  # what a new warehouse database starts with
BATCH = [
    Order("order-1", "alice", "widget", 2),
    Order("order-2", "bob", "gadget", 1),  # the warehouse is busy on its first attempt
    Order("order-3", "carol", "widget", 3),  # the worker dies after its effect, before its ack
    Order("order-4", "dave", "gadget", 50),  # more than in stock: dead-lettered
    Order("order-5", "erin", "widget", 1),
]
BUSY_ON_FIRST_ATTEMPT = {"order-2"}


@dataclass
class Warehouse:
    """The warehouse's database: stock and the shipments log (not idempotent by itself:
    it has no unique key, so a repeated effect would show as a second row)."""

    path: Path
    crash_after: str | None = None  # the order after whose effect the process dies
    name: str = "worker"
    skipped: list[str] = field(default_factory=list)  # redeliveries the inbox recognised
    _conn: sqlite3.Connection | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def connection(self) -> sqlite3.Connection:
        with self._lock:
            if self._conn is None:
                # used by one handler thread at a time (concurrency=1), never at once
                self._conn = sqlite3.connect(self.path, check_same_thread=False)
                self._conn.execute(
                    "CREATE TABLE IF NOT EXISTS stock (item TEXT PRIMARY KEY, units INTEGER)"
                )
                self._conn.execute(
                    "CREATE TABLE IF NOT EXISTS shipments (order_id TEXT, item TEXT, units INTEGER)"
                )
                self._conn.executemany("INSERT OR IGNORE INTO stock VALUES (?, ?)", STOCK.items())
                self._conn.commit()
            return self._conn

    def stock_up(self, stock: dict[str, int]) -> None:
        db = self.connection()
        db.executemany("INSERT OR REPLACE INTO stock VALUES (?, ?)", stock.items())
        db.commit()

    def ship(self, db: sqlite3.Connection, order: Order) -> None:
        """Take the units from stock and book the shipment, in the caller's transaction."""
        row = db.execute("SELECT units FROM stock WHERE item = ?", (order.item,)).fetchone()
        units = 0 if row is None else int(row[0])
        if units < order.units:
            raise OutOfStock(f"{order.units} {order.item}s ordered, {units} in stock")
        db.execute("UPDATE stock SET units = units - ? WHERE item = ?", (order.units, order.item))
        db.execute("INSERT INTO shipments VALUES (?, ?, ?)", (order.id, order.item, order.units))

    def shipments(self) -> dict[str, int]:
        rows = self.connection().execute(
            "SELECT order_id, COUNT(*) FROM shipments GROUP BY order_id ORDER BY order_id"
        )
        return dict(rows)

    def stock(self) -> dict[str, int]:
        return dict(self.connection().execute("SELECT item, units FROM stock ORDER BY item"))

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None


def make_app(broker: str | arrival.Broker, warehouse: Warehouse) -> arrival.App:
    """The fulfilment worker: one handler on ``orders``."""
    app = arrival.App(broker, name="fulfilment")

    @app.handler("orders", retry=RETRY, **ORDERS)
    def fulfil(order: Order, ctx: arrival.Context) -> None:
        who = f"  {warehouse.name}: {order.id} (attempt {ctx.attempt})"
        if order.id in BUSY_ON_FIRST_ATTEMPT and ctx.attempt == 1:
            print(f"{who}: the warehouse is busy; retried after a backoff", flush=True)
            raise WarehouseBusy("the warehouse system timed out")
        db = warehouse.connection()
        # the effect and the order's id commit in one SQLite transaction (or neither, on an
        # exception); the runtime acks the message after the handler returns (ack=False)
        try:
            with arrival.inbox(db).once(ctx.message, ack=False) as fresh:
                if fresh:
                    warehouse.ship(db, order)
        except OutOfStock as exc:
            print(f"{who}: {exc}; to the dead-letter queue", flush=True)
            raise
        if fresh:
            print(f"{who}: shipped", flush=True)
        else:
            warehouse.skipped.append(order.id)
            print(f"{who}: delivered again, already shipped: only acked", flush=True)
        if order.id == warehouse.crash_after:
            print(f"  {warehouse.name} dies after {order.id}'s effect, before its ack", flush=True)
            os._exit(CRASH_EXIT)  # a real crash: no cleanup, no ack, no close

    return app


# ``arrival worker examples.orders:app --url ./data`` runs this one.
app = make_app("./data", Warehouse(Path(os.environ.get("ORDERS_DB", "orders.db"))))


@dataclass(frozen=True)
class Outcome:
    crash_exit: int  # the first worker's exit status
    shipments: dict[str, int]  # rows in the shipments log, per order
    stock: dict[str, int]
    skipped: list[str]  # redeliveries the inbox recognised (the second worker)
    dead_letters: list[arrival.DeadMessage]
    stats: arrival.HandlerStats  # the second worker's

    @property
    def ok(self) -> bool:
        return self.crash_exit == CRASH_EXIT and all(n == 1 for n in self.shipments.values())


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


def crashing_worker(data: str, db: str, crash_after: str) -> None:
    """The first worker, in its own process: it dies inside ``fulfil``."""
    warehouse = Warehouse(Path(db), crash_after=crash_after, name="worker 1")
    with quiet_runtime_logs():
        make_app(data, warehouse).run(until_idle=1.0)  # the bound if it does not die
    sys.exit(f"worker 1 did not crash after {crash_after}")


def main(directory: str | None = None) -> Outcome:
    if directory is None:
        with tempfile.TemporaryDirectory(prefix="arrival-orders-") as tmp:
            return _run(Path(tmp))
    return _run(Path(directory))


def _run(root: Path) -> Outcome:
    data, db = root / "data", root / "warehouse.db"
    warehouse = Warehouse(db, name="worker 2")
    warehouse.stock_up(STOCK)
    with arrival.connect(data) as broker:
        broker.create_queue("orders", **ORDERS)
        producer = broker.producer()
        for order in BATCH:
            # JSON: what a handler decodes when a message names no content-type
            producer.send("orders", msgspec.json.encode(order), key=order.customer, id=order.id)
    print(f"queued {len(BATCH)} orders; stock: {STOCK}")

    print("worker 1 starts (its own process)")
    crash = subprocess.run(
        [sys.executable, __file__, "--crash-after", "order-3", str(data), str(db)],
        check=False,
    )
    print(f"worker 1 died with exit status {crash.returncode}")

    print("worker 2 starts")
    with arrival.connect(data) as broker, quiet_runtime_logs():
        [stats] = make_app(broker, warehouse).run(until_idle=0.5)
        letters = broker.dead_letters("orders").list()
    shipments, stock = warehouse.shipments(), warehouse.stock()
    warehouse.close()
    print(
        f"worker 2: {stats.handled} handled, {stats.retried} retried, "
        f"{stats.dead_lettered} dead-lettered"
    )
    for d in letters:
        print(f"in orders.dlq: {d.id} from {d.origin_queue}/{d.origin_group}: {d.last_error}")
    print(f"shipments per order: {shipments}")
    print(f"stock: {stock}")
    twice = sorted(o for o, n in shipments.items() if n > 1)
    print(f"applied twice: {twice or 'none'}")
    return Outcome(crash.returncode, shipments, stock, warehouse.skipped, letters, stats)


if __name__ == "__main__":
    if sys.argv[1:2] == ["--crash-after"]:
        crashing_worker(sys.argv[3], sys.argv[4], sys.argv[2])
    sys.exit(0 if main().ok else 1)

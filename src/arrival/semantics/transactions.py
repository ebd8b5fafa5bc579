"""Transactional ids, their epochs, and the decision whether a commit may take effect.

A transactional id names one logical processor ("billing-1"). Opening it again gives a
new epoch and fences every earlier one, so a zombie (a paused or partitioned earlier
holder) can never commit. Epochs are ``(broker epoch, counter)``: the broker's own epoch
grows at every restart, so an epoch handed out before a crash is older than every epoch
handed out after it, without writing anything per transaction.

Invariants:
1. At most one epoch per transactional id may commit: the newest.
2. A commit after ``started + timeout`` is refused: the transaction was aborted.
3. Nothing here reads a clock: ``now`` is passed in.
"""

from __future__ import annotations

import itertools

from arrival.errors import ProducerFenced, TransactionTimedOut

__all__ = ["TransactionTable"]


class TransactionTable:
    def __init__(self, broker_epoch: int) -> None:
        self.broker_epoch = broker_epoch
        self._counter = itertools.count(1)
        self.current: dict[str, int] = {}

    def begin(self, tid: str) -> tuple[int, int]:
        """Open ``tid``: the returned epoch fences every earlier holder."""
        n = next(self._counter)
        self.current[tid] = n
        return (self.broker_epoch, n)

    def check(
        self, tid: str, epoch: tuple[int, int], started: float, timeout: float, now: float
    ) -> None:
        """Raise unless a commit by ``tid`` at ``epoch`` may take effect now."""
        broker_epoch, n = epoch
        if broker_epoch != self.broker_epoch:
            raise ProducerFenced(
                "transaction", tid, "the broker restarted since it began, which aborted it"
            )
        newest = self.current.get(tid)
        if newest != n:
            raise ProducerFenced("transaction", tid, "a newer holder opened the same id")
        if now - started > timeout:
            raise TransactionTimedOut(tid, timeout)

    def end(self, tid: str, epoch: tuple[int, int]) -> None:
        """Forget ``tid`` if ``epoch`` is still its newest (bounds the table's size)."""
        if epoch[0] == self.broker_epoch and self.current.get(tid) == epoch[1]:
            del self.current[tid]

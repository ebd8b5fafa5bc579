"""Crash worker: receive one message, ack it, report, then idle until killed.

    python ack_then_wait.py DATADIR

Output lines: ``READY``; ``ACKED id attempt`` once ``ack()`` returned; ``EMPTY`` if there
was nothing to receive.
"""

from __future__ import annotations

import sys
import time

from _common import AT_LEAST_ONCE_QUEUE, emit

import arrival


def main() -> None:
    broker = arrival.connect(sys.argv[1])
    broker.create_queue(AT_LEAST_ONCE_QUEUE, "at-least-once", max_deliveries=None)
    emit("READY")
    msg = broker.consumer(AT_LEAST_ONCE_QUEUE, "g").receive(timeout=5.0)
    if msg is None:
        emit("EMPTY")
        broker.close()
        return
    msg.ack()
    emit(f"ACKED {msg.id} {msg.attempt}")
    time.sleep(60)  # the parent kills us meanwhile


if __name__ == "__main__":
    main()

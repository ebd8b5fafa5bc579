"""Crash worker: consume an at-least-once queue, acking as it goes, until killed.

    python consumer.py DATADIR THREADS SEED

Each thread is a consumer of group ``g``. Output lines: ``READY``; ``GOT id attempt``
when a message is received; ``ACKING id`` just before its ack (or ack_batch) is called and
``ACKED id`` after it returned (a kill between the two leaves the ack's fate open);
``NACKED id`` after a nack returned; ``EMPTY`` when nothing arrived for a while.
"""

from __future__ import annotations

import random
import sys
import time

from _common import AT_LEAST_ONCE_QUEUE, body_of, emit, run_threads

import arrival

PROCESS_S = 0.0005  # "work" per message, so a run takes long enough to be killed mid-way


def main() -> None:
    datadir, threads, seed = sys.argv[1:4]
    broker = arrival.connect(datadir)
    broker.create_queue(AT_LEAST_ONCE_QUEUE, "at-least-once", max_deliveries=None)
    emit("READY")

    def run(tid: int) -> None:
        rng = random.Random(f"{seed}-{tid}")
        consumer = broker.consumer(AT_LEAST_ONCE_QUEUE, "g")
        while True:
            msgs = consumer.receive_batch(rng.randint(1, 20), timeout=1.0)
            if not msgs:
                return
            for m in msgs:
                if m.body != body_of(int(m.id)):
                    emit(f"CORRUPT {m.id}")
                emit(f"GOT {m.id} {m.attempt}")
            time.sleep(PROCESS_S * len(msgs))
            if rng.random() < 0.5:
                for m in msgs:
                    emit(f"ACKING {m.id}")
                consumer.ack_batch(msgs)
                for m in msgs:
                    emit(f"ACKED {m.id}")
                continue
            for m in msgs:
                if rng.random() < 0.05:
                    m.nack(0.0)
                    emit(f"NACKED {m.id}")
                else:
                    emit(f"ACKING {m.id}")
                    m.ack()
                    emit(f"ACKED {m.id}")

    run_threads(run, int(threads))
    broker.close()
    emit("EMPTY")


if __name__ == "__main__":
    main()

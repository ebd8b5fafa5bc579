"""Crash worker: send uniquely numbered messages to an at-least-once queue until killed.

    python producer.py DATADIR FIRST_ID STOP_ID THREADS SEED

Threads send concurrently (so sends share group commits), mixing ``send`` and
``send_batch``; each thread's messages carry key ``t<thread>`` and their number as id,
except batches sent as bare bodies (no key, no id: the body carries the number). Output lines:
``READY``; ``TRY lo hi`` before sending ids lo..hi; ``ACK lo hi`` after the send returned
(acknowledged); ``DONE`` when STOP_ID is reached.
"""

from __future__ import annotations

import random
import sys
import threading

from _common import AT_LEAST_ONCE_QUEUE, body_of, emit, run_threads

import arrival


def main() -> None:
    datadir, first, stop, threads, seed = sys.argv[1:6]
    next_id = int(first)
    stop_id = int(stop)
    lock = threading.Lock()
    broker = arrival.connect(datadir)
    broker.create_queue(AT_LEAST_ONCE_QUEUE, "at-least-once")
    producer = broker.producer()
    emit("READY")

    def run(tid: int) -> None:
        nonlocal next_id
        rng = random.Random(f"{seed}-{tid}")
        key = f"t{tid}"
        while True:
            n = 1 if rng.random() < 0.5 else rng.randint(2, 25)
            with lock:
                lo = next_id
                if lo >= stop_id:
                    return
                hi = min(lo + n, stop_id) - 1
                next_id = hi + 1
                emit(f"TRY {lo} {hi}")  # under the lock: TRY lines come in id order
            if lo == hi:
                producer.send(AT_LEAST_ONCE_QUEUE, body_of(lo), key=key, id=str(lo))
            elif rng.random() < 0.25:  # bare bodies: the bytes fast path, no id, no key
                producer.send_batch(AT_LEAST_ONCE_QUEUE, [body_of(i) for i in range(lo, hi + 1)])
            else:
                batch = [
                    arrival.Envelope(body_of(i), key=key, id=str(i)) for i in range(lo, hi + 1)
                ]
                producer.send_batch(AT_LEAST_ONCE_QUEUE, batch)
            emit(f"ACK {lo} {hi}")

    run_threads(run, int(threads))
    broker.close()
    emit("DONE")


if __name__ == "__main__":
    main()

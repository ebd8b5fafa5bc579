"""Crash worker: send to an at-most-once queue and consume it in the same process.

    python at_most_once.py DATADIR FIRST_ID COUNT SEED

One producer thread sends ids FIRST_ID.. (keys ``k0``..``k3``, mixing ``send`` and
``send_batch``); two consumers of group ``g`` and one of group ``h`` take them. Output
lines: ``READY``; ``TRY lo hi`` before a send; ``SENT lo hi`` after it returned;
``GOT group id`` for every delivery; ``CORRUPT id`` if a body does not match its id;
``DONE`` when everything sent was taken or dropped.
"""

from __future__ import annotations

import random
import sys
import threading
import time

from _common import AT_MOST_ONCE_QUEUE, body_of, emit

import arrival

CAPACITY = 200  # small enough that bursts overflow and drop


def main() -> None:
    datadir, first, count, seed = sys.argv[1:5]
    lo_id, n_ids = int(first), int(count)
    broker = arrival.connect(datadir)
    broker.create_queue(AT_MOST_ONCE_QUEUE, "at-most-once", capacity=CAPACITY, drop="oldest")
    consumers = [
        broker.consumer(AT_MOST_ONCE_QUEUE, "g"),
        broker.consumer(AT_MOST_ONCE_QUEUE, "g"),
        broker.consumer(AT_MOST_ONCE_QUEUE, "h"),
    ]
    sending = threading.Event()
    sending.set()
    emit("READY")

    def produce() -> None:
        rng = random.Random(f"{seed}-p")
        producer = broker.producer()
        i = lo_id
        while i < lo_id + n_ids:
            n = min(rng.choice([1, 1, 5, 50]), lo_id + n_ids - i)
            emit(f"TRY {i} {i + n - 1}")
            if n == 1:
                producer.send(AT_MOST_ONCE_QUEUE, body_of(i), key=f"k{i % 4}", id=str(i))
            else:
                batch = [
                    arrival.Envelope(body_of(j), key=f"k{j % 4}", id=str(j))
                    for j in range(i, i + n)
                ]
                producer.send_batch(AT_MOST_ONCE_QUEUE, batch)
            emit(f"SENT {i} {i + n - 1}")
            i += n
            time.sleep(rng.random() * 0.002)
        sending.clear()

    def consume(c: arrival.Consumer) -> None:
        while True:
            msgs = c.receive_batch(10, timeout=0.2)
            if not msgs and not sending.is_set():
                return
            for m in msgs:
                if m.body != body_of(int(m.id)):
                    emit(f"CORRUPT {m.id}")
                emit(f"GOT {c.group} {m.id}")

    threads = [threading.Thread(target=produce)]
    threads += [threading.Thread(target=consume, args=(c,)) for c in consumers]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    broker.close()
    emit("DONE")


if __name__ == "__main__":
    main()

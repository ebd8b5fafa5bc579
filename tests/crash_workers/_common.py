"""What the crash workers share: line output that survives SIGKILL, and the queue names.

A worker reports on stdout, one line per event, flushed at once: a line that reached the
parent happened; a line cut short by SIGKILL is discarded by the parent.
"""

from __future__ import annotations

import sys
import threading
from collections.abc import Callable

AT_LEAST_ONCE_QUEUE = "crash-alo"
AT_MOST_ONCE_QUEUE = "crash-amo"

_out_lock = threading.Lock()


def emit(line: str) -> None:
    """Write one whole line and flush it: one write(2) of less than PIPE_BUF bytes."""
    with _out_lock:
        sys.stdout.write(line + "\n")
        sys.stdout.flush()


def body_of(n: int) -> bytes:
    return f"message {n}".encode()


def run_threads(target: Callable[[int], None], threads: int) -> None:
    """Run ``target(i)`` in ``threads`` threads and wait for all of them."""
    workers = [threading.Thread(target=target, args=(t,)) for t in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()

"""Crash worker: consume-transform-produce, exactly once, until killed or drained.

    python ctp.py DATADIR BATCH RUN IDS

Consumes the exactly-once queue ``in`` (group ``ctp``) with ``Consumer.process``
(transactional id ``ctp-1``, up to ``BATCH`` inputs per transaction) and sends, for each
input, one output to the exactly-once queue ``out`` with body ``out of <input body>``
and header ``run: RUN``. The output's id is ``<input id>/0`` as ``process`` derives it
(IDS=``derived``), or ``<input id>@RUN`` (IDS=``per-run``: a transaction whose outputs
took effect without its acks would then show as a second output for its input, where a
derived id would have it deduplicated away).

Environment: ``CTP_HANDLER_SLEEP_S``, seconds of "work" per input, so that a kill lands
inside a transaction (between its first input and its commit); ``ARRIVAL_CRASHPOINTS``
(see ``arrival._crash``) makes the process kill itself around the writer's commits.

Output lines: ``READY``; ``GOT id attempt`` when the handler is called for an input;
``COMMIT id ...`` once a transaction's commit returned, with its inputs' ids;
``DONE committed failed aborted`` when nothing came for ``IDLE_S`` (``in`` is drained).
"""

from __future__ import annotations

import os
import sys
import time

from _common import emit

import arrival

IN_QUEUE = "in"
OUT_QUEUE = "out"
GROUP = "ctp"
TRANSACTIONAL_ID = "ctp-1"
IDLE_S = 0.5  # nothing received for this long: the input queue is drained
COMMIT_LINE_IDS = 60  # ids per COMMIT line: well under PIPE_BUF, so a line is one write


def declare(broker: arrival.Broker) -> None:
    """The queues, as the test declares them (max_deliveries=None: no kill count can
    dead-letter an input)."""
    broker.create_queue(IN_QUEUE, "exactly-once", max_deliveries=None)
    broker.create_queue(OUT_QUEUE, "exactly-once", max_deliveries=None)


def main() -> None:
    datadir, batch, run, ids = sys.argv[1:5]
    if ids not in ("derived", "per-run"):
        raise SystemExit(f"IDS must be 'derived' or 'per-run', not {ids!r}")
    sleep_s = float(os.environ.get("CTP_HANDLER_SLEEP_S") or 0.0)
    broker = arrival.connect(datadir)
    declare(broker)
    consumer = broker.consumer(IN_QUEUE, GROUP)
    emit("READY")

    def handler(msg: arrival.Message, out: arrival.Outputs) -> None:
        emit(f"GOT {msg.id} {msg.attempt}")
        if sleep_s:
            time.sleep(sleep_s)
        out.send(
            OUT_QUEUE,
            b"out of " + msg.body,
            headers={"run": run},
            id=f"{msg.id}@{run}" if ids == "per-run" else None,
        )

    def committed(msgs: list[arrival.Message]) -> None:
        for lo in range(0, len(msgs), COMMIT_LINE_IDS):
            emit("COMMIT " + " ".join(m.id for m in msgs[lo : lo + COMMIT_LINE_IDS]))

    result = consumer.process(
        handler,
        transactional_id=TRANSACTIONAL_ID,
        batch=int(batch),
        idle=IDLE_S,
        on_commit=committed,
    )
    broker.close()
    emit(f"DONE {result.committed} {result.failed} {result.aborted}")


if __name__ == "__main__":
    main()

"""Crash points: named places where a test build can kill the process on purpose.

Armed by the environment variable ``ARRIVAL_CRASHPOINTS`` as ``name=probability`` pairs
separated by commas (``writer.after-write=0.05``), seeded by ``ARRIVAL_CRASH_SEED``.
When unset, ``hit()`` is one global lookup. The process dies by SIGKILL, as a real crash:
no ``finally`` blocks, no flushing.
"""

from __future__ import annotations

import os
import random
import signal

__all__ = ["POINTS", "hit"]

POINTS = (
    "writer.before-commit",  # the batch is built, nothing is written
    "writer.after-commit",  # durable, but no send has been acknowledged yet
    "writer.after-ack",  # durable and acknowledged
)

_armed: dict[str, float] = {}
_rng = random.Random(int(os.environ.get("ARRIVAL_CRASH_SEED", "0") or 0))

for _part in filter(None, os.environ.get("ARRIVAL_CRASHPOINTS", "").split(",")):
    _name, _, _p = _part.partition("=")
    if _name not in POINTS:
        raise ValueError(f"ARRIVAL_CRASHPOINTS names unknown point {_name!r}; known: {POINTS}")
    _armed[_name] = float(_p or 1.0)


def hit(name: str) -> None:
    """Kill the process here if ``name`` is armed and its coin comes up."""
    if _armed and name in _armed and _rng.random() < _armed[name]:
        os.kill(os.getpid(), signal.SIGKILL)

"""Dead-letter replays, written once for both APIs: the loop guard's result and pacing.

``replay_steps()`` decides everything and does no waiting: it yields what it waits for
(a backend call, a pause) and the blocking or the asyncio ``DeadLetters`` drives it
(``_pending.drive`` / ``adrive``), so the two cannot drift apart.

Invariants:
1. Without a ``rate`` a replay is one backend call, so it is atomic: every letter it
   replays and every letter the loop guard quarantines is moved in one commit.
2. With a ``rate`` the letters are chosen once, when the replay starts, and sent in
   chunks of at most ``chunk_size(rate)`` letters (one commit each). A chunk waits until
   ``start + replayed / rate`` on the monotonic clock, so after ``t`` seconds at most
   ``rate * t + chunk`` letters went back. A letter that fails again and returns to the
   dead-letter queue meanwhile is left for the next replay: a paced replay always ends.
3. The loop guard is the engine's decision, in every chunk; this module only predicts it
   to size the chunks and the progress total.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Callable, Generator, Iterable
from dataclasses import dataclass
from typing import Any

from arrival._backend import Backend, Where
from arrival._pending import Steps
from arrival.engine import DeadMessage
from arrival.errors import UsageError

__all__ = [
    "DEFAULT_MAX_REPLAYS",
    "Offsets",
    "Progress",
    "Replayed",
    "chunk_size",
    "replay_steps",
]

DEFAULT_MAX_REPLAYS = 3
"""Replays after which a letter is quarantined instead. A message that used up its whole
delivery budget four times (before and after each of three replays) fails for a reason a
replay does not fix; replaying it forever only hides it and costs every consumer."""

CHUNK_S = 0.1  # a paced replay sends one chunk per ~0.1 s: smooth, yet few commits
MAX_CHUNK = 1000  # letters per commit at most, however high the rate

# The clock and the sleeps a paced replay uses: monotonic, so a wall-clock step neither
# stalls nor bursts it. Tests replace these three to pace on a fake clock.
monotonic: Callable[[], float] = time.monotonic
sleep: Callable[[float], None] = time.sleep
async_sleep: Callable[[float], Any] = asyncio.sleep

Progress = Callable[["Replayed", int], None]
"""Called after each chunk with the result so far and how many letters the replay will
go through in all (replayed or quarantined)."""


class Replayed(list[DeadMessage]):
    """What a replay sent back: a list of the letters replayed, oldest first, so code
    that treats it as a list keeps working. ``quarantined`` holds the letters the loop
    guard kept in the dead-letter queue instead (already replayed ``max_replays`` times);
    on a dry run, those it would keep. List equality ignores ``quarantined``."""

    def __init__(
        self, replayed: Iterable[DeadMessage] = (), quarantined: Iterable[DeadMessage] = ()
    ) -> None:
        super().__init__(replayed)
        self.quarantined: list[DeadMessage] = list(quarantined)

    def __repr__(self) -> str:
        return f"Replayed({list.__repr__(self)}, quarantined={self.quarantined!r})"


@dataclass(frozen=True, slots=True)
class Offsets:
    """A ``where`` that selects letters by offset. A network client sends the offsets as
    they are, instead of listing the dead-letter queue to run the filter on each letter."""

    offsets: frozenset[int]

    def __call__(self, d: DeadMessage) -> bool:
        return d.offset in self.offsets


class _Pause:
    """A Pending that completes ``seconds`` from now: a blocking sleep when waited for,
    ``asyncio.sleep`` when awaited."""

    __slots__ = ("seconds",)

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds

    def done(self) -> bool:
        return False

    def add_done_callback(self, cb: Callable[[], None]) -> None:
        raise TypeError("a pause runs when waited for; it has no callbacks")

    def wait(self, timeout: float | None = None) -> None:
        sleep(self.seconds)

    def __await__(self) -> Generator[Any, None, None]:
        yield from async_sleep(self.seconds).__await__()


def chunk_size(rate: float) -> int:
    """Letters per chunk of a replay paced at ``rate`` letters/s: about ``CHUNK_S`` worth."""
    return max(1, min(MAX_CHUNK, int(rate * CHUNK_S)))


def _check(limit: int | None, max_replays: int | None, rate: float | None) -> None:
    if limit is not None and (not isinstance(limit, int) or isinstance(limit, bool) or limit < 0):
        raise UsageError(f"limit must be a whole number of letters >= 0 or None, not {limit!r}")
    if max_replays is not None and (
        not isinstance(max_replays, int) or isinstance(max_replays, bool) or max_replays < 1
    ):
        raise UsageError(f"max_replays must be >= 1 (None: no loop guard), not {max_replays!r}")
    if rate is not None and (
        not isinstance(rate, (int, float))
        or isinstance(rate, bool)
        or not math.isfinite(rate)
        or rate <= 0
    ):
        raise UsageError(f"rate must be a finite number of letters per second > 0, not {rate!r}")


def replay_steps(
    backend: Backend,
    queue: str,
    where: Where,
    *,
    limit: int | None,
    dry_run: bool,
    max_replays: int | None,
    rate: float | None,
    progress: Progress | None,
) -> Steps[Replayed]:
    """Replay ``queue``'s dead letters: in one commit, or paced at ``rate`` letters/s."""
    _check(limit, max_replays, rate)
    if rate is None or dry_run:  # a dry run sends nothing, so there is nothing to pace
        chosen, held = yield backend.replay_dead_letters(queue, where, limit, dry_run, max_replays)
        done = Replayed(chosen, held)
        if progress is not None and not dry_run:
            progress(done, len(chosen) + len(held))
        return done

    listed: list[DeadMessage] = yield backend.dead_letters(queue, None)
    plan: list[DeadMessage] = []
    replayable = 0  # as the engine will decide, unless the letters change meanwhile
    for d in listed:
        if limit is not None and replayable >= limit:
            break
        if where is None or where(d):
            plan.append(d)
            replayable += max_replays is None or d.replays < max_replays
    done = Replayed()
    size = chunk_size(rate)
    start = monotonic()
    i = 0
    while i < len(plan) and (limit is None or len(done) < limit):
        if done:
            delay = start + len(done) / rate - monotonic()
            if delay > 0:
                yield _Pause(delay)
        chunk: list[int] = []
        n = 0  # letters of the chunk that will go back
        while i < len(plan) and n < size:
            d = plan[i]
            chunk.append(d.offset)
            n += max_replays is None or d.replays < max_replays
            i += 1
        n_max = size if limit is None else min(size, limit - len(done))
        chosen, held = yield backend.replay_dead_letters(
            queue, Offsets(frozenset(chunk)), n_max, False, max_replays
        )
        done.extend(chosen)
        done.quarantined.extend(held)
        if progress is not None:
            progress(done, len(plan))
    return done

"""Game positions: at-most-once, conflated per player: the newest position wins.

Run it: ``python examples/game.py`` (on ``memory:``; about two seconds).
As a worker: ``arrival worker examples.game:app --url ./data`` from the repository's root.

Why at-most-once with conflation: a renderer needs each player's current position, not
the history. A position that arrives late is worse than none, so the queue keeps only the
latest message per key (the player): however far the renderer falls behind, it finds at
most one position per player waiting, and it is the newest.

What happens:
1. The game server sends 8 players' positions every 2 ms for 300 ticks (2,400
   messages); the renderer spends about 2 ms drawing one, so it can draw one position
   in 8. It draws a fraction of the positions, always the newest of a player, never an
   older one after a newer one, and ends with each player's last.
2. A spectator feed reads the same queue in its own consumer group, with a pydantic
   model (only when pydantic is installed: arrival does not need it).
3. A cheater sends a position off the map. Both message types bound the coordinates, so
   the position does not decode: each handler counts it as undecodable; on an
   at-most-once queue it is not retried.
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Annotated, Any

import msgspec

import arrival

POSITIONS: dict[str, Any] = {"guarantee": "at-most-once", "conflate": True}
PLAYERS = [f"player-{i}" for i in range(1, 9)]
TICKS = 300
MAP_SIZE = 1_000.0
TICK_S = 0.002  # the game loop's period: 500 ticks a second
FRAME_S = 0.002  # what the renderer spends drawing one position

Coordinate = Annotated[float, msgspec.Meta(ge=0.0, le=MAP_SIZE)]


class Position(msgspec.Struct, frozen=True):
    player: str
    tick: int
    x: Coordinate
    y: Coordinate


def position_at(player: str, tick: int) -> tuple[float, float]:
    """Where ``player`` is at ``tick`` (a walk along the diagonal; any path will do)."""
    start = 100.0 * PLAYERS.index(player)
    return (start + tick) % MAP_SIZE, (start + 2 * tick) % MAP_SIZE


@dataclass
class View:
    """One consumer's picture of the game (thread-safe)."""

    positions: dict[str, tuple[int, float, float]] = field(default_factory=dict)
    drawn: int = 0
    stale: int = 0  # a position older than one already drawn: never, by conflation
    slow_s: float = 0.0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def draw(self, player: str, tick: int, x: float, y: float) -> None:
        time.sleep(self.slow_s)
        with self._lock:
            self.drawn += 1
            if tick <= self.positions.get(player, (-1, 0.0, 0.0))[0]:
                self.stale += 1
                return
            self.positions[player] = (tick, x, y)


HAVE_PYDANTIC = importlib.util.find_spec("pydantic") is not None

if HAVE_PYDANTIC:
    from pydantic import BaseModel, Field

    class SpectatorPosition(BaseModel):
        """The same message as a pydantic model: arrival decodes either."""

        player: str
        tick: int
        x: float = Field(ge=0.0, le=MAP_SIZE)
        y: float = Field(ge=0.0, le=MAP_SIZE)


def make_app(broker: str | arrival.Broker, renderer: View, spectators: View) -> arrival.App:
    """The renderer, and the spectator feed when pydantic is installed."""
    app = arrival.App(broker, name="game")

    @app.handler("positions", group="renderer", **POSITIONS)
    def render(pos: Position) -> None:
        renderer.draw(pos.player, pos.tick, pos.x, pos.y)

    if HAVE_PYDANTIC:

        @app.handler("positions", group="spectators", **POSITIONS)
        def spectate(pos: SpectatorPosition) -> None:
            spectators.draw(pos.player, pos.tick, pos.x, pos.y)

    return app


# ``arrival worker examples.game:app --url ./data`` runs this one.
app = make_app("./data", View(), View())


@dataclass(frozen=True)
class Outcome:
    sent: int
    final: dict[str, tuple[int, float, float]]  # each player's last position sent
    rendered: dict[str, tuple[int, float, float]]
    drawn: int
    stale: int
    spectated: dict[str, tuple[int, float, float]] | None  # None without pydantic
    stats: dict[str, arrival.HandlerStats]  # by group

    @property
    def ok(self) -> bool:
        return (
            self.rendered == self.final
            and self.stale == 0
            and (self.spectated is None or self.spectated == self.final)
            and all(s.undecodable == 1 for s in self.stats.values())
        )


def wait_until(done: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not done():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} did not happen within {timeout} s")
        time.sleep(0.01)


@contextlib.contextmanager
def running(app: arrival.App) -> Iterator[None]:
    """Run ``app`` in a thread for the block; stop it gracefully after."""
    failure: list[BaseException] = []

    def run() -> None:
        try:
            app.run()
        except BaseException as exc:  # noqa: BLE001 - re-raised in the caller's thread
            failure.append(exc)

    thread = threading.Thread(target=run, name="game")
    thread.start()
    try:
        yield
    finally:
        wait_until(lambda: app.running or not thread.is_alive(), 10.0, "the app starting")
        app.stop()
        thread.join(30.0)
    if failure:
        raise failure[0]


@contextlib.contextmanager
def quiet_runtime_logs() -> Iterator[None]:
    """The runtime logs each undecodable message; this example prints its own account."""
    logger = logging.getLogger("arrival")
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        logger.setLevel(level)


def main(url: str = "memory:") -> Outcome:
    broker = arrival.connect(url)
    try:
        with quiet_runtime_logs():
            return _run(broker)
    finally:
        broker.close()


def _run(broker: arrival.Broker) -> Outcome:
    broker.create_queue("positions", **POSITIONS)
    renderer, spectators = View(slow_s=FRAME_S), View()
    game = make_app(broker, renderer, spectators)
    groups = {"renderer", "spectators"} if HAVE_PYDANTIC else {"renderer"}
    producer = broker.producer()

    def joined() -> bool:
        return {g.group for g in broker.stats("positions").groups if g.consumers} == groups

    def handled(group: str) -> int:
        s = next(s for s in game.stats() if s.group == group)
        return s.handled + s.failed + s.undecodable

    def send(pos: dict[str, Any]) -> None:
        producer.send("positions", msgspec.json.encode(pos), key=str(pos["player"]))

    with running(game):
        wait_until(joined, 10.0, "the consumers joining")
        print(
            f"the game sends {len(PLAYERS)} players' positions for {TICKS} ticks, "
            f"every {TICK_S * 1000:g} ms; the renderer takes ~{FRAME_S * 1000:g} ms per position"
        )
        start = time.monotonic()
        for tick in range(TICKS):
            time.sleep(max(0.0, start + tick * TICK_S - time.monotonic()))  # the game loop
            for player in PLAYERS:
                x, y = position_at(player, tick)
                send({"player": player, "tick": tick, "x": x, "y": y})

        def caught_up() -> bool:
            return all(g.backlog == 0 for g in broker.stats("positions").groups) and all(
                s.in_flight == 0 for s in game.stats()
            )

        wait_until(caught_up, 30.0, "the renderer catching up")
        before = {g: handled(g) for g in groups}
        print("a cheater sends player-1 off the map")
        send({"player": "player-1", "tick": TICKS, "x": MAP_SIZE * 5, "y": -1.0})
        wait_until(lambda: all(handled(g) > before[g] for g in groups), 10.0, "the cheat seen")

    sent = TICKS * len(PLAYERS)
    final = {p: (TICKS - 1, *position_at(p, TICKS - 1)) for p in PLAYERS}
    stats = {s.group: s for s in game.stats()}
    print(
        f"renderer: {sent:,} positions sent, {renderer.drawn:,} drawn, "
        f"{renderer.stale} older than one already drawn; "
        f"every player at its last position: {renderer.positions == final}"
    )
    if HAVE_PYDANTIC:
        print(
            f"spectators (pydantic): {spectators.drawn:,} drawn; "
            f"every player at its last position: {spectators.positions == final}"
        )
    else:
        print("spectators: skipped (pydantic is not installed)")
    for group, s in sorted(stats.items()):
        print(f"{group}: undecodable positions dropped: {s.undecodable}")
    return Outcome(
        sent=sent,
        final=final,
        rendered=dict(renderer.positions),
        drawn=renderer.drawn,
        stale=renderer.stale,
        spectated=dict(spectators.positions) if HAVE_PYDANTIC else None,
        stats=stats,
    )


if __name__ == "__main__":
    sys.exit(0 if main().ok else 1)

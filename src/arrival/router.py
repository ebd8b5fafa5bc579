"""The hybrid router: message types mapped to queues of the guarantee each one needs.

```python
router = arrival.Router(broker)
router.route("analytics", "events", guarantee="at-most-once")
router.route("order", "orders", guarantee="at-least-once")
router.route("payment", "payments", guarantee="exactly-once")
router.send("payment", b'{"id": 7}', id="pay-7")
```

A type may state what it requires (``requires=``, or a class attribute
``__guarantee__ = "exactly-once"``). A route that would deliver a type with a weaker
guarantee than it requires is refused when it is declared, and so is a route to an
existing queue of a weaker guarantee: the mistake shows at start-up, not in production.
Queues are created on first use.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import msgspec

from arrival.errors import GuaranteeMismatch, UsageError
from arrival.model import Guarantee

if TYPE_CHECKING:
    from arrival._sync import Broker, Consumer

__all__ = ["Route", "Router", "RoutingError"]

_STRENGTH = {Guarantee.AT_MOST_ONCE: 0, Guarantee.AT_LEAST_ONCE: 1, Guarantee.EXACTLY_ONCE: 2}
H_TYPE = "arrival-type"


class RoutingError(UsageError):
    """A route that would break a message type's required guarantee, or an unknown type."""


@dataclass(frozen=True, slots=True)
class Route:
    type_name: str
    queue: str
    guarantee: Guarantee
    requires: Guarantee | None
    options: Mapping[str, Any] = field(default_factory=dict)


def _name(message_type: str | type) -> str:
    if isinstance(message_type, str):
        if not message_type:
            raise RoutingError("a message type name is a non-empty str")
        return message_type
    if isinstance(message_type, type):
        return message_type.__name__
    raise RoutingError(f"a message type is a str or a class, not {type(message_type).__name__}")


def _guarantee(value: object, what: str) -> Guarantee:
    try:
        if not isinstance(value, str):
            raise ValueError(value)
        return Guarantee(value)
    except ValueError:
        choices = ", ".join(repr(g.value) for g in Guarantee)
        raise RoutingError(f"{what} must be one of {choices}, not {value!r}") from None


def weaker(a: Guarantee, b: Guarantee) -> bool:
    """True if ``a`` promises less than ``b``."""
    return _STRENGTH[a] < _STRENGTH[b]


class _Routes:
    """The routing decisions both APIs share: declaring, looking up and checking routes."""

    def __init__(self) -> None:
        self.routes: dict[str, Route] = {}
        self.created: set[str] = set()

    def declare(
        self,
        message_type: str | type,
        queue: str,
        guarantee: str | Guarantee | None,
        requires: str | Guarantee | None,
        queue_options: dict[str, Any],
        existing: Guarantee | None,
    ) -> Route:
        """Check a new route; ``existing`` is the guarantee of ``queue`` if it exists."""
        name = _name(message_type)
        if requires is None and isinstance(message_type, type):
            requires = getattr(message_type, "__guarantee__", None)
        need = None if requires is None else _guarantee(requires, f"what {name!r} requires")
        g = (
            _guarantee(guarantee, f"the guarantee of route {name!r}")
            if guarantee is not None
            else need or Guarantee.AT_LEAST_ONCE
        )
        if need is not None and weaker(g, need):
            raise RoutingError(
                f"route {name!r} -> {queue!r} would deliver {name!r} {g}, but it requires "
                f"{need}: route it to an {need} queue"
            )
        if name in self.routes:
            raise RoutingError(
                f"message type {name!r} is routed already (to {self.routes[name].queue!r})"
            )
        for other in self.routes.values():
            if other.queue == queue and (other.guarantee, other.options) != (g, queue_options):
                raise RoutingError(
                    f"queue {queue!r} is declared {other.guarantee} {dict(other.options)} by "
                    f"route {other.type_name!r} and {g} {queue_options} by route {name!r}"
                )
        if existing is not None and existing is not g:
            raise GuaranteeMismatch(queue, {"guarantee": (existing, g)})
        return Route(name, queue, g, need, dict(queue_options))

    def route_for(self, message_type: str | type) -> Route:
        name = _name(message_type)
        r = self.routes.get(name)
        if r is None:
            known = ", ".join(sorted(self.routes)) or "none"
            raise RoutingError(
                f"no route for message type {name!r} (routed: {known}); add one with "
                f"router.route({name!r}, queue, guarantee)"
            )
        return r

    def encode(
        self,
        message: str | type | msgspec.Struct,
        body: bytes | None,
        headers: Mapping[str, str] | None,
    ) -> tuple[Route, bytes, dict[str, str]]:
        h = dict(headers or {})
        if isinstance(message, msgspec.Struct):
            if body is not None:
                raise UsageError("send(obj) encodes obj itself; pass no body")
            r = self.route_for(type(message))
            body = msgspec.json.encode(message)
            h.setdefault("content-type", "application/json")
        else:
            r = self.route_for(message)
            if body is None:
                raise UsageError(f"send({r.type_name!r}, body) needs a body")
        h[H_TYPE] = r.type_name
        return r, body, h

    def check_consumer(self, r: Route, requires: str | Guarantee | None) -> None:
        need = r.requires if requires is None else _guarantee(requires, "requires")
        if need is not None and weaker(r.guarantee, need):
            raise RoutingError(
                f"a consumer of {r.type_name!r} requires {need}, but its queue {r.queue!r} "
                f"is {r.guarantee}"
            )


class Router:
    """Routes message types to queues; see the module docstring. ``arrival.aio.Router``
    is its async twin."""

    def __init__(self, broker: Broker) -> None:
        self._broker = broker
        self._r = _Routes()
        self._producer = broker.producer()

    def __repr__(self) -> str:
        return f"<arrival.Router {len(self._r.routes)} routes>"

    @property
    def routes(self) -> dict[str, Route]:
        return dict(self._r.routes)

    def route(
        self,
        message_type: str | type,
        queue: str,
        guarantee: str | Guarantee | None = None,
        *,
        requires: str | Guarantee | None = None,
        **queue_options: Any,
    ) -> Route:
        """Send ``message_type`` to ``queue``, declared with ``guarantee`` (default: what
        the type requires, else at-least-once) and ``queue_options`` on first use.

        Raises RoutingError if the guarantee is weaker than the type requires (from
        ``requires`` or the class's ``__guarantee__``), if the type is routed already,
        or if another route declares ``queue`` differently; GuaranteeMismatch or
        QueueSpecConflict if ``queue`` exists with another guarantee or settings."""
        exists = queue in self._broker.queues()
        existing = self._broker.describe(queue).guarantee if exists else None
        r = self._r.declare(message_type, queue, guarantee, requires, queue_options, existing)
        if exists:
            self._broker.create_queue(queue, r.guarantee.value, **queue_options)  # checks all
            self._r.created.add(queue)
        self._r.routes[r.type_name] = r
        return r

    def route_for(self, message_type: str | type) -> Route:
        return self._r.route_for(message_type)

    def _queue(self, r: Route) -> str:
        if r.queue not in self._r.created:
            self._broker.create_queue(r.queue, r.guarantee.value, **r.options)
            self._r.created.add(r.queue)
        return r.queue

    def send(
        self,
        message: str | type | msgspec.Struct,
        body: bytes | None = None,
        *,
        key: str | None = None,
        headers: Mapping[str, str] | None = None,
        id: str | None = None,  # noqa: A002 - the SPEC's name
    ) -> int | None:
        """Send to the queue of the message's type: ``send("payment", body)``, or
        ``send(obj)`` for a msgspec Struct routed by its class (encoded as JSON). The
        message carries its type in the ``arrival-type`` header."""
        r, data, h = self._r.encode(message, body, headers)
        return self._producer.send(self._queue(r), data, key=key, headers=h, id=id)

    def consumer(
        self,
        message_type: str | type,
        group: str = "default",
        *,
        requires: str | Guarantee | None = None,
        start: str = "earliest",
    ) -> Consumer:
        """A consumer of ``message_type``'s queue. ``requires`` (or the route's own
        requirement) is checked against the queue's guarantee: a handler needing
        exactly-once is refused a weaker queue."""
        r = self.route_for(message_type)
        self._r.check_consumer(r, requires)
        return self._broker.consumer(self._queue(r), group, start=start)

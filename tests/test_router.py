"""The hybrid router: types to queues of the right guarantee, refused when too weak."""

from __future__ import annotations

import msgspec
import pytest

import arrival
from arrival.errors import GuaranteeMismatch, QueueSpecConflict, UsageError
from arrival.router import RoutingError
from conftest import engine_of


class Payment(msgspec.Struct):
    __guarantee__ = "exactly-once"
    id: int
    cents: int


class Click(msgspec.Struct):
    page: str


@pytest.fixture
def router(broker: arrival.Broker) -> arrival.Router:
    r = arrival.Router(broker)
    r.route("analytics", "events", guarantee="at-most-once")
    r.route("order", "orders", guarantee="at-least-once")
    r.route("payment", "payments", guarantee="exactly-once")
    return r


def test_the_essays_hybrid_system_sends_each_type_to_its_guarantee(
    broker: arrival.Broker, router: arrival.Router
) -> None:
    events = router.consumer("analytics", "dash")
    router.send("analytics", b"view")
    router.send("order", b"o-1", key="customer-7")
    router.send("payment", b"p-1", id="pay-1")
    assert engine_of(broker).spec("events").guarantee is arrival.Guarantee.AT_MOST_ONCE
    assert engine_of(broker).spec("orders").guarantee is arrival.Guarantee.AT_LEAST_ONCE
    assert engine_of(broker).spec("payments").guarantee is arrival.Guarantee.EXACTLY_ONCE
    got = events.receive(timeout=1)
    assert got is not None
    assert got.body == b"view"
    assert got.headers["arrival-type"] == "analytics"
    order = router.consumer("order", "shipping").receive(timeout=1)
    assert order is not None
    assert (order.body, order.key) == (b"o-1", "customer-7")


def test_queues_are_created_on_first_use_not_before(
    broker: arrival.Broker, router: arrival.Router
) -> None:
    assert broker.queues() == []
    router.send("order", b"x")
    assert broker.queues() == ["orders", "orders.dlq"]


def test_a_route_weaker_than_the_type_requires_is_refused_at_declaration(
    broker: arrival.Broker,
) -> None:
    r = arrival.Router(broker)
    with pytest.raises(RoutingError, match="requires exactly-once") as info:
        r.route("refund", "refunds", guarantee="at-least-once", requires="exactly-once")
    assert "'refund'" in str(info.value)
    with pytest.raises(RoutingError, match="requires exactly-once"):
        r.route(Payment, "payments", guarantee="at-most-once")  # from __guarantee__
    assert r.routes == {}
    assert broker.queues() == []


def test_the_required_guarantee_is_the_default(broker: arrival.Broker) -> None:
    r = arrival.Router(broker)
    assert r.route(Payment, "payments").guarantee is arrival.Guarantee.EXACTLY_ONCE
    assert r.route("order", "orders").guarantee is arrival.Guarantee.AT_LEAST_ONCE
    assert r.route("metric", "metrics", requires="at-most-once").guarantee.value == "at-most-once"


def test_a_stronger_guarantee_than_required_is_fine(broker: arrival.Broker) -> None:
    r = arrival.Router(broker)
    route = r.route("email", "emails", guarantee="exactly-once", requires="at-least-once")
    assert route.requires is arrival.Guarantee.AT_LEAST_ONCE


def test_a_route_to_an_existing_queue_of_another_guarantee_is_refused(
    broker: arrival.Broker,
) -> None:
    broker.create_queue("payments", "at-least-once")
    r = arrival.Router(broker)
    with pytest.raises(GuaranteeMismatch) as info:
        r.route("payment", "payments", guarantee="exactly-once")
    assert info.value.differences["guarantee"][0] is arrival.Guarantee.AT_LEAST_ONCE


def test_a_route_to_an_existing_queue_with_other_settings_is_refused_at_once(
    broker: arrival.Broker,
) -> None:
    broker.create_queue("orders", "at-least-once", max_deliveries=3)
    r = arrival.Router(broker)
    with pytest.raises(QueueSpecConflict, match="max_deliveries"):
        r.route("order", "orders", guarantee="at-least-once", max_deliveries=5)
    r.route("order", "orders", guarantee="at-least-once", max_deliveries=3)


def test_one_queue_declared_two_ways_by_two_routes_is_refused(broker: arrival.Broker) -> None:
    r = arrival.Router(broker)
    r.route("order", "orders", guarantee="at-least-once")
    r.route("return", "orders", guarantee="at-least-once")  # same declaration: shared
    with pytest.raises(RoutingError, match="declared"):
        r.route("refund", "orders", guarantee="exactly-once")


def test_a_type_is_routed_once(router: arrival.Router) -> None:
    with pytest.raises(RoutingError, match="routed already"):
        router.route("order", "other")


def test_unknown_type_and_bad_arguments_are_usage_errors(router: arrival.Router) -> None:
    with pytest.raises(RoutingError, match="no route for message type 'refund'") as info:
        router.send("refund", b"x")
    assert "analytics, order, payment" in str(info.value)
    with pytest.raises(RoutingError, match="one of"):
        router.route("x", "xs", guarantee="twice")
    with pytest.raises(RoutingError, match="str or a class"):
        router.route(3, "xs")  # type: ignore[arg-type]
    with pytest.raises(UsageError, match="needs a body"):
        router.send("order")


def test_struct_messages_are_encoded_and_routed_by_class(
    broker: arrival.Broker,
) -> None:
    r = arrival.Router(broker)
    r.route(Payment, "payments")
    r.send(Payment(id=7, cents=1250), id="pay-7")
    msg = r.consumer(Payment, "billing").receive(timeout=1)
    assert msg is not None
    assert msgspec.json.decode(msg.body, type=Payment) == Payment(id=7, cents=1250)
    assert msg.headers == {"content-type": "application/json", "arrival-type": "Payment"}
    with pytest.raises(UsageError, match="pass no body"):
        r.send(Payment(id=8, cents=1), b"raw")  # type: ignore[arg-type]
    with pytest.raises(RoutingError, match="no route for message type 'Click'"):
        r.send(Click(page="/"))


def test_a_consumer_needing_more_than_the_route_gives_is_refused(router: arrival.Router) -> None:
    with pytest.raises(RoutingError, match="requires exactly-once"):
        router.consumer("order", "billing", requires="exactly-once")
    router.consumer("payment", "billing", requires="exactly-once").close()


def test_router_sends_are_idempotent_on_exactly_once_queues(
    broker: arrival.Broker, router: arrival.Router
) -> None:
    first = router.send("payment", b"p", id="pay-1")
    again = router.send("payment", b"p", id="pay-1")
    assert first == again
    assert broker.stats("payments").sent == 1


# -- the async twin ---------------------------------------------------------------------


def test_aio_router_routes_checks_and_sends() -> None:
    import asyncio

    import arrival.aio

    async def main() -> None:
        broker = await arrival.aio.connect("memory:")
        try:
            r = arrival.aio.Router(broker)
            await r.route("analytics", "events", guarantee="at-most-once")
            await r.route(Payment, "payments")
            with pytest.raises(RoutingError, match="requires exactly-once"):
                await r.route(
                    "refund", "refunds", guarantee="at-least-once", requires=Payment.__guarantee__
                )
            assert await broker.queues() == []  # created on first use
            events = await r.consumer("analytics", "dash")
            await r.send("analytics", b"view")
            first = await r.send(Payment(id=1, cents=5), id="pay-1")
            assert await r.send(Payment(id=1, cents=5), id="pay-1") == first  # dedup
            got = await events.receive(timeout=1)
            assert got is not None
            assert got.headers["arrival-type"] == "analytics"
            pay = await (await r.consumer(Payment, "billing", requires="exactly-once")).receive(
                timeout=1
            )
            assert pay is not None
            assert msgspec.json.decode(pay.body, type=Payment) == Payment(id=1, cents=5)
            with pytest.raises(RoutingError, match="requires exactly-once"):
                await r.consumer("analytics", "x", requires="exactly-once")
            await broker.create_queue("orders", "at-least-once")
            with pytest.raises(GuaranteeMismatch):
                await r.route("order", "orders", guarantee="exactly-once")
        finally:
            await broker.close()

    asyncio.run(main())

"""arrival.tracing: trace context in headers, spans by the messaging conventions, no cost
without opentelemetry.

OpenTelemetry lets a process set its tracer provider once. This module sets one, the
first time a test asks for spans, and it stays for the rest of the test session: a
``Switch`` that hands out a real SDK tracer (exporting to memory) only while a test of
this module runs, and the API's no-op tracer otherwise. Tests of other modules that run
later thus see no spans and no trace headers (a no-op tracer has no context to pass on
when none is current), and pay about a microsecond a send call. What happens with no
provider at all, and without opentelemetry, runs in subprocesses.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from opentelemetry import context as otel_context
from opentelemetry import propagate, trace
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace import TracerProvider as SdkTracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

import arrival
import arrival.aio
import arrival.tracing
from arrival.errors import MessageTooLarge, UnknownQueue, UsageError
from arrival.testing import FakeClock
from conftest import NO_BACKOFF, Stores

SUBPROCESS_TIMEOUT_S = 60.0
REMOTE_TRACE = "0af7651916cd43dd8448eb211c80319c"
REMOTE_SPAN = "b7ad6b7169203331"
REMOTE = f"00-{REMOTE_TRACE}-{REMOTE_SPAN}-01"  # the W3C spec's example


class _SwitchTracer(trace.Tracer):
    def __init__(self, switch: Switch, real: trace.Tracer) -> None:
        self._switch = switch
        self._real = real

    def _now(self) -> trace.Tracer:
        return self._real if self._switch.on else self._switch.noop

    def start_span(self, *args: Any, **kwargs: Any) -> trace.Span:
        return self._now().start_span(*args, **kwargs)

    def start_as_current_span(self, *args: Any, **kwargs: Any) -> Any:
        return self._now().start_as_current_span(*args, **kwargs)


class Switch(trace.TracerProvider):
    """An SDK tracer provider (SimpleSpanProcessor into an InMemorySpanExporter) while
    ``on``; the no-op tracer's behaviour while off."""

    def __init__(self) -> None:
        self.sdk = SdkTracerProvider()
        self.exporter = InMemorySpanExporter()
        self.sdk.add_span_processor(SimpleSpanProcessor(self.exporter))
        self.noop = trace.NoOpTracer()
        self.on = False

    def get_tracer(self, *args: Any, **kwargs: Any) -> trace.Tracer:
        return _SwitchTracer(self, self.sdk.get_tracer(*args, **kwargs))


def _switch() -> Switch:
    current = trace.get_tracer_provider()
    if isinstance(current, Switch):
        return current
    if not isinstance(current, trace.ProxyTracerProvider):
        pytest.skip(f"another tracer provider is set in this process: {current!r}")
    switch = Switch()
    trace.set_tracer_provider(switch)  # once per process: kept for the session, off
    return switch


@pytest.fixture
def spans() -> Iterator[InMemorySpanExporter]:
    """Spans of this test, exported to memory; none outside the test."""
    switch = _switch()
    switch.exporter.clear()
    switch.on = True
    try:
        yield switch.exporter
    finally:
        switch.on = False
        switch.exporter.clear()


@pytest.fixture
def mem() -> Iterator[arrival.Broker]:
    b = arrival.connect("memory:")
    try:
        yield b
    finally:
        b.close()


def _only(exporter: InMemorySpanExporter, name: str) -> ReadableSpan:
    found = [s for s in exporter.get_finished_spans() if s.name == name]
    assert len(found) == 1, [s.name for s in exporter.get_finished_spans()]
    return found[0]


def _traceparent(span: ReadableSpan) -> str:
    ctx = span.get_span_context()
    assert ctx is not None
    return f"00-{ctx.trace_id:032x}-{ctx.span_id:016x}-{int(ctx.trace_flags):02x}"


def _parent_id(span: ReadableSpan) -> int | None:
    return span.parent.span_id if span.parent is not None else None


def _span_id(span: ReadableSpan) -> int:
    ctx = span.get_span_context()
    assert ctx is not None
    return ctx.span_id


def _receive(c: arrival.Consumer) -> arrival.Message:
    msg = c.receive(timeout=5.0)
    assert msg is not None
    return msg


# -- producer spans --------------------------------------------------------------------


def test_send_makes_a_producer_span_whose_context_the_message_carries(
    mem: arrival.Broker, spans: InMemorySpanExporter
) -> None:
    mem.create_queue("orders", "at-least-once")
    offset = mem.producer().send("orders", b"o1", headers={"type": "order"}, id="order-1")
    span = _only(spans, "send orders")
    assert span.kind is SpanKind.PRODUCER
    assert dict(span.attributes or {}) == {
        "messaging.system": "arrival",
        "messaging.destination.name": "orders",
        "messaging.operation.type": "send",
        "messaging.operation.name": "send",
        "messaging.message.id": "order-1",
    }
    assert span.instrumentation_scope is not None
    assert span.instrumentation_scope.name == "arrival"
    assert span.instrumentation_scope.version == arrival.__version__
    assert span.status.status_code is StatusCode.UNSET
    (stored,) = mem.peek("orders")
    assert stored.offset == offset
    assert stored.headers == {"type": "order", "traceparent": _traceparent(span)}


def test_a_message_without_id_is_named_as_message_id_names_it(
    mem: arrival.Broker, spans: InMemorySpanExporter
) -> None:
    mem.create_queue("q", "at-least-once")
    mem.producer().send("q", b"first")
    span = _only(spans, "send q")
    msg = _receive(mem.consumer("q"))
    assert span.attributes is not None
    assert span.attributes["messaging.message.id"] == msg.id == f"q:{msg.offset}"


def test_an_at_most_once_send_has_no_message_id_to_name(
    mem: arrival.Broker, spans: InMemorySpanExporter
) -> None:
    mem.create_queue("prices", "at-most-once")
    c = mem.consumer("prices")
    mem.producer().send("prices", b"1.5")
    span = _only(spans, "send prices")
    assert span.attributes is not None
    assert "messaging.message.id" not in span.attributes
    assert _receive(c).headers == {"traceparent": _traceparent(span)}


def test_send_is_a_child_of_the_current_span(
    mem: arrival.Broker, spans: InMemorySpanExporter
) -> None:
    mem.create_queue("q", "at-least-once")
    with trace.get_tracer("app").start_as_current_span("checkout") as outer:
        mem.producer().send("q", b"x")
    send = _only(spans, "send q")
    assert _parent_id(send) == outer.get_span_context().span_id
    assert send.context is not None
    assert send.context.trace_id == outer.get_span_context().trace_id


@pytest.mark.parametrize("kind", ["bodies", "envelopes"])
def test_a_batch_is_one_span_and_every_message_carries_it(
    mem: arrival.Broker, spans: InMemorySpanExporter, kind: str
) -> None:
    mem.create_queue("q", "at-least-once")
    if kind == "bodies":
        mem.producer().send_batch("q", [b"a", b"b", b"c"])
    else:
        mem.producer().send_batch("q", [arrival.Envelope(b, key="k") for b in (b"a", b"b", b"c")])
    span = _only(spans, "send q")
    assert span.attributes is not None
    assert span.attributes["messaging.batch.message_count"] == 3
    assert "messaging.message.id" not in span.attributes
    assert [m.headers for m in mem.peek("q")] == [{"traceparent": _traceparent(span)}] * 3


def test_a_batch_of_one_is_a_single_message(
    mem: arrival.Broker, spans: InMemorySpanExporter
) -> None:
    mem.create_queue("q", "at-least-once")
    mem.producer().send_batch("q", [arrival.Envelope(b"a", id="only")])
    span = _only(spans, "send q")
    assert span.attributes is not None
    assert "messaging.batch.message_count" not in span.attributes
    assert span.attributes["messaging.message.id"] == "only"


def test_a_caller_set_traceparent_wins(mem: arrival.Broker, spans: InMemorySpanExporter) -> None:
    mem.create_queue("q", "at-least-once")
    mine = {"traceparent": REMOTE, "tracestate": "vendor=1"}
    p = mem.producer()
    p.send("q", b"single", headers=mine)
    p.send_batch("q", [arrival.Envelope(b"kept", headers=mine), arrival.Envelope(b"added")])
    single, kept, added = mem.peek("q")
    assert single.headers == kept.headers == mine
    batch = [s for s in spans.get_finished_spans() if s.name == "send q"][1]
    assert added.headers == {"traceparent": _traceparent(batch)}
    assert mine == {"traceparent": REMOTE, "tracestate": "vendor=1"}  # not changed


def test_tracestate_is_carried_when_the_context_has_one(
    mem: arrival.Broker, spans: InMemorySpanExporter
) -> None:
    mem.create_queue("q", "at-least-once")
    parent = propagate.extract({"traceparent": REMOTE, "tracestate": "congo=t61rcWkgMzE"})
    token = otel_context.attach(parent)
    try:
        mem.producer().send("q", b"x")
    finally:
        otel_context.detach(token)
    send = _only(spans, "send q")
    assert send.context is not None
    assert send.context.trace_id == int(REMOTE_TRACE, 16)
    assert _parent_id(send) == int(REMOTE_SPAN, 16)
    assert mem.peek("q")[0].headers == {
        "traceparent": _traceparent(send),
        "tracestate": "congo=t61rcWkgMzE",
    }


def test_a_sampled_out_trace_is_passed_on_unsampled(
    mem: arrival.Broker, spans: InMemorySpanExporter
) -> None:
    mem.create_queue("q", "at-least-once")
    token = otel_context.attach(propagate.extract({"traceparent": REMOTE[:-2] + "00"}))
    try:
        mem.producer().send("q", b"x")
    finally:
        otel_context.detach(token)
    assert spans.get_finished_spans() == ()  # nothing recorded
    _v, trace_id, span_id, flags = mem.peek("q")[0].headers["traceparent"].split("-")
    assert (trace_id, flags) == (REMOTE_TRACE, "00")  # the decision travels on
    assert span_id != REMOTE_SPAN  # the send's own (unrecorded) span


def test_a_failed_send_records_the_error(mem: arrival.Broker, spans: InMemorySpanExporter) -> None:
    p = mem.producer()
    with pytest.raises(UnknownQueue):
        p.send("nowhere", b"x")
    span = _only(spans, "send nowhere")
    assert span.status.status_code is StatusCode.ERROR
    assert span.status.description is not None
    assert "nowhere" in span.status.description
    assert span.attributes is not None
    assert span.attributes["error.type"] == "UnknownQueue"
    assert [e.name for e in span.events] == ["exception"]


def test_the_trace_context_counts_toward_the_size_limit(
    mem: arrival.Broker, spans: InMemorySpanExporter
) -> None:
    mem.create_queue("small", "at-least-once", max_message_bytes=1024)
    p = mem.producer()
    p.send("small", b"x" * 900)  # with its traceparent, well within
    with pytest.raises(MessageTooLarge):
        p.send("small", b"x" * 1000)  # fits alone; not with its trace context
    failed = [s for s in spans.get_finished_spans() if s.status.status_code is StatusCode.ERROR]
    assert len(failed) == 1
    assert len(mem.peek("small")) == 1


def test_an_empty_send_is_refused_without_a_span(
    mem: arrival.Broker, spans: InMemorySpanExporter
) -> None:
    mem.create_queue("q", "at-least-once")
    with pytest.raises(UsageError):
        mem.producer().send_batch("q", [])
    assert spans.get_finished_spans() == ()


def test_the_trace_check_runs_once_a_send_call_not_once_a_message(
    mem: arrival.Broker, spans: InMemorySpanExporter, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[int] = []
    real = arrival.tracing._sdk_tracer

    def counted() -> Any:
        calls.append(1)
        return real()

    monkeypatch.setattr(arrival.tracing, "_sdk_tracer", counted)
    mem.create_queue("q", "at-least-once")
    mem.producer().send_batch("q", [b"m"] * 500)
    assert len(calls) == 1
    assert len(spans.get_finished_spans()) == 1


def test_router_send_carries_the_trace(mem: arrival.Broker, spans: InMemorySpanExporter) -> None:
    router = arrival.Router(mem)
    router.route("order", "orders", guarantee="at-least-once")
    router.send("order", b"o")
    span = _only(spans, "send orders")
    assert mem.peek("orders")[0].headers == {
        "arrival-type": "order",
        "traceparent": _traceparent(span),
    }


def test_a_producer_with_an_id_sends_idempotently_in_a_span(
    mem: arrival.Broker, spans: InMemorySpanExporter
) -> None:
    mem.create_queue("pay", "exactly-once")
    p = mem.producer(id="checkout")
    p.send("pay", b"1", id="pay-1")
    p.send("pay", b"1", id="pay-1")  # stored once
    first, second = (s for s in spans.get_finished_spans() if s.name == "send pay")
    (stored,) = mem.peek("pay")
    assert stored.headers == {"traceparent": _traceparent(first)}  # the original's
    assert second.status.status_code is StatusCode.UNSET


# -- transactions: a create span per message -------------------------------------------


def test_a_transaction_makes_a_create_span_per_message(
    mem: arrival.Broker, spans: InMemorySpanExporter
) -> None:
    mem.create_queue("ledger", "exactly-once")
    with (
        trace.get_tracer("app").start_as_current_span("settle") as outer,
        mem.transaction("t1") as tx,
    ):
        tx.send("ledger", b"a", id="e-1")
        tx.send_batch("ledger", [b"b"])
    creates = [s for s in spans.get_finished_spans() if s.name == "create ledger"]
    assert len(creates) == 2
    for span in creates:
        assert span.kind is SpanKind.PRODUCER
        assert span.attributes is not None
        assert span.attributes["messaging.operation.type"] == "create"
        assert _parent_id(span) == outer.get_span_context().span_id
    assert creates[0].attributes is not None
    assert creates[0].attributes["messaging.message.id"] == "e-1"
    assert [m.headers for m in mem.peek("ledger")] == [
        {"traceparent": _traceparent(s)} for s in creates
    ]


def test_an_aborted_transaction_stores_nothing_but_its_spans_are_made(
    mem: arrival.Broker, spans: InMemorySpanExporter
) -> None:
    mem.create_queue("ledger", "exactly-once")
    tx = mem.transaction("t1")
    tx.send("ledger", b"a")
    tx.abort()
    assert mem.peek("ledger") == []
    assert len(spans.get_finished_spans()) == 1


def test_process_outputs_continue_the_trace(
    mem: arrival.Broker, spans: InMemorySpanExporter
) -> None:
    mem.create_queue("payments", "exactly-once")
    mem.create_queue("ledger", "exactly-once")
    mem.producer().send("payments", b"p", id="pay-1")

    def handler(msg: arrival.Message, out: arrival.Outputs) -> None:
        with arrival.tracing.process_span(msg):
            out.send("ledger", msg.body)

    c = mem.consumer("payments", "billing")
    result = c.process(handler, transactional_id="billing-1", limit=1)
    assert result.committed == 1
    send = _only(spans, "send payments")
    process = _only(spans, "process payments")
    create = _only(spans, "create ledger")
    assert _parent_id(process) == _span_id(send)
    assert _parent_id(create) == _span_id(process)
    (out,) = mem.peek("ledger")
    assert out.id == "pay-1/0"
    assert out.headers == {"traceparent": _traceparent(create)}


# -- consumer spans --------------------------------------------------------------------


def test_process_span_is_a_child_of_the_send(
    mem: arrival.Broker, spans: InMemorySpanExporter
) -> None:
    mem.create_queue("orders", "at-least-once")
    mem.producer().send("orders", b"o", id="o-1")
    msg = _receive(mem.consumer("orders", "billing"))
    with arrival.tracing.process_span(msg) as span:
        assert span is not None
        assert span.is_recording()
        assert trace.get_current_span() is span
        msg.ack()
    assert trace.get_current_span() is not span
    send = _only(spans, "send orders")
    process = _only(spans, "process orders")
    assert process.kind is SpanKind.CONSUMER
    assert _parent_id(process) == _span_id(send)
    assert dict(process.attributes or {}) == {
        "messaging.system": "arrival",
        "messaging.destination.name": "orders",
        "messaging.operation.type": "process",
        "messaging.operation.name": "process",
        "messaging.consumer.group.name": "billing",
        "messaging.message.id": "o-1",
        "messaging.arrival.attempt": 1,
    }
    assert process.status.status_code is StatusCode.UNSET


def test_process_span_records_a_failure_and_reraises(
    mem: arrival.Broker, spans: InMemorySpanExporter
) -> None:
    mem.create_queue("q", "at-least-once")
    mem.producer().send("q", b"x")
    msg = _receive(mem.consumer("q"))
    with pytest.raises(ValueError, match="bad order"), arrival.tracing.process_span(msg):
        raise ValueError("bad order")
    process = _only(spans, "process q")
    assert process.status.status_code is StatusCode.ERROR
    assert process.status.description == "ValueError: bad order"
    assert process.attributes is not None
    assert process.attributes["error.type"] == "ValueError"
    (event,) = process.events
    assert event.name == "exception"
    assert event.attributes is not None
    assert event.attributes["exception.message"] == "bad order"


def test_process_span_takes_the_group_it_is_given(
    mem: arrival.Broker, spans: InMemorySpanExporter
) -> None:
    mem.create_queue("q", "at-least-once")
    mem.producer().send("q", b"x")
    msg = _receive(mem.consumer("q", "g1"))
    with arrival.tracing.process_span(msg, group="billing-workers"):
        pass
    process = _only(spans, "process q")
    assert process.attributes is not None
    assert process.attributes["messaging.consumer.group.name"] == "billing-workers"


@pytest.mark.parametrize("traceparent", [None, "not-a-traceparent"])
def test_a_message_without_a_valid_context_is_processed_under_the_current_one(
    mem: arrival.Broker, spans: InMemorySpanExporter, traceparent: str | None
) -> None:
    mem.create_queue("q", "at-least-once")
    switch = _switch()
    switch.on = False  # sent untraced, or with a traceparent that is not one
    mem.producer().send("q", b"x", headers={"traceparent": traceparent} if traceparent else None)
    switch.on = True
    msg = _receive(mem.consumer("q"))
    with arrival.tracing.process_span(msg):
        pass
    assert _parent_id(_only(spans, "process q")) is None  # a root: no context to follow
    with (
        trace.get_tracer("app").start_as_current_span("worker") as outer,
        arrival.tracing.process_span(msg),
    ):
        pass
    process = [s for s in spans.get_finished_spans() if s.name == "process q"][1]
    assert _parent_id(process) == outer.get_span_context().span_id


def test_process_span_in_async_code(stores: Stores, spans: InMemorySpanExporter) -> None:
    async def main() -> dict[str, str]:
        broker = await stores.aopen()
        try:
            await broker.create_queue("q", "exactly-once")
            await broker.producer().send("q", b"x")
            c = broker.consumer("q", "g")
            msg = await c.receive(timeout=5.0)
            assert msg is not None
            with arrival.tracing.process_span(msg):
                await asyncio.sleep(0)  # the span stays current across an await
                async with broker.transaction("t") as tx:
                    await tx.send("q", b"reply")
                    await tx.ack(msg)
            reply = await c.receive(timeout=5.0)
            assert reply is not None
            return reply.headers
        finally:
            await broker.close()

    reply_headers = asyncio.run(main())
    send = _only(spans, "send q")
    process = _only(spans, "process q")
    create = _only(spans, "create q")
    assert _parent_id(process) == _span_id(send)
    assert _parent_id(create) == _span_id(process)
    assert reply_headers == {"traceparent": _traceparent(create)}


def test_async_send_batch_carries_the_trace(spans: InMemorySpanExporter) -> None:
    async def main() -> list[dict[str, str]]:
        broker = await arrival.aio.connect("memory:")
        try:
            await broker.create_queue("q", "at-least-once")
            await broker.producer().send_batch("q", [b"a", arrival.Envelope(b"b")])
            return [m.headers for m in await broker.peek("q")]
        finally:
            await broker.close()

    headers = asyncio.run(main())
    assert headers == [{"traceparent": _traceparent(_only(spans, "send q"))}] * 2


# -- the trace survives retries, dead-lettering and replays -----------------------------


def test_the_trace_survives_redelivery_dead_letter_and_replay(
    stores: Stores, clock: FakeClock, spans: InMemorySpanExporter
) -> None:
    broker = stores.open()
    broker.create_queue("q", "at-least-once", max_deliveries=2, backoff=NO_BACKOFF)
    broker.producer().send("q", b"x", headers={"type": "order"})
    send = _only(spans, "send q")
    traceparent = _traceparent(send)
    c = broker.consumer("q", "billing")
    for attempt in (1, 2):  # a nack, then the last failure: dead-lettered
        msg = _receive(c)
        assert (msg.attempt, msg.headers["traceparent"]) == (attempt, traceparent)
        with arrival.tracing.process_span(msg):
            msg.nack(delay=0, error="boom")
        clock.advance(1.0)
    assert c.receive(timeout=0) is None

    (dead,) = broker.dead_letters("q").list()
    assert dead.headers["traceparent"] == traceparent
    assert dead.headers["type"] == "order"
    ctx = arrival.tracing.extract(dead)
    assert trace.get_current_span(ctx).get_span_context().span_id == _span_id(send)

    broker.dead_letters("q").replay()
    again = _receive(c)
    assert again.headers["traceparent"] == traceparent
    assert again.headers["type"] == "order"
    with arrival.tracing.process_span(again):
        again.ack()
    processes = [s for s in spans.get_finished_spans() if s.name == "process q"]
    assert len(processes) == 3
    assert {_parent_id(s) for s in processes} == {_span_id(send)}
    attempts = [(s.attributes or {})["messaging.arrival.attempt"] for s in processes]
    assert attempts == [1, 2, again.attempt]


def test_a_rejected_message_keeps_its_trace(stores: Stores, spans: InMemorySpanExporter) -> None:
    broker = stores.open()
    broker.create_queue("q", "at-least-once")
    broker.producer().send("q", b"poison")
    msg = _receive(broker.consumer("q", "g"))
    msg.reject("unparseable")
    (dead,) = broker.dead_letters("q").list()
    assert dead.headers["traceparent"] == _traceparent(_only(spans, "send q"))
    assert dead.reason is not None
    assert "unparseable" in dead.reason


def test_the_trace_survives_a_restart(
    tmp_path: Path, clock: FakeClock, spans: InMemorySpanExporter
) -> None:
    with arrival.connect(tmp_path / "data", clock=clock) as b:
        b.create_queue("q", "at-least-once")
        b.producer().send("q", b"x")
    with arrival.connect(tmp_path / "data", clock=clock) as b:
        msg = _receive(b.consumer("q"))
        assert msg.headers == {"traceparent": _traceparent(_only(spans, "send q"))}


# -- extract and inject ------------------------------------------------------------------


def test_extract_reads_messages_and_mappings(mem: arrival.Broker) -> None:
    ctx = arrival.tracing.extract({"traceparent": REMOTE})
    assert ctx is not None
    remote = trace.get_current_span(ctx).get_span_context()
    assert (remote.trace_id, remote.span_id, remote.is_remote) == (
        int(REMOTE_TRACE, 16),
        int(REMOTE_SPAN, 16),
        True,
    )
    mem.create_queue("q", "at-least-once")
    mem.producer().send("q", b"x", headers={"traceparent": REMOTE})
    for source in (mem.peek("q")[0], _receive(mem.consumer("q"))):
        got = trace.get_current_span(arrival.tracing.extract(source)).get_span_context()
        assert got.span_id == int(REMOTE_SPAN, 16)


def test_extract_without_a_context_gives_the_current_one() -> None:
    with trace.get_tracer("app").start_as_current_span("outer"):
        ctx = arrival.tracing.extract({})
        assert ctx == otel_context.get_current()


@pytest.mark.parametrize("bad", [b"traceparent", 42, None])
def test_extract_refuses_what_is_not_a_message(bad: object) -> None:
    with pytest.raises(TypeError, match="a message or a mapping of headers"):
        arrival.tracing.extract(bad)


def test_inject_makes_a_create_span_for_one_message(spans: InMemorySpanExporter) -> None:
    mine = {"type": "order"}
    headers = arrival.tracing.inject(mine, "orders", message_id="o-1")
    create = _only(spans, "create orders")
    assert create.attributes is not None
    assert create.attributes["messaging.message.id"] == "o-1"
    assert headers == {"type": "order", "traceparent": _traceparent(create)}
    assert mine == {"type": "order"}
    assert arrival.tracing.inject(None, "orders") is not None
    kept = arrival.tracing.inject({"traceparent": REMOTE}, "orders")
    assert kept == {"traceparent": REMOTE}


# -- without a provider, and without opentelemetry (subprocesses) ------------------------

_SCENARIO = """
import asyncio, json, sys
{prelude}
import arrival, arrival.aio, arrival.tracing

out = {{"enabled": arrival.tracing.ENABLED}}
b = arrival.connect("memory:")
b.create_queue("q", "at-least-once")
b.create_queue("amo", "at-most-once")
b.create_queue("eo", "exactly-once")
b.create_queue("in", "at-least-once")
b.create_queue("out", "at-least-once")
p = b.producer()
p.send("in", b"traced", headers={{"traceparent": "{remote}"}})
p.send("q", b"single", headers={{"h": "v"}})
p.send_batch("q", [b"a", arrival.Envelope(b"b", key="k")])
p.send("amo", b"lossy")
with b.transaction("t") as tx:
    tx.send("eo", b"tx")
{extra}
out["q"] = [m.headers for m in b.peek("q")]
out["eo"] = [m.headers for m in b.peek("eo")]
c = b.consumer("amo")
out["amo"] = [c.receive(timeout=1.0).headers]
msg = b.consumer("in").receive(timeout=1.0)
with arrival.tracing.process_span(msg) as span:
    out["span"] = repr(span) if span is None else type(span).__name__
    p.send("out", b"from-handler")
out["from_handler"] = b.peek("out")[0].headers
out["extract"] = repr(arrival.tracing.extract(msg))
out["inject"] = arrival.tracing.inject({{"h": "v"}}, "q")

async def aio():
    ab = await arrival.aio.connect("memory:")
    await ab.create_queue("q", "at-least-once")
    await ab.producer().send("q", b"async")
    heads = [m.headers for m in await ab.peek("q")]
    await ab.close()
    return heads

out["aio"] = asyncio.run(aio())
b.close()
out["otel_modules"] = sorted(m for m in sys.modules if m.startswith("opentelemetry.trace"))
print(json.dumps(out))
"""

_PASS_THROUGH = f"""
from opentelemetry import context, propagate
token = context.attach(propagate.extract({{"traceparent": "{REMOTE}", "tracestate": "a=1"}}))
p.send("q", b"under-a-remote-context")
context.detach(token)
"""


def _run(prelude: str, extra: str = "", env: dict[str, str] | None = None) -> dict[str, Any]:
    code = _SCENARIO.format(
        prelude=textwrap.dedent(prelude), extra=textwrap.dedent(extra), remote=REMOTE
    )
    environ = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    environ.update(env or {})
    done = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=SUBPROCESS_TIMEOUT_S,
        env=environ,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    result: dict[str, Any] = json.loads(done.stdout)
    return result


def test_without_opentelemetry_sends_work_and_carry_nothing() -> None:
    out = _run('sys.modules["opentelemetry"] = None  # as if not installed')
    assert out["enabled"] is False
    assert out["q"] == [{"h": "v"}, {}, {}]
    assert out["eo"] == [{}]
    assert out["amo"] == [{}]
    assert out["aio"] == [{}]
    assert out["span"] == "None"
    assert out["from_handler"] == {}  # the handled message's traceparent is not passed on
    assert out["extract"] == "None"
    assert out["inject"] == {"h": "v"}
    assert out["otel_modules"] == []


def test_with_the_api_and_no_provider_no_context_is_invented() -> None:
    out = _run("", _PASS_THROUGH)
    assert out["enabled"] is True
    assert out["q"][:3] == [{"h": "v"}, {}, {}]
    assert out["eo"] == [{}]
    assert out["amo"] == [{}]
    assert out["aio"] == [{}]
    assert out["span"] == "NonRecordingSpan"
    assert out["inject"] == {"h": "v"}
    # a context that is current is passed on as it is, with no span of arrival's: the
    # remote one at a send, the handled message's inside process_span
    assert out["q"][3] == {"traceparent": REMOTE, "tracestate": "a=1"}
    assert out["from_handler"] == {"traceparent": REMOTE}


def test_a_provider_named_by_the_environment_is_found() -> None:
    out = _run("", env={"OTEL_PYTHON_TRACER_PROVIDER": "sdk_tracer_provider"})
    assert out["enabled"] is True
    traceparents = [h["traceparent"] for h in out["q"] + out["eo"] + out["amo"] + out["aio"]]
    assert len(traceparents) == 6
    assert len(set(traceparents[1:3])) == 1  # one batch, one span
    assert len(set(traceparents)) == 5
    assert out["span"] == "_Span"
    _v, trace_id, span_id, _flags = out["from_handler"]["traceparent"].split("-")
    assert trace_id == REMOTE_TRACE  # the handled message's trace, continued
    assert span_id != REMOTE_SPAN


# -- the worker runtime ----------------------------------------------------------------


def test_the_app_traces_send_retries_process_and_outputs(
    spans: InMemorySpanExporter,
) -> None:
    clock = FakeClock()
    broker = arrival.connect("memory:", clock=clock)
    broker.create_queue("orders", "at-least-once", dead_letter="orders.dlq")
    broker.create_queue("payments", "exactly-once")
    broker.create_queue("ledger", "exactly-once")
    app = arrival.App(broker)

    @app.handler("orders")
    def order(body: bytes, ctx: arrival.Context) -> None:  # sync: runs in a thread
        assert trace.get_current_span().is_recording()  # its process span, across threads
        if ctx.attempt == 1:
            raise ConnectionError("retry me")
        ctx.send("payments", body)

    @app.handler("payments")
    async def pay(body: bytes, ctx: arrival.Context) -> None:
        ctx.send("ledger", body)

    broker.producer().send("orders", b"{}", id="o-1")
    app.run(until_idle=0.1)
    clock.advance(3600)
    app.run(until_idle=0.1)
    finished = spans.get_finished_spans()
    send = _only(spans, "send orders")
    processes = [s for s in finished if s.name == "process orders"]
    assert [dict(s.attributes or {})["messaging.arrival.attempt"] for s in processes] == [1, 2]
    assert all(_parent_id(p) == _span_id(send) for p in processes)  # a retry keeps the trace
    assert processes[0].status.status_code is StatusCode.ERROR
    out = _only(spans, "send payments")  # the at-least-once output: sent on success
    assert _parent_id(out) == _span_id(processes[1])
    pay_span = _only(spans, "process payments")
    assert _parent_id(pay_span) == _span_id(out)
    create = _only(spans, "create ledger")  # the exactly-once output, in its transaction
    assert _parent_id(create) == _span_id(pay_span)
    (entry,) = broker.peek("ledger")
    assert entry.headers["traceparent"] == _traceparent(create)
    trace_ids = {s.get_span_context().trace_id for s in finished}  # type: ignore[union-attr]
    assert len(trace_ids) == 1
    broker.close()


def test_a_chunked_sync_handler_keeps_each_messages_sends_in_its_span(
    spans: InMemorySpanExporter,
) -> None:
    broker = arrival.connect("memory:")
    broker.create_queue("in", "at-least-once")
    broker.create_queue("out", "at-least-once")
    app = arrival.App(broker)

    @app.handler("in")
    def relay(body: bytes, ctx: arrival.Context) -> None:  # fast: handed chunks of messages
        ctx.send("out", body)

    broker.producer().send_batch("in", [str(i).encode() for i in range(200)])
    app.run(until_idle=0.1)
    finished = spans.get_finished_spans()
    process = {
        dict(s.attributes or {})["messaging.message.id"]: s
        for s in finished
        if s.name == "process in"
    }
    assert len(process) == 200
    sends = [s for s in finished if s.name == "send out"]
    assert len(sends) == 200
    by_id = {_span_id(p): p for p in process.values()}
    assert all(_parent_id(s) in by_id for s in sends)  # each under a process span ...
    assert len({_parent_id(s) for s in sends}) == 200  # ... its own message's
    broker.close()

"""OpenTelemetry tracing: trace context in message headers, spans by the messaging conventions.

With ``opentelemetry-api`` installed (``pip install 'arrival[tracing]'``), every send
writes the trace context (``traceparent``, and ``tracestate`` when the context has one)
into the headers of the messages it sends, and a consumer makes its processing a child of
the send with ``process_span(msg)``. Headers travel with the message, so the trace
survives redeliveries, dead-lettering and replays. Without opentelemetry nothing changes
and a send pays one boolean check.

Invariants:

1. ``ENABLED`` is decided once, at import: opentelemetry can be imported or not.
2. A span is made only when a tracer provider other than the API's default (an SDK's)
   is set. Without one, the current span's context, if there is one (say, one a web
   framework extracted from an incoming request), is passed on as it is: a trace context
   is never invented.
3. A message whose headers already hold a field the propagators write (``traceparent``,
   ``tracestate``, ``baggage``) keeps the caller's: the caller chose its context.
4. Headers are only added to, in a copy: a caller's dict is never changed.
5. Span names, kinds and attributes follow the OpenTelemetry messaging semantic
   conventions; what arrival adds is namespaced ``messaging.arrival.*``.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from arrival.engine import Send

if TYPE_CHECKING:
    from opentelemetry.context import Context
    from opentelemetry.trace import Span, Tracer

    from arrival._common import MessageBase
    from arrival._pending import Steps

try:
    from opentelemetry import context as _otel_context
    from opentelemetry import propagate, trace
    from opentelemetry.trace import SpanKind, Status, StatusCode
except ImportError:
    ENABLED = False
else:
    ENABLED = True

__all__ = [
    "ATTEMPT",
    "ENABLED",
    "SCHEMA_URL",
    "SYSTEM",
    "extract",
    "inject",
    "process_span",
    "record_failure",
    "resumed",
]

SYSTEM = "arrival"
"""The value of ``messaging.system`` on arrival's spans."""

ATTEMPT = "messaging.arrival.attempt"
"""arrival's own attribute on process spans: the delivery attempt, 1 on first delivery."""

SCHEMA_URL = "https://opentelemetry.io/schemas/1.27.0"
"""The semantic conventions the spans follow (the version that named the messaging
attributes used here)."""

INSTRUMENTATION = "arrival"  # the tracer's name: arrival instruments itself

# the messaging semantic conventions' attribute names
_SYSTEM = "messaging.system"
_DESTINATION = "messaging.destination.name"
_OPERATION_TYPE = "messaging.operation.type"
_OPERATION_NAME = "messaging.operation.name"
_MESSAGE_ID = "messaging.message.id"
_BATCH_COUNT = "messaging.batch.message_count"
_GROUP = "messaging.consumer.group.name"
_ERROR_TYPE = "error.type"

# A provider named by this variable is loaded by the API on the first
# get_tracer_provider(), so while it is set only that call can tell.
_PROVIDER_FROM_ENV = "OTEL_PYTHON_TRACER_PROVIDER" in os.environ

_tracer: Tracer | None = None  # arrival's tracer, once a real provider is set (then for good)


def _sdk_tracer() -> Tracer | None:
    """arrival's tracer if a tracer provider other than the API's default is set, else None.

    This runs on every send while no provider is set, so it reads the API's global
    first: ``trace.get_tracer_provider()`` gives the same answer but looks up an
    environment variable on each call (0.8 us here, a fifth of an in-memory send),
    where the read costs 0.05 us. Should a later API drop the global, ``getattr`` finds
    none and the public call answers. A provider can be set only once per process, so
    once one is found the answer is kept.
    """
    global _tracer
    if _tracer is not None:
        return _tracer
    if not _PROVIDER_FROM_ENV and getattr(trace, "_TRACER_PROVIDER", True) is None:
        return None
    provider = trace.get_tracer_provider()
    if isinstance(provider, (trace.ProxyTracerProvider, trace.NoOpTracerProvider)):
        return None
    from arrival import __version__  # here: arrival imports this module

    _tracer = provider.get_tracer(INSTRUMENTATION, __version__, schema_url=SCHEMA_URL)
    return _tracer


def _current_is_valid() -> bool:
    """Whether the current context holds a span context to pass on."""
    if not _otel_context.get_current():  # the common case, and the cheapest test
        return False
    return bool(trace.get_current_span().get_span_context().is_valid)


def _carrier(ctx: Context | None) -> dict[str, str]:
    """The headers the configured propagators write for ``ctx`` (None: the current one)."""
    carrier: dict[str, str] = {}
    propagate.inject(carrier, context=ctx)
    return carrier


def _with(headers: dict[str, str] | None, carrier: dict[str, str]) -> dict[str, str] | None:
    """``headers`` with ``carrier`` added, unless they hold a trace field already (then
    ``headers`` itself). ``carrier`` may be shared by several messages: nothing changes a
    message's headers once it is sent."""
    if not carrier:
        return headers
    if not headers:
        return carrier
    if not headers.keys().isdisjoint(carrier):
        return headers  # the caller set the context
    return {**headers, **carrier}


def _attributes(operation: str, queue: str) -> dict[str, Any]:
    return {
        _SYSTEM: SYSTEM,
        _DESTINATION: queue,
        _OPERATION_TYPE: operation,
        _OPERATION_NAME: operation,
    }


def _failed(span: Span, exc: BaseException) -> None:
    span.record_exception(exc)
    span.set_status(Status(StatusCode.ERROR, f"{type(exc).__name__}: {exc}"))
    span.set_attribute(_ERROR_TYPE, type(exc).__qualname__)


@contextlib.contextmanager
def resumed(span: Span | None) -> Iterator[None]:
    """Make ``span`` (from ``process_span``, possibly ended) current again, for work done
    for its message afterwards, elsewhere: what it sends then carries that span on."""
    if span is None or not ENABLED:
        yield
        return
    with trace.use_span(span, end_on_exit=False):
        yield


def record_failure(span: Span | None, exc: BaseException) -> None:
    """Mark ``span`` (from ``process_span``; None without opentelemetry) as failed by
    ``exc``, for code that handles the exception inside the span instead of raising it."""
    if span is not None:
        _failed(span, exc)


def inject(
    headers: Mapping[str, str] | None, queue: str, *, message_id: str | None = None
) -> dict[str, str] | None:
    """The headers to send one message to ``queue`` with, carrying the trace context.

    With a tracer provider set, a ``create {queue}`` span (kind PRODUCER) is made for the
    message and its context is written; without one, the current span's context, if
    there is one. Returns a copy of ``headers`` with the context added, or a plain copy
    (None stays None) when there is nothing to write, opentelemetry is not installed, or
    ``headers`` hold a ``traceparent`` already (the caller's context wins).

    arrival's own sends do this for you: use it for messages you forward by other means.
    """
    h = dict(headers) if headers else None
    if not ENABLED:
        return h
    tracer = _sdk_tracer()
    if tracer is None:
        return _with(h, _carrier(None)) if _current_is_valid() else h
    return _create(tracer, queue, message_id, h)


def _create(
    tracer: Tracer, queue: str, mid: str | None, headers: dict[str, str] | None
) -> dict[str, str] | None:
    attrs = _attributes("create", queue)
    if mid is not None:
        attrs[_MESSAGE_ID] = mid
    span = tracer.start_span(f"create {queue}", kind=SpanKind.PRODUCER, attributes=attrs)
    span.end()  # the message exists now; sending it is the commit's
    if not span.get_span_context().is_valid:
        return headers
    return _with(headers, _carrier(trace.set_span_in_context(span)))


# -- the send path's hooks: arrival's own, not part of the API ---------------------------


def traced_message(queue: str, message: Send) -> Send:
    """``traced_items`` for one message: an output of ``Consumer.process``."""
    tracer = _sdk_tracer()
    if tracer is None:
        if not _current_is_valid():
            return message
        mid, key, h, body = message
        return (mid, key, _with(h, _carrier(None)), body)
    mid, key, h, body = message
    return (mid, key, _create(tracer, queue, mid, h), body)


def traced_items(items: list[tuple[str, Send]]) -> list[tuple[str, Send]]:
    """A transaction's (queue, message) pairs with the trace context in their headers;
    ``items`` itself when there is none to add. With a provider, each message gets a
    ``create`` span of its own, as the conventions ask of messages sent together later
    (at commit)."""
    tracer = _sdk_tracer()
    if tracer is None:
        if not _current_is_valid():
            return items
        carrier = _carrier(None)
        return [(q, (mid, key, _with(h, carrier), body)) for q, (mid, key, h, body) in items]
    return [(q, (mid, key, _create(tracer, q, mid, h), body)) for q, (mid, key, h, body) in items]


def _stamped(
    carrier: dict[str, str], messages: Sequence[Send] | None, bodies: list[bytes] | None
) -> Sequence[Send]:
    if bodies is not None:  # bodies only: they become messages with headers
        return [(None, None, carrier, b) for b in bodies]
    assert messages is not None
    return [(mid, key, _with(h, carrier), body) for mid, key, h, body in messages]


SendSteps = Callable[[str, "Sequence[Send] | None", "list[bytes] | None"], "Steps[int | None]"]
"""A producer's send: ``run(queue, messages, bodies)``, steps that return the first offset."""


def traced_send(
    run: SendSteps, queue: str, messages: Sequence[Send] | None, bodies: list[bytes] | None
) -> Steps[int | None]:
    """``run(queue, messages, bodies)`` traced: in a ``send {queue}`` span whose context
    the messages carry, when a tracer provider is set; with the current context passed
    on when none is; as it is when there is no context either."""
    n = len(bodies) if bodies is not None else len(messages or ())
    tracer = _sdk_tracer() if n else None  # an empty send is refused: no span for it
    if tracer is None:
        if n and _current_is_valid():
            return run(queue, _stamped(_carrier(None), messages, bodies), None)
        return run(queue, messages, bodies)
    return _send_in_span(tracer, run, queue, messages, bodies, n)


def _send_in_span(
    tracer: Tracer,
    run: SendSteps,
    queue: str,
    messages: Sequence[Send] | None,
    bodies: list[bytes] | None,
    n: int,
) -> Steps[int | None]:
    attrs = _attributes("send", queue)
    mid = messages[0][0] if n == 1 and messages is not None else None
    if n > 1:  # the conventions: a batch's size, never on a single message
        attrs[_BATCH_COUNT] = n
    elif mid is not None:
        attrs[_MESSAGE_ID] = mid
    span = tracer.start_span(f"send {queue}", kind=SpanKind.PRODUCER, attributes=attrs)
    try:
        if span.get_span_context().is_valid:  # also when sampled out: that is passed on
            messages = _stamped(_carrier(trace.set_span_in_context(span)), messages, bodies)
            bodies = None
        first = yield from run(queue, messages, bodies)
        if n == 1 and mid is None and first is not None:
            span.set_attribute(_MESSAGE_ID, f"{queue}:{first}")  # as Message.id names it
        return first
    except Exception as exc:
        _failed(span, exc)
        raise
    finally:
        span.end()


def extract(msg_or_headers: Any) -> Context | None:
    """The OpenTelemetry context a message carries, from a received ``Message``, a
    ``DeadMessage``, a ``StoredMessage`` or a mapping of headers: start your own spans
    under it with ``tracer.start_as_current_span(name, context=extract(msg))``. A message
    without a trace context gives the current context. None when opentelemetry is not
    installed (``start_as_current_span`` takes None to mean the current context too)."""
    headers = msg_or_headers if isinstance(msg_or_headers, Mapping) else None
    if headers is None:
        headers = getattr(msg_or_headers, "headers", None)
        if not isinstance(headers, Mapping):
            raise TypeError(
                f"extract() takes a message or a mapping of headers, not "
                f"{type(msg_or_headers).__name__}"
            )
    if not ENABLED:
        return None
    return _extract(headers)


def _extract(headers: Mapping[str, str]) -> Context:
    """The current context, with the span context ``headers`` carry if they carry one."""
    return propagate.extract(headers, context=_otel_context.get_current())


@contextlib.contextmanager
def process_span(msg: MessageBase, *, group: str | None = None) -> Iterator[Span | None]:
    """Process ``msg`` in a ``process {queue}`` span (kind CONSUMER), a child of the span
    that sent it. A plain ``with``, in blocking and in async code::

        with arrival.tracing.process_span(msg):
            handle(msg)
            msg.ack()

    The span is current inside, so what the body sends carries it on. An exception is
    recorded and sets the span's status to ERROR, then propagates. ``group`` names the
    consumer group (default: the message's). Yields the span, or None when opentelemetry
    is not installed (then it does nothing). Without a tracer provider no span is made,
    and the message's context is current inside, so sends pass it on.

    The message's context is the span's parent, not a link: one message is processed
    here, so the trace reads as one tree from the send to its processing (a redelivery
    is a sibling, told apart by ``messaging.arrival.attempt``), which the messaging
    conventions allow for single-message processing.
    """
    if not ENABLED:
        yield None
        return
    tracer = _sdk_tracer()
    if tracer is None:  # no span to make: the message's context is passed on as it is
        token = _otel_context.attach(_extract(msg.headers))
        try:
            yield trace.get_current_span()
        finally:
            _otel_context.detach(token)
        return
    queue = msg.queue
    attrs = _attributes("process", queue)
    attrs[_GROUP] = msg.group if group is None else group
    attrs[_MESSAGE_ID] = msg.id
    attrs[ATTEMPT] = msg.attempt
    with tracer.start_as_current_span(
        f"process {queue}",
        context=_extract(msg.headers),
        kind=SpanKind.CONSUMER,
        attributes=attrs,
        record_exception=False,
        set_status_on_exception=False,
    ) as span:
        try:
            yield span
        except Exception as exc:
            _failed(span, exc)
            raise

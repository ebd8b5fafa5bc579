"""``arrival worker module:app``: load an ``arrival.App`` and run it until SIGTERM/SIGINT.

The first signal stops it gracefully: no new messages, those in progress finish (up to
the shutdown deadline), the rest go back to their queues without spending an attempt.
A second signal gives up waiting at once. With ``--http`` the worker serves Prometheus
``/metrics`` for its handlers: counters and each circuit breaker's state.
"""

from __future__ import annotations

import asyncio
import importlib
import inspect
import logging
import os
import signal
import sys
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

from arrival.app.runtime import App
from arrival.errors import UsageError

if TYPE_CHECKING:
    from prometheus_client.registry import Collector, CollectorRegistry

__all__ = ["handler_metrics", "load_app", "run_worker"]

log = logging.getLogger("arrival.worker")

_BREAKER_VALUE = {"closed": 0, "half-open": 1, "open": 2}


def load_app(target: str) -> App:
    """The ``App`` that ``module:attribute`` names (the module imported with the current
    directory on ``sys.path``). An attribute that is a function is called to make it."""
    module_name, sep, attr = target.partition(":")
    if not sep or not module_name or not attr:
        raise UsageError(
            f"name the app as module:attribute (e.g. myproject.worker:app), not {target!r}"
        )
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name is not None and module_name.startswith(exc.name):
            raise UsageError(
                f"no module {module_name!r} (looked from {os.getcwd()!r} and sys.path): "
                f"run from your project's directory, or install it"
            ) from None
        raise
    obj: Any = module
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise UsageError(f"module {module_name!r} has no attribute {attr!r}") from None
    if inspect.isfunction(obj):  # a factory
        obj = obj()
    if not isinstance(obj, App):
        raise UsageError(f"{target} is a {type(obj).__name__}, not an arrival.App")
    return obj


def handler_metrics(app: App) -> Collector:
    """A Prometheus collector of the app's handler counters and breaker states, read at
    scrape time."""
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

    class _Collector:
        def collect(self) -> Iterator[Any]:
            labels = ["handler", "queue", "group"]
            counters = {
                "handled": "messages the handler finished and settled",
                "failed": "handler calls that raised",
                "retried": "failed messages nacked for a later attempt",
                "dead_lettered": "messages this worker sent to the dead-letter queue",
                "undecodable": "messages whose body did not decode (poison)",
                "released": "messages given back without spending an attempt",
                "lease_lost": "settles refused because the lease had run out",
                "breaker_opened": "times the circuit breaker opened",
            }
            families = {
                name: CounterMetricFamily(f"arrival_handler_{name}", doc, labels=labels)
                for name, doc in counters.items()
            }
            in_flight = GaugeMetricFamily(
                "arrival_handler_in_flight", "messages being handled now", labels=labels
            )
            state = GaugeMetricFamily(
                "arrival_handler_breaker_state",
                "circuit breaker: 0 closed, 1 half-open, 2 open",
                labels=labels,
            )
            for s in app.stats():
                values = [s.name, s.queue, s.group]
                for name, family in families.items():
                    family.add_metric(values, getattr(s, name))
                in_flight.add_metric(values, s.in_flight)
                state.add_metric(values, _BREAKER_VALUE.get(s.breaker_state, 0))
            yield from families.values()
            yield in_flight
            yield state

    return _Collector()


def _registry(app: App) -> CollectorRegistry:
    from prometheus_client import CollectorRegistry

    registry = CollectorRegistry(auto_describe=False)
    registry.register(handler_metrics(app))
    return registry


def run_worker(
    app: App,
    *,
    shutdown_timeout: float | None = None,
    http: str | None = None,
    ready: Callable[[str], None] | None = None,
) -> None:
    """Run ``app`` until SIGTERM/SIGINT (graceful), as ``arrival worker`` does."""
    if shutdown_timeout is not None:
        app.shutdown_timeout = shutdown_timeout
    server = None
    address = ""
    if http is not None:
        from prometheus_client import start_http_server

        host, _, port = http.rpartition(":")
        if not host or not port.isdigit():
            raise UsageError(f"--http takes HOST:PORT (e.g. 127.0.0.1:7713), not {http!r}")
        server, _thread = start_http_server(int(port), host, registry=_registry(app))
        address = f"{host}:{server.server_address[1]}"

    async def main() -> None:
        loop = asyncio.get_running_loop()
        signals = 0

        def on_signal(signum: int) -> None:
            nonlocal signals
            signals += 1
            if signals == 1:
                log.info(
                    "%s: stopping (finishing messages in progress for up to %.1f s; "
                    "again to give up waiting)",
                    signal.Signals(signum).name,
                    app.shutdown_timeout,
                )
                app.stop()
            else:
                log.warning("stopping now: messages in progress go back to their queues")
                app.shutdown_timeout = 0.001
                for task in list(app._tasks):
                    task.cancel()

        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, on_signal, sig)

        def started() -> None:
            if ready is not None:
                ready(address)

        await app.serve(ready=started)

    try:
        try:
            import uvloop
        except ImportError:  # pragma: no cover - uvloop is not built for every platform
            asyncio.run(main())
        else:
            uvloop.run(main())
    finally:
        if server is not None:
            server.shutdown()
            server.server_close()

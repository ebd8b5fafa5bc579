"""The worker runtime: handlers for queues, typed messages, retries, circuit breakers and
graceful shutdown. ``arrival.App`` is the entry point; ``arrival worker module:app`` runs
one from the command line."""

from arrival.app.codec import decode, encode
from arrival.app.runtime import App, Context, HandlerStats, RetryPolicy
from arrival.semantics.breaker import BreakerState, CircuitBreaker

__all__ = [
    "App",
    "BreakerState",
    "CircuitBreaker",
    "Context",
    "HandlerStats",
    "RetryPolicy",
    "decode",
    "encode",
]

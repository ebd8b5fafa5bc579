"""The NATS JetStream backend: ``arrival.connect("nats://host:4222")`` (docs/cluster.md).

Needs the ``nats`` extra: ``pip install 'arrival[nats]'``.
"""

from __future__ import annotations

__all__ = ["open_backend"]


def open_backend(url: str, *, reconnect: float, token: str | None) -> object:
    """A ``NatsBackend`` for ``url``; a clear error when nats-py is not installed."""
    try:
        import nats  # noqa: F401
    except ImportError:
        from arrival.errors import NotSupported

        raise NotSupported(
            f"can't connect to {url!r}: the JetStream backend needs nats-py; install it "
            f"with: pip install 'arrival[nats]'"
        ) from None
    from arrival.jetstream.backend import NatsBackend

    return NatsBackend(url, reconnect=reconnect, token=token)

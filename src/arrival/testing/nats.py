"""Real ``nats-server`` processes for tests: ``NatsServer`` and ``NatsCluster``.

They live in ``arrival.verify.natsserver`` (``arrival verify`` runs its clusters with
them); this module is where tests and users import them from.
"""

from __future__ import annotations

from arrival.verify.natsserver import (
    ENV_VAR,
    NatsCluster,
    NatsServer,
    NatsServerError,
    NatsUnavailable,
    find_nats_server,
    free_ports,
)

__all__ = [
    "ENV_VAR",
    "NatsCluster",
    "NatsServer",
    "NatsServerError",
    "NatsUnavailable",
    "find_nats_server",
    "free_ports",
]

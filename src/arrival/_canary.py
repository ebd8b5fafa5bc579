"""Canary modes: test-only broken behaviours that ``arrival verify`` must catch.

Armed by the environment variable ``ARRIVAL_CANARY`` (names separated by commas), read
once at import. Unset, ``ON`` is empty and every check is one set lookup. Never set it
for a broker that holds data you care about: each mode breaks a contract on purpose.

- ``ack-before-fsync``: durable commits are not fsynced before they are acknowledged.
- ``dedup-off``: producer sequences and message ids no longer deduplicate sends.
- ``amo-deliver-first``: an at-most-once message is handed out before it is marked
  delivered, so a second consumer can get it in between.
- ``acks-before-outputs``: a transaction's acks are committed before its outputs,
  which follow a moment later.
- ``unbound-acks``: an ack is not bound to its delivery attempt: a stale receipt (its
  lease expired, the message redelivered or settled) is accepted.
"""

from __future__ import annotations

import os

__all__ = ["CANARIES", "ON", "parse"]

CANARIES = frozenset(
    {"ack-before-fsync", "dedup-off", "amo-deliver-first", "acks-before-outputs", "unbound-acks"}
)


def parse(spec: str) -> frozenset[str]:
    """The canary names in ``spec`` (comma-separated); ValueError for an unknown one."""
    names = frozenset(n.strip() for n in spec.split(",") if n.strip())
    unknown = sorted(names - CANARIES)
    if unknown:
        raise ValueError(
            f"ARRIVAL_CANARY names unknown canary {unknown[0]!r}; "
            f"known: {', '.join(sorted(CANARIES))}"
        )
    return names


ON: frozenset[str] = parse(os.environ.get("ARRIVAL_CANARY", ""))

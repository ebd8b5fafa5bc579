"""Durable storage behind a narrow interface: ``load``, ``commit``, ``read``, ``close``.

``memory.MemoryStorage`` is the reference; ``sqlite.SqliteStorage`` the durable engine.
Both run one conformance suite (tests/storage).
"""

from arrival.storage.base import GroupRecord, Loaded, Storage, WriteSet

__all__ = ["GroupRecord", "Loaded", "Storage", "WriteSet"]

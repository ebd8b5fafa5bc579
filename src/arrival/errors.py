"""Every error arrival raises, classified by who is at fault and whether a retry can help.

```
ArrivalError                      base; ``retriable`` says whether the same call may succeed later
├── UsageError                    you broke a rule: fix the call, do not retry
│   ├── UnknownQueue
│   ├── QueueSpecConflict         the queue exists with other settings
│   │   └── GuaranteeMismatch     ... with another guarantee
│   ├── InvalidQueueSpec          a setting is out of range or would weaken the guarantee
│   ├── MessageTooLarge
│   ├── NotSupported              the operation has no meaning under this queue's guarantee
│   ├── ClosedError               the broker, producer or consumer was closed
│   └── ReceiptError              an ack/nack/reject/extend that cannot be honoured
│       ├── LeaseExpired          the lease ran out; the message is (or will be) redelivered
│       └── AlreadySettled        the message was already acked, rejected or dead-lettered
├── ConflictError                 another actor holds what you asked for
│   ├── DataDirectoryInUse        another process owns the data directory
│   └── ProducerFenced            a newer holder of this producer/transactional id exists
└── EnvironmentFailure            the world broke it: disk, network, peer
    ├── StorageError              the store failed; nothing unacknowledged was confirmed
    │   └── CorruptData           a checksum did not match: the store was damaged
    ├── BrokerUnreachable         (retriable)
    ├── AuthenticationFailed
    └── TransactionTimedOut
```

Every message says what went wrong and what to do next.
"""

from __future__ import annotations

__all__ = [
    "AlreadySettled",
    "ArrivalError",
    "AuthenticationFailed",
    "BrokerUnreachable",
    "ClosedError",
    "ConflictError",
    "CorruptData",
    "DataDirectoryInUse",
    "EnvironmentFailure",
    "GuaranteeMismatch",
    "InvalidQueueSpec",
    "LeaseExpired",
    "MessageTooLarge",
    "NotSupported",
    "ProducerFenced",
    "QueueSpecConflict",
    "ReceiptError",
    "StorageError",
    "TransactionTimedOut",
    "UnknownQueue",
    "UsageError",
]


class ArrivalError(Exception):
    """Base of all arrival errors. ``retriable`` is True when repeating the call may succeed."""

    retriable: bool = False


class UsageError(ArrivalError):
    """The caller broke a rule of the API; repeating the same call will fail again."""


class UnknownQueue(UsageError):
    def __init__(self, queue: str) -> None:
        self.queue = queue
        super().__init__(
            f"queue {queue!r} does not exist: create it first with "
            f"broker.create_queue({queue!r}, guarantee=...)"
        )


class QueueSpecConflict(UsageError):
    """The queue exists with settings other than the ones declared."""

    def __init__(self, queue: str, differences: dict[str, tuple[object, object]]) -> None:
        self.queue = queue
        self.differences = differences
        parts = ", ".join(f"{k}: stored {a!r}, declared {b!r}" for k, (a, b) in differences.items())
        super().__init__(
            f"queue {queue!r} already exists with other settings ({parts}); declare it "
            f"with the stored settings, or use another queue name"
        )


class GuaranteeMismatch(QueueSpecConflict):
    """The queue exists with another delivery guarantee."""


class InvalidQueueSpec(UsageError):
    def __init__(self, queue: str, problem: str) -> None:
        self.queue = queue
        self.problem = problem
        super().__init__(f"can't declare queue {queue!r}: {problem}")


class MessageTooLarge(UsageError):
    def __init__(self, queue: str, size_bytes: int, limit_bytes: int) -> None:
        self.queue = queue
        self.size_bytes = size_bytes
        self.limit_bytes = limit_bytes
        super().__init__(
            f"message of {size_bytes} bytes is larger than queue {queue!r} accepts "
            f"({limit_bytes} bytes): split it, store the payload elsewhere and send a "
            f"reference, or declare the queue with a larger max_message_bytes"
        )


class NotSupported(UsageError):
    """The operation has no meaning under the queue's guarantee."""


class ClosedError(UsageError):
    def __init__(self, what: str) -> None:
        super().__init__(f"{what} is closed: open a new one")


class ReceiptError(UsageError):
    """An ack, nack, reject or extend that cannot be honoured."""


class LeaseExpired(ReceiptError):
    """The lease ran out (or was released) before the call: the message will be redelivered.

    Whatever side effect the handler made may happen again on redelivery: keep it
    idempotent, or check ``msg.lease_lost`` before the effect.
    """

    def __init__(self, queue: str, offset: int, attempt: int, detail: str) -> None:
        self.queue = queue
        self.offset = offset
        self.attempt = attempt
        super().__init__(
            f"can't settle message {offset} of queue {queue!r} (attempt {attempt}): "
            f"{detail}; it is redelivered to the group. Raise ack_timeout or call "
            f"msg.extend() while processing long messages"
        )


class AlreadySettled(ReceiptError):
    def __init__(self, queue: str, offset: int, attempt: int) -> None:
        self.queue = queue
        self.offset = offset
        self.attempt = attempt
        super().__init__(
            f"message {offset} of queue {queue!r} (attempt {attempt}) was already "
            f"acked, rejected or dead-lettered: settle each delivery once"
        )


class ConflictError(ArrivalError):
    """Another actor holds what the caller asked for."""


class DataDirectoryInUse(ConflictError):
    def __init__(self, path: str, owner_pid: int | None) -> None:
        self.path = path
        self.owner_pid = owner_pid
        who = f"process {owner_pid}" if owner_pid else "another process"
        super().__init__(
            f"data directory {path!r} is in use by {who}: one process owns a data "
            f"directory. Stop that process, or share it through `arrival serve` and "
            f"connect with arrival://"
        )


class ProducerFenced(ConflictError):
    pass


class EnvironmentFailure(ArrivalError):
    """The world broke it: the disk, the network or a peer."""


class StorageError(EnvironmentFailure):
    """The store failed. Nothing that was not confirmed was acknowledged; restart the broker."""


class CorruptData(StorageError):
    pass


class BrokerUnreachable(EnvironmentFailure):
    retriable = True


class AuthenticationFailed(EnvironmentFailure):
    pass


class TransactionTimedOut(EnvironmentFailure):
    pass

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
│   │   └── GuaranteeUnavailable  this backend cannot hold the queue's declared guarantee
│   ├── ClosedError               the broker, producer or consumer was closed
│   ├── TransactionError          a transaction used wrongly (after its end, too large)
│   ├── UndecodableMessage        a body that does not decode into the handler's type
│   ├── SequenceError             an idempotent send out of order, or older than remembered
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
    ├── TransactionTimedOut       the transaction outlived its timeout and was aborted
    └── DedupHorizonPassed        a retry too old to tell whether it is a duplicate
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
    "DedupHorizonPassed",
    "EnvironmentFailure",
    "GuaranteeMismatch",
    "GuaranteeUnavailable",
    "InvalidQueueSpec",
    "LeaseExpired",
    "MessageTooLarge",
    "NotSupported",
    "ProducerFenced",
    "QueueSpecConflict",
    "ReceiptError",
    "SequenceError",
    "StorageError",
    "TransactionError",
    "TransactionTimedOut",
    "UndecodableMessage",
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


class GuaranteeUnavailable(NotSupported):
    """The backend cannot hold what the queue declares (``create_queue`` refuses it)."""

    def __init__(self, queue: str, guarantee: object, detail: str) -> None:
        super().__init__(f"can't create {guarantee} queue {queue!r} here: {detail}")
        self.queue = queue
        self.detail = detail


class ClosedError(UsageError):
    def __init__(self, what: str) -> None:
        super().__init__(f"{what} is closed: open a new one")


class UndecodableMessage(UsageError):
    """A message body that does not decode into the type its handler takes (or names a
    content-type arrival has no codec for): a poison message. Retrying cannot help, so
    the worker runtime dead-letters it at once."""


class TransactionError(UsageError):
    """A transaction used against its rules: after it ended, or grown past its limits."""


class SequenceError(UsageError):
    """An idempotent producer's send whose sequence number cannot be honoured."""

    def __init__(self, producer: str, seq: int, detail: str, *, gap: bool = False) -> None:
        self.producer = producer
        self.seq = seq
        # sends before this one were never stored (nor was this one): the broker's
        # sequence is behind the producer's
        self.gap = gap
        super().__init__(f"producer {producer!r} can't send sequence {seq}: {detail}")


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
    """A newer holder opened the same producer or transactional id: this one is a zombie.

    Nothing it sends or commits from now on takes effect. Stop using it; the newer holder
    carries on (its input messages are redelivered to it if this one held them)."""

    def __init__(self, kind: str, name: str, detail: str) -> None:
        self.kind = kind
        self.name = name
        super().__init__(
            f"{kind} {name!r} was fenced: {detail}. Nothing of this {kind} after the "
            f"fence took effect; stop this holder and let the newer one carry on"
        )


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
    """The transaction was open longer than its timeout: it was aborted, nothing of it
    took effect, and the messages it acked are redelivered."""

    def __init__(self, transactional_id: str, timeout_s: float) -> None:
        self.transactional_id = transactional_id
        self.timeout_s = timeout_s
        super().__init__(
            f"transaction {transactional_id!r} was aborted: it was open longer than its "
            f"timeout of {timeout_s:g} s, so none of its sends or acks took effect. Retry "
            f"it (its input messages come back), commit smaller batches, or raise "
            f"broker.transaction(..., timeout=)"
        )


class DedupHorizonPassed(EnvironmentFailure):
    """A retried send older than the broker remembers: it might be a duplicate or not,
    so it is refused instead of being stored a second time."""

    def __init__(self, producer: str, seq: int, horizon_s: float) -> None:
        self.producer = producer
        self.seq = seq
        self.horizon_s = horizon_s
        super().__init__(
            f"producer {producer!r} retried sequence {seq}, but the broker no longer "
            f"remembers that producer (its state is kept {horizon_s:g} s after its last "
            f"send): it can't tell whether the message was stored, so it refused to risk "
            f"a duplicate. Check the queue for the message's id, then send it from a new "
            f"producer if it is missing"
        )

"""arrival: a message queue in which the delivery guarantee is a contract of the queue.

```python
import arrival

broker = arrival.connect("./data")            # or "memory:" for tests
broker.create_queue("orders", guarantee="at-least-once", max_deliveries=5)
broker.producer().send("orders", b'{"id": 1}', key="customer-7")
msg = broker.consumer("orders", group="billing").receive(timeout=1.0)
msg.ack()

with broker.transaction("billing-1") as tx:   # exactly-once: sends and acks together
    tx.send("ledger", b"...")
    tx.ack(msg)
```
``arrival.aio`` is the same API with ``async``/``await``.
"""

from arrival import errors
from arrival._common import Envelope
from arrival._replay import Replayed
from arrival._sync import (
    Broker,
    Consumer,
    DeadLetters,
    Message,
    Outputs,
    ProcessResult,
    Producer,
    Transaction,
    connect,
)
from arrival.app import (
    App,
    BreakerState,
    CircuitBreaker,
    Context,
    HandlerStats,
    RetryPolicy,
    decode,
    encode,
)
from arrival.engine import DeadMessage
from arrival.inbox import Inbox, inbox
from arrival.model import (
    Backoff,
    BrokerStats,
    ConsumerStats,
    DropPolicy,
    GroupStats,
    Guarantee,
    QueueDescription,
    QueueSpec,
    QueueStats,
    StoredMessage,
)
from arrival.router import Route, Router

__version__ = "0.1.0"

__all__ = [
    "App",
    "Backoff",
    "BreakerState",
    "Broker",
    "BrokerStats",
    "CircuitBreaker",
    "Consumer",
    "ConsumerStats",
    "Context",
    "DeadLetters",
    "DeadMessage",
    "DropPolicy",
    "Envelope",
    "GroupStats",
    "Guarantee",
    "HandlerStats",
    "Inbox",
    "Message",
    "Outputs",
    "ProcessResult",
    "Producer",
    "QueueDescription",
    "QueueSpec",
    "QueueStats",
    "Replayed",
    "RetryPolicy",
    "Route",
    "Router",
    "StoredMessage",
    "Transaction",
    "__version__",
    "connect",
    "decode",
    "encode",
    "errors",
    "inbox",
]

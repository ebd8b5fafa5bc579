"""``arrival verify``: the contracts checked under faults (docs/reliability.md).

``history`` is what a run records; ``checker`` turns a history into anomaly counts and
a verdict per guarantee, by the table of the verification design; ``workload`` is the
producer and consumer processes; ``proxy`` the network fault proxy; ``runner`` starts a
server, the workload and the faults, and checks what happened.
"""

from arrival.verify.checker import ANOMALIES, Report, check
from arrival.verify.history import (
    Ack,
    Audit,
    Deliver,
    Effect,
    Event,
    Fault,
    Register,
    Send,
    Txn,
)
from arrival.verify.proxy import FaultProxy
from arrival.verify.runner import FAULTS, GUARANTEES, Options, Result, run

__all__ = [
    "ANOMALIES",
    "FAULTS",
    "GUARANTEES",
    "Ack",
    "Audit",
    "Deliver",
    "Effect",
    "Event",
    "Fault",
    "FaultProxy",
    "Options",
    "Register",
    "Report",
    "Result",
    "Send",
    "Txn",
    "check",
    "run",
]

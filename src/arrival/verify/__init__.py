"""``arrival verify``: the contracts checked under faults (docs/reliability.md).

``history`` is what a run records; ``checker`` turns a history into anomaly counts and
a verdict per guarantee, by the table of the verification design.
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

__all__ = [
    "ANOMALIES",
    "Ack",
    "Audit",
    "Deliver",
    "Effect",
    "Event",
    "Fault",
    "Register",
    "Report",
    "Send",
    "Txn",
    "check",
]

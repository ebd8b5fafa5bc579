"""The sans-IO wire protocol shared by the client and the server: no sockets, no clock."""

from arrival.protocol.connection import (
    CLIENT,
    DEFAULT_MAX_FRAME,
    NEED_DATA,
    PREFACE,
    SERVER,
    VERSION,
    Connection,
    LocalProtocolError,
    ProtocolError,
    RemoteProtocolError,
    Role,
    State,
    error_for,
)
from arrival.protocol.events import Error, Event, Goodbye, Hello, Push, Reply, Request, Welcome

__all__ = [
    "CLIENT",
    "DEFAULT_MAX_FRAME",
    "NEED_DATA",
    "PREFACE",
    "SERVER",
    "VERSION",
    "Connection",
    "Error",
    "Event",
    "Goodbye",
    "Hello",
    "LocalProtocolError",
    "ProtocolError",
    "Push",
    "RemoteProtocolError",
    "Reply",
    "Request",
    "Role",
    "State",
    "Welcome",
    "error_for",
]

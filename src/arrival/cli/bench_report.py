"""``arrival bench``'s table: per guarantee, the measured latency and throughput next to the
seed essay's figures and SPEC §4's target for the backend, then what each run counted."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from rich import box
from rich.console import Console
from rich.table import Table

__all__ = ["ESSAY", "TARGETS", "render"]

# the seed essay's table: latency, throughput
ESSAY = {
    "at-most-once": ("~1 ms", 100_000),
    "at-least-once": ("~10 ms", 50_000),
    "exactly-once": ("~100 ms", 5_000),
}
# SPEC §4: throughput (msg/s) and, against a server, the p50 latency
TARGETS: dict[str, dict[str, tuple[int, str | None]]] = {
    "embedded": {
        "at-most-once": (1_000_000, None),
        "at-least-once": (500_000, None),
        "exactly-once": (250_000, None),
    },
    "server": {
        "at-most-once": (400_000, "p50 < 0.3 ms"),
        "at-least-once": (300_000, "p50 < 2 ms"),
        "exactly-once": (200_000, "p50 < 5 ms"),
    },
}
TXN_TARGET = 20_000  # exactly-once, one transaction per message, against a server


def _ms(x: float) -> str:
    """Three significant figures: 0.0123, 0.123, 1.23, 12.3, 123, 1234."""
    if math.isnan(x):
        return "-"
    if x >= 100:
        return f"{x:,.0f}"
    return f"{x:.3g}" if x >= 0.001 else f"{x:.4f}"


def _mib(n: object) -> str:
    return f"{int(n) / 2**20:,.0f} MiB" if isinstance(n, int) else "-"


def _target(guarantee: str, backend: str, txn_batch: int) -> str:
    if guarantee == "exactly-once" and txn_batch == 1:
        return f"{TXN_TARGET:,} txn/s" + ("" if backend == "server" else "\n(on a server)")
    rate, p50 = TARGETS[backend][guarantee]
    return f"{rate:,}/s" + (f"\n{p50}" if p50 else "")


def render(console: Console, results: Mapping[str, Mapping[str, Any]], runs: int) -> None:
    """Print the table of ``results`` (``summarize()``'s, by guarantee) and its notes."""
    first = next(iter(results.values()))
    backend = str(first["backend"])
    producers, consumers = int(first["producers"]), int(first["consumers"])
    title = (
        f"arrival bench — {backend}, {first['size_bytes']}-byte messages, "
        f"{producers} producer{'s' if producers > 1 else ''}, "
        f"{consumers} consumer{'s' if consumers > 1 else ''}, batch {first['batch']:,}, "
        f"median of {runs}"
    )
    table = Table(title=title, box=box.SIMPLE_HEAD, pad_edge=False)
    table.add_column("guarantee")
    table.add_column("p50 / p99 ms", justify="right")
    table.add_column("msg/s", justify="right")
    table.add_column("essay", justify="right")
    table.add_column(f"SPEC target\n({backend})", justify="right")
    for col in ("delivered", "dropped", "fsyncs", "txn/s", "peak RSS"):
        table.add_column(col, justify="right")
    notes: list[str] = []
    for g, r in results.items():
        label = g
        txn_batch = int(r["txn_batch"])
        if txn_batch:
            label += f"\n{txn_batch:,}/txn"
        essay_latency, essay_rate = ESSAY[g]
        txns = float(r["transactions_per_s"])
        table.add_row(
            label,
            f"{_ms(float(r['p50_ms']))} / {_ms(float(r['p99_ms']))}",
            f"{float(r['throughput']):,.0f}",
            f"{essay_latency}\n{essay_rate:,}/s",
            _target(g, backend, txn_batch),
            f"{int(r['delivered']):,}",
            f"{int(r['dropped']):,}",
            f"{int(r['fsyncs']):,}",
            f"{txns:,.0f}" if txn_batch else "-",
            _mib(r["broker_peak_rss"]),
        )
        notes.extend(_notes(g, r))
    console.print(table)
    for line in notes:
        console.print(line, highlight=False)
    who = {"server": "the server process", "bench": "this process (the embedded broker)"}
    broker = who.get(str(first["broker_process"]), "unknown (a server bench did not start)")
    console.print(
        f"latency: send to processed (acked; exactly-once: output committed). "
        f"peak RSS: {broker}.\n--json: p90 and p99.9, every process's peak RSS, RSS over time.",
        highlight=False,
    )


def _notes(g: str, r: Mapping[str, Any]) -> list[str]:
    notes = []
    sent, send_rate = int(r["messages"]), float(r["send_rate"])
    if r["rate"] is not None:
        notes.append(
            f"{g}: asked {float(r['rate']):,.0f} msg/s (open loop, linger "
            f"{float(r['linger_ms']):g} ms), sent {sent:,} at {send_rate:,.0f} msg/s, ended "
            f"{float(r['behind_schedule_s']):.3f} s behind"
        )
    elif r["duration_s"] is not None:
        notes.append(
            f"{g}: sent {sent:,} in {float(r['send_seconds']):.1f} s "
            f"({send_rate:,.0f} msg/s), drained in {float(r['seconds']):.1f} s"
        )
    if int(r["backlog"]):
        notes.append(
            f"{g}: backlog {int(r['backlog']):,} (loaded in {float(r['backlog_seconds']):.1f} s), "
            f"broker RSS {_mib(r['rss_before_backlog'])} before, "
            f"{_mib(r['rss_backlog_loaded'])} loaded, {_mib(r['rss_peak_draining'])} peak draining"
        )
    return notes

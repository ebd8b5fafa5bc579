"""``arrival verify``: run the contract checks under faults and print the verdicts."""

from __future__ import annotations

import json
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from arrival.verify.runner import Options, Result, run

__all__ = ["render", "verify"]

_ROWS = (
    ("lost", "lost"),
    ("observed-then-lost", "observed then lost"),
    ("duplicate-in-storage", "duplicated in storage"),
    ("duplicate-delivery", "duplicate deliveries, unexplained"),
    ("duplicate-delivery-explained", "duplicate deliveries, explained"),
    ("duplicate-effect", "duplicate effects"),
    ("reorder", "reordered"),
    ("phantom", "phantom"),
    ("corrupt", "corrupt"),
    ("aborted-read", "aborted reads"),
    ("dirty-read", "dirty reads"),
    ("torn-transaction", "torn transactions"),
    ("zombie-write", "zombie writes"),
    ("liveness", "liveness"),
    ("silent-corruption", "damaged copies served silently"),
)


def verify(console: Console, options: list[Options], as_json: bool) -> bool:
    """Run each of ``options`` (one per guarantee); print; True if every verdict passed."""
    results: list[Result] = []
    for o in options:
        with Progress(
            TextColumn(f"{o.guarantee:<14}"),
            TextColumn("{task.description:<7}"),
            BarColumn(),
            TimeElapsedColumn(),
            console=console if not as_json else Console(stderr=True),
            transient=True,
        ) as bar:
            task = bar.add_task("setup", total=1.0)

            def progress(phase: str, done: float, task: Any = task, bar: Progress = bar) -> None:
                bar.update(task, description=phase, completed=done)

            o.progress = progress
            results.append(run(o))
        if not as_json:
            render(console, results[-1])
    if as_json:
        console.print_json(json.dumps([r.to_json() for r in results]))
    return all(r.report.ok for r in results)


def render(console: Console, result: Result) -> None:
    r, o = result.report, result.options
    verdict = "[green]PASS[/]" if r.ok else "[red]FAIL[/]"
    title = f"{r.guarantee}: {verdict}  (seed {o.seed}, {o.duration:.0f} s of faults)"
    if o.canary:
        title += f"  canary {o.canary}"
    t = Table(title=title, title_justify="left", show_header=True)
    t.add_column("")
    t.add_column("count", justify="right")
    t.add_column("rule")
    faults = ", ".join(f"{k} {v}" for k, v in sorted(r.faults.items())) or "none"
    t.add_row("faults", str(sum(r.faults.values())), faults)
    sends = r.sends
    t.add_row(
        "sends",
        str(sum(sends.values())),
        f"ok {sends.get('ok', 0)}, failed {sends.get('fail', 0)}, "
        f"indeterminate {sends.get('info', 0)}",
    )
    from arrival.verify.checker import RULES

    rules = RULES[r.guarantee]
    for key, label in _ROWS:
        n = r.counts.get(key, 0)
        rule = rules.get(key, "not judged")
        style = "red" if n and rule == "forbidden" else ""
        t.add_row(label, f"[{style}]{n}[/]" if style else str(n), rule)
    if result.recoveries:
        t.add_row(
            "server restarts",
            str(len(result.recoveries)),
            f"up again in {max(result.recoveries):.2f} s at most",
        )
    console.print(t)
    for anomaly, n in r.forbidden.items():
        examples = ", ".join(map(str, r.examples.get(anomaly, [])[:3]))
        console.print(f"  [red]{anomaly}[/] x{n}: {examples}")
    for note in result.notes:
        console.print(f"  note: {note}")
    if result.history is not None:
        console.print(f"  history: {result.history}")

"""``arrival bench``: every option, the figures that must hold whatever the machine's
speed, and the failure paths (bad values, a worker that fails or dies, Ctrl-C)."""

from __future__ import annotations

import contextlib
import importlib
import io
import json
import math
import os
import signal
import struct
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from rich.console import Console
from typer.testing import CliRunner

import arrival.cli.bench_workers as bench_workers
from arrival.cli.bench import BenchOptions, ProgressState, run_bench, start_server
from arrival.cli.bench_measure import LatencyHistogram
from arrival.cli.bench_report import render
from arrival.cli.main import app

runner = CliRunner()
cli_main = importlib.import_module("arrival.cli.main")  # arrival.cli.main is also a function


def run(*args: str) -> str:
    result = runner.invoke(app, ["bench", *args], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result.output


def bench_json(*args: str) -> dict[str, Any]:
    report: dict[str, Any] = json.loads(run(*args, "--runs", "1", "--json"))
    return report


def ordered(r: dict[str, Any]) -> bool:
    return 0 <= r["p50_ms"] <= r["p90_ms"] <= r["p99_ms"] <= r["p999_ms"] <= r["max_ms"]


# -- what a run reports -------------------------------------------------------------


def test_bench_json_reports_every_figure() -> None:
    report = bench_json("--count", "3000", "--batch", "500")
    env = report["environment"]
    assert env["cpus"] >= 1
    assert env["python"].count(".") == 2
    assert env["implementation"] == "CPython"
    assert env["platform"]
    assert env["arrival"]
    assert env["backend"] == "embedded"
    assert env["server_event_loop"] is None  # no server
    assert "nothing fsynced" in env["durability"]["at-most-once"]
    assert "group commit" in env["durability"]["at-least-once"]
    alo = report["results"]["at-least-once"]
    amo = report["results"]["at-most-once"]
    assert alo["delivered"] == 3000
    assert alo["throughput"] > 0
    assert alo["fsyncs"] >= 1  # durable sends were fsynced
    assert amo["fsyncs"] == 0  # at-most-once never waits for disk
    assert amo["delivered"] + amo["dropped"] == 3000
    eo = report["results"]["exactly-once"]
    assert eo["delivered"] == 3000  # every input committed with its output (checked inside)
    assert eo["txn_batch"] == 1000
    assert 3 <= eo["transactions"] <= 3000
    assert eo["fsyncs"] >= 1
    for r in (alo, amo, eo):
        assert ordered(r)
        assert r["timed"] == r["delivered"]  # every message has its latency
        assert r["send_batches"] == 6  # closed loop without linger: full batches of 500
        assert r["durability"] == env["durability"][r["guarantee"]]
        # embedded: one process, the broker's, whose memory is sampled
        assert [p["process"] for p in r["peak_rss"]] == ["bench"]
        assert r["peak_rss"][0]["pid"] == os.getpid()
        assert r["broker_process"] == "bench"
        assert r["peak_rss"][0]["bytes"] == r["broker_peak_rss"] > 0
        assert r["rss_timeline"]
        assert all(len(s) == 2 and s[1] > 0 for s in r["rss_timeline"])


def test_latency_histogram_percentiles() -> None:
    h = LatencyHistogram()
    now = 1000.0
    latencies = [i / 10_000 for i in range(1, 10_001)]  # 0.1 ms to 1 s, uniform
    h.add_stamps(now, Counter((now - x,) for x in latencies))
    h.add_stamps(now, Counter({(0.0,): 500}))  # backlog messages: not timed
    assert h.total == 10_000
    for q in (0.5, 0.9, 0.99, 0.999):
        exact = latencies[int(q * len(latencies))]
        assert h.percentile(q) == pytest.approx(exact, rel=0.011)
    assert h.percentile(1.0) <= h.maximum == pytest.approx(1.0)
    other = LatencyHistogram()
    other.add_stamps(now, Counter({(now - 5.0,): 10_000}))
    h.merge(other)
    assert h.total == 20_000
    assert h.percentile(0.9) == pytest.approx(5.0)
    assert math.isnan(LatencyHistogram().percentile(0.5))


def test_latency_counts_from_the_send_time_in_the_body() -> None:
    """An open-loop run with --linger 50: a message waits up to 50 ms in its producer
    before it is sent, and its latency counts from when it was due, so half of them
    take at least 20 ms (timed from the broker accepting them, they would take ~1 ms)."""
    r = bench_json("-g", "at-most-once", "--rate", "2000", "--duration", "1", "--linger", "50")[
        "results"
    ]["at-most-once"]
    assert r["p50_ms"] >= 20
    assert ordered(r)
    assert r["linger_ms"] == 50
    assert r["send_batches"] <= 22  # a send every 50 ms at most: 1 s / 50 ms, +1 each end


def test_open_loop_rate_sends_the_schedule() -> None:
    """--rate 2000 --duration 1: 2000 messages in total from both producers, each
    stamped with its due time; every 1 ms (the default linger) what is due."""
    r = bench_json("-g", "at-least-once", "--rate", "2000", "--duration", "1", "--producers", "2")[
        "results"
    ]["at-least-once"]
    assert r["messages"] == 2000  # the schedule, however the broker kept up
    assert r["delivered"] == 2000
    assert (r["rate"], r["linger_ms"], r["duration_s"]) == (2000, 1.0, 1)
    assert r["send_rate"] > 0
    assert r["behind_schedule_s"] >= 0
    assert [w["sent"] for w in r["workers"] if "sent" in w] == [1000, 1000]
    assert r["send_batches"] > 22  # many more sends than with --linger 50
    assert ordered(r)


def test_duration_sends_until_the_deadline_then_drains() -> None:
    r = bench_json("-g", "at-least-once", "--duration", "1.2", "--batch", "200")["results"][
        "at-least-once"
    ]
    assert (r["count"], r["duration_s"], r["rate"]) == (None, 1.2, None)
    assert r["messages"] > 0
    assert r["delivered"] == r["messages"]  # what was sent is drained
    assert r["send_seconds"] >= 1.2  # a producer sends again while before the deadline
    assert r["seconds"] >= 1.2
    # RSS over time: sampled once a second (and at the end)
    times = [s[0] for s in r["rss_timeline"]]
    assert len(times) >= 3
    assert times == sorted(times)
    assert any(0.9 <= t <= 1.5 for t in times)


def test_linger_in_a_closed_loop_sends_a_batch_when_its_first_message_waited() -> None:
    """--linger 0.01 (10 µs): a batch goes before it has --batch messages; without
    --linger a closed loop sends full batches (6 in test_bench_json_reports_every_figure)."""
    r = bench_json("-g", "at-least-once", "--count", "2000", "--linger", "0.01")["results"][
        "at-least-once"
    ]
    assert r["delivered"] == 2000
    assert r["send_batches"] > 2
    assert r["linger_ms"] == 0.01


def test_consumers_for_every_guarantee_on_the_embedded_engine() -> None:
    report = bench_json(
        "-g", "at-most-once", "-g", "at-least-once", "--count", "3000", "--batch", "100",
        "--consumers", "3",
    )  # fmt: skip
    for r in report["results"].values():
        assert r["consumers"] == 3
        consumers = [w for w in r["workers"] if w["worker"].startswith("consumer")]
        assert [w["worker"] for w in consumers] == ["consumer 1", "consumer 2", "consumer 3"]
        assert sum(w["processed"] for w in consumers) == r["delivered"]
        assert {w["pid"] for w in r["workers"]} == {os.getpid()}  # threads
    assert report["results"]["at-least-once"]["delivered"] == 3000


def test_bench_exactly_once_one_transaction_per_message() -> None:
    eo = bench_json("-g", "exactly-once", "--count", "200", "--txn-batch", "1", "--consumers", "2")[
        "results"
    ]["exactly-once"]
    assert eo["delivered"] == 200
    assert eo["transactions"] == 200  # one commit per input
    assert eo["consumers"] == 2
    assert eo["transactions_per_s"] > 0


def test_backlog_is_drained_with_the_new_messages() -> None:
    report = bench_json("--backlog", "5000", "--count", "1000", "--batch", "500")
    for g, r in report["results"].items():
        assert r["backlog"] == 5000
        assert r["delivered"] == 6000, g
        assert r["timed"] == 1000  # backlog messages carry no send time
        assert r["messages"] == 1000
        assert ordered(r)
        for k in ("rss_before_backlog", "rss_backlog_loaded", "rss_peak_draining"):
            assert r[k] > 0, k
        assert r["broker_peak_rss"] >= r["rss_peak_draining"]
    assert report["results"]["at-most-once"]["dropped"] == 0  # the capacity held it


def test_bench_against_a_server_it_starts() -> None:
    """--server: a real `arrival serve` process; producers and consumers are separate
    processes, each reporting its peak RSS: bench, server, 2 producers, 2 consumers."""
    report = bench_json(
        "--server", "-g", "at-least-once", "-g", "exactly-once", "--count", "2000",
        "--batch", "250", "--producers", "2", "--consumers", "2",
    )  # fmt: skip
    env = report["environment"]
    assert env["backend"] == "server"
    assert env["server_event_loop"] in ("uvloop", "asyncio")
    alo = report["results"]["at-least-once"]
    assert (alo["delivered"], alo["producers"], alo["consumers"]) == (2000, 2, 2)
    assert alo["fsyncs"] >= 1
    eo = report["results"]["exactly-once"]
    assert eo["delivered"] == 2000
    for r in (alo, eo):
        assert r["backend"] == "server"
        assert r["broker_process"] == "server"
        names = [p["process"] for p in r["peak_rss"]]
        assert names == ["bench", "server", "producer 1", "producer 2", "consumer 1", "consumer 2"]
        pids = [p["pid"] for p in r["peak_rss"]]
        assert len(set(pids)) == 6
        assert pids[0] == os.getpid()
        assert all(p["bytes"] > 0 for p in r["peak_rss"])
        assert r["broker_peak_rss"] == r["peak_rss"][1]["bytes"]
        assert r["rss_timeline"]  # the server's
        consumers = [w for w in r["workers"] if w["worker"].startswith("consumer")]
        assert sum(w["processed"] for w in consumers) == 2000
        assert ordered(r)


# -- the table and progress ---------------------------------------------------------


def test_bench_table() -> None:
    out = run("-g", "at-least-once", "--count", "1000", "--runs", "2")
    assert "median of 2" in out
    for text in ("at-least-once", "msg/s", "p50 / p99 ms", "~10 ms", "50,000/s", "500,000/s"):
        assert text in out
    assert "peak RSS" in out
    assert "MiB" in out


def test_bench_table_labels_exactly_once_runs() -> None:
    out = run("-g", "exactly-once", "--count", "500", "--runs", "1")
    assert "exactly-once" in out
    assert "1,000/txn" in out
    assert "txn/s" in out
    assert "~100 ms" in out
    assert "250,000/s" in out


def test_table_fits_120_columns_and_shows_the_server_targets() -> None:
    report = bench_json("--count", "300", "--rate", "100000", "--backlog", "100")
    results = report["results"]
    for r in results.values():
        r["backend"] = "server"  # as a server run would say
    buf = io.StringIO()
    render(Console(file=buf, width=120), results, 3)
    text = buf.getvalue()
    assert max(len(line) for line in text.splitlines()) <= 120
    for target in ("400,000/s", "p50 < 0.3 ms", "300,000/s", "p50 < 2 ms", "200,000/s"):
        assert target in text
    assert "~1 ms" in text
    assert "100,000/s" in text
    assert "behind" in text  # the open-loop note
    assert "peak draining" in text  # the backlog note


def test_progress_reports_processed_time_left_and_rate() -> None:
    states: list[ProgressState] = []
    opts = BenchOptions("at-least-once", duration=1.0, batch=100, backlog=2000)
    r = run_bench(opts, progress=states.append)
    phases = [s.phase for s in states]
    assert phases[0] == "loading backlog"
    assert {"starting", "running", "draining"} <= set(phases)
    running = [s for s in states if s.phase == "running"]
    assert all(s.seconds_left is not None and 0 <= s.seconds_left <= 1.0 for s in running)
    assert any(s.rate > 0 for s in running)
    assert states[-1].done == states[-1].total == r.delivered == 2000 + r.messages
    done = [s.done for s in states if s.phase != "loading backlog"]
    assert done == sorted(done)


def test_progress_is_shown_on_stderr(monkeypatch: pytest.MonkeyPatch) -> None:
    buf = io.StringIO()
    monkeypatch.setattr(cli_main, "err", Console(file=buf, force_terminal=True, width=120))
    run("-g", "at-most-once", "--duration", "0.6", "--runs", "1")
    shown = buf.getvalue()
    assert "at-most-once run 1/1: running" in shown
    assert "s left" in shown
    assert "msg/s" in shown


# -- bad options ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--count", "0"], "--count must be at least 1"),
        (["--count", "-5"], "--count must be at least 1"),
        (["--duration", "0"], "--duration must be a positive number"),
        (["--duration", "nan"], "--duration must be a positive number, not nan"),
        (["--duration", "inf"], "--duration must be a positive number"),
        (["--count", "10", "--duration", "1"], "--count or --duration, not both"),
        (["--rate", "-1"], "--rate must be a positive number"),
        (["--rate", "nan"], "--rate must be a positive number"),
        (["--batch", "0"], "--batch must be at least 1"),
        (["--producers", "0"], "--producers must be at least 1"),
        (["--consumers", "0"], "--consumers must be at least 1"),
        (["--txn-batch", "0"], "--txn-batch must be at least 1"),
        (["--linger", "-1"], "--linger must be 0 or more"),
        (["--linger", "nan"], "--linger must be 0 or more"),
        (["--backlog", "-1"], "--backlog must be 0 or more"),
        (["--size", "7"], "--size must be at least 8 bytes"),
        (["--runs", "0"], "--runs must be at least 1"),
        (["-g", "at-least-twice"], "unknown guarantee 'at-least-twice'"),
        (["--server", "--url", "./x"], "give --server or --url, not both"),
        (["--gc-threshold", "0"], "--gc-threshold must be at least 1"),
    ],
)
def test_bad_values_exit_2_with_one_line(args: list[str], message: str) -> None:
    result = runner.invoke(app, ["bench", *args])
    assert result.exit_code == 2, result.output
    assert message in result.output
    assert len(result.output.strip().splitlines()) == 1
    assert "Traceback" not in result.output


def test_a_worker_that_fails_exits_1_naming_it(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    def broken(*args: object) -> bench_workers.WorkerReport:
        raise RuntimeError("the disk is on fire")

    monkeypatch.setattr(bench_workers, "_consume", broken)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # where bench's temp dir goes
    result = runner.invoke(app, ["bench", "-g", "at-least-once", "--count", "1000"])
    assert result.exit_code == 1
    assert "bench consumer 1 failed: RuntimeError: the disk is on fire" in result.output
    assert list(tmp_path.iterdir()) == []  # its data directory is removed


# -- processes: a worker that dies, Ctrl-C ----------------------------------------------


def _spawn_bench(tmp_path: Path, marker: str, *args: str) -> subprocess.Popen[str]:
    env = {**os.environ, "TMPDIR": str(tmp_path), "BENCH_TEST_MARKER": marker}
    return subprocess.Popen(
        [sys.executable, "-m", "arrival", "bench", *args],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        start_new_session=True,  # its own process group, as a terminal's job
        # as from a terminal: a test run started in the background (``cmd &`` in a
        # script) ignores SIGINT, and an ignored SIGINT is inherited, so Python would
        # not turn Ctrl-C into KeyboardInterrupt
        preexec_fn=_sigint_default,
    )


def _sigint_default() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _children(pid: int) -> dict[int, str]:
    """The processes whose parent is ``pid``, with their command lines."""
    found = {}
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            stat = (d / "stat").read_text()
            cmd = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
            found[int(d.name)] = cmd
    return found


def _workers_of(pid: int, n: int, timeout: float = 30.0) -> list[int]:
    """Wait until ``pid`` runs ``n`` spawned workers; their pids."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        workers = [p for p, cmd in _children(pid).items() if "spawn_main" in cmd]
        if len(workers) >= n:
            return workers
        time.sleep(0.1)
    raise AssertionError(f"no {n} workers after {timeout} s: {_children(pid)}")


def _left_running(marker: str) -> list[int]:
    """Processes still running with ``marker`` in their environment."""
    left = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                if f"BENCH_TEST_MARKER={marker}".encode() in (d / "environ").read_bytes():
                    left.append(int(d.name))
            except OSError:
                continue
    return left


def _assert_all_cleaned_up(marker: str, tmp_path: Path) -> None:
    deadline = time.monotonic() + 10
    while _left_running(marker) and time.monotonic() < deadline:
        time.sleep(0.1)  # the resource tracker ends once the bench process is gone
    assert _left_running(marker) == []
    assert list(tmp_path.iterdir()) == []  # the run's and the server's data directories


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs /proc")
def test_a_worker_process_that_dies_exits_1_naming_it(tmp_path: Path) -> None:
    marker = uuid.uuid4().hex
    bench = _spawn_bench(
        tmp_path, marker, "--server", "-g", "at-least-once", "--duration", "30", "--runs", "1",
        "--consumers", "2",
    )  # fmt: skip
    try:
        victim = _workers_of(bench.pid, 3)[-1]
        os.kill(victim, signal.SIGKILL)
        _, stderr = bench.communicate(timeout=30)
    finally:
        if bench.poll() is None:
            bench.kill()
            bench.communicate()
    assert bench.returncode == 1, stderr
    assert f"(pid {victim}) was killed by SIGKILL" in stderr
    assert "Traceback" not in stderr
    _assert_all_cleaned_up(marker, tmp_path)


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs /proc")
def test_ctrl_c_ends_the_workers_the_server_and_the_temp_dirs(tmp_path: Path) -> None:
    marker = uuid.uuid4().hex
    bench = _spawn_bench(
        tmp_path, marker, "--server", "-g", "exactly-once", "--duration", "30", "--runs", "1",
        "--producers", "2", "--consumers", "2",
    )  # fmt: skip
    try:
        _workers_of(bench.pid, 4)
        os.killpg(bench.pid, signal.SIGINT)  # Ctrl-C: the whole process group
        _, stderr = bench.communicate(timeout=30)
    finally:
        if bench.poll() is None:
            for pid in _children(bench.pid):  # the server runs in a session of its own
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            os.killpg(bench.pid, signal.SIGKILL)
            bench.communicate()
    assert bench.returncode == 130, stderr
    assert "interrupted" in stderr
    assert "Traceback" not in stderr
    _assert_all_cleaned_up(marker, tmp_path)


def test_body_starts_with_the_send_time() -> None:
    """What a consumer reads back: the first 8 bytes, little-endian double."""
    t = time.time()
    body = bench_workers.pack_time(t) + b"x" * 92
    assert bench_workers.unpack_time(body) == (t,)
    assert struct.unpack_from("<d", body)[0] == t


def test_gc_threshold_tunes_the_bench_and_its_workers(monkeypatch: pytest.MonkeyPatch) -> None:
    import gc

    before = gc.get_threshold()
    monkeypatch.delenv(bench_workers.GC_ENV, raising=False)
    try:
        out = bench_json("-g", "at-most-once", "--count", "2000", "--gc-threshold", "54321")
        assert out["environment"]["gc_threshold"] == [54321, 50, 100]
        assert os.environ[bench_workers.GC_ENV] == "54321"  # what spawned workers inherit
        gc.set_threshold(*before)
        bench_workers.tune_gc()  # what a worker process does first
        assert gc.get_threshold() == (54321, 50, 100)
    finally:
        gc.set_threshold(*before)
    monkeypatch.delenv(bench_workers.GC_ENV)
    bench_workers.tune_gc()
    assert gc.get_threshold() == before  # without the option, Python's own
    assert bench_json("-g", "at-most-once", "--count", "2000")["environment"][
        "gc_threshold"
    ] == list(before)


def test_the_server_bench_starts_is_not_in_the_terminals_process_group() -> None:
    # Ctrl-C signals the terminal's foreground process group: a server in it would stop
    # under running workers (which then fail to connect) instead of after them
    server = start_server()
    try:
        assert os.getsid(server.pid) == server.pid  # a session (and group) of its own
        assert os.getpgid(server.pid) != os.getpgid(0)
    finally:
        server.stop()

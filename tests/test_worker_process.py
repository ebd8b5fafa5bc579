"""``arrival worker module:app`` as users run it: a real process, real signals."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

import arrival

APP = textwrap.dedent(
    """
    import os, time
    from pathlib import Path
    import msgspec
    import arrival

    HERE = Path(__file__).parent
    app = arrival.App(os.environ.get("WORKER_URL", "unused"), shutdown_timeout=10)

    class Job(msgspec.Struct):
        id: int
        seconds: float = 0.0

    @app.handler("jobs")
    def run(job: Job, ctx: arrival.Context) -> None:
        (HERE / f"started-{job.id}-{ctx.attempt}").touch()
        time.sleep(job.seconds)
        (HERE / f"finished-{job.id}").touch()
    """
)


@pytest.fixture
def project(tmp_path: Path) -> Path:
    (tmp_path / "jobs_app.py").write_text(APP)
    return tmp_path


def _load(data: Path, *jobs: tuple[int, float]) -> None:
    with arrival.connect(str(data)) as b:
        b.create_queue("jobs", "at-least-once", max_deliveries=5, dead_letter="jobs.dlq")
        for job_id, seconds in jobs:
            b.producer().send("jobs", arrival.encode({"id": job_id, "seconds": seconds})[0])


@pytest.fixture
def start(project: Path) -> Iterator[object]:
    procs: list[subprocess.Popen[str]] = []

    def run(*args: str) -> subprocess.Popen[str]:
        p = subprocess.Popen(
            [sys.executable, "-m", "arrival", "worker", "jobs_app:app", *args],
            cwd=project,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        procs.append(p)
        return p

    yield run
    for p in procs:
        if p.poll() is None:
            p.kill()
        p.wait(10)
        for stream in (p.stdout, p.stderr):
            if stream is not None:
                stream.close()


def _wait_for(path: Path, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert time.monotonic() < deadline, f"{path.name} never appeared"
        time.sleep(0.02)


def _ready_line(p: subprocess.Popen[str]) -> str:
    assert p.stdout is not None
    line = p.stdout.readline()
    assert line.startswith("worker ready"), line + (p.stderr.read() if p.stderr else "")
    return line


def _backlog(data: Path) -> tuple[int, int, int]:
    with arrival.connect(str(data)) as b:
        g = b.stats("jobs").groups[0]
        return g.backlog, g.in_flight, g.dead_lettered


def test_sigterm_lets_the_message_in_progress_finish(project: Path, start) -> None:  # type: ignore[no-untyped-def]
    data = project / "data"
    _load(data, (1, 1.0), (2, 0.0), (3, 0.0))
    p = start("--url", str(data))
    _ready_line(p)
    _wait_for(project / "started-1-1")
    p.send_signal(signal.SIGTERM)
    out, err = p.communicate(timeout=30)
    assert p.returncode == 0, err
    assert (project / "finished-1").exists()
    assert "worker stopped: 1 message(s) handled" in out
    assert _backlog(data) == (2, 0, 0)  # job 1 acked; 2 and 3 never taken


def test_past_the_deadline_the_message_goes_back_and_the_worker_exits(project: Path, start) -> None:  # type: ignore[no-untyped-def]
    data = project / "data"
    _load(data, (1, 60.0))
    p = start("--url", str(data), "--shutdown-timeout", "0.5")
    _ready_line(p)
    _wait_for(project / "started-1-1")
    t0 = time.monotonic()
    p.send_signal(signal.SIGTERM)
    _out, err = p.communicate(timeout=30)
    assert p.returncode == 0, err
    assert time.monotonic() - t0 < 15  # did not wait for the 60 s handler
    assert "abandoned" in err
    assert _backlog(data) == (1, 0, 0)  # back in the queue, not dead-lettered


def test_a_killed_worker_s_message_is_redelivered_to_the_next(project: Path, start) -> None:  # type: ignore[no-untyped-def]
    data = project / "data"
    _load(data, (1, 60.0))
    p = start("--url", str(data))
    _ready_line(p)
    _wait_for(project / "started-1-1")
    p.kill()  # SIGKILL mid-handler: the lease dies with the process's lock on the data
    p.wait(10)
    # the next worker gets it again (attempt 2) once it opens the data directory
    with arrival.connect(str(data)) as b:
        msg = b.consumer("jobs", "default").receive(timeout=5)
        assert msg is not None
        assert msg.attempt == 2
        msg.ack()


def test_metrics_are_served_while_it_runs(project: Path, start) -> None:  # type: ignore[no-untyped-def]
    data = project / "data"
    _load(data, (1, 0.0))
    p = start("--url", str(data), "--http", "127.0.0.1:0")
    line = _ready_line(p)
    url = line.split("metrics on ", 1)[1].strip()
    deadline = time.monotonic() + 20
    while True:
        with urllib.request.urlopen(url, timeout=5) as r:
            text = r.read().decode()
        if 'arrival_handler_handled_total{group="default",handler="run",queue="jobs"} 1.0' in text:
            break
        assert time.monotonic() < deadline, text
        time.sleep(0.05)
    assert 'arrival_handler_breaker_state{group="default",handler="run",queue="jobs"} 0.0' in text
    p.send_signal(signal.SIGINT)
    p.communicate(timeout=30)
    assert p.returncode == 0


@pytest.mark.parametrize(
    ("target", "message"),
    [
        ("jobs_app", "module:attribute"),
        ("no_such_module:app", "no module 'no_such_module'"),
        ("jobs_app:nope", "has no attribute 'nope'"),
        ("jobs_app:Job", "not an arrival.App"),
    ],
)
def test_a_bad_target_is_one_clear_line(project: Path, target: str, message: str) -> None:
    r = subprocess.run(
        [sys.executable, "-m", "arrival", "worker", target],
        cwd=project,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 2
    assert message in r.stderr
    assert "Traceback" not in r.stderr


CRASHING = textwrap.dedent(
    """
    import os, time
    from pathlib import Path
    import arrival

    HERE = Path(__file__).parent
    app = arrival.App("unused")

    @app.handler("jobs", retry=arrival.RetryPolicy(max_total_deliveries=2), prefetch=0)
    def run(body: bytes, ctx: arrival.Context) -> None:
        if body == b"segfault":
            time.sleep(0.3)  # long enough for the delivery to be recorded
            os._exit(70)  # as a crash in a C extension would: no exception, no settle
        (HERE / f"done-{body.decode()}").touch()
    """
)


def test_a_message_that_crashes_its_worker_is_dead_lettered_by_the_guard(
    project: Path,
) -> None:
    (project / "crashing_app.py").write_text(CRASHING)
    data = project / "data"
    with arrival.connect(str(data)) as b:
        b.create_queue("jobs", "at-least-once", max_deliveries=5, dead_letter="jobs.dlq")
        b.producer().send("jobs", b"segfault", id="poison")
        b.producer().send("jobs", b"fine", id="fine")
    codes = []
    for _ in range(3):
        p = subprocess.Popen(
            [sys.executable, "-m", "arrival", "worker", "crashing_app:app", "--url", str(data)],
            cwd=project,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        deadline = time.monotonic() + 30
        while p.poll() is None and not (project / "done-fine").exists():
            assert time.monotonic() < deadline, "the worker neither crashed nor got through"
            time.sleep(0.02)
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
        _out, err = p.communicate(timeout=30)
        codes.append(p.returncode)
        if p.returncode != 70:
            break
    # two deliveries crashed the worker; the third is past max_total_deliveries=2
    assert codes[:2] == [70, 70]
    assert len(codes) == 3
    assert "max_total_deliveries=2" in err
    assert (project / "done-fine").exists()
    with arrival.connect(str(data)) as b:
        (letter,) = b.dead_letters("jobs").list()
        assert letter.id == "poison"
        assert "delivered 3 times" in (letter.reason or "")
        assert letter.headers.get("arrival-failures") == "1"  # the crashes spent nothing

"""``arrival verify``: run a workload against a real server under faults, then check it.

Phases (docs/reliability.md): setup, faults, heal, final drain, audit, check.

- **setup**: an ``arrival serve`` process on a loopback port, a fault proxy in front of
  it, the queues, and the workload's processes (``arrival.verify.workload``), which reach
  the server through the proxy.
- **faults**: a scheduler seeded by ``seed`` fires one fault every ``interval`` seconds
  or so (server SIGKILL and restart, power loss, SIGSTOP pauses of the server or a
  consumer, network faults at the proxy, SIGKILL of a worker mid-operation, disk errors),
  each held for a while and then healed. Each goes into the history with its time.
- **heal**: every fault is undone; producers stop at the end of the fault phase; the
  consumers run until every group has settled everything (the liveness deadline).
- **final drain**: the workers are stopped and a fresh consumer per group reads what is
  left (``session="drain"``).
- **audit**: the server is stopped, and the data directory is opened to list what it
  stores; the exactly-once inbox's effects are read from its SQLite file.
- **check**: the merged history goes to ``arrival.verify.check``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import random
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgspec

import arrival
from arrival._canary import parse as parse_canaries
from arrival.errors import ArrivalError, UnknownQueue
from arrival.verify.checker import Report, check
from arrival.verify.history import (
    Ack,
    Audit,
    Deliver,
    Effect,
    Event,
    Fault,
    Send,
    Txn,
    dump,
    load,
)
from arrival.verify.natsserver import NatsCluster, NatsServer
from arrival.verify.proxy import FaultProxy
from arrival.verify.workload import intact

__all__ = [
    "FAULTS",
    "GUARANTEES",
    "NATS_FAULTS",
    "TARGETS",
    "Options",
    "Result",
    "parse_canaries",
    "run",
]

GUARANTEES = ("at-most-once", "at-least-once", "exactly-once")
FAULTS = (
    "kill",
    "power-loss",
    "pause",
    "pause-consumer",
    "network",
    "kill-worker",
    "disk",
    "corrupt",
)
"""Fault kinds ``--faults`` may name. ``power-loss`` runs the server in the storage test
mode that keeps un-fsynced writes in memory, so every server kill is a power cut.
``corrupt`` runs after the audit, on copies of the stopped server's data directory:
bytes flipped or the file cut short, then opened and read in full."""
CORRUPTION_TRIALS = 12

TARGETS = ("server", "nats")
NATS_FAULTS = ("kill", "pause", "pause-consumer", "kill-worker")
"""The faults a NATS JetStream cluster run takes: a node SIGKILLed and restarted, a node
paused (SIGSTOP) and resumed, and the workload's own. The others act on arrival's server
and its storage, which a cluster run does not have."""
NATS_NODES = 3

ACK_TIMEOUT_S = 2.0  # the verify queues' lease: pauses are 0.5-3x this
NETWORK_FAULTS = ("cut", "cut-mid-frame", "split", "delay", "blackhole", "half-open")


@dataclass
class Options:
    guarantee: str
    duration: float = 60.0  # seconds of faults
    faults: tuple[str, ...] = FAULTS
    seed: int = 0
    interval: float = 2.0  # mean seconds between faults
    rate: float = 200.0  # messages per second, all producers together
    keys: int = 16
    size: int = 64
    producers: int = 2
    consumers: int = 2
    heal_deadline: float = 60.0  # seconds for everything to settle after the faults
    workdir: str | None = None  # keep the run's files here (default: a temp dir, removed)
    canary: str | None = None  # a test-only broken mode the run must catch
    target: str = "server"  # "server": arrival serve; "nats": a 3-node JetStream cluster
    progress: Callable[[str, float], None] | None = None  # (phase, fraction done)


@dataclass
class Result:
    options: Options
    report: Report
    history: Path | None
    phases: dict[str, float] = field(default_factory=dict)  # seconds per phase
    recoveries: list[float] = field(default_factory=list)  # server restart to first answer
    notes: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        r = self.report
        return {
            "guarantee": r.guarantee,
            "seed": self.options.seed,
            "duration": self.options.duration,
            "canary": self.options.canary,
            "verdict": "pass" if r.ok else "fail",
            "forbidden": r.forbidden,
            "faults": r.faults,
            "sends": r.sends,
            "anomalies": r.counts,
            "examples": {
                k: [list(x) if isinstance(x, tuple) else x for x in v]
                for k, v in r.examples.items()
            },
            "phases": self.phases,
            "recovery_s": {
                "count": len(self.recoveries),
                "max": max(self.recoveries, default=0.0),
                "mean": sum(self.recoveries) / len(self.recoveries) if self.recoveries else 0.0,
            },
            "notes": self.notes,
        }


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class _Server:
    """``arrival serve`` as a child process, restartable on the same port."""

    def __init__(self, data: Path, log: Path, env: dict[str, str]) -> None:
        self.data = data
        self.log = log
        self.env = env
        self.port = _free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        self.paused = False

    @property
    def url(self) -> str:
        return f"arrival://127.0.0.1:{self.port}"

    def start(self, extra_env: dict[str, str] | None = None, timeout: float = 30.0) -> float:
        """Start it and wait until it answers; returns the seconds that took."""
        t0 = time.monotonic()
        env = {**os.environ, **self.env, **(extra_env or {})}
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "arrival",
                    "serve",
                    "--data",
                    str(self.data),
                    "--listen",
                    f"127.0.0.1:{self.port}",
                ],
                stdout=subprocess.DEVNULL,
                stderr=log,
                env=env,
            )
        deadline = t0 + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"the server exited with {self.proc.returncode} while starting; see {self.log}"
                )
            with (
                contextlib.suppress(OSError),
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2),
            ):
                return time.monotonic() - t0
            time.sleep(0.02)
        raise RuntimeError(f"the server did not listen within {timeout} s; see {self.log}")

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def signal(self, sig: signal.Signals) -> None:
        if self.alive():
            assert self.proc is not None
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(sig)

    def kill(self) -> None:
        if self.proc is not None:
            self.signal(signal.SIGKILL)
            self.proc.wait()
        self.paused = False

    def stop(self) -> None:
        if self.proc is None:
            return
        if self.paused:
            self.signal(signal.SIGCONT)
            self.paused = False
        self.signal(signal.SIGTERM)
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.kill()


class _Cluster:
    """A 3-node NATS JetStream cluster on loopback, its nodes killed, paused and restarted
    one at a time; clients reach it through every node's URL."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.cluster: NatsCluster | None = None

    def start(self) -> None:
        self.cluster = NatsCluster.start(self.directory, size=NATS_NODES)

    @property
    def url(self) -> str:
        assert self.cluster is not None
        monitors = ",".join(self.cluster.monitor_urls)
        return f"{self.cluster.url}?namespace=verify&monitor={monitors}"

    def nodes(self) -> list[NatsServer]:
        assert self.cluster is not None
        return list(self.cluster.nodes)

    def heal(self) -> list[float]:
        """Every node running again; the seconds each restart took."""
        took = []
        for node in self.nodes():
            if node.state == "paused":
                node.resume()
            elif node.state != "running":
                t0 = time.monotonic()
                node.restart()
                took.append(time.monotonic() - t0)
        assert self.cluster is not None
        self.cluster.wait_ready()
        return took

    def stop(self) -> None:
        if self.cluster is not None:
            self.cluster.stop()


@dataclass
class _Worker:
    role: str
    name: str
    cfg: dict[str, Any]
    incarnation: int = 0
    proc: subprocess.Popen[bytes] | None = None
    paused: bool = False

    @property
    def session(self) -> str:
        return f"{self.name}.{self.incarnation}"


class _Workers:
    def __init__(self, dir_: Path, log: Path) -> None:
        self.dir = dir_
        self.log = log
        self.all: list[_Worker] = []

    def add(self, role: str, name: str, cfg: dict[str, Any]) -> _Worker:
        w = _Worker(role, name, cfg)
        self.all.append(w)
        self.start(w)
        return w

    def start(self, w: _Worker) -> None:
        w.incarnation += 1
        cfg = {**w.cfg, "session": w.session, "history": str(self.dir / f"{w.session}.jsonl")}
        if w.role == "producer":
            cfg["name"] = w.session  # message ids are unique across incarnations
        with open(self.log, "ab") as log:
            w.proc = subprocess.Popen(
                [sys.executable, "-m", "arrival.verify", w.role, json.dumps(cfg)],
                stdout=subprocess.DEVNULL,
                stderr=log,
            )
        w.paused = False

    def kill(self, w: _Worker) -> None:
        if w.proc is not None and w.proc.poll() is None:
            w.proc.send_signal(signal.SIGKILL)
            w.proc.wait()

    def pause(self, w: _Worker, on: bool) -> None:
        if w.proc is not None and w.proc.poll() is None:
            w.proc.send_signal(signal.SIGSTOP if on else signal.SIGCONT)
        w.paused = on

    def stop(self, workers: list[_Worker], timeout: float = 30.0) -> None:
        for w in workers:
            if w.paused:
                self.pause(w, False)
            if w.proc is not None and w.proc.poll() is None:
                w.proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout
        for w in workers:
            if w.proc is None:
                continue
            try:
                w.proc.wait(max(deadline - time.monotonic(), 0.1))
            except subprocess.TimeoutExpired:
                self.kill(w)

    def histories(self) -> Iterator[Path]:
        return iter(sorted(self.dir.glob("*.jsonl")))


class _Run:
    def __init__(self, opts: Options, root: Path) -> None:
        self.o = opts
        self.root = root
        self.rng = random.Random(opts.seed)
        self.faults: list[Fault] = []
        self.notes: list[str] = []
        self.recoveries: list[float] = []
        env: dict[str, str] = {}
        if "power-loss" in opts.faults:
            env["ARRIVAL_STORAGE_TEST"] = f"powerloss,seed={opts.seed}"
        if opts.canary:
            env["ARRIVAL_CANARY"] = opts.canary
        self.server_env = env
        # with the power-loss storage mode on, every SIGKILL of the server is a power cut
        self.kill_kind = "power-loss" if "power-loss" in opts.faults else "kill"
        self.server = _Server(root / "data", root / "server.log", env)
        self.nats = _Cluster(root / "nats") if opts.target == "nats" else None
        (root / "history").mkdir()
        self.workers = _Workers(root / "history", root / "workers.log")
        self.proxy: FaultProxy | None = None
        self.effects = root / "effects.db"
        self.queues: list[tuple[str, str]] = []  # (queue, group) the drain reads
        self.stored: list[tuple[str, str, bool]] = []  # the audit: (queue, id, intact)

    def fault(self, kind: str, detail: str = "", session: str = "") -> None:
        self.faults.append(Fault(time.monotonic(), kind, detail, session))

    # -- setup -------------------------------------------------------------------------

    @property
    def admin_url(self) -> str:
        """Where the runner itself connects: the server, or the cluster."""
        return self.nats.url if self.nats is not None else self.server.url

    def setup(self) -> None:
        o = self.o
        if self.nats is not None:
            self.nats.start()
            url = self.nats.url  # nats-py moves between the nodes by itself
        else:
            self.server.start()
            self.proxy = FaultProxy(("127.0.0.1", self.server.port), seed=o.seed)
            url = self.proxy.url
        options: dict[str, Any] = {}
        if o.guarantee != "at-most-once":
            options = {
                "ack_timeout": ACK_TIMEOUT_S,
                "max_deliveries": None,
                "retention": 7 * 86400.0,
            }
        else:
            options = {"capacity": 1_000_000}
        with arrival.connect(self.admin_url) as b:
            b.create_queue("verify", o.guarantee, **options)
            if o.guarantee == "exactly-once":
                b.create_queue("verify-out", o.guarantee, **options)
        until = time.monotonic() + o.duration
        common = {"url": url, "size": o.size, "seed": o.seed, "guarantee": o.guarantee}
        for i in range(o.producers):
            self.workers.add(
                "producer",
                f"p{i}",
                {
                    **common,
                    "queue": "verify",
                    "keys": o.keys,
                    "rate": o.rate / o.producers,
                    "until": until,
                    "producer_id": f"p{i}" if o.guarantee == "exactly-once" else None,
                },
            )
        if o.guarantee == "exactly-once":
            self.queues = [("verify", "ctp"), ("verify-out", "inbox")]
            for i in range(o.consumers):
                self.workers.add(
                    "ctp",
                    f"t{i}",
                    {
                        **common,
                        "queue": "verify",
                        "group": "ctp",
                        "output": "verify-out",
                        "tid": f"ctp-{i}",
                    },
                )
            for i in range(o.consumers):
                self.workers.add(
                    "inbox",
                    f"i{i}",
                    {
                        **common,
                        "queue": "verify-out",
                        "group": "inbox",
                        "effects": str(self.effects),
                    },
                )
        else:
            self.queues = [("verify", "g")]
            for i in range(o.consumers):
                self.workers.add("consumer", f"c{i}", {**common, "queue": "verify", "group": "g"})

    # -- faults ------------------------------------------------------------------------

    def restart_server(self, kind: str, down: float) -> None:
        self.server.kill()
        self.fault(kind, f"down {down:.2f} s")
        time.sleep(down)
        self.recoveries.append(self.server.start())

    def nats_fault(self, kind: str) -> bool:
        """Fire, hold and heal one fault on the cluster; False if ``kind`` is not one."""
        assert self.nats is not None
        rng = self.rng
        if kind not in ("kill", "pause"):
            return False
        node = rng.choice([n for n in self.nats.nodes() if n.state == "running"])
        if kind == "kill":
            down = rng.uniform(0.0, 2.0)
            node.kill()
            self.fault("kill", f"node {node.name} down {down:.2f} s")
            time.sleep(down)
            t0 = time.monotonic()
            node.restart()
            self.recoveries.append(time.monotonic() - t0)
        else:
            hold = rng.uniform(0.5, 3.0) * ACK_TIMEOUT_S
            node.pause()
            self.fault("pause", f"node {node.name} {hold:.2f} s")
            time.sleep(hold)
            node.resume()
        return True

    def one_fault(self, kind: str) -> None:
        """Fire one fault of ``kind``, hold it, and heal it."""
        rng, proxy = self.rng, self.proxy
        if self.nats is not None and self.nats_fault(kind):
            return
        if kind in ("kill", "power-loss"):
            self.restart_server(self.kill_kind, rng.uniform(0.0, 2.0))
        elif kind == "pause":
            hold = rng.uniform(0.5, 3.0) * ACK_TIMEOUT_S
            self.server.signal(signal.SIGSTOP)
            self.server.paused = True
            self.fault("pause", f"server {hold:.2f} s")
            time.sleep(hold)
            self.server.signal(signal.SIGCONT)
            self.server.paused = False
        elif kind == "pause-consumer":
            w = rng.choice([w for w in self.workers.all if w.role != "producer"])
            hold = rng.uniform(0.5, 3.0) * ACK_TIMEOUT_S
            self.workers.pause(w, True)
            self.fault("pause-consumer", f"{hold:.2f} s", w.session)
            time.sleep(hold)
            self.workers.pause(w, False)
        elif kind == "kill-worker":
            w = rng.choice(self.workers.all)
            self.workers.kill(w)
            self.fault("kill-worker", w.role, w.session)
            time.sleep(rng.uniform(0.0, 1.0))
            self.workers.start(w)
        elif kind == "network":
            assert proxy is not None
            what = rng.choice(NETWORK_FAULTS)
            hold = rng.uniform(0.2, 2.0)
            self.fault(f"network/{what}")
            if what == "cut":
                proxy.cut()
            elif what == "cut-mid-frame":
                proxy.cut_mid_frame()
            elif what == "split":
                proxy.split(True)
            elif what == "delay":
                proxy.delay(rng.uniform(0.005, 0.1), jitter=0.02)
            elif what == "blackhole":
                proxy.blackhole(True)
            elif what == "half-open":
                proxy.half_open()
            time.sleep(hold)
            proxy.heal()
            if what in ("blackhole", "half-open"):
                proxy.cut()  # what the clients' timeouts would have done, sooner
        elif kind == "disk":
            # the server again, on a disk whose fsyncs (or writes) now and then fail: the
            # first failure must stop it without acknowledging what was not stored
            what = rng.choice(("eio-fsync", "enospc"))
            self.server.stop()
            base = self.server_env.get("ARRIVAL_STORAGE_TEST") or "powerloss"
            mode = f"{base},{what}=0.05,seed={rng.randrange(1 << 30)}"
            self.fault("disk", what)
            try:
                self.server.start({"ARRIVAL_STORAGE_TEST": mode})
            except RuntimeError:  # the disk failed it while it opened: a refusal, fine
                self.fault("disk-stop", "the server refused to start on the disk error")
                self.recoveries.append(self.server.start())
                return
            t_end = time.monotonic() + rng.uniform(1.0, 3.0)
            while time.monotonic() < t_end and self.server.alive():
                time.sleep(0.02)
            if self.server.alive():
                self.server.kill()
                self.fault(self.kill_kind, "end of the disk fault")
            else:
                code = self.server.proc.returncode if self.server.proc else None
                self.fault("disk-stop", f"the server stopped on the disk error, exit {code}")
                if code != 1:
                    self.notes.append(f"after a disk error the server exited with {code}, not 1")
            self.recoveries.append(self.server.start())
        else:
            raise ValueError(f"unknown fault {kind!r}; known: {', '.join(FAULTS)}")

    def fault_phase(self) -> None:
        o = self.o
        t0 = time.monotonic()
        end = t0 + o.duration
        live = [k for k in o.faults if k != "corrupt"]
        kinds = [k for k in live if k != "power-loss"] or live
        if "power-loss" in o.faults:
            kinds = ["power-loss" if k == "kill" else k for k in kinds]
            if "power-loss" not in kinds:
                kinds.append("power-loss")
        due = t0
        while True:
            # faults start ``interval`` apart on average (back to back when one is held
            # longer than that), each with its own hold and recovery
            due += self.rng.expovariate(1.0 / o.interval)
            if due >= end:
                break
            time.sleep(max(due - time.monotonic(), 0.0))
            if self.nats is None and not self.server.alive():
                code = self.server.proc.returncode if self.server.proc else None
                self.notes.append(f"the server died by itself (exit {code}); restarted")
                self.fault("server-died")
                self.recoveries.append(self.server.start())
            if kinds:
                self.one_fault(self.rng.choice(kinds))
            self.progress("faults", (time.monotonic() - t0) / o.duration)
        time.sleep(max(end - time.monotonic(), 0.0))

    def progress(self, phase: str, done: float) -> None:
        if self.o.progress is not None:
            self.o.progress(phase, min(max(done, 0.0), 1.0))

    # -- heal, drain, audit ------------------------------------------------------------

    def heal(self) -> bool:
        """Undo every fault and wait until the workload has settled; False if it did not
        within the heal deadline."""
        if self.nats is not None:
            self.recoveries += self.nats.heal()
        else:
            assert self.proxy is not None
            self.proxy.heal()
            if not self.server.alive():
                self.fault("server-died")
                self.notes.append("the server died by itself; restarted to heal")
                self.recoveries.append(self.server.start())
        for w in self.workers.all:
            if w.paused:
                self.workers.pause(w, False)
            if w.proc is not None and w.proc.poll() is not None and w.role != "producer":
                self.workers.start(w)  # a consumer that died: its replacement finishes
        producers = [w for w in self.workers.all if w.role == "producer"]
        deadline = time.monotonic() + self.o.heal_deadline
        for w in producers:
            assert w.proc is not None
            try:
                w.proc.wait(max(deadline - time.monotonic(), 0.1))
            except subprocess.TimeoutExpired:
                self.notes.append(f"producer {w.session} still sending at the heal deadline")
        self.workers.stop(producers, timeout=5.0)
        settled = False
        with arrival.connect(self.admin_url) as b:
            while time.monotonic() < deadline:
                try:
                    stats = [b.stats(q) for q, _ in self.queues]
                except UnknownQueue as exc:  # the store lost it: the audit will show
                    self.notes.append(f"after the faults: {exc}")
                    break
                pending = sum(
                    g.backlog + g.in_flight + g.waiting_retry
                    for s, (_q, grp) in zip(stats, self.queues, strict=True)
                    for g in s.groups
                    if g.group == grp
                )
                self.progress("heal", 0.0 if pending else 1.0)
                if pending == 0:
                    settled = True
                    break
                time.sleep(0.2)
        self.workers.stop(self.workers.all)
        return settled

    def drain(self) -> list[Event]:
        events: list[Event] = []
        with arrival.connect(self.admin_url) as b:
            for queue, group in self.queues:
                if queue not in b.queues():
                    continue  # lost with the store (see heal); nothing to drain
                c = b.consumer(queue, group)
                idle_until = time.monotonic() + ACK_TIMEOUT_S * 2
                while time.monotonic() < idle_until:
                    msgs = c.receive_batch(100, timeout=0.2)
                    if not msgs:
                        continue
                    idle_until = time.monotonic() + ACK_TIMEOUT_S * 2
                    for m in msgs:
                        events.append(
                            Deliver(
                                time.monotonic(),
                                queue,
                                group,
                                "drain",
                                m.id,
                                m.key or "",
                                m.attempt,
                                intact(m.id, m.key or "", m.body, self.o.size),
                            )
                        )
                    if self.o.guarantee != "at-most-once":
                        c.ack_batch(msgs)
                c.close()
        return events

    def read_store(self, data: Path | str) -> list[tuple[str, str, bool]]:
        """Every message stored in ``data`` (a data directory, or the cluster's URL):
        (queue, id, body intact)."""
        out: list[tuple[str, str, bool]] = []
        with arrival.connect(str(data)) as b:
            present = set(b.queues())
            for queue, _group in self.queues:
                if queue not in present:
                    continue  # covered by the audit, and empty: every message is gone
                s = b.stats(queue)
                off = s.first_offset
                while off < s.end_offset:
                    page = b.peek(queue, 1000, start=off)
                    if not page:
                        break
                    out += [
                        (queue, m.id or "", intact(m.id or "", m.key or "", m.body, self.o.size))
                        for m in page
                    ]
                    off = page[-1].offset + 1
        return out

    def audit(self) -> list[Event]:
        if self.nats is None:
            self.server.stop()
        if self.o.guarantee == "at-most-once":
            return []  # at-most-once queues are kept in memory: nothing to audit
        self.stored = self.read_store(self.server.data if self.nats is None else self.admin_url)
        stored = [(q, mid) for q, mid, _ in self.stored]
        events: list[Event] = [Audit(stored, [q for q, _ in self.queues])]
        if self.effects.exists():
            db = sqlite3.connect(self.effects)
            try:
                rows = db.execute("SELECT queue, grp, id FROM effects").fetchall()
            finally:
                db.close()
            events += [Effect(q, g, mid) for q, g, mid in rows]
        return events

    def corruption(self) -> list[object]:
        """Damage copies of the data directory (bytes flipped, or the database cut
        short), open each and read it in full: it must be refused loudly, or read back
        exactly as the audit found it. Returns the copies served silently wrong."""
        silent: list[object] = []
        db = self.server.data / "arrival.db"
        if self.o.guarantee == "at-most-once" or not db.exists():
            return silent
        expected = sorted(self.stored)
        for trial in range(CORRUPTION_TRIALS):
            copy = self.root / f"corrupt-{trial}"
            shutil.copytree(self.server.data, copy, ignore=shutil.ignore_patterns("LOCK"))
            target = copy / "arrival.db"
            size = target.stat().st_size
            if self.rng.random() < 0.5:
                flips = self.rng.randint(1, 8)
                with open(target, "r+b") as f:
                    for _ in range(flips):
                        f.seek(self.rng.randrange(size))
                        byte = f.read(1)
                        f.seek(-1, os.SEEK_CUR)
                        f.write(bytes([byte[0] ^ (1 << self.rng.randrange(8))]))
                what = f"{flips} bit(s) flipped"
            else:
                cut = self.rng.randrange(size)
                os.truncate(target, cut)
                what = f"cut to {cut} of {size} bytes"
            try:
                found = sorted(self.read_store(copy))
            except ArrivalError as exc:
                self.fault("corrupt", f"{what}: refused ({type(exc).__name__})")
            else:
                self.fault("corrupt", f"{what}: read back whole" if found == expected else what)
                if found != expected:
                    silent.append((trial, what, len(expected), len(found)))
            shutil.rmtree(copy, ignore_errors=True)
        return silent

    def close(self) -> None:
        self.workers.stop(self.workers.all, timeout=5.0)
        if self.proxy is not None:
            self.proxy.close()
        self.server.stop()
        if self.nats is not None:
            self.nats.stop()


def merge(paths: Iterator[Path], end: float) -> list[Event]:
    """Every worker's events; an operation's indeterminate record is dropped when its
    outcome was recorded too, and kept (ending at ``end``) when it was not."""
    events: list[Event] = []
    for p in paths:
        with open(p, "rb") as f:
            lines = f.read().split(b"\n")
        events += list(load(lines[:-1]))  # every line but the last is whole
        with contextlib.suppress(msgspec.DecodeError):  # the last, cut short by a SIGKILL
            events += list(load(lines[-1:]))
    answered_sends = {(e.queue, e.id, e.time) for e in events if isinstance(e, Send) and e.end}
    answered_acks = {
        (e.queue, e.group, e.session, e.id, e.attempt, e.time)
        for e in events
        if isinstance(e, Ack) and e.end
    }
    out: list[Event] = []
    for e in events:
        if isinstance(e, Send) and not e.end:
            if (e.queue, e.id, e.time) in answered_sends:
                continue
            e = Send(e.time, end, e.queue, e.id, e.key, "info", e.producer, e.epoch)
        elif isinstance(e, Ack) and not e.end:
            if (e.queue, e.group, e.session, e.id, e.attempt, e.time) in answered_acks:
                continue
            e = Ack(e.time, end, e.queue, e.group, e.session, e.id, e.attempt, "info", e.kind)
        elif isinstance(e, Txn) and not e.end:
            e = Txn(e.time, end, e.tid, "info", e.inputs, e.outputs, e.epoch)
        out.append(e)
    return out


def run(opts: Options) -> Result:
    """One verify run of ``opts.guarantee``; the files are kept in ``opts.workdir``."""
    if opts.guarantee not in GUARANTEES:
        raise ValueError(f"unknown guarantee {opts.guarantee!r}; known: {', '.join(GUARANTEES)}")
    if opts.target not in TARGETS:
        raise ValueError(f"unknown target {opts.target!r}; known: {', '.join(TARGETS)}")
    known = NATS_FAULTS if opts.target == "nats" else FAULTS
    if opts.target == "nats" and opts.faults == FAULTS:  # the default: all, for the target
        opts = dataclasses.replace(opts, faults=NATS_FAULTS)
    unknown = set(opts.faults) - set(known)
    if unknown:
        raise ValueError(
            f"unknown faults {sorted(unknown)} for target {opts.target}; known: {', '.join(known)}"
        )
    if opts.canary and opts.target == "nats":
        raise ValueError("canaries break arrival's own server; they do not apply to NATS")
    if opts.canary:
        parse_canaries(opts.canary)
    keep = opts.workdir is not None
    root = Path(opts.workdir or tempfile.mkdtemp(prefix="arrival-verify-"))
    root.mkdir(parents=True, exist_ok=True)
    if any(root.iterdir()):
        raise ValueError(f"the verify directory {str(root)!r} is not empty")
    r = _Run(opts, root)
    phases: dict[str, float] = {}
    try:
        t = time.monotonic()
        r.setup()
        phases["setup"] = time.monotonic() - t
        t = time.monotonic()
        r.fault_phase()
        phases["faults"] = time.monotonic() - t
        t = time.monotonic()
        settled = r.heal()
        phases["heal"] = time.monotonic() - t
        t = time.monotonic()
        drained = r.drain()
        phases["drain"] = time.monotonic() - t
        t = time.monotonic()
        audited = r.audit()
        phases["audit"] = time.monotonic() - t
        silent: list[object] = []
        if "corrupt" in opts.faults and opts.target == "server":
            t = time.monotonic()
            silent = r.corruption()
            phases["corruption"] = time.monotonic() - t
    finally:
        r.close()
    end = time.monotonic()
    events = merge(r.workers.histories(), end) + r.faults + drained + audited
    report = check(events, opts.guarantee)
    if not settled:
        report.add("liveness", [f"not settled {opts.heal_deadline:.0f} s after the faults"])
    report.add("silent-corruption", silent)
    history = root / "history.jsonl"
    events.sort(key=lambda e: getattr(e, "time", end))
    with open(history, "wb") as f:
        dump(events, f)
    result = Result(opts, report, history if keep else None, phases, r.recoveries, r.notes)
    if not keep:
        shutil.rmtree(root, ignore_errors=True)
    return result

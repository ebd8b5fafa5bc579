"""arrival.jetstream.mapping and the URL parser: how queues become JetStream streams,
subjects, consumers and headers. Pure functions: no server."""

from __future__ import annotations

import re
import string

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from arrival.engine import DLQ_GROUP
from arrival.errors import UsageError
from arrival.jetstream import mapping
from arrival.jetstream.backend import NatsOptions, parse_nats_url
from arrival.model import Backoff, Guarantee, QueueSpec
from arrival.semantics.spec import decode_spec, resolve_spec

NS = "t1"
NAME_CHARS = string.ascii_letters + string.digits + "._:-"  # what a queue name may hold
STREAM_NAME = re.compile(r"[A-Za-z0-9_]+")  # what every escaped name is made of
SUBJECT_TOKEN = re.compile(r"[A-Za-z0-9_-]+")  # no wildcard, no space, never empty
SECOND_NS = 1_000_000_000
FAST = settings(max_examples=200, deadline=None)

queue_names = st.from_regex(r"[A-Za-z0-9][A-Za-z0-9._:\-]{0,199}", fullmatch=True)
keys = st.text(alphabet=st.characters(codec="utf-8"), min_size=1)  # what a key may hold


def spec(name: str, guarantee: str, **options: object) -> QueueSpec:
    return resolve_spec(name, guarantee, **options)


def tokens(subject: str) -> list[str]:
    return subject.split(".")


# -- names ----------------------------------------------------------------------------


def test_every_allowed_character_round_trips_alone_and_together() -> None:
    for ch in [*NAME_CHARS, "~"]:  # '~' only in arrival's own group names (DLQ_GROUP)
        escaped = mapping.escape(ch)
        assert STREAM_NAME.fullmatch(escaped), (ch, escaped)
        assert mapping.unescape(escaped) == ch
    everything = NAME_CHARS + "~"
    assert mapping.unescape(mapping.escape(everything)) == everything
    assert mapping.escape("Orders42") == "Orders42"  # letters and digits stay as they are


@FAST
@given(queue_names)
def test_escaped_queue_names_are_valid_stream_names_and_round_trip(name: str) -> None:
    escaped = mapping.escape(name)
    assert STREAM_NAME.fullmatch(escaped)
    assert mapping.unescape(escaped) == name  # a left inverse: no two names collide
    stream = mapping.stream_name(NS, name)
    assert stream == f"{NS}_{escaped}"
    assert mapping.queue_of_stream(NS, stream) == name


def test_names_that_look_alike_stay_distinct() -> None:
    alike = ["a.b", "a_b", "a-b", "a:b", "a~b", "ab", "a_db", "a_ub", "a__b", "A.b", "a..b"]
    streams = {mapping.stream_name(NS, name) for name in alike}
    assert len(streams) == len(alike)
    consumers = {mapping.consumer_name(name) for name in alike}
    assert len(consumers) == len(alike)


def test_characters_a_stream_name_cannot_carry_are_refused() -> None:
    for bad in ["a b", "a/b", "a*b", "a>b", "a\tb", "caf\u00e9", "a\\b", "a$b"]:
        with pytest.raises(UsageError, match="has a character JetStream names can't carry"):
            mapping.escape(bad)
        with pytest.raises(UsageError):
            mapping.stream_name(NS, bad)


def test_a_name_too_long_once_escaped_is_refused() -> None:
    fits = "a" * (mapping.MAX_STREAM_NAME - len(NS) - 1)
    assert len(mapping.stream_name(NS, fits)) == mapping.MAX_STREAM_NAME
    with pytest.raises(UsageError, match=r"too long for a JetStream stream name .*256 > 255"):
        mapping.stream_name(NS, fits + "b")
    # 200 characters is a valid queue name, but every '.' takes two once escaped
    dotted = "a" + "." * 199
    resolve_spec(dotted, "at-most-once")  # arrival accepts the name itself
    with pytest.raises(UsageError, match="choose a shorter name"):
        mapping.stream_name(NS, dotted)


def test_the_dead_letter_group_has_a_consumer_name_of_its_own() -> None:
    assert mapping.consumer_name(DLQ_GROUP) == "_tdlq"
    assert mapping.consumer_name("billing.eu") == "billing_deu"
    assert mapping.consumer_name(DLQ_GROUP) != mapping.consumer_name("tdlq")


def test_streams_of_other_namespaces_or_badly_escaped_are_not_queues() -> None:
    assert mapping.queue_of_stream(NS, "t1_orders_ddlq") == "orders.dlq"
    for foreign in [
        "t2_orders",  # another namespace
        "t10_orders",  # a namespace that starts with ours
        "T1_orders",  # names are case-sensitive
        "KV_t1_txn",  # arrival's own transaction bucket
        "orders",
        "t1_a_z",  # '_z' escapes nothing
        "t1_a_",  # an escape cut short
    ]:
        assert mapping.queue_of_stream(NS, foreign) is None, foreign


def test_streams_no_queue_maps_to_are_not_queues() -> None:
    for ns, foreign in [("t1", "t1_"), ("t1", "t1_-x"), ("t1", "t1_a-b"), ("KV", "KV_t1_txn")]:
        assert mapping.queue_of_stream(ns, foreign) is None, (ns, foreign)


# -- subjects -------------------------------------------------------------------------


def test_a_queue_has_one_subject_and_the_stream_covers_it() -> None:
    s = spec("orders.eu", "at-least-once")
    subject = mapping.subject(NS, "orders.eu")
    assert subject == mapping.subject(NS, "orders.eu", None)
    assert all(SUBJECT_TOKEN.fullmatch(t) for t in tokens(subject))
    config = mapping.stream_config(NS, s, replicas=1, atomic=True)
    assert config["subjects"] == [subject, subject + ".>"]
    keyed = mapping.subject(NS, "orders.eu", "customer-7")  # a key has its own subject
    assert keyed.startswith(subject + ".k.")
    assert keyed == mapping.subject(NS, "orders.eu", "customer-7", conflate=True)
    assert keyed != mapping.subject(NS, "orders.eu", "customer-8")
    assert mapping.subject(NS, "orders.eu") != mapping.subject(NS, "orders_eu")
    assert mapping.subject("t2", "orders.eu") != subject


@FAST
@given(keys, keys)
def test_a_conflated_queue_gives_each_key_one_subject(a: str, b: str) -> None:
    base = mapping.subject(NS, "prices")
    sa = mapping.subject(NS, "prices", a, conflate=True)
    assert sa == mapping.subject(NS, "prices", a, conflate=True)  # the same key: the same
    assert sa.startswith(base + ".")  # covered by the stream's 'base.>'
    assert all(SUBJECT_TOKEN.fullmatch(t) for t in tokens(sa)), sa
    assert len(tokens(sa)) == len(tokens(base)) + 2  # one token, whatever the key holds
    if a != b:
        assert sa != mapping.subject(NS, "prices", b, conflate=True)


def test_conflated_keys_that_look_like_subjects_stay_one_token() -> None:
    subjects = {
        mapping.subject(NS, "p", key, conflate=True)
        for key in ["a.b", "a b", "*", ">", "a.>", "\u00e9", "n", "k"]
    }
    assert len(subjects) == 8
    keyless = mapping.subject(NS, "p", None, conflate=True)
    assert keyless not in subjects
    assert keyless.startswith(mapping.subject(NS, "p") + ".")
    assert all(SUBJECT_TOKEN.fullmatch(t) for t in tokens(keyless))
    # keyless messages are not conflated: each gets a subject of its own
    assert keyless != mapping.subject(NS, "p", None, conflate=True)


def test_the_empty_key_has_a_valid_subject() -> None:
    subject = mapping.subject(NS, "p", "", conflate=True)
    assert all(SUBJECT_TOKEN.fullmatch(t) for t in tokens(subject)), subject


# -- stream configuration -------------------------------------------------------------


def test_an_at_most_once_stream_is_memory_r1_and_bounded() -> None:
    s = spec("ticks", "at-most-once", capacity=50)
    config = mapping.stream_config(NS, s, replicas=3, atomic=True)
    assert config["name"] == "t1_ticks"
    assert config["storage"] == "memory"
    assert config["num_replicas"] == 1  # never replicated, whatever the cluster
    assert config["discard"] == "old"
    assert config["max_msgs"] == 50
    assert "max_msgs_per_subject" not in config
    assert "allow_atomic" not in config  # fire and forget: no batches
    assert config["max_msg_size"] == s.max_message_bytes + mapping.HEADER_OVERHEAD
    assert decode_spec(config["metadata"][mapping.META_SPEC].encode()) == s

    newest = mapping.stream_config(
        NS, spec("ticks", "at-most-once", capacity=5, drop="newest"), replicas=1, atomic=False
    )
    assert (newest["discard"], newest["max_msgs"]) == ("new", 5)

    conflated = mapping.stream_config(
        NS, spec("prices", "at-most-once", conflate=True), replicas=1, atomic=False
    )
    assert conflated["max_msgs_per_subject"] == 1
    assert conflated["max_msgs"] == spec("p", "at-most-once").capacity  # the default


def test_an_at_least_once_stream_is_file_replicated_and_unbounded() -> None:
    s = spec("orders", "at-least-once", max_message_bytes=4096)
    for replicas in (1, 3, 5):
        config = mapping.stream_config(NS, s, replicas=replicas, atomic=True)
        assert config["storage"] == "file"
        assert config["num_replicas"] == replicas
        assert config["allow_atomic"] is True
        assert config["retention"] == "limits"
        assert config["max_msg_size"] == 4096 + mapping.HEADER_OVERHEAD
        for limit in ("max_msgs", "max_msgs_per_subject", "max_bytes", "max_age"):
            assert limit not in config  # nothing acknowledged is ever discarded
        assert config["duplicate_window"] == 120 * SECOND_NS  # JetStream's own default
    assert "allow_atomic" not in mapping.stream_config(NS, s, replicas=1, atomic=False)
    assert decode_spec(config["metadata"][mapping.META_SPEC].encode()) == s


def test_the_duplicate_window_covers_the_dedup_window() -> None:
    for guarantee, options, window_s in [
        ("exactly-once", {}, spec("x", "exactly-once").dedup_window),
        ("exactly-once", {"dedup_window": 3600.0}, 3600.0),
        ("exactly-once", {"dedup_window": 10.0}, 120.0),  # never below JetStream's default
        ("at-least-once", {"dedup": True, "dedup_window": 86400.0}, 86400.0),
        ("at-least-once", {"dedup_window": 86400.0}, 120.0),  # dedup off: retries only
    ]:
        s = spec("q", guarantee, **options)
        config = mapping.stream_config(NS, s, replicas=3, atomic=True)
        assert config["duplicate_window"] == int(window_s * SECOND_NS), (guarantee, options)
        if s.dedup:
            assert config["duplicate_window"] >= s.dedup_window * SECOND_NS
        assert config["storage"] == "file"
        assert config["num_replicas"] == 3
    assert spec("x", "exactly-once").guarantee is Guarantee.EXACTLY_ONCE


# -- consumer configuration -----------------------------------------------------------


def test_an_at_most_once_group_acks_nothing() -> None:
    s = spec("ticks", "at-most-once")
    config = mapping.consumer_config(s, "screens.eu", latest=False)
    assert config == {
        "durable_name": "screens_deu",
        "deliver_policy": "all",
        "replay_policy": "instant",
        "ack_policy": "none",
    }
    assert mapping.consumer_config(s, "g", latest=True)["deliver_policy"] == "new"


def test_a_durable_group_acks_explicitly_and_never_gives_up_on_its_own() -> None:
    s = spec(
        "orders",
        "at-least-once",
        ack_timeout=1.0,
        backoff=Backoff(initial_s=0.2, multiplier=2.0, max_s=1.0, jitter=0.5),
    )
    config = mapping.consumer_config(s, "billing", latest=False)
    assert config["durable_name"] == "billing"
    assert config["ack_policy"] == "explicit"
    assert config["ack_wait"] == 1 * SECOND_NS
    assert config["max_deliver"] == -1  # arrival keeps the budget and dead-letters
    assert config["max_ack_pending"] == mapping.MAX_ACK_PENDING
    assert config["deliver_policy"] == "all"
    assert mapping.consumer_config(s, "billing", latest=True)["deliver_policy"] == "new"
    # the lease, plus 0.2, 0.4, 0.8, then 1.0 (capped) s at the jitter's mean (x 0.75)
    waits_s = [1.15, 1.3, 1.6, 1.75, 1.75, 1.75, 1.75, 1.75]
    assert len(waits_s) == mapping.BACKOFF_STEPS
    assert mapping.backoff_waits(s) == waits_s
    assert config["backoff"] == [int(w * SECOND_NS) for w in waits_s]
    exactly = spec("pay", "exactly-once", ack_timeout=2.0)
    assert mapping.consumer_config(exactly, "g", latest=False)["ack_policy"] == "explicit"


def test_backoff_without_jitter_and_without_delay() -> None:
    steady = spec(
        "q",
        "at-least-once",
        ack_timeout=0.5,
        backoff=Backoff(initial_s=0.2, multiplier=1.0, max_s=0.2, jitter=0.0),
    )
    assert mapping.backoff_waits(steady) == [0.7] * mapping.BACKOFF_STEPS
    none = spec(
        "q", "at-least-once", backoff=Backoff(initial_s=0.0, multiplier=1.0, max_s=0.0, jitter=0)
    )
    assert mapping.backoff_waits(none) is None
    config = mapping.consumer_config(none, "g", latest=False)
    assert "backoff" not in config
    assert config["ack_wait"] == int(none.ack_timeout * SECOND_NS)


# -- headers --------------------------------------------------------------------------


def test_headers_round_trip() -> None:
    h = {"type": "order", "Content-Type": "application/json", "trace": "a:b; c=d\te"}
    for mid, key, headers in [
        ("m-1", "customer-7", h),
        (None, None, h),
        ("m-1", None, None),
        (None, "k", None),
        ("", "", {"empty": ""}),
        ("id \u00e9", "cl\u00e9", {"uni": "\u2713"}),
    ]:
        raw = mapping.encode_headers(mid, key, headers)
        assert raw is not None
        assert mapping.decode_headers(raw) == (mid, key, headers)
    assert mapping.encode_headers(None, None, None) is None
    assert mapping.encode_headers(None, None, {}) is None
    assert mapping.decode_headers(None) == (None, None, None)
    assert mapping.decode_headers({}) == (None, None, None)


def test_decoding_drops_what_jetstream_adds() -> None:
    raw = {
        mapping.H_ID: "m-1",
        "Nats-Msg-Id": "i:m-1",
        "Nats-Sequence": "3",
        "Nats-Time-Stamp": "2024-01-01T00:00:00Z",
        "type": "order",
    }
    assert mapping.decode_headers(raw) == ("m-1", None, {"type": "order"})
    assert mapping.decode_headers({"Nats-Sequence": "3"}) == (None, None, None)


def test_header_names_nats_or_arrival_reserve_are_refused() -> None:
    for name in ["Nats-Foo", "nats-msg-id", "NATS-Expected-Stream", mapping.H_ID, mapping.H_KEY]:
        with pytest.raises(UsageError, match=r"is reserved on JetStream .*rename it"):
            mapping.encode_headers(None, None, {name: "x"})


def test_header_names_and_values_nats_cannot_carry_are_refused() -> None:
    for name in ["a:b", "a b", "", "caf\u00e9", "tab\there", "del\x7f", "new\nline"]:
        with pytest.raises(UsageError, match="can't travel in a NATS header"):
            mapping.encode_headers(None, None, {name: "x"})
    for value in ["two\nlines", "carriage\rreturn", "\r\n"]:
        with pytest.raises(UsageError, match="has a line break"):
            mapping.encode_headers("m", None, {"h": value})


# -- nats:// URLs ---------------------------------------------------------------------


def test_one_server_and_the_defaults() -> None:
    assert parse_nats_url("nats://127.0.0.1:4222") == NatsOptions(
        servers=("nats://127.0.0.1:4222",),
        namespace="arrival",
        replicas=None,
        monitor=(),
        fsync="verify",
    )


def test_several_servers_bare_hosts_and_tls() -> None:
    got = parse_nats_url("nats://h1:4222, h2:4223,tls://h3:4224,")
    assert got.servers == ("nats://h1:4222", "nats://h2:4223", "tls://h3:4224")
    assert parse_nats_url("h1:4222").servers == ("nats://h1:4222",)


def test_every_option() -> None:
    got = parse_nats_url(
        "nats://h1:4222,h2:4222?namespace=App7&replicas=3"
        "&monitor=http://h1:8222,%20http://h2:8222&fsync=trust"
    )
    assert got == NatsOptions(
        servers=("nats://h1:4222", "nats://h2:4222"),
        namespace="App7",
        replicas=3,
        monitor=("http://h1:8222", "http://h2:8222"),
        fsync="trust",
    )
    for replicas in ("1", "3", "5"):
        assert parse_nats_url(f"nats://h:1?replicas={replicas}").replicas == int(replicas)
    assert parse_nats_url("nats://h:1?fsync=verify").fsync == "verify"
    assert parse_nats_url("nats://h:1?namespace=a&namespace=b").namespace == "b"  # the last


def test_unknown_options_and_bad_values_are_refused() -> None:
    for url, message in [
        ("nats://h:1?colour=blue", r"unknown option 'colour' .*known: namespace, replicas"),
        ("nats://h:1?namespace=my-app", r"namespace 'my-app': use 1-32 letters and digits"),
        ("nats://h:1?namespace=", r"namespace '': use 1-32"),
        ("nats://h:1?namespace=" + "a" * 33, "use 1-32 letters and digits"),
        ("nats://h:1?replicas=2", r"replicas='2': use 1, 3 or 5"),
        ("nats://h:1?replicas=three", r"replicas='three': use 1, 3 or 5"),
        ("nats://h:1?fsync=maybe", r"fsync='maybe': use 'verify' or 'trust'"),
        ("nats://", r"not a NATS server URL: 'nats://'; use nats://host:4222"),
        (" , ?namespace=a", r"no NATS server in ' , \?namespace=a'; use nats://host:4222"),
        ("nats://h1:1,http://h2:2", r"not a NATS server URL: 'http://h2:2'"),
        ("nats://:4222", r"not a NATS server URL: 'nats://:4222'"),
    ]:
        with pytest.raises(UsageError, match=message):
            parse_nats_url(url)


def test_a_port_that_is_not_a_number_is_refused() -> None:
    with pytest.raises(UsageError, match="notaport"):
        parse_nats_url("nats://127.0.0.1:notaport")

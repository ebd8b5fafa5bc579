"""Unit tests of arrival.semantics.spec: defaults, the weakening check, ranges, diff, describe."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import pytest

from arrival.errors import GuaranteeMismatch, InvalidQueueSpec, QueueSpecConflict
from arrival.model import (
    DEFAULT_ACK_TIMEOUT_S,
    DEFAULT_CAPACITY,
    DEFAULT_MAX_DELIVERIES,
    DEFAULT_MAX_MESSAGE_BYTES,
    Backoff,
    DropPolicy,
    Guarantee,
    QueueSpec,
)
from arrival.semantics.spec import (
    UNSET,
    check_compatible,
    dead_letter_spec,
    decode_spec,
    describe,
    encode_spec,
    resolve_spec,
    validate_queue_name,
)

DURABLE = ["at-least-once", "exactly-once"]


def refused(name: str, guarantee: str, **options: Any) -> InvalidQueueSpec:
    with pytest.raises(InvalidQueueSpec) as info:
        resolve_spec(name, guarantee, **options)
    assert info.value.queue == name
    assert f"queue {name!r}" in str(info.value)
    return info.value


# -- defaults -----------------------------------------------------------------------------


@pytest.mark.parametrize("guarantee", DURABLE)
def test_durable_defaults(guarantee: str) -> None:
    spec = resolve_spec("orders", guarantee)
    assert spec == QueueSpec(
        name="orders",
        guarantee=Guarantee(guarantee),
        ack_timeout=DEFAULT_ACK_TIMEOUT_S,
        max_deliveries=DEFAULT_MAX_DELIVERIES,
        dead_letter="orders.dlq",
        backoff=Backoff(),
        retention=0.0,
        capacity=None,
        drop=DropPolicy.OLDEST,
        conflate=False,
        max_message_bytes=DEFAULT_MAX_MESSAGE_BYTES,
        dedup=guarantee == "exactly-once",
    )


def test_at_most_once_defaults() -> None:
    spec = resolve_spec("metrics", "at-most-once")
    assert spec.guarantee is Guarantee.AT_MOST_ONCE
    assert spec.capacity == DEFAULT_CAPACITY == 100_000
    assert spec.max_deliveries is None
    assert spec.dead_letter is None
    assert spec.drop is DropPolicy.OLDEST
    assert spec.conflate is False


def test_unset_options_get_the_defaults() -> None:
    spec = resolve_spec(
        "orders", "at-least-once", ack_timeout=UNSET, max_deliveries=UNSET, dead_letter=UNSET
    )
    assert spec == resolve_spec("orders", "at-least-once")


def test_guarantee_may_be_given_as_the_enum() -> None:
    assert resolve_spec("q", Guarantee.EXACTLY_ONCE) == resolve_spec("q", "exactly-once")


def test_dead_letter_default_follows_the_queue_name() -> None:
    assert resolve_spec("billing:eu-1", "exactly-once").dead_letter == "billing:eu-1.dlq"


def test_durable_options_are_kept() -> None:
    backoff = Backoff(initial_s=0.5, multiplier=3.0, max_s=60.0, jitter=0.1)
    spec = resolve_spec(
        "orders",
        "at-least-once",
        ack_timeout=5.0,
        max_deliveries=2,
        dead_letter="orders-failed",
        backoff=backoff,
        retention=3600.0,
        max_message_bytes=4096,
    )
    assert (spec.ack_timeout, spec.max_deliveries, spec.dead_letter) == (5.0, 2, "orders-failed")
    assert (spec.backoff, spec.retention, spec.max_message_bytes) == (backoff, 3600.0, 4096)


def test_at_most_once_options_are_kept() -> None:
    spec = resolve_spec("prices", "at-most-once", capacity=5, drop="newest", conflate=True)
    assert spec.capacity == 5
    assert spec.drop is DropPolicy.NEWEST
    assert spec.conflate is True


# -- the weakening check ------------------------------------------------------------------


@pytest.mark.parametrize("guarantee", DURABLE)
@pytest.mark.parametrize(
    ("option", "value"),
    [("capacity", 1000), ("drop", "oldest"), ("drop", DropPolicy.NEWEST), ("conflate", True)],
)
def test_overflow_options_refused_on_durable_queues(
    guarantee: str, option: str, value: object
) -> None:
    err = refused("orders", guarantee, **{option: value})
    assert option in err.problem
    assert guarantee in err.problem
    assert "at-most-once" in err.problem  # says what to use instead


@pytest.mark.parametrize("guarantee", DURABLE)
def test_non_weakening_overflow_values_are_accepted_on_durable_queues(guarantee: str) -> None:
    spec = resolve_spec("orders", guarantee, capacity=None, conflate=False)
    assert spec.capacity is None
    assert spec.conflate is False


def test_every_weakening_option_is_named() -> None:
    err = refused("orders", "at-least-once", capacity=10, conflate=True)
    assert "capacity" in err.problem
    assert "conflate" in err.problem


@pytest.mark.parametrize(
    ("option", "value"),
    [
        ("max_deliveries", 5),
        ("max_deliveries", None),
        ("ack_timeout", 10.0),
        ("dead_letter", "m.dlq"),
        ("backoff", Backoff()),
        ("retention", 60.0),
    ],
)
def test_redelivery_options_refused_on_at_most_once(option: str, value: object) -> None:
    err = refused("metrics", "at-most-once", **{option: value})
    assert option in err.problem
    assert "at-most-once" in err.problem
    assert "at-least-once" in err.problem  # says what to use instead


@pytest.mark.parametrize("guarantee", DURABLE)
def test_no_dead_letter_with_default_budget_is_refused(guarantee: str) -> None:
    err = refused("orders", guarantee, dead_letter=None)
    assert "dead_letter=None" in err.problem
    assert f"max_deliveries={DEFAULT_MAX_DELIVERIES}" in err.problem
    assert "max_deliveries=None" in err.problem  # the way out


def test_no_dead_letter_with_finite_budget_is_refused() -> None:
    err = refused("orders", "at-least-once", dead_letter=None, max_deliveries=3)
    assert "max_deliveries=3" in err.problem


@pytest.mark.parametrize("guarantee", DURABLE)
def test_no_dead_letter_with_unlimited_budget_is_allowed(guarantee: str) -> None:
    spec = resolve_spec("orders", guarantee, dead_letter=None, max_deliveries=None)
    assert spec.dead_letter is None
    assert spec.max_deliveries is None


def test_unlimited_budget_keeps_the_default_dead_letter() -> None:
    spec = resolve_spec("orders", "at-least-once", max_deliveries=None)
    assert spec.max_deliveries is None
    assert spec.dead_letter == "orders.dlq"


def test_unknown_guarantee_lists_the_choices() -> None:
    err = refused("orders", "at-least-twice")
    assert "'at-least-twice'" in err.problem
    for choice in ("'at-most-once'", "'at-least-once'", "'exactly-once'"):
        assert choice in err.problem


def test_unknown_option_is_named() -> None:
    err = refused("orders", "at-least-once", ack_timeot=3.0)
    assert "ack_timeot" in err.problem


# -- range checks -------------------------------------------------------------------------


@pytest.mark.parametrize("value", [0.0, -1.0, 12 * 3600.0 + 1, math.nan, math.inf])
def test_ack_timeout_out_of_range(value: float) -> None:
    err = refused("orders", "at-least-once", ack_timeout=value)
    assert "ack_timeout" in err.problem
    assert "seconds" in err.problem


def test_ack_timeout_upper_bound_is_inclusive() -> None:
    assert resolve_spec("q", "at-least-once", ack_timeout=12 * 3600.0).ack_timeout == 43200.0


@pytest.mark.parametrize("value", [0, -1, 2.5, "3"])
def test_max_deliveries_out_of_range(value: object) -> None:
    err = refused("orders", "at-least-once", max_deliveries=value)
    assert "max_deliveries" in err.problem


def test_max_deliveries_one_is_allowed() -> None:
    assert resolve_spec("q", "at-least-once", max_deliveries=1).max_deliveries == 1


@pytest.mark.parametrize(
    "backoff",
    [
        Backoff(initial_s=-1.0),
        Backoff(multiplier=0.5),
        Backoff(initial_s=10.0, max_s=5.0),
        Backoff(jitter=1.5),
        Backoff(jitter=-0.1),
    ],
)
def test_bad_backoff(backoff: Backoff) -> None:
    err = refused("orders", "at-least-once", backoff=backoff)
    assert "backoff" in err.problem
    assert repr(backoff) in err.problem  # shows what it got


def test_backoff_edge_values_are_allowed() -> None:
    b = Backoff(initial_s=0.0, multiplier=1.0, max_s=0.0, jitter=1.0)
    assert resolve_spec("q", "at-least-once", backoff=b).backoff == b


def test_backoff_must_be_a_backoff() -> None:
    err = refused("orders", "at-least-once", backoff={"initial_s": 1.0})
    assert "arrival.Backoff" in err.problem


@pytest.mark.parametrize(
    "options",
    [
        {"backoff": Backoff(initial_s=math.nan)},
        {"backoff": Backoff(multiplier=math.nan)},
        {"backoff": Backoff(max_s=math.nan)},
        {"backoff": Backoff(max_s=math.inf)},
        {"retention": math.nan},
        {"retention": math.inf},
    ],
    ids=["initial_s-nan", "multiplier-nan", "max_s-nan", "max_s-inf", "retention-nan", "inf"],
)
def test_non_finite_settings_are_refused(options: dict[str, Any]) -> None:
    # NaN passes every `<` comparison: a NaN backoff would park a retry forever
    err = refused("orders", "at-least-once", **options)
    assert "finite" in err.problem


def test_retention_must_not_be_negative() -> None:
    err = refused("orders", "at-least-once", retention=-1.0)
    assert "retention" in err.problem


@pytest.mark.parametrize("value", [0, -5, 2.5])
def test_capacity_out_of_range(value: object) -> None:
    err = refused("metrics", "at-most-once", capacity=value)
    assert "capacity" in err.problem


def test_at_most_once_capacity_none_is_refused() -> None:
    # SPEC 1: an at-most-once queue is bounded
    err = refused("metrics", "at-most-once", capacity=None)
    assert "capacity" in err.problem
    assert "bounded" in err.problem


def test_bad_drop_policy() -> None:
    err = refused("metrics", "at-most-once", drop="middle")
    assert "'oldest' or 'newest'" in err.problem
    assert "'middle'" in err.problem


@pytest.mark.parametrize("value", [0, -1, (64 << 20) + 1, 1.5])
def test_max_message_bytes_out_of_range(value: object) -> None:
    err = refused("orders", "at-least-once", max_message_bytes=value)
    assert "max_message_bytes" in err.problem


def test_max_message_bytes_limit_is_inclusive() -> None:
    spec = resolve_spec("metrics", "at-most-once", max_message_bytes=64 << 20)
    assert spec.max_message_bytes == 64 << 20


@pytest.mark.parametrize(
    "name",
    ["", ".hidden", "-x", "a b", "a/b", "x" * 201, "caf\u00e9", "tab\there"],
)
def test_bad_queue_names(name: str) -> None:
    err = refused(name, "at-least-once")
    assert "1-200 characters" in err.problem


@pytest.mark.parametrize("name", ["a", "A9", "orders.v2", "eu:billing_1-x", "x" * 200])
def test_good_queue_names(name: str) -> None:
    assert validate_queue_name(name) == name


def test_non_string_queue_name() -> None:
    with pytest.raises(InvalidQueueSpec):
        validate_queue_name(42)


@pytest.mark.parametrize("name", ["orders\n", "\norders", "orders\r\n", "a\nb"])
def test_queue_name_with_a_newline_is_refused(name: str) -> None:
    with pytest.raises(InvalidQueueSpec):
        validate_queue_name(name)


def test_bad_dead_letter_name() -> None:
    with pytest.raises(InvalidQueueSpec) as info:
        resolve_spec("orders", "at-least-once", dead_letter="no spaces")
    assert "'no spaces'" in str(info.value)
    assert "1-200 characters" in info.value.problem


def test_queue_cannot_be_its_own_dead_letter_queue() -> None:
    err = refused("orders", "at-least-once", dead_letter="orders")
    assert "own dead-letter queue" in err.problem


# -- dead_letter_spec ---------------------------------------------------------------------


def test_dead_letter_spec_is_as_durable_and_never_dead_letters() -> None:
    origin = resolve_spec("orders", "exactly-once", ack_timeout=7.0, max_deliveries=3)
    dlq = dead_letter_spec(origin)
    assert dlq.name == "orders.dlq"
    assert dlq.guarantee is Guarantee.EXACTLY_ONCE
    assert dlq.ack_timeout == 7.0
    assert dlq.max_deliveries is None
    assert dlq.dead_letter is None
    assert dlq.max_message_bytes > origin.max_message_bytes


def test_dead_letter_spec_without_dead_letter_queue() -> None:
    origin = resolve_spec("orders", "at-least-once", dead_letter=None, max_deliveries=None)
    with pytest.raises(ValueError, match="no dead-letter queue"):
        dead_letter_spec(origin)


# -- check_compatible ---------------------------------------------------------------------


def test_identical_specs_are_compatible() -> None:
    a = resolve_spec("orders", "at-least-once", max_deliveries=4)
    b = resolve_spec("orders", "at-least-once", max_deliveries=4)
    check_compatible(a, b)  # must not raise; equality is what it checks
    assert a == b


def test_conflict_names_every_differing_field() -> None:
    stored = resolve_spec("orders", "at-least-once")
    declared = resolve_spec("orders", "at-least-once", ack_timeout=5.0, max_deliveries=2)
    with pytest.raises(QueueSpecConflict) as info:
        check_compatible(stored, declared)
    err = info.value
    assert not isinstance(err, GuaranteeMismatch)
    assert err.queue == "orders"
    assert err.differences == {
        "ack_timeout": (30.0, 5.0),
        "max_deliveries": (10, 2),
    }
    assert "ack_timeout: stored 30.0, declared 5.0" in str(err)
    assert "max_deliveries: stored 10, declared 2" in str(err)


def test_conflict_on_nested_backoff() -> None:
    stored = resolve_spec("orders", "at-least-once")
    declared = resolve_spec("orders", "at-least-once", backoff=Backoff(max_s=10.0))
    with pytest.raises(QueueSpecConflict) as info:
        check_compatible(stored, declared)
    assert set(info.value.differences) == {"backoff"}


def test_guarantee_mismatch_is_a_conflict_naming_the_guarantee() -> None:
    stored = resolve_spec("orders", "at-least-once")
    declared = resolve_spec("orders", "exactly-once")
    with pytest.raises(GuaranteeMismatch) as info:
        check_compatible(stored, declared)
    err = info.value
    assert isinstance(err, QueueSpecConflict)
    assert err.differences == {
        "guarantee": (Guarantee.AT_LEAST_ONCE, Guarantee.EXACTLY_ONCE),
        "dedup": (False, True),
    }
    assert "guarantee" in str(err)


def test_guarantee_mismatch_lists_the_other_differences_too() -> None:
    stored = resolve_spec("orders", "at-least-once")
    declared = resolve_spec("orders", "at-most-once", capacity=50)
    with pytest.raises(GuaranteeMismatch) as info:
        check_compatible(stored, declared)
    assert {"guarantee", "capacity", "max_deliveries", "dead_letter"} <= set(info.value.differences)


# -- encode/decode ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "spec",
    [
        resolve_spec("orders", "at-least-once"),
        resolve_spec(
            "pay",
            "exactly-once",
            ack_timeout=2.5,
            max_deliveries=None,
            dead_letter=None,
            backoff=Backoff(0.1, 1.5, 9.0, 0.25),
            retention=60.0,
            max_message_bytes=2048,
        ),
        resolve_spec("prices", "at-most-once", capacity=7, drop="newest", conflate=True),
    ],
    ids=["at-least-once", "exactly-once", "at-most-once"],
)
def test_encode_decode_round_trip(spec: QueueSpec) -> None:
    data = encode_spec(spec)
    assert isinstance(data, bytes)
    back = decode_spec(data)
    assert back == spec
    assert type(back.guarantee) is Guarantee
    assert type(back.drop) is DropPolicy
    assert type(back.backoff) is Backoff
    check_compatible(spec, back)


def test_decoded_spec_is_compatible_with_a_redeclaration() -> None:
    spec = resolve_spec("orders", "at-least-once", ack_timeout=3)  # an int timeout
    back = decode_spec(encode_spec(spec))
    check_compatible(back, resolve_spec("orders", "at-least-once", ack_timeout=3.0))
    assert back.ack_timeout == 3.0


@pytest.mark.parametrize(
    ("guarantee", "options"),
    [
        ("at-least-once", {"max_deliveries": True}),
        ("at-least-once", {"ack_timeout": True}),
        ("at-least-once", {"max_message_bytes": True}),
        ("at-least-once", {"backoff": Backoff(jitter=True)}),
        ("at-most-once", {"capacity": True}),
        ("at-most-once", {"conflate": 1}),
        ("at-most-once", {"conflate": "yes"}),
    ],
    ids=str,
)
def test_every_accepted_spec_survives_encode_decode(
    guarantee: str, options: dict[str, Any]
) -> None:
    # a spec that resolves is persisted with the queue; if it cannot be decoded, the
    # broker cannot reopen its data directory (msgspec.ValidationError from connect())
    try:
        spec = resolve_spec("q", guarantee, **options)
    except InvalidQueueSpec:
        return  # refusing the value is a fine answer
    assert decode_spec(encode_spec(spec)) == spec


@pytest.mark.parametrize("value", ["30", None, [1]])
def test_non_number_ack_timeout_is_refused_with_invalid_queue_spec(value: object) -> None:
    err = refused("orders", "at-least-once", ack_timeout=value)
    assert "ack_timeout" in err.problem


# -- describe -----------------------------------------------------------------------------


def test_describe_at_least_once() -> None:
    spec = resolve_spec("orders", "at-least-once", ack_timeout=12.0, max_deliveries=4)
    d = describe(spec, {"fsync": "always"})
    text = str(d)
    assert d.name == "orders"
    assert d.guarantee is Guarantee.AT_LEAST_ONCE
    assert d.spec == spec
    assert "more than once" in d.promise
    assert "fsync" in text
    assert "lease of 12 s" in text
    assert "'orders.dlq'" in text
    assert "after 4 failed attempts" in text
    assert "per-key order" in text
    assert "do not spend the delivery budget" in text
    assert d.limits["max_deliveries"] == "4"
    assert d.limits["ack_timeout"] == "12 s"
    assert d.limits["fsync"] == "always"  # the backend's facts are kept
    assert d.limits["max_message_bytes"] == str(DEFAULT_MAX_MESSAGE_BYTES)
    assert "capacity" not in d.limits


def test_describe_unlimited_retries() -> None:
    spec = resolve_spec("orders", "at-least-once", max_deliveries=None)
    d = describe(spec, {})
    assert any("retried without limit" in m and "'orders.dlq'" in m for m in d.mechanism)
    assert d.limits["max_deliveries"] == "unlimited"


def test_describe_backoff_policy() -> None:
    spec = resolve_spec("orders", "at-least-once", backoff=Backoff(0.5, 3.0, 60.0, 0.25))
    text = str(describe(spec, {}))
    assert "0.5 s" in text
    assert "x3" in text
    assert "60 s" in text
    assert "25%" in text


def test_describe_exactly_once_mentions_transactions() -> None:
    d = describe(resolve_spec("pay", "exactly-once"), {})
    assert "in a transaction or recorded through the inbox" in d.promise
    assert any("fences the previous holder" in m for m in d.mechanism)
    assert any("'pay.dlq'" in m for m in d.mechanism)


def test_describe_at_most_once() -> None:
    spec = resolve_spec("metrics", "at-most-once", capacity=500, drop="newest")
    d = describe(spec, {})
    text = str(d)
    assert "at most once" in d.promise
    assert "never duplicated" in d.promise
    assert "never waits for fsync" in text
    assert "bounded at 500 messages" in text
    assert "dropping the newest" in text
    assert "conflated" not in text
    assert d.limits["capacity"] == "500"
    assert d.limits["drop"] == "newest"
    assert "ack_timeout" not in d.limits
    assert "lease" not in text


def test_describe_at_most_once_conflation() -> None:
    spec = resolve_spec("prices", "at-most-once", conflate=True)
    d = describe(spec, {})
    assert any("conflated by key" in m for m in d.mechanism)
    assert "bounded at 100000 messages" in str(d)


def test_describe_does_not_mutate_facts() -> None:
    facts = {"backend": "memory"}
    describe(resolve_spec("q", "at-least-once"), facts)
    assert facts == {"backend": "memory"}


def test_spec_is_frozen() -> None:
    spec = resolve_spec("q", "at-least-once")
    with pytest.raises(dataclasses.FrozenInstanceError):
        spec.ack_timeout = 1.0  # type: ignore[misc]


def test_exactly_once_refuses_dedup_off() -> None:
    problem = refused("pay", "exactly-once", dedup=False).problem
    assert "dedup=False" in problem
    assert "at-least-once" in problem


def test_dedup_is_opt_in_on_at_least_once() -> None:
    assert not resolve_spec("q", "at-least-once").dedup
    assert resolve_spec("q", "at-least-once", dedup=True).dedup


@pytest.mark.parametrize("option", [{"dedup": True}, {"dedup_window": 60.0}])
def test_at_most_once_refuses_dedup_options(option: dict[str, Any]) -> None:
    refused("q", "at-most-once", **option)


@pytest.mark.parametrize("window", [0, -1.0, float("nan"), "7d", True])
def test_dedup_window_must_be_positive_seconds(window: object) -> None:
    assert "dedup_window" in refused("q", "at-least-once", dedup=True, dedup_window=window).problem


@pytest.mark.parametrize("value", [1, "yes", None])
def test_dedup_must_be_a_bool(value: object) -> None:
    assert "dedup" in refused("q", "at-least-once", dedup=value).problem

"""E-mail notifications: at-least-once, retries, a circuit breaker and a dead-letter queue.

Run it: ``python examples/notifications.py`` (on ``memory:``; about two seconds).
As a worker: ``arrival worker examples.notifications:app --url ./data`` from the
repository's root (the SMTP stand-in is then healthy and prints what it sends).

Why at-least-once: a lost password-reset e-mail locks a user out; one sent twice is a
nuisance. So the queue keeps every e-mail until the handler acks it, and the handler is
written to be retried.

What happens:
1. Eight e-mails are queued. The SMTP server (a stand-in) is down for its first three
   calls: after three consecutive failures the handler's circuit breaker opens, so it
   stops taking e-mails instead of burning their attempts. After ``recovery_timeout`` one
   trial e-mail goes through, the breaker closes, and the failed e-mails are retried.
2. Two e-mails fail for good. The relay refuses one domain (a permanent 5xx error: the
   retry policy dead-letters it at once) and one mailbox stays full (a temporary 4xx
   error that lasts: retried with backoff until its 3 attempts are spent). Both land in
   ``emails.dlq`` with their provenance: origin queue and group, attempts, last error.
3. The SMTP is fixed. The dead letters are replayed (a dry run first), back to the group
   that failed them, and delivered.
"""

from __future__ import annotations

import contextlib
import logging
import sys
import threading
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import msgspec

import arrival

# The queue's contract, used both to declare it here and by the handler (a worker declares
# the queue at start; declaring it again with the same settings is a no-op).
EMAILS: dict[str, Any] = {"guarantee": "at-least-once", "ack_timeout": 30.0, "max_deliveries": 10}

# A short recovery time keeps the example quick; in production, tens of seconds.
BREAKER = arrival.CircuitBreaker(failure_threshold=3, recovery_timeout=0.2)


class Email(msgspec.Struct, frozen=True):
    to: str
    subject: str


class SmtpUnavailable(Exception):
    """A temporary SMTP error (4xx): trying again later may work."""


class SmtpRejected(Exception):
    """A permanent SMTP error (5xx): the same e-mail will be refused again."""


# Temporary errors are retried with backoff, 3 attempts in all; a permanent one goes to the
# dead-letter queue at once (retrying it would only delay the alert).
RETRY = arrival.RetryPolicy(
    max_attempts=3,
    backoff=arrival.Backoff(initial_s=0.05, multiplier=2.0, max_s=0.2, jitter=0.5),
    dead_letter_on=(SmtpRejected,),
)


@dataclass
class FakeSmtp:
    """An SMTP server stand-in: down for its first ``down_for_calls`` calls, refusing the
    domains in ``refused_domains`` (5xx) and the full mailboxes (4xx). Thread-safe."""

    down_for_calls: int = 0
    refused_domains: set[str] = field(default_factory=set)
    full_mailboxes: set[str] = field(default_factory=set)
    verbose: bool = False
    calls: int = 0
    sent: list[str] = field(default_factory=list)  # message ids, in the order sent
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def send(self, message_id: str, email: Email) -> None:
        with self._lock:
            self.calls += 1
            if self.calls <= self.down_for_calls:
                raise SmtpUnavailable("421 service not available")
            domain = email.to.rpartition("@")[2]
            if domain in self.refused_domains:
                raise SmtpRejected(f"550 relaying denied for {domain}")
            if email.to in self.full_mailboxes:
                raise SmtpUnavailable(f"452 mailbox {email.to} is full")
            self.sent.append(message_id)
        if self.verbose:
            print(f"sent {message_id} to {email.to}: {email.subject}", flush=True)

    def fix(self) -> None:
        """The operator fixes the relay and the mailbox."""
        with self._lock:
            self.refused_domains.clear()
            self.full_mailboxes.clear()


def make_app(broker: str | arrival.Broker, smtp: FakeSmtp) -> arrival.App:
    """The mailer: one handler on ``emails``, with the retry policy and the breaker."""
    app = arrival.App(broker, name="mailer")

    @app.handler("emails", retry=RETRY, breaker=BREAKER, **EMAILS)
    def send_email(email: Email, ctx: arrival.Context) -> None:
        smtp.send(ctx.message.id, email)

    return app


# ``arrival worker examples.notifications:app --url ./data`` runs this one.
app = make_app("./data", FakeSmtp(verbose=True))


OUTBOX = [
    ("welcome-alice", Email("alice@example.com", "Welcome!")),
    ("welcome-bob", Email("bob@legacy.example", "Welcome!")),  # the relay refuses it
    ("reset-carol", Email("carol@example.com", "Reset your password")),  # mailbox full
    ("welcome-dave", Email("dave@example.com", "Welcome!")),
    ("reset-erin", Email("erin@example.com", "Reset your password")),
    ("receipt-alice", Email("alice@example.com", "Your receipt")),
    ("welcome-frank", Email("frank@example.com", "Welcome!")),
    ("digest-grace", Email("grace@example.com", "Your weekly digest")),
]


@dataclass(frozen=True)
class Outcome:
    """What happened, for tests and for the last line."""

    queued: int
    sent_first_run: list[str]
    dead_letters: list[arrival.DeadMessage]
    would_replay: list[str]
    replayed: list[str]
    sent: Counter[str]  # times each e-mail was sent, over the whole run
    dead_letters_left: int
    stats_first_run: arrival.HandlerStats
    stats: arrival.HandlerStats

    @property
    def ok(self) -> bool:
        return (
            set(self.sent) == {mid for mid, _ in OUTBOX}
            and self.dead_letters_left == 0
            and self.stats.breaker_opened >= 1
        )


@contextlib.contextmanager
def quiet_runtime_logs() -> Iterator[None]:
    """The runtime logs each failure with its traceback (what a worker's log needs); this
    example prints its own account instead."""
    logger = logging.getLogger("arrival")
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        logger.setLevel(level)


def main(url: str = "memory:") -> Outcome:
    broker = arrival.connect(url)
    try:
        with quiet_runtime_logs():
            return _run(broker)
    finally:
        broker.close()


def _run(broker: arrival.Broker) -> Outcome:
    broker.create_queue("emails", **EMAILS)
    smtp = FakeSmtp(
        down_for_calls=3, refused_domains={"legacy.example"}, full_mailboxes={"carol@example.com"}
    )
    mailer = make_app(broker, smtp)
    producer = broker.producer()
    for mid, email in OUTBOX:
        # JSON: what a handler decodes when a message names no content-type
        producer.send("emails", msgspec.json.encode(email), id=mid)
    print(f"queued {len(OUTBOX)} e-mails; the SMTP server is down for its first 3 calls")

    [first] = mailer.run(until_idle=0.5)
    sent_first = list(smtp.sent)
    print(
        f"worker ran: {first.handled} sent, {first.failed} failures, {first.retried} retried, "
        f"{first.dead_lettered} dead-lettered; the breaker opened {first.breaker_opened} "
        f"time(s): while open, the worker took no e-mails"
    )
    dlq = broker.dead_letters("emails")
    letters = dlq.list()
    print(f"dead letters in emails.dlq: {len(letters)}")
    for d in letters:
        print(
            f"  {d.id}: from {d.origin_queue}/{d.origin_group} after {d.attempts} attempt(s); "
            f"last error: {d.last_error}"
        )

    smtp.fix()
    print("the operator fixes the relay and empties the full mailbox")
    would = [d.id or "" for d in dlq.replay(dry_run=True)]
    print(f"dry run: would replay {would}")
    replayed = [d.id or "" for d in dlq.replay()]
    print(f"replayed {replayed}")
    [stats] = mailer.run(until_idle=0.5)
    left = len(dlq.list())

    sent = Counter(smtp.sent)
    print(f"sent in all: {len(sent)} distinct e-mails of {len(OUTBOX)}; dead letters left: {left}")
    once = all(n == 1 for n in sent.values())
    print(
        "every e-mail sent exactly once this time"
        if once
        else "some e-mails were sent more than once (at-least-once allows it)"
    )
    return Outcome(
        queued=len(OUTBOX),
        sent_first_run=sent_first,
        dead_letters=letters,
        would_replay=would,
        replayed=replayed,
        sent=sent,
        dead_letters_left=left,
        stats_first_run=first,
        stats=stats,
    )


if __name__ == "__main__":
    sys.exit(0 if main().ok else 1)

"""Coverage-guided fuzzing of arrival.protocol.Connection with atheris (libFuzzer).

Run by hand (atheris is not a project dependency: ``.venv/bin/pip install atheris``)::

    .venv/bin/python tests/protocol/fuzz_atheris.py -runs=200000        # N iterations
    .venv/bin/python tests/protocol/fuzz_atheris.py -max_total_time=60  # or N seconds
    .venv/bin/python tests/protocol/fuzz_atheris.py CORPUS_DIR ...      # your own corpus

Any libFuzzer flag works. Without a corpus directory a seed corpus of valid traffic is
written to a temporary directory. A crash (any exception other than the protocol's own
error, or a broken model invariant) is saved as ``crash-<sha1>`` in the current directory;
replay it with ``fuzz_atheris.py crash-<sha1>``.

The checks are those of ``test_fuzz.py`` (its ``run_server``/``run_client`` drivers and
models). Exceptions in ``test_fuzz.KNOWN_BUGS`` are tolerated unless
``ARRIVAL_FUZZ_STRICT=1``. One of them, RecursionError from deep MessagePack nesting,
needs inputs of about 1,000 bytes: ``-max_len=512`` stays clear of it.

Input layout: byte 0 picks the target (0 a fresh server, 1 a server after the preface,
2 a server after the preface and a Hello, 3 a client after its handshake); byte 1 holds
flags (bit 0 EOF at the end, bit 1 the server refuses the Hello, bits 2-3 extra requests
per chunk for the client); byte 2 is the client's requests in flight (mod 13); bytes 3-6
are cut points; the rest is the traffic.
"""

from __future__ import annotations

import importlib
import os
import sys
import tempfile
from pathlib import Path

import atheris

sys.path.insert(0, str(Path(__file__).resolve().parent))

with atheris.instrument_imports(include=["arrival.protocol"]):
    import arrival.protocol.connection
    import arrival.protocol.events  # noqa: F401

drivers = importlib.import_module("test_fuzz")  # after the instrumented imports
Error, Goodbye, Hello = drivers.Error, drivers.Goodbye, drivers.Hello
Push, Reply, Request = drivers.Push, drivers.Reply, drivers.Request

TOLERATE = os.environ.get("ARRIVAL_FUZZ_STRICT") != "1"
_HEADER = 7


def one_input(data: bytes) -> None:
    if len(data) < _HEADER:
        return
    target, flags, requests = data[0] % 4, data[1], data[2] % 13
    body = data[_HEADER:]
    eof, refuse = bool(flags & 1), bool(flags & 2)
    if target == 1:
        body = drivers.GREETING + body
    elif target == 2:
        body = drivers.GREETING + drivers.frame(Hello(client="atheris")) + body
    cuts = [b * (len(body) // 255 + 1) for b in data[3:_HEADER]]
    chunks = drivers.split(body, cuts)
    if target == 3:
        more = [(flags >> 2) & 3] * len(chunks)
        drivers.run_client(chunks, requests=requests, eof=eof, more=more, tolerate=TOLERATE)
    else:
        drivers.run_server(chunks, eof=eof, refuse=refuse, tolerate=TOLERATE)


def seeds() -> dict[str, bytes]:
    """Valid traffic for each target, so the fuzzer starts past the preface."""
    f = drivers.frame
    to_server = b"".join(
        f(e) for e in (Request(id=1, op="send", args={"b": [b"x"]}), Request(id=2, op="a"))
    )
    to_client = b"".join(
        f(e)
        for e in (
            Push(stream=1, data=[b"m"]),
            Reply(id=2, result={"o": 1}),
            Error(id=1, kind="K", message="m"),
            Goodbye(reason="r"),
        )
    )
    return {
        "raw-server": bytes([0, 1, 0, 0, 0, 0, 0]) + drivers.GREETING + f(Hello(client="c")),
        "after-preface": bytes([1, 0, 0, 3, 9, 0, 0]) + f(Hello(client="c")) + to_server,
        "after-hello": bytes([2, 1, 0, 0, 0, 0, 0]) + to_server + f(Goodbye()),
        "client": bytes([3, 4, 2, 5, 0, 0, 0]) + to_client,
    }


def main() -> None:
    args = list(sys.argv)
    if not any(not a.startswith("-") for a in args[1:]):
        corpus = tempfile.mkdtemp(prefix="arrival-protocol-corpus-")
        for name, seed in seeds().items():
            Path(corpus, name).write_bytes(seed)
        args.append(corpus)
    atheris.Setup(args, one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()

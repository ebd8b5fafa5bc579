"""The import rules of STYLE.md, enforced: layers stay apart, so each can be replaced."""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parent.parent / "src" / "arrival"


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), str(path))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return {n for n in names if n == "arrival" or n.startswith("arrival.")}


def _package_imports(package: str) -> dict[str, set[str]]:
    return {str(p.relative_to(SRC)): _imports(p) for p in (SRC / package).rglob("*.py")}


def test_semantics_is_pure() -> None:
    # arrival._canary: the test-only broken modes (a leaf module, from the environment)
    allowed = ("arrival.semantics", "arrival.model", "arrival.errors", "arrival._canary")
    for path, mods in _package_imports("semantics").items():
        bad = {m for m in mods if not m.startswith(allowed)}
        assert not bad, f"{path} imports {bad}: semantics may use only model and errors"


def test_storage_knows_no_semantics() -> None:
    allowed = ("arrival.storage", "arrival.errors", "arrival._canary")
    for path, mods in _package_imports("storage").items():
        bad = {m for m in mods if not m.startswith(allowed)}
        assert not bad, f"{path} imports {bad}: storage takes bytes and records only"


def test_only_the_engine_joins_semantics_and_storage() -> None:
    for p in SRC.rglob("*.py"):
        rel = str(p.relative_to(SRC))
        if rel.startswith(("semantics/", "storage/", "testing/")) or rel in (
            "engine.py",
            "_common.py",
        ):
            continue
        mods = _imports(p)
        both = any(m.startswith("arrival.semantics.delivery") for m in mods) and any(
            m.startswith("arrival.storage") for m in mods
        )
        assert not both, f"{rel} joins semantics and storage; only engine.py may"


def test_cli_uses_only_the_public_api() -> None:
    allowed = ("arrival", "arrival.errors", "arrival.cli", "arrival.server", "arrival.app.worker")
    for path, mods in _package_imports("cli").items():
        bad = {
            m
            for m in mods
            if m not in allowed and not m.startswith(("arrival.cli", "arrival.verify"))
        }
        assert not bad, f"cli/{path} imports {bad}: the CLI is a shell over the public API"


def test_nothing_in_src_imports_testing() -> None:
    for p in SRC.rglob("*.py"):
        rel = str(p.relative_to(SRC))
        if rel.startswith("testing/"):
            continue
        assert not any(m.startswith("arrival.testing") for m in _imports(p)), rel


def test_the_rules_can_fail(tmp_path: Path) -> None:
    bad = tmp_path / "bad.py"
    bad.write_text("from arrival.storage.sqlite import SqliteStorage\nimport arrival.engine\n")
    assert _imports(bad) == {"arrival.storage.sqlite", "arrival.engine"}


_FORBIDDEN_IN_PROTOCOL = ("socket", "asyncio", "time", "selectors", "ssl")


def _all_imports(source: str, package: str) -> set[str]:
    """Every module ``source`` imports, stdlib included; relative imports are resolved
    against ``package`` (``from .. import engine`` in arrival.protocol is arrival.engine)."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level == 0:
                names.add(node.module or "")
                continue
            parts = package.split(".")
            base = ".".join(parts[: len(parts) - node.level + 1])
            if node.module:
                names.add(f"{base}.{node.module}")
            else:
                names.update(f"{base}.{a.name}" for a in node.names)
    return names


def _protocol_violations(source: str) -> set[str]:
    bad = set()
    for mod in _all_imports(source, "arrival.protocol"):
        top = mod.split(".")[0]
        ours = (mod + ".").startswith("arrival.protocol.")
        if top in _FORBIDDEN_IN_PROTOCOL or (top == "arrival" and not ours):
            bad.add(mod)
    return bad


def test_protocol_is_sans_io_and_self_contained() -> None:
    files = sorted((SRC / "protocol").rglob("*.py"))
    assert len(files) >= 3  # __init__, connection, events
    for p in files:
        bad = _protocol_violations(p.read_text())
        assert not bad, (
            f"{p.relative_to(SRC)} imports {sorted(bad)}: the protocol is sans-IO (no "
            "sockets, event loop or clock) and imports nothing of arrival but arrival.protocol"
        )


def test_the_protocol_rule_can_fail() -> None:
    bad = (
        "import time\nimport asyncio.streams\nfrom socket import socket\nimport ssl, selectors\n"
        "from arrival.errors import UsageError\nfrom arrival import engine\n"
        "from arrival.protocol.events import Hello\nimport struct, enum\nimport arrival.protocol\n"
        "from . import events\nfrom .. import engine\nfrom ..semantics import dedup\n"
        "from .connection import Connection\n"
    )
    assert _protocol_violations(bad) == {
        "time",
        "asyncio.streams",
        "socket",
        "ssl",
        "selectors",
        "arrival.errors",
        "arrival",
        "arrival.engine",
        "arrival.semantics",
    }
    assert _protocol_violations("import timeit\nimport sslkeylog\nimport typing\n") == set()

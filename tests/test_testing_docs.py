"""docs/testing.md runs as written: its code blocks are this file's tests.

Each ```python block of the page starts with ``# NAME.py`` (or continues the file named
before it). A ``NAME.py`` that is not a test file becomes module ``NAME`` (the test blocks
import it as they would the file); the ``test_*.py`` blocks run in this module, so pytest
collects their fixtures and tests as its own. The code is compiled with the page as its
file name and at its line numbers: a failure points at the line of the page.
"""

from __future__ import annotations

import ast
import re
import sys
import types
from dataclasses import dataclass
from pathlib import Path

import pytest

DOC = Path(__file__).resolve().parent.parent / "docs" / "testing.md"
_FENCE = re.compile(r"^```(\w*)\s*$")
_LABEL = re.compile(r"^# (\w+)\.py\s*$")


@dataclass(frozen=True)
class Block:
    language: str
    line: int  # of the block's first line of code in the page, 1-based
    code: str


def code_blocks(markdown: str) -> list[Block]:
    """The fenced code blocks of ``markdown``, in order."""
    blocks: list[Block] = []
    opened: tuple[str, int] | None = None
    lines: list[str] = []
    for number, text in enumerate(markdown.splitlines(), start=1):
        fence = _FENCE.match(text)
        if opened is None:
            if fence:
                opened, lines = (fence.group(1), number + 1), []
        elif text.strip() == "```":
            blocks.append(Block(opened[0], opened[1], "\n".join(lines) + "\n"))
            opened = None
        else:
            lines.append(text)
    if opened is not None:
        raise ValueError(f"the code block opened at line {opened[1] - 1} is never closed")
    return blocks


def files(blocks: list[Block]) -> dict[str, str]:
    """The source of each file the python blocks make up, each block at its own lines
    (blank lines in between), so compiled code keeps the page's line numbers."""
    sources: dict[str, list[str]] = {}
    current: str | None = None
    for block in blocks:
        if block.language != "python":
            continue
        label = _LABEL.match(block.code.splitlines()[0])
        if label:
            current = label.group(1)
        elif current is None:
            raise ValueError(f"the python block at line {block.line} names no file (# NAME.py)")
        lines = sources.setdefault(current, [])
        lines.extend([""] * (block.line - 1 - len(lines)))
        lines.extend(block.code.splitlines())
    return {name: "\n".join(lines) + "\n" for name, lines in sources.items()}


BLOCKS = code_blocks(DOC.read_text(encoding="utf-8"))
FILES = files(BLOCKS)
for _name, _source in FILES.items():
    _code = compile(_source, str(DOC), "exec")
    if _name.startswith("test_"):
        exec(_code, globals())  # the page's fixtures and tests become this module's
    else:
        _module = types.ModuleType(_name)
        _module.__file__ = str(DOC)
        sys.modules[_name] = _module  # importable by the test blocks, as the file would be
        exec(_code, _module.__dict__)


def _tests_in(source: str) -> set[str]:
    tree = ast.parse(source)
    return {
        node.name
        for node in tree.body
        if isinstance(node, ast.FunctionDef) and node.name.startswith("test_")
    }


def test_the_page_has_code_under_test_and_tests() -> None:
    assert any(not name.startswith("test_") for name in FILES), "no module under test"
    tests = set().union(*(_tests_in(s) for n, s in FILES.items() if n.startswith("test_")))
    assert len(tests) >= 8
    for name in tests:  # every test the page defines is collected from this module
        fn = globals()[name]
        assert fn.__code__.co_filename == str(DOC)


def test_every_python_block_is_run() -> None:
    python = [b for b in BLOCKS if b.language == "python"]
    assert python, "the page has no python blocks"
    assert all(b.language in ("python", "bash", "text") for b in BLOCKS), [
        b.language for b in BLOCKS
    ]
    # every block's code is in the source that was compiled, at the page's line numbers
    for block in python:
        source = next(s for s in FILES.values() if block.code in _at_line(s, block.line))
        assert source


def _at_line(source: str, line: int) -> str:
    return "\n".join(source.splitlines()[line - 1 :]) + "\n"


def test_a_block_without_a_file_name_is_refused() -> None:
    with pytest.raises(ValueError, match="block at line 2 names no file"):
        files(code_blocks("```python\nx = 1\n```\n"))


def test_an_unclosed_block_is_refused() -> None:
    with pytest.raises(ValueError, match="opened at line 2 is never closed"):
        code_blocks("text\n```python\n# a.py\nx = 1\n")


def test_blocks_keep_their_line_numbers() -> None:
    page = "intro\n\n```python\n# a.py\nx = 1\n```\n\nmore\n\n```python\ny = x\n```\n"
    [source] = files(code_blocks(page)).values()
    lines = source.splitlines()
    assert (lines[3], lines[4], lines[10]) == ("# a.py", "x = 1", "y = x")

"""The code examples of README.md and docs/, found by their tag, never by the heading above them:
a fenced block right after a `<!-- example: NAME -->` line (the comment does not show on a rendered
page). The test that runs an example takes it with `example(NAME, CONSTANT=value, ...)`, which sets
the example's own constants (`NAME = ...` lines) to the test's data; tests/test_doc_examples.py
checks that every tagged example is taken by some test and every example a test takes is tagged."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TAGGED = re.compile(r"^<!-- example: ([a-z0-9-]+) -->\n```(\w+)\n(.*?)^```", re.S | re.M)


@dataclass(frozen=True)
class Example:
    name: str
    file: Path
    language: str
    code: str


def documents() -> list[Path]:
    return [REPO / "README.md", *sorted((REPO / "docs").rglob("*.md"))]


def tagged_examples() -> dict[str, Example]:
    """Every tagged example of README.md and docs/, by name (a name used twice is an error)."""
    found: dict[str, Example] = {}
    for path in documents():
        for name, language, code in TAGGED.findall(path.read_text()):
            assert name not in found, f"example {name!r} is tagged in {found[name].file} and {path}"
            found[name] = Example(name, path, language, code)
    return found


def example(name: str, **constants: str) -> str:
    """The code of the example tagged `name`, with each constant named (a `NAME = ...` line of its
    own, exactly once) set to the given Python expression."""
    code = tagged_examples()[name].code
    for constant, value in constants.items():
        code, count = re.subn(rf"^{constant} = .*$", lambda _: f"{constant} = {value}", code, flags=re.M)
        assert count == 1, f"example {name!r} sets {constant} {count} times, not once"
    return code

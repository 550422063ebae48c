"""README.md is the front page and docs/ holds the rest: every relative link between them points to a
file that exists and, for `file.md#anchor`, to a heading that file has (anchors as GitHub makes them)."""

from __future__ import annotations

import re
from pathlib import Path

from tests.doc_examples import REPO, documents

LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
FENCE = re.compile(r"^```.*?^```", re.DOTALL | re.MULTILINE)
INLINE_CODE = re.compile(r"`[^`\n]*`")


def _prose(path: Path) -> str:
    """The document without its code blocks and inline code, where brackets are code, not links."""
    return INLINE_CODE.sub("", FENCE.sub("", path.read_text()))


def _anchors(path: Path) -> set[str]:
    """The anchors GitHub gives the headings of a Markdown file: lower case, punctuation dropped,
    spaces as hyphens, a repeated one numbered -1, -2, ..."""
    anchors: set[str] = set()
    for heading in re.findall(r"^#{1,6} +(.+?) *#*$", FENCE.sub("", path.read_text()), flags=re.MULTILINE):
        slug = re.sub(r"[^\w\- ]", "", heading.lower()).replace(" ", "-")
        anchor, n = slug, 0
        while anchor in anchors:
            n += 1
            anchor = f"{slug}-{n}"
        anchors.add(anchor)
    return anchors


def broken_links(paths: list[Path]) -> list[str]:
    broken = []
    for path in paths:
        for target in LINK.findall(_prose(path)):
            if re.match(r"[a-z][a-z0-9+.-]*:", target):  # https:, mailto:: not this repository's
                continue
            file, _, anchor = target.partition("#")
            resolved = (path.parent / file).resolve() if file else path
            where = f"{path.relative_to(REPO)}: ({target})"
            if not resolved.exists():
                broken.append(f"{where} no such file")
            elif anchor and resolved.suffix == ".md" and anchor not in _anchors(resolved):
                broken.append(f"{where} {resolved.name} has no heading with that anchor")
    return broken


def test_every_relative_link_of_the_readme_and_docs_points_to_a_file_and_heading_that_exist():
    paths = documents()
    assert len(paths) > 2, "docs/ is missing"
    assert any(LINK.search(_prose(path)) for path in paths), "no links found: is the link pattern right?"
    assert broken_links(paths) == []


def test_the_anchors_are_github_s():
    assert {"the-cache-in-brief", "exit-codes", "quick-start"} <= _anchors(REPO / "README.md")
    assert "stage-two-at-a-language-models-vocabulary-section-11" in _anchors(REPO / "docs" / "benchmarks.md")
    assert "stage-two-with-torchrun-ddp" in _anchors(REPO / "docs" / "scale-out.md")


def test_the_readme_is_a_front_page_of_at_most_400_lines():
    lines = len((REPO / "README.md").read_text().splitlines())
    assert lines <= 400, f"README.md has {lines} lines: move guides and references to docs/"

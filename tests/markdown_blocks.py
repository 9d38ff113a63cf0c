"""The fenced code blocks of the project's Markdown files, with the marker that says how each is tested.

A block is tested by tests/unit/test_docs.py (shell commands) and tests/integration/test_readme.py
(Python) unless the line before its fence is a marker:

    <!-- not tested: why -->                  the block is not meant to run (a fragment, a setting)
    <!-- tested by tests/path/test_x.py -->   another test runs it (so it is not run twice)
"""

from __future__ import annotations

import re
import textwrap
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).parents[1]
# The documents whose blocks are tested: the README and the docs beside it (decision records keep
# their measurements as they were taken, so their blocks are not).
DOCUMENTS = (ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")))

_FENCE = re.compile(r"^(\s*)```(\w*)\s*$")
_MARKER = re.compile(r"^\s*<!--\s*(not tested|tested by)\s*:?\s*(.*?)\s*-->\s*$")


@dataclass(frozen=True, slots=True)
class Block:
    """One fenced block: where it is, its language, its code (dedented) and its marker, if any."""

    path: Path
    line: int  # of the opening fence, 1-based
    language: str
    code: str
    marker: str | None  # "not tested" or "tested by"
    marker_detail: str  # the reason, or the test that runs it

    @property
    def where(self) -> str:
        return f"{self.path.relative_to(ROOT)}:{self.line}"


def blocks(path: Path) -> list[Block]:
    """Every fenced block of ``path`` in order; an unclosed fence is an error."""
    found: list[Block] = []
    lines = path.read_text().splitlines()
    index = 0
    previous = ""  # the last non-blank line before the current one
    while index < len(lines):
        opening = _FENCE.match(lines[index])
        if not opening:
            if lines[index].strip():
                previous = lines[index]
            index += 1
            continue
        start = index
        index += 1
        while index < len(lines) and lines[index].strip() != "```":
            index += 1
        if index == len(lines):
            raise AssertionError(f"{path.relative_to(ROOT)}:{start + 1}: a code block is never closed")
        marker = _MARKER.match(previous)
        found.append(
            Block(
                path=path,
                line=start + 1,
                language=opening.group(2),
                code=textwrap.dedent("\n".join(lines[start + 1 : index])) + "\n",
                marker=marker.group(1) if marker else None,
                marker_detail=marker.group(2) if marker else "",
            )
        )
        previous = lines[index]
        index += 1
    return found


def headings(path: Path) -> list[str]:
    """The text of every heading of ``path`` (outside code blocks), in order."""
    found, fenced = [], False
    for line in path.read_text().splitlines():
        if _FENCE.match(line) or (fenced and line.strip() == "```"):
            fenced = not fenced
            continue
        if not fenced and (match := re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line)):
            found.append(match.group(1))
    return found


def anchor(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[`*]|\[([^\]]*)\]\([^)]*\)", r"\1", heading).strip().lower()
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")

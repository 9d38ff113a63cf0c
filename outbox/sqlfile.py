"""Load named SQL blocks from a .sql file shipped inside a package.

Queries live in .sql files, each block introduced by ``-- name: noun_verb``, so that all the SQL a
module runs can be read in one place (as Procrastinate's ``queries.sql``).
"""

from __future__ import annotations

import re
from importlib import resources

_NAME_LINE = re.compile(r"^--\s*name:\s*(\w+)\s*$", re.MULTILINE)


def load_queries(package: str, filename: str) -> dict[str, str]:
    """Return ``{name: sql}`` for every ``-- name:`` block of ``package/filename``."""
    text = resources.files(package).joinpath(filename).read_text(encoding="utf-8")
    parts = _NAME_LINE.split(text)
    queries: dict[str, str] = {}
    # parts = [preamble, name1, body1, name2, body2, ...]
    for name, body in zip(parts[1::2], parts[2::2], strict=True):
        if name in queries:
            raise ValueError(f"{package}/{filename}: query {name!r} is defined twice")
        queries[name] = body.strip().rstrip(";")
    return queries

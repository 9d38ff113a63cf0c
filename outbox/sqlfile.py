"""Load named SQL blocks from a .sql file shipped inside a package.

Queries live in .sql files, each block introduced by ``-- name: noun_verb``, so that all the SQL a
module runs can be read in one place (as Procrastinate's ``queries.sql``).
"""

from __future__ import annotations

import functools
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


_PSYCOPG_PARAM = re.compile(r"%\((\w+)\)s")
# SQLAlchemy's text() would read ":name::type" as a parameter named "nam" (it refuses a name
# followed by a colon, then backtracks): statements run through it write CAST(%(name)s AS type).
_PARAM_THEN_CAST = re.compile(r"%\(\w+\)s::")


@functools.cache
def sqlalchemy_text(query: str) -> str:
    """The statement with SQLAlchemy's ``:name`` parameters, for ``text()`` (any driver, asyncpg too)."""
    if _PARAM_THEN_CAST.search(query):
        raise ValueError(f"write CAST(%(name)s AS type), not %(name)s::type, in a statement run by SQLAlchemy: {query}")
    return _PSYCOPG_PARAM.sub(r":\1", query)


@functools.cache
def numbered(query: str) -> tuple[str, tuple[str, ...]]:
    """The statement with ``$1, $2, ...`` parameters (asyncpg's own), and the names they stand for, in order."""
    names: list[str] = []

    def number(match: re.Match[str]) -> str:
        if match[1] not in names:
            names.append(match[1])
        return f"${names.index(match[1]) + 1}"

    return _PSYCOPG_PARAM.sub(number, query), tuple(names)

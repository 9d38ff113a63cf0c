"""Load named SQL blocks from a .sql file shipped inside a package.

Queries live in .sql files, each block introduced by ``-- name: noun_verb``, so that all the SQL a
module runs can be read in one place (as Procrastinate's ``queries.sql``).

A rule that several statements share is written once, as a fragment, and spliced into each of them
when the file is loaded (the statement PostgreSQL plans is the one it would be if written out):

* ``-- fragment: name`` introduces a fragment, as ``-- name:`` does a query; a fragment is not a query
  (``load_queries`` does not return it). Its comment lines document it and are left out of the
  splice; its other lines are spliced as written, so a fragment that must be parenthesised where it
  is used writes its own parentheses.
* ``{{name}}`` in a query (or in another fragment) stands for the fragment of that name in the same
  file; ``{{other.sql:name}}`` for one in another file of the same package. An unknown name, or a
  fragment that includes itself, is an error at load time.
"""

from __future__ import annotations

import functools
import re
from importlib import resources

_BLOCK_LINE = re.compile(r"^--\s*(name|fragment):\s*(\w+)\s*$", re.MULTILINE)
_INCLUDE = re.compile(r"\{\{\s*(?:([\w.-]+\.sql)\s*:\s*)?(\w+)\s*\}\}")


def load_queries(package: str, filename: str) -> dict[str, str]:
    """Return ``{name: sql}`` for every ``-- name:`` block of ``package/filename``, fragments spliced in."""
    queries, _ = _blocks(package, filename)
    return {name: _splice(package, filename, body, ()) for name, body in queries.items()}


@functools.cache
def _blocks(package: str, filename: str) -> tuple[dict[str, str], dict[str, str]]:
    """The file's queries and fragments, as written (includes not spliced yet)."""
    text = resources.files(package).joinpath(filename).read_text(encoding="utf-8")
    parts = _BLOCK_LINE.split(text)
    queries: dict[str, str] = {}
    fragments: dict[str, str] = {}
    # parts = [preamble, kind1, name1, body1, kind2, name2, body2, ...]
    for kind, name, body in zip(parts[1::3], parts[2::3], parts[3::3], strict=True):
        if name in queries or name in fragments:
            raise ValueError(f"{package}/{filename}: {name!r} is defined twice")
        if kind == "name":
            queries[name] = body.strip().rstrip(";")
        else:
            lines = [line for line in body.strip().splitlines() if not line.lstrip().startswith("--")]
            fragments[name] = "\n".join(lines).strip()
    return queries, fragments


def _splice(package: str, filename: str, sql: str, within: tuple[tuple[str, str], ...]) -> str:
    def include(match: re.Match[str]) -> str:
        where = (match[1] or filename, match[2])
        if where in within:
            raise ValueError(f"{package}/{where[0]}: fragment {where[1]!r} includes itself")
        fragments = _blocks(package, where[0])[1]
        if where[1] not in fragments:
            raise ValueError(f"{package}/{filename}: no fragment {where[1]!r} in {where[0]}")
        return _splice(package, where[0], fragments[where[1]], (*within, where))

    return _INCLUDE.sub(include, sql)


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

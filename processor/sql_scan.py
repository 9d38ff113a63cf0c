"""Read SQL and PL/pgSQL text well enough to tell which tables' columns it writes.

Not a parser: a tokenizer that knows PostgreSQL's lexical rules (comments, nested block comments,
standard and escape strings, dollar quoting, quoted identifiers), and a scan of the token stream
for the three statements that can write a row's columns: ``UPDATE [ONLY] target SET ...``,
``INSERT INTO target ... ON CONFLICT ... DO UPDATE SET ...`` and ``MERGE INTO target ... UPDATE SET
...``. It reports, for each, the target's name and the columns its SET list assigns; the names of
functions the text calls; its string literals; and the texts it could run as dynamic SQL: a string
that begins a statement, joined by ``||`` with what follows it (an operand that is not a string
stands as a ``$0`` placeholder), so that ``'UPDATE ' || quote_ident(t) || ' SET status = ...'``
reads as ``UPDATE $0 SET status = ...``. A message that only mentions a statement (``RAISE ... 'to
update jobs set ...'``) does not begin one.
processor/schema_check.py decides from that whether a trigger writes job state.

Why not pglast (PostgreSQL's own parser, as a library): it parses with the grammar of the version it
bundles, so a function written for a newer server would make the scan fail, on the one check that
must never stop `migrate`; it has no wheels for every platform the embedded server runs on; and it
adds nothing for dynamic SQL, which is assembled from strings at run time anyway.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

_WORD = re.compile(r"[A-Za-z_\u0080-\uffff][A-Za-z0-9_$\u0080-\uffff]*")
_DOLLAR = re.compile(r"\$([A-Za-z_][A-Za-z0-9_]*)?\$")
_PARAM = re.compile(r"\$\d+|%[IsL]")


@dataclass(frozen=True)
class Token:
    kind: str  # word (lower-cased), ident (a quoted identifier, as written), string, param, punct, number
    text: str


def tokenize(text: str) -> list[Token]:
    tokens: list[Token] = []
    i, n = 0, len(text)
    while i < n:
        c = text[i]
        if c.isspace():
            i += 1
        elif text.startswith("--", i):
            end = text.find("\n", i)
            i = n if end < 0 else end + 1
        elif text.startswith("/*", i):
            depth, i = 1, i + 2
            while i < n and depth:
                if text.startswith("/*", i):
                    depth, i = depth + 1, i + 2
                elif text.startswith("*/", i):
                    depth, i = depth - 1, i + 2
                else:
                    i += 1
        elif c in "eE" and i + 1 < n and text[i + 1] == "'":  # E'...': backslash escapes
            value, i = _quoted(text, i + 1, backslashes=True)
            tokens.append(Token("string", value))
        elif c in "'\"":
            value, i = _quoted(text, i, backslashes=False)
            tokens.append(Token("string" if c == "'" else "ident", value))
        elif c == "$" and (m := _DOLLAR.match(text, i)):
            tag = m.group(0)
            end = text.find(tag, m.end())
            end = n if end < 0 else end
            tokens.append(Token("string", text[m.end() : end]))
            i = end + len(tag)
        elif (c in "$%") and (m := _PARAM.match(text, i)):
            tokens.append(Token("param", m.group(0)))
            i = m.end()
        elif m := _WORD.match(text, i):
            tokens.append(Token("word", m.group(0).lower()))
            i = m.end()
        elif c.isdigit():
            j = i
            while j < n and (text[j].isdigit() or text[j] == "."):
                j += 1
            tokens.append(Token("number", text[i:j]))
            i = j
        else:
            tokens.append(Token("punct", c))
            i += 1
    return tokens


def _quoted(text: str, i: int, *, backslashes: bool) -> tuple[str, int]:
    """The value of the quoted string or identifier at ``i`` (its quote doubled inside), and the index after it."""
    quote, j, buf = text[i], i + 1, []
    while j < len(text):
        if backslashes and text[j] == "\\" and j + 1 < len(text):
            buf.append(text[j + 1])
            j += 2
        elif text.startswith(quote * 2, j):
            buf.append(quote)
            j += 2
        elif text[j] == quote:
            break
        else:
            buf.append(text[j])
            j += 1
    return "".join(buf), j + 1


@dataclass(frozen=True)
class Write:
    """A statement that writes columns of a target (``target`` None: a placeholder of dynamic SQL)."""

    target: tuple[str, ...] | None  # the name's parts, as PostgreSQL would resolve them (unquoted ones lower-cased)
    columns: frozenset[str]


@dataclass
class Scan:
    writes: list[Write] = field(default_factory=list)
    calls: set[tuple[str, ...]] = field(default_factory=set)
    strings: list[str] = field(default_factory=list)
    dynamic: list[str] = field(default_factory=list)


_NAME_KINDS = ("word", "ident")
# Words that end a SET list, at the list's own depth.
_SET_END = {"where", "from", "returning", "when", "on", "then", "else", "end", "loop", "into"}
# Words that look like calls but are not functions of the application's.
_NOT_CALLS = {
    "values", "in", "exists", "any", "all", "coalesce", "nullif", "greatest", "least", "cast", "format",
    "perform", "select", "array", "row", "update", "insert", "into", "set", "and", "or", "not", "if", "return",
    "raise", "execute", "using", "when", "then", "case", "over", "filter", "within", "as", "on", "do",
}  # fmt: skip


def scan(text: str) -> Scan:
    tokens = tokenize(text)
    result = Scan(strings=[t.text for t in tokens if t.kind == "string"], dynamic=_dynamic_texts(tokens))
    for i, token in enumerate(tokens):
        if token.kind == "word" and token.text == "update":
            result.writes.extend(_update_at(tokens, i))
        elif token.kind == "word" and token.text in ("insert", "merge"):
            result.writes.extend(_upsert_at(tokens, i))
        if token.kind in _NAME_KINDS and i + 1 < len(tokens) and tokens[i + 1] == Token("punct", "("):
            name = _name_before(tokens, i)
            if name and not (len(name) == 1 and token.kind == "word" and name[0] in _NOT_CALLS):
                result.calls.add(name)
    return result


def _name_at(tokens: list[Token], i: int) -> tuple[tuple[str, ...] | None, int]:
    """A possibly qualified name starting at ``i`` (None for a dynamic placeholder); and the index after it."""
    if i < len(tokens) and tokens[i].kind == "param":
        return None, i + 1
    parts: list[str] = []
    while i < len(tokens) and tokens[i].kind in _NAME_KINDS:
        parts.append(tokens[i].text)
        if i + 1 < len(tokens) and tokens[i + 1] == Token("punct", "."):
            i += 2
            continue
        return tuple(parts), i + 1
    return (tuple(parts) or None), i


def _name_before(tokens: list[Token], i: int) -> tuple[str, ...]:
    parts = [tokens[i].text]
    while i >= 2 and tokens[i - 1] == Token("punct", ".") and tokens[i - 2].kind in _NAME_KINDS:
        parts.insert(0, tokens[i - 2].text)
        i -= 2
    return tuple(parts)


def _set_columns(tokens: list[Token], i: int) -> frozenset[str]:
    """The columns a SET list starting after ``i`` assigns (``col = ...`` and ``(a, b) = ...``)."""
    columns: set[str] = set()
    depth = 0
    j = i
    while j < len(tokens):
        t = tokens[j]
        if t == Token("punct", "("):
            depth += 1
        elif t == Token("punct", ")"):
            if depth == 0:
                break
            depth -= 1
        elif t == Token("punct", ";") or (depth == 0 and t.kind == "word" and t.text in _SET_END):
            break
        elif t.kind in _NAME_KINDS and j + 1 < len(tokens):
            following = tokens[j + 1]
            if following == Token("punct", "=") and (j + 2 >= len(tokens) or tokens[j + 2] != Token("punct", "=")):
                columns.add(t.text)
            elif following in (Token("punct", ","), Token("punct", ")")) and depth >= 1:
                # (a, b) = (...): the names in the parenthesised list before "="
                k = j
                while k < len(tokens) and tokens[k] != Token("punct", ")"):
                    k += 1
                if k + 1 < len(tokens) and tokens[k + 1] == Token("punct", "="):
                    columns.add(t.text)
        j += 1
    return frozenset(c.split(".")[-1] for c in columns)


def _update_at(tokens: list[Token], i: int) -> list[Write]:
    j = i + 1
    if j < len(tokens) and tokens[j] == Token("word", "set"):
        return []  # DO UPDATE SET, THEN UPDATE SET: read with their INSERT or MERGE
    if j < len(tokens) and tokens[j] == Token("word", "only"):
        j += 1
    target, j = _name_at(tokens, j)
    # An alias, then SET (anything else: not an UPDATE statement, e.g. "FOR UPDATE", "DO UPDATE").
    for _ in range(3):
        if j < len(tokens) and tokens[j] == Token("word", "set"):
            return [Write(target, _set_columns(tokens, j + 1))]
        if j < len(tokens) and (tokens[j].kind in _NAME_KINDS or tokens[j] == Token("punct", "*")):
            j += 1
            continue
        break
    return []


def _upsert_at(tokens: list[Token], i: int) -> list[Write]:
    if i + 1 >= len(tokens) or tokens[i + 1] != Token("word", "into"):
        return []
    target, j = _name_at(tokens, i + 2)
    # The first "UPDATE SET" of the statement (ON CONFLICT DO UPDATE SET / WHEN MATCHED THEN UPDATE SET).
    depth = 0
    while j < len(tokens):
        t = tokens[j]
        if t == Token("punct", "("):
            depth += 1
        elif t == Token("punct", ")"):
            depth -= 1
        elif t == Token("punct", ";") and depth <= 0:
            return []
        elif t == Token("word", "update") and j + 1 < len(tokens) and tokens[j + 1] == Token("word", "set"):
            return [Write(target, _set_columns(tokens, j + 2))]
        j += 1
    return []


_STATEMENT = re.compile(r"\s*(update|insert|merge|with)\b", re.IGNORECASE)
_CONCAT = (Token("punct", "|"), Token("punct", "|"))


def _dynamic_texts(tokens: list[Token]) -> list[str]:
    texts = []
    i = 0
    while i < len(tokens):
        if tokens[i].kind != "string" or not _STATEMENT.match(tokens[i].text):
            i += 1
            continue
        parts, i = [tokens[i].text], i + 1
        while tuple(tokens[i : i + 2]) == _CONCAT and i + 2 < len(tokens):
            i += 2
            if tokens[i].kind == "string":
                parts.append(tokens[i].text)
                i += 1
            else:
                parts.append(" $0 ")
                i = _after_operand(tokens, i)
        texts.append("".join(parts))
    return texts


def _after_operand(tokens: list[Token], i: int) -> int:
    """The index after a non-string operand of ``||``: a (qualified) name or parameter, called or
    subscripted, perhaps cast (``quote_ident(t)``, ``TG_ARGV[0]``, ``NEW.job_id::text``)."""
    n = len(tokens)
    while i < n:
        if tokens[i] == Token("punct", "("):  # a parenthesised operand
            i = _after_brackets(tokens, i)
        elif tokens[i].kind in ("word", "ident", "param", "number"):
            i += 1
        else:
            return i
        while i < n and tokens[i] in (Token("punct", "("), Token("punct", "[")):
            i = _after_brackets(tokens, i)
        if i + 1 < n and tokens[i] == Token("punct", ".") and tokens[i + 1].kind in ("word", "ident"):
            i += 1
            continue
        if i + 2 < n and tokens[i] == tokens[i + 1] == Token("punct", ":"):
            i += 2  # a cast: the type's name follows
            continue
        return i
    return i


def _after_brackets(tokens: list[Token], i: int) -> int:
    depth = 0
    while i < len(tokens):
        if tokens[i] in (Token("punct", "("), Token("punct", "[")):
            depth += 1
        elif tokens[i] in (Token("punct", ")"), Token("punct", "]")):
            depth -= 1
            if depth == 0:
                return i + 1
        i += 1
    return i

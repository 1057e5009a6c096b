"""SQL text: quoting, the conditions DuckDB and polars read alike, and the partition terms a filter holds.

The bottom of the query package: plain text in, plain text or sets out (`polars` only to ask whether it parses
a condition).
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Sequence


def quote(name: str) -> str:
    """`name` as a SQL identifier."""
    return '"' + name.replace('"', '""') + '"'


def literal(value: str) -> str:
    """`value` as a SQL string literal."""
    return "'" + str(value).replace("'", "''") + "'"


def suggest(name: str, known: list[str]) -> str:
    """' (did you mean: a, b?)' for the closest known names, or ''."""
    close = difflib.get_close_matches(name, known, n=3, cutoff=0.6)
    return f" (did you mean: {', '.join(close)}?)" if close else ""


_TOKEN = re.compile(
    r"\s*(?:(?P<num>(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?)|(?P<str>'(?:[^']|'')*')|(?P<name>[A-Za-z_][A-Za-z0-9_]*)"
    r"|(?P<quoted>\"[^\"]+\")|(?P<op><=|>=|<>|!=|[=<>+\-*(),]))"
)
_WORDS = {"and", "or", "not", "between", "in", "is", "null", "true", "false"}


def simple_condition(condition: str, columns: list[str]) -> bool:
    """True if `condition` uses only known column names (exact case), numbers, quoted strings, comparisons,
    AND/OR/NOT, BETWEEN, IN (...), IS [NOT] NULL, + - * and parentheses: SQL that DuckDB and polars read
    alike. Division, functions, casts and anything else make it False."""
    known = set(columns)
    pos, prev = 0, None
    text = condition.rstrip()
    while pos < len(text):
        m = _TOKEN.match(text, pos)
        if m is None or m.end() == pos:
            return False
        kind, value = m.lastgroup, m.group(m.lastgroup)
        if kind == "name" and value.lower() not in _WORDS and value not in known:
            return False
        if kind == "quoted" and value[1:-1] not in known:
            return False
        if kind == "op" and value == "(" and prev is not None and prev[0] in ("name", "quoted") \
                and prev[1].lower() != "in" and prev[1].lower() not in ("and", "or", "not"):
            return False  # a function call
        prev, pos = (kind, value), m.end()
    return True


_PARTITION_KEYS = ("image", "label_image")


def partition_terms(filters: Sequence[str]) -> tuple[set[str] | None, set[str] | None, bool]:
    """(images, label images, only) the filters allow: from their top-level AND terms of the form
    `image = 'a'`, `'a' = image` or `image IN ('a', 'b')` (and the same for `label_image`); None where they do
    not restrict it. `only`: every term is such a term (the filters select whole tables)."""
    allowed: dict[str, set[str] | None] = {k: None for k in _PARTITION_KEYS}
    only = True
    for condition in filters:
        for term in _conjuncts(condition):
            found = _partition_term(term)
            if found is None:
                only = False
                continue
            key, values = found
            allowed[key] = values if allowed[key] is None else allowed[key] & values
    return allowed["image"], allowed["label_image"], only


def _tokens(condition: str) -> list[tuple[str, str]]:
    """The condition as (kind, text) tokens: those of `_TOKEN`, any other character a token of its own."""
    out, pos, text = [], 0, condition.rstrip()
    while pos < len(text):
        m = _TOKEN.match(text, pos)
        if m is None or m.end() == pos:
            while pos < len(text) and text[pos].isspace():
                pos += 1
            out.append(("other", text[pos]))
            pos += 1
            continue
        out.append((m.lastgroup, m.group(m.lastgroup)))
        pos = m.end()
    return out


def _conjuncts(condition: str | list[tuple[str, str]]) -> list[list[tuple[str, str]]]:
    """The condition's AND terms as tokens: split at the top level, and again inside a term that is all in
    parentheses. A condition with an OR at its top level is one term (AND binds tighter: `a OR b AND c` is
    `a OR (b AND c)`)."""
    tokens = _tokens(condition) if isinstance(condition, str) else condition
    while len(tokens) >= 2 and tokens[0] == ("op", "(") and tokens[-1] == ("op", ")") and _encloses(tokens):
        tokens = tokens[1:-1]
    if _top_level_or(tokens):
        return [tokens]
    terms, current, depth, between = [], [], 0, False
    for kind, value in tokens:
        word = value.lower() if kind == "name" else None
        depth += (value == "(") - (value == ")") if kind == "op" else 0
        if depth == 0 and word == "between":
            between = True
        elif depth == 0 and word == "and":
            if between:  # BETWEEN a AND b: this AND is the range's
                between = False
            else:
                terms.append(current)
                current = []
                continue
        current.append((kind, value))
    terms.append(current)
    if len(terms) == 1:
        return terms
    return [part for term in terms for part in _conjuncts(term)]


def _top_level_or(tokens: list[tuple[str, str]]) -> bool:
    """Whether an OR, or a CASE (whose WHEN may hold an AND), stands at the top level of the tokens."""
    depth = 0
    for kind, value in tokens:
        if kind == "op":
            depth += (value == "(") - (value == ")")
        elif depth == 0 and kind == "name" and value.lower() in ("or", "case"):
            return True
    return False


def _encloses(tokens: list[tuple[str, str]]) -> bool:
    """Whether the first token's parenthesis closes at the last token."""
    depth = 0
    for i, (kind, value) in enumerate(tokens):
        if kind == "op":
            depth += (value == "(") - (value == ")")
            if depth == 0 and i < len(tokens) - 1:
                return False
    return True


def _partition_term(term: list[tuple[str, str]]) -> tuple[str, set[str]] | None:
    """(key, values) of `image = 'a'`, `'a' = image` or `image IN ('a', ...)`, else None."""
    def key(token: tuple[str, str]) -> str | None:
        kind, value = token
        name = value[1:-1] if kind == "quoted" else value if kind == "name" else None
        return name if name in _PARTITION_KEYS else None

    def text(token: tuple[str, str]) -> str | None:
        return token[1][1:-1].replace("''", "'") if token[0] == "str" else None

    if len(term) == 3 and term[1] == ("op", "="):
        for a, b in ((term[0], term[2]), (term[2], term[0])):
            if key(a) and text(b) is not None:
                return key(a), {text(b)}
    if len(term) >= 5 and key(term[0]) and term[1][0] == "name" and term[1][1].lower() == "in" \
            and term[2] == ("op", "(") and term[-1] == ("op", ")"):
        items = term[3:-1]
        values = [text(t) for t in items[0::2]]
        if all(v is not None for v in values) and all(t == ("op", ",") for t in items[1::2]):
            return key(term[0]), set(values)
    return None


def referenced(condition: str, columns: list[str]) -> list[str]:
    """The known column names a `simple_condition` uses."""
    known, out, pos = set(columns), [], 0
    text = condition.rstrip()
    while pos < len(text):
        m = _TOKEN.match(text, pos)
        if m is None or m.end() == pos:
            break
        value = m.group(m.lastgroup)
        if m.lastgroup == "quoted":
            value = value[1:-1]
        if m.lastgroup in ("name", "quoted") and value in known:
            out.append(value)
        pos = m.end()
    return out


def polars_parses(condition: str) -> bool:
    import polars as pl

    try:
        pl.sql_expr(condition)
    except Exception:
        return False
    return True


MISSING_COLUMN = re.compile(r'Referenced column "([^"]+)" not found')

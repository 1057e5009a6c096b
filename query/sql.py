"""SQL text: quoting, the conditions DuckDB and polars read alike (`reads_alike`), and the partition terms a
filter holds.

The bottom of the query package: plain text in, plain text or sets out (`polars` only to ask whether it parses
a condition).
"""

from __future__ import annotations

import difflib
import functools
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
_KINDS = {  # a column's dtype as the log records it (numpy's or Arrow's names) -> its kind in `reads_alike`
    **{f"{u}int{b}": "int" for u in ("", "u") for b in (8, 16, 32, 64)},
    **{t: "float" for t in ("float32", "float64", "float", "double")},
    **{t: "str" for t in ("string", "large_string", "string_view")},
    "bool": "bool",
}
_NUMBERS = {"int", "float"}
_KEYWORDS = {"and", "or", "not", "between", "in", "is", "null", "true", "false"}


def reads_alike(condition: str, types: dict[str, str]) -> bool:
    """True if polars reads `condition` as DuckDB does, answering the same rows (decided on the text, before
    anything runs): known column names (exact case; `types`: name -> dtype), numbers, quoted strings,
    comparisons, BETWEEN and IN (...) of like kinds (numbers with numbers, text with text, booleans with
    booleans), IS [NOT] NULL, AND/OR/NOT of conditions, boolean columns, parentheses, and + - * where an
    operand is a floating-point column or number. Else False, and DuckDB runs it: division and integer
    arithmetic (their types and overflow differ), functions, casts, text compared with numbers (DuckDB casts,
    polars refuses), names in another case (DuckDB folds case, polars does not), anything else."""
    tokens = _tokens(condition)
    if any(kind == "other" for kind, _ in tokens):
        return False
    reader = _Reader(tokens, {name: _KINDS.get(dtype) for name, dtype in types.items()})
    try:
        kind = reader.condition()
    except _Unlike:
        return False
    return kind == "bool" and reader.at_end()


class _Unlike(Exception):
    """The condition leaves `reads_alike`'s subset (raised and caught inside `reads_alike`)."""


class _Reader:
    """A recursive-descent reader of `reads_alike`'s subset of SQL, giving each expression's kind: "bool",
    "int" (an integer column or number), "float" (a floating-point one), "str"; anything outside the subset
    raises _Unlike."""

    def __init__(self, tokens: list[tuple[str, str]], kinds: dict[str, str | None]):
        self.tokens, self.kinds, self.pos = tokens, kinds, 0

    def at_end(self) -> bool:
        return self.pos == len(self.tokens)

    def _peek(self) -> tuple[str, str]:
        return self.tokens[self.pos] if self.pos < len(self.tokens) else ("end", "")

    def _word(self, *words: str) -> bool:
        """Take the next token if it is one of these keywords."""
        kind, value = self._peek()
        if kind == "name" and value.lower() in words:
            self.pos += 1
            return True
        return False

    def _op(self, *ops: str) -> str | None:
        kind, value = self._peek()
        if kind == "op" and value in ops:
            self.pos += 1
            return value
        return None

    def condition(self) -> str:  # OR binds loosest, then AND, then NOT, then a predicate
        kind = self._conjunction()
        while self._word("or"):
            kind = _both_bool(kind, self._conjunction())
        return kind

    def _conjunction(self) -> str:
        kind = self._negation()
        while self._word("and"):
            kind = _both_bool(kind, self._negation())
        return kind

    def _negation(self) -> str:
        if self._word("not"):
            return _both_bool(self._negation(), "bool")
        return self._predicate()

    def _predicate(self) -> str:
        left = self._sum()
        if self._word("is"):
            self._word("not")
            if not self._word("null"):
                raise _Unlike
            return "bool"
        negated = self._word("not")
        if self._word("between"):
            low = self._sum()
            if not self._word("and"):
                raise _Unlike
            return _comparable(left, low, self._sum())
        if self._word("in"):
            if not self._op("("):
                raise _Unlike
            items = [self._literal()]
            while self._op(","):
                items.append(self._literal())
            if not self._op(")"):
                raise _Unlike
            return _comparable(left, *items)
        if negated:
            raise _Unlike
        if self._op("=", "<>", "!=", "<", "<=", ">", ">="):
            return _comparable(left, self._sum())
        return left

    def _sum(self) -> str:
        kind = self._product()
        while self._op("+", "-"):
            kind = _arithmetic(kind, self._product())
        return kind

    def _product(self) -> str:
        kind = self._signed()
        while self._op("*"):
            kind = _arithmetic(kind, self._signed())
        return kind

    def _signed(self) -> str:
        """An atom, or a minus before a number or a floating-point atom (an integer column's overflow differs)."""
        if self._op("-"):
            if self._peek()[0] == "num":
                return self._atom()
            if self._signed() != "float":
                raise _Unlike
            return "float"
        return self._atom()

    def _atom(self) -> str:
        kind, value = self._peek()
        self.pos += 1
        if kind == "num":
            if any(c in value for c in ".eE"):
                return "float"
            if int(value) >= 2 ** 63:
                raise _Unlike  # past 64 bits the engines type it differently
            return "int"
        if kind == "str":
            return "str"
        if kind == "op" and value == "(":
            inner = self.condition()
            if not self._op(")"):
                raise _Unlike
            return inner
        if kind == "name" and value.lower() in ("true", "false"):
            return "bool"
        name = value[1:-1] if kind == "quoted" else value if kind == "name" else None
        if name is None or kind == "name" and value.lower() in _KEYWORDS or self.kinds.get(name) is None:
            raise _Unlike  # an operator or keyword out of place, an unknown name, a column of another type
        return self.kinds[name]

    def _literal(self) -> str:
        """A number (with its sign) or a quoted string: an item of IN (...)."""
        negative = self._op("-")
        kind = self._peek()[0]
        if kind == "num" or kind == "str" and not negative:
            return self._atom()
        raise _Unlike



def _both_bool(*kinds: str) -> str:
    if any(k != "bool" for k in kinds):
        raise _Unlike
    return "bool"


def _comparable(*kinds: str) -> str:
    """A comparison's kind: "bool" if its operands are all numbers, all text or all booleans."""
    if not (all(k in _NUMBERS for k in kinds) or len(set(kinds)) == 1 and kinds[0] in ("str", "bool")):
        raise _Unlike
    return "bool"


def _arithmetic(left: str, right: str) -> str:
    """+ - * of two numbers, one of them floating-point (integer arithmetic overflows differently)."""
    if left not in _NUMBERS or right not in _NUMBERS or "float" not in (left, right):
        raise _Unlike
    return "float"


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
    """The known column names a condition uses (of one that `reads_alike`: it stops at anything else)."""
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


@functools.lru_cache(maxsize=4096)
def polars_parses(condition: str) -> bool:
    """Whether polars' SQL parser takes the condition (`reads_alike` decides what it means)."""
    import polars as pl

    try:
        pl.sql_expr(condition)
    except (pl.exceptions.SQLInterfaceError, pl.exceptions.SQLSyntaxError):  # what it raises for SQL it does not take
        return False
    return True


MISSING_COLUMN = re.compile(r'Referenced column "([^"]+)" not found')


_FLIPPED = {"<": ">", "<=": ">=", ">": "<", ">=": "<=", "=": "=", "<>": "<>", "!=": "!="}


def simple_terms(condition: str, types: dict[str, str]) -> list[tuple[str, str, tuple]] | None:
    """The condition as a conjunction of (column, op, values) terms where every AND term is `column op number`
    (or `number op column`; op one of = <> != < <= > >=), `column BETWEEN number AND number`, or
    `column = 'text'` / `column <> 'text'` on a text column; None for anything else. Numbers are ints where
    written without a point or exponent; an unsigned column is never compared with a negative number here.
    polars evaluates such terms natively (its SQL comparisons run several times slower: `Query._native`)."""
    out = []
    for term in _conjuncts(condition):
        while len(term) >= 2 and term[0] == ("op", "(") and term[-1] == ("op", ")") and _encloses(term):
            term = term[1:-1]
        found = _simple_term(term, types)
        if found is None:
            return None
        out.append(found)
    return out


def _simple_term(term: list[tuple[str, str]], types: dict[str, str]) -> tuple[str, str, tuple] | None:
    def column(token):
        kind, value = token
        name = value[1:-1] if kind == "quoted" else value if kind == "name" and value.lower() not in _KEYWORDS else None
        return name if name in types else None

    def number(tokens):
        sign = -1 if tokens[:1] == [("op", "-")] else 1
        tokens = tokens[1:] if sign == -1 else tokens
        if len(tokens) != 1 or tokens[0][0] != "num":
            return None
        text = tokens[0][1]
        return sign * (int(text) if text.isdigit() else float(text))

    def fits(name, *values):
        kind = _KINDS.get(types[name])
        return kind in _NUMBERS and not (types[name].startswith("uint") and any(v < 0 for v in values))

    if len(term) >= 3 and term[1][0] == "op" and term[1][1] in _FLIPPED:
        name, value, op = column(term[0]), number(term[2:]), term[1][1]
        if name is None:
            name, value, op = column(term[-1]), number(term[:-2]), _FLIPPED.get(term[-2][1]) if term[-2][0] == "op" else None
        if name is not None and value is not None and op and fits(name, value):
            return name, op, (value,)
        if len(term) == 3 and term[1][1] in ("=", "<>", "!=") and term[2][0] == "str" and column(term[0]) \
                and _KINDS.get(types[column(term[0])]) == "str":
            return column(term[0]), term[1][1], (term[2][1][1:-1].replace("''", "'"),)
        return None
    if len(term) >= 5 and column(term[0]) and term[1][0] == "name" and term[1][1].lower() == "between":
        words = [i for i, t in enumerate(term) if t[0] == "name" and t[1].lower() == "and"]
        if len(words) == 1:
            lo, hi = number(term[2:words[0]]), number(term[words[0] + 1:])
            name = column(term[0])
            if lo is not None and hi is not None and fits(name, lo, hi):
                return name, "between", (lo, hi)
    return None


# -- which columns a statement may read ------------------------------------------------------------------------
_WORDS = frozenset("""
    select from where and or not between in is null true false as order by group having limit offset asc desc nulls
    first last distinct case when then else end like ilike join inner left right outer full cross on using with
    union all intersect except exists cast filter over partition rows range preceding following unbounded current
    row any some escape interval qualify window natural semi anti asof
    boolean bool tinyint smallint integer int bigint hugeint utinyint usmallint uinteger ubigint float real double
    decimal numeric varchar text date time timestamp
""".split())
_SET_OPERATORS = frozenset({"union", "intersect", "except"})
_STARS = frozenset({"columns", "unpack"})  # DuckDB's star expressions (`COLUMNS('re')`, `*COLUMNS(...)`)


def may_read(statement: str, names: set[str], columns: set[str], views: set[str]) -> bool:
    """Whether the SELECT `statement` may read any of the columns `names` (lower case) of cellar's views: False
    only where its words show it cannot, so that a view without those columns answers it alike (the `objects`
    view without its annotation join, `Tables.sql`). The words are read one at a time, and any word or sign the
    rules do not know makes it True:
    - a star (bar `count(*)`), COLUMNS(...), a name in `names`, text that is not one SELECT or WITH statement;
    - a table after FROM or JOIN that is not one of `views` or a name WITH defines (`WITH q AS (...)`); a FROM
      without a SELECT before it at its depth (DuckDB's FROM-first syntax: `FROM objects` reads `*`);
    - any other word that is not a SQL keyword or type, a function called, a column of `columns` (lower case),
      a qualifier (`o.` in `o.area`), a table's alias where it is defined, or a name defined after AS that is
      not a table's alias (a column's: `ORDER BY n` after `count(*) AS n`). A table's alias used on its own
      (`SELECT o FROM objects o`) is the whole row, annotations included.
    The columns named as `"quoted"` identifiers count too: DuckDB matches names without regard to case."""
    tokens = _tokens(statement.strip().rstrip(";"))
    if not tokens or tokens[0][0] != "name" or tokens[0][1].lower() not in ("select", "with"):
        return True
    ctes: set[str] = set()  # the names WITH defines
    aliases: set[str] = set()  # the names AS gives expressions
    depth, selects = 0, {0: 0}  # the SELECTs at each parenthesis depth not yet matched by a FROM
    table = False  # the previous word named a table: a word that follows is its alias
    for i, (kind, text) in enumerate(tokens):
        prev = tokens[i - 1] if i else ("", "")
        nxt = tokens[i + 1] if i + 1 < len(tokens) else ("", "")
        if kind == "op" and text == "(":
            depth += 1
            selects[depth] = 0
        elif kind == "op" and text == ")":
            depth -= 1
        elif kind == "op" and text == "*":
            if not (prev == ("op", "(") and nxt == ("op", ")") and i > 1 and tokens[i - 2][1].lower() == "count"):
                return True
        elif kind == "other" and text != ".":
            return True
        if kind not in ("name", "quoted"):
            table = False
            continue
        word = (text[1:-1] if kind == "quoted" else text).lower()
        was_table, table = table, False
        if word in names or (word in _STARS and nxt == ("op", "(")):
            return True
        if kind == "name" and word == "select":
            selects[depth] += 1
        elif kind == "name" and word in _SET_OPERATORS:
            selects[depth] = 0
        elif kind == "name" and word == "from":
            if not selects[depth]:
                return True
            selects[depth] -= 1
        after = tokens[i + 2] if i + 2 < len(tokens) else ("", "")
        if prev[0] == "name" and prev[1].lower() in ("from", "join"):
            if word not in views and word not in ctes:
                return True
            table = True
        elif nxt == ("other", ".") or prev == ("other", "."):
            continue  # a qualifier, or a column it qualifies (checked against `names` above)
        elif kind == "name" and word in _WORDS:
            table = was_table and word == "as"  # `objects AS o`: o is the table's alias
        elif word in columns or word in aliases:
            continue
        elif was_table:
            continue  # a table's alias, defined here (used on its own later, it is not a known word)
        elif prev[0] == "name" and prev[1].lower() == "as":
            aliases.add(word)  # an expression's alias (or a type: `CAST(x AS DOUBLE)`)
        elif prev[1].lower() in ("with", "recursive", ",") and nxt[1].lower() == "as" and after == ("op", "("):
            ctes.add(word)  # `WITH q AS (...)`
        elif kind == "name" and nxt == ("op", "("):
            continue  # a function
        else:
            return True
    return depth != 0

"""The lazy Python query API: `Query` composes filters, projections, order and limit into one SQL statement
over the `objects` view and runs it only when a result is asked for.

    objs = query.open("slide.cellar")
    q = objs.where("area_um2 > 80 AND intensity_mean__CD8 > 300").within(100, 100, 600, 400)
    q.count(); q.label_ids(); q.to_polars(); q.describe("area_um2")

Each method returns a new `Query` (the old one is unchanged), so partial queries can be shared and extended.
Filters become a WHERE clause that DuckDB pushes into the Parquet scan, where the row groups' min/max
statistics skip most of a store that is sorted in space (see `schemas.store`).
"""

from __future__ import annotations

import difflib
import os
import re
from concurrent.futures import ThreadPoolExecutor
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

import duckdb
import numpy as np

from ..schemas.errors import QueryError

if TYPE_CHECKING:
    import pandas
    import polars
    import pyarrow

    from .store import Objects

_AXES = ("x", "y", "z")
_QUANTILES = (0.05, 0.25, 0.5, 0.75, 0.95)


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


@dataclass(frozen=True)
class Query:
    """A lazy query over the objects of one or more stores (see the module docstring)."""

    objects: Objects
    filters: tuple[str, ...] = ()
    columns: tuple[str, ...] | None = None  # None: every column
    order: tuple[tuple[str, bool], ...] = ()  # (column, descending)
    limit_rows: int | None = None
    ranges: tuple[tuple[str, float, float], ...] = ()  # the boxes' (column, lo, hi), also in `filters`

    # -- composing -----------------------------------------------------------------------------------
    def where(self, condition: str) -> Query:
        """Keep the objects for which the SQL `condition` holds (`"area_um2 > 80 AND class = 'tumour'"`)."""
        if not isinstance(condition, str) or not condition.strip():
            raise QueryError("where: expected a SQL condition such as \"area > 80\"")
        query = replace(self, filters=(*self.filters, f"({condition})"))
        if not (simple_condition(condition, self.objects.column_names) and _polars_parses(condition)):
            query._pruned()._check_condition(condition)  # bound on the tables the query will read
        return query

    def select(self, *columns: str) -> Query:
        """Keep only these columns (in this order)."""
        cols = tuple(c for group in columns for c in ([group] if isinstance(group, str) else group))
        if not cols:
            raise QueryError("select: name at least one column")
        self.objects.check_columns(cols, "select")
        return replace(self, columns=cols)

    def within(self, x0: float, y0: float, x1: float, y1: float, z0: float | None = None, z1: float | None = None,
               *, units: str = "um") -> Query:
        """Objects whose centroid lies in the box [x0, x1] x [y0, y1] (x [z0, z1] in 3D), bounds included.

        `units` is "um" (physical coordinates, the NGFF scale and translation applied) or "px" (pixels of
        the measured level).
        """
        box = {"x": (x0, x1), "y": (y0, y1)}
        if (z0 is None) != (z1 is None):
            raise QueryError("within: give both z0 and z1, or neither")
        if z0 is not None:
            box["z"] = (z0, z1)
        conds = []
        for axis, (lo, hi) in box.items():
            lo, hi = _number(lo, f"within: {axis}0"), _number(hi, f"within: {axis}1")
            if lo > hi:
                raise QueryError(f"within: {axis}0 = {lo:g} > {axis}1 = {hi:g}; corners inverted (expected {axis}0 <= {axis}1)")
            conds.append(f"{quote(self._centroid(axis, units))} BETWEEN {lo!r} AND {hi!r}")
        ranges = tuple((self._centroid(a, units), float(lo), float(hi)) for a, (lo, hi) in box.items())
        return replace(self, filters=(*self.filters, " AND ".join(conds)), ranges=(*self.ranges, *ranges))

    def near(self, x: float, y: float, r: float, z: float | None = None, *, units: str = "um") -> Query:
        """Objects whose centroid lies within distance `r` of (x, y[, z]) (`units` as in `within`)."""
        r = _number(r, "near: r")
        if r < 0:
            raise QueryError(f"near: r = {r:g}; expected a distance >= 0")
        centre = {"x": _number(x, "near: x"), "y": _number(y, "near: y")}
        if z is not None:
            centre["z"] = _number(z, "near: z")
        cols = {a: quote(self._centroid(a, units)) for a in centre}
        # The box first: DuckDB pushes plain range filters into the scan (row-group statistics); the exact
        # distance test then runs on the few rows left.
        box = " AND ".join(f"{cols[a]} BETWEEN {c - r!r} AND {c + r!r}" for a, c in centre.items())
        dist = " + ".join(f"({cols[a]} - {c!r}) * ({cols[a]} - {c!r})" for a, c in centre.items())
        ranges = tuple((self._centroid(a, units), c - r, c + r) for a, c in centre.items())
        return replace(self, filters=(*self.filters, f"{box} AND {dist} <= {r * r!r}"), ranges=(*self.ranges, *ranges))

    def order_by(self, *columns: str, descending: bool = False) -> Query:
        """Sort by these columns (ascending, or descending with `descending=True`); NULLs last."""
        if not columns:
            raise QueryError("order_by: name at least one column")
        self.objects.check_columns(columns, "order_by")
        return replace(self, order=(*self.order, *((c, bool(descending)) for c in columns)))

    def limit(self, n: int) -> Query:
        """At most `n` rows."""
        if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 0:
            raise QueryError(f"limit: {n!r}; expected a whole number >= 0")
        return replace(self, limit_rows=int(n))

    # -- the statement ---------------------------------------------------------------------------------
    def to_sql(self, columns: str | None = None, source: str = "objects") -> str:
        """The SELECT statement this query runs (over the `objects` view)."""
        cols = columns or (", ".join(quote(c) for c in self.columns) if self.columns else "*")
        sql = f"SELECT {cols} FROM {source}"
        if self.filters:
            sql += " WHERE " + " AND ".join(self.filters)
        if self.order:
            sql += " ORDER BY " + ", ".join(f"{quote(c)} {'DESC' if d else 'ASC'} NULLS LAST" for c, d in self.order)
        if self.limit_rows is not None:
            sql += f" LIMIT {self.limit_rows}"
        return sql

    def _pruned(self) -> Query:
        """This query on only the tables its filters allow (`partition_terms`): partition pruning, before any
        file is opened. Itself where the filters name no image or label image, or over a session cache."""
        if not self.filters or self.objects.is_cached:
            return self
        images, label_images, _ = partition_terms(self.filters)
        if images is None and label_images is None:
            return self
        narrowed = self.objects.narrow(images, label_images)
        return self if narrowed is self.objects else replace(self, objects=narrowed)

    def relation(self) -> duckdb.DuckDBPyRelation:
        """The DuckDB relation (still lazy)."""
        q = self._pruned()
        return q.objects.sql(q.to_sql())

    def sql(self, statement: str) -> duckdb.DuckDBPyRelation:
        """Run SQL over this query's rows, available as the table `q`:
        ``objs.where("area > 80").sql("SELECT class, avg(area) FROM q GROUP BY class")``."""
        q = self._pruned()
        return q.objects.sql(f"WITH q AS ({q.to_sql()}) {statement}")

    # -- results ---------------------------------------------------------------------------------------
    def to_arrow(self) -> pyarrow.Table:
        pruned = self._pruned()
        if pruned is not self:
            return pruned.to_arrow()
        if self.objects.is_cached:
            if not (self.filters or self.order or self.limit_rows is not None):
                cached = self.objects.cached
                return cached.select(list(self.columns)) if self.columns else cached
            # Late materialisation from the session cache: the filter and order columns find the rows, whole
            # rows are then taken from Arrow memory or the mapped files (building every column of the result
            # inside an engine costs far more).
            return self.objects.take(self._cached_rows(), self.columns)
        frame = self._polars(needs=self.columns)
        if frame is not None:
            if self.columns:
                frame = frame.select(list(self.columns))
            table = self._collect(frame)
            if table is not None:
                return _plain_strings(table.to_arrow())
        return self._run(self.to_sql(), "to_arrow_table")

    def _cached_rows(self) -> np.ndarray:
        """Row numbers in the session cache of this query's rows, in its order: polars for plain filters
        (it scans memory fastest) and for any query on the mapped cache (it reads only the columns the query
        names), DuckDB for ordered queries on the cache in RAM (its top-N is the faster sort there)."""
        from .store import ROW_COLUMN

        polars_first = not self.order or self.objects.mapped
        frame = self._polars(needs=()) if polars_first else None
        result = self._collect(frame.select(ROW_COLUMN)) if frame is not None else None
        if result is not None:
            return result.get_column(ROW_COLUMN).to_numpy().astype(np.int64, copy=False)
        rows = self._run(replace(self, columns=None).to_sql(ROW_COLUMN, self.objects.numbered_view()), "fetchnumpy")[ROW_COLUMN]
        return np.asarray(rows, np.int64)

    def to_polars(self) -> polars.DataFrame:
        import polars

        return polars.from_arrow(self.to_arrow())

    def to_pandas(self) -> pandas.DataFrame:
        return self.to_arrow().to_pandas()

    def count(self) -> int:
        """Number of matching objects: from the log's object counts where the filters name only images and
        label images (no file is read), else from the files or the session cache."""
        images, label_images, only = partition_terms(self.filters)
        if only and not self.objects.is_cached:
            return self.objects.count_from_log(images, label_images)
        pruned = self._pruned()
        if pruned is not self:
            return pruned.count()
        frame = self._polars(ordered=False, needs=())
        if frame is not None:
            import polars as pl

            result = self._collect(frame.select(pl.len()))
            if result is not None:
                return int(result.item())
        inner = replace(self, columns=None, order=()).to_sql("1")
        return int(self._run(f"SELECT count(*) FROM ({inner})")[0][0])

    def _polars(self, ordered: bool = True, needs: tuple[str, ...] | None = None):
        """This query as a polars LazyFrame over the Parquet files, or None where DuckDB answers instead.

        `needs`: the columns the caller will take from the result (None: all); with the filter and order
        columns, the only ones the mapped session cache has to materialise.

        polars scans Parquet faster than DuckDB (it decodes the other columns only for rows that pass the
        filter), so plain queries on the files run there: filters in the subset of SQL that both read the
        same way (`simple_condition`), order, limit, projection. The session cache, annotation joins and
        anything else go to DuckDB. Both engines answer every query test (tests/test_query_api.py).
        """
        names = self.objects.column_names
        if not all(simple_condition(f, names) for f in self.filters):
            return None
        columns = None
        if needs is not None:
            columns = [*needs, *(c for c, _ in self.order), *(n for f in self.filters for n in referenced(f, names))]
            columns = [c for c in dict.fromkeys(columns) if c in names]
        frame = self.objects.polars_frame(columns, self.ranges)
        if frame is None:
            return None
        import polars as pl

        for f in self.filters:
            try:
                frame = frame.filter(pl.sql_expr(f))
            except Exception:  # polars' SQL parser could not take it: DuckDB will
                return None
        if ordered and self.order:
            cols, desc = zip(*self.order)
            frame = frame.sort(list(cols), descending=list(desc), nulls_last=True, maintain_order=True)
        if self.limit_rows is not None:
            frame = frame.head(self.limit_rows)
        return frame

    @staticmethod
    def _collect(frame):
        """The collected polars frame, or None if polars fails (DuckDB then runs the query and reports)."""
        try:
            return frame.collect()
        except Exception:
            return None

    def _run(self, sql: str, how: str = "fetchall"):
        """Run a statement and materialise it (`how`: a relation method); errors found while running it (a
        value that does not convert, say) become one-line QueryErrors like those found while binding."""
        return self.objects.fetch(sql, how)

    def label_ids(self) -> np.ndarray:
        """The matching label ids (uint64): in the query's order if it has one, else ascending.

        The result must come from one (image, label image) table; restrict several with
        `.where("image = '...' AND label_image = '...'")`.
        """
        pruned = self._pruned()
        if pruned is not self:
            return pruned.label_ids()
        tables = self._run(
            f"SELECT DISTINCT image, label_image FROM ({replace(self, columns=None).to_sql()})"
        ) if self.objects.n_tables > 1 else []
        if len(tables) > 1:
            names = ", ".join(f"{i}/{lbl}" for i, lbl in tables[:4])
            raise QueryError(
                f"label_ids: the result spans {len(tables)} tables ({names}); label ids are only unique within "
                "one: add .where(\"image = '...' AND label_image = '...'\")"
            )
        frame = self._polars(needs=("label_id",)) if self.objects.n_tables == 1 else None
        result = self._collect(frame.select("label_id")) if frame is not None else None
        if result is not None:
            ids = result.get_column("label_id").to_numpy()
        else:
            ids = self._run(replace(self, columns=("label_id",)).to_sql(), "fetchnumpy")["label_id"]
        ids = np.asarray(ids, dtype=np.uint64)
        return ids if self.order else np.sort(ids)

    def describe(self, column: str) -> dict[str, Any]:
        """A column's dtype, unit and description, with its count, nulls, min, max, mean and quantiles over
        the matching rows (NaN values are left out of the statistics and counted)."""
        pruned = self._pruned()
        if pruned is not self:
            return pruned.describe(column)
        self.objects.check_columns([column], "describe")
        info = self.objects.column_info(column)
        base = replace(self, columns=None, order=(), limit_rows=self.limit_rows)
        col = quote(column)
        numeric = info["dtype"] not in ("string", "bool") and not info["dtype"].startswith(("VARCHAR", "BOOL"))
        if numeric:
            qs = ", ".join(f"quantile_cont({col}, {q}) FILTER (WHERE NOT isnan({col}))" for q in _QUANTILES)
            row = self._run(
                f"SELECT count(*), count({col}), count(*) FILTER (WHERE isnan({col})), "
                f"min({col}) FILTER (WHERE NOT isnan({col})), max({col}) FILTER (WHERE NOT isnan({col})), "
                f"avg({col}) FILTER (WHERE NOT isnan({col})), {qs} FROM ({base.to_sql()})"
            )[0]
            stats = dict(zip(["rows", "count", "nan", "min", "max", "mean"], row[:6]))
            stats["quantiles"] = dict(zip(_QUANTILES, row[6:]))
        else:
            row = self._run(f"SELECT count(*), count({col}), count(DISTINCT {col}) FROM ({base.to_sql()})")[0]
            stats = dict(zip(["rows", "count", "distinct"], row))
        stats["nulls"] = stats["rows"] - stats["count"]
        return {"name": column, **info, **stats}

    def export(self, fmt: str, output: str, **options: Any) -> dict[str, Any]:
        """Write this query's rows as `fmt` ("omero-h5", "csv", "parquet", "anndata", "ngff-properties"); see
        `query.export.export` for the options. Returns a summary (rows, columns, renamed columns)."""
        pruned = self._pruned()
        if pruned is not self:
            return pruned.export(fmt, output, **options)
        from .export import export

        return export(self, fmt, output, **options)

    # -- helpers ---------------------------------------------------------------------------------------
    def _centroid(self, axis: str, units: str) -> str:
        if units not in ("um", "px"):
            raise QueryError(f"units={units!r}; expected 'um' (physical) or 'px' (pixels)")
        name = f"centroid_{axis}_um" if units == "um" else f"centroid_{axis}"
        if name not in self.objects.column_names:
            if units == "um" and f"centroid_{axis}" in self.objects.column_names:
                raise QueryError(f"no column {name}: the store has no physical centroids (an uncalibrated image "
                                 "or not measured); use units='px'")
            raise QueryError(f"no column {name}: the store's objects have no {axis} centroid "
                             "(measure with the morphology group)")
        return name

    def _check_condition(self, condition: str) -> None:
        """Bind the condition now (no rows are read), so that a wrong name fails where it was written."""
        try:  # DuckDB binds a relation when it is built and runs it only when asked
            self.objects.con.sql(f"SELECT 1 FROM objects WHERE {condition}")
        except duckdb.Error as exc:
            raise QueryError(f"where {condition!r}: {self.objects.explain(exc)}") from None


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


def _polars_parses(condition: str) -> bool:
    import polars as pl

    try:
        pl.sql_expr(condition)
    except Exception:
        return False
    return True


def _plain_strings(table: pyarrow.Table) -> pyarrow.Table:
    """polars hands strings over as large or view strings; DuckDB and the store use plain ones."""
    import pyarrow as pa

    fields = [pa.field(f.name, pa.string(), f.nullable, f.metadata)
              if pa.types.is_large_string(f.type) or pa.types.is_string_view(f.type) else f for f in table.schema]
    return table.cast(pa.schema(fields, metadata=table.schema.metadata))


def take_rows(table: pyarrow.Table, rows: np.ndarray) -> pyarrow.Table:
    """`table.take(rows)` for a few rows of a large, possibly chunked (memory-mapped) table.

    On chunked columns pyarrow's take concatenates the chunks first (a copy of the column per call), and
    taking chunk by chunk costs tens of microseconds per array (a 5M x 200 table has 7,800), so fixed-width
    columns without nulls are gathered with numpy straight from each chunk's buffer, touching only the pages
    that hold the rows; other columns take per chunk with pyarrow.

    Scattered rows of a large table cost one memory access per value (5,000 rows x 200 columns: a million),
    and a core waits for each; the columns are shared among threads (pyarrow's take and numpy's gather run
    without the GIL), which at 5M x 200 in RAM took 15.5 ms where one thread took 25.4 ms.
    """
    import pyarrow as pa

    rows = np.asarray(rows, dtype=np.int64)
    if table.num_columns == 0 or len(rows) == 0:
        return table.take(pa.array(rows))
    if all(c.num_chunks == 1 for c in table.columns):  # one chunk per column (the cache in RAM): pyarrow's take
        index = pa.array(rows)
        columns = _by_column(lambda column: column.take(index), table.columns, len(rows))
        return pa.Table.from_arrays(columns, schema=table.schema)
    plans: dict[tuple[int, ...], list[tuple[int, np.ndarray, np.ndarray]]] = {}
    for column in table.columns:
        lengths = tuple(len(c) for c in column.chunks)
        if lengths not in plans:  # which rows each chunk holds (columns of one table share their chunking)
            starts = np.cumsum((0,) + lengths)
            which = np.searchsorted(starts, rows, side="right") - 1
            order = np.argsort(which, kind="stable")
            cuts = np.searchsorted(which[order], np.arange(len(lengths) + 1))
            plans[lengths] = [(k, order[cuts[k]:cuts[k + 1]], rows[order[cuts[k]:cuts[k + 1]]] - starts[k])
                              for k in range(len(lengths)) if cuts[k + 1] > cuts[k]]
    columns = _by_column(lambda column: _take_column(column, plans[tuple(len(c) for c in column.chunks)], len(rows)),
                         table.columns, len(rows))
    return pa.Table.from_arrays(columns, schema=table.schema)


# Smaller takes stay on the calling thread: the threads contend for the GIL between columns (200 columns of 2M
# float64, medians of 41: 200,000 values took 6.5 ms on one thread and 8.1 on two; 400,000, 11.0 and 9.9 ms).
PARALLEL_VALUES = 300_000
_POOL = None


def _by_column(take, columns: list, n_rows: int) -> list:
    """[take(column) for column in columns], the columns shared among the cores' threads when there are
    enough values to gather."""
    global _POOL
    workers = min(os.cpu_count() or 1, len(columns))
    if workers < 2 or n_rows * len(columns) < PARALLEL_VALUES:
        return [take(c) for c in columns]
    if _POOL is None:
        _POOL = ThreadPoolExecutor(os.cpu_count(), thread_name_prefix="cellar-take")
    shares = [columns[i::workers] for i in range(workers)]
    done = list(_POOL.map(lambda share: [take(c) for c in share], shares))
    out = [None] * len(columns)
    for i, taken in enumerate(done):
        out[i::workers] = taken
    return out


def _forget_pool() -> None:
    global _POOL
    _POOL = None  # a forked child has none of the parent's threads: it starts its own pool


os.register_at_fork(after_in_child=_forget_pool)


def _take_column(column, plan: list[tuple[int, np.ndarray, np.ndarray]], n: int):
    import pyarrow as pa

    kind = column.type
    dtype = number_dtype(kind) if column.null_count == 0 else None
    if dtype is not None:
        out = np.empty(n, dtype)
        for k, where, offsets in plan:
            chunk = column.chunk(k)
            values = chunk_values(chunk, dtype)
            out[where] = values[offsets]
        return pa.array(out, type=kind)
    pieces = [column.chunk(k).take(pa.array(offsets)) for k, _, offsets in plan]
    where = np.concatenate([w for _, w, _ in plan])
    taken = pa.concat_arrays(pieces) if len(pieces) > 1 else pieces[0]
    return taken.take(pa.array(np.argsort(where, kind="stable")))  # back to the rows' order


def number_dtype(kind) -> np.dtype | None:
    """The numpy dtype of an Arrow integer or float type (whose values numpy can view in place), else None."""
    import pyarrow as pa

    if kind is not None and (pa.types.is_integer(kind) or pa.types.is_floating(kind)):
        return np.dtype(kind.to_pandas_dtype())
    return None


def chunk_values(chunk, dtype: np.dtype) -> np.ndarray:
    """The values of a fixed-width Arrow array without nulls as a numpy view (no copy)."""
    return np.frombuffer(chunk.buffers()[1], dtype, count=len(chunk), offset=chunk.offset * dtype.itemsize)


def _number(value: Any, what: str) -> float:
    try:
        out = float(value)
    except (TypeError, ValueError):
        raise QueryError(f"{what} = {value!r}; expected a number") from None
    if not np.isfinite(out):
        raise QueryError(f"{what} = {value!r}; expected a finite number")
    return out


_MISSING_COLUMN = re.compile(r'Referenced column "([^"]+)" not found')

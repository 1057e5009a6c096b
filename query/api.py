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

import math
import numbers
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

from collections.abc import Callable, Sequence
from pathlib import Path

import polars as pl  # with the module: most queries run on it (see `_polars`)

from ..schemas import lazy
from ..schemas.arrays import chunk_values, from_numpy, repeated_string
from ..schemas.errors import QueryError
from ..schemas.integrity import PARTITION_KEYS
from .arrow import plain_strings
from .backends import ROW_COLUMN
from .sql import partition_terms, polars_parses, quote, reads_alike, referenced, simple_terms, suggest
from .store import Tables, duck_type, polars_type

duckdb = lazy.module("duckdb")  # loaded by the queries polars does not run (`Query._polars`)
np = lazy.module("numpy")
pa = lazy.module("pyarrow")

if TYPE_CHECKING:
    import pandas
    import polars
    import pyarrow

# what polars raises on data it cannot read or compute, cellar errors (`Query._collect`); the last two: a file
# of a scan with other columns (`Tables._scans`)
POLARS_ERRORS = (pl.exceptions.ComputeError, pl.exceptions.SchemaError, pl.exceptions.ColumnNotFoundError, OSError)
_QUANTILES = (0.05, 0.25, 0.5, 0.75, 0.95)
_KEYS = ("image", "label_image")
WHOLE_ROWS = 16  # result columns from which a filter's or top-k's whole rows come from the row files
ROW_FILE_SHARE = 0.02  # the most of the covered rows read from the row files (more: the Parquet columns)


@dataclass(frozen=True)
class Query:
    """A lazy query over the objects of one or more stores (see the module docstring)."""

    objects: Objects
    filters: tuple[str, ...] = ()
    columns: tuple[str, ...] | None = None  # None: every column
    order: tuple[tuple[str, bool], ...] = ()  # (column, descending)
    limit_rows: int | None = None
    ranges: tuple[tuple[str, float, float], ...] = ()  # the boxes' (column, lo, hi), also in `filters`
    boxes: tuple[str, ...] = ()  # the filters `within` made: exactly `ranges`

    # -- composing -----------------------------------------------------------------------------------
    def where(self, condition: str) -> Query:
        """Keep the objects for which the SQL `condition` holds (`"area_um2 > 80 AND class = 'tumour'"`)."""
        if not isinstance(condition, str) or not condition.strip():
            raise QueryError("where: expected a SQL condition such as \"area > 80\"")
        query = replace(self, filters=(*self.filters, f"({condition})"))
        if not _polars_reads(condition, self.objects.column_types):
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
        condition = " AND ".join(conds)
        return replace(self, filters=(*self.filters, condition), ranges=(*self.ranges, *ranges),
                       boxes=(*self.boxes, condition))

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
        if isinstance(n, bool) or not isinstance(n, numbers.Integral) or n < 0:
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
        fetched = self._from_row_files(list(self.columns or self.objects.column_names))
        if fetched is not None:
            return fetched
        frame = self._selected_frame()
        if frame is not None:
            return _arrow(self._collect(frame))
        return self._run(self.to_sql(), "to_arrow_table")

    def polars_frame(self) -> polars.LazyFrame | None:
        """This query as a polars LazyFrame over the Parquet files or the session cache (its columns, in order),
        or None where DuckDB runs it (the rule of `_polars`). Run it with `run_polars`, which reports an error
        polars meets as cellar's error."""
        return self._pruned()._selected_frame()

    def _selected_frame(self):
        """`_polars` with this query's columns, in order (None where DuckDB runs it)."""
        frame = self._polars(needs=self.columns)
        return frame.select(list(self.columns)) if frame is not None and self.columns else frame

    def run_polars(self, run: Callable[[], Any]) -> Any:
        """`run()` (which runs this query's `polars_frame`: collects it, sinks it to a file), an error polars
        meets while running it reported as `_collect` reports it."""
        try:
            return run()
        except POLARS_ERRORS as exc:
            raise self.objects.polars_error(exc) from None

    def from_row_files(self) -> pyarrow.Table | None:
        """The query's result from the tables' row files where the rule of `_from_row_files` takes it from there,
        else None (the exports ask first, then stream from DuckDB)."""
        pruned = self._pruned()
        if pruned is not self:
            return pruned.from_row_files()
        return self._from_row_files(list(self.columns or self.objects.column_names))

    def _from_row_files(self, names: list[str]) -> pyarrow.Table | None:
        """The columns `names` of this query's rows, from the tables' row files (`schemas.rowfile`), or None where
        the Parquet files answer instead. The rule, decided before reading any values:
        - a box (`within`, `near`) over tables with a spatial index reads only the index's blocks the box meets,
          then the other columns of the rows inside from the row files (`_in_box`);
        - whole rows (WHOLE_ROWS columns or more from the files) of a filter or a top-k: polars finds the rows
          on the columns the filter and order name (`_located`), and the row files give their other columns,
          where at most ROW_FILE_SHARE of the covered rows match (more read faster as columns, from Parquet).
        """
        objects = self.objects
        if (objects.is_cached or objects.engine == "duckdb" or not (self.filters or self.limit_rows is not None)
                or not all(_polars_reads(f, objects.column_types) for f in self.filters)):
            return None
        if not self.ranges and sum(n not in _KEYS for n in names) < WHOLE_ROWS:  # before any row file is opened
            return None
        sources = objects.row_files
        if sources is None:
            return None
        stored = sources[0][0].names  # (the dtypes would load numpy)
        if self.ranges:
            boxed = self._in_box(sources, names)
            if boxed is not None:
                return boxed
        if sum(n in stored for n in names) < WHOLE_ROWS:
            return None
        return self._located(sources, names)

    def _in_box(self, sources, names: list[str]) -> pyarrow.Table | None:
        """The query over the rows inside its box, found with the row files' spatial index (None where a box
        column is not in the index, a filter needs an annotation, or the box holds more than ROW_FILE_SHARE).
        Boxes alone (and conditions on images and label images that all these tables meet) are answered by the
        index itself; other filters, order and limit then run in polars on the rows inside."""
        stored = sources[0][0].names  # (the dtypes would load numpy)
        needed = [*names, *(c for c, _ in self.order),
                  *(n for f in self.filters for n in referenced(f, self.objects.column_names))]
        needed = list(dict.fromkeys(needed))
        if any(n not in stored and n not in _KEYS for n in needed):
            return None
        found = [rf.in_ranges(self.ranges) for rf, _, _ in sources]
        if any(f is None for f in found) or sum(map(len, found)) > ROW_FILE_SHARE * sum(rf.n_rows for rf, _, _ in sources):
            return None
        if all(f in self.boxes or _whole_tables(f, sources) for f in self.filters) and not self.order \
                and self.limit_rows is None:
            # boxes alone: the rows the index found are the answer, in the files' order as polars gives them
            return pa.concat_tables([self._box_columns(rf, image, label_image, rows, names) for (rf, image, label_image), rows
                                     in zip(sources, found)]) if sources else None
        # from Arrow: polars' constructor from numpy loads numpy.ma (25 ms in a fresh process)
        parts = [pl.from_arrow(self._box_columns(rf, image, label_image, rows, needed))
                 for (rf, image, label_image), rows in zip(sources, found) if len(rows)]
        if not parts:  # no row inside: the columns, empty, with their types
            rf, image, label_image = sources[0]
            parts = [pl.from_arrow(self._box_columns(rf, image, label_image, np.zeros(0, np.int64), needed))]
        frame = self._planned(pl.concat(parts).lazy()).select(names)
        return _arrow(self._collect(frame))

    @staticmethod
    def _box_columns(rf, image: str, label_image: str, rows: np.ndarray, names: list[str]) -> pyarrow.Table:
        """Columns `names` of these rows of one row file's table, as Arrow."""
        values = rf.arrays(rows, [n for n in names if n in rf.names])
        keys = {"image": image, "label_image": label_image}
        return pa.table([from_numpy(values[n]) if n in values else repeated_string(keys[n], len(rows)) for n in names],
                        names=names)

    def _located(self, sources, names: list[str]) -> pyarrow.Table | None:
        """Whole rows: polars finds the matching rows' files and row numbers (and the columns the row files do
        not hold: image, label image, annotations), the row files give the rest, in the query's order."""
        rest = [n for n in names if n not in sources[0][0].names]
        frame = self._polars(needs=tuple(rest), located=True)
        if frame is None:
            return None
        where = self._collect(frame.select(ROW_COLUMN, *rest))
        if where.height > ROW_FILE_SHARE * sum(rf.n_rows for rf, _, _ in sources):
            return None
        stored = sources[0][0].columns
        starts = np.cumsum([0, *(rf.n_rows for rf, _, _ in sources)])
        rows = where.get_column(ROW_COLUMN).to_numpy().astype(np.int64)  # numbered across the files, in order
        files = np.searchsorted(starts, rows, side="right") - 1
        rows = rows - starts[files]
        taken = [n for n in names if n in stored]
        values = {n: np.empty(len(rows), stored[n][0]) for n in taken}
        for k in np.flatnonzero(np.bincount(files)):  # (np.unique loads numpy.ma: 25-70 ms in a fresh process)
            at = np.flatnonzero(files == k)
            for n, v in sources[k][0].arrays(rows[at], taken).items():
                values[n][at] = v
        others = _arrow(where.select(rest)) if rest else None
        return pa.table([from_numpy(values[n]) if n in values else others.column(n) for n in names], names=names)

    def _cached_rows(self) -> np.ndarray:
        """Row numbers in the session cache of this query's rows, in its order: polars for plain filters
        (it scans memory fastest) and for any query on the mapped cache (it reads only the columns the query
        names), DuckDB for ordered queries on the cache in RAM (its top-N is the faster sort there)."""
        polars_first = not self.order or self.objects.mapped
        frame = self._polars(needs=()) if polars_first else None
        if frame is not None:
            rows = self._collect(frame.select(ROW_COLUMN)).get_column(ROW_COLUMN)
            return rows.to_numpy().astype(np.int64, copy=False)
        rows = self._run(replace(self, columns=None).to_sql(ROW_COLUMN, self.objects.numbered_view()), "fetchnumpy")[ROW_COLUMN]
        return np.asarray(rows, np.int64)

    def to_polars(self) -> polars.DataFrame:
        return pl.from_arrow(self.to_arrow())

    def to_pandas(self) -> pandas.DataFrame:
        return self.to_arrow().to_pandas()

    def covered_rows(self) -> int:
        """The number of objects in the tables this query reads (its filters' images and label images), as the
        log records it: no file is read."""
        return self._pruned().objects.count_from_log()

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
            return int(self._collect(frame.select(pl.len())).item())
        inner = replace(self, columns=None, order=()).to_sql("1")
        return int(self._run(f"SELECT count(*) FROM ({inner})")[0][0])

    def _polars(self, ordered: bool = True, needs: tuple[str, ...] | None = None, located: bool = False):
        """This query as a polars LazyFrame, or None where DuckDB answers it instead.

        `needs`: the columns the caller will take from the result (None: all); with the filter and order
        columns, the only ones the mapped session cache has to materialise.

        The rule, decided on the query before anything runs: polars runs it when
        - the engine is "auto" (`engine="duckdb"` runs every query in DuckDB),
        - every filter is a condition polars reads as DuckDB does (`sql.reads_alike`: column names, numbers,
          quoted strings; comparisons, BETWEEN and IN of like kinds; IS [NOT] NULL; AND/OR/NOT; + - * with a
          floating-point operand) and that its SQL parser takes (`sql.polars_parses`), and
        - the backend has a polars frame (`Tables.polars_frame`): the session cache (in RAM or mapped), or the
          Parquet files of tables without annotations (DuckDB joins those).
        Order, limit and projection run on either. Anything else runs in DuckDB: functions, casts, division,
        integer arithmetic, text compared with numbers, annotation joins, `sql()`, `describe`. polars scans
        Parquet faster than DuckDB (it decodes the other columns only for rows that pass the filter), and
        memory fastest. A query polars runs is not run again in DuckDB: an error while running is reported
        (`_collect`). Every query test runs on every backend and both engines (tests/test_query_api.py).
        """
        objects = self.objects
        if objects.engine == "duckdb" or not all(_polars_reads(f, objects.column_types) for f in self.filters):
            return None
        names = objects.column_names
        columns = None
        if needs is not None:
            columns = [*needs, *(c for c, _ in self.order), *(n for f in self.filters for n in referenced(f, names))]
            columns = [c for c in dict.fromkeys(columns) if c in names]
        notes = objects.annotation_only_columns()
        inner = bool(notes) and any(name in notes for f in self.filters for name, _, _ in simple_terms(f, objects.column_types) or ())
        frame = objects.polars_frame(columns, self.ranges, located, inner)
        return None if frame is None else self._planned(frame, ordered)

    def _planned(self, frame, ordered: bool = True):
        """The query's filters, order and limit on a polars LazyFrame."""
        for f in self.filters:
            frame = frame.filter(self._native(f))
        if ordered and self.order:
            cols, desc = zip(*self.order)
            frame = frame.sort(list(cols), descending=list(desc), nulls_last=True, maintain_order=True)
        if self.limit_rows is not None:
            frame = frame.head(self.limit_rows)
        return frame

    def _native(self, condition: str) -> pl.Expr:
        """The condition as a polars expression: native comparisons where it is a conjunction of simple terms
        (`sql.simple_terms`; polars' SQL comparisons run 6x slower: 22 vs 3.5 ms on 2M rows), else polars' SQL
        expression (it parses: `polars_parses`). Both read it as DuckDB does (`sql.reads_alike`)."""
        terms = simple_terms(condition, self.objects.column_types)
        if terms is None:
            return pl.sql_expr(condition)
        exprs = []
        for name, op, values in terms:
            col = pl.col(name)
            exprs.append(col.is_between(*values) if op == "between" else {
                "=": col.__eq__, "<>": col.__ne__, "!=": col.__ne__, "<": col.__lt__, "<=": col.__le__,
                ">": col.__gt__, ">=": col.__ge__}[op](values[0]))
        return pl.all_horizontal(exprs) if len(exprs) > 1 else exprs[0]

    def _collect(self, frame) -> polars.DataFrame:
        """Run the polars frame. An error polars meets while running it is not run again in DuckDB: a ComputeError
        (data that do not decode, a value polars cannot compute) or an OSError (a file gone) is a cellar error
        (`Tables.polars_error`: a StoreError naming the file, else a one-line QueryError); any other error is
        a bug (of polars, or of the rule in `_polars`) and surfaces as it is."""
        return self.run_polars(frame.collect)

    def _run(self, sql: str, how: str = "fetchall"):
        """Run a statement and materialise it (`how`: a relation method); errors found while running it (a
        value that does not convert, say) become one-line QueryErrors like those found while binding."""
        return self.objects.fetch(sql, how)

    def label_ids(self) -> np.ndarray:
        """The matching label ids (uint64): in the query's order if it has one, else ascending.

        The result must come from one (image, label image) table; restrict several with
        `.where("image = '...' AND label_image = '...'")`.
        """
        ids = self._label_ids()
        return ids.to_numpy(writable=True) if isinstance(ids, pl.Series) else ids

    def label_id_series(self) -> polars.Series:
        """`label_ids` as a polars Series (UInt64, named label_id). Where polars answers the query, numpy is not
        loaded: `cellar filter` writes the ids without it (100 ms of a fresh process)."""
        ids = self._label_ids()
        if isinstance(ids, pl.Series):
            return ids
        # (a table, not a column, to polars: its Series from Arrow loads pyarrow.compute, 70 ms of a fresh process)
        return pl.from_arrow(pa.table([from_numpy(ids)], names=["label_id"])).to_series()

    def _label_ids(self) -> np.ndarray | polars.Series:
        """`label_ids` as numpy where the row files' index or DuckDB give them (numbers, no polars call: its first
        costs a fresh process 3-5 ms), as a polars Series where polars finds them."""
        pruned = self._pruned()
        if pruned is not self:
            return pruned._label_ids()
        images, label_images, _ = partition_terms(self.filters)
        one = self.objects.n_tables == 1 or (images is not None or label_images is not None) and len(
            self.objects.keys_matching(images, label_images)) <= 1  # the filters name one table (a session cache)
        tables = [] if one else self._run(
            f"SELECT DISTINCT image, label_image FROM ({replace(self, columns=None).to_sql()})")
        if len(tables) > 1:
            names = ", ".join(f"{i}/{lbl}" for i, lbl in tables[:4])
            raise QueryError(
                f"label_ids: the result spans {len(tables)} tables ({names}); label ids are only unique within "
                "one: add .where(\"image = '...' AND label_image = '...'\")"
            )
        boxed = self._from_row_files(["label_id"]) if self.objects.n_tables == 1 and not self.objects.is_cached else None
        frame = self._polars(needs=("label_id",)) if one and boxed is None else None
        if frame is not None:
            ids = self._collect(frame.select("label_id")).get_column("label_id").cast(pl.UInt64)
            return ids if self.order else ids.sort()
        if boxed is not None:
            ids = np.concatenate([chunk_values(c, np.dtype(np.uint64)) for c in boxed.column(0).chunks] or [np.zeros(0, np.uint64)])
        else:
            ids = self._run(replace(self, columns=("label_id",)).to_sql(), "fetchnumpy")["label_id"]
        ids = np.asarray(ids, dtype=np.uint64)
        return ids if self.order else np.sort(ids)

    def group_by(self, *keys: str) -> Grouped:
        """Group this query's rows by these columns: `.agg(mean=["area"], max=["intensity_max__CD8"])`."""
        if not keys:
            raise QueryError("group_by: name at least one column")
        self.objects.check_columns(keys, "group_by")
        return Grouped(self, tuple(keys))

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
        # imported here, not with the module: the exports load zarr and the NGFF models (550 ms), which no
        # query needs
        from .export import export as write_export

        pruned = self._pruned()
        if pruned is not self:
            return pruned.export(fmt, output, **options)
        return write_export(self, fmt, output, **options)

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
            statement = f"SELECT 1 FROM objects WHERE {condition}"
            self.objects.con_for(statement).sql(statement)
        except duckdb.Error as exc:
            raise QueryError(f"where {condition!r}: {self.objects.explain(exc)}") from None


def _arrow(frame: polars.DataFrame) -> pyarrow.Table:
    """A polars result as Arrow with plain strings, as DuckDB gives them."""
    return plain_strings(frame.to_arrow(compat_level=pl.CompatLevel.oldest()))


def _whole_tables(condition: str, sources) -> bool:
    """Whether the condition names only images and label images, and every table of these row files meets it."""
    images, label_images, only = partition_terms([condition])
    return only and all((images is None or image in images) and (label_images is None or label in label_images)
                        for _, image, label in sources)


def _polars_reads(condition: str, types: dict[str, str]) -> bool:
    """Whether polars may run this filter (see `Query._polars`): it reads it as DuckDB does, and parses it (a
    conjunction of simple terms need not be parsed: it runs as native expressions, `Query._native`)."""
    return reads_alike(condition, types) and (simple_terms(condition, types) is not None or polars_parses(condition))


def _number(value: Any, what: str) -> float:
    try:
        out = float(value)
    except (TypeError, ValueError):
        raise QueryError(f"{what} = {value!r}; expected a number") from None
    if not math.isfinite(out):
        raise QueryError(f"{what} = {value!r}; expected a finite number")
    return out


AGGREGATES = ("count", "sum", "mean", "min", "max", "median", "std", "var")


@dataclass(frozen=True)
class Grouped:
    """A query's rows grouped by key columns (`Query.group_by`); `agg` computes aggregates per group."""

    query: Query
    keys: tuple[str, ...]

    def agg(self, **columns: str | Sequence[str]) -> pyarrow.Table:
        """One row per group, sorted by the keys: the keys, then `<aggregate>_<column>` for every aggregate
        (count: of the values that are not null; sum, mean, min, max, median, std, var: std and var of samples,
        ddof 1) and column given, NaN values included as in SQL; counts and sums of whole numbers are int64
        (uint64 for unsigned columns). `objs.group_by("image").agg(mean=["area", "intensity_mean__CD8"])`.

        Runs in polars where the query's filters allow (the rule of `Query._polars`; by partition keys, a file
        at a time: `_file_parts`), else in DuckDB; both give the same table (tests/test_rowfile.py)."""
        wanted = [(f, c) for f, cols in columns.items() for c in ([cols] if isinstance(cols, str) else cols)]
        for f, _ in wanted:
            if f not in AGGREGATES:
                raise QueryError(f"agg: unknown aggregate {f!r}{suggest(f, list(AGGREGATES))}")
        if not wanted:
            raise QueryError("agg: name at least one aggregate, e.g. agg(mean=['area'])")
        q = self.query._pruned()
        q.objects.check_columns([c for _, c in wanted], "agg")
        names = [f"{f}_{c}" for f, c in wanted]
        casts = {n: t for (f, c), n in zip(wanted, names) if (t := _result_type(f, q.objects.column_types[c]))}
        parts = self._file_parts(q, wanted)
        frame = None
        if parts is not None:
            frame = _combined(parts, self.keys, wanted, names)
        elif not q.objects.is_cached and (scan := q._polars(ordered=False, needs=(*self.keys, *(c for _, c in wanted)))) is not None:
            exprs = [getattr(pl.col(c), f)().alias(n) for (f, c), n in zip(wanted, names)]
            frame = scan.group_by(list(self.keys)).agg(exprs).sort(list(self.keys), nulls_last=True)
        if frame is not None:
            return _arrow(q._collect(frame.with_columns(pl.col(n).cast(polars_type(t)) for n, t in casts.items())))
        sql_of = {"mean": "avg({})", "std": "stddev_samp({})", "var": "var_samp({})"}
        items = ", ".join(f"{_duck_cast(sql_of.get(f, f + '({})').format(quote(c)), casts.get(n))} AS {quote(n)}"
                          for (f, c), n in zip(wanted, names))
        keys = ", ".join(quote(k) for k in self.keys)
        return q._run(f"SELECT {keys}, {items} FROM ({replace(q, columns=None, order=(), limit_rows=q.limit_rows).to_sql()}) "
                      f"GROUP BY {keys} ORDER BY {keys} NULLS LAST", "to_arrow_table")

    def _file_parts(self, q: Query, wanted: list[tuple[str, str]]) -> list | None:
        """Each Parquet file's partial aggregates (`_PARTS`), where the keys are partition keys, so that a file
        holds one group: a file at a time, polars reads and reduces the files in parallel and never gathers
        their rows (1.6x faster than grouping 2M rows by image: benchmarks/bench_query.py --measured). None
        where the query's rule sends it to DuckDB, an aggregate does not combine (median, std, var), an
        annotation column is touched, or the rows come from a session cache."""
        if not set(self.keys) <= set(PARTITION_KEYS) or any(f not in _PARTS for f, _ in wanted) or \
                q.limit_rows is not None or q.objects.engine == "duckdb" or not all(_polars_reads(f, q.objects.column_types) for f in q.filters):
            return None
        names = q.objects.column_names
        needed = [*self.keys, *(c for _, c in wanted), *(n for f in q.filters for n in referenced(f, names))]
        files = q.objects.polars_file_frames([c for c in dict.fromkeys(needed) if c in names])
        if files is None:
            return None
        parts = sorted({(part, c) for f, c in wanted for part in _PARTS[f]})
        partial = [pl.len().alias(_ROWS), *(getattr(pl.col(c), part)().alias(f"{part}:{c}") for part, c in parts)]
        return [q._planned(frame, ordered=False).select(partial).with_columns(
                pl.lit(keys[k], pl.String).alias(k) for k in self.keys) for keys, frame in files]


def _result_type(aggregate: str, dtype: str) -> str | None:
    """The type an aggregate's values are cast to, so that both engines give the same table: counts int64, sums
    of whole numbers int64 (uint64 of unsigned ones; DuckDB's would be a 128-bit decimal); None: as computed."""
    if aggregate == "count":
        return "int64"
    if aggregate == "sum" and dtype.startswith(("int", "uint")):
        return "uint64" if dtype.startswith("uint") else "int64"
    return None


def _duck_cast(expr: str, dtype: str | None) -> str:
    return expr if dtype is None else f"CAST({expr} AS {duck_type(dtype)})"


# The aggregates that combine from each file's partial ones, and those partial ones (`Grouped._file_parts`).
_PARTS = {"count": ("count",), "sum": ("sum",), "mean": ("sum", "count"), "min": ("min",), "max": ("max",)}
_ROWS = "__cellar_rows"


def _combined(parts: list, keys: tuple[str, ...], wanted: list[tuple[str, str]], names: list[str]):
    """The groups' aggregates from the files' partial ones (`Grouped._file_parts`), sorted by the keys; a
    group whose files' rows were all filtered out is no group, as in a GROUP BY."""
    def total(part: str, c: str) -> pl.Expr:
        return {"count": pl.sum, "sum": pl.sum, "min": pl.min, "max": pl.max}[part](f"{part}:{c}")

    exprs = []
    for (f, c), n in zip(wanted, names):
        if f == "mean":
            exprs.append(pl.when(total("count", c) > 0).then(total("sum", c) / total("count", c)).alias(n))
        else:
            exprs.append(total(f, c).alias(n))
    frame = pl.concat(parts, how="vertical_relaxed").group_by(list(keys)).agg(pl.sum(_ROWS), *exprs)
    return frame.filter(pl.col(_ROWS) > 0).select(*keys, *names).sort(list(keys), nulls_last=True)


class Objects(Tables):
    """The objects of one or more cellar stores (`query.open`): the stores' views (`Tables`: `sql`, `fetch`,
    counts, columns) and the lazy API, each method of which starts a `Query` over every object.

    Example::

        objs = query.open("slide.cellar")
        objs.where("area_um2 > 80").within(100, 100, 600, 400).label_ids()
    """

    def query(self) -> Query:
        """A `Query` over every object (the same as starting with `where`, `select`, ...)."""
        return Query(self)

    def where(self, condition: str) -> Query:
        return Query(self).where(condition)

    def select(self, *columns: str) -> Query:
        return Query(self).select(*columns)

    def within(self, *args, **kwargs) -> Query:
        return Query(self).within(*args, **kwargs)

    def near(self, *args, **kwargs) -> Query:
        return Query(self).near(*args, **kwargs)

    def order_by(self, *columns: str, descending: bool = False) -> Query:
        return Query(self).order_by(*columns, descending=descending)

    def limit(self, n: int) -> Query:
        return Query(self).limit(n)

    def count(self) -> int:
        return Query(self).count()

    def label_ids(self) -> np.ndarray:
        return Query(self).label_ids()

    def label_id_series(self) -> polars.Series:
        return Query(self).label_id_series()

    def describe(self, column: str) -> dict[str, Any]:
        return Query(self).describe(column)

    def group_by(self, *keys: str) -> Grouped:
        return Query(self).group_by(*keys)

    def to_arrow(self) -> pyarrow.Table:
        return Query(self).to_arrow()

    def to_polars(self):
        return Query(self).to_polars()

    def to_pandas(self):
        return Query(self).to_pandas()

    def export(self, fmt: str, output: str, **options: Any) -> dict[str, Any]:
        return Query(self).export(fmt, output, **options)


def open(stores: str | Path | Sequence[str | Path], *, cache: bool | None = None,  # noqa: A001 - as duckdb/polars
         threads: int | None = None, engine: str = "auto") -> Objects:
    """Open one store, or several as one table (`image`/`label_image` columns tell them apart).

    `cache`: None (default) answers from the stores' on-disk session caches when every store has a fresh one
    (`cellar cache`), else from the Parquet files; False always reads the Parquet files; True holds the
    objects as one Arrow table for repeated queries (the mapped cache, or the store read into RAM; see
    `Objects.cache`). `threads` caps
    DuckDB's threads (default: one per core); `engine="duckdb"` runs every query in DuckDB (by default plain
    queries on the files run on polars' Parquet scan; see `Query._polars`).
    """
    if isinstance(stores, (str, Path)):
        stores = [stores]
    if not stores:
        raise QueryError("query.open needs at least one store")
    return Objects([Path(s) for s in stores], cache=cache, threads=threads, engine=engine)

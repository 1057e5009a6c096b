"""The viewer's SQL sandbox: filter conditions typed in a web page run here, and nowhere else.

A `Sandbox` is a DuckDB database of its own that holds no tables and can reach nothing outside itself:

- external access is switched off before any query (`enable_external_access = false`: no file or network
  reads or writes, so no `COPY`, no `ATTACH` of a file, no `read_csv` / `read_parquet` / `read_text` /
  `glob`, no `INSTALL`), extensions are neither installed nor loaded automatically, and the configuration is
  then locked (`lock_configuration = true`), so no statement can switch any of it back on;
- the objects are an Arrow table registered on a fresh cursor for each query (DuckDB scans that memory in
  place), under the name `objects`, as in `cellar sql`;
- a condition is accepted only if DuckDB's parser reads it as one expression (so `;`-chained statements and
  text that closes the WHERE clause's parenthesis are refused before anything runs), and only the SELECT
  statements this module writes around it are ever executed: DDL, `SET`, `PRAGMA` and the rest never reach
  the engine;
- every query is interrupted after `timeout_s` seconds, the database has a memory limit, and queries that
  return rows to a client return at most `max_rows`.

Refusals raise `Refused` (HTTP 403 in the server); conditions that do not parse or bind raise `QueryError`
(HTTP 400), worded as the rest of cellar words them (unknown columns come with the closest known names).
"""

from __future__ import annotations

import re
import threading
from collections.abc import Callable, Sequence

import duckdb
import numpy as np
import pyarrow as pa

from ..query.sql import quote
from ..query.store import one_line
from ..schemas.errors import QueryError

ROW = "__row"  # the registered table's row number, by which results are mapped back to objects
MAX_CONDITION_CHARS = 10_000
_SETTINGS = (  # in this order: the last one locks the rest
    "SET autoinstall_known_extensions = false",
    "SET autoload_known_extensions = false",
    "SET allow_community_extensions = false",
    "SET enable_external_access = false",
    "SET lock_configuration = true",
)


class Refused(QueryError):
    """A condition asks for something the viewer's read-only SQL does not do (files, DDL, extensions...)."""


class Sandbox:
    """Read-only SQL over one Arrow table (see the module docstring).

    `table` gets a `__row` column (its row numbers); `explain` words DuckDB's errors (for example
    `Objects.explain`, which names the closest columns to an unknown one).
    """

    def __init__(self, table: pa.Table, *, timeout_s: float = 5.0, max_rows: int = 500, memory_limit: str = "2GB",
                 threads: int = 2, explain: Callable[[Exception], str] = one_line):
        self.table = table.append_column(ROW, pa.array(np.arange(table.num_rows, dtype=np.int64)))
        self.timeout_s = float(timeout_s)
        self.max_rows = int(max_rows)
        self._explain = explain
        self._db = duckdb.connect(":memory:", config={"threads": threads, "memory_limit": memory_limit})
        self._db_lock = threading.Lock()  # the connection serves one thread at a time, if only to make cursors
        for statement in _SETTINGS:
            self._db.execute(statement)

    # -- conditions ------------------------------------------------------------------------------------
    def check(self, condition: str | None) -> str | None:
        """The condition, stripped, if DuckDB reads it as one expression (None for an empty one); raises
        `Refused` or `QueryError` otherwise. Names and types are checked when it runs."""
        if condition is None or not condition.strip():
            return None
        condition = condition.strip()
        if len(condition) > MAX_CONDITION_CHARS:
            raise QueryError(f"the condition has {len(condition):,} characters; at most {MAX_CONDITION_CHARS:,}")
        statement = _statement_kind(condition)
        if statement == "SELECT":
            raise QueryError("the filter takes a condition (what follows WHERE, such as \"area > 80\"), not a whole "
                             "SELECT statement")
        if statement is not None:
            raise Refused(f"refused: {statement} statement; the filter takes one condition (a SQL WHERE clause such "
                          "as \"area > 80\"), and the viewer's SQL is read-only")
        try:
            duckdb.SQLExpression(condition)
        except duckdb.Error as exc:
            text = one_line(exc)
            if "more than one statement" in text or _outside_strings(condition, ";"):
                raise Refused("refused: ';' separates statements; the filter takes one condition "
                              "(a SQL WHERE clause)") from None
            raise QueryError(f"not a SQL condition: {text.removeprefix('Parser Error: ')}") from None
        kinds = [s.type.name for s in duckdb.extract_statements(self._select(condition, ROW))]
        if kinds != ["SELECT"]:  # cannot happen for one expression; kept as the invariant the rest relies on
            raise Refused(f"refused: the condition makes {kinds} statements, not one SELECT")
        return condition

    def rows(self, condition: str | None) -> np.ndarray:
        """Row numbers (ascending, int64) of the rows for which the condition holds (all rows for None)."""
        condition = self.check(condition)
        if condition is None:
            return np.arange(self.table.num_rows, dtype=np.int64)
        result = self._run(self._select(condition, ROW), "fetchnumpy")[ROW]
        return np.sort(np.asarray(result, np.int64))

    def page(self, condition: str | None, *, order: Sequence[tuple[str, bool]] = (), limit: int = 50,
             offset: int = 0) -> pa.Table:
        """At most `max_rows` matching rows (every column, with `__row`) in `order` ((column, descending)
        pairs, NULLs last; the caller checks the names), from `offset`."""
        condition = self.check(condition)
        if not 0 <= limit <= self.max_rows:
            raise QueryError(f"limit {limit}: expected 0 to {self.max_rows} rows (the viewer's row limit)")
        if offset < 0:
            raise QueryError(f"offset {offset}: expected a number >= 0")
        keys = [f"{quote(c)} {'DESC' if d else 'ASC'} NULLS LAST" for c, d in order] + [ROW]
        sql = f"{self._select(condition, '*')} ORDER BY {', '.join(keys)} LIMIT {int(limit)} OFFSET {int(offset)}"
        return self._run(sql, "to_arrow_table")

    # -- running ---------------------------------------------------------------------------------------
    @staticmethod
    def _select(condition: str | None, columns: str) -> str:
        return f"SELECT {columns} FROM objects" + (f" WHERE ({condition})" if condition else "")

    def _run(self, sql: str, how: str):
        """Run one of this module's SELECTs on a fresh cursor (the table registered on it), interrupted after
        the time limit."""
        with self._db_lock:
            cursor = self._db.cursor()
        stopped = threading.Event()

        def stop() -> None:
            stopped.set()
            cursor.interrupt()

        timer = threading.Timer(self.timeout_s, stop)
        try:
            cursor.register("objects", self.table)
            timer.start()
            return getattr(cursor.sql(sql), how)()
        except duckdb.InterruptException:
            raise QueryError(f"the query was stopped after {self.timeout_s:g} s (the viewer's time limit); "
                             "simplify the condition") from None
        except duckdb.PermissionException as exc:
            raise Refused(f"refused: {one_line(exc).removeprefix('Permission Error: ')} (the viewer's SQL reads "
                          "only the objects in memory: no files, no extensions)") from None
        except duckdb.Error as exc:
            if stopped.is_set():
                raise QueryError(f"the query was stopped after {self.timeout_s:g} s (the viewer's time limit)") from None
            raise QueryError(_short(self._explain(exc))) from None
        finally:
            timer.cancel()
            cursor.close()


def _statement_kind(text: str) -> str | None:
    """The statement type if `text` parses as one whole statement (COPY, ATTACH, CREATE, ...), else None."""
    try:
        statements = duckdb.extract_statements(text)
    except duckdb.Error:
        return None
    if not statements:
        return None
    kinds = [s.type.name for s in statements]
    others = [k for k in kinds if k != "SELECT"]
    return others[0] if others else "SELECT"


def _short(text: str, limit: int = 300) -> str:
    """DuckDB's message without its list of candidate functions, at most `limit` characters."""
    text = text.split(" Candidate functions:")[0]
    return text if len(text) <= limit else text[: limit - 1] + "…"


_STRING_OR_QUOTED = re.compile(r"'(?:[^']|'')*'|\"(?:[^\"]|\"\")*\"")


def _outside_strings(text: str, char: str) -> bool:
    return char in _STRING_OR_QUOTED.sub("", text)

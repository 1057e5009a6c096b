"""Open one or more cellar stores as DuckDB views.

Views:
- `objects`: one row per object, all stores and tables as one table, with `image` and `label_image` columns
  (Hive partition keys); tables with different channels are unioned by column name.
- `channels`: the per-channel columns in long form, one row per (object, channel):
  `image, label_image, label_id, channel, intensity_sum, intensity_mean, ...`.
- `columns`: every column's name, dtype, unit and description, per image and label image.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import duckdb

from schemas import store as layout
from schemas.errors import QueryError

_CHANNEL_SEP = "__"


def _quote(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def _literal(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"


class Objects:
    """A set of cellar stores opened for querying; `sql()` returns lazy DuckDB relations.

    Example::

        objs = query.open("slide.cellar")
        objs.sql("SELECT label_id, area FROM objects WHERE area > 80").pl()
    """

    def __init__(self, stores: Sequence[Path]):
        self.stores = tuple(stores)
        self.manifests = [layout.read_manifest(s) for s in self.stores]
        self.tables = [(s, t) for s, m in zip(self.stores, self.manifests) for t in m.get("tables", [])]
        self.con = duckdb.connect(":memory:")
        self._create_views()

    def _files(self) -> list[str]:
        files = []
        for store, table in self.tables:
            for name in table["files"]:
                path = store / table["dir"] / name
                if not path.is_file():
                    raise QueryError(f"{store}: manifest lists {table['dir']}/{name}, which is missing")
                files.append(str(path.resolve()))
        return files

    def _create_views(self) -> None:
        files = self._files()
        if files:
            listing = ", ".join(_literal(f) for f in files)
            source = (
                f"read_parquet([{listing}], hive_partitioning = true, union_by_name = true, "
                "hive_types = {'image': VARCHAR, 'label_image': VARCHAR})"
            )
            select_objects = f"SELECT * FROM {source}"
        else:  # an empty store still answers, with the key columns
            select_objects = "SELECT NULL::VARCHAR AS image, NULL::VARCHAR AS label_image, NULL::UBIGINT AS label_id WHERE false"
        self.con.execute(f"CREATE VIEW objects AS {select_objects}")
        self.con.execute(f"CREATE VIEW channels AS {self._channels_sql()}")
        self.con.execute(f"CREATE VIEW columns AS {self._columns_sql()}")

    def _channels_sql(self) -> str:
        per_channel: dict[str, list[str]] = {}  # channel column suffix -> feature names present
        names: dict[str, str] = {}  # suffix -> channel name
        for _, table in self.tables:
            cols = [c["name"] for c in table.get("columns", [])]
            for ch in table.get("channels", []):
                suffix = _CHANNEL_SEP + ch["column"]
                names[ch["column"]] = ch["name"]
                feats = per_channel.setdefault(ch["column"], [])
                feats.extend(c[: -len(suffix)] for c in cols if c.endswith(suffix) and c[: -len(suffix)] not in feats)
        features: list[str] = []
        for feats in per_channel.values():
            features.extend(f for f in feats if f not in features)
        if not per_channel:
            return ("SELECT NULL::VARCHAR AS image, NULL::VARCHAR AS label_image, NULL::UBIGINT AS label_id, "
                    "NULL::VARCHAR AS channel WHERE false")
        parts = []
        for col, feats in per_channel.items():
            values = ", ".join(
                (f"{_quote(f + _CHANNEL_SEP + col)}" if f in feats else "NULL::DOUBLE") + f" AS {_quote(f)}"
                for f in features
            )
            present = " OR ".join(f"{_quote(f + _CHANNEL_SEP + col)} IS NOT NULL" for f in feats)
            parts.append(
                f"SELECT image, label_image, label_id, {_literal(names[col])} AS channel, {values} "
                f"FROM objects WHERE {present}"
            )
        return " UNION ALL ".join(parts)

    def _columns_sql(self) -> str:
        rows = []
        for _, table in self.tables:
            for c in table.get("columns", []):
                rows.append("(" + ", ".join(_literal(str(v)) for v in (
                    table["image"], table["label_image"], c["name"], c["dtype"], c["unit"], c["description"])) + ")")
        if not rows:
            return ("SELECT NULL::VARCHAR AS image, NULL::VARCHAR AS label_image, NULL::VARCHAR AS name, "
                    "NULL::VARCHAR AS dtype, NULL::VARCHAR AS unit, NULL::VARCHAR AS description WHERE false")
        return ("SELECT * FROM (VALUES " + ", ".join(rows) + ") AS t(image, label_image, name, dtype, unit, description)")

    def sql(self, query: str) -> duckdb.DuckDBPyRelation:
        """Run SQL over the views; returns a DuckDB relation (`.arrow()`, `.pl()`, `.df()`, `.fetchall()`)."""
        try:
            return self.con.sql(query)
        except duckdb.Error as exc:
            raise QueryError(one_line(exc)) from None

    def __len__(self) -> int:
        return sum(int(t.get("n_objects", 0)) for _, t in self.tables)

    def __repr__(self) -> str:
        stores = ", ".join(str(s) for s in self.stores)
        return f"<cellar.Objects {stores}: {len(self.tables)} tables, {len(self)} objects>"


def one_line(exc: Exception) -> str:
    """DuckDB's message on one line: its text without the LINE/caret drawing."""
    lines = [ln.strip() for ln in str(exc).splitlines()]
    keep = []
    for ln in lines:
        if ln.startswith("LINE ") or set(ln) <= {"^", " "}:
            break
        if ln:
            keep.append(ln)
    return " ".join(keep) or type(exc).__name__


def open(stores: str | Path | Sequence[str | Path]) -> Objects:  # noqa: A001 - mirrors duckdb/polars naming
    """Open one store, or several as one table (`image`/`label_image` columns tell them apart)."""
    if isinstance(stores, (str, Path)):
        stores = [stores]
    if not stores:
        raise QueryError("query.open needs at least one store")
    return Objects([Path(s) for s in stores])

"""One or more cellar stores as DuckDB views (`Tables`); the lazy query API (`query.api`: `Objects`, `Query`)
is built on it.

Views:
- `objects`: one row per object, all stores and tables as one table, with `image` and `label_image` columns
  (Hive partition keys); tables with different channels are unioned by column name.
- `channels`: the per-channel columns in long form, one row per (object, channel):
  `image, label_image, label_id, channel, intensity_sum, intensity_mean, ...` (made by `Tables.sql` when a
  statement first names it).
- `columns`: every column's name, dtype, unit and description, per image and label image.

A store of many tables (a cohort) opens without reading its tables' entries or files: the state comes from
its log's last checkpoint (`schemas.log`), and a query whose filters name images or label images
(`image = 's03'`, `label_image IN (...)`) runs on those tables alone (`Tables.narrow`), before any file is
opened; counting comes from the log's object counts.

Where the objects are read from is the `Tables`' backend (`query.backends`): by default the Parquet files
(`ParquetFiles`, cold: only the row groups and columns a query needs), or, when the store has a fresh on-disk
session cache (`cellar cache`, see `query.hotcache`), its memory-mapped Arrow file (`MappedCache`). With
`cache=True` the objects are held as one Arrow table (the mapped cache file, or else the store read once into
RAM: `InRam`) and DuckDB and polars scan it in place (no copy): the session cache for viewers and notebooks
that filter the same store again and again. A narrowed `Tables` always reads the Parquet files.
"""

from __future__ import annotations

import io
import itertools
import re
import sys
import threading
import uuid
import weakref
from collections import OrderedDict
from collections.abc import Sequence
from functools import cached_property
from pathlib import Path
from typing import Any, Self

from . import hotcache
from .backends import ROW_COLUMN, Backend, InRam, MappedCache, ParquetFiles
from .sql import MISSING_COLUMN, literal, may_read, quote, suggest
from ..schemas import integrity, lazy, log, rowfile
from ..schemas import store as layout
from ..schemas.errors import CellarError, QueryError, StoreError

duckdb = lazy.module("duckdb")
np = lazy.module("numpy")
pa = lazy.module("pyarrow")
pl = lazy.module("polars")

_CHANNEL_SEP = "__"
_PARTITION_KEYS = ("image", "label_image")
_LAZY_VIEWS = {name: re.compile(rf"\b{name}\b", re.IGNORECASE) for name in ("channels", "columns", "annotations")}
_VIEW_NAMES = frozenset({"objects", *_LAZY_VIEWS})  # every view a statement may name (`sql.may_read`)
CACHED_VIEW = "objects_cached"  # the session cache, with its row numbers (`backends.ROW_COLUMN`)
NARROWED_KEPT = 64  # the narrowed Objects (each with its DuckDB schema) an Objects keeps for reuse, newest first


class Tables:
    """A set of cellar stores opened for querying; `sql()` returns lazy DuckDB relations. `query.api.Objects`
    adds the lazy Python API (`where`, `select`, ...), and is what `query.open` returns.

    Example::

        objs = query.open("slide.cellar")
        objs.sql("SELECT label_id, area FROM objects WHERE area > 80").pl()
    """

    def __init__(self, stores: Sequence[Path], cache: bool | None = None, threads: int | None = None,
                 engine: str = "auto", *, snapshots: Sequence[log.Snapshot] | None = None,
                 keys: list[tuple[int, tuple[str, str]]] | None = None, shape: dict[str, str] | None = None):
        if engine not in ("auto", "duckdb"):
            raise QueryError(f"engine={engine!r}; expected 'auto' or 'duckdb'")
        self.engine = engine
        self.stores = tuple(stores)
        # the log's checkpoints are read by an engine the process has: DuckDB for engine="duckdb" (`DuckColumns`:
        # `cellar sql` loads neither pyarrow nor numpy unless a result needs them), else pyarrow where it is
        # loaded (a checkpoint in 1 ms: the API answers in Arrow), else polars (`PolarsColumns`: `cellar filter`
        # loads neither pyarrow nor DuckDB; its first call costs 3-5 ms). The readers agree (tests).
        reader = DuckColumns if engine == "duckdb" else log.ArrowColumns if "pyarrow" in sys.modules else PolarsColumns
        self.snapshots = list(snapshots) if snapshots is not None else [log.snapshot(s, reader) for s in self.stores]
        # the tables this Objects covers, as (store index, (image, label image)): all (listed on first use of
        # `_keys`: the snapshots answer for them), or those `narrow` chose
        if keys is not None:
            self._keys = keys
        self._whole = keys is None
        self._narrowed: OrderedDict[tuple, Self] = OrderedDict()  # by (images, label images), see `narrow`
        # a narrowed Objects answers with every column of the Objects it was narrowed from (name -> dtype), so
        # that pruning never changes a result: the columns its tables lack are NULL, as in the union by name
        self._shape = shape
        self._threads = threads
        # DuckDB: a connection serves one thread at a time. The views live in a schema of the database (made
        # once, on `_base`); every thread queries through a connection of its own (`con`), which registers the
        # Arrow tables in `_registered` (registrations belong to a connection, the views to the database).
        self._base: duckdb.DuckDBPyConnection | None = None
        self._schema_name = ""
        self._schema: _Schema | None = None  # None for a private database
        self._local = threading.local()
        self._connections: list[duckdb.DuckDBPyConnection] = []
        self._registered: dict[str, pa.Table] = {}
        self._registrations = 0  # bumped on every change of `_registered`
        self._lock = threading.RLock()
        self._closed = False
        self._lazy_views: set[str] = set()  # `channels`, `columns`, `annotations`: made on first mention (`sql`)
        self._joined = False  # whether `objects` has the annotations joined (`con_for`)
        self._backend: Backend = ParquetFiles(self._parquet_frame, self.annotation_only_columns)  # see `backend`
        if cache is not False and self.n_tables and keys is None:
            found = [hotcache.find(s, snap) for s, snap in zip(self.stores, self.snapshots) if len(snap)]
            if all(found):
                self._backend = MappedCache(hotcache.Mapped(found))
        if cache:
            self.cache()

    # -- the tables ----------------------------------------------------------------------------------------
    @cached_property
    def _keys(self) -> list[tuple[int, tuple[str, str]]]:
        """Every table of the snapshots (a narrowed Objects is given its own)."""
        return [(i, key) for i, snap in enumerate(self.snapshots) for key in snap.keys]

    @cached_property
    def tables(self) -> list[tuple[Path, dict]]:
        """(store, entry) of every table this Objects covers, each entry with its `columns` (the entries are
        parsed on first use of this list: the query paths use `_groups` and the snapshots instead)."""
        if self._whole:
            found = ((i, entry) for i, snap in enumerate(self.snapshots) for entry in snap.entries())
        else:
            found = ((i, self.snapshots[i].entry(*key)) for i, key in self._keys)
        return [(self.stores[i], {**entry, "columns": self._specs(i, entry["columns_id"])}) for i, entry in found]

    @property
    def n_tables(self) -> int:
        """How many tables this Objects covers."""
        return sum(len(snap) for snap in self.snapshots) if self._whole else len(self._keys)

    def _specs(self, i: int, columns_id: str) -> list[dict]:
        """A column list of store `i` (read once per Objects; shared, not to be changed)."""
        cache = self.__dict__.setdefault("_spec_cache", {})
        if (i, columns_id) not in cache:
            cache[(i, columns_id)] = log.read_columns(self.stores[i], columns_id)
        return cache[(i, columns_id)]

    @cached_property
    def _groups(self) -> dict[tuple[int, str], list[tuple[str, str]]]:
        """The covered tables by column list: {(store index, columns_id): [keys]}. Tables measured the same way
        share one, so a cohort has a few groups however many tables it has."""
        groups: dict[tuple[int, str], list[tuple[str, str]]] = {}
        if self._whole:
            found = ((i, key, columns_id) for i, snap in enumerate(self.snapshots)
                     for key, columns_id in zip(snap.keys, snap.columns_id_list()))
        else:
            found = ((i, key, self.snapshots[i].columns_id(*key)) for i, key in self._keys)
        for i, key, columns_id in found:
            groups.setdefault((i, columns_id), []).append(key)
        return groups

    @cached_property
    def _group_ids(self) -> list[tuple[int, str]]:
        """The (store index, columns_id) of the covered tables' column lists, in order of first use."""
        if self._whole:
            return [(i, columns_id) for i, snap in enumerate(self.snapshots) for columns_id in snap.distinct_columns_ids()]
        return list(self._groups)

    def _annotated(self) -> list[tuple[int, tuple[str, str], list[dict]]]:
        """(store index, key, annotation versions) of the covered tables that have annotations."""
        if self._whole:
            keys = [(i, key) for i, snap in enumerate(self.snapshots) for key in snap.annotated]
        else:
            keys = self._keys
        found = ((i, key, self.snapshots[i].annotations(*key)) for i, key in keys)
        return [(i, key, versions) for i, key, versions in found if versions]

    def narrow(self, images: set[str] | None = None, label_images: set[str] | None = None) -> Self:
        """These objects restricted to the tables of these images and label images (None: any), sharing the
        stores' state: partition pruning before any file is opened. With the session cache, or when every
        table matches, this Objects itself. No match gives the first table of each column list (a query's own
        filters then leave no rows, with the columns they would have)."""
        self._check_open()
        if self.is_cached:
            return self
        wanted = (frozenset(images) if images is not None else None,
                  frozenset(label_images) if label_images is not None else None)
        with self._lock:
            hit = self._narrowed.get(wanted)
            if hit is not None:
                self._narrowed.move_to_end(wanted)
                return hit
        keys = self._select(images, label_images)
        if not keys:
            keys = [(i, members[0]) for (i, _), members in self._groups.items()]
        if len(keys) == self.n_tables:
            return self
        narrowed = type(self)(self.stores, cache=False, threads=self._threads, engine=self.engine,
                           snapshots=self.snapshots, keys=keys, shape=self.column_types)
        with self._lock:  # a query that still holds an evicted one keeps it alive until it is done
            narrowed = self._narrowed.setdefault(wanted, narrowed)
            while len(self._narrowed) > NARROWED_KEPT:
                self._narrowed.popitem(last=False)
            return narrowed

    def count_from_log(self, images: set[str] | None = None, label_images: set[str] | None = None) -> int:
        """The number of objects in the covered tables (of these images and label images; None: any), as the
        log records it: no file is read."""
        self._check_open()
        if self._whole and images is None and label_images is None:
            return sum(snap.total_objects for snap in self.snapshots)
        return sum(self.snapshots[i].n_objects(*k) for i, k in self._select(images, label_images))

    def keys_matching(self, images: set[str] | None, label_images: set[str] | None) -> list[tuple[int, tuple[str, str]]]:
        """The covered tables whose rows have these images and label images (None: any), from the log."""
        return self._select(images, label_images)

    def _select(self, images: set[str] | None, label_images: set[str] | None) -> list[tuple[int, tuple[str, str]]]:
        """The covered tables whose rows have these images and label images (None: any), as queries see them:
        an image is named by its partition value in the log (`schemas.store.entry_problem`), a label image by
        the Hive partition value of its name. With the images given, found by the snapshots' index."""
        if images is not None and self._whole:
            candidates = [(i, key) for i, snap in enumerate(self.snapshots) for key in snap.keys_of(images)]
        else:
            candidates = [(i, key) for i, key in self._keys if images is None or key[0] in images]
        if label_images is None:
            return candidates
        seen: dict[str, str] = {}  # label images: a few names, many tables
        for _, (_, label) in candidates:
            if label not in seen:
                seen[label] = layout.partition_value(label)
        return [(i, key) for i, key in candidates if seen[key[1]] in label_images]

    @property
    def backend(self) -> Backend:
        """Where the objects are read from (`query.backends`): the Parquet files (`ParquetFiles`), the session
        cache in RAM (`InRam`) or the memory-mapped on-disk cache (`MappedCache`)."""
        return self._backend

    @property
    def cached(self) -> pa.Table | None:
        """The session cache as one Arrow table (None without one): in RAM, or over the mapped files."""
        return self._backend.table

    @property
    def is_cached(self) -> bool:
        return self._backend.session_cache

    @property
    def mapped(self) -> list[Path]:
        """The on-disk session cache files in use (empty if none)."""
        return self._backend.paths

    @property
    def con(self) -> duckdb.DuckDBPyConnection:
        """The calling thread's DuckDB connection with the views (the `channels` view once `sql` has met it),
        made on first use (plain queries on the files may run on polars without it; see `polars_frame`).

        Each thread gets a connection of its own to the same database, so threads (a web server's requests,
        say) query one Objects at the same time; a relation from `sql` belongs to the thread that made it."""
        self._check_open()
        local = self._local
        con = getattr(local, "con", None)
        if con is None:
            with self._lock:
                if self._base is None:
                    self._base, self._schema_name, self._schema = _connection(self._threads)
                    self._create_views(self._base)
                con = self._base.cursor()  # a new connection to the same database
                self._connections.append(con)
                if self._schema is not None:
                    self._schema.attach(con)
            con.execute(f"SET search_path = '{self._schema_name}'")
            local.con, local.registrations = con, -1
        if local.registrations != self._registrations:
            with self._lock:
                registered, version = list(self._registered.items()), self._registrations
            for name, table in registered:
                con.register(name, table)
            local.registrations = version
        return con

    def _register(self, name: str, table: pa.Table) -> None:
        """Register an Arrow table under `name` on every thread's connection (each does on its next use)."""
        with self._lock:
            self._registered[name] = table
            self._registrations += 1

    def polars_frame(self, columns: Sequence[str] | None = None, ranges: Sequence[tuple[str, float, float]] = (),
                     located: bool = False, inner: bool = False):
        """A polars LazyFrame of the objects without DuckDB, from the backend (`backends.Backend.frame`): over the
        session cache (zero-copy, with its row-number column ROW_COLUMN) or over the tables' Parquet files;
        None for annotated files (DuckDB joins those) and without tables.

        `columns` (None: all) are the columns the query will touch: the mapped cache materialises only those.
        `ranges` ((column, lo, hi), a box) let a session cache skip the blocks whose statistics rule them out.
        `located`: with the rows' numbers across the Parquet files (None for a session cache); `inner`: the
        query keeps only annotated objects (a filter on an annotation column rejects NULLs), so the Parquet
        files' annotations may join as an inner join, which polars runs faster than a left one.
        """
        self._check_open()
        if isinstance(self._backend, ParquetFiles):
            return self._backend.frame(columns, ranges, located=located, inner=inner)
        return None if located else self._backend.frame(columns, ranges)

    def _parquet_frame(self, annotated: bool, located: bool = False, inner: bool = False):
        """polars' scan of the covered tables' Parquet files (their footers read now, see `_scan`), with the
        partition keys as columns, for the `ParquetFiles` backend: with the latest annotation version of each
        table joined by label id (`annotated`), or without the annotations' columns; None without tables.
        `located`: with each row's number across the files in `row_files`' order (ROW_COLUMN)."""
        if not self.n_tables:
            return None
        files = [(store, table, name) for store, table in self.tables for name in table["files"]]
        frames = self._scans(files, located)
        frame = frames[0] if len(frames) == 1 else pl.concat(frames, how="diagonal_relaxed")
        if annotated:
            # rows in the files' order for a left join; an inner join's (filtered) rows in polars' order, as in
            # SQL without ORDER BY (keeping the left order cost it 20%)
            frame = frame.join(self._annotation_frame(), on=list(integrity.OBJECT_KEYS), how="inner" if inner else "left",
                               maintain_order="none" if inner else "left")
        shape = self._reshaped()
        if shape is not None:
            # every column of the store (see `narrow`), in `column_types`' order; without the annotations,
            # every column but theirs (one column list, not narrowed: the scan has them in that order)
            shape = {n: t for n, t in shape.items() if annotated or n not in self.annotation_only_columns()}
            # the frame's columns, from the log (asking polars would read the footers again): every column
            # list's, the keys, the annotations' where joined
            have = {c["name"] for i, columns_id in self._group_ids for c in self._specs(i, columns_id)}
            have |= set(integrity.PARTITION_KEYS) | (self.annotation_only_columns() if annotated else set())
            frame = frame.select([pl.col(n) if n in have else pl.lit(None, polars_type(t)).alias(n)
                                  for n, t in shape.items()] + ([pl.col(ROW_COLUMN)] if located else []))
        return frame

    def polars_file_frames(self, columns: Sequence[str]) -> list[tuple[dict[str, str], Any]] | None:
        """(partition keys, polars scan) of every Parquet file, the scan with `columns` (the store's, NULL where
        a table lacks one; the partition keys as literals), for aggregates computed a file at a time; None where
        the backend is not the Parquet files, or `columns` name an annotation (the annotated scan of
        `_parquet_frame` joins those)."""
        self._check_open()
        if not isinstance(self._backend, ParquetFiles) or not self.n_tables or \
                not self.annotation_only_columns().isdisjoint(columns):
            return None
        types = self.column_types
        frames = []
        for store, table in self.tables:
            have = {c["name"] for c in table["columns"]}
            keys = {key: layout.partition_value(table[key]) for key in integrity.PARTITION_KEYS}
            for name in table["files"]:
                frame = _scan(store, [f"{table['dir']}/{name}"], table["columns"], trust_log=True)
                frames.append((keys, frame.select([
                    pl.lit(keys[n], pl.String).alias(n) if n in keys else pl.col(n) if n in have else
                    pl.lit(None, polars_type(types[n])).alias(n) for n in columns])))
        return frames

    def _scans(self, files: list[tuple[Path, dict, str]], located: bool) -> list:
        """polars' scans of these Parquet files, in their order, with `image` and `label_image` columns (and the
        rows' numbers across all of them, ROW_COLUMN, where `located`): one scan of many files per store and
        column list, its partition keys read from the Hive paths, as polars scans a dataset. A store whose path
        holds a `=` (polars would read it as a key too) is scanned a file at a time, each footer read and
        checked against the log first (`_scan`). The files of one scan are checked when it fails
        (`polars_error`): polars names a file with columns the others lack, and a missing column is found then.
        """
        starts = list(itertools.accumulate((rf.n_rows for rf, _, _ in self.row_files), initial=0)) if located else None
        frames, k = [], 0
        while k < len(files):
            store, table, _ = files[k]
            j = k
            while j < len(files) and files[j][0] == store and files[j][1]["columns_id"] == table["columns_id"]:
                j += 1
            row_index = {"row_index_name": ROW_COLUMN, "row_index_offset": int(starts[k])} if located else {}
            if "=" in str(store):
                for i in range(k, j):
                    _, t, name = files[i]
                    index = {"row_index_name": ROW_COLUMN, "row_index_offset": int(starts[i])} if located else None
                    frames.append(_scan(store, [f"{t['dir']}/{name}"], t["columns"], index).with_columns(
                        image=pl.lit(layout.partition_value(t["image"])),
                        label_image=pl.lit(layout.partition_value(t["label_image"]))))
            else:
                rels = [f"{t['dir']}/{name}" for _, t, name in files[k:j]]
                frames.append(_scan(store, rels, table["columns"], row_index, hive=True, trust_log=True))
            k = j
        return frames

    @cached_property
    def row_files(self) -> list[tuple[rowfile.RowFile, str, str]] | None:
        """(row file, image, label image) of every covered Parquet file, in the scans' order (`schemas.rowfile`:
        whole rows of scattered objects, and the tables' spatial index); None where a file has none (tables
        written by cellar before 0.9, or with columns that are not all numbers) or the covered tables have
        several column lists: the Parquet files answer then."""
        if not self.n_tables or len(self._group_ids) != 1:
            return None
        found = []
        for store, table in self.tables:
            for name in table["files"]:
                rel = f"{table['dir']}/{rowfile.path_of(name)}"
                if not (store / rel).is_file():
                    return None
                rows = table["n_objects"] if len(table["files"]) == 1 else None
                found.append((rowfile.RowFile(store / rel, f"{store}: {rel}", rows),
                              layout.partition_value(table["image"]), layout.partition_value(table["label_image"])))
        return found

    def _annotation_frame(self):
        """polars' scan of the latest annotation version of every annotated table, with the partition keys: one
        scan per store (keys from the Hive paths), or a file at a time where the store's path holds a `=`."""
        latest: dict[int, list[tuple[tuple[str, str], str]]] = {}
        listed: dict[int, list[dict]] = {}  # a store's annotation columns, where all its versions list the same
        for i, key, versions in self._annotated():
            last = max(versions, key=lambda v: v["version"])
            latest.setdefault(i, []).extend((key, f"{last['dir']}/{name}") for name in last["files"])
            columns = [{"name": "label_id", "dtype": "uint64"}, *last["columns"]]
            listed[i] = columns if listed.get(i, columns) == columns else []
        frames = []
        for i, found in latest.items():
            store = self.stores[i]
            if "=" in str(store):
                frames.extend(pl.scan_parquet(integrity.parquet_file(store, rel)).with_columns(
                    image=pl.lit(layout.partition_value(key[0])), label_image=pl.lit(layout.partition_value(key[1])))
                    for key, rel in found)
            else:
                # with the columns the log lists where it lists one set, and then no file opened before the query
                # runs, as for the objects (`_scan`; a failed query checks them: `polars_error`)
                schema = _polars_schema(listed[i]) if listed[i] else None
                paths = [store / rel if schema is not None else integrity.parquet_file(store, rel) for _, rel in found]
                frames.append(pl.scan_parquet(paths, hive_partitioning=True, schema=schema,
                                              hive_schema={**_HIVE_SCHEMA(), "version": pl.Int64}).drop("version"))
        return frames[0] if len(frames) == 1 else pl.concat(frames, how="diagonal_relaxed")

    def annotation_only_columns(self) -> set[str]:
        """The columns only the annotations have (none without annotations)."""
        found = self.__dict__.get("_annotation_only")
        if found is None:
            measured = {c["name"] for i, columns_id in self._group_ids for c in self._specs(i, columns_id)}
            found = self._annotation_only = {c["name"] for _, c in self._annotation_specs} - measured - set(integrity.OBJECT_KEYS)
        return found

    def cache(self) -> Self:
        """Hold the objects as one Arrow table and answer from there from now on: the store's on-disk cache
        if it is fresh (mapped, see `query.hotcache`), else the store read once into RAM (`backends.InRam`)."""
        if self.is_cached or not self.n_tables:  # mapped files answer as fast: their pages stay in memory
            return self
        # DuckDB reads the Parquet files (all threads) straight into Arrow, annotations joined.
        try:
            table = self.con_for("SELECT *").sql("SELECT * FROM objects").to_arrow_table()
        except duckdb.Error as exc:  # a Parquet file whose data do not decode
            raise self.error(exc) from None
        self._backend.close()
        self._backend = InRam(table)
        self._register_cached()
        return self

    def close(self) -> None:
        """Release the session cache, the mapped files and the DuckDB views now; later queries raise an error.

        Dropping the last reference does the same, but pyarrow's allocator keeps freed pages resident: a store
        cached in RAM and then forgotten could leave gigabytes to the process. `close` hands them back to the
        operating system. `with query.open(store, cache=True) as objs:` closes on leaving the block.
        """
        with self._lock:
            for narrowed in self._narrowed.values():
                narrowed.close()
            self._narrowed.clear()
            for con in [*self._connections, *([self._base] if self._base is not None else [])]:
                con.close()
            self._connections, self._base, self._registered = [], None, {}
            self._local = threading.local()
            self._lazy_views = set()
        self._backend.close()
        self.__dict__.pop("schema", None)
        self._closed = True
        pa.default_memory_pool().release_unused()

    def _check_open(self) -> None:
        if self._closed:
            raise QueryError(f"{', '.join(map(str, self.stores))}: closed; open the store again to query it")

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def take(self, rows: np.ndarray, columns: Sequence[str] | None = None) -> pa.Table:
        """Whole rows of the session cache (these columns, all for None), in the order of `rows`."""
        self._check_open()
        return self._backend.take(rows, columns)

    def _register_cached(self) -> None:
        """Point the `objects` view at the session cache (DuckDB scans the Arrow memory in place)."""
        # Registered under the view's own name (a temporary view, found before this Objects' schema): a view
        # over a registered name binds the 200-column Arrow scan once more (3.5 ms at 5M x 200).
        self._register("objects", self.cached)
        self._joined = True  # the cache holds the annotations
        self.__dict__.pop("schema", None)

    def numbered_view(self) -> str:
        """The session cache with its row numbers (ROW_COLUMN) as a DuckDB view, registered on first use."""
        self._check_open()
        with self._lock:
            if CACHED_VIEW not in self._registered:
                self._register(CACHED_VIEW, self._backend.numbered())
        return CACHED_VIEW

    def _files(self, entries: list[tuple[Path, dict]] | None = None) -> list[str]:
        """The Parquet files of these table entries or annotation versions (all tables for None), each checked
        to exist and to look like Parquet (`schemas.integrity.parquet_file`)."""
        entries = self.tables if entries is None else entries
        roots = {store: store.resolve() for store in {store for store, _ in entries}}  # inside a store: its folders
        return [str(roots[store] / integrity.parquet_file(store, f"{table['dir']}/{name}").relative_to(store))
                for store, table in entries for name in table["files"]]

    def data_files(self) -> list[str]:
        """The absolute paths of the Parquet files that hold the covered tables' measurements in this snapshot,
        for engines that read the store themselves (dask.dataframe, Spark, polars): the files of replaced tables
        and of writes in progress lie in the same directories until `cellar vacuum`, so a glob would read them
        too. Their paths carry the partition keys (`objects/image=.../label_image=.../part-*.parquet`)."""
        return self._files()

    def _check_parquet(self, con: duckdb.DuckDBPyConnection, annotations: bool = False) -> None:
        """Check, once, that the footer of the first Parquet file of every column list (the one DuckDB binds the
        list's scan to) parses and holds the columns the log lists (a file of another table would otherwise join
        the views unnoticed), or (`annotations`) every annotation file's, before a view reads them. DuckDB checks
        the list's other files against the first when it reads them, and names a file that differs (`error`). It
        parses the footers here and keeps them in its metadata cache, so the views' binding that follows does
        not parse them again."""
        flag = "_annotations_checked" if annotations else "_parquet_checked"
        if self.__dict__.get(flag):
            return
        files = self._annotation_files() if annotations else self._first_parquet_files()
        expected = {str((store / rel).resolve()): (store, rel, names) for store, rel, names in files}
        if expected:
            con.execute("SET parquet_metadata_cache = true")
            listing = ", ".join(literal(f) for f in expected)
            try:
                rows = con.execute(f"SELECT file_name, name, num_children FROM parquet_schema([{listing}])").fetchall()
            except duckdb.Error:  # a footer that does not parse: find which (DuckDB's message may not say)
                raise _unparsable(con, expected.values()) from None
            for path, names in _top_level_columns(rows).items():
                store, rel, want = expected[path]
                problem = integrity.column_problem(store, rel, names, want)
                if problem is not None:
                    raise problem
        self.__dict__[flag] = True

    def error(self, exc: duckdb.Error | OSError) -> CellarError:
        """DuckDB's error as a cellar error: a StoreError naming the store file it could not read, else a
        QueryError with DuckDB's message on one line (`explain`). An OSError is DuckDB's error as pyarrow's
        reader of DuckDB's result stream passes it on."""
        text = one_line(exc)
        if isinstance(exc, (duckdb.IOException, duckdb.InvalidInputException, OSError)):
            for quoted in re.findall(r"""["']([^"']+)["']""", text):
                for store in self.stores:
                    root = store.resolve()
                    if Path(quoted).is_relative_to(root):
                        rel = Path(quoted).relative_to(root).as_posix()
                        return StoreError(f"{store}: {rel}: damaged Parquet file ({text})")
        if type(exc) is duckdb.Error or isinstance(exc, OSError):  # a page that does not decode, not the SQL
            damaged = self._undecodable(text)
            if damaged is not None:
                return damaged
        return QueryError(self.explain(exc))

    def polars_error(self, exc: Exception) -> CellarError:
        """An error polars met while running a query (`Query._collect`: a ComputeError, an OSError) as a cellar
        error: a StoreError naming the Parquet file that is gone or whose data do not decode, else a QueryError
        with polars' message on one line. polars' decoder does not say which file it failed on: as for DuckDB's
        errors that do not, the files are read to find it (`_undecodable`, only on an error's path)."""
        text = _polars_line(exc)
        if not self.is_cached:  # the query read the Parquet files
            files = list(self._parquet_files())
            try:
                for store, rel, _ in files:  # missing or truncated (the scans trust the log: `_scan`)
                    integrity.parquet_file(store, rel)
            except StoreError as error:
                return error
            for store, rel, _ in files:
                if rel in text:  # a file gone since the store was opened, or one with other columns
                    kind = "cannot read" if isinstance(exc, OSError) else "not this table's file"
                    return StoreError(f"{store}: {rel}: {kind} ({text})")
            for store, table in self.tables:  # a file without a column the others have: its footer says so
                for name in table["files"]:
                    _scan(store, [f"{table['dir']}/{name}"], table["columns"])
            damaged = self._undecodable(text)
            if damaged is not None:
                return damaged
        return QueryError(text)

    def _undecodable(self, text: str) -> StoreError | None:
        """The error naming the first Parquet file whose data DuckDB cannot decode, for an error that does not
        say which (its thrift decoder's, say). Every value of every file is read: only on an error's path."""
        con = duckdb.connect(":memory:")
        for store, rel, _ in self._parquet_files():
            try:  # hashing every value decodes every column, keeping none
                source = f"read_parquet({literal(str(store / rel))})"
                con.execute(f"SELECT bit_xor(hash(COLUMNS(*))) FROM {source}").fetchall()
            except duckdb.Error as exc:
                return StoreError(f"{store}: {rel}: damaged Parquet file: its data do not decode "
                                  f"({one_line(exc) or text})")
        return None

    def _annotation_files(self):
        """(store, store-relative path, expected column names) of the covered tables' annotation files."""
        for i, key, _ in self._annotated():
            for rel, names in integrity.annotation_files(self.snapshots[i].entry(*key)):
                yield self.stores[i], rel, names

    def _first_parquet_files(self):
        """(store, store-relative path, expected column names) of the first Parquet file of every column list of
        the covered tables."""
        for (i, _), members in self._groups.items():
            entry = self.snapshots[i].entry(*members[0])
            entry = {**entry, "columns": self._specs(i, entry["columns_id"])}
            names = {c["name"] for c in entry["columns"]} - set(integrity.PARTITION_KEYS)
            yield self.stores[i], f"{entry['dir']}/{entry['files'][0]}", names

    def _parquet_files(self):
        """(store, store-relative path, expected column names) of the covered tables' Parquet files."""
        for i, store in enumerate(self.stores):
            entries = [entry for (j, _), (_, entry) in zip(self._keys, self.tables) if j == i]
            for rel, names in integrity.files(self.snapshots[i], entries):
                yield store, rel, names

    @staticmethod
    def _read_parquet(files: list[str], keys: str, union: bool = True) -> str:
        """DuckDB's scan of these files with the Hive keys of their paths, as a subquery; DuckDB reads every
        `key=value` folder of a path as a key, so those above the store's own (a store kept in `run=1/`) are
        left out."""
        listing = ", ".join(literal(f) for f in files)
        scan = (f"read_parquet([{listing}], hive_partitioning = true, union_by_name = {str(union).lower()}, "
                f"hive_types = {{{keys}}})")
        above = sorted({part.split("=", 1)[0] for f in files for part in Path(f).parts[:-1] if "=" in part}
                       - {*integrity.PARTITION_KEYS, "version"})
        if not above:
            return scan
        return f"(SELECT * EXCLUDE ({', '.join(quote(k) for k in above)}) FROM {scan})"

    def _annotations_sql(self, versions: list[tuple[Path, dict]]) -> str:
        """These annotation versions' rows, with the partition keys and version: one scan per store and column
        list (its files share one schema: DuckDB binds the scan to the first file's footer and checks the others
        against it as it reads them, where a union by name reads every footer to bind), unioned by name."""
        if not versions:
            return ("SELECT NULL::VARCHAR AS image, NULL::VARCHAR AS label_image, NULL::UBIGINT AS label_id, "
                    "NULL::INTEGER AS version WHERE false")
        groups: dict[tuple, list[tuple[Path, dict]]] = {}
        for store, version in versions:
            listed = tuple((c["name"], c["dtype"]) for c in version["columns"])
            groups.setdefault((store, listed), []).append((store, version))
        keys = "'image': VARCHAR, 'label_image': VARCHAR, 'version': INTEGER"
        parts = [f"SELECT * FROM {self._read_parquet(self._files(members), keys, union=False)}" for members in groups.values()]
        return " UNION ALL BY NAME ".join(f"({part})" for part in parts) if len(parts) > 1 else parts[0]

    def _measurements_sql(self, keys: str) -> str:
        """The covered tables' objects: one scan per column list (its files share one schema, so DuckDB reads
        one footer to bind it, where a union by name reads every file's), the scans unioned by name."""
        entries = dict(zip(self._keys, (entry for _, entry in self.tables)))
        parts = []
        for (i, _), members in self._groups.items():
            tables = [(self.stores[i], entries[(i, key)]) for key in members]
            parts.append(f"SELECT * FROM {self._read_parquet(self._files(tables), keys, union=False)}")
        if not parts:  # an empty store still answers, with the key columns
            return "SELECT NULL::VARCHAR AS image, NULL::VARCHAR AS label_image, NULL::UBIGINT AS label_id WHERE false"
        return " UNION ALL BY NAME ".join(f"({part})" for part in parts) if len(parts) > 1 else parts[0]

    def _create_views(self, con: duckdb.DuckDBPyConnection) -> None:
        """The views, in this Objects' schema of the database (`con`: the connection that holds it): `objects`
        over the session cache (annotations joined), or over the Parquet files without the annotations, which
        join when a statement may read them (`con_for`)."""
        if self.is_cached:  # the session cache holds the same rows (annotations joined): no Parquet to bind
            self._check_parquet(con, annotations=True)
            self._register_cached()
            return
        select = self._objects_sql(joined=False)  # (each file checked to be there and look like Parquet first)
        self._check_parquet(con)
        self._joined = not self._annotated()
        con.execute(f"CREATE VIEW objects AS {select}")

    def _objects_sql(self, joined: bool) -> str:
        """The objects of the Parquet files, with each table's latest annotation version joined (`joined`, see
        query.annotate) or without the annotations' columns."""
        select = self._measurements_sql("'image': VARCHAR, 'label_image': VARCHAR")
        annotated = self._annotated() if joined else []
        if annotated:
            latest = [(self.stores[i], max(versions, key=lambda v: v["version"])) for i, _, versions in annotated]
            select = (f"SELECT m.*, a.* EXCLUDE (image, label_image, label_id, version) FROM ({select}) m "
                      f"LEFT JOIN ({self._annotations_sql(latest)}) a USING (image, label_image, label_id)")
        shape = self._reshaped()
        if shape is not None:  # every column of the store (see `narrow`), in `column_types`' order
            notes = set() if joined else self.annotation_only_columns()
            nulls = ", ".join(f"{_duck_null(t)} AS {quote(n)}" for n, t in shape.items() if n not in notes)
            select = f"(SELECT {nulls} WHERE false) UNION ALL BY NAME ({select})"
        return select

    def con_for(self, statement: str) -> duckdb.DuckDBPyConnection:
        """`con`, its `objects` view with the annotations joined if `statement` may read their columns.

        The view is made without them: DuckDB does not drop a LEFT JOIN whose columns a query leaves unused (it
        scans every annotation file and joins, 10-25 ms of a box query), and one annotation row per object at
        most (query.annotate) makes the join keep every row as it is, so the view without it answers alike the
        statements that read none of their columns. `sql.may_read` tells those apart on the statement's words,
        erring towards the join; the view is then replaced by the joined one, once, for every later statement
        (a statement bound meanwhile reads none of the annotations: either view answers it)."""
        con = self.con
        if not self._joined and may_read(statement, self._annotation_words, self._column_words, _VIEW_NAMES):
            with self._lock:
                if not self._joined:
                    select = self._objects_sql(joined=True)
                    self._check_parquet(con, annotations=True)
                    con.execute(f"CREATE OR REPLACE VIEW objects AS {select}")
                    self._joined = True
        return con

    @cached_property
    def _annotation_words(self) -> set[str]:
        return {n.lower() for n in self.annotation_only_columns()}

    @cached_property
    def _column_words(self) -> set[str]:
        return {n.lower() for n in self.column_types} - self._annotation_words

    def _channels_sql(self) -> str:
        per_channel: dict[str, list[str]] = {}  # channel column suffix -> feature names present
        names: dict[str, str] = {}  # suffix -> channel name
        for (i, columns_id), members in self._groups.items():
            cols = [c["name"] for c in self._specs(i, columns_id)]
            for ch in self.snapshots[i].entry(*members[0]).get("channels", []):  # tables of one column list alike
                suffix = _CHANNEL_SEP + ch["column"]
                names.setdefault(ch["column"], ch["name"])
                feats = per_channel.setdefault(ch["column"], [])
                feats.extend(c[: -len(suffix)] for c in cols if c.endswith(suffix) and c[: -len(suffix)] not in feats)
        features: list[str] = []
        for feats in per_channel.values():
            features.extend(f for f in feats if f not in features)
        if not per_channel:
            return ("SELECT NULL::VARCHAR AS image, NULL::VARCHAR AS label_image, NULL::UBIGINT AS label_id, "
                    "NULL::VARCHAR AS channel WHERE false")
        # One scan of `objects` joined with the list of channels, each feature picked by channel number (a
        # union of one SELECT per channel binds and scans `objects` once per channel: 2 s at 40 channels).
        cases: dict[str, list[str]] = {f: [] for f in features}
        present = []
        for k, (col, feats) in enumerate(per_channel.items()):
            for f in feats:
                cases[f].append(f"WHEN {k} THEN o.{quote(f + _CHANNEL_SEP + col)}")
            present.append(f"WHEN {k} THEN " + " OR ".join(f"o.{quote(f + _CHANNEL_SEP + col)} IS NOT NULL" for f in feats))
        values = ", ".join(
            f"CASE c.k {' '.join(cases[f])}{' ELSE NULL::DOUBLE' if len(cases[f]) < len(per_channel) else ''} END "
            f"AS {quote(f)}" for f in features)
        listing = ", ".join(f"({k}, {literal(names[col])})" for k, col in enumerate(per_channel))
        return (f"SELECT o.image, o.label_image, o.label_id, c.channel, {values} FROM objects o "
                f"CROSS JOIN (VALUES {listing}) c(k, channel) WHERE CASE c.k {' '.join(present)} END")

    @cached_property
    def _annotation_specs(self) -> list[tuple[tuple[str, str], dict]]:
        """(table key, column spec) of the latest annotation version's columns of each annotated table."""
        out = []
        for _, key, versions in self._annotated():
            last = max(versions, key=lambda v: v["version"])
            out.extend((key, {**c, "unit": "", "description": f"annotation (version {last['version']}, from "
                              f"{last['source']}, {last['created']})"}) for c in last["columns"])
        return out

    def _create_columns_view(self) -> None:
        """The `columns` view, made on first mention: a table of the column lists and one of the tables with
        theirs, joined (a cohort's tables share a few lists: nothing per table and column is built until a
        query reads the view), in the tables' order, each table's measurements then its annotations."""
        fields = ("name", "dtype", "unit", "description")
        lists: dict[str, list] = {"list": [], "pos": [], **{f: [] for f in fields}}
        tables: dict[str, list] = {"image": [], "label_image": [], "list": [], "seq": []}
        order = {key: n for n, (_, key) in enumerate(self._keys)}
        for k, ((i, columns_id), members) in enumerate(self._groups.items()):
            for pos, c in enumerate(self._specs(i, columns_id)):
                lists["list"].append(k)
                lists["pos"].append(pos)
                for f in fields:
                    lists[f].append(str(c[f]))
            tables["image"].extend(key[0] for key in members)
            tables["label_image"].extend(key[1] for key in members)
            tables["list"].extend([k] * len(members))
            tables["seq"].extend(order[key] for key in members)
        extra: dict[str, list] = {"image": [], "label_image": [], **{f: [] for f in fields}, "seq": [], "pos": []}
        for pos, ((image, label_image), c) in enumerate(self._annotation_specs):
            for f, v in zip(extra, (image, label_image, *(str(c[f]) for f in fields), order[(image, label_image)], pos)):
                extra[f].append(v)
        self._register("_column_lists", pa.table(lists))
        self._register("_table_lists", pa.table(tables))
        self._register("_annotation_columns", pa.table({f: pa.array(v, pa.int64() if f in ("seq", "pos") else
                                                                     pa.string()) for f, v in extra.items()}))
        self.con.execute(
            "CREATE VIEW columns AS SELECT image, label_image, name, dtype, unit, description FROM ("
            "SELECT t.image, t.label_image, c.name, c.dtype, c.unit, c.description, t.seq, 0 AS part, c.pos "
            "FROM _table_lists t JOIN _column_lists c USING (list) UNION ALL "
            "SELECT image, label_image, name, dtype, unit, description, seq, 1, pos FROM _annotation_columns) "
            "ORDER BY seq, part, pos")

    def sql(self, query: str) -> duckdb.DuckDBPyRelation:
        """Run SQL over the views; returns a DuckDB relation (`.to_arrow_table()`, `.pl()`, `.df()`,
        `.fetchall()`)."""
        con = self.con_for(query)
        for name, pattern in _LAZY_VIEWS.items():
            if name not in self._lazy_views and pattern.search(query):
                self._create_lazy_view(name)
        try:
            return con.sql(query)
        except duckdb.CatalogException as exc:
            if len(self._lazy_views) == len(_LAZY_VIEWS):
                raise QueryError(self.explain(exc)) from None
            for name in _LAZY_VIEWS:  # a misspelt name then gets the lazy views among its suggestions
                self._create_lazy_view(name)
            try:
                return con.sql(query)
            except duckdb.Error as again:
                raise self.error(again) from None
        except duckdb.Error as exc:
            raise self.error(exc) from None

    def fetch(self, query: str, how: str = "fetchall"):
        """Run SQL over the views and materialise the result (`how`: a relation method, such as fetchnumpy);
        an error met while it runs (a Parquet file whose data do not decode) is a cellar error (`error`), as
        one met while binding."""
        try:
            return getattr(self.sql(query), how)()
        except duckdb.Error as exc:
            raise self.error(exc) from None

    def _create_lazy_view(self, name: str) -> None:
        """Make the `channels`, `columns` or `annotations` view, once. They are made on first mention: DuckDB binds a view
        when it is created (at 40 channels `channels` takes 57 ms; as a union of one SELECT per channel it took
        530 ms), which queries that do not use them need not pay. Made on the calling thread's connection (they
        bind `objects` or registered tables, which belong to a connection)."""
        with self._lock:
            if name in self._lazy_views:
                return
            if name == "channels":
                self.con.execute(f"CREATE VIEW channels AS {self._channels_sql()}")
            elif name == "annotations":  # every version of every covered table
                every = [(self.stores[i], v) for i, _, versions in self._annotated() for v in versions]
                self.con.execute(f"CREATE VIEW annotations AS {self._annotations_sql(every)}")
            else:
                self._create_columns_view()
            self._lazy_views.add(name)

    def table(self, image: str | None = None, label_image: str | None = None) -> tuple[Path, dict]:
        """(store, entry with its `columns`) of the one table matching `image` and `label_image` (either may
        be omitted when it leaves a single table)."""
        found = [(i, k) for i, k in self._keys
                 if (image is None or k[0] == image) and (label_image is None or k[1] == label_image)]
        if len(found) == 1:
            i, key = found[0]
            entry = self.snapshots[i].entry(*key)
            return self.stores[i], {**entry, "columns": self._specs(i, entry["columns_id"])}
        listed = found or self._keys
        have = ", ".join(f"{k[0]}/{k[1]}" for _, k in listed[:20]) + (", ..." if len(listed) > 20 else "") or "none"
        if not found:
            want = "/".join(x or "*" for x in (image, label_image))
            raise QueryError(f"no table {want} in {', '.join(map(str, self.stores))} (tables: {have})")
        raise QueryError(f"{len(found)} tables match ({have}); choose one with --image and --labels")

    # -- columns ---------------------------------------------------------------------------------------
    @cached_property
    def schema(self) -> dict[str, str]:
        """Column name -> DuckDB type of the objects view."""
        return {name: str(dtype) for name, dtype, *_ in self.con_for("DESCRIBE").sql("DESCRIBE objects").fetchall()}

    @cached_property
    def column_names(self) -> list[str]:
        """The objects view's columns, from the log: measurements (unioned by name), the latest annotations,
        then `image` and `label_image`."""
        return list(self.column_types)

    @cached_property
    def column_types(self) -> dict[str, str]:
        """Column name -> dtype as the log records it, in the objects view's order: the measurements (in the
        order they first appear), `image` and `label_image`, then the latest annotations' columns."""
        if self._shape is not None:
            return dict(self._shape)
        types: dict[str, str] = {}
        for i, columns_id in self._group_ids:
            for c in self._specs(i, columns_id):
                if c["name"] not in _PARTITION_KEYS:
                    types.setdefault(c["name"], c["dtype"])
        types.update({key: "string" for key in _PARTITION_KEYS})
        for _, c in self._annotation_specs:
            types.setdefault(c["name"], c["dtype"])
        return types

    def _reshaped(self) -> dict[str, str] | None:
        """The columns (name -> dtype) the views are to show in `column_types`' order, or None where the files
        give them so anyway (one column list, not narrowed)."""
        return self.column_types if self._shape is not None or len(self._group_ids) > 1 else None

    def check_columns(self, columns: Sequence[str], what: str) -> None:
        """Raise a QueryError naming the first unknown column, with the closest known names."""
        known = set(self.column_names)
        for c in columns:
            if not isinstance(c, str) or c not in known:
                raise QueryError(f"{what}: unknown column {c!r}{suggest(str(c), self.column_names)}")

    def column_info(self, column: str) -> dict[str, str]:
        """dtype, unit and description of a column (from the first table that has it)."""
        specs = [c for (i, columns_id) in self._group_ids for c in self._specs(i, columns_id)]
        for c in [*specs, *(c for _, c in self._annotation_specs)]:
            if c["name"] == column:
                return {"dtype": c["dtype"], "unit": c["unit"], "description": c["description"]}
        return {"dtype": self.schema.get(column, ""), "unit": "", "description": ""}

    def explain(self, exc: Exception) -> str:
        """DuckDB's error on one line; an unknown column gets the closest known names."""
        text = one_line(exc)
        missing = MISSING_COLUMN.search(text)
        if missing:
            name = missing.group(1)
            return f"unknown column {name!r}{suggest(name, self.column_names)}"
        return text

    def __len__(self) -> int:
        return self.count_from_log()

    def __repr__(self) -> str:
        stores = ", ".join(str(s) for s in self.stores)
        return f"<cellar.Objects {stores}: {self.n_tables} tables, {len(self)} objects>"


_TYPES = {  # a column's dtype as the log records it (numpy's or Arrow's names) -> DuckDB's, polars' name
    "uint8": ("UTINYINT", "UInt8"), "uint16": ("USMALLINT", "UInt16"), "uint32": ("UINTEGER", "UInt32"),
    "uint64": ("UBIGINT", "UInt64"), "int8": ("TINYINT", "Int8"), "int16": ("SMALLINT", "Int16"),
    "int32": ("INTEGER", "Int32"), "int64": ("BIGINT", "Int64"), "float32": ("FLOAT", "Float32"),
    "float": ("FLOAT", "Float32"), "float64": ("DOUBLE", "Float64"), "double": ("DOUBLE", "Float64"),
    "bool": ("BOOLEAN", "Boolean"), "string": ("VARCHAR", "String"), "large_string": ("VARCHAR", "String"),
    "string_view": ("VARCHAR", "String"),
}


def _duck_null(dtype: str) -> str:
    """A NULL of the dtype's DuckDB type (of DuckDB's NULL type, which takes the type of the other side of a
    union, for a dtype this does not know)."""
    return f"NULL::{_TYPES[dtype][0]}" if dtype in _TYPES else "NULL"


def duck_type(dtype: str) -> str:
    """The DuckDB type of a dtype the log records (`_TYPES`)."""
    return _TYPES[dtype][0]


def polars_type(dtype: str):
    return getattr(pl, _TYPES.get(dtype, ("VARCHAR", "String"))[1])


def _scan(store: Path, rels: Sequence[str], columns: list[dict], row_index: dict | None = None, hive: bool = False,
          trust_log: bool = False):
    """A polars scan of these files (store-relative paths) of one column list (`hive`: several, their partition
    keys read from their paths). `row_index`: polars' row_index_name and row_index_offset (ROW_COLUMN).

    With `trust_log`, polars is given the columns and types the log lists, so it opens no file before the query
    runs (a schema polars would otherwise infer from the first file: about 10 ms of a 50 ms filter over 2M rows);
    a file that is missing, truncated or of other columns fails the query, and `Tables.polars_error` then checks
    the files and reads the footers, as below.
    Without it, or where a type has no polars equivalent here, the first file's footer is read now: a footer that
    does not parse, or columns other than the log lists, are a StoreError naming the file."""
    schema = _polars_schema(columns) if trust_log else None
    # missing, truncated: named first (trusting the log, when the query fails: `Tables.polars_error`)
    paths = [store / rel if schema is not None else integrity.parquet_file(store, rel) for rel in rels]
    options = {"hive_partitioning": True, "hive_schema": _HIVE_SCHEMA()} if hive else {}
    frame = pl.scan_parquet(paths if hive else paths[0], schema=schema, **options, **(row_index or {}))
    if schema is not None:
        return frame
    try:
        found = frame.collect_schema()
    except (pl.exceptions.ComputeError, OSError) as exc:
        raise StoreError(f"{store}: {rels[0]}: damaged Parquet file ({' '.join(str(exc).split())})") from None
    keys = {ROW_COLUMN, *(integrity.PARTITION_KEYS if hive else ())}
    expected = {c["name"] for c in columns} - set(integrity.PARTITION_KEYS)
    problem = integrity.column_problem(store, rels[0], [n for n in found if n not in keys], expected)
    if problem is not None:
        raise problem
    listed = _polars_schema(columns) or {}
    for name, dtype in listed.items():
        if found[name] != dtype:
            raise StoreError(f"{store}: {rels[0]}: not this table's file: its column {name} holds {found[name]}, the "
                             f"log lists {dtype}")
    return frame


def _polars_schema(columns: list[dict]) -> dict | None:
    """The polars schema of Parquet files from the log's column list (partition keys apart), as a dict of name ->
    polars type (scan_parquet takes one; a pl.Schema of 330 columns costs 0.7 ms to build), or None where a
    column's type is not one `_TYPES` knows."""
    listed = [c for c in columns if c["name"] not in integrity.PARTITION_KEYS]
    if not all(c["dtype"] in _TYPES for c in listed):
        return None
    types = {dtype: getattr(pl, names[1]) for dtype, names in _TYPES.items()}
    return {c["name"]: types[c["dtype"]] for c in listed}


def _HIVE_SCHEMA():
    return {key: pl.String for key in integrity.PARTITION_KEYS}


def _top_level_columns(rows: list[tuple]) -> dict[str, list[str]]:
    """{file: its top-level column names} from DuckDB's `parquet_schema` rows (file_name, name, num_children),
    which list each file's schema tree depth first, the root first."""
    out: dict[str, list[str]] = {}
    pending: dict[str, list[int]] = {}  # per file, the children still to come at each open level
    for path, name, children in rows:
        stack = pending.get(path)
        if stack is None:  # the root
            out[path], pending[path] = [], [children or 0]
            continue
        while stack and stack[-1] == 0:
            stack.pop()
        if len(stack) == 1:
            out[path].append(name)
        stack[-1] -= 1
        if children:
            stack.append(children)
    return out


def _unparsable(con: duckdb.DuckDBPyConnection, files) -> StoreError:
    """The error naming the first of (store, rel, names) whose footer DuckDB cannot parse."""
    for store, rel, _ in files:
        try:
            con.execute(f"SELECT 1 FROM parquet_schema({literal(str((store / rel).resolve()))})").fetchall()
        except duckdb.Error as exc:
            return StoreError(f"{store}: {rel}: damaged Parquet file: its footer does not parse ({one_line(exc)})")
    stores = dict.fromkeys(str(store) for store, _, _ in files)
    return StoreError(f"{', '.join(stores)}: a Parquet file's footer does not parse")


_DATABASE: duckdb.DuckDBPyConnection | None = None
_DATABASE_LOCK = threading.RLock()  # `_DATABASE` itself serves one thread at a time


def _connection(threads: int | None) -> tuple[duckdb.DuckDBPyConnection, str, _Schema | None]:
    """A connection and a new schema in its database for an Objects' views (first on its search path).

    Connections share one in-memory database per process (opening a DuckDB database costs ~25 ms, a
    connection to it nothing, and its Parquet metadata cache is shared); each Objects creates its views in
    a schema of its own, dropped when the last connection that can use it is garbage collected (a relation
    outlives its Objects). Store files never change once written (new writes get new names), so cached
    metadata cannot go stale. `threads` asks for a private database with that many threads instead.
    """
    name = f"cellar_{uuid.uuid4().hex[:12]}"
    if threads:
        con, schema = duckdb.connect(":memory:", config={"threads": threads}), None
    else:
        con, schema = _shared_cursor(), _Schema(name)
        schema.attach(con)
    con.execute(f"CREATE SCHEMA {name}")
    con.execute(f"SET search_path = '{name}'")
    return con, name, schema


def _shared_cursor() -> duckdb.DuckDBPyConnection:
    """A new connection to the process's shared in-memory database (see `_connection`), opened on first use."""
    global _DATABASE
    with _DATABASE_LOCK:
        if _DATABASE is None:
            _DATABASE = duckdb.connect(":memory:")
            _DATABASE.execute("SET parquet_metadata_cache = true")
        return _DATABASE.cursor()


class DuckColumns:
    """A log checkpoint file read by DuckDB (a `schemas.log.ParquetColumns`), for Tables with engine="duckdb":
    the log is read by the engine that runs the queries, and pyarrow (with numpy, 120 ms to import) stays
    unloaded. The file is read whole when opened (a checkpoint is a few columns of one row per table), so a
    compaction that removes its name later takes nothing away."""

    def __init__(self, path: Path):
        if not path.exists():
            raise FileNotFoundError(path)
        con = _shared_cursor()
        try:
            result = con.execute(f"SELECT * FROM read_parquet({literal(str(path))})")
            described, rows = result.description, result.fetchall()
        except duckdb.Error as exc:
            if not path.exists():  # removed meanwhile (a compaction)
                raise FileNotFoundError(path) from None
            raise ValueError(one_line(exc)) from None
        finally:
            con.close()
        self.names = [name for name, *_ in described]
        kinds = [str(kind) for _, kind, *_ in described]
        self.kinds = {name: "string" if kind == "VARCHAR" else "integer" if kind in _DUCK_INTEGERS else kind
                      for name, kind in zip(self.names, kinds)}
        self.num_rows = len(rows)
        self._columns = dict(zip(self.names, map(list, zip(*rows)))) if rows else {n: [] for n in self.names}
        self.group_rows = [self.num_rows]  # all in memory: one group
        self.metadata: dict[str, str] = {}  # the log falls back on the columns (the distinct column lists)

    def null_count(self, name: str) -> int | None:
        return self._columns[name].count(None)

    def read(self, names: list[str]) -> list[list]:
        return [self._columns[name] for name in names]

    def read_group(self, group: int, name: str) -> list:
        return self._columns[name]


class PolarsColumns:
    """A log checkpoint file read by polars (a `schemas.log.ParquetColumns`), for Tables with engine="auto": the
    queries polars runs (filters, boxes, label ids; `cellar filter`) then load neither pyarrow nor DuckDB. The
    bytes are read when opened (a compaction may remove the name later). A file of up to WHOLE_BYTES is decoded
    whole at once (each call into polars costs about a millisecond); a larger one (an entries file of thousands
    of tables) a column or CHECKPOINT_ROW_GROUP rows at a time, as the log writes its groups (polars does not
    report row groups: a slice is read from the groups that hold it). polars reports no null counts."""

    WHOLE_BYTES = 1 << 20

    def __init__(self, path: Path):
        with open(path, "rb") as file:
            self._bytes = file.read()
        self._frame = None
        try:
            if len(self._bytes) <= self.WHOLE_BYTES:
                self._frame = pl.read_parquet(io.BytesIO(self._bytes))
                schema, self.num_rows = self._frame.schema, self._frame.height
            else:
                self._scan = pl.scan_parquet(io.BytesIO(self._bytes))
                schema = self._scan.collect_schema()
                self.num_rows = int(self._scan.select(pl.len()).collect().item())
            self.metadata = pl.read_parquet_metadata(io.BytesIO(self._bytes))
        except (pl.exceptions.PolarsError, OSError) as exc:  # a file that does not parse
            raise ValueError(_polars_line(exc)) from None
        self.names = list(schema.names())
        self.kinds = {name: "string" if dtype == pl.String else "integer" if dtype.is_integer() else str(dtype)
                      for name, dtype in schema.items()}
        size = log.CHECKPOINT_ROW_GROUP
        self.group_rows = [min(size, self.num_rows - start) for start in range(0, self.num_rows, size)] or [0]

    def null_count(self, name: str) -> int | None:
        return None

    def read(self, names: list[str]) -> list[list]:
        if self._frame is not None:
            return [self._frame.get_column(name).to_list() for name in names]
        return self._read(self._scan.select(names))

    def read_group(self, group: int, name: str) -> list:
        size = log.CHECKPOINT_ROW_GROUP
        if self._frame is not None:
            return self._frame.get_column(name).slice(group * size, size).to_list()
        return self._read(self._scan.select(name).slice(group * size, size))[0]

    def _read(self, frame) -> list[list]:
        try:
            return [column.to_list() for column in frame.collect().get_columns()]
        except (pl.exceptions.PolarsError, OSError) as exc:
            raise ValueError(_polars_line(exc)) from None


_DUCK_INTEGERS = frozenset({"TINYINT", "SMALLINT", "INTEGER", "BIGINT", "UTINYINT", "USMALLINT", "UINTEGER",
                            "UBIGINT", "HUGEINT", "UHUGEINT"})


class _Schema:
    """A schema of the shared database, dropped when the last connection attached to it is collected."""

    def __init__(self, name: str):
        self.name, self._users, self._lock = name, 0, threading.Lock()

    def attach(self, con: duckdb.DuckDBPyConnection) -> None:
        with self._lock:
            self._users += 1
        weakref.finalize(con, self._release)

    def _release(self) -> None:
        with self._lock:
            self._users -= 1
            last = self._users == 0
        if last:
            with _DATABASE_LOCK:
                if _DATABASE is not None:
                    try:
                        _DATABASE.execute(f"DROP SCHEMA IF EXISTS {self.name} CASCADE")
                    except duckdb.Error:  # at interpreter exit the database may be gone already
                        pass


def _polars_line(exc: Exception) -> str:
    """polars' message on one line: its first paragraph (the rest draws the plan or the expression)."""
    return " ".join(str(exc).split("\n\n")[0].split()) or type(exc).__name__


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

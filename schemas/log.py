"""The store's commit log: how writers change a store and readers see it, with any number of both at once.

A store's state (its tables, their files, columns and annotation versions) is the sum of its commits::

    STORE/
      cellar.json                                the marker: format, format version, creation
      log/00000000000000000001.json              commit 1: the actions of one write
      log/00000000000000000002.json              ...
      log/00000000000000000020.checkpoint.parquet  the state after commit 20, one row per table: its key, object
                                                 count, column list, annotation versions
      log/00000000000000000020.entries.parquet     and its entry (provenance, files), by row
      log/_last_checkpoint                       {"version": 20}: where readers start
      log/columns/<sha256>.json                  column specs by content (tables with the same columns share one)

Writing: a writer puts its data files under names of its own (`part-<run>.parquet`), then reads the state
(version N), decides its actions from it, and creates `log/<N+1>.json` with create-if-absent semantics: the
commit is written in full under a temporary name and hard-linked to its final name, which fails if the name
exists (link(2) is atomic on local file systems and on NFS). The writer that loses the race reads the commits
it missed, decides again (a conflict is an error, an annotation takes the next version number), and tries
N+2. So every commit that a writer reports is in the log, whole, and no two writers ever take one version.

Reading: a reader starts at the last checkpoint and reads the commits after it, one file each, until the
next number is missing: the state of a version never changes, so a reader sees a consistent snapshot however
many writers commit meanwhile. Every CHECKPOINT_EVERY commits the committing writer writes a checkpoint, and
removes the commit files and checkpoints more than LOG_KEPT versions old, so reading the state costs one
checkpoint and a few commits at 10 tables and at 10,000.
"""

from __future__ import annotations

import bisect
import hashlib
import itertools
import json
import os
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from functools import cache, cached_property
from pathlib import Path
from typing import Any, Protocol

from . import lazy
from . import store as layout
from .atomic import atomic_write, fsync_dir, temp_path
from .errors import StoreError

pa = lazy.module("pyarrow")
pq = lazy.module("pyarrow.parquet")  # (writing)
_parquet = lazy.module("pyarrow._parquet")  # (reading: see ArrowColumns)

FORMAT = "cellar-store"
FORMAT_VERSION = 2
MARKER = "cellar.json"
LOG_DIR = "log"
COLUMNS_DIR = "columns"
LAST_CHECKPOINT = "_last_checkpoint"
LATEST = "_latest"  # {"version": N}: the newest commit its writer knew of, so that a lost last commit shows
CHECKPOINT_EVERY = 20  # a reader reads the last checkpoint and fewer commits than this
LOG_KEPT = 100  # the commits a compaction keeps: readers that started up to this many commits ago finish
TMP_PREFIX = layout.TMP_PREFIX
_DIGITS = 20
_READ_ATTEMPTS = 8  # a reader restarts when a checkpoint it was sent to is compacted away meanwhile
CHECKPOINT_ROW_GROUP = 64  # rows: reading one table's entry decompresses this many entries
CHECKPOINT_COLUMNS = ("image", "label_image", "n_objects", "columns_id", "annotations")
DISTINCT_KEY = "cellar.columns_ids"  # the checkpoint's metadata: its column-list ids, each once, in order


def commit_path(store: Path, version: int) -> Path:
    return Path(store) / LOG_DIR / f"{version:0{_DIGITS}d}.json"


def checkpoint_path(store: Path, version: int) -> Path:
    return Path(store) / LOG_DIR / f"{version:0{_DIGITS}d}.checkpoint.parquet"


def entries_path(store: Path, version: int) -> Path:
    return Path(store) / LOG_DIR / f"{version:0{_DIGITS}d}.entries.parquet"


def columns_path(store: Path, columns_id: str) -> Path:
    return Path(store) / LOG_DIR / COLUMNS_DIR / f"{columns_id}.json"


class _Listed:
    """A checkpoint's table list as columns, by row: what a store of 10,000 tables costs on open is reading
    the image and count columns, not a Python object per table. A table is found by searching the image list
    (a C loop over references); the other columns are read and become lists on first use, checked then (a
    writer reads them all before it commits: `check`); `index` is made only when many lookups of single tables
    come. The file stays open: a compaction may remove its name."""

    def __init__(self, path: Path, reader: Any, texts: _CheckpointTexts):
        self.path, self.reader, self.texts = path, reader, texts
        self.lock = threading.Lock()
        self.index: dict[tuple[str, str], int] | None = None
        self.images, self.counts = self._read("image", "n_objects")
        if min(self.counts, default=0) < 0:
            raise StoreError(f"{self.path}: damaged checkpoint (a negative object count)")

    def _read(self, *names: str) -> list[list]:
        with self.lock:
            try:
                columns = self.reader.read(list(names))
            except (OSError, ValueError) as exc:  # pyarrow.ArrowInvalid is a ValueError
                raise StoreError(f"{self.path}: damaged checkpoint ({' '.join(str(exc).split())})") from None
        for name, column in zip(names, columns):
            if name != "annotations" and None in column:
                raise StoreError(f"{self.path}: damaged checkpoint (a table without its {name})")
        return columns

    def check(self) -> None:
        """Read and check every column (a writer's snapshot: its next checkpoint copies them)."""
        for name in ("label_images", "columns_ids", "annotations"):
            getattr(self, name)

    def __len__(self) -> int:
        return len(self.images)

    @cached_property
    def label_images(self) -> list[str]:
        return self._read("label_image")[0]

    @cached_property
    def columns_ids(self) -> list[str]:
        return self._read("columns_id")[0]

    @cached_property
    def distinct_columns_ids(self) -> list[str]:
        """The column-list ids, each once, in order of first use: as the checkpoint's metadata lists them (a
        few, for any number of tables), or from the column."""
        try:
            listed = json.loads(self.reader.metadata[DISTINCT_KEY])
        except (KeyError, ValueError):
            listed = None
        if isinstance(listed, list) and listed and all(isinstance(v, str) for v in listed):
            return listed
        return list(dict.fromkeys(self.columns_ids))

    @cached_property
    def annotations(self) -> list[str | None]:
        return self._read("annotations")[0]

    @property
    def any_annotations(self) -> bool:
        """Whether any table has annotation versions: from the file's statistics when it has them."""
        nulls = self.reader.null_count("annotations")
        return any(self.annotations) if nulls is None else nulls < len(self)

    def rows(self, image: str) -> Iterator[int]:
        """The rows of this image's tables."""
        start = 0
        while True:
            try:
                row = self.images.index(image, start)
            except ValueError:
                return
            yield row
            start = row + 1

    def row(self, key: tuple[str, str], lookups: int) -> int | None:
        if self.index is None and lookups > _SEARCHES:
            self.index = {k: row for row, k in enumerate(zip(self.images, self.label_images))}
        if self.index is not None:
            return self.index.get(key)
        return next((row for row in self.rows(key[0]) if self.label_images[row] == key[1]), None)


_SEARCHES = 32  # lookups of single tables in a checkpoint's list before it gets an index


@dataclass
class Snapshot:
    """The state of a store at one version: its tables by (image, label image), in the order they were added.

    Table entries are dicts: image, label_image, dir, files, n_objects, columns_id, provenance, annotations.
    The tables of the last checkpoint stay in its columns (`_base`, rows in order) until used: an entry is read
    from the checkpoint's entries file and parsed when first asked for (`_parsed`, by row), so a store of
    10,000 tables opens without reading or parsing them. Commits after the checkpoint add tables (`_added`, in
    order; a replaced table moves to the end, as a new one) and take rows out of the base (`_dead`).
    """

    store: Path
    version: int
    marker: dict[str, Any]
    _base: _Listed | None = None
    _dead: set[int] = field(default_factory=set)  # base rows replaced or removed since the checkpoint
    _parsed: dict[int, dict] = field(default_factory=dict)  # base rows' entries, parsed on first use
    _added: dict[tuple[str, str], dict] = field(default_factory=dict)  # tables added since the checkpoint
    _lookups: int = 0
    reader: Reader | None = None  # what opened the checkpoint files, and opens the next (see `snapshot`)

    def _row(self, key: tuple[str, str]) -> int | None:
        """The base row of table `key` (None: not in the base, or taken out of it)."""
        if self._base is None:
            return None
        self._lookups += 1
        row = self._base.row(key, self._lookups)
        return None if row in self._dead else row

    def _live(self) -> Iterator[int]:
        """The base rows still in the state, in order."""
        n = len(self._base) if self._base is not None else 0
        return iter(range(n)) if not self._dead else (row for row in range(n) if row not in self._dead)

    def _base_entry(self, row: int) -> dict:
        value = self._parsed.get(row)
        if value is None:
            value = _parse_entry(self._base.texts.row(row), self._base.texts.path)
            annotations = self._base.annotations[row]
            if annotations:
                value["annotations"] = _parse_records(annotations, self._base.path)
            self._parsed[row] = value
        return value

    @property
    def keys(self) -> list[tuple[str, str]]:
        base = self._base
        listed = [] if base is None else list(zip(base.images, base.label_images)) if not self._dead else \
            [(base.images[row], base.label_images[row]) for row in self._live()]
        return listed + list(self._added)

    def entry(self, image: str, label_image: str) -> dict | None:
        """The entry of table (image, label image), or None."""
        key = (image, label_image)
        if key in self._added:
            return self._added[key]
        row = self._row(key)
        return None if row is None else self._base_entry(row)

    def entries(self) -> Iterator[dict]:
        """Every table's entry, in order (parsing those not parsed yet)."""
        for row in self._live():
            yield self._base_entry(row)
        yield from self._added.values()

    def n_objects(self, image: str, label_image: str) -> int:
        key = (image, label_image)
        if key in self._added:
            return int(self._added[key]["n_objects"])
        return self._base.counts[self._known(key)]

    def columns_id(self, image: str, label_image: str) -> str:
        key = (image, label_image)
        if key in self._added:
            return self._added[key]["columns_id"]
        return self._base.columns_ids[self._known(key)]

    def _known(self, key: tuple[str, str]) -> int:
        row = self._row(key)
        if row is None:
            raise KeyError(key)
        return row

    def distinct_columns_ids(self) -> list[str]:
        """The tables' column-list ids, each once, in order of first use."""
        if self._base is not None and not self._dead:
            return list(dict.fromkeys([*self._base.distinct_columns_ids,
                                       *(entry["columns_id"] for entry in self._added.values())]))
        return list(dict.fromkeys(self.columns_id_list()))

    @property
    def annotated(self) -> list[tuple[str, str]]:
        """The keys of the tables that have annotation versions, in order."""
        out = []
        base = self._base
        if base is not None and (self._parsed or base.any_annotations):
            for row in self._live():
                parsed = self._parsed.get(row)
                if parsed.get("annotations") if parsed is not None else base.annotations[row]:
                    out.append((base.images[row], base.label_images[row]))
        return out + [key for key, entry in self._added.items() if entry.get("annotations")]

    def keys_of(self, images: set[str] | frozenset[str]) -> list[tuple[str, str]]:
        """The keys of these images' tables, in order: a query on a few images finds their tables by searching
        the image column, not going through every table in Python."""
        base = self._base
        if base is None:
            rows = []
        elif len(images) <= _SEARCHES:
            rows = sorted(row for image in images for row in base.rows(image) if row not in self._dead)
        else:
            rows = [row for row, image in enumerate(base.images) if image in images and row not in self._dead]
        return [(base.images[row], base.label_images[row]) for row in rows] + \
            [key for key in self._added if key[0] in images]

    def columns_id_list(self) -> list[str]:
        """Every table's column-list id, in the order of `keys`."""
        base = self._base
        listed = [] if base is None else list(base.columns_ids) if not self._dead else \
            [base.columns_ids[row] for row in self._live()]
        return listed + [entry["columns_id"] for entry in self._added.values()]

    def annotations(self, image: str, label_image: str) -> list[dict]:
        """The table's annotation versions (without parsing its entry)."""
        key = (image, label_image)
        if key in self._added:
            return self._added[key].get("annotations") or []
        row = self._known(key)
        if row in self._parsed:
            return self._parsed[row].get("annotations") or []
        text = self._base.annotations[row]
        return _parse_records(text, self._base.path) if text else []

    @property
    def total_objects(self) -> int:
        base = self._base
        listed = 0 if base is None else sum(base.counts) - sum(base.counts[row] for row in self._dead)
        return listed + sum(int(entry["n_objects"]) for entry in self._added.values())

    def __len__(self) -> int:
        return (len(self._base) - len(self._dead) if self._base is not None else 0) + len(self._added)

    def __contains__(self, key: tuple[str, str]) -> bool:
        return key in self._added or self._row(key) is not None

    def columns(self, entry: dict) -> list[dict]:
        """The column specs of a table entry (`log/columns/<columns_id>.json`)."""
        return read_columns(self.store, entry["columns_id"])

    def apply(self, actions: list[dict], where: Path) -> None:
        """Apply a commit's actions (see `commit`)."""
        for i, action in enumerate(actions):
            if not isinstance(action, dict) or len(action) != 1:
                raise StoreError(f"{where}: damaged commit (actions[{i}]: expected one action, add, annotate or "
                                 f"remove, found {json.dumps(action)[:60]})")
            (kind, value), = action.items()
            try:
                self._apply_one(kind, value)
            except (KeyError, TypeError, ValueError, AttributeError) as exc:
                raise StoreError(f"{where}: damaged commit ({kind} action: {exc})") from None

    def _apply_one(self, kind: str, value: Any) -> None:
        if kind == "add":  # a new table, or the new measurement of one (its entry carries any annotations)
            problem = layout.entry_problem(value)
            if problem:
                raise ValueError(f"entry {problem}")
            key = (value["image"], value["label_image"])
            self._forget(key)  # a replaced table moves to the end, as a new one
            self._added[key] = value
        elif kind == "annotate":
            entry = self.entry(value["image"], value["label_image"])
            if entry is None:
                raise KeyError(f"no table image={value['image']!r} label_image={value['label_image']!r}")
            problem = layout.record_problem(value["record"])
            if problem:
                raise ValueError(problem)
            entry.setdefault("annotations", []).append(value["record"])
        elif kind == "remove":
            key = (value["image"], value["label_image"])
            if key not in self:
                raise KeyError(f"no table image={key[0]!r} label_image={key[1]!r}")
            self._forget(key)
        else:
            raise ValueError(f"unknown action {kind!r}")

    def _forget(self, key: tuple[str, str]) -> None:
        if self._added.pop(key, None) is None:
            row = self._row(key)
            if row is not None:
                self._dead.add(row)
                self._parsed.pop(row, None)

    def _stored(self) -> Iterator[tuple[tuple[str, str], int, str, str, str | None]]:
        """(key, object count, column-list id, entry text, annotations text) of every table, in order, as a
        checkpoint stores them: the entries not parsed as the last checkpoint had them."""
        base = self._base
        for row in self._live():
            key, count, columns_id = (base.images[row], base.label_images[row]), base.counts[row], base.columns_ids[row]
            texts = _entry_texts(self._parsed[row]) if row in self._parsed else (base.texts.row(row),
                                                                                 base.annotations[row])
            yield key, count, columns_id, *texts
        for key, entry in self._added.items():
            yield key, int(entry["n_objects"]), entry["columns_id"], *_entry_texts(entry)


def _entry_texts(entry: dict) -> tuple[str, str | None]:
    plain = {k: v for k, v in entry.items() if k != "annotations"}
    annotations = entry.get("annotations")
    return (json.dumps(plain, separators=(",", ":")),
            json.dumps(annotations, separators=(",", ":")) if annotations else None)


class _CheckpointTexts:
    """A checkpoint's entries file (a column `entry` of JSON text), read a row group at a time when an entry is
    first needed: a writer that adds a table reads none of them, a query one group per table it touches. The
    file stays open from the load on, so a compaction that removes its name meanwhile takes nothing away."""

    def __init__(self, reader: ParquetColumns, path: Path):
        self.reader, self.path = reader, path
        self.starts = list(itertools.accumulate(reader.group_rows, initial=0))
        self.groups: dict[int, list[str | None]] = {}
        self.lock = threading.Lock()

    def row(self, row: int) -> str:
        """The entry of this row, as text."""
        group = bisect.bisect_right(self.starts, row) - 1
        with self.lock:
            if group not in self.groups:
                try:
                    self.groups[group] = self.reader.read_group(group, "entry")
                except (OSError, ValueError) as exc:  # pyarrow.ArrowInvalid is a ValueError
                    raise StoreError(f"{self.path}: damaged checkpoint ({' '.join(str(exc).split())})") from None
        return self.groups[group][row - self.starts[group]]


def _parse_records(text: str, where: Path | None) -> list[dict]:
    try:
        records = json.loads(text)
    except ValueError as exc:
        raise StoreError(f"{where}: damaged checkpoint (annotation versions not JSON: {exc})") from None
    if not isinstance(records, list) or not all(isinstance(r, dict) and isinstance(r.get("version"), int)
                                                for r in records):
        raise StoreError(f"{where}: damaged checkpoint (annotation versions: expected a list of records)")
    return records


def _parse_entry(text: str | None, where: Path) -> dict:
    if not isinstance(text, str):
        raise StoreError(f"{where}: damaged checkpoint (a table without its entry)")
    try:
        entry = json.loads(text)
    except (TypeError, ValueError) as exc:
        raise StoreError(f"{where}: damaged checkpoint (a table entry is not JSON: {exc})") from None
    problem = layout.entry_problem(entry)
    if problem:
        raise StoreError(f"{where}: damaged checkpoint (a table entry: {problem})")
    return entry


# -- reading ---------------------------------------------------------------------------------------------
def is_store(path: Path) -> bool:
    return (Path(path) / MARKER).is_file()


def read_marker(store: Path) -> dict[str, Any]:
    """The store's marker, checked for format and version."""
    store = Path(store)
    path = store / MARKER
    if not store.exists():
        raise StoreError(f"{store}: no such store (the path does not exist)")
    if not path.is_file():
        if (store / "manifest.json").is_file():
            raise StoreError(f"{store}: a store of cellar's format 1 (manifest.json); run `cellar upgrade {store}` "
                             "once to convert it to format 2")
        raise StoreError(f"{store}: not a cellar store (no {MARKER})")
    marker = layout.read_json(path, "store's marker")
    if not isinstance(marker, dict) or marker.get("format") != FORMAT:
        raise StoreError(f"{path}: not a cellar store marker (expected format '{FORMAT}')")
    if marker.get("format_version") != FORMAT_VERSION:
        raise StoreError(f"{path}: store format version {marker.get('format_version')!r}, this cellar reads "
                         f"version {FORMAT_VERSION}")
    return marker


def snapshot(store: Path, reader: Reader | None = None) -> Snapshot:
    """The store's latest state; `reader` opens its checkpoint files (None: `ArrowColumns`, pyarrow; the query
    layer may read them with the engine it has loaded, see `ParquetColumns`)."""
    store, reader = Path(store), reader or ArrowColumns
    marker = read_marker(store)
    for _ in range(_READ_ATTEMPTS):
        start = _last_checkpoint(store)
        try:
            snap = _load_checkpoint(store, start, marker, reader) if start else Snapshot(store, 0, marker, reader=reader)
            return _read_commits(snap)
        except _Compacted:
            continue
    raise StoreError(f"{store}/{LOG_DIR}: the log kept changing under this reader; try again")


def advance(snap: Snapshot) -> Snapshot:
    """`snap` brought up to the latest version (reads only the commits after it)."""
    try:
        return _read_commits(snap)
    except _Compacted:
        return snapshot(snap.store, snap.reader)


class _Compacted(Exception):
    """A file the reader was sent to was removed by a compaction: start again from the last checkpoint."""


def _read_commits(snap: Snapshot) -> Snapshot:
    while True:
        path = commit_path(snap.store, snap.version + 1)
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            if _later_commits(snap):  # written meanwhile: read on
                continue
            latest = _pointer(snap.store / LOG_DIR / LATEST)
            if latest > snap.version and not path.exists():  # the pointer is written after its commit
                raise StoreError(f"{path}: missing, while {LOG_DIR}/{LATEST} says the store is at version {latest}: "
                                 "the store's log is damaged") from None
            if path.exists():
                continue
            return snap
        except OSError as exc:
            raise StoreError(f"{path}: unreadable commit ({exc.strerror or exc})") from None
        commit = _parse_commit(data, path, snap.version + 1)
        snap.apply(commit["actions"], path)
        snap.version += 1


def _later_commits(snap: Snapshot) -> bool:
    """Whether the commit after `snap` has just been written (True); raises `_Compacted` if it is missing
    because a compaction removed it (a reader slow between its checkpoint and its commits), and a StoreError if
    later commits exist without it (a damaged log); False if it is not written yet. One listing of the log
    folder, which compaction keeps to about two checkpoint intervals of files."""
    numbers = _listed(snap.store)
    if snap.version + 1 in numbers["commits"]:
        return True
    if any(v > snap.version for v in numbers["checkpoints"]):
        raise _Compacted()
    later = [v for v in numbers["commits"] if v > snap.version + 1]
    if later:
        raise StoreError(f"{commit_path(snap.store, snap.version + 1)}: missing, while the log has later commits "
                         f"(up to {max(later)}): the store's log is damaged")
    return False


def _listed(store: Path) -> dict[str, list[int]]:
    """The version numbers of the commits and checkpoints in the log folder."""
    out: dict[str, list[int]] = {"commits": [], "checkpoints": []}
    try:
        names = os.listdir(store / LOG_DIR)
    except FileNotFoundError:
        raise StoreError(f"{store / LOG_DIR}: missing (the store's log)") from None
    for name in names:
        stem = name[:_DIGITS]
        if stem.isdigit() and name == f"{stem}.json":
            out["commits"].append(int(stem))
        elif stem.isdigit() and name == f"{stem}.checkpoint.parquet":
            out["checkpoints"].append(int(stem))
    return out


def _parse_commit(data: bytes, path: Path, version: int) -> dict:
    try:
        commit = json.loads(data)
    except ValueError as exc:
        raise StoreError(f"{path}: damaged commit (not valid JSON: {exc})") from None
    if not isinstance(commit, dict) or commit.get("version") != version or not isinstance(commit.get("actions"), list):
        raise StoreError(f"{path}: damaged commit (expected an object with version {version} and a list of actions)")
    for key in ("txn", "operation", "committed"):
        if not isinstance(commit.get(key), str):
            raise StoreError(f"{path}: damaged commit ({key}: expected text, found {commit.get(key)!r})")
    return commit


def _last_checkpoint(store: Path) -> int:
    """The version of the checkpoint to start at (0: none): the pointer's, or where the pointer is missing or
    damaged, the newest in the log folder."""
    value = _pointer(store / LOG_DIR / LAST_CHECKPOINT)
    return value if value >= 0 else max(_listed(store)["checkpoints"], default=0)


def _pointer(path: Path) -> int:
    """The version a pointer file (`_last_checkpoint`, `_latest`) holds; -1 if it is missing or damaged: the
    pointers are hints, rewritten by writers, and the log stands without them."""
    try:
        value = json.loads(path.read_text()).get("version")
    except (OSError, ValueError, AttributeError):
        return -1
    return value if isinstance(value, int) and value >= 0 else -1


def _load_checkpoint(store: Path, version: int, marker: dict, reader: Reader) -> Snapshot:
    path = checkpoint_path(store, version)
    listed = _read_checkpoint_file(store, version, path, reader)
    if not (all(listed.kinds[name] == "string" for name in ("image", "label_image", "columns_id", "annotations"))
            and listed.kinds["n_objects"] == "integer"):
        raise StoreError(f"{path}: damaged checkpoint (a column of another type)")
    entries = entries_path(store, version)  # opened now: a compaction may remove its name later
    texts = _read_checkpoint_file(store, version, entries, reader)
    base = _Listed(path, listed, _CheckpointTexts(texts, entries))
    # a table given twice shares its image with another: the tuples of the keys only when images repeat (a
    # set of 10,000 tuples costs a garbage collection of the whole heap right after the engines' imports)
    if len(set(base.images)) != len(base) and len(set(zip(base.images, base.label_images))) != len(base):
        raise StoreError(f"{path}: damaged checkpoint (a table given twice)")
    if texts.names != ["entry"] or texts.kinds["entry"] != "string" or texts.num_rows != len(base) \
            or listed.num_rows != len(base):
        raise StoreError(f"{entries}: damaged checkpoint (expected a text column `entry` with a row for each of "
                         f"the {len(base)} tables {path.name} lists)")
    return Snapshot(store, version, marker, base, reader=reader)


def _read_checkpoint_file(store: Path, version: int, path: Path, reader: Reader) -> ParquetColumns:
    """A checkpoint file, opened (footer read) by `reader`."""
    try:
        columns = reader(path)
        missing = [name for name in (CHECKPOINT_COLUMNS if path.name.endswith(".checkpoint.parquet") else ())
                   if name not in columns.names]
    except FileNotFoundError:
        if any(v > version for v in _listed(store)["checkpoints"]):
            raise _Compacted() from None  # a reader sent to a checkpoint a compaction removed meanwhile
        raise StoreError(f"{path}: missing (the checkpoint {LOG_DIR}/{LAST_CHECKPOINT} names)") from None
    except (OSError, ValueError) as exc:  # pyarrow.ArrowInvalid is a ValueError
        raise StoreError(f"{path}: damaged checkpoint ({' '.join(str(exc).split())})") from None
    if missing:
        raise StoreError(f"{path}: damaged checkpoint (no column {missing[0]!r})")
    return columns


class ParquetColumns(Protocol):
    """A checkpoint file as the log reads it (`Reader` opens one): its columns' names and kinds ("string",
    "integer" or another), row count and row groups' sizes, key-value metadata, the null count of a column from
    its statistics (None without them), and columns or a row group's column read as Python lists. Reading
    raises OSError or ValueError where the file is damaged, opening FileNotFoundError where it is missing."""

    names: list[str]
    kinds: dict[str, str]
    num_rows: int
    group_rows: list[int]
    metadata: dict[str, str]

    def null_count(self, name: str) -> int | None: ...

    def read(self, names: list[str]) -> list[list]: ...

    def read_group(self, group: int, name: str) -> list: ...


Reader = Callable[[Path], ParquetColumns]


class ArrowColumns:
    """A checkpoint file read with pyarrow (the default `Reader`). Its bytes are read at once and parsed from
    memory (a first read through pyarrow's file readers costs a fresh process a few milliseconds more than the
    file does); the columns are decoded when asked for. The bytes stay in memory: a compaction may remove the
    file's name meanwhile. Read with the Parquet reader that `pyarrow.parquet.ParquetFile` wraps: importing
    `pyarrow.parquet` loads pyarrow's filesystems too (20 ms of a fresh process), which a file read from memory
    never uses; its reader module alone loads in 1 ms (pq.read_table would load pyarrow.dataset and pandas)."""

    def __init__(self, path: Path):
        self._file = _parquet.ParquetReader()
        with open(path, "rb") as file:
            self._file.open(pa.BufferReader(file.read()))
        schema, footer = self._file.schema_arrow, self._file.metadata
        self.names = schema.names
        self.kinds = {f.name: "string" if pa.types.is_string(f.type) else "integer" if pa.types.is_integer(f.type)
                      else str(f.type) for f in schema}
        self.num_rows = footer.num_rows
        self.group_rows = [footer.row_group(g).num_rows for g in range(footer.num_row_groups)]
        self.metadata = {k.decode(errors="replace"): v.decode(errors="replace") for k, v in (schema.metadata or {}).items()}

    def null_count(self, name: str) -> int | None:
        footer, column = self._file.metadata, self.names.index(name)
        nulls = 0
        for group in range(footer.num_row_groups):
            statistics = footer.row_group(group).column(column).statistics
            if statistics is None or not statistics.has_null_count:
                return None
            nulls += statistics.null_count
        return nulls

    def read(self, names: list[str]) -> list[list]:
        indices = [self.names.index(name) for name in names]
        return [column.to_pylist() for column in self._file.read_all(column_indices=indices, use_threads=False).columns]

    def read_group(self, group: int, name: str) -> list:
        indices = [self.names.index(name)]
        return self._file.read_row_group(group, column_indices=indices, use_threads=False).column(0).to_pylist()


@cache
def _columns_cached(path: Path, mtime_ns: int) -> tuple[dict, ...]:
    specs = layout.read_json(path, "column list of a table")
    problem = layout.columns_problem(specs)
    if problem:
        raise StoreError(f"{path}: damaged column list ({problem})")
    return tuple(specs)


def read_columns(store: Path, columns_id: str) -> list[dict]:
    path = columns_path(store, columns_id)
    try:
        mtime = path.stat().st_mtime_ns
    except FileNotFoundError:
        raise StoreError(f"{path}: missing (the column list of a table)") from None
    return [dict(c) for c in _columns_cached(path, mtime)]


# -- writing ---------------------------------------------------------------------------------------------
def new_store(store: Path, created: str, extra: dict[str, Any] | None = None) -> Path:
    """A new, empty store assembled in a temporary sibling directory of `store`, for `place_store` to move into
    place once a first write has put its data files into it."""
    store = Path(store)
    staging = store.parent / f"{TMP_PREFIX}{store.name}-{uuid.uuid4().hex[:12]}"
    (staging / LOG_DIR / COLUMNS_DIR).mkdir(parents=True)
    marker = {"format": FORMAT, "format_version": FORMAT_VERSION, "created": created, **(extra or {})}
    _write_new(staging / MARKER, json.dumps(marker, indent=2).encode() + b"\n")
    return staging


def place_store(staging: Path, store: Path) -> None:
    """Rename the store assembled in `staging` to `store`, unless another writer has just made `store` a store:
    then move the files written into `staging` there. rename(2) replaces an empty directory and fails on a
    non-empty one, so of writers racing to create one store, one wins and the others join the store it made."""
    try:
        os.rename(staging, store)
        return
    except OSError:  # not empty: another writer's new store, or something else
        if not is_store(store):
            _remove_tree(staging)
            raise StoreError(f"{store}: exists and is not an empty directory or a cellar store; refusing to "
                             "write into it") from None
    try:
        for path in sorted(staging.rglob("*")):
            rel = path.relative_to(staging)
            if path.is_file() and rel.parts[0] not in (LOG_DIR, MARKER):
                (store / rel).parent.mkdir(parents=True, exist_ok=True)
                os.replace(path, store / rel)
    finally:
        _remove_tree(staging)


def write_columns(store: Path, specs: list[dict]) -> str:
    """Store a table's column specs by content; returns their id (the same specs, the same file). A file of
    that id that does not hold these bytes is damaged: a StoreError, no table is added on top of it."""
    data = json.dumps(specs, sort_keys=True, separators=(",", ":")).encode()
    columns_id = hashlib.sha256(data).hexdigest()[:32]
    path = columns_path(store, columns_id)
    path.parent.mkdir(parents=True, exist_ok=True)
    if not _create_if_absent(path, data):  # another writer's of these very specs, or a damaged one
        raise StoreError(f"{path}: damaged column list (it does not hold the columns its name is the hash of)")
    return columns_id


def commit(store: Path, operation: str, decide: Callable[[Snapshot], list[dict] | None],
           *, start: Snapshot | None = None, max_attempts: int = 10_000) -> Snapshot | None:
    """Commit the actions `decide(snapshot)` returns for the latest state; returns the new state, or None if
    `decide` returned None (nothing to do). When another writer takes the next version first, `decide` runs
    again on the new state: it raises (a conflict) or returns actions for that state. `start`: a snapshot of
    the store the caller has read (brought up to date here, and changed), so the log is not read again."""
    store = Path(store)
    snap = advance(start) if start is not None else snapshot(store)
    if snap._base is not None:
        snap._base.check()  # a damaged checkpoint refuses the write, before anything is committed
    txn = uuid.uuid4().hex
    for attempt in range(max_attempts):
        actions = decide(snap)
        if actions is None:
            return None
        _check_actions(store, actions)
        version = snap.version + 1
        record = {"version": version, "txn": txn, "operation": operation, "committed": _now(),
                  "actions": actions}
        data = json.dumps(record, separators=(",", ":")).encode()
        if _create_if_absent(commit_path(store, version), data):
            snap.apply(actions, commit_path(store, version))
            snap.version = version
            _advance_pointer(store / LOG_DIR / LATEST, version)
            if version % CHECKPOINT_EVERY == 0:
                write_checkpoint(snap)
            return snap
        time.sleep(min(0.05, 0.001 * attempt))  # another writer took it: catch up and decide again
        snap = advance(snap)
    raise StoreError(f"{store}: could not commit after {max_attempts} attempts (other writers kept committing)")


def _check_actions(store: Path, actions: list[dict]) -> None:
    """Refuse actions a reader would call damaged (a table entry or annotation record of the wrong shape), before
    they are committed: a commit is never taken back."""
    for action in actions:
        for kind, value in action.items():
            problem = (layout.entry_problem(value) if kind == "add" else
                       layout.record_problem(value.get("record")) if kind == "annotate" else None)
            if problem:
                raise StoreError(f"{store}: refusing to commit a {kind} action ({problem})")


def write_checkpoint(snap: Snapshot) -> None:
    """Write the state at `snap.version` as a checkpoint, point readers at it, and remove the commits and
    checkpoints that no reader needs any more (those more than LOG_KEPT versions old)."""
    store, version = snap.store, snap.version
    rows = list(snap._stored())
    keys, counts, columns_ids, texts, annotations = (list(c) for c in zip(*rows)) if rows else ([],) * 5
    # two files: the entries (read a row group at a time, when a table is touched) before the table list
    # that names them by row (read whole on every open: one row group)
    _write_parquet(entries_path(store, version), pa.table({"entry": pa.array(texts, pa.string())}),
                   CHECKPOINT_ROW_GROUP)
    table = pa.table({"image": pa.array([k[0] for k in keys], pa.string()),
                      "label_image": pa.array([k[1] for k in keys], pa.string()),
                      "n_objects": pa.array(counts, pa.int64()),
                      "columns_id": pa.array(columns_ids, pa.string()),
                      "annotations": pa.array(annotations, pa.string())},
                     metadata={DISTINCT_KEY: json.dumps(list(dict.fromkeys(columns_ids)))})
    # plain, uncompressed: the table list is read whole on every open, and a few hundred KiB at 10,000 tables
    _write_parquet(checkpoint_path(store, version), table, max(len(keys), 1), compression="none",
                   use_dictionary=["label_image", "columns_id"])
    _advance_pointer(store / LOG_DIR / LAST_CHECKPOINT, version)
    _compact(store, version - LOG_KEPT)


def _write_parquet(final: Path, table: Any, row_group_size: int, **options: Any) -> None:
    with atomic_write(final) as tmp:  # the same state whoever writes it: replacing is harmless
        pq.write_table(table, tmp, row_group_size=row_group_size, **({"compression": "zstd"} | options))


def _advance_pointer(path: Path, version: int) -> None:
    """Point `path` at `version` unless it points further already (writers race; a pointer that falls
    behind only makes readers read a few more commits)."""
    if _pointer(path) < version:
        layout.write_json_atomic(path, {"version": version}, indent=None)


def _compact(store: Path, keep_from: int) -> None:
    """Remove commit files up to `keep_from` and checkpoints before it (a reader that started from the
    checkpoint at `keep_from`, or a later one, finds every commit it needs)."""
    if keep_from <= 0:
        return
    for path in (store / LOG_DIR).iterdir():
        stem = path.name[:_DIGITS]
        if not stem.isdigit():
            continue
        number = int(stem)
        is_checkpoint = path.name.endswith((".checkpoint.parquet", ".entries.parquet"))
        if (is_checkpoint and number < keep_from) or (not is_checkpoint and number <= keep_from):
            path.unlink(missing_ok=True)


def _create_if_absent(path: Path, data: bytes) -> bool:
    """Create `path` holding `data`, whole, unless it exists; True if this call created it.

    The bytes go to a temporary file first and are hard-linked to `path`: readers never see a partial file,
    and link(2) fails if the name exists (atomically, locally and on NFS). On NFS a retransmitted LINK whose
    first attempt succeeded answers "exists": the file then holds these very bytes, and counts as ours. (Not
    `atomic_write(overwrite=False)`: without hard links it falls back to a check and a rename, and a commit
    must never replace another's.)"""
    tmp = temp_path(path)
    try:
        _write_new(tmp, data)
        try:
            os.link(tmp, path)
        except FileExistsError:
            try:
                return path.read_bytes() == data
            except FileNotFoundError:  # compacted meanwhile: long superseded, not ours
                return False
        except OSError as exc:
            raise StoreError(f"{path.parent}: cannot create a commit ({exc.strerror or exc}); the store's file "
                             "system must support hard links (local disks and NFS do)") from None
        fsync_dir(path.parent)
        return True
    finally:
        tmp.unlink(missing_ok=True)


def _write_new(path: Path, data: bytes) -> None:
    with open(path, "xb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())


def _remove_tree(path: Path) -> None:
    import shutil

    shutil.rmtree(path, ignore_errors=True)


def _now() -> str:
    import datetime as dt

    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="milliseconds")


def upgrade(store: Path) -> int:
    """Convert a store of format 1 (one `manifest.json`, rewritten by every write) to the commit log, in place;
    returns the number of tables. Run it once, with no writer at work on the store."""
    store = Path(store)
    if is_store(store):
        raise StoreError(f"{store}: already a store of format {FORMAT_VERSION}")
    path = store / "manifest.json"
    manifest = layout.read_json(path, "format-1 manifest")
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT or manifest.get("format_version") != 1:
        raise StoreError(f"{path}: not a manifest of a format-1 cellar store")
    if not isinstance(manifest.get("tables"), list):
        raise StoreError(f"{path}: damaged manifest (no list of tables)")
    (store / LOG_DIR / COLUMNS_DIR).mkdir(parents=True, exist_ok=True)
    actions = []
    for i, table in enumerate(manifest["tables"]):
        entry = dict(table) if isinstance(table, dict) else {}
        if isinstance(entry.get("image"), str):  # queries always saw the Hive folder's value: it is the name
            entry["image"] = layout.partition_value(entry["image"])
        specs = entry.pop("columns", None)
        problem = layout.columns_problem(specs)
        if problem is None:
            entry["columns_id"] = write_columns(store, specs)
            problem = layout.entry_problem(entry)
        if problem:
            raise StoreError(f"{path}: damaged manifest (tables[{i}]: {problem})")
        actions.append({"add": entry})
    record = {"version": 1, "txn": uuid.uuid4().hex, "operation": "upgrade", "committed": _now(), "actions": actions}
    if not _create_if_absent(commit_path(store, 1), json.dumps(record, separators=(",", ":")).encode()):
        raise StoreError(f"{store}: {commit_path(store, 1)} exists: another upgrade ran at the same time")
    marker = {"format": FORMAT, "format_version": FORMAT_VERSION, "created": manifest.get("created", _now()),
              "upgraded": _now()}
    _create_if_absent(store / MARKER, json.dumps(marker, indent=2).encode() + b"\n")
    os.replace(path, store / "manifest-format-1.json")  # kept for reference; nothing reads it
    layout.remove_stale_caches(store, None)  # named by the old manifest's hash
    return len(actions)

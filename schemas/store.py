"""The on-disk layout of a cellar store: the contract between `measure/` (writer) and `query/` (reader).

A store is a directory::

    STORE/
      cellar.json                         the marker: format and version (`schemas.log`)
      log/                                the commit log: which tables the store holds, with their files,
                                          columns and provenance (`schemas.log`)
      schema.json                         copy of schemas/objects.json (the column templates)
      objects/image=IMG/label_image=LBL/part-<run>.parquet   one row per object (LZ4)
      annotations/image=IMG/label_image=LBL/version=N/part-<run>.parquet   annotation versions
      cache/objects-<version>.arrow       optional: the session cache on disk (`cellar cache`, query.hotcache)

Each (image, label image) pair is one *table*, one Hive partition. Within a table the rows are in Hilbert-curve
order of their centroids (`spatial_order`), so that a row group holds objects that lie close together and its
min/max statistics on the centroid columns let a spatial query skip the row groups outside its box; filters on
other columns skip row groups through the same statistics when their values cluster in space. The log lists
the committed tables with their files; a reader reads only what the log lists, so a file that is still being
written (or was abandoned by a crash) is invisible. Data files are written under names of their own, then
committed. The cache files are derived data named by the store's version (`cache_path`): a write makes them
stale, and writers remove stale ones.

`entry_problem` checks a table entry's structure against `TABLE_SPEC`, so that a damaged log is one line
naming the file and key, never a KeyError or TypeError further on; `schemas.integrity` checks Parquet files.
"""

from __future__ import annotations

import datetime as dt
import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any


from . import lazy
from .atomic import TMP_PREFIX, atomic_write
from .errors import StoreError

np = lazy.module("numpy")

SCHEMA = "schema.json"
OBJECTS_DIR = "objects"
# the centroid columns, in pixels and micrometres: the spatial indexes (row files, session cache) keep their ranges
CENTROID_COLUMNS = ("centroid_x", "centroid_y", "centroid_z", "centroid_x_um", "centroid_y_um", "centroid_z_um")
CACHE_DIR = "cache"
_CACHE_KINDS = {"objects": ".arrow", "rows": ".npy", "stats": ".json", "places": ".npy", "ranges": ".npy"}

_SAFE = re.compile(r"[^A-Za-z0-9_]+")
_PARTITION_SAFE = re.compile(r"[^A-Za-z0-9._-]+")


def identifier(name: str) -> str:
    """A lower-risk SQL/Python identifier made from `name` (`'DAPI 405'` -> `'DAPI_405'`)."""
    out = _SAFE.sub("_", str(name)).strip("_") or "c"
    return "_" + out if out[0].isdigit() else out


def unique_identifiers(names: list[str]) -> list[str]:
    """`identifier` of each name, made unique by a numeric suffix where two collide."""
    seen: dict[str, int] = {}
    out = []
    for name in names:
        base = identifier(name)
        ident, k = base, 1
        while ident in seen:
            k += 1
            ident = f"{base}_{k}"
        seen[ident] = 1
        out.append(ident)
    return out


def partition_value(name: str) -> str:
    """A Hive partition value safe in a path and in DuckDB's and polars' Hive parsers."""
    name = str(name)
    if name.isascii() and name.replace(".", "").replace("_", "").replace("-", "").isalnum() \
            and name[0] not in "._" and name[-1] not in "._":  # safe already (most names; 10x faster)
        return name
    return _PARTITION_SAFE.sub("_", name).strip("._") or "_"


def table_dir(image: str, label_image: str) -> str:
    """The store-relative directory of the (image, label image) table."""
    return f"{OBJECTS_DIR}/image={partition_value(image)}/label_image={partition_value(label_image)}"


def now() -> str:
    """The current UTC time as recorded in manifests."""
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


def spatial_order(y: np.ndarray, x: np.ndarray, bits: int = 16) -> np.ndarray:
    """The permutation that puts points (y, x) in the order of a Hilbert curve over their bounding box,
    on a 2^bits x 2^bits grid (ties and NaN coordinates keep their input order, NaN last)."""
    y, x = np.asarray(y, np.float64), np.asarray(x, np.float64)
    if len(y) == 0:
        return np.zeros(0, np.int64)
    side = (1 << bits) - 1

    def grid(v: np.ndarray) -> np.ndarray:
        finite = np.isfinite(v)
        lo, hi = (v[finite].min(), v[finite].max()) if finite.any() else (0.0, 0.0)
        q = np.where(finite, (v - lo) / (hi - lo) * side if hi > lo else 0.0, side)
        return np.clip(q, 0, side).astype(np.int64)

    gx, gy = grid(x), grid(y)
    d = np.zeros(len(gx), np.int64)
    s = 1 << (bits - 1)
    while s > 0:  # the classic xy -> d conversion, one bit level at a time for all points
        rx = (gx & s) > 0
        ry = (gy & s) > 0
        d += s * s * ((3 * rx) ^ ry)
        flip = ~ry & rx
        gx = np.where(flip, side - gx, gx)
        gy = np.where(flip, side - gy, gy)
        gx, gy = np.where(~ry, gy, gx), np.where(~ry, gx, gy)
        s >>= 1
    return np.argsort(d, kind="stable")


def read_json(path: Path, what: str) -> Any:
    """The JSON document in `path`; a file that is missing, unreadable or not JSON is a StoreError naming it
    (`what` says what the file is, for the message)."""
    try:
        text = path.read_bytes().decode("utf-8")
        return json.loads(text)
    except FileNotFoundError:
        raise StoreError(f"{path}: missing (the {what})") from None
    except UnicodeDecodeError:
        raise StoreError(f"{path}: not valid JSON (not UTF-8 text): the {what} is damaged") from None
    except ValueError as exc:  # json.JSONDecodeError
        if not text.strip():
            raise StoreError(f"{path}: an empty file, not JSON: the {what} is damaged") from None
        raise StoreError(f"{path}: not valid JSON ({exc}): the {what} is truncated or damaged") from None
    except OSError as exc:
        raise StoreError(f"{path}: cannot read the {what} ({exc.strerror or exc})") from None


# A table entry's structure, as commits and checkpoints hold it. An object is {key: (spec, required)}; a one-item
# list is a list of that; a type or tuple of types is checked with isinstance (a bool is not a number). Entries
# written by `measure.store_write.write_table` hold the required keys whatever their caller gives (the query
# benchmark writes tables without provenance); `measure` adds the rest. A key that is present must have its type.
_NUMBER = (int, float)
_DIR, _FILE = object(), object()  # text naming a folder inside the store / a file in that folder
_COLUMN = {"name": (str, True), "dtype": (str, True), "unit": (str, True), "description": (str, True)}
_VERSION = {
    "version": (int, True), "dir": (_DIR, True), "files": ([_FILE], True), "columns": ([{
        "name": (str, True), "dtype": (str, True)}], True),
    "source": (str, True), "created": (str, True), "rows": (int, False), "dropped_unknown": (int, False),
}
_SETTINGS = {
    "url": (str, False), "labels": (str, False), "level": (int, False), "timepoint": (int, False),
    "channels": ([str], False), "features": ([str], False), "radius": ((*_NUMBER, type(None)), False),
    "texture_levels": (int, False), "context": (dict, False),
}
_SOURCE = {"url": (str, True), "ngff_version": (str, False), "zarr_format": (int, False),
           "image_path": (str, False), "label_path": (str, False)}
_TABLE = {
    "image": (str, True), "label_image": (str, True), "dir": (_DIR, True), "files": ([_FILE], True),
    "n_objects": (int, True), "columns_id": (str, True), "created": (str, True),
    "channels": ([{"index": (int, True), "name": (str, True), "column": (str, True)}], False),
    "annotations": ([_VERSION], False), "cellar_version": (str, False), "source": (_SOURCE, False),
    "level": (int, False), "timepoint": ((int, type(None)), False), "axes": ([str], False),
    "shape": ([int], False), "pixel_size": ([_NUMBER], False), "pixel_unit": ([(str, type(None))], False),
    "translation": ([_NUMBER], False), "spacing_um": (([_NUMBER], type(None)), False),
    "features": ([str], False), "radius": ((*_NUMBER, type(None)), False),
    "texture_levels": ((int, type(None)), False), "halo": (int, False), "settings": (_SETTINGS, False),
    "context": (dict, False), "regions": (int, False), "workers": (int, False), "elapsed_s": (_NUMBER, False),
}
TABLE_SPEC = _TABLE


def entry_problem(entry: Any) -> str | None:
    """What is wrong with a table entry's structure (`TABLE_SPEC`), or None: the first key with a missing or
    mistyped value."""
    problem = None if _TABLE_OK(entry) else _spec_problem(entry, TABLE_SPEC, "")
    if problem is None and not entry["files"]:
        return "files: an empty list (a table has at least one file)"
    if problem is None and partition_value(entry["image"]) != entry["image"]:  # as queries see it: one name
        return f"image: {entry['image']!r} is not a partition value (letters, digits, '.', '_', '-')"
    return problem


def record_problem(record: Any) -> str | None:
    """What is wrong with an annotation version's record, or None."""
    return None if _VERSION_OK(record) else _spec_problem(record, _VERSION, "record")


def columns_problem(specs: Any) -> str | None:
    """What is wrong with a table's column list, or None."""
    return None if _COLUMNS_OK(specs) else _spec_problem(specs, [_COLUMN], "columns")


def _spec_problem(value: Any, spec: Any, where: str) -> str | None:
    if isinstance(spec, dict):
        if not isinstance(value, dict):
            return f"{where or 'the document'}: expected an object, found {_kind(value)}"
        for key, (sub, required) in spec.items():
            if key not in value:
                if required:
                    return f"{where + ': ' if where else ''}no '{key}'"
                continue
            problem = _spec_problem(value[key], sub, f"{where}.{key}" if where else key)
            if problem:
                return problem
        return None
    if isinstance(spec, list):
        if not isinstance(value, list):
            return f"{where}: expected a list, found {_kind(value)}"
        if _plainly(value, spec[0]):
            return None
        for i, item in enumerate(value):
            problem = _spec_problem(item, spec[0], f"{where}[{i}]")
            if problem:
                return problem
        return None
    if spec is _DIR or spec is _FILE:
        parts = value.split("/") if isinstance(value, str) else [""]
        if "" in parts or ".." in parts or "." in parts or (spec is _FILE and len(parts) > 1):
            return f"{where}: {_kind(value)} is not a {'file name' if spec is _FILE else 'folder'} inside the store"
        return None
    if isinstance(spec, tuple) and any(isinstance(s, (list, dict)) for s in spec):  # a list or None
        if value is None and type(None) in spec:
            return None
        return _spec_problem(value, next(s for s in spec if isinstance(s, (list, dict))), where)
    types = spec if isinstance(spec, tuple) else (spec,)
    if (isinstance(value, bool) and bool not in types) or not isinstance(value, types):
        names = dict.fromkeys(_TYPE_NAMES.get(t, t.__name__) for t in types if not (t is int and float in types))
        return f"{where}: expected {' or '.join(names)}, found {_kind(value)}"
    return None


def _plainly(items: list, spec: Any) -> bool:
    """True if every item is a value of the plain type `spec`, or an object with every key of a flat `spec`
    of plain types: the bulk of a large manifest (column lists, feature lists) checked in one pass; False
    leaves the list to the item-by-item check, which finds the problem."""
    if isinstance(spec, type):
        return all(type(v) is spec for v in items)
    if isinstance(spec, dict) and all(required and isinstance(sub, type) for sub, required in spec.values()):
        fields = [(key, sub) for key, (sub, _) in spec.items()]
        return all(type(v) is dict and all(type(v.get(k)) is t for k, t in fields) for v in items)
    return False


def _passes(spec: Any) -> Callable[[Any], bool]:
    """A compiled check of `spec`: True only where `_spec_problem` finds nothing (values of exactly the listed
    types, as JSON gives them: stricter than its isinstance), so a False sends the value to `_spec_problem`,
    which names the problem. A store of 1,000 tables checks 1,000 entries on a query's first use of them: one
    call per value here, not a recursion through the spec with a path built at every step."""
    if isinstance(spec, dict):
        fields = [(key, _passes(sub), required) for key, (sub, required) in spec.items()]

        def check_object(value: Any) -> bool:
            if type(value) is not dict:
                return False
            for key, check, required in fields:
                if key in value:
                    if not check(value[key]):
                        return False
                elif required:
                    return False
            return True
        return check_object
    if isinstance(spec, list):
        if isinstance(spec[0], (type, tuple)) and not any(isinstance(s, (list, dict)) for s in _tuple(spec[0])):
            types = frozenset(_tuple(spec[0]))  # a list of plain values: their types in one pass in C
            return lambda value: type(value) is list and types.issuperset(map(type, value))
        item = _passes(spec[0])
        return lambda value: type(value) is list and all(map(item, value))
    if spec is _DIR or spec is _FILE:
        return lambda value: type(value) is str and _spec_problem(value, spec, "") is None
    if isinstance(spec, tuple) and any(isinstance(s, (list, dict)) for s in spec):  # a list or None
        inner = _passes(next(s for s in spec if isinstance(s, (list, dict))))
        return lambda value: (value is None and type(None) in spec) or inner(value)
    exact = frozenset(spec if isinstance(spec, tuple) else (spec,))
    return lambda value: type(value) in exact


def _tuple(spec: Any) -> tuple:
    return spec if isinstance(spec, tuple) else (spec,)


_TABLE_OK, _VERSION_OK, _COLUMNS_OK = _passes(TABLE_SPEC), _passes(_VERSION), _passes([_COLUMN])
_TYPE_NAMES = {str: "text", int: "a whole number", float: "a number", dict: "an object", type(None): "null"}


def _kind(value: Any) -> str:
    """`value`'s JSON type in words, with the value when it is short."""
    if isinstance(value, (dict, list)):
        return "an object" if isinstance(value, dict) else "a list"
    if value is None or isinstance(value, bool):
        return json.dumps(value)
    text = json.dumps(value)
    text = text if len(text) <= 40 else text[:37] + "..."
    return f"text {text}" if isinstance(value, str) else f"the number {text}"


def write_json_atomic(path: Path, obj: Any, indent: int | None = 2) -> None:
    """Write JSON to `path` atomically (`atomic.atomic_write`: a temporary file beside it, fsync, rename over
    it). The file gets the permissions of any new file (the umask's), so a store shared with a group stays
    readable by it."""
    with atomic_write(path) as tmp, open(tmp, "x") as fh:
        json.dump(obj, fh, indent=indent, sort_keys=False, separators=None if indent else (",", ":"))
        fh.write("\n")


def cache_path(store: Path, version: int, kind: str = "objects") -> Path:
    """Where the session cache of version `version` of the store lives (a version's state never changes, so
    every write gives a new name and a cache never goes stale unnoticed). `kind`: "objects" (the columnar
    Arrow file), "rows" (the optional row-major copy), "stats" (batch and block ends, the names the other
    files index), "places" (where the columns' buffers lie) or "ranges" (each block's min and max of the
    centroid columns)."""
    return Path(store) / CACHE_DIR / f"{kind}-{version:020d}{_CACHE_KINDS[kind]}"


def cache_sibling(path: Path, kind: str) -> Path:
    """The `kind` file of the same state as the cache file `path`."""
    _, digest = Path(path).stem.split("-", 1)
    return Path(path).with_name(f"{kind}-{digest}{_CACHE_KINDS[kind]}")


def remove_stale_caches(store: Path, version: int | None) -> int:
    """Remove the session cache files of versions before `version` (all of them for None) and abandoned
    temporary ones; returns how many. A cache of a later version (written after another writer's commit) is
    kept. A reader that has a removed file mapped keeps its pages until it closes."""
    folder = Path(store) / CACHE_DIR
    if not folder.is_dir():
        return 0
    removed = 0
    for path in folder.iterdir():
        kind, _, rest = path.name.partition("-")
        digits = rest.split(".", 1)[0]
        ours = kind in _CACHE_KINDS and digits.isdigit()
        if (ours and (version is None or int(digits) < version)) or path.name.startswith(TMP_PREFIX):
            path.unlink(missing_ok=True)
            removed += 1
    try:
        folder.rmdir()  # only if empty
    except OSError:
        pass
    return removed

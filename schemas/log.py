"""The store's commit log: how writers change a store and readers see it, with any number of both at once.

A store's state (its tables, their files, columns and annotation versions) is the sum of its commits::

    STORE/
      cellar.json                                the marker: format, format version, creation
      log/00000000000000000001.json              commit 1: the actions of one write
      log/00000000000000000002.json              ...
      log/00000000000000000100.checkpoint.parquet  the state after commit 100, one row per table
      log/_last_checkpoint                       {"version": 100}: where readers start
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
removes the commit files and checkpoints older than the one before, so reading the state costs the same at
10 tables and at 10,000.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

from schemas import store as layout
from schemas.errors import StoreError

FORMAT = "cellar-store"
FORMAT_VERSION = 2
MARKER = "cellar.json"
LOG_DIR = "log"
COLUMNS_DIR = "columns"
LAST_CHECKPOINT = "_last_checkpoint"
LATEST = "_latest"  # {"version": N}: the newest commit its writer knew of, so that a lost last commit shows
CHECKPOINT_EVERY = 100
TMP_PREFIX = layout.TMP_PREFIX
_DIGITS = 20
_READ_ATTEMPTS = 8  # a reader restarts when a checkpoint it was sent to is compacted away meanwhile
CHECKPOINT_COLUMNS = ("image", "label_image", "n_objects", "columns_id", "annotations", "entry")


def commit_path(store: Path, version: int) -> Path:
    return Path(store) / LOG_DIR / f"{version:0{_DIGITS}d}.json"


def checkpoint_path(store: Path, version: int) -> Path:
    return Path(store) / LOG_DIR / f"{version:0{_DIGITS}d}.checkpoint.parquet"


def columns_path(store: Path, columns_id: str) -> Path:
    return Path(store) / LOG_DIR / COLUMNS_DIR / f"{columns_id}.json"


@dataclass
class Snapshot:
    """The state of a store at one version: its tables by (image, label image), in the order they were added.

    Table entries are dicts: image, label_image, dir, files, n_objects, columns_id, provenance, annotations.
    Entries read from a checkpoint stay JSON text until first used (`entry`), so a store of 10,000 tables opens
    without parsing them; the keys, object counts, column-list ids and annotation versions need no parsing.
    """

    store: Path
    version: int
    marker: dict[str, Any]
    _entries: dict[tuple[str, str], dict | str] = field(default_factory=dict)
    _counts: dict[tuple[str, str], int] = field(default_factory=dict)
    _columns_ids: dict[tuple[str, str], str] = field(default_factory=dict)
    _annotations: dict[tuple[str, str], str | None] = field(default_factory=dict)  # JSON text, unparsed entries
    _checkpoint: Path | None = None  # the file the entries still in text come from

    @property
    def keys(self) -> list[tuple[str, str]]:
        return list(self._entries)

    def entry(self, image: str, label_image: str) -> dict | None:
        """The entry of table (image, label image), or None."""
        key = (image, label_image)
        value = self._entries.get(key)
        if isinstance(value, str):  # as a checkpoint holds it: the entry and its annotations apart
            value = _parse_entry(value, self._checkpoint)
            text = self._annotations.pop(key, None)
            if text:
                value["annotations"] = _parse_records(text, self._checkpoint)
            self._entries[key] = value
        return value

    def entries(self) -> Iterator[dict]:
        """Every table's entry (parsing those not parsed yet)."""
        for image, label_image in self.keys:
            yield self.entry(image, label_image)

    def n_objects(self, image: str, label_image: str) -> int:
        return self._counts[(image, label_image)]

    def columns_id(self, image: str, label_image: str) -> str:
        return self._columns_ids[(image, label_image)]

    def annotations(self, image: str, label_image: str) -> list[dict]:
        """The table's annotation versions (without parsing its entry)."""
        key = (image, label_image)
        if key in self._annotations:
            text = self._annotations[key]
            return _parse_records(text, self._checkpoint) if text else []
        return self.entry(*key).get("annotations") or []

    @property
    def total_objects(self) -> int:
        return sum(self._counts.values())

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: tuple[str, str]) -> bool:
        return key in self._entries

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
            self._entries[key] = value
            self._counts[key] = int(value["n_objects"])
            self._columns_ids[key] = value["columns_id"]
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
            if key not in self._entries:
                raise KeyError(f"no table image={key[0]!r} label_image={key[1]!r}")
            self._forget(key)
        else:
            raise ValueError(f"unknown action {kind!r}")

    def _forget(self, key: tuple[str, str]) -> None:
        for table in (self._entries, self._counts, self._columns_ids, self._annotations):
            table.pop(key, None)


def _parse_records(text: str, where: Path | None) -> list[dict]:
    try:
        records = json.loads(text)
    except ValueError as exc:
        raise StoreError(f"{where}: damaged checkpoint (annotation versions not JSON: {exc})") from None
    if not isinstance(records, list) or not all(isinstance(r, dict) and isinstance(r.get("version"), int)
                                                for r in records):
        raise StoreError(f"{where}: damaged checkpoint (annotation versions: expected a list of records)")
    return records


def _parse_entry(text: str, where: Path) -> dict:
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


def snapshot(store: Path) -> Snapshot:
    """The store's latest state."""
    store = Path(store)
    marker = read_marker(store)
    for _ in range(_READ_ATTEMPTS):
        start = _last_checkpoint(store)
        try:
            snap = _load_checkpoint(store, start, marker) if start else Snapshot(store, 0, marker)
            return _read_commits(snap)
        except _Compacted:
            continue
    raise StoreError(f"{store}/{LOG_DIR}: the log kept changing under this reader; try again")


def advance(snap: Snapshot) -> Snapshot:
    """`snap` brought up to the latest version (reads only the commits after it)."""
    try:
        return _read_commits(snap)
    except _Compacted:
        return snapshot(snap.store)


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


def _load_checkpoint(store: Path, version: int, marker: dict) -> Snapshot:
    import pyarrow.parquet as pq

    path = checkpoint_path(store, version)
    try:
        table = pq.read_table(path)
    except FileNotFoundError:
        if any(v > version for v in _listed(store)["checkpoints"]):
            raise _Compacted() from None  # a reader sent to a checkpoint a compaction removed meanwhile
        raise StoreError(f"{path}: missing (the checkpoint {LOG_DIR}/{LAST_CHECKPOINT} names)") from None
    except (OSError, ValueError) as exc:  # pyarrow.ArrowInvalid is a ValueError
        raise StoreError(f"{path}: damaged checkpoint ({' '.join(str(exc).split())})") from None
    try:
        columns = {name: table.column(name).to_pylist() for name in CHECKPOINT_COLUMNS}
    except KeyError as exc:
        raise StoreError(f"{path}: damaged checkpoint (no column {exc})") from None
    keys = list(zip(columns["image"], columns["label_image"]))
    counts, ids = columns["n_objects"], columns["columns_id"]
    if len(set(keys)) != len(keys) or not all(isinstance(n, int) and n >= 0 for n in counts) \
            or not all(isinstance(i, str) for i in ids):
        raise StoreError(f"{path}: damaged checkpoint (a table given twice, an object count that is not a whole "
                         "number, or a missing column-list id)")
    return Snapshot(store, version, marker, dict(zip(keys, columns["entry"])), dict(zip(keys, counts)),
                    dict(zip(keys, ids)), dict(zip(keys, columns["annotations"])), path)


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
           *, max_attempts: int = 10_000) -> Snapshot | None:
    """Commit the actions `decide(snapshot)` returns for the latest state; returns the new state, or None if
    `decide` returned None (nothing to do). When another writer takes the next version first, `decide` runs
    again on the new state: it raises (a conflict) or returns actions for that state."""
    store = Path(store)
    snap = snapshot(store)
    txn = uuid.uuid4().hex
    for attempt in range(max_attempts):
        actions = decide(snap)
        if actions is None:
            return None
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


def write_checkpoint(snap: Snapshot) -> None:
    """Write the state at `snap.version` as a checkpoint, point readers at it, and remove the commits and
    checkpoints that no reader needs any more (those older than the previous checkpoint)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    store, version = snap.store, snap.version
    keys = snap.keys
    texts, annotations = [], []
    for key in keys:
        value = snap._entries[key]
        if isinstance(value, str):  # still as the last checkpoint had it
            texts.append(value)
            annotations.append(snap._annotations.get(key))
        else:
            plain = {k: v for k, v in value.items() if k != "annotations"}
            texts.append(json.dumps(plain, separators=(",", ":")))
            annotations.append(json.dumps(value["annotations"], separators=(",", ":"))
                               if value.get("annotations") else None)
    table = pa.table({"image": [k[0] for k in keys], "label_image": [k[1] for k in keys],
                      "n_objects": pa.array([snap._counts[k] for k in keys], pa.int64()),
                      "columns_id": [snap._columns_ids[k] for k in keys],
                      "annotations": pa.array(annotations, pa.string()), "entry": pa.array(texts, pa.string())})
    final = checkpoint_path(store, version)
    tmp = final.with_name(f"{TMP_PREFIX}{uuid.uuid4().hex[:12]}.parquet")
    try:
        pq.write_table(table, tmp, compression="zstd")
        _fsync(tmp)
        os.replace(tmp, final)  # the same state whoever writes it: replacing is harmless
    finally:
        tmp.unlink(missing_ok=True)
    _advance_pointer(store / LOG_DIR / LAST_CHECKPOINT, version)
    _compact(store, version - CHECKPOINT_EVERY)


def _advance_pointer(path: Path, version: int) -> None:
    """Point `path` at `version` unless it points further already (writers race; a pointer that falls
    behind only makes readers read a few more commits)."""
    if _pointer(path) < version:
        _replace(path, json.dumps({"version": version}).encode())


def _compact(store: Path, keep_from: int) -> None:
    """Remove commit files up to `keep_from` and checkpoints before it (readers start at the last checkpoint or
    the one before)."""
    if keep_from <= 0:
        return
    for path in (store / LOG_DIR).iterdir():
        stem = path.name[:_DIGITS]
        if not stem.isdigit():
            continue
        number = int(stem)
        is_checkpoint = path.name.endswith(".checkpoint.parquet")
        if (is_checkpoint and number < keep_from) or (not is_checkpoint and number <= keep_from):
            path.unlink(missing_ok=True)


def _create_if_absent(path: Path, data: bytes) -> bool:
    """Create `path` holding `data`, whole, unless it exists; True if this call created it.

    The bytes go to a temporary file first and are hard-linked to `path`: readers never see a partial file,
    and link(2) fails if the name exists (atomically, locally and on NFS). On NFS a retransmitted LINK whose
    first attempt succeeded answers "exists": the file then holds these very bytes, and counts as ours."""
    tmp = path.with_name(f"{TMP_PREFIX}{uuid.uuid4().hex}")
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
        _fsync_dir(path.parent)
        return True
    finally:
        tmp.unlink(missing_ok=True)


def _write_new(path: Path, data: bytes) -> None:
    with open(path, "xb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())


def _replace(path: Path, data: bytes) -> None:
    tmp = path.with_name(f"{TMP_PREFIX}{uuid.uuid4().hex}")
    try:
        _write_new(tmp, data)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _fsync(path: Path) -> None:
    with open(path, "rb") as fh:
        os.fsync(fh.fileno())


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


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

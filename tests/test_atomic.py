"""The one atomic-write helper (`schemas.atomic.atomic_write`): a target appears whole or not at all, an existing
one is replaced whole or refused, directories too, and what a killed writer leaves is what `cellar vacuum`
removes."""

from __future__ import annotations

import errno
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from cellar import measure, query
from cellar.ngff.write import write_image
from cellar.schemas import store as layout
from cellar.schemas.atomic import atomic_write
from cellar.schemas.errors import UsageError
from helpers import intensities, nuclei_like, read_table, run_cli


def _write(path: Path, kind: str, text: str) -> None:
    """A file holding `text`, or a directory of two files holding it (as a Zarr or AnnData writer makes)."""
    if kind == "file":
        path.write_text(text)
    else:
        (path / "sub").mkdir(parents=True)
        (path / "a.json").write_text(text)
        (path / "sub" / "b").write_text(text)


def _read(path: Path) -> str | dict[str, str]:
    if path.is_file():
        return path.read_text()
    return {p.relative_to(path).as_posix(): p.read_text() for p in sorted(path.rglob("*")) if p.is_file()}


def _names(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


class Midway(Exception):
    pass


@pytest.mark.parametrize("kind", ["file", "dir"])
@pytest.mark.parametrize("existing", [False, True])
def test_a_writer_that_raises_midway_leaves_the_target_as_it_was_and_no_temporary(tmp_path, kind, existing):
    target = tmp_path / ("out.csv" if kind == "file" else "out.zarr")
    if existing:
        _write(target, kind, "old")
    before = _names(tmp_path), _read(target) if existing else None
    with pytest.raises(Midway):
        with atomic_write(target) as tmp:
            _write(tmp, kind, "half")
            raise Midway()
    assert (_names(tmp_path), _read(target) if existing else None) == before


@pytest.mark.parametrize("kind", ["file", "dir"])
def test_an_existing_target_is_replaced_whole(tmp_path, kind):
    target = tmp_path / ("out.csv" if kind == "file" else "out.zarr")
    _write(target, kind, "old")
    with atomic_write(target) as tmp:
        assert _read(target) == ("old" if kind == "file" else {"a.json": "old", "sub/b": "old"})  # meanwhile
        _write(tmp, kind, "new")
    assert _read(target) == ("new" if kind == "file" else {"a.json": "new", "sub/b": "new"})
    assert _names(tmp_path) == ["out.csv" if kind == "file" else "out.zarr"]


def test_a_directory_that_cannot_take_the_old_ones_place_puts_the_old_one_back(tmp_path, monkeypatch):
    target = tmp_path / "out.zarr"
    _write(target, "dir", "old")
    real = os.rename

    def rename(src, dst):
        if Path(dst) == target and (Path(src) / "a.json").read_text() == "new":  # the new one into place
            raise OSError(errno.EIO, "Input/output error")
        return real(src, dst)

    monkeypatch.setattr(os, "rename", rename)
    with pytest.raises(OSError, match="Input/output error"):
        with atomic_write(target) as tmp:
            _write(tmp, "dir", "new")
    assert _read(target) == {"a.json": "old", "sub/b": "old"} and _names(tmp_path) == ["out.zarr"]


@pytest.mark.parametrize("kind", ["file", "dir"])
def test_without_overwrite_an_existing_target_is_refused_before_any_work(tmp_path, kind):
    target = tmp_path / ("out.csv" if kind == "file" else "out.zarr")
    _write(target, kind, "old")
    with pytest.raises(UsageError, match=r"out\.(csv|zarr): exists; pass --overwrite to replace it$"):
        with atomic_write(target, overwrite=False):
            pytest.fail("the writer ran")
    assert _read(target) == ("old" if kind == "file" else {"a.json": "old", "sub/b": "old"})


@pytest.mark.parametrize("links", [True, False], ids=["hard-links", "no-hard-links"])
@pytest.mark.parametrize("kind", ["file", "dir"])
def test_without_overwrite_a_target_another_writer_made_meanwhile_is_kept(tmp_path, monkeypatch, kind, links):
    if not links:  # a file system without hard links (FAT, some network file systems)
        def link(src, dst):
            raise OSError(errno.EPERM, "Operation not permitted")

        monkeypatch.setattr(os, "link", link)
    target = tmp_path / ("out.csv" if kind == "file" else "out.zarr")
    with pytest.raises(UsageError, match="exists; pass --overwrite"):
        with atomic_write(target, overwrite=False) as tmp:
            _write(tmp, kind, "mine")
            _write(target, kind, "theirs")
    assert _read(target) == ("theirs" if kind == "file" else {"a.json": "theirs", "sub/b": "theirs"})
    assert _names(tmp_path) == [target.name]


@pytest.mark.parametrize("links", [True, False], ids=["hard-links", "no-hard-links"])
@pytest.mark.parametrize("kind", ["file", "dir"])
def test_without_overwrite_a_new_target_is_written(tmp_path, monkeypatch, kind, links):
    if not links:
        def link(src, dst):
            raise OSError(errno.EPERM, "Operation not permitted")

        monkeypatch.setattr(os, "link", link)
    target = tmp_path / ("out.csv" if kind == "file" else "out.zarr")
    with atomic_write(target, overwrite=False) as tmp:
        _write(tmp, kind, "new")
    assert _read(target) == ("new" if kind == "file" else {"a.json": "new", "sub/b": "new"})
    assert _names(tmp_path) == [target.name]


def test_the_temporary_name_carries_the_stores_prefix_and_the_targets_name(tmp_path):
    target = tmp_path / "objects.ome.zarr"
    with atomic_write(target) as tmp:
        assert tmp.parent == tmp_path and not tmp.exists()  # beside the target: the rename stays in one folder
        assert tmp.name.startswith(layout.TMP_PREFIX) and tmp.name.endswith("objects.ome.zarr")
        _write(tmp, "dir", "x")
    with atomic_write(target) as again:
        assert again != tmp  # each writer a name of its own
        _write(again, "dir", "y")


def test_a_missing_folder_is_refused_or_made(tmp_path):
    target = tmp_path / "no" / "such" / "out.csv"
    with pytest.raises(UsageError, match=f"out.csv: directory {tmp_path / 'no' / 'such'} does not exist$"):
        with atomic_write(target):
            pytest.fail("the writer ran")
    with atomic_write(target, parents=True) as tmp:
        tmp.write_text("x")
    assert target.read_text() == "x"


@pytest.mark.parametrize("kind", ["file", "dir"])
def test_what_was_written_is_fsynced_before_the_rename_and_the_folder_after(tmp_path, monkeypatch, kind):
    synced = []
    real = os.fsync

    def fsync(fd):
        info = os.fstat(fd)
        synced.append((info.st_dev, info.st_ino))
        real(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    target = tmp_path / "out"
    with atomic_write(target) as tmp:
        _write(tmp, kind, "x")
    ident = lambda p: (p.stat().st_dev, p.stat().st_ino)  # noqa: E731
    files = [target] if kind == "file" else [target / "a.json", target / "sub" / "b", target / "sub", target]
    assert all(ident(p) in synced for p in files), synced
    assert synced[-1] == ident(tmp_path)  # the rename itself is on disk


# -- a killed writer -----------------------------------------------------------------------------------------
_KILLED = textwrap.dedent("""
    import os, signal, sys
    from pathlib import Path
    from cellar.schemas.atomic import atomic_write

    with atomic_write(Path(sys.argv[1]), parents=True) as tmp:
        tmp.write_bytes(b"half a file")
        os.kill(os.getpid(), signal.SIGKILL)  # killed between writing and the rename
""")


def _killed_writer(target: Path) -> None:
    r = subprocess.run([sys.executable, "-c", _KILLED, str(target)], capture_output=True, text=True, timeout=120)
    assert r.returncode == -9, r.stderr


def test_a_writer_killed_midway_leaves_only_a_temporary_that_vacuum_removes(tmp_path):
    image = write_image(tmp_path / "slide.ome.zarr", intensities((32, 32), 1, seed=2), "cyx",
                        labels={"nuclei": nuclei_like((32, 32), 6, seed=1)})
    store = tmp_path / "s.cellar"
    measure.measure(str(image), "nuclei", store, workers=1)
    entry, df = read_table(store)
    before = {p.relative_to(store): p.read_bytes() for p in store.rglob("*") if p.is_file()}
    # where a killed `cellar measure` was writing: a table's data file, then a pointer of the log
    _killed_writer(store / entry["dir"] / "part-killed.parquet")
    _killed_writer(store / "log" / "_latest")
    after = {p.relative_to(store): p.read_bytes() for p in store.rglob("*") if p.is_file()}
    left = sorted(set(after) - set(before))
    assert len(left) == 2 and all(p.name.startswith(layout.TMP_PREFIX) for p in left), left
    assert {p: after[p] for p in before} == before  # nothing of the store was touched
    assert query.open(store).sql("SELECT count(*) FROM objects").fetchall()[0][0] == len(df)
    r = run_cli("vacuum", str(store), "--retain-hours", "0")
    assert r.returncode == 0 and "2 files no commit lists removed" in r.stderr, r.stderr
    assert {p.relative_to(store): p.read_bytes() for p in store.rglob("*") if p.is_file()} == before


def test_a_writer_killed_midway_leaves_no_output_only_a_temporary_named_so(tmp_path):
    _killed_writer(tmp_path / "ids.parquet")
    (left,) = tmp_path.iterdir()
    assert left.name.startswith(layout.TMP_PREFIX) and left.name.endswith("ids.parquet")


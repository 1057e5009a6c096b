"""The one way cellar writes a file or a directory atomically: under a temporary name beside the target, made
durable (fsync), then renamed into place.

A reader sees the old target or the new one, never a part; a writer that fails or is interrupted removes its
temporary, and one that is killed leaves only a name starting with TMP_PREFIX, which `cellar vacuum` (inside a
store) and the next writer know for a leftover. The store's commit log makes its commits with a different
guarantee, create-if-absent by link(2) (`schemas.log`), from the same parts (`temp_path`, `fsync_dir`).
"""

from __future__ import annotations

import errno
import os
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from .errors import UsageError

TMP_PREFIX = ".tmp-"
# link(2) errors of file systems without hard links (FAT, some network and FUSE file systems)
_NO_LINKS = {errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.ENOSYS}


def temp_path(target: Path) -> Path:
    """A fresh name beside `target` to write it under: TMP_PREFIX, a random part, then `target`'s own name (so
    its suffix still names the format for writers that go by it), shortened from the left if very long."""
    return target.with_name(f"{TMP_PREFIX}{uuid.uuid4().hex[:12]}-{target.name[-160:]}")


@contextmanager
def atomic_write(target: str | Path, *, overwrite: bool = True, parents: bool = False) -> Iterator[Path]:
    """Give the block a temporary path beside `target` to write a file or a directory at (nothing exists there
    yet; the writer creates it, so it gets the umask's permissions); when the block ends, fsync what it wrote,
    rename it to `target` and fsync the folder. If the block or any of that raises, the temporary is removed
    and `target` is as it was.

    overwrite: replace an existing `target` (a file by os.replace; a directory, written over a directory, by
    moving the old one aside first). False: a UsageError naming `target` if it exists when the block starts,
    and at the rename (link(2), where the file system has hard links) if another writer made it meanwhile.
    parents: create missing parent folders; otherwise a missing one is a UsageError naming `target`.

        with atomic_write(out, overwrite=False) as tmp:
            pq.write_table(table, tmp)
    """
    target = Path(target)
    if not overwrite and os.path.lexists(target):
        raise _exists(target)
    if parents:
        target.parent.mkdir(parents=True, exist_ok=True)
    elif not target.parent.is_dir():
        raise UsageError(f"{target}: directory {target.parent} does not exist")
    tmp = temp_path(target)
    try:
        yield tmp
        _fsync_tree(tmp)
        if overwrite and _is_dir(tmp) and _is_dir(target):
            _swap_directory(tmp, target)
        elif overwrite:
            os.replace(tmp, target)
        else:
            _rename_new(tmp, target)
        fsync_dir(target.parent)
    finally:
        _remove(tmp)


def _exists(target: Path) -> UsageError:
    return UsageError(f"{target}: exists; pass --overwrite to replace it")


def _is_dir(path: Path) -> bool:
    return path.is_dir() and not path.is_symlink()


def _swap_directory(tmp: Path, target: Path) -> None:
    """Put the directory `tmp` in the place of the directory `target`: rename(2) cannot replace a directory that
    is not empty, so the old one moves aside (and back if the new one cannot take its place), then goes."""
    old = temp_path(target)
    os.rename(target, old)
    try:
        os.rename(tmp, target)
    except BaseException:
        os.rename(old, target)
        raise
    shutil.rmtree(old, ignore_errors=True)


def _rename_new(tmp: Path, target: Path) -> None:
    """Rename `tmp` to `target` unless `target` exists (a UsageError). A file is hard-linked, which fails if the
    name exists, then its temporary name removed; a directory is renamed, which fails over a directory that is
    not empty or a file (and replaces an empty directory: nothing is lost)."""
    if _is_dir(tmp):
        try:
            os.rename(tmp, target)
        except OSError:
            if os.path.lexists(target):
                raise _exists(target) from None
            raise
        return
    try:
        os.link(tmp, target)
    except FileExistsError:
        raise _exists(target) from None
    except OSError as exc:
        if exc.errno not in _NO_LINKS:
            raise
        if os.path.lexists(target):  # no hard links here: refuse what exists now, and rename
            raise _exists(target) from None
        os.rename(tmp, target)
        return
    tmp.unlink()


def fsync_file(path: Path) -> None:
    with open(path, "rb") as fh:
        os.fsync(fh.fileno())


def fsync_dir(path: Path) -> None:
    """fsync a folder: its entries (names just created or renamed) are on disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(path: Path) -> None:
    """fsync a file, or every file and folder of a directory."""
    if not _is_dir(path):
        fsync_file(path)
        return
    for root, _, files in os.walk(path):
        for name in files:
            if not os.path.islink(os.path.join(root, name)):
                fsync_file(Path(root, name))
        fsync_dir(Path(root))


def _remove(path: Path) -> None:
    if _is_dir(path):
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)

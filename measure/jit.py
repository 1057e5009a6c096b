"""Compiled kernels with a cache that any number of processes may fill at once.

numba's on-disk cache (`cache=True`) keeps one index file per function that maps signatures to numbered data files.
Saving a new signature reads the index, picks the first free number, rewrites the index and writes the data file.
Two processes that compile the same function for different types at the same moment both pick the same number:
the index then names one signature and the data file holds the other one's machine code, and the next process to
load it runs code compiled for other types, which returns garbage or crashes (numba issue 10128; its maintainers
suggest a file lock). cellar's users run many `cellar measure` processes at once, and its tests run on two workers,
so every kernel here is declared with `kernel`, which holds a lock beside the index while it is read or written:
shared for a load, exclusive for a save.

A second hazard is in the names of the compiled functions. numba names each one after its Python name, its argument
types and a number from a counter that starts at 1 in every process (and that forked workers inherit). Code loaded
from the cache keeps the names it got in the process that compiled it, and where a function compiled here has the
same name, the linker binds calls to whichever body it met first: a cached `intensity_crop` then ran the quicksort of
an `np.argsort` compiled in this process, which sorts a copy of the indices and leaves the values unsorted, so every
median came out wrong (or, with another pair, the process crashed). numba issue 10486, open. Importing this module
gives every function a random 64-bit number instead, drawn from the operating system's generator at each compile,
so that names agree only where two processes compile the same function by chance one in 2**64.
"""
from __future__ import annotations

import contextlib
import os
import secrets
from collections.abc import Callable, Iterator

from numba import njit
from numba.core.bytecode import FunctionIdentity
from numba.core.caching import FunctionCache, IndexDataCacheFile

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None
    import msvcrt


@contextlib.contextmanager
def _locked(path: str, exclusive: bool) -> Iterator[None]:
    """An advisory lock on `path` (created if absent) while the block runs: flock on POSIX (local disks and NFS
    v4), a byte-range lock on Windows (always exclusive)."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        if fcntl is not None:
            fcntl.flock(fd, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
        else:
            msvcrt.locking(fd, msvcrt.LK_LOCK, 1)
        yield
    finally:
        os.close(fd)  # closing the descriptor releases the lock


class _LockedIndex(IndexDataCacheFile):
    """numba's index and data files, read under a shared lock and written under an exclusive one. `save` reads the
    index again inside the lock, so no process overwrites another's entry or its data file."""

    def save(self, key, data) -> None:
        with _locked(self._index_path + ".lock", exclusive=True):
            super().save(key, data)

    def load(self, key):
        with _locked(self._index_path + ".lock", exclusive=False):
            return super().load(key)


class _LockedCache(FunctionCache):
    def __init__(self, py_func: Callable):
        super().__init__(py_func)
        self._cache_file.__class__ = _LockedIndex


class _RandomIds:
    """The numbers numba puts in function names: random, and different in each forked child too."""

    def __iter__(self) -> _RandomIds:
        return self

    def __next__(self) -> int:
        return secrets.randbits(64)


FunctionIdentity._unique_ids = _RandomIds()


def kernel(func: Callable) -> Callable:
    """`numba.njit(cache=True, nogil=True)` with the process-safe cache above."""
    dispatcher = njit(nogil=True)(func)
    dispatcher._cache = _LockedCache(dispatcher.py_func)
    return dispatcher

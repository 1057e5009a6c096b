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

Loading a kernel from the cache is also made cheaper. Before it loads one, numba refreshes its target context:
it imports and installs every lowering registry it has (numba.np.arraymath and its check for BLAS through
scipy.linalg, the typed containers, the random generators, ...) and initialises its runtime (NRT), 0.4-0.55 s
of a process's start; and before any call is typed it loads the numba extensions of every installed package
(about 50 ms). The registries serve the compiler alone: code loaded from the cache is machine code, linked
against the runtime and numba's C helpers, and the modules its environments name are imported as it is
unpickled. So a load here initialises the runtime only, and the extension hook is left out (no kernel uses an
extension). A compile (a cache miss) still refreshes everything first, in numba's compiler.
"""
from __future__ import annotations

import contextlib
import os
import secrets
from collections.abc import Callable, Iterator

from numba import njit
from numba.core.bytecode import FunctionIdentity
from numba.core.caching import FunctionCache, IndexDataCacheFile
from numba.core.runtime import rtsys

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

    def load_overload(self, sig, target_context):
        """numba's `load_overload` with the runtime initialised in place of the whole target context (see the
        module's docstring); None where the cache has no entry for `sig`."""
        rtsys.initialize(target_context)
        return self._load_overload(sig, target_context)


class _RandomIds:
    """The numbers numba puts in function names: random, and different in each forked child too."""

    def __iter__(self) -> _RandomIds:
        return self

    def __next__(self) -> int:
        return secrets.randbits(64)


FunctionIdentity._unique_ids = _RandomIds()


def _no_extensions() -> None:
    """In place of numba's hook that loads the installed packages' numba extensions before typing a call."""


def kernel(func: Callable) -> Callable:
    """`numba.njit(cache=True, nogil=True)` with the process-safe cache above, loaded without the compiler's
    registries and typed without numba's extension hook (see the module's docstring)."""
    dispatcher = njit(nogil=True)(func)
    dispatcher._cache = _LockedCache(dispatcher.py_func)
    dispatcher._compilation_chain_init_hook = _no_extensions
    return dispatcher

"""Processes that compile the same kernel for different types at the same moment keep every compiled version in the
cache, and a later process loads the right one (measure/jit.py).

The race is made certain, not left to timing: each writer waits, between reading numba's index and writing it
back, until every writer has read it (or 1 s has passed, which is what happens under cellar's lock, where they
take turns). Plain `njit(cache=True)` under the same barrier keeps only one of the versions, which is the loss
the lock prevents (the numbered data file then holds another signature's code: numba issue 10128).
"""
from __future__ import annotations

import os
import pickle
import subprocess
import sys
import textwrap
from pathlib import Path

DTYPES = ["float32", "int64", "uint16"]

MODULE = {
    "cellar": "from cellar.measure.jit import kernel as decorate\n",
    "numba": "from numba import njit\ndecorate = njit(cache=True)\n",
}
KERNEL = """
@decorate
def weighted(a):
    s = 0.0
    for i in range(a.size):
        s += a[i] * (i + 1)
    return s
"""

WRITER = """
import os, sys, time
from numba.core.caching import IndexDataCacheFile
barrier, n = sys.argv[2], int(sys.argv[3])
original = IndexDataCacheFile._save_index

def save_index_after_all_have_read(self, overloads):
    open(os.path.join(barrier, str(os.getpid())), "w").close()
    deadline = time.monotonic() + 1.0
    while len(os.listdir(barrier)) < n and time.monotonic() < deadline:
        time.sleep(0.01)
    original(self, overloads)

IndexDataCacheFile._save_index = save_index_after_all_have_read
import numpy as np, kernels
print(kernels.weighted(np.arange(5, dtype=sys.argv[1])))
"""

READER = """
import sys, numpy as np, kernels
for dtype in sys.argv[1:]:
    print(dtype, kernels.weighted(np.arange(5, dtype=dtype)), kernels.weighted.stats.cache_hits.get(
          next(sig for sig in kernels.weighted.signatures if str(sig[0].dtype) == dtype), 0))
"""


def _python(code: str, args: list[str], folder: Path) -> subprocess.Popen:
    env = {**os.environ, "NUMBA_CACHE_DIR": str(folder / "cache"), "PYTHONPATH": str(folder)}
    return subprocess.Popen([sys.executable, "-c", code, *args], cwd=folder, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def _compile_at_once(folder: Path, decorator: str) -> int:
    """Three processes compile `weighted` for three types at once; the number of versions numba's index keeps."""
    (folder / "kernels.py").write_text(MODULE[decorator] + textwrap.dedent(KERNEL))
    (folder / "barrier").mkdir()
    writers = [_python(WRITER, [dtype, str(folder / "barrier"), str(len(DTYPES))], folder) for dtype in DTYPES]
    for proc in writers:
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err
        assert float(out) == 40.0
    (index,) = (folder / "cache").rglob("*.nbi")
    with open(index, "rb") as f:
        pickle.load(f)
        _stamp, overloads = pickle.loads(f.read())
    return len(overloads)


def test_concurrent_compiles_keep_every_version(tmp_path):
    assert _compile_at_once(tmp_path, "cellar") == len(DTYPES)
    reader = _python(READER, DTYPES, tmp_path)
    out, err = reader.communicate(timeout=120)
    assert reader.returncode == 0, err
    for line, dtype in zip(out.splitlines(), DTYPES):
        name, value, hits = line.split()
        assert (name, float(value), int(hits)) == (dtype, 40.0, 1)  # loaded from the cache, and the right code


def test_without_the_lock_numba_keeps_one_version(tmp_path):
    assert _compile_at_once(tmp_path, "numba") == 1

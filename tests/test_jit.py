"""Processes that compile the same kernel for different types at the same moment keep every compiled version in the
cache, and a later process loads the right one; code loaded from the cache runs its own functions, never one of the
same name compiled in the loading process (measure/jit.py).

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


SORTER = """
@decorate
def sorted_copy(a):
    b = a.copy()
    b.sort()
    return b
"""

QUICKSORT_ID = r"""
import re
def quicksort_id(dispatcher):
    ir = dispatcher.overloads[dispatcher.signatures[0]].library.get_llvm_str()
    return int(re.search(r"run_quicksort1B[0-9]+v([0-9]+)", ir).group(1))
"""

COMPILE_SORTER = QUICKSORT_ID + """
import numpy as np, kernels
kernels.sorted_copy(np.arange(5.0))
print(quicksort_id(kernels.sorted_copy))
"""

ARGSORT = """
import numpy as np, numba
@numba.njit
def order(a):
    return np.argsort(a)
"""

# The number an argsort's quicksort gets, counted from the counter's value before it compiles.
ARGSORT_OFFSET = QUICKSORT_ID + """
import itertools, numpy as np
from numba.core.bytecode import FunctionIdentity
FunctionIdentity._unique_ids = itertools.count(1000)
""" + ARGSORT + """
order(np.arange(5.0))
print(quicksort_id(order) - 1000)
"""

# An argsort compiled here, as the 3D morphology kernel does, then the cached sort. Where numba's counter is in use, it
# is set so that the argsort's quicksort gets the very name the cached sort's has: what happens by chance when the
# two processes have compiled the same number of functions before.
LOAD_SORTER = QUICKSORT_ID + """
import itertools, sys, numpy as np, kernels
from numba.core.bytecode import FunctionIdentity
if type(FunctionIdentity._unique_ids) is itertools.count:
    FunctionIdentity._unique_ids = itertools.count(int(sys.argv[1]) - int(sys.argv[2]))
""" + ARGSORT + """
order(np.arange(5.0))
values = np.random.default_rng(0).random(100)
print(np.array_equal(kernels.sorted_copy(values), np.sort(values)), sum(kernels.sorted_copy.stats.cache_hits.values()))
"""


def _sorter_loaded_beside_an_argsort(folder: Path, decorator: str) -> tuple[bool, int]:
    """Whether the cached sort sorts, in a process that compiled an argsort first; and its cache hits."""
    (folder / "kernels.py").write_text(MODULE[decorator] + textwrap.dedent(SORTER))
    outputs = []
    for code, args in ((COMPILE_SORTER, []), (ARGSORT_OFFSET, [])):
        proc = _python(code, args, folder)
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err
        outputs.append(out.strip())
    proc = _python(LOAD_SORTER, outputs, folder)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    is_sorted, hits = out.split()
    return is_sorted == "True", int(hits)


def test_cached_code_never_runs_a_function_compiled_here(tmp_path):
    assert _sorter_loaded_beside_an_argsort(tmp_path, "cellar") == (True, 1)


def test_without_random_ids_numba_runs_the_argsorts_quicksort(tmp_path):
    assert _sorter_loaded_beside_an_argsort(tmp_path, "numba") == (False, 1)


LOADED = """
@decorate
def summary(a):
    out = np.empty(3, np.float64)  # the runtime allocates it
    b = np.sort(a)  # numba.np.arraymath's code, its environment imported as it loads
    out[0], out[1], out[2] = b[0], b[b.size // 2], b[-1]
    return out, b.size
"""

LOAD_RUN = """
import sys, numpy as np, kernels
out, n = kernels.summary(np.array([5.0, 1.0, 3.0, 4.0, 2.0]))
hits = sum(kernels.summary.stats.cache_hits.values())
print(out.tolist(), n, hits, "numba.typed.typeddict" in sys.modules, "numba.core.entrypoints" in sys.modules and
      __import__("numba.core.entrypoints").core.entrypoints._already_initialized)
"""


def test_a_kernel_loads_from_the_cache_without_the_compilers_registries(tmp_path):
    """A compile refreshes numba's registries (and loads the extensions); a load from the cache initialises the
    runtime only (no typed dictionaries, no extension entry points), and the code it loads allocates, sorts and
    returns as compiled."""
    (tmp_path / "kernels.py").write_text("import numpy as np\n" + MODULE["cellar"] + textwrap.dedent(LOADED))
    runs = []
    for _ in range(2):
        proc = _python(LOAD_RUN, [], tmp_path)
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err
        runs.append(out.split("]")[1].split() + [out.split("]")[0] + "]"])
    compiled, loaded = runs
    assert compiled == ["5", "0", "True", "True", "[1.0, 3.0, 5.0]"]
    assert loaded == ["5", "1", "False", "False", "[1.0, 3.0, 5.0]"]


MEASURE_RUN = """
import sys
from cellar import measure
measure.measure(sys.argv[1], "nuclei", sys.argv[2], features=sys.argv[3], workers=1, progress=False, overwrite=True)
print(" ".join(m for m in ("numba.np.arraymath", "numba.np.npyimpl", "scipy.linalg") if m in sys.modules) or "-")
"""


def test_cellars_kernels_load_without_numbas_array_math(tmp_path):
    """The kernels that the streaming pass and the whole-object intensities run, loaded from the cache, import
    neither numba.np.arraymath (with it scipy.linalg: 75 ms of a start) nor numba.np.npyimpl: their environments
    name only the modules of the numba functions they call (measure/shape_kernels.py `_first_not_below`)."""
    from cellar.ngff.write import write_image
    from helpers import intensities, nuclei_like

    image = write_image(tmp_path / "img.ome.zarr", intensities((40, 50), 2, seed=1), "cyx", chunks=(1, 40, 50),
                        labels={"nuclei": nuclei_like((40, 50), 6, seed=2)})
    features = "area,intensity_std,intensity_median,intensity_mad,perimeter"
    seen = []
    for _ in range(2):  # the first may compile (the compiler loads everything); the second loads
        proc = _python(MEASURE_RUN, [str(image), str(tmp_path / "s.cellar"), features], tmp_path)
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err
        seen.append(out.strip())
    assert seen[1] == "-"

"""`schemas.lazy`: modules loaded on first use, whole, however many threads touch them at once."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

from cellar.schemas import lazy


def _race(tmp_path, loader: str) -> subprocess.CompletedProcess:
    """Eight threads read an attribute of a module, loaded lazily by `loader`, whose import takes 0.3 s and sets
    the attribute last (as a large module's does); prints what each thread got."""
    (tmp_path / "slowmodule.py").write_text("import time\ntime.sleep(0.3)\nVALUE = 42\n")
    code = textwrap.dedent(f"""
        import sys, threading
        sys.path.insert(0, {str(tmp_path)!r})
        {loader}
        got, start = [], threading.Barrier(8)

        def read():
            start.wait()
            try:
                got.append(mod.VALUE)
            except AttributeError as exc:
                got.append(type(exc).__name__)

        threads = [threading.Thread(target=read) for _ in range(8)]
        [t.start() for t in threads]
        [t.join() for t in threads]
        print(sorted(map(str, got)))
    """)
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)


def test_threads_reading_a_lazy_module_at_once_all_see_it_whole(tmp_path):
    r = _race(tmp_path, "from cellar.schemas import lazy; mod = lazy.module('slowmodule')")
    assert r.returncode == 0 and r.stdout.split("\n")[0] == str(["42"] * 8), (r.stdout, r.stderr)


@pytest.mark.skipif(sys.version_info >= (3, 12), reason="importlib's LazyLoader takes a lock from Python 3.12")
def test_importlibs_lazy_loader_is_what_it_replaces(tmp_path):
    """The race `schemas.lazy` exists for: in Python 3.11 a thread reading a module that `LazyLoader` is loading
    in another thread sees it half made."""
    loader = ("import importlib.util; spec = importlib.util.find_spec('slowmodule'); "
              "spec.loader = importlib.util.LazyLoader(spec.loader); mod = importlib.util.module_from_spec(spec); "
              "sys.modules['slowmodule'] = mod; spec.loader.exec_module(mod)")
    r = _race(tmp_path, loader)
    assert r.returncode == 0 and "AttributeError" in r.stdout, (r.stdout, r.stderr)


def test_a_lazy_module_is_imported_on_first_use_and_reads_as_the_module():
    code = ("import sys; from cellar.schemas import lazy; m = lazy.module('fractions'); "
            "before = 'fractions' in sys.modules; x = m.Fraction(1, 3); "
            "print(before, 'fractions' in sys.modules, x, m.Fraction is sys.modules['fractions'].Fraction)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.stdout.split() == ["False", "True", "1/3", "True"], (r.stdout, r.stderr)
    assert "numpy" in repr(lazy.module("numpy"))

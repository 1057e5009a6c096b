"""Whole-process timings as a user's installation runs them: with Python's bytecode cache.

`pip install` compiles the modules it installs, so the peers' libraries load from their bytecode caches. A shell
with PYTHONDONTWRITEBYTECODE set (some containers and CI images set it) would make every run of `cellar`
compile cellar's modules from source again (~40 ms here) while the peers' load from their caches. The benchmarks
that time whole processes compile cellar's modules once and run every command without that variable.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

PACKAGE_DIRS = ("cellar", "schemas", "ngff", "measure", "query", "viewer")  # pyproject's package-dir


def bytecode_env() -> dict[str, str]:
    """The environment for timed subprocesses, cellar's modules compiled first."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    root = Path(__file__).resolve().parent.parent
    subprocess.run([sys.executable, "-m", "compileall", "-q", *(str(root / part) for part in PACKAGE_DIRS)],
                   check=True, env=env, stdout=subprocess.DEVNULL)
    return env

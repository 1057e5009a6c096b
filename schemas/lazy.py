"""Modules loaded on first use, safely from several threads at once.

    duckdb = lazy.module("duckdb")   # nothing is imported yet
    duckdb.connect()                 # imported now, once

The heavy engines (DuckDB, pyarrow, numpy: 100-150 ms each in a fresh process) are loaded by the commands that
use them and by no other: `cellar filter` runs on polars alone, `cellar sql` on DuckDB alone. Not
`importlib.util.LazyLoader` (nor `lazy_loader`, built on it): in Python 3.11 a module it loads can be seen half
made by a second thread that touches it meanwhile. Here the first attribute asked for imports the module with
`importlib.import_module`, whose per-module lock makes every other thread wait for the finished module; the
attributes read are then kept on the proxy, so later reads cost what a module's do.
"""

from __future__ import annotations

import importlib
from types import ModuleType
from typing import Any


class LazyModule:
    """A stand-in for the module `name`, imported when one of its attributes is first read."""

    def __init__(self, name: str):
        self.__dict__["_lazy_name"] = name

    def __getattr__(self, attr: str) -> Any:
        value = getattr(self.loaded(), attr)
        self.__dict__[attr] = value  # read once through the module: then found on the proxy itself
        return value

    def loaded(self) -> ModuleType:
        """The module itself (imported now if it is not yet)."""
        return importlib.import_module(self.__dict__["_lazy_name"])

    def __repr__(self) -> str:
        return f"<lazily loaded module {self.__dict__['_lazy_name']!r}>"


def module(name: str) -> Any:
    """The module `name`, imported when first used (typed Any: it stands in for the module)."""
    return LazyModule(name)

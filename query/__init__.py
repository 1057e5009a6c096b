"""query: SQL and Python access to cellar stores through DuckDB and polars.

    from cellar import query
    objs = query.open("slide.cellar")
    objs.sql("SELECT label_id, area_um2 FROM objects WHERE area_um2 > 80").pl()
    objs.where("area_um2 > 80").within(0, 0, 500, 500).label_ids()

`open`, `Objects` and `Query` come from `query.api`, imported on first use (PEP 562): it loads polars, which
`cellar sql` (DuckDB over `query.store.Tables`) does without.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .api import Objects, Query, open  # noqa: F401

__all__ = ["Objects", "Query", "open"]


def __getattr__(name: str):
    if name in __all__:
        return getattr(import_module(".api", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

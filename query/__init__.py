"""query: SQL and Python access to cellar stores through DuckDB.

    from cellar import query
    objs = query.open("slide.cellar")
    objs.sql("SELECT label_id, area_um2 FROM objects WHERE area_um2 > 80").pl()
    objs.where("area_um2 > 80").within(0, 0, 500, 500).label_ids()
"""

from .api import Objects, Query, open

__all__ = ["Objects", "Query", "open"]

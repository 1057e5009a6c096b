"""The contract between `measure/` and `query/`: store layout, table schemas and error types.

`objects.json` is generated from the feature registry in `measure/features.py`
(`python -m cellar.measure --write-schema`); a test fails if the two disagree. A store carries a copy of it
(`schema.json`) and, in its manifest, the concrete columns of each table.
"""

from __future__ import annotations

import json
from functools import cache
from importlib import resources
from typing import Any

SCHEMA_FILE = "objects.json"


@cache
def cellar_version() -> str:
    """The installed distribution's version (a source checkout that is not installed says so)."""
    from importlib import metadata  # here: importing it takes 65 ms (email, zipfile, ...), which only writes need

    try:
        return metadata.version("cellar")
    except metadata.PackageNotFoundError:
        return "0+uninstalled"


def objects_schema() -> dict[str, Any]:
    """The column templates of the objects table, as committed in `schemas/objects.json`."""
    return json.loads(resources.files(__name__).joinpath(SCHEMA_FILE).read_text())

"""The user-facing error types shared by `measure/` and `query/`.

Each kind of user mistake has its own type; the message is one line saying what was found, what was
expected and where. The CLI prints that line and exits 2; any other exception is a bug and keeps its
traceback.
"""


class CellarError(Exception):
    """Base of every error caused by input rather than by a bug."""


class InvalidImageError(CellarError):
    """The OME-Zarr image, its metadata or one of its label images is unusable as asked."""


class StoreError(CellarError):
    """A cellar store is missing, malformed, or an output path would be overwritten."""


class QueryError(CellarError):
    """A query does not parse, names an unknown column, or cannot be written."""


class UsageError(CellarError):
    """An option value is out of range or inconsistent with the data."""

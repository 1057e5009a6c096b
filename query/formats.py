"""The export formats and their limits, apart from the writers (`query.export`), so that the command line names
them without loading what writes them."""

FORMATS = ("omero-h5", "csv", "parquet", "anndata", "ngff-properties")
MAX_STRING = 1024  # bytes per text value in an OMERO StringColumn
MAX_CELLS = 1_000_000  # objects x columns written into NGFF JSON metadata

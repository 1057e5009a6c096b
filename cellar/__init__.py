"""cellar: a columnar object-measurement store and query engine for OME-Zarr bioimages.

One namespace: `cellar.measure` (OME-Zarr in, per-object features out into a store), `cellar.query` (the
store's objects through DuckDB and polars, the lazy API, outputs), `cellar.schemas` (the store contract),
`cellar.ngff` (OME-NGFF images), `cellar.viewer` (`cellar view`) and `cellar.cli` (the command line)::

    from cellar import measure, query
"""

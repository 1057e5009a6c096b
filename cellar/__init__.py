"""cellar: the command-line shell over `measure` (OME-Zarr -> store) and `query` (store -> answers)."""

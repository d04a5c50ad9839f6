"""Many files and clusters: one file to its outputs, folders, dask.distributed."""

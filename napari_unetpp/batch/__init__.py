"""Batch prediction means many files and clusters here, not the network's batch size: :mod:`.files` (one input to
its outputs; the inputs a folder or a pattern names), :mod:`.distributed` (dask.distributed, ``--scheduler``, one
stack split into blocks) and :mod:`.tasks` (what a dask worker runs)."""

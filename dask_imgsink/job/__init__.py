"""The Dask job: accessor, settings, exact packing, commit."""

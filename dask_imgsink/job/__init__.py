"""The Dask job: accessor, settings, exact packing, commit."""

from . import sizes  # noqa: F401  (Dask's sizes of the job's task results: the bytes they hold)

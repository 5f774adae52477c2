"""The Dask job: accessor, settings, exact packing, commit."""

from . import sizes  # noqa: F401  (tells Dask's sizeof how big our task results are)

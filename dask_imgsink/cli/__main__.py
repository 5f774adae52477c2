"""``python -m dask_imgsink.cli``: the same as the ``dask-imgsink`` command."""

import sys

from . import main

sys.exit(main())

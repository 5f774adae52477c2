"""Worker preload: this worker cannot import simplejpeg, like a worker whose image lacks it.

``sys.modules[name] = None`` makes ``import simplejpeg`` raise ImportError in
this process only; nothing else of the worker changes.
"""

import sys

sys.modules["simplejpeg"] = None

"""Values that Arrow would reshape to fit a nested type rather than refuse.

Arrow converts a ``str`` given for a list type into a list of its characters, and
drops the keys of a ``dict`` that a struct type has no field for. Either would
write a value other than the one given, so the writer refuses such a value
instead (a bad row, or, in the stage, an error naming the key).
"""

from __future__ import annotations

from typing import Any, Iterable

import numpy as np
import pyarrow as pa

_LIST_TYPES = (pa.types.is_list, pa.types.is_large_list, pa.types.is_fixed_size_list)
_NOT_LISTS = (str, bytes, bytearray, dict)


def is_nested(type_: pa.DataType) -> bool:
    """Whether values of ``type_`` can be reshaped by Arrow (lists, structs, and types holding them)."""
    return pa.types.is_nested(type_)


def reshaped(value: Any, type_: pa.DataType) -> str | None:
    """Why Arrow would change ``value`` to fit ``type_`` instead of refusing it; ``None`` if it would not."""
    if value is None or (isinstance(value, float) and value != value):
        return None
    if any(is_list(type_) for is_list in _LIST_TYPES):
        if isinstance(value, _NOT_LISTS):
            return f"a {type(value).__name__} is not a list (Arrow would split it into items)"
        if not is_nested(type_.value_type) or not _iterable(value) or _plain_array(value):
            return None  # items of a flat type are converted or refused, never reshaped
        return _first(reshaped(item, type_.value_type) for item in value)
    if pa.types.is_struct(type_):
        if not isinstance(value, dict):
            return None  # Arrow refuses it itself
        fields = [type_.field(i) for i in range(type_.num_fields)]
        extra = [k for k in value if k not in {f.name for f in fields}]
        if extra:
            return f"the key(s) {extra[:5]} are not fields of {type_} (Arrow would drop them)"
        return _first(reshaped(value.get(f.name), f.type) for f in fields if is_nested(f.type))
    if pa.types.is_map(type_):
        items = value.items() if isinstance(value, dict) else value if _iterable(value) else ()
        return _first(reshaped(v, type_.item_type) for pair in items if isinstance(pair, tuple) and len(pair) == 2
                      for v in pair[1:])
    return None


def _iterable(value: Any) -> bool:
    return isinstance(value, (list, tuple, np.ndarray))


def _plain_array(value: Any) -> bool:
    """A NumPy array of numbers or booleans: no item of it can be a str or a dict."""
    return isinstance(value, np.ndarray) and value.dtype.kind in "biufc"


def _first(reasons: Iterable[str | None]) -> str | None:
    return next((r for r in reasons if r is not None), None)

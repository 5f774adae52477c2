"""Values that Arrow would change to fit a type rather than refuse.

Arrow converts a ``str`` given for a list type into a list of its characters, and
drops the keys of a ``dict`` that a struct type has no field for. Converting to a
number or time type, it casts without checking: a float given for integers loses its
fraction, a datetime given for dates its time, nanoseconds given for microseconds
their rest. Each would write a value other than the one given, so the writer
refuses such a value instead (a bad row, or, in the stage, an error naming the key).
"""

from __future__ import annotations

import datetime
from typing import Any, Iterable

import numpy as np
import pandas as pd
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


def _numeric(type_: pa.DataType) -> bool:
    return pa.types.is_integer(type_) or pa.types.is_floating(type_) or pa.types.is_decimal(type_)


def exact_array(values: pd.Series | list, type_: pa.DataType) -> pa.Array:
    """``values`` as an Arrow array of ``type_``, raising ``pa.ArrowInvalid`` for a value it would change.

    Numbers and times are also converted by their own type, then cast to ``type_``
    safely, which refuses a value the cast would change (``2.5`` for integers, a time
    of day for dates); other values are converted as Arrow does, which refuses
    values of another kind.
    """
    series = isinstance(values, pd.Series)
    typed = pa.Array.from_pandas(values, type=type_) if series else pa.array(values, type=type_, from_pandas=True)
    if not (_numeric(type_) or pa.types.is_temporal(type_)):
        return typed
    if (pa.types.is_date(type_) or pa.types.is_timestamp(type_)) and (not series or values.dtype == object):
        _check_no_time_lost(values.tolist() if series else values, type_)  # Python datetimes: Arrow cuts them
    try:
        own = pa.Array.from_pandas(values) if series else pa.array(values, from_pandas=True)
    except (pa.ArrowInvalid, pa.ArrowTypeError):
        return typed  # values of mixed kinds: no type of their own to compare with
    if own.type == type_ or not ((_numeric(own.type) and _numeric(type_))
                                 or (pa.types.is_temporal(own.type) and pa.types.is_temporal(type_))):
        return typed
    own.cast(type_, safe=True)  # raises for a number (or a NumPy time) the conversion changed
    return typed


_UNIT_NS = {"s": 10**9, "ms": 10**6, "us": 10**3, "ns": 1}


def _check_no_time_lost(values: list, type_: pa.DataType) -> None:
    """Raise ``pa.ArrowInvalid`` for a datetime that ``type_`` would cut (its time of day for dates, its
    nanoseconds for microseconds, ...)."""
    for value in values:
        if not isinstance(value, datetime.datetime):
            continue
        stamp = pd.Timestamp(value)
        if pa.types.is_date(type_) and stamp != stamp.normalize():
            raise pa.ArrowInvalid(f"{stamp} has a time of day, which {type_} would lose")
        if pa.types.is_timestamp(type_) and stamp.value % _UNIT_NS[type_.unit]:
            raise pa.ArrowInvalid(f"{stamp} is finer than {type_}, which would lose data")

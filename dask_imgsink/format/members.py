"""What goes in a sample's members besides the image: ``key.txt``, ``key.cls``, ``key.json``.

Shared by the writer and ``verify``: verify rebuilds these members from a
shard's Parquet row and compares them byte for byte, which tells which member
of a damaged sample changed.
"""

from __future__ import annotations

import json
import math
from typing import Any

import pandas as pd
import pyarrow as pa

#: Member extensions in the order a sample's members are written (the image comes first).
TEXT_EXT, LABEL_EXT, JSON_EXT = "txt", "cls", "json"


def is_null(value: Any) -> bool:
    return value is None or value is pd.NA or (isinstance(value, float) and math.isnan(value))


def text_member(value: Any) -> bytes | None:
    """The ``key.txt`` bytes of a text value, or ``None`` for a missing value."""
    return None if is_null(value) else str(value).encode("utf-8")


def label_member(value: Any) -> bytes | None:
    """The ``key.cls`` bytes of a label (integers without a trailing ``.0``), or ``None``."""
    if is_null(value):
        return None
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, bool):
        value = int(value)
    elif isinstance(value, float) and value.is_integer():
        value = int(value)
    return str(value).encode("utf-8")


def _json_value(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _json_value(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_json_value(v) for v in value]
    return value


def _json_default(value: Any) -> Any:
    if hasattr(value, "isoformat"):
        return value.isoformat()
    if isinstance(value, (bytes, bytearray)):
        return value.hex()
    if hasattr(value, "item"):
        return value.item()
    return str(value)


def json_rows(table: pa.Table) -> list[bytes]:
    """The ``key.json`` bytes of each row: UTF-8 JSON, NaN as null, times as ISO strings."""
    return [
        json.dumps(_json_value(row), default=_json_default, ensure_ascii=False, allow_nan=False).encode()
        for row in table.to_pylist()
    ]

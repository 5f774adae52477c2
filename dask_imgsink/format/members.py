"""What goes in a sample's members besides the image: ``key.txt``, ``key.cls``, ``key.json``.

Shared by the writer and ``verify``: verify rebuilds these members from a
shard's Parquet row and compares them byte for byte, which tells which member
of a damaged sample changed.
"""

from __future__ import annotations

import json
import math
import uuid
from typing import Any

import pandas as pd
import pyarrow as pa

from ..errors import RowProblem

#: Member extensions in the order a sample's members are written (the image comes first).
TEXT_EXT, LABEL_EXT, JSON_EXT = "txt", "cls", "json"


def is_null(value: Any) -> bool:
    return value is None or value is pd.NA or (isinstance(value, float) and math.isnan(value))


def text_member(value: Any) -> bytes | None:
    """The ``key.txt`` bytes (UTF-8) of a text value, or ``None`` for a missing value.

    Raises
    ------
    RowProblem
        The value is not a ``str``, or ``bytes`` that are not UTF-8, or a
        ``str`` that cannot be UTF-8 (lone surrogates).
    """
    if is_null(value):
        return None
    if isinstance(value, (bytes, bytearray, memoryview)):
        try:
            bytes(value).decode("utf-8")
        except UnicodeDecodeError as exc:
            raise RowProblem(f"the text is bytes that are not UTF-8 ({exc})",
                             "decode it yourself (value.decode('latin-1'), say) into str") from None
        return bytes(value)
    if not isinstance(value, str):
        raise RowProblem(f"the text must be a str, got {type(value).__name__} {value!r:.40}",
                         "convert the text column to strings (ddf[col].astype(str)) or leave it out")
    try:
        return value.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise RowProblem(f"the text cannot be written as UTF-8 ({exc})",
                         "remove lone surrogates (s.encode('utf-8', 'replace').decode())") from None


INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1


def label_member(value: Any) -> bytes | None:
    """The ``key.cls`` bytes of an integer class label, or ``None`` for a missing label.

    WebDataset readers decode ``.cls`` with ``int()``, so only integers are
    written (integral floats such as ``3.0`` from a nullable column too).

    Raises
    ------
    RowProblem
        The label is not an integer.
    """
    if is_null(value):
        return None
    if hasattr(value, "item") and not isinstance(value, (str, bytes)):
        value = value.item()
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    elif isinstance(value, bool):
        value = int(value)  # a boolean label is class 0 or 1
    if not isinstance(value, int):
        raise RowProblem(f"the label must be an integer class id, got {type(value).__name__} {value!r:.40}",
                         "map class names to integers (ddf[col].astype('category').cat.codes), or put "
                         "names in text_column or a metadata column")
    if not INT64_MIN <= value <= INT64_MAX:
        raise RowProblem(f"the label {value} is outside the 64-bit signed integers that readers decode class ids "
                         "into (the card declares cls as int64)",
                         "map labels to class ids (ddf[col].astype('category').cat.codes), or keep the value "
                         "as a metadata column")
    return str(value).encode("ascii")


#: JSON has no infinity; a number too large for a double is what standard decoders (Python's json,
#: JavaScript's JSON.parse) read as one, and it is valid JSON text.
JSON_INFINITY = "1e999"


#: Stands for an infinity in the text ``json.dumps`` makes, then is replaced: random for each
#: process, so no value written can hold it.
_INFINITY = f"imgsink-infinity-{uuid.uuid4().hex}"


def _json_value(value: Any) -> Any:
    """``value`` ready for ``json.dumps``: NaN as null, infinities as :data:`_INFINITY` (``"-"`` before it
    for minus infinity); tuples (Arrow's map entries) as lists, as ``json.dumps`` writes them."""
    if isinstance(value, float) and not math.isfinite(value):
        if value != value:
            return None
        return _INFINITY if value > 0 else "-" + _INFINITY
    if isinstance(value, dict):
        return {k: _json_value(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
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


def _dumps(value: Any) -> bytes:
    text = json.dumps(_json_value(value), default=_json_default, ensure_ascii=False, allow_nan=False)
    if _INFINITY in text:  # rare: a substring search, not a second walk of the value
        text = text.replace(f'"-{_INFINITY}"', "-" + JSON_INFINITY).replace(f'"{_INFINITY}"', JSON_INFINITY)
    return text.encode()


def json_member(row: dict[str, Any]) -> bytes:
    """The ``key.json`` bytes of one metadata row: UTF-8 JSON, NaN as null (JSON has none), infinities as
    ``1e999`` and ``-1e999`` (read back as infinities), times as ISO strings.

    Raises
    ------
    RowProblem
        A value cannot be written as JSON (a string with lone surrogates, say);
        its ``column`` names the metadata column.
    """
    try:
        return _dumps(row)
    except (ValueError, TypeError, RecursionError) as exc:
        column = next((name for name, value in row.items() if not _dumps_ok(value)), None)
        raise RowProblem(f"the metadata cannot be written as JSON ({type(exc).__name__}: {exc})",
                         "clean or drop the value in this column", column=column) from None


def _dumps_ok(value: Any) -> bool:
    try:
        _dumps(value)
    except (ValueError, TypeError, RecursionError):
        return False
    return True


def json_rows(table: pa.Table) -> list[bytes]:
    """The ``key.json`` bytes of each row of ``table`` (see :func:`json_member`)."""
    return [json_member(row) for row in table.to_pylist()]

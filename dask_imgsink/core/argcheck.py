"""Strict checks of call arguments: wrong types fail at call time, never coerced.

``images_per_tar=2.5``, ``True`` or ``"10"`` are refused rather than turned
into 2, 1 or 10; the message names the argument and what it accepts.
"""

from __future__ import annotations

import numbers
from typing import Any


def check_int(name: str, value: Any, *, low: int | None = None, high: int | None = None,
              optional: bool = False) -> int | None:
    """Return ``value`` as an ``int`` if it is an integer (not a bool) within ``[low, high]``.

    Raises
    ------
    TypeError
        ``value`` is not an integer (floats, strings and bools are refused).
    ValueError
        ``value`` is out of range.
    """
    if value is None and optional:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name}={value!r} must be an integer, not {type(value).__name__}")
    value = int(value)
    if (low is not None and value < low) or (high is not None and value > high):
        if high is None:
            raise ValueError(f"{name}={value!r} must be at least {low}")
        raise ValueError(f"{name}={value!r} must be between {low} and {high}")
    return value


def check_byte_size(name: str, value: Any, *, low: int = 1, optional: bool = False) -> int | None:
    """Return ``value`` as a whole number of bytes, at least ``low``.

    Takes an integer, a float holding a whole number (``1e9``, as webdataset's
    ``maxsize`` is written), or a size string as Dask reads them
    (:func:`dask.utils.parse_bytes`: ``"500MB"``, ``"1 GiB"``, ``"1000000"``).

    Raises
    ------
    TypeError
        ``value`` is a bool, or neither a number nor a string.
    ValueError
        A fraction of a byte (``2.5``), a string that is not a size, or a size below ``low``.
    """
    if value is None and optional:
        return None
    if isinstance(value, str):
        # dask is a dependency; the writing core imports it only here
        from dask.utils import parse_bytes

        try:
            size = parse_bytes(value)
        except (ValueError, TypeError):
            raise ValueError(f"{name}={value!r} is not a size: give bytes as an integer, or a string "
                             "such as '500MB' or '1GiB'") from None
    elif isinstance(value, float):
        if not value.is_integer():
            raise ValueError(f"{name}={value!r} is not a whole number of bytes")
        size = int(value)
    elif isinstance(value, numbers.Integral) and not isinstance(value, bool):
        size = int(value)
    else:
        raise TypeError(f"{name}={value!r} must be a number of bytes (an integer, or a string such as "
                        f"'500MB'), not {type(value).__name__}")
    if size < low:
        raise ValueError(f"{name}={value!r} must be at least {low} byte{'s' if low != 1 else ''}")
    return size


def check_bool(name: str, value: Any) -> bool:
    """Return ``value`` if it is a ``bool``; refuse 0/1, strings and the like."""
    if not isinstance(value, bool):
        raise TypeError(f"{name}={value!r} must be True or False, not {type(value).__name__}")
    return value


def check_choice(name: str, value: Any, choices: tuple[str, ...]) -> str:
    """Return ``value`` if it is one of ``choices``."""
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"{name}={value!r} is not one of {list(choices)}")
    return value


def check_optional_str(name: str, value: Any) -> str | None:
    """Return ``value`` if it is ``None`` or a non-empty string."""
    if value is not None and (not isinstance(value, str) or not value):
        raise TypeError(f"{name}={value!r} must be a non-empty string or None")
    return value

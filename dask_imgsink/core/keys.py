"""Sample keys: the WebDataset naming rules and deterministic generated keys."""

from __future__ import annotations

import re

from ..errors import RowProblem

#: USTAR holds member names of at most 100 bytes; the longest extension we write
#: is four characters (".json", ".webp") plus the dot.
MAX_KEY_BYTES = 100 - len(".json")

_FORBIDDEN = re.compile(r"[\x00-\x1f\x7f./\\]")

KEY_FIX = (
    "keys become tar member names 'key.jpg'; WebDataset splits a name at its first dot, "
    "so use ASCII keys without '.', '/', '\\', control characters or NUL, at most "
    f"{MAX_KEY_BYTES} bytes (e.g. ddf['key'] = ddf['key'].str.replace('.', '_'))"
)


DALI_KEY_FIX = (
    "DALI's index (.idx) separates its fields with spaces, so it cannot name a member whose key "
    "holds one: replace them (ddf['key'] = ddf['key'].str.replace(' ', '_')), or write no index "
    "with dali_index=False"
)


def check_key(key: object, dali_index: bool = False) -> str:
    """Return ``key`` as a string if it is a valid WebDataset sample key.

    Parameters
    ----------
    key : object
        A string or an integer.
    dali_index : bool
        The key goes into a DALI index too, which cannot hold a space.

    Returns
    -------
    str

    Raises
    ------
    RowProblem
        If the key is missing, empty, not ASCII, too long or contains a
        forbidden character. The key is never silently changed.
    """
    if key is None or (isinstance(key, float) and key != key):
        raise RowProblem("the key is missing (None/NaN)", KEY_FIX)
    if isinstance(key, bool) or not isinstance(key, (str, int)):
        if hasattr(key, "item") and not isinstance(key, (bytes, bytearray)):
            key = key.item()  # NumPy integer scalars
        if isinstance(key, bool) or not isinstance(key, (str, int)):
            raise RowProblem(f"the key must be a string or an integer, got {type(key).__name__}", KEY_FIX)
    key = str(key)
    if not key:
        raise RowProblem("the key is empty", KEY_FIX)
    if not key.isascii():
        raise RowProblem("the key is not ASCII", KEY_FIX)
    bad = _FORBIDDEN.search(key)
    if bad:
        raise RowProblem(f"the key contains the forbidden character {bad.group()!r}", KEY_FIX)
    if len(key) > MAX_KEY_BYTES:
        raise RowProblem(f"the key is {len(key)} bytes long, more than {MAX_KEY_BYTES}", KEY_FIX)
    if dali_index and " " in key:
        raise RowProblem("the key holds a space, which DALI's index cannot", DALI_KEY_FIX)
    return key


def generated_key(partition: int, row: int) -> str:
    """Deterministic key for row ``row`` of partition ``partition``; unique in a dataset."""
    return f"{partition:06d}_{row:08d}"

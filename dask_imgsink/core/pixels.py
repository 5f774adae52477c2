"""Pixel values -> ``uint8 (H, W, C)`` arrays, scaled by their dtype's declared range.

The rules, so that no value changes silently:

- ``uint8`` as it is; ``bool`` as 0/255; ``uint16`` scaled by 255/65535 (rounded);
  floats must lie in [0, 1] and are scaled by 255. The scale comes from the
  dtype, never from the values an image happens to hold.
- Other dtypes (signed integers, ``uint32``/``uint64``, complex, object) have
  no declared image range, so they are refused with the conversion to make.
- Byte order is honoured: a big-endian ``>u2`` array means what its values say.
- Shapes ``(H, W)``, ``(H, W, 1)``, ``(H, W, 3)``, ``(H, W, 4)``; an empty image is refused.
- PIL images are read in their own mode: ``1``, ``L``, ``RGB``, ``RGBA`` directly;
  ``I;16``/``I;16B``/``I;16L`` as uint16; ``F`` as float32 (so [0, 1]); ``I``
  (32-bit integers) is refused like an int32 array; ``P``, ``LA``, ``CMYK``,
  ``YCbCr`` and the like are converted to RGB or RGBA by Pillow.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

from ..errors import RowProblem

_RANGE_FIX = (
    "convert it to a dtype with an image range: uint8 (0-255), uint16 (0-65535) or float in [0, 1], "
    "e.g. arr.astype(np.uint8) when the values are 0-255"
)

#: PIL modes whose array is taken as is (their dtype says the range).
_DIRECT_MODES = {"1", "L", "RGB", "RGBA", "I;16", "I;16L", "I;16B", "I;16N", "F", "I"}
_ALPHA_MODES = {"LA", "La", "PA", "RGBa"}


def _native(arr: np.ndarray) -> np.ndarray:
    """The same values in the machine's byte order."""
    if arr.dtype.isnative:
        return arr
    return arr.astype(arr.dtype.newbyteorder("="))


def _float_to_uint8(arr: np.ndarray) -> np.ndarray:
    if not np.isfinite(arr).all():
        raise RowProblem("the float image holds NaN or infinite values",
                         "replace them (np.nan_to_num) before writing")
    lo, hi = float(arr.min()), float(arr.max())
    if lo < 0.0 or hi > 1.0:
        raise RowProblem(
            f"float images must hold values in [0, 1], this one spans [{lo:g}, {hi:g}]",
            "scale it to [0, 1] (img / 255.0 for 0-255 data) or pass uint8",
        )
    return np.rint(arr.astype(np.float64) * 255.0).astype(np.uint8)


def to_uint8(arr: np.ndarray) -> np.ndarray:
    """Scale a pixel array to uint8 by its dtype's declared range (never clip, never guess)."""
    arr = _native(arr)
    kind, size = arr.dtype.kind, arr.dtype.itemsize
    if kind == "u" and size == 1:
        return arr
    if kind == "b":
        return arr.astype(np.uint8) * np.uint8(255)
    if kind == "u" and size == 2:
        return ((arr.astype(np.uint32) + 128) // 257).astype(np.uint8)
    if kind == "f":
        return _float_to_uint8(arr)
    raise RowProblem(f"image arrays of dtype {arr.dtype} have no declared image range", _RANGE_FIX)


def to_hwc(arr: np.ndarray) -> np.ndarray:
    """``(H, W)`` -> ``(H, W, 1)``; refuse other shapes and empty images."""
    if arr.ndim == 2:
        arr = arr[:, :, None]
    if arr.ndim != 3 or arr.shape[2] not in (1, 3, 4):
        raise RowProblem(
            f"image arrays must be shaped (H, W), (H, W, 1), (H, W, 3) or (H, W, 4), got {arr.shape}",
            "pass HWC RGB/RGBA or HW gray (transpose CHW arrays with arr.transpose(1, 2, 0))",
        )
    if arr.shape[0] == 0 or arr.shape[1] == 0:
        raise RowProblem(f"the image is empty (shape {arr.shape})", "drop the row before writing")
    return arr


def pil_to_array(img: Image.Image) -> np.ndarray:
    """The pixels of a PIL image, in a dtype that states their range."""
    mode = img.mode
    if mode in _DIRECT_MODES:
        return np.asarray(img)
    if mode in ("RGBX", "CMYK", "YCbCr", "LAB", "HSV"):
        return np.asarray(img.convert("RGB"))
    has_alpha = mode in _ALPHA_MODES or "transparency" in img.info
    try:
        return np.asarray(img.convert("RGBA" if has_alpha else "RGB"))
    except (ValueError, OSError) as exc:
        raise RowProblem(
            f"PIL images of mode {mode!r} cannot be converted to RGB ({exc})",
            "convert it yourself (img.convert('RGB')) or pass a NumPy array",
        ) from None

"""Already-encoded image bytes: which format they are, whether they are whole, and opening them.

Pass-through bytes are written unchanged, so they are checked before they are
trusted. The default check (``validate="complete"``) is structural and costs
microseconds: a JPEG must end with its EOI marker (trailing NUL padding
allowed), a PNG's chunk chain must run from its signature to an ``IEND``
chunk that ends the data, and a WebP's RIFF size must match its length. A
truncated file fails all three. ``validate="decode"`` decodes every image
fully instead, which also catches damage inside the compressed data, at the
cost of a full decode (see ``benchmarks/bench_validate.py``).
"""

from __future__ import annotations

import io

from PIL import Image, JpegImagePlugin, PngImagePlugin, WebPImagePlugin

from ..errors import RowProblem

#: How pass-through bytes are checked: "header" (headers only), "complete"
#: (the file is whole; default) or "decode" (decodes fully).
VALIDATE_CHOICES = ("header", "complete", "decode")

#: Pillow's image classes, opened directly: ``Image.open`` applies Pillow's global
#: pixel limit (``Image.MAX_IMAGE_PIXELS``), which is not ours and not per call.
_IMAGE_CLASSES = {
    "jpeg": JpegImagePlugin.JpegImageFile,
    "png": PngImagePlugin.PngImageFile,
    "webp": WebPImagePlugin.WebPImageFile,
}

_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"

DAMAGED_FIX = "the image is damaged or truncated; drop or re-fetch it (on_error='skip' records such rows)"


def sniff_format(data: bytes) -> str | None:
    """Return ``"jpeg"``, ``"png"`` or ``"webp"`` from magic bytes, or ``None``."""
    if data[:3] == b"\xff\xd8\xff":
        return "jpeg"
    if data[:8] == _PNG_SIGNATURE:
        return "png"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "webp"
    return None


def _jpeg_problem(data: bytes) -> str | None:
    if data.rstrip(b"\x00").endswith(b"\xff\xd9"):
        return None
    return "the JPEG does not end with its end-of-image marker (FFD9): it is truncated"


def _png_problem(data: bytes) -> str | None:
    pos, end = len(_PNG_SIGNATURE), len(data)
    while pos + 8 <= end:
        length = int.from_bytes(data[pos:pos + 4], "big")
        kind = data[pos + 4:pos + 8]
        pos += 12 + length  # length, type, data, CRC
        if pos > end:
            return f"the PNG's {kind.decode('latin-1')!r} chunk runs past the end of the data: it is truncated"
        if kind == b"IEND":
            return None if pos == end else f"the PNG has {end - pos} bytes after its IEND chunk"
    return "the PNG has no IEND chunk: it is truncated"


def _webp_problem(data: bytes) -> str | None:
    declared = int.from_bytes(data[4:8], "little") + 8
    if declared == len(data):
        return None
    return f"the WebP's RIFF header declares {declared} bytes but there are {len(data)}: it is truncated or padded"


_PROBLEM_FINDERS = {"jpeg": _jpeg_problem, "png": _png_problem, "webp": _webp_problem}


def check_complete(data: bytes, fmt: str) -> None:
    """Raise :class:`RowProblem` unless ``data`` is a whole ``fmt`` file (structure only)."""
    problem = _PROBLEM_FINDERS[fmt](data)
    if problem is not None:
        raise RowProblem(problem, DAMAGED_FIX)


def open_encoded(data: bytes, fmt: str) -> Image.Image:
    """Open JPEG/PNG/WebP bytes lazily (header only) without Pillow's global pixel limit."""
    return _IMAGE_CLASSES[fmt](io.BytesIO(data))

"""Image values -> encoded bytes plus their facts (format, width, height, channels).

Accepted values: NumPy arrays and PIL images (scaled by their dtype's declared
range, see :mod:`~dask_imgsink.core.pixels`); already-encoded JPEG/PNG/WebP
bytes (checked to be whole, then passed through unchanged, see
:mod:`~dask_imgsink.core.encoded`); Hugging Face style ``{"bytes": ...,
"path": ...}`` dicts, as dicts or Arrow structs.

Output formats are rows of :data:`ENCODERS`. JPEG goes through simplejpeg
(libjpeg-turbo, releases the GIL, so threads scale), imported when first
needed so a worker without it fails the job with a clear error; PNG and WebP
go through Pillow, whose encoders for those formats release the GIL too.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import pandas as pd
from PIL import Image

from ..errors import MissingDependencyError, RowProblem
from .argcheck import check_bool, check_choice, check_int
from .encoded import (
    DAMAGED_FIX,
    VALIDATE_CHOICES,
    check_complete,
    open_encoded,
    sniff_format,
)
from .pixels import pil_to_array, to_hwc, to_uint8

#: Output format -> file extension used for the tar member.
EXTENSIONS = {"jpeg": "jpg", "png": "png", "webp": "webp"}

#: Largest width or height each format can store (libjpeg: 65500; WebP: 16383).
MAX_SIDE = {"jpeg": 65500, "png": 2**31 - 1, "webp": 16383}

#: What to do with an alpha channel when writing JPEG.
JPEG_ALPHA_CHOICES = ("error", "drop", "white")

#: Largest image, in pixels, written or decoded by default (16384 x 16384). One
#: setting for both directions: ``verify --decode`` opens whatever was written.
DEFAULT_MAX_PIXELS = 16384 * 16384


@dataclass(frozen=True)
class EncodeOptions:
    """How to encode images. Every field is checked strictly when the options are made.

    Parameters
    ----------
    image_format : {"jpeg", "png", "webp"}
        Format of pixel inputs (and of encoded inputs when ``reencode``).
    quality : int
        JPEG / WebP quality, 1-100 (an ``int``: ``92.5`` and ``True`` are refused).
    jpeg_alpha : {"error", "drop", "white"}
        A 4-channel image written as JPEG: raise (default), drop the alpha
        channel, or composite over a white background.
    reencode : bool
        Re-encode already-encoded bytes whose format differs from ``image_format``.
        By default encoded bytes are written unchanged.
    max_pixels : int
        Largest image (width x height) accepted; larger ones are bad rows. The
        same limit applies when ``verify`` decodes the dataset.
    validate : {"complete", "decode", "header"}
        How already-encoded bytes are checked before they are passed through:
        the file is whole (default, structural, microseconds), it decodes fully,
        or only its header parses.
    """

    image_format: str = "jpeg"
    quality: int = 92
    jpeg_alpha: str = "error"
    reencode: bool = False
    max_pixels: int = DEFAULT_MAX_PIXELS
    validate: str = "complete"

    def __post_init__(self) -> None:
        check_choice("image_format", self.image_format, tuple(EXTENSIONS))
        check_int("quality", self.quality, low=1, high=100)
        check_choice("jpeg_alpha", self.jpeg_alpha, JPEG_ALPHA_CHOICES)
        check_bool("reencode", self.reencode)
        check_int("max_pixels", self.max_pixels, low=1)
        check_choice("validate", self.validate, VALIDATE_CHOICES)


@dataclass(frozen=True)
class EncodedImage:
    """Encoded image bytes and what they hold."""

    data: bytes
    format: str
    width: int
    height: int
    channels: int

    @property
    def extension(self) -> str:
        return EXTENSIONS[self.format]


# --------------------------------------------------------------------------- encoders


def _simplejpeg():
    try:
        import simplejpeg
    except ImportError as exc:
        raise MissingDependencyError(
            f"JPEG encoding needs the package simplejpeg, which cannot be imported here ({exc}). "
            "Install dask-imgsink (which requires it) on every worker: pip install simplejpeg"
        ) from None
    return simplejpeg


def _encode_jpeg(pixels: np.ndarray, quality: int) -> bytes:
    gray = pixels.shape[2] == 1
    return _simplejpeg().encode_jpeg(
        np.ascontiguousarray(pixels),
        quality=quality,
        colorspace="GRAY" if gray else "RGB",
        colorsubsampling="Gray" if gray else "420",
        fastdct=False,
    )


def _pil_image(pixels: np.ndarray) -> Image.Image:
    if pixels.shape[2] == 1:
        return Image.fromarray(np.ascontiguousarray(pixels[:, :, 0]))
    return Image.fromarray(np.ascontiguousarray(pixels))


def _encode_png(pixels: np.ndarray, quality: int) -> bytes:
    buf = io.BytesIO()
    _pil_image(pixels).save(buf, format="PNG")
    return buf.getvalue()


def _encode_webp(pixels: np.ndarray, quality: int) -> bytes:
    buf = io.BytesIO()
    _pil_image(pixels).save(buf, format="WEBP", quality=quality)
    return buf.getvalue()


#: Output format -> encoder of a ``uint8 (H, W, C)`` array, C in {1, 3, 4}.
ENCODERS: dict[str, Callable[[np.ndarray, int], bytes]] = {
    "jpeg": _encode_jpeg,
    "png": _encode_png,
    "webp": _encode_webp,
}


# --------------------------------------------------------------------------- checks


def check_pixels(width: int, height: int, max_pixels: int) -> None:
    """Raise :class:`RowProblem` if a ``width`` x ``height`` image exceeds ``max_pixels``."""
    if width * height > max_pixels:
        raise RowProblem(
            f"the image is {width}x{height} = {width * height:,} pixels, more than max_pixels={max_pixels:,}",
            "pass a larger max_pixels (verify then decodes with the same limit), or resize the image",
        )


def check_side(width: int, height: int, fmt: str) -> None:
    """Raise :class:`RowProblem` if ``fmt`` cannot store an image this wide or tall."""
    limit = MAX_SIDE[fmt]
    if width > limit or height > limit:
        raise RowProblem(
            f"the image is {width}x{height} and {fmt.upper()} stores at most {limit} pixels per side",
            "write it as PNG (image_format='png'), or resize it",
        )


def decode_encoded(data: bytes, fmt: str, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Decode JPEG/PNG/WebP bytes fully, refusing images above ``max_pixels``.

    Raises
    ------
    RowProblem
        The image exceeds ``max_pixels``.
    Exception
        Whatever Pillow raises for damaged data.
    """
    img = open_encoded(data, fmt)
    check_pixels(img.size[0], img.size[1], max_pixels)
    img.load()
    return img


# --------------------------------------------------------------------------- inputs


def _handle_alpha(pixels: np.ndarray, options: EncodeOptions) -> np.ndarray:
    if pixels.shape[2] != 4 or options.image_format != "jpeg":
        return pixels
    if options.jpeg_alpha == "drop":
        return pixels[:, :, :3]
    if options.jpeg_alpha == "white":
        rgb = pixels[:, :, :3].astype(np.uint16)
        alpha = pixels[:, :, 3:4].astype(np.uint16)
        return ((rgb * alpha + 255 * (255 - alpha) + 127) // 255).astype(np.uint8)
    raise RowProblem(
        "the image has an alpha channel (4 channels) and JPEG cannot store alpha",
        "write image_format='png' or 'webp' to keep it, or pass jpeg_alpha='drop' "
        "(discard alpha) or jpeg_alpha='white' (composite over white)",
    )


def encode_pixels(arr: np.ndarray, options: EncodeOptions) -> EncodedImage:
    """Encode a pixel array; see :mod:`~dask_imgsink.core.pixels` for what is accepted.

    Raises
    ------
    RowProblem
        For an unsupported dtype, shape or value range, an image too large for
        ``max_pixels`` or for the format, or alpha into JPEG with ``jpeg_alpha="error"``.
    """
    arr = to_hwc(np.asarray(arr))
    height, width = arr.shape[:2]
    check_pixels(width, height, options.max_pixels)
    check_side(width, height, options.image_format)
    pixels = _handle_alpha(to_uint8(arr), options)
    data = ENCODERS[options.image_format](pixels, options.quality)
    return EncodedImage(data, options.image_format, width, height, pixels.shape[2])


#: Channels of a JPEG by the colour space libjpeg-turbo reads from its header (Pillow's bands for the same file).
_JPEG_CHANNELS = {"Gray": 1, "RGB": 3, "YCbCr": 3, "CMYK": 4, "YCCK": 4}

#: Start-of-frame markers (every coding process); their segment gives the sample precision.
_JPEG_SOF = frozenset({0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF})


def _jpeg_header(data: bytes) -> tuple[int, int, int] | None:
    """``(width, height, channels)`` of an 8-bit JPEG from libjpeg-turbo's header parser, or ``None``.

    A few microseconds in C, where Pillow's Python parser took about 18 us a file
    (45 us inside a job with the GIL contended: a quarter of a pass-through job's
    GIL time). ``None`` sends the caller to Pillow, which either reads the header or
    words the error: for a header libjpeg-turbo rejects, for simplejpeg missing, and
    for samples of other than 8 bits (libjpeg-turbo reads a 12-bit header, Pillow
    and most loaders refuse the file).
    """
    try:
        import simplejpeg

        height, width, colorspace, _ = simplejpeg.decode_jpeg_header(data)
    except Exception:  # ImportError, or a header libjpeg-turbo rejects: Pillow decides
        return None
    channels = _JPEG_CHANNELS.get(colorspace)
    if channels is None or _jpeg_precision(data) != 8:
        return None
    return width, height, channels


def _jpeg_precision(data: bytes) -> int | None:
    """Bits per sample from the JPEG's start-of-frame segment (walked segment by segment), or ``None``."""
    pos, end = 2, len(data)
    while pos + 4 < end:
        if data[pos] != 0xFF:
            return None
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
        elif marker in _JPEG_SOF:
            return data[pos + 4]
        elif marker in (0xD9, 0xDA):  # end of image, start of scan: no frame header before them
            return None
        elif 0xD0 <= marker <= 0xD7 or marker == 0x01:  # markers without a segment
            pos += 2
        else:
            pos += 2 + int.from_bytes(data[pos + 2:pos + 4], "big")
    return None


def encode_bytes(data: bytes, options: EncodeOptions) -> EncodedImage:
    """Pass already-encoded bytes through, once checked (or re-encode them when asked).

    Raises
    ------
    RowProblem
        If the bytes are not a JPEG, PNG or WebP image, or are damaged or
        truncated (as far as ``options.validate`` checks).
    """
    fmt = sniff_format(data)
    if fmt is None:
        raise RowProblem(
            f"the bytes are not a JPEG, PNG or WebP image (they start with {bytes(data[:8])!r})",
            "pass pixels as a NumPy array, or convert the image to JPEG/PNG/WebP first",
        )
    if options.validate == "complete":
        check_complete(data, fmt)
    needs_pixels = options.validate == "decode" or (options.reencode and fmt != options.image_format)
    header = _jpeg_header(data) if fmt == "jpeg" and not needs_pixels else None
    if header is not None:
        check_pixels(header[0], header[1], options.max_pixels)
        return EncodedImage(bytes(data), fmt, *header)
    try:
        with open_encoded(data, fmt) as img:
            width, height = img.size
            channels = len(img.getbands())
            check_pixels(width, height, options.max_pixels)
            if needs_pixels:
                img.load()
            if options.reencode and fmt != options.image_format:
                return encode_pixels(pil_to_array(img), options)
    except RowProblem:
        raise
    except Exception as exc:  # PIL raises many types for damaged data
        raise RowProblem(f"the {fmt.upper()} bytes cannot be read ({type(exc).__name__}: {exc})",
                         DAMAGED_FIX) from None
    return EncodedImage(bytes(data), fmt, width, height, channels)


def encode_image(value: Any, options: EncodeOptions) -> EncodedImage:
    """Encode one image value of any accepted kind.

    Parameters
    ----------
    value : ndarray, bytes, PIL.Image.Image or dict
        The image (see the module docstring).
    options : EncodeOptions

    Returns
    -------
    EncodedImage

    Raises
    ------
    RowProblem
        If the value cannot be written; the message says why and how to fix it.
    MissingDependencyError
        If the encoder's package is not installed here.
    """
    if isinstance(value, np.ndarray):
        return encode_pixels(value, options)
    if isinstance(value, (bytes, bytearray, memoryview)):
        return encode_bytes(bytes(value), options)
    if isinstance(value, Image.Image):
        check_pixels(value.size[0], value.size[1], options.max_pixels)
        return encode_pixels(pil_to_array(value), options)
    if isinstance(value, dict):
        return encode_bytes(read_hf_dict(value), options)
    if value is None or value is pd.NA or (isinstance(value, float) and value != value):
        raise RowProblem("the image is missing (None/NaN)", "drop rows without an image before writing")
    if isinstance(value, str):
        raise RowProblem(
            "the image is a string, not an array or bytes; Dask's 'dataframe.convert-string' "
            "may have turned an object column into text",
            "see the error raised for string image columns, or pass bytes/arrays",
        )
    raise RowProblem(
        f"cannot write an image of type {type(value).__name__}",
        "pass a NumPy array, encoded bytes, a PIL image or a {'bytes': ..., 'path': ...} dict",
    )


def read_hf_dict(value: dict) -> bytes:
    """The encoded bytes of a ``{"bytes": ..., "path": ...}`` dict (read from ``path`` if needed)."""
    data = value.get("bytes")
    if data is not None:
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise RowProblem(
                f"the image dict's 'bytes' holds a {type(data).__name__}, not bytes",
                "put the encoded image bytes in 'bytes' (or None and a readable 'path')",
            )
        return bytes(data)
    path = value.get("path")
    if isinstance(path, str) and path:
        import fsspec

        try:
            with fsspec.open(path, "rb") as f:
                return f.read()
        except OSError as exc:
            raise RowProblem(
                f"the image dict has no bytes and its path {path!r} cannot be read ({exc})",
                "give the dict its 'bytes' or a readable 'path'",
            ) from None
    raise RowProblem(
        "the image dict has neither 'bytes' nor a 'path' string",
        "pass {'bytes': b'...', 'path': None} or {'bytes': None, 'path': 'file.jpg'}",
    )

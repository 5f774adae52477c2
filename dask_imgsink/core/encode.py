"""Image values -> encoded bytes plus their facts (format, width, height, channels).

Accepted values: NumPy arrays (``uint8``; other integer types holding 0-255;
``uint16`` scaled by 1/257; floats in [0, 1] scaled by 255), shaped ``(H, W)``,
``(H, W, 1)``, ``(H, W, 3)`` or ``(H, W, 4)``; PIL images; already-encoded
JPEG/PNG/WebP bytes (passed through unchanged); Hugging Face style
``{"bytes": ..., "path": ...}`` dicts.

Output formats are rows of :data:`ENCODERS`. JPEG goes through simplejpeg
(libjpeg-turbo, releases the GIL, so threads scale); PNG and WebP go through
Pillow, whose encoders for those formats release the GIL too.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import simplejpeg
from PIL import Image, JpegImagePlugin, PngImagePlugin, WebPImagePlugin

from ..errors import RowProblem

#: Output format -> file extension used for the tar member.
EXTENSIONS = {"jpeg": "jpg", "png": "png", "webp": "webp"}

#: What to do with an alpha channel when writing JPEG.
JPEG_ALPHA_CHOICES = ("error", "drop", "white")

#: Largest image, in pixels, written or decoded by default (16384 x 16384). One
#: setting for both directions: ``verify --decode`` opens whatever was written.
DEFAULT_MAX_PIXELS = 16384 * 16384

#: Pillow's image classes, opened directly: ``Image.open`` applies Pillow's global
#: pixel limit (``Image.MAX_IMAGE_PIXELS``), which is not ours and not per call.
_IMAGE_CLASSES = {
    "jpeg": JpegImagePlugin.JpegImageFile,
    "png": PngImagePlugin.PngImageFile,
    "webp": WebPImagePlugin.WebPImageFile,
}


@dataclass(frozen=True)
class EncodeOptions:
    """How to encode images.

    Parameters
    ----------
    image_format : {"jpeg", "png", "webp"}
        Format of pixel inputs (and of encoded inputs when ``reencode``).
    quality : int
        JPEG / WebP quality, 1-100.
    jpeg_alpha : {"error", "drop", "white"}
        A 4-channel image written as JPEG: raise (default), drop the alpha
        channel, or composite over a white background.
    reencode : bool
        Re-encode already-encoded bytes whose format differs from ``image_format``.
        By default encoded bytes are written unchanged.
    max_pixels : int
        Largest image (width x height) accepted; larger ones are bad rows. The
        same limit applies when ``verify`` decodes the dataset.
    """

    image_format: str = "jpeg"
    quality: int = 92
    jpeg_alpha: str = "error"
    reencode: bool = False
    max_pixels: int = DEFAULT_MAX_PIXELS

    def __post_init__(self) -> None:
        if self.image_format not in EXTENSIONS:
            raise ValueError(
                f"image_format={self.image_format!r} is not one of {sorted(EXTENSIONS)}"
            )
        if not 1 <= int(self.quality) <= 100:
            raise ValueError(f"quality={self.quality!r} must be between 1 and 100")
        if isinstance(self.max_pixels, bool) or not isinstance(self.max_pixels, int) or self.max_pixels < 1:
            raise ValueError(f"max_pixels={self.max_pixels!r} must be a positive integer")
        if self.jpeg_alpha not in JPEG_ALPHA_CHOICES:
            raise ValueError(
                f"jpeg_alpha={self.jpeg_alpha!r} is not one of {list(JPEG_ALPHA_CHOICES)}"
            )


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


def _encode_jpeg(pixels: np.ndarray, quality: int) -> bytes:
    gray = pixels.shape[2] == 1
    return simplejpeg.encode_jpeg(
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


# --------------------------------------------------------------------------- inputs


def sniff_format(data: bytes) -> str | None:
    """Return ``"jpeg"``, ``"png"`` or ``"webp"`` from magic bytes, or ``None``."""
    if data[:3] == b"\xff\xd8\xff":
        return "jpeg"
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        return "png"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "webp"
    return None


def check_pixels(width: int, height: int, max_pixels: int) -> None:
    """Raise :class:`RowProblem` if a ``width`` x ``height`` image exceeds ``max_pixels``."""
    if width * height > max_pixels:
        raise RowProblem(
            f"the image is {width}x{height} = {width * height:,} pixels, more than max_pixels={max_pixels:,}",
            "pass a larger max_pixels (verify then decodes with the same limit), or resize the image",
        )


def open_encoded(data: bytes, fmt: str) -> Image.Image:
    """Open JPEG/PNG/WebP bytes lazily (header only) without Pillow's global pixel limit."""
    return _IMAGE_CLASSES[fmt](io.BytesIO(data))


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


def _to_uint8(arr: np.ndarray) -> np.ndarray:
    """Scale (never clip) a pixel array to uint8."""
    if arr.dtype == np.uint8:
        return arr
    if arr.dtype == np.uint16:
        return ((arr.astype(np.uint32) + 128) // 257).astype(np.uint8)
    if np.issubdtype(arr.dtype, np.floating):
        if not np.isfinite(arr).all():
            raise RowProblem(
                "the float image holds NaN or infinite values",
                "replace them (np.nan_to_num) before writing",
            )
        lo, hi = float(arr.min()), float(arr.max())
        if lo < 0.0 or hi > 1.0:
            raise RowProblem(
                f"float images must hold values in [0, 1], this one spans [{lo:g}, {hi:g}]",
                "scale it to [0, 1] (img / 255.0) or pass uint8",
            )
        return np.rint(arr * 255.0).astype(np.uint8)
    if np.issubdtype(arr.dtype, np.integer) and not np.issubdtype(arr.dtype, np.bool_):
        lo, hi = int(arr.min()), int(arr.max())
        if lo < 0 or hi > 255:
            raise RowProblem(
                f"{arr.dtype} images must hold values 0-255, this one spans [{lo}, {hi}]",
                "convert to uint8 (or uint16 for 16-bit data) yourself",
            )
        return arr.astype(np.uint8)
    raise RowProblem(
        f"image arrays of dtype {arr.dtype} are not supported",
        "pass uint8, uint16, or float in [0, 1]",
    )


def _to_hwc(arr: np.ndarray) -> np.ndarray:
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


def _pil_to_array(img: Image.Image) -> np.ndarray:
    mode = img.mode
    if mode in ("L", "RGB", "RGBA", "I;16", "F"):
        return np.asarray(img)
    if mode == "1":
        return np.asarray(img.convert("L"))
    has_alpha = mode in ("LA", "PA", "RGBa", "La") or "transparency" in img.info
    return np.asarray(img.convert("RGBA" if has_alpha else "RGB"))


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
    """Encode a pixel array; see the module docstring for what is accepted.

    Raises
    ------
    RowProblem
        For an unsupported dtype, shape or value range, or alpha into JPEG
        with ``jpeg_alpha="error"``.
    """
    arr = np.asarray(arr)
    if arr.ndim in (2, 3):
        check_pixels(arr.shape[1], arr.shape[0], options.max_pixels)
    pixels = _handle_alpha(_to_hwc(_to_uint8(arr)), options)
    data = ENCODERS[options.image_format](pixels, options.quality)
    return EncodedImage(data, options.image_format, pixels.shape[1], pixels.shape[0], pixels.shape[2])


def encode_bytes(data: bytes, options: EncodeOptions) -> EncodedImage:
    """Pass already-encoded bytes through (or re-encode them when asked).

    Raises
    ------
    RowProblem
        If the bytes are not a readable JPEG, PNG or WebP image.
    """
    fmt = sniff_format(data)
    if fmt is None:
        raise RowProblem(
            f"the bytes are not a JPEG, PNG or WebP image (they start with {bytes(data[:8])!r})",
            "pass pixels as a NumPy array, or convert the image to JPEG/PNG/WebP first",
        )
    try:
        with open_encoded(data, fmt) as img:
            width, height = img.size
            channels = len(img.getbands())
            check_pixels(width, height, options.max_pixels)
            if options.reencode and fmt != options.image_format:
                img.load()
                return encode_pixels(_pil_to_array(img), options)
    except RowProblem:
        raise
    except Exception as exc:  # PIL raises many types for a damaged header
        raise RowProblem(
            f"the {fmt.upper()} bytes cannot be read ({type(exc).__name__}: {exc})",
            "the image is damaged; drop or re-fetch it",
        ) from None
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
    """
    if isinstance(value, np.ndarray):
        return encode_pixels(value, options)
    if isinstance(value, (bytes, bytearray, memoryview)):
        return encode_bytes(bytes(value), options)
    if isinstance(value, Image.Image):
        check_pixels(value.size[0], value.size[1], options.max_pixels)
        return encode_pixels(_pil_to_array(value), options)
    if isinstance(value, dict):
        return encode_image(_read_hf_dict(value), options)
    if value is None or (isinstance(value, float) and value != value):
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


def _read_hf_dict(value: dict) -> bytes:
    data = value.get("bytes")
    if data is not None:
        return data
    path = value.get("path")
    if path:
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
        "the image dict has neither 'bytes' nor 'path'",
        "pass {'bytes': b'...', 'path': None} or {'bytes': None, 'path': 'file.jpg'}",
    )

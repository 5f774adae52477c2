"""The encoder: every input kind, scaling, pass-through, and each bad input's message."""

from __future__ import annotations

import io

import numpy as np
import pytest
from helpers import decode, make_image, png_bytes, psnr
from PIL import Image

from dask_imgsink.core.encode import EncodeOptions, encode_image, sniff_format
from dask_imgsink.errors import RowProblem

JPEG = EncodeOptions()
PNG = EncodeOptions(image_format="png")


@pytest.mark.parametrize("shape, channels", [((48, 64, 3), 3), ((48, 64), 1), ((48, 64, 1), 1)])
def test_uint8_arrays_encode_to_jpeg_with_high_psnr(shape, channels):
    img = make_image(3, channels=3)
    arr = img if len(shape) == 3 and shape[2] == 3 else img[:, :, :1].reshape(shape)
    out = encode_image(arr, JPEG)
    assert (out.format, out.extension, out.width, out.height, out.channels) == ("jpeg", "jpg", 64, 48, channels)
    back = decode(out.data)
    assert psnr(back.reshape(arr.shape), arr) > 40


def test_rgba_to_png_keeps_alpha_exactly():
    rgba = np.concatenate([make_image(1), np.full((48, 64, 1), 77, np.uint8)], axis=2)
    out = encode_image(rgba, PNG)
    assert out.channels == 4
    np.testing.assert_array_equal(decode(out.data), rgba)


def test_rgba_to_webp_keeps_alpha():
    rgba = np.concatenate([make_image(1), np.full((48, 64, 1), 200, np.uint8)], axis=2)
    out = encode_image(rgba, EncodeOptions(image_format="webp"))
    back = decode(out.data)
    assert back.shape == (48, 64, 4) and out.format == "webp"


def test_rgba_to_jpeg_raises_and_says_how_to_fix():
    rgba = np.zeros((8, 8, 4), np.uint8)
    with pytest.raises(RowProblem, match="alpha") as info:
        encode_image(rgba, JPEG)
    assert "jpeg_alpha='drop'" in str(info.value) and "png" in str(info.value)


def test_jpeg_alpha_drop_and_white_are_explicit_conversions():
    rgba = np.zeros((16, 16, 4), np.uint8)
    rgba[..., 0] = 200
    rgba[..., 3] = 0  # fully transparent
    dropped = decode(encode_image(rgba, EncodeOptions(jpeg_alpha="drop")).data)
    white = decode(encode_image(rgba, EncodeOptions(jpeg_alpha="white")).data)
    assert abs(int(dropped[..., 0].mean()) - 200) < 4 and dropped[..., 1].mean() < 4
    assert white.mean() > 250  # transparent over white is white


def test_uint16_is_scaled_not_clipped():
    arr = np.full((8, 8), 65535, np.uint16)
    arr[:4] = 32896  # 128 * 257
    back = decode(encode_image(arr, PNG).data)
    assert back[5, 0] == 255 and back[0, 0] == 128


def test_float_in_unit_range_is_scaled_not_clipped():
    arr = np.zeros((8, 8, 3), np.float32)
    arr[:4] = 1.0
    arr[4:] = 0.5
    back = decode(encode_image(arr, PNG).data)
    assert back[0, 0, 0] == 255 and back[7, 0, 0] == 128


def test_float_outside_unit_range_is_an_error_with_the_range():
    with pytest.raises(RowProblem, match=r"spans \[255, 255\]"):
        encode_image(np.full((4, 4), 255.0), PNG)
    with pytest.raises(RowProblem, match="NaN"):
        encode_image(np.full((4, 4), np.nan), PNG)


@pytest.mark.parametrize("dtype", [np.int8, np.int16, np.int32, np.int64, np.uint32, np.uint64, np.complex64])
def test_dtypes_without_a_declared_range_are_refused_whatever_their_values(dtype):
    """An int64 array holding 0-255 is not guessed to be 8-bit: its dtype says nothing of a range."""
    arr = make_image(5).astype(dtype)
    with pytest.raises(RowProblem, match=f"dtype {np.dtype(dtype)} have no declared image range.*astype"):
        encode_image(arr, PNG)


@pytest.mark.parametrize("shape", [(3, 48, 64), (48, 64, 2), (4,), (0, 5, 3)])
def test_bad_shapes_are_errors(shape):
    with pytest.raises(RowProblem):
        encode_image(np.zeros(shape, np.uint8), JPEG)


def test_pil_images_of_several_modes():
    rgb = make_image(2)
    assert psnr(decode(encode_image(Image.fromarray(rgb), JPEG).data), rgb) > 40
    gray = Image.fromarray(rgb[:, :, 0])
    out = encode_image(gray, PNG)
    assert out.channels == 1
    np.testing.assert_array_equal(decode(out.data), rgb[:, :, 0])
    pal = Image.fromarray(rgb).convert("P")
    assert encode_image(pal, PNG).channels == 3


@pytest.mark.parametrize("fmt", ["jpeg", "png", "webp"])
def test_encoded_bytes_pass_through_unchanged(fmt):
    buf = io.BytesIO()
    Image.fromarray(make_image(4)).save(buf, format=fmt.upper())
    data = buf.getvalue()
    out = encode_image(data, JPEG)
    assert out.data == data and out.format == fmt and (out.width, out.height, out.channels) == (64, 48, 3)
    assert sniff_format(data) == fmt


@pytest.mark.parametrize("mode, options", [
    ("L", {}), ("RGB", {}), ("RGB", {"progressive": True}), ("RGB", {"subsampling": 0}), ("CMYK", {}),
])
def test_passed_through_jpeg_headers_read_by_libjpeg_turbo_agree_with_pillow(mode, options):
    """JPEG pass-through reads sizes and channels with libjpeg-turbo's C header parser, not Pillow's Python one."""
    from dask_imgsink.core.encode import _jpeg_header

    buf = io.BytesIO()
    Image.new(mode, (37, 21)).save(buf, format="JPEG", **options)
    data = buf.getvalue()
    with Image.open(io.BytesIO(data)) as img:
        by_pillow = (*img.size, len(img.getbands()))
    assert _jpeg_header(data) == by_pillow  # the fast path is taken, and agrees
    out = encode_image(data, JPEG)
    assert (out.width, out.height, out.channels) == by_pillow and out.data == data


def test_jpeg_headers_libjpeg_turbo_rejects_still_get_pillows_row_error():
    damaged = b"\xff\xd8\xff\xe0" + b"\x00\x10JFIF" + bytes(40) + b"\xff\xd9"
    from dask_imgsink.core.encode import _jpeg_header

    assert _jpeg_header(damaged) is None
    with pytest.raises(RowProblem, match="JPEG bytes cannot be read"):
        encode_image(damaged, JPEG)


def test_a_12_bit_jpeg_is_still_refused_though_libjpeg_turbo_reads_its_header():
    """libjpeg-turbo reads a 12-bit header; Pillow (and most loaders) refuse the file, and so do we."""
    import simplejpeg

    buf = io.BytesIO()
    Image.new("RGB", (40, 30)).save(buf, format="JPEG")
    data = bytearray(buf.getvalue())
    sof = data.find(b"\xff\xc0")
    data[sof + 1], data[sof + 4] = 0xC1, 12  # extended sequential, 12-bit samples
    assert simplejpeg.decode_jpeg_header(bytes(data))[:2] == (30, 40)
    with pytest.raises(RowProblem, match="JPEG bytes cannot be read"):
        encode_image(bytes(data), JPEG)


def test_a_jpeg_with_an_exif_thumbnail_reads_the_main_frame():
    """The frame header is found by walking segments, not by searching bytes (an EXIF thumbnail has its own)."""
    from dask_imgsink.core.encode import _jpeg_header

    thumb = io.BytesIO()
    Image.new("RGB", (8, 6)).save(thumb, format="JPEG")
    exif = Image.Exif()
    exif[0x010E] = "x"  # ImageDescription
    main = io.BytesIO()
    Image.new("L", (50, 20)).save(main, format="JPEG", exif=b"Exif\x00\x00" + exif.tobytes() + thumb.getvalue())
    data = main.getvalue()
    assert data.find(b"\xff\xc0") < data.rfind(b"\xff\xc0")  # two frame headers in the bytes
    assert _jpeg_header(data) == (50, 20, 1)


def test_the_pixel_limit_applies_to_passed_through_jpegs():
    buf = io.BytesIO()
    Image.new("RGB", (300, 200)).save(buf, format="JPEG")
    with pytest.raises(RowProblem, match="pixels"):
        encode_image(buf.getvalue(), EncodeOptions(max_pixels=300 * 200 - 1))


def test_reencode_converts_other_formats_when_asked():
    data = png_bytes(make_image(4))
    out = encode_image(data, EncodeOptions(reencode=True))
    assert out.format == "jpeg" and out.data[:3] == b"\xff\xd8\xff"


def test_huggingface_dicts_with_bytes_or_path(tmp_path):
    data = png_bytes(make_image(6))
    assert encode_image({"bytes": data, "path": "x.png"}, JPEG).data == data
    path = tmp_path / "img.png"
    path.write_bytes(data)
    assert encode_image({"bytes": None, "path": str(path)}, JPEG).data == data
    with pytest.raises(RowProblem, match="neither"):
        encode_image({"bytes": None, "path": None}, JPEG)


def test_memoryview_and_bytearray_are_bytes():
    data = png_bytes(make_image(6))
    assert encode_image(bytearray(data), JPEG).data == data
    assert encode_image(memoryview(data), JPEG).data == data


@pytest.mark.parametrize(
    "value, match",
    [
        (b"GIF89a....", "not a JPEG, PNG or WebP"),
        (b"\x89PNG\r\n\x1a\n" + b"\x00" * 20, "truncated"),
        (None, "missing"),
        (float("nan"), "missing"),
        ("[[1, 2], [3, 4]]", "convert-string"),
        (12, "cannot write an image of type int"),
        (np.zeros((4, 0), np.float32), "empty"),
    ],
)
def test_bad_values_give_clear_errors(value, match):
    with pytest.raises(RowProblem, match=match):
        encode_image(value, JPEG)


def test_unknown_options_are_rejected():
    with pytest.raises(ValueError, match="image_format"):
        EncodeOptions(image_format="gif")
    with pytest.raises(ValueError, match="jpeg_alpha"):
        EncodeOptions(jpeg_alpha="keep")
    with pytest.raises(ValueError, match="quality"):
        EncodeOptions(quality=0)

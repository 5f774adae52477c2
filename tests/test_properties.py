"""Property tests: whatever dtype, byte order, shape, channels and key, a value is written faithfully."""

from __future__ import annotations

import numpy as np
import pytest
from helpers import decode
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from dask_imgsink.core.encode import EncodeOptions, encode_image
from dask_imgsink.core.keys import check_key
from dask_imgsink.errors import RowProblem

PNG = EncodeOptions(image_format="png")
DTYPES = [np.dtype(t).newbyteorder(order) for t in ("u1", "u2", "f2", "f4", "f8", "b1") for order in "<>"]


def _expected_uint8(arr: np.ndarray) -> np.ndarray:
    """What the dtype's declared range says each value becomes, computed independently of the writer."""
    values = arr.astype(arr.dtype.newbyteorder("="))
    if values.dtype.kind == "b":
        return values.astype(np.uint8) * 255
    if values.dtype.kind == "u" and values.dtype.itemsize == 2:
        return np.floor(values.astype(np.float64) * 255 / 65535 + 0.5).astype(np.uint8)
    if values.dtype.kind == "f":
        return np.rint(values.astype(np.float64) * 255).astype(np.uint8)
    return values


@st.composite
def images(draw):
    dtype = draw(st.sampled_from(DTYPES))
    shape = draw(st.sampled_from([(1, 1), (3, 5), (7, 2)]))
    channels = draw(st.sampled_from([None, 1, 3, 4]))
    full = shape if channels is None else (*shape, channels)
    if dtype.kind == "f":
        elements = st.floats(0, 1, width=8 * dtype.itemsize, allow_nan=False)
    else:
        elements = None
    return draw(hnp.arrays(dtype, full, elements=elements))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(images())
def test_png_round_trip_is_exact_after_the_declared_scaling(arr):
    written = decode(encode_image(arr, PNG).data)
    expected = _expected_uint8(arr)
    if expected.ndim == 3 and expected.shape[2] == 1:
        expected = expected[:, :, 0]
    np.testing.assert_array_equal(written, expected)


@settings(max_examples=100, deadline=None)
@given(images())
def test_byte_order_never_changes_what_is_written(arr):
    swapped = arr.astype(arr.dtype.newbyteorder("S"))
    assert encode_image(arr, PNG).data == encode_image(swapped, PNG).data


@settings(max_examples=300, deadline=None)
@given(st.one_of(st.text(max_size=120), st.integers(-10**6, 10**6)))
def test_a_key_is_kept_exactly_or_refused(raw):
    try:
        key = check_key(raw)
    except RowProblem as problem:
        assert problem.fix
        return
    assert key == str(raw) and "." not in key and "/" not in key and key.isascii() and 0 < len(key) <= 95


@pytest.mark.parametrize("dtype", ["i2", "i4", "i8", "u4", "u8"])
@settings(max_examples=30, deadline=None)
@given(data=st.data())
def test_dtypes_without_a_range_are_always_refused(dtype, data):
    arr = data.draw(hnp.arrays(np.dtype(dtype), (2, 3), elements=st.integers(0, 255)))
    with pytest.raises(RowProblem, match="no declared image range"):
        encode_image(arr, PNG)

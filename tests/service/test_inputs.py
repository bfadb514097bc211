"""hansgate.service.inputs: decoding tensors, .npy and images per the manifest; each bad input one reason."""

from __future__ import annotations

import base64
import io

import numpy as np
import pytest
from PIL import Image

from hansgate.errors import RequestError
from hansgate.manifest import InputSpec
from hansgate.service.inputs import Preprocessor

SPEC = InputSpec(channels=1, height=8, width=8, mean=[0.5], std=[0.25], color_mode="L")


def reason(fn, *args):
    with pytest.raises(RequestError) as info:
        fn(*args)
    return info.value.reason


def png(arr: np.ndarray, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format=fmt)
    return buf.getvalue()


def test_tensor_normalised_per_manifest():
    pre = Preprocessor(SPEC, max_batch=4)
    x = np.full((2, 1, 8, 8), 0.75, np.float32)
    np.testing.assert_allclose(pre.from_array(x), 1.0)
    assert pre.from_nested(x[0].tolist()).shape == (1, 1, 8, 8)  # one sample without batch axis


def test_image_resized_and_scaled():
    pre = Preprocessor(SPEC, max_batch=4)
    img = np.full((16, 16), 255, np.uint8)
    x = pre.from_images([png(img)])
    assert x.shape == (1, 1, 8, 8)
    np.testing.assert_allclose(x, (1.0 - 0.5) / 0.25)
    rgb = np.zeros((10, 12, 3), np.uint8)
    assert pre.from_base64([base64.b64encode(png(rgb, "JPEG")).decode()]).shape == (1, 1, 8, 8)


def test_npy_roundtrip_and_no_pickles():
    pre = Preprocessor(SPEC, max_batch=4)
    buf = io.BytesIO()
    np.save(buf, np.zeros((3, 1, 8, 8), np.float32))
    assert pre.from_npy(buf.getvalue()).shape == (3, 1, 8, 8)
    buf = io.BytesIO()
    np.save(buf, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    assert reason(pre.from_npy, buf.getvalue()) == "dtype"  # refused from the header, nothing unpickled


def test_each_bad_input_has_its_reason():
    pre = Preprocessor(SPEC, max_batch=4)
    ok = np.zeros((1, 1, 8, 8), np.float32)
    assert reason(pre.from_array, np.zeros((1, 1, 7, 8), np.float32)) == "shape"
    assert reason(pre.from_array, ok.astype(np.float64)) == "dtype"
    assert reason(pre.from_array, np.where(ok == 0, np.nan, ok).astype(np.float32)) == "non_finite"
    assert reason(pre.from_array, np.zeros((0, 1, 8, 8), np.float32)) == "empty_batch"
    assert reason(pre.from_array, np.zeros((5, 1, 8, 8), np.float32)) == "batch_too_large"
    assert reason(pre.from_nested, []) == "empty_batch"
    assert reason(pre.from_nested, [[1, 2], [3]]) == "shape"
    assert reason(pre.from_nested, [["a"] * 8] * 8) == "dtype"
    assert reason(pre.from_nested, (np.full((1, 8, 8), 1e39)).tolist()) == "out_of_range"
    assert reason(pre.from_images, [b"not an image"]) == "bad_image"
    assert reason(pre.from_images, [png(np.zeros((8, 8), np.uint8))[:30]]) == "bad_image"  # truncated
    gif = io.BytesIO()
    Image.new("L", (8, 8)).save(gif, format="GIF")
    assert reason(pre.from_images, [gif.getvalue()]) == "bad_image"
    assert reason(pre.from_base64, ["***"]) == "bad_image"
    assert reason(pre.from_npy, b"garbage") == "bad_npy"


def npy_with_header(shape, data: bytes = b"", dtype: str = "<f4") -> bytes:
    header = {"descr": dtype, "fortran_order": False, "shape": tuple(shape)}
    buf = io.BytesIO()
    from numpy.lib import format as npy_format

    npy_format.write_array_header_1_0(buf, header)
    return buf.getvalue() + data


def test_npy_header_is_checked_against_the_body_before_allocating():
    """Issue 13.6: a header claiming a huge shape gave an uncaught MemoryError (500)."""
    pre = Preprocessor(SPEC, max_batch=4)
    assert reason(pre.from_npy, npy_with_header((10**12, 1, 8, 8))) == "batch_too_large"
    assert reason(pre.from_npy, npy_with_header((2, 1, 8, 8), b"\0" * 16)) == "bad_npy"  # body too short
    assert reason(pre.from_npy, npy_with_header((1, 1, 8, 8), b"\0" * (256 + 4))) == "bad_npy"  # too long
    assert reason(pre.from_npy, npy_with_header((1, 1, 8, 8), b"\0" * 256, ">f4")) == "dtype"
    assert reason(pre.from_npy, npy_with_header((1, 1, 8, 8, 1), b"\0" * 256)) == "shape"
    assert reason(pre.from_npy, npy_with_header((0, 1, 8, 8))) == "empty_batch"
    assert pre.from_npy(npy_with_header((1, 8, 8), np.full(64, 0.5, np.float32).tobytes())).shape == (1, 1, 8, 8)


def test_minor_input_defects():
    """Issue 13.12: a 5-byte .npy is not 'pickled data'; no object addresses in messages."""
    pre = Preprocessor(SPEC, max_batch=4)
    for body in [b"\x93NUMP", b"12345", b"\x93NUMPY\x01\x00\xff\xff"]:
        with pytest.raises(RequestError) as info:
            pre.from_npy(body)
        assert info.value.reason == "bad_npy" and "pickle" not in str(info.value)
    with pytest.raises(RequestError) as info:
        pre.from_images([b"hello, not an image"])
    assert "0x" not in str(info.value) and "BytesIO" not in str(info.value)


def test_value_range_is_enforced():
    """Issue 13.5: +-3e38 and 1e6 were accepted (NaN in the reply, concept score 5.9e7)."""
    pre = Preprocessor(SPEC, max_batch=4)
    for v in (3e38, -3e38, 1e6, 1.0001, -1e-3):
        assert reason(pre.from_array, np.full((1, 1, 8, 8), v, np.float32)) == "out_of_range"
        assert reason(pre.from_nested, np.full((1, 8, 8), v).tolist()) == "out_of_range"
    assert pre.from_array(np.ones((1, 1, 8, 8), np.float32)).shape == (1, 1, 8, 8)  # the bounds themselves pass
    assert pre.from_array(np.zeros((1, 1, 8, 8), np.float32)).shape == (1, 1, 8, 8)


def test_image_size_is_checked_from_the_header_before_decoding(monkeypatch):
    """Issue 13.3: a 32 KB PNG of 1 x 16,777,216 pixels was decoded (seconds of CPU)."""
    from PIL import ImageFile

    pre = Preprocessor(SPEC, max_batch=4)
    wide = io.BytesIO()
    Image.new("L", (pre.max_width + 1, 1)).save(wide, format="PNG")
    decoded = []
    monkeypatch.setattr(ImageFile.ImageFile, "load", lambda self: decoded.append(1))
    assert reason(pre.from_images, [wide.getvalue()]) == "bad_image"
    assert decoded == []  # refused from the header: no pixel was decoded
    monkeypatch.undo()
    ok = io.BytesIO()
    Image.new("L", (pre.max_width, 2)).save(ok, format="PNG")
    assert pre.from_images([ok.getvalue()]).shape == (1, 1, 8, 8)


def test_json_size_and_depth_are_bounded_per_route():
    from hansgate.service.inputs import check_json, json_limits

    lim = json_limits(SPEC, max_batch=4, max_body_bytes=16 * 2**20)
    assert lim["predict"].max_bytes == 24 * 4 * 64 + 65536 and lim["feedback"].max_bytes == 16 * 1024
    check_json(b'{"tensor": [[[[0.5]]]]}', lim["predict"])
    with pytest.raises(RequestError) as info:
        check_json(b'{"tensor": [[[[[0.5]]]]]}', lim["predict"])
    assert info.value.reason == "invalid"
    with pytest.raises(RequestError) as info:
        check_json(b"[" * 100_000, lim["predict"])
    assert info.value.reason == "body_too_large"
    with pytest.raises(RequestError):
        check_json(b'{"attributes": {"a": {"b": 1}}}', lim["feedback"])

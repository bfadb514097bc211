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
    assert reason(pre.from_npy, buf.getvalue()) == "bad_npy"


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
    assert reason(pre.from_nested, (np.full((1, 8, 8), 1e39)).tolist()) == "non_finite"
    assert reason(pre.from_images, [b"not an image"]) == "bad_image"
    assert reason(pre.from_images, [png(np.zeros((8, 8), np.uint8))[:30]]) == "bad_image"  # truncated
    gif = io.BytesIO()
    Image.new("L", (8, 8)).save(gif, format="GIF")
    assert reason(pre.from_images, [gif.getvalue()]) == "bad_image"
    assert reason(pre.from_base64, ["***"]) == "bad_image"
    assert reason(pre.from_npy, b"garbage") == "bad_npy"

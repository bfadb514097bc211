"""Turning request bodies into the graph's input ``[N, C, H, W]`` float32, or one clear refusal.

Accepted: JSON (``PredictJSON``: nested-list tensors or base64 PNG/JPEG files), a raw PNG
or JPEG body (one image), and a raw ``.npy`` body (float32, loaded with
``allow_pickle=False``). Tensors carry pixel values scaled to ``input.value_range``;
images are converted to the manifest's colour mode, resized to its height x width
(bilinear) and scaled to ``value_range``. Both then get the manifest's mean/std unless the
graph normalises itself. Every failure is a ``RequestError`` with a counted reason.
"""

from __future__ import annotations

import base64
import binascii
import io

import numpy as np

from hansgate.errors import RequestError
from hansgate.manifest import InputSpec

__all__ = ["IMAGE_TYPES", "NPY_TYPES", "Preprocessor"]

IMAGE_TYPES = frozenset({"image/png", "image/jpeg"})
NPY_TYPES = frozenset({"application/x-npy", "application/octet-stream"})
_MAX_IMAGE_PIXELS = 4096 * 4096


class Preprocessor:
    """Decodes and checks inputs for one ``InputSpec``; ``max_batch`` bounds the rows per request."""

    def __init__(self, spec: InputSpec, max_batch: int) -> None:
        self.spec = spec
        self.max_batch = max_batch
        c = spec.channels
        self._mean = np.asarray(spec.mean, np.float32).reshape(1, c, 1, 1)
        self._std = np.asarray(spec.std, np.float32).reshape(1, c, 1, 1)
        self._identity = spec.normalization_in_graph or (np.all(self._mean == 0) and np.all(self._std == 1))

    # -- tensors -------------------------------------------------------------------------------------
    def from_array(self, arr: np.ndarray) -> np.ndarray:
        """Check a ``[N, C, H, W]`` or ``[C, H, W]`` array and normalise it."""
        if arr.dtype.kind not in "fiu" or arr.dtype == np.float16:
            raise RequestError(f"tensor dtype must be float32, got {arr.dtype}", "dtype")
        if arr.dtype.kind == "f" and arr.dtype != np.float32:
            raise RequestError(f"tensor dtype must be float32, got {arr.dtype}", "dtype")
        shape = self.spec.shape
        if arr.ndim == 3:
            arr = arr[None]
        if arr.ndim != 4 or tuple(arr.shape[1:]) != shape:
            got = list(arr.shape)
            if arr.ndim == 4 and arr.shape[0] == 0:
                raise RequestError("empty batch", "empty_batch")
            raise RequestError(f"tensor shape {got} is not [N,{shape[0]},{shape[1]},{shape[2]}] or "
                               f"[{shape[0]},{shape[1]},{shape[2]}]", "shape")
        self._check_rows(len(arr))
        arr = np.ascontiguousarray(arr, dtype=np.float32)
        if not np.isfinite(arr).all():
            raise RequestError("tensor contains NaN or infinity", "non_finite")
        return self._normalise(arr)

    def from_nested(self, data: list) -> np.ndarray:
        """A tensor sent as JSON nested lists (numbers only)."""
        if isinstance(data, list) and len(data) == 0:
            raise RequestError("empty batch", "empty_batch")
        try:
            arr = np.asarray(data)
        except (ValueError, TypeError):
            raise RequestError("tensor must be nested lists with a regular shape", "shape") from None
        if arr.dtype.kind not in "fi":  # strings ("NaN" included), booleans, objects, nulls
            raise RequestError(f"tensor must hold numbers only, got {arr.dtype.name}", "dtype")
        arr = arr.astype(np.float64)
        if arr.size and not np.isfinite(arr).all():
            raise RequestError("tensor contains NaN or infinity", "non_finite")
        if arr.size and np.abs(arr).max() > np.finfo(np.float32).max:
            raise RequestError("tensor value overflows float32", "non_finite")
        return self.from_array(arr.astype(np.float32))

    def from_npy(self, body: bytes) -> np.ndarray:
        """A raw ``.npy`` file (no pickles)."""
        try:
            arr = np.load(io.BytesIO(body), allow_pickle=False)
        except (ValueError, OSError, EOFError) as exc:
            raise RequestError(f"body is not a readable .npy array: {str(exc).splitlines()[0][:200]}", "bad_npy") from None
        if not isinstance(arr, np.ndarray):
            raise RequestError("body is not a single .npy array", "bad_npy")
        if arr.dtype != np.float32:
            raise RequestError(f"tensor dtype must be float32, got {arr.dtype}", "dtype")
        return self.from_array(arr)

    # -- images --------------------------------------------------------------------------------------
    def from_images(self, files: list[bytes]) -> np.ndarray:
        if not files:
            raise RequestError("empty batch", "empty_batch")
        self._check_rows(len(files))
        return self._normalise(np.stack([self._decode(f) for f in files]))

    def from_base64(self, items: list[str]) -> np.ndarray:
        self._check_rows(len(items))
        files = []
        for i, item in enumerate(items):
            try:
                files.append(base64.b64decode(item, validate=True))
            except (binascii.Error, ValueError):
                raise RequestError(f"images[{i}] is not valid base64", "bad_image") from None
        return self.from_images(files)

    def _decode(self, data: bytes) -> np.ndarray:
        from PIL import Image, UnidentifiedImageError

        try:
            with Image.open(io.BytesIO(data)) as img:
                if img.format not in ("PNG", "JPEG"):
                    raise RequestError(f"image format {img.format} is not PNG or JPEG", "bad_image")
                if img.width * img.height > _MAX_IMAGE_PIXELS:
                    raise RequestError(f"image of {img.width}x{img.height} pixels is too large", "bad_image")
                resized = img.convert(self.spec.color_mode).resize((self.spec.width, self.spec.height),
                                                                   Image.Resampling.BILINEAR)
                pixels = np.asarray(resized, dtype=np.float32) / 255.0
        except RequestError:
            raise
        except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError, SyntaxError) as exc:
            raise RequestError(f"cannot decode image: {str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__}",
                               "bad_image") from None
        lo, hi = self.spec.value_range
        pixels = lo + pixels * (hi - lo)
        if pixels.ndim == 2:
            pixels = pixels[None]
        else:
            pixels = pixels.transpose(2, 0, 1)
        return pixels

    # -- shared --------------------------------------------------------------------------------------
    def _check_rows(self, n: int) -> None:
        if n == 0:
            raise RequestError("empty batch", "empty_batch")
        if n > self.max_batch:
            raise RequestError(f"batch of {n} rows is over the limit of {self.max_batch}", "batch_too_large")

    def _normalise(self, x: np.ndarray) -> np.ndarray:
        if self._identity:
            return x
        return ((x - self._mean) / self._std).astype(np.float32)

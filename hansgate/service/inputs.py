"""Turning request bodies into the graph's input ``[N, C, H, W]`` float32, or one clear refusal.

Accepted: JSON (``PredictJSON``: nested-list tensors or base64 PNG/JPEG files), a raw PNG
or JPEG body (one image), and a raw ``.npy`` body (little-endian float32, no pickles).
Tensors carry pixel values in ``input.value_range`` (values outside it are refused, 422
``out_of_range``: the graph was never calibrated there and can overflow); images are
converted to the manifest's colour mode, resized to its height x width (bilinear) and
scaled to ``value_range``. Both then get the manifest's mean/std unless the graph
normalises itself. Every failure is a ``RequestError`` with a counted reason.

Resource bounds, all checked before the expensive step:

* ``.npy``: the header is parsed here (``numpy.lib.format``); the declared shape must match
  the body's length exactly and respect ``max_batch`` before anything is allocated, and
  the rows are then a zero-copy view of the body;
* images: the width and height come from the file's header (PIL opens lazily) and must
  be at most ``max(IMAGE_SIDE_FLOOR, IMAGE_SIDE_FACTOR x`` the manifest's side``)``; JPEGs
  are decoded at the smallest DCT scale that still covers the target size;
* JSON: ``json_limits`` bounds a route's body size (from the manifest: the longest
  legitimate tensor) and nesting depth, checked on the raw bytes before parsing.
"""

from __future__ import annotations

import base64
import binascii
import io
import re
from dataclasses import dataclass

import numpy as np

from hansgate.errors import RequestError
from hansgate.manifest import InputSpec

__all__ = ["IMAGE_TYPES", "NPY_TYPES", "IMAGE_SIDE_FLOOR", "IMAGE_SIDE_FACTOR", "JsonLimits", "json_limits",
           "check_json", "Preprocessor"]

IMAGE_TYPES = frozenset({"image/png", "image/jpeg"})
NPY_TYPES = frozenset({"application/x-npy", "application/octet-stream"})
#: an image side may be this many times the manifest's side, and at least IMAGE_SIDE_FLOOR pixels
IMAGE_SIDE_FACTOR = 8
IMAGE_SIDE_FLOOR = 2048
#: characters one JSON number may take in a legitimate tensor ("-0.123456789012345678," is 22)
_JSON_CHARS_PER_VALUE = 24
_NPY_DTYPE = np.dtype("<f4")


@dataclass(frozen=True)
class JsonLimits:
    """Largest body (bytes) and deepest nesting a JSON route accepts."""

    max_bytes: int
    max_depth: int


def json_limits(spec: InputSpec, max_batch: int, max_body_bytes: int) -> dict[str, JsonLimits]:
    """Per-route JSON bounds: ``predict`` fits ``max_batch`` rows written out in full
    (``{"tensor": [N][C][H][W]}``: depth 5), ``feedback`` a receipt and a few attributes (depth 2)."""
    c, h, w = spec.shape
    predict = min(max_body_bytes, _JSON_CHARS_PER_VALUE * max_batch * c * h * w + 65536)
    return {"predict": JsonLimits(predict, 5), "feedback": JsonLimits(min(max_body_bytes, 16 * 1024), 2)}


_OPEN = np.zeros(256, np.int8)
_OPEN[[ord("["), ord("{")]] = 1
_OPEN[[ord("]"), ord("}")]] = -1


def check_json(body: bytes, limits: JsonLimits) -> None:
    """Refuse a JSON body over the route's size or nesting depth before it is parsed.

    Depth counts brackets on the raw bytes (strings included, which only over-counts; no
    field of a gateway request holds brackets).
    """
    if len(body) > limits.max_bytes:
        raise RequestError(f"JSON body of {len(body)} bytes is over this route's limit of {limits.max_bytes}",
                           "body_too_large")
    if not body:
        return
    steps = _OPEN[np.frombuffer(body, np.uint8)]
    if steps.any() and int(np.cumsum(steps, dtype=np.int64).max()) > limits.max_depth:
        raise RequestError(f"JSON nesting is deeper than this route's limit of {limits.max_depth}", "invalid")


_DTYPES = {"<f4": _NPY_DTYPE}
_HEADER = re.compile(r"\{'descr': '([<>|=]?[a-zA-Z]\d*)', 'fortran_order': (True|False), "
                     r"'shape': \(((?:\d+, )*\d*,?)\), \} *\n")


def _npy_header(body: bytes) -> tuple[tuple[int, ...], bool, np.dtype, int]:
    """``(shape, fortran_order, dtype, data offset)`` of a ``.npy`` body (format 1.0-3.0).

    The header numpy writes is matched directly (numpy's own reader runs ``ast.literal_eval``,
    a large share of a single-row request); anything else goes through numpy's reader.
    """
    from numpy.lib import format as npy_format

    major = body[6]
    if major == 1:
        size, start = int.from_bytes(body[8:10], "little"), 10
    elif major in (2, 3) and len(body) >= 12:
        size, start = int.from_bytes(body[8:12], "little"), 12
    else:
        raise RequestError(f"body has no readable .npy header (version {major})", "bad_npy")
    if size > 4096 or len(body) < start + size:
        raise RequestError("body has no readable .npy header (truncated or oversized)", "bad_npy")
    header = body[start:start + size].decode("latin-1")
    m = _HEADER.fullmatch(header)
    if m is not None:
        dtype = _DTYPES.get(m.group(1))
        if dtype is None:
            try:
                dtype = np.dtype(m.group(1))
            except TypeError:
                raise RequestError(f"unknown .npy dtype {m.group(1)!r}", "dtype") from None
        shape = tuple(int(d) for d in m.group(3).replace(" ", "").split(",") if d)
        return shape, m.group(2) == "True", dtype, start + size
    stream = io.BytesIO(body)
    try:
        version = npy_format.read_magic(stream)
        read = npy_format.read_array_header_1_0 if version == (1, 0) else npy_format.read_array_header_2_0
        shape, fortran, dtype = read(stream, max_header_size=4096)
    except (ValueError, OSError, EOFError, SyntaxError, TypeError) as exc:
        first = str(exc).splitlines()[0][:120] if str(exc) else type(exc).__name__
        raise RequestError(f"body has no readable .npy header ({first})", "bad_npy") from None
    return tuple(shape), bool(fortran), dtype, stream.tell()


class Preprocessor:
    """Decodes and checks inputs for one ``InputSpec``; ``max_batch`` bounds the rows per request."""

    def __init__(self, spec: InputSpec, max_batch: int) -> None:
        self.spec = spec
        self.max_batch = max_batch
        c = spec.channels
        self._mean = np.asarray(spec.mean, np.float32).reshape(1, c, 1, 1)
        self._std = np.asarray(spec.std, np.float32).reshape(1, c, 1, 1)
        self._identity = spec.normalization_in_graph or bool(np.all(self._mean == 0) and np.all(self._std == 1))
        self.low, self.high = (float(v) for v in spec.value_range)
        self.max_width = max(IMAGE_SIDE_FLOOR, IMAGE_SIDE_FACTOR * spec.width)
        self.max_height = max(IMAGE_SIDE_FLOOR, IMAGE_SIDE_FACTOR * spec.height)

    # -- tensors -------------------------------------------------------------------------------------
    def from_array(self, arr: np.ndarray) -> np.ndarray:
        """Check a ``[N, C, H, W]`` or ``[C, H, W]`` float32 array (finite, in range) and normalise it."""
        if arr.dtype != np.float32:
            raise RequestError(f"tensor dtype must be float32, got {arr.dtype}", "dtype")
        shape = self.spec.shape
        if arr.ndim == 3:
            arr = arr[None]
        if arr.ndim != 4 or tuple(arr.shape[1:]) != shape:
            if arr.ndim == 4 and arr.shape[0] == 0:
                raise RequestError("empty batch", "empty_batch")
            raise RequestError(f"tensor shape {list(arr.shape)} is not [N,{shape[0]},{shape[1]},{shape[2]}] or "
                               f"[{shape[0]},{shape[1]},{shape[2]}]", "shape")
        self._check_rows(len(arr))
        lo, hi = float(arr.min()), float(arr.max())  # NaN propagates into both
        if not (np.isfinite(lo) and np.isfinite(hi)):
            raise RequestError("tensor contains NaN or infinity", "non_finite")
        if lo < self.low or hi > self.high:
            raise RequestError(f"tensor values span [{lo:.6g}, {hi:.6g}], outside the model's input range "
                               f"[{self.low:g}, {self.high:g}]", "out_of_range")
        return self._normalise(arr)

    def from_nested(self, data: list) -> np.ndarray:
        """A tensor sent as JSON nested lists (numbers only; booleans are refused by ``PredictJSON``)."""
        if isinstance(data, list) and len(data) == 0:
            raise RequestError("empty batch", "empty_batch")
        try:
            arr = np.asarray(data)
        except (ValueError, TypeError):
            raise RequestError("tensor must be nested lists with a regular shape", "shape") from None
        if arr.dtype.kind not in "fi":  # strings ("NaN" included), booleans, objects, nulls
            raise RequestError(f"tensor must hold numbers only, got {arr.dtype.name}", "dtype")
        arr = arr.astype(np.float64)
        if arr.size:
            lo, hi = float(arr.min()), float(arr.max())
            if not (np.isfinite(lo) and np.isfinite(hi)):
                raise RequestError("tensor contains NaN or infinity", "non_finite")
            if lo < self.low or hi > self.high:
                raise RequestError(f"tensor values span [{lo:.6g}, {hi:.6g}], outside the model's input range "
                                   f"[{self.low:g}, {self.high:g}]", "out_of_range")
        return self.from_array(arr.astype(np.float32))

    def from_npy(self, body: bytes) -> np.ndarray:
        """A raw ``.npy`` body: header checked against the body length and ``max_batch`` first."""
        if len(body) < 10 or not body.startswith(b"\x93NUMPY"):
            raise RequestError("body is not a .npy file (no NUMPY magic)", "bad_npy")
        shape, fortran, dtype, offset = _npy_header(body)
        if dtype != _NPY_DTYPE:
            raise RequestError(f"tensor dtype must be little-endian float32, got {dtype}", "dtype")
        if len(shape) == 4 and shape[0] == 0:
            raise RequestError("empty batch", "empty_batch")
        if len(shape) not in (3, 4) or tuple(shape[-3:]) != self.spec.shape:
            c, h, w = self.spec.shape
            raise RequestError(f"tensor shape {list(shape)} is not [N,{c},{h},{w}] or [{c},{h},{w}]", "shape")
        self._check_rows(shape[0] if len(shape) == 4 else 1)
        expected = int(np.prod(shape, dtype=np.int64)) * 4
        if len(body) - offset != expected:
            raise RequestError(f".npy header declares {expected} data bytes, the body has {len(body) - offset}",
                               "bad_npy")
        arr = np.frombuffer(body, _NPY_DTYPE, offset=offset).reshape(shape, order="F" if fortran else "C")
        return self.from_array(np.ascontiguousarray(arr))

    # -- images --------------------------------------------------------------------------------------
    def from_images(self, files: list[bytes]) -> np.ndarray:
        if not files:
            raise RequestError("empty batch", "empty_batch")
        self._check_rows(len(files))
        return self._normalise(np.stack([self._decode(i, f) for i, f in enumerate(files)]))

    def from_base64(self, items: list[str]) -> np.ndarray:
        if not items:
            raise RequestError("empty batch", "empty_batch")
        self._check_rows(len(items))
        files = []
        for i, item in enumerate(items):
            try:
                files.append(base64.b64decode(item, validate=True))
            except (binascii.Error, ValueError):
                raise RequestError(f"images[{i}] is not valid base64", "bad_image") from None
        return self.from_images(files)

    def _decode(self, index: int, data: bytes) -> np.ndarray:
        from PIL import Image, UnidentifiedImageError

        where = "image" if index == 0 else f"images[{index}]"
        try:
            with Image.open(io.BytesIO(data), formats=("PNG", "JPEG")) as img:
                # the header alone gives the size: refuse before any pixel is decoded
                if img.width > self.max_width or img.height > self.max_height:
                    raise RequestError(f"{where} of {img.width}x{img.height} pixels is larger than "
                                       f"{self.max_width}x{self.max_height}", "bad_image")
                if img.format == "JPEG":
                    img.draft(self.spec.color_mode, (self.spec.width, self.spec.height))
                resized = img.convert(self.spec.color_mode).resize((self.spec.width, self.spec.height),
                                                                   Image.Resampling.BILINEAR)
                pixels = np.asarray(resized, dtype=np.float32) / 255.0
        except RequestError:
            raise
        except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError, SyntaxError,
                EOFError) as exc:
            text = str(exc).splitlines()[0][:160] if str(exc) else type(exc).__name__
            if "<_io." in text or " at 0x" in text:  # PIL names the stream object: no addresses in replies
                text = "not a PNG or JPEG file"
            raise RequestError(f"cannot decode {where}: {text}", "bad_image") from None
        pixels = self.low + pixels * (self.high - self.low)
        return pixels[None] if pixels.ndim == 2 else pixels.transpose(2, 0, 1)

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

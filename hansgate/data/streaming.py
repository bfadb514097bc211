"""Images read from disk in batches: ``LazyImages``, a collection that never holds all images.

What: an ImageFolder (decoded on demand) or the ``x`` array of an ``.npz`` (read with explicit
file reads at the array's offset) behind one object with ``len``, ``shape`` and tensor-style
indexing, plus ``iter_batches``, which reads batches through a ``torch.utils.data.DataLoader``
with worker processes and shows images per second.

Why: refinement and audit data of a few thousand 224 px images do not fit in memory as
float32 tensors; the statistics, verification, lambda search and evaluation only ever need
one batch at a time.

Choices:

- Indexing: an integer gives one image ``[C, H, W]``; a slice gives a tensor (callers draw
  batches with slices); an index set (tensor, array, list, boolean mask) gives a tensor when it
  selects at most ``batch_limit`` images (a batch), and otherwise a lazy *view* on those images.
  Refinement code selects whole splits with index sets (``x[fit_idx]``) and batches with
  slices or small index sets, so the same code runs on tensors and on ``LazyImages``.
  ``take`` always reads, ``subset`` is always lazy.
- ``.npz`` members are read with ``os.pread`` at the member's offset, never memory-mapped: the
  pages of a mapped file count in the reader's resident memory once touched, so a pass over
  the data would grow it. A compressed member cannot be read at an offset; it is unpacked once
  to a temporary ``.npy`` file (removed with the source; ``np.savez`` avoids the step).
- Transforms (``normalised``, ``scaled``) are per-channel and applied to each batch after
  reading, in the same arithmetic as ``nn.normalisation.Normalised``.
"""

from __future__ import annotations

import os
import shutil
import struct
import tempfile
import weakref
import zipfile
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from hansgate.errors import DataError

__all__ = ["LazyImages", "ImageSource", "FolderSource", "ArraySource", "TensorSource", "decode_image",
           "npz_array_source", "BATCH_LIMIT", "default_workers"]

#: index sets larger than this stay lazy (the largest batch the refinement code draws by index)
BATCH_LIMIT = 256
#: fewer images than this are decoded in the calling process (worker start-up would cost more)
_MIN_PARALLEL = 16
_CHUNK_BYTES = 64 << 20


def default_workers() -> int:
    """DataLoader workers: two, or one per core when fewer (``HANSGATE_DATA_WORKERS`` overrides)."""
    env = os.environ.get("HANSGATE_DATA_WORKERS")
    if env is not None:
        if not env.isdigit():
            raise DataError(f"HANSGATE_DATA_WORKERS must be a non-negative integer, got {env!r}")
        return int(env)
    return min(2, os.cpu_count() or 1)


def decode_image(path: str | Path, mode: str, size: tuple[int, int]) -> np.ndarray:
    """One image file as float32 ``[C, H, W]`` in [0, 1]: converted to ``mode``, bilinear resize to ``size``."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            resized = im.convert(mode).resize((size[1], size[0]), Image.Resampling.BILINEAR)
            arr = np.asarray(resized, dtype=np.float32) / 255.0
    except (OSError, UnidentifiedImageError) as exc:
        raise DataError(f"cannot read image {path}: {exc}") from exc
    return arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)


class ImageSource(ABC):
    """Images ``0 .. n-1`` of one shape, read by position. ``bounds``: a known value range, if any."""

    n: int
    shape: tuple[int, int, int]
    bounds: tuple[float, float] | None = None
    #: whether reading is costly enough to spread single reads over worker processes (decoding)
    parallel_reads: bool = False

    @abstractmethod
    def read(self, positions: np.ndarray) -> np.ndarray:
        """float32 ``[len(positions), C, H, W]`` in the order given."""


class FolderSource(ImageSource):
    """Image files decoded on demand (``decode_image``); values lie in [0, 1] by construction."""

    parallel_reads = True

    def __init__(self, files: Sequence[str], channels: int, size: tuple[int, int]) -> None:
        self.files = [str(f) for f in files]
        self.mode = "L" if channels == 1 else "RGB"
        self.size = size
        self.n = len(self.files)
        self.shape = (channels, size[0], size[1])
        self.bounds = (0.0, 1.0)

    def read(self, positions: np.ndarray) -> np.ndarray:
        out = np.empty((len(positions), *self.shape), np.float32)
        for i, p in enumerate(positions):
            out[i] = decode_image(self.files[int(p)], self.mode, self.size)
        return out


class ArraySource(ImageSource):
    """A C-ordered ``[N, C, H, W]`` float array stored at ``offset`` in a file, read with ``os.pread``."""

    def __init__(self, path: str | Path, offset: int, dtype: np.dtype, shape: tuple[int, ...]) -> None:
        self.path, self.offset, self.dtype = str(path), int(offset), np.dtype(dtype)
        self.n = int(shape[0])
        self.shape = (int(shape[1]), int(shape[2]), int(shape[3]))
        self.item_bytes = self.dtype.itemsize * int(np.prod(self.shape))

    def read(self, positions: np.ndarray) -> np.ndarray:
        positions = np.asarray(positions, np.int64)
        out = np.empty((len(positions), *self.shape), np.float32)
        if not len(positions):
            return out
        order = np.argsort(positions, kind="stable")
        sorted_pos = positions[order]
        breaks = np.flatnonzero(np.diff(sorted_pos) != 1) + 1  # contiguous runs, one read each
        fd = os.open(self.path, os.O_RDONLY)
        try:
            for run_idx in np.split(np.arange(len(sorted_pos)), breaks):
                first, count = int(sorted_pos[run_idx[0]]), len(run_idx)
                # a repeated position breaks a run too (diff 0), so each run is strictly consecutive
                buf = os.pread(fd, count * self.item_bytes, self.offset + first * self.item_bytes)
                if len(buf) != count * self.item_bytes:
                    raise DataError(f"{self.path}: file ends before image {first + count - 1}")
                block = np.frombuffer(buf, self.dtype).reshape(count, *self.shape)
                out[order[run_idx]] = block
        finally:
            os.close(fd)
        return out


class TensorSource(ImageSource):
    """Images already in memory (tests, and small data that need no streaming)."""

    def __init__(self, x: torch.Tensor) -> None:
        self.x = x.detach().to(torch.float32)
        self.n = len(x)
        c, h, w = x.shape[1:]
        self.shape = (int(c), int(h), int(w))

    def read(self, positions: np.ndarray) -> np.ndarray:
        return self.x[torch.as_tensor(np.asarray(positions, np.int64))].numpy()


def _npy_layout(fh: Any) -> tuple[tuple[int, ...], bool, np.dtype, int]:
    """``(shape, fortran_order, dtype, header_bytes)`` of an ``.npy`` stream positioned at its start."""
    fmt = np.lib.format
    version = fmt.read_magic(fh)
    shape, fortran, dtype = (fmt.read_array_header_1_0(fh) if version == (1, 0) else fmt.read_array_header_2_0(fh))
    return tuple(shape), bool(fortran), np.dtype(dtype), int(fh.tell())


def npz_array_source(path: str | Path, name: str = "x", log: Callable[[str], None] | None = None) -> ArraySource:
    """An ``ArraySource`` on member ``name`` of an ``.npz``: in place when stored, else unpacked once to a temp file."""
    path = Path(path)
    with zipfile.ZipFile(path) as zf:
        info = zf.getinfo(f"{name}.npy")
        with zf.open(info) as member:
            shape, fortran, dtype, header = _npy_layout(member)
        if len(shape) != 4:
            raise DataError(f"{path}: '{name}' must be [N, C, H, W], got shape {shape}")
        if fortran:
            raise DataError(f"{path}: '{name}' is stored in Fortran order; save it C-ordered (np.ascontiguousarray)")
        if info.compress_type == zipfile.ZIP_STORED:
            with open(path, "rb") as fh:
                fh.seek(info.header_offset)
                local = struct.unpack("<4s5H3L2H", fh.read(30))
            offset = info.header_offset + 30 + local[9] + local[10] + header
            return ArraySource(path, offset, dtype, shape)
        if log is not None:
            log(f"{path} is compressed: unpacking '{name}' once to a temporary file to read it in batches "
                "(np.savez instead of np.savez_compressed skips this)")
        tmp = tempfile.mkdtemp(prefix="hansgate-npz-")
        target = Path(tmp) / f"{name}.npy"
        try:
            with zf.open(info) as member, open(target, "wb") as out:
                shutil.copyfileobj(member, out, 16 << 20)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    source = ArraySource(target, header, dtype, shape)
    weakref.finalize(source, shutil.rmtree, tmp, True)  # the unpacked copy goes with the source
    return source


class _Chunks(Dataset):  # type: ignore[type-arg]
    """One DataLoader item per batch of positions (a worker reads a whole batch)."""

    def __init__(self, source: ImageSource, chunks: list[np.ndarray]) -> None:
        self.source, self.chunks = source, chunks

    def __len__(self) -> int:
        return len(self.chunks)

    def __getitem__(self, i: int) -> torch.Tensor:
        return torch.from_numpy(self.source.read(self.chunks[i]))


Op = tuple[str, torch.Tensor, torch.Tensor]


class LazyImages:
    """Images of one ``ImageSource`` (optionally a subset, optionally transformed), read on demand.

    Behaves like a float32 ``[N, C, H, W]`` tensor for ``len``, ``shape``, ``ndim`` and indexing
    (module docstring); ``iter_batches`` streams every image once through a DataLoader.
    """

    dtype = torch.float32
    ndim = 4

    def __init__(self, source: ImageSource, positions: np.ndarray | None = None, ops: tuple[Op, ...] = (),
                 workers: int | None = None, batch_limit: int = BATCH_LIMIT) -> None:
        self.source = source
        self.positions = np.arange(source.n, dtype=np.int64) if positions is None else positions
        self.ops = ops
        self.workers = default_workers() if workers is None else workers
        self.batch_limit = batch_limit

    def _derive(self, positions: np.ndarray | None = None, ops: tuple[Op, ...] | None = None) -> "LazyImages":
        return LazyImages(self.source, self.positions if positions is None else positions,
                          self.ops if ops is None else ops, self.workers, self.batch_limit)

    def __len__(self) -> int:
        return len(self.positions)

    @property
    def shape(self) -> torch.Size:
        return torch.Size((len(self), *self.source.shape))

    def __repr__(self) -> str:
        return f"LazyImages({type(self.source).__name__}, shape={tuple(self.shape)}, workers={self.workers})"

    # -- selection ------------------------------------------------------------------------------
    def _select(self, key: Any) -> np.ndarray:
        if isinstance(key, slice):
            return self.positions[key]
        idx = key.numpy() if isinstance(key, torch.Tensor) else np.asarray(key)
        if idx.dtype == np.bool_:
            if idx.shape != (len(self),):
                raise IndexError(f"boolean mask of shape {idx.shape} for {len(self)} images")
            idx = np.flatnonzero(idx)
        if idx.ndim != 1 or not (np.issubdtype(idx.dtype, np.integer) or idx.size == 0):
            raise IndexError(f"index images with an int, a slice or a 1-d index set, got {idx.dtype} {idx.shape}")
        idx = idx.astype(np.int64)
        if idx.size and (idx.min() < -len(self) or idx.max() >= len(self)):
            raise IndexError(f"index out of range for {len(self)} images")
        return self.positions[idx]

    def __getitem__(self, key: Any) -> "torch.Tensor | LazyImages":
        if isinstance(key, (int, np.integer)) or (isinstance(key, torch.Tensor) and key.ndim == 0
                                                   and not key.dtype == torch.bool):
            k = int(key)
            if not -len(self) <= k < len(self):
                raise IndexError(f"image {k} out of range for {len(self)} images")
            return self._read(self.positions[[k]])[0]
        positions = self._select(key)
        if isinstance(key, slice) or len(positions) <= self.batch_limit:
            return self._read(positions)
        return self._derive(positions)

    def take(self, key: Any) -> torch.Tensor:
        """The selected images as one tensor, whatever their number."""
        return self._read(self._select(key))

    def subset(self, key: Any) -> "LazyImages":
        """A lazy view on the selected images (an index set into the same source, nothing read)."""
        return self._derive(self._select(key))

    # -- transforms -----------------------------------------------------------------------------
    def _per_channel(self, v: Sequence[float]) -> torch.Tensor:
        c = self.source.shape[0]
        if len(v) != c:
            raise DataError(f"need {c} value(s) per channel, got {len(v)}")
        return torch.tensor(list(v), dtype=torch.float32).view(1, c, 1, 1)

    def normalised(self, mean: Sequence[float], std: Sequence[float]) -> "LazyImages":
        """``(x - mean) / std`` per channel, as ``nn.normalisation.Normalised`` computes it."""
        return self._derive(ops=(*self.ops, ("norm", self._per_channel(mean), self._per_channel(std))))

    def scaled(self, scale: float, offset: float) -> "LazyImages":
        """``x * scale + offset`` (e.g. [0, 1] pixels to a value range ``[lo, hi]``)."""
        c = self.source.shape[0]
        return self._derive(ops=(*self.ops, ("affine", self._per_channel([scale] * c),
                                             self._per_channel([offset] * c))))

    def _apply(self, x: torch.Tensor) -> torch.Tensor:
        for kind, a, b in self.ops:
            x = (x - a) / b if kind == "norm" else x * a + b
        return x

    # -- reading ----------------------------------------------------------------------------------
    def _loader(self, chunks: list[np.ndarray]) -> Iterator[torch.Tensor]:
        if self.workers == 0:
            return (torch.from_numpy(self.source.read(c)) for c in chunks)
        return iter(DataLoader(_Chunks(self.source, chunks), batch_size=None, shuffle=False,
                               num_workers=min(self.workers, len(chunks)), prefetch_factor=2))

    def _read(self, positions: np.ndarray) -> torch.Tensor:
        if self.source.parallel_reads and self.workers > 0 and len(positions) >= _MIN_PARALLEL:
            per = -(-len(positions) // self.workers)
            x = torch.cat(list(self._loader([positions[i:i + per] for i in range(0, len(positions), per)])))
        else:
            x = torch.from_numpy(self.source.read(positions))
        return self._apply(x)

    def iter_batches(self, batch_size: int = 64, *, progress: bool = False,
                     desc: str = "images") -> Iterator[torch.Tensor]:
        """Every image once, in order, ``batch_size`` at a time, read ahead by the DataLoader's workers.

        The progress bar (``progress``) counts images, so its rate is images per second.
        """
        if batch_size < 1:
            raise DataError(f"batch size must be positive, got {batch_size}")
        chunks = [self.positions[i:i + batch_size] for i in range(0, len(self), batch_size)]
        with tqdm(total=len(self), desc=desc, unit="img", disable=not progress, leave=False) as bar:
            for batch in self._loader(chunks):
                bar.update(len(batch))
                yield self._apply(batch)

    def materialise(self, log: Callable[[str], None] | None = None, why: str = "") -> torch.Tensor:
        """All images as one tensor; says so through ``log`` (with ``why``), since it costs memory."""
        if log is not None:
            mb = len(self) * int(np.prod(self.source.shape)) * 4 / 2**20
            log(f"holding all {len(self)} images in memory ({mb:.0f} MB){': ' + why if why else ''}")
        return self.take(slice(None))

    def bounds(self, batch_size: int = 256) -> tuple[float, float]:
        """``(min, max)`` of the values: the source's known range when it has one, else one streamed pass."""
        if self.source.bounds is not None:
            lo, hi = self.source.bounds
            ends = self._apply(torch.tensor([lo, hi], dtype=torch.float32).view(2, 1, 1, 1).expand(
                2, self.source.shape[0], 1, 1))
            return float(ends.min()), float(ends.max())
        lo, hi = float("inf"), float("-inf")
        for b in self.iter_batches(batch_size):
            lo, hi = min(lo, float(b.min())), max(hi, float(b.max()))
        return lo, hi

    def sample(self, n: int, seed: int = 0) -> torch.Tensor:
        """At most ``n`` images drawn under ``seed`` (sorted positions), e.g. for pixel statistics."""
        if len(self) <= n:
            return self.take(slice(None))
        idx = np.sort(np.random.default_rng(seed).choice(len(self), n, replace=False))
        return self.take(idx)


def scan_finite(source: ArraySource, what: str) -> tuple[float, float]:
    """One streamed pass: every value finite; returns ``(min, max)`` (stored as the source's bounds)."""
    per = max(1, _CHUNK_BYTES // max(1, source.item_bytes))
    lo, hi = float("inf"), float("-inf")
    for start in range(0, source.n, per):
        block = source.read(np.arange(start, min(source.n, start + per)))
        if not np.isfinite(block).all():
            raise DataError(f"{what}: 'x' contains NaN or infinite values")
        if block.size:
            lo, hi = min(lo, float(block.min())), max(hi, float(block.max()))
    source.bounds = (lo, hi)
    return lo, hi


"""The refinement units a refined model carries, and how to rebuild that model from its source.

What: the pruning family refines a model by inserting a unit after named layers
(``nn.surgery.insert_after`` wraps each in ``Refined(inner, unit)``): EGEM's ``ExposureScale``
(paper 000, Eq. 5) and PCA-EGEM's ``PcaExposure`` (Eq. 6); P-ClArC inserts a
``ClarcProjection`` (paper 001, Eq. 3); other methods change weights and insert nothing.
``inserted_units`` lists each inserted unit as ``(layer, kind, options)``,
where ``options`` are the constructor shapes and flags (ints, bools, strings: no tensors);
``rebuild`` takes a fresh copy of the source model, inserts empty units of those shapes and
loads the refined model's full state dict into the result (strictly: every tensor must be
named, shaped and present), which reproduces the refined module exactly.

Why here: the bundle carries the refined weights (``refined.safetensors``) and this recipe
(``manifest.RefinedModelSpec``) so that the audit, which may not import ``refinement``, can
rebuild and explain the served model (DESIGN.md, layers: both are above ``nn``).
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
from typing import Literal, Mapping, Sequence

import torch
from torch import nn

from hansgate.errors import ConfigError, ExportError, ModelLoadError
from hansgate.manifest import InsertedUnit, RefinedModelSpec
from hansgate.nn.hooks import eval_mode
from hansgate.nn.surgery import Refined, insert_after

__all__ = ["ExposureScale", "PcaExposure", "ClarcProjection", "PROJECTION_POOLINGS", "project_along", "UNIT_KINDS",
           "UnitOptions", "UnsupportedUnit", "unit_options",
           "build_unit", "inserted_units", "strip_units", "skeleton", "rebuild", "state_bytes", "load_state_bytes",
           "state_views", "refined_weights"]

#: constructor options of a unit: shapes and flags only (the tensors travel in the state dict)
UnitOptions = dict[str, int | bool | str | list[int]]


class UnsupportedUnit(ModelLoadError):
    """A refined model holds an inserted module that ``UNIT_KINDS`` cannot rebuild."""


class ExposureScale(nn.Module):
    """Eq. 5 as a module: multiplies unit ``i`` (a channel, or one element) by ``c_i``.

    ``factors`` has the unit shape: ``[C]`` per channel (broadcast over the map) or
    the activation's full per-sample shape.
    """

    factors: torch.Tensor

    def __init__(self, factors: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("factors", factors.to(torch.float32))

    def forward(self, a: torch.Tensor) -> torch.Tensor:
        if a.ndim == 3 and self.factors.ndim == 1:  # tokens [N, T, D]: units on the last axis
            return a * self.factors
        extra = a.ndim - 1 - self.factors.ndim
        return a * self.factors.view(1, *self.factors.shape, *(1,) * extra)


class PcaExposure(nn.Module):
    """Eq. 6 as a module: ``a <- U diag(c) U^T (a - mean) + mean`` (conv maps: see ``refinement.pca``)."""

    projection: torch.Tensor
    mean: torch.Tensor

    def __init__(self, mean: torch.Tensor, basis: torch.Tensor, factors: torch.Tensor, spatial_size: int,
                 conv_mode: Literal["linear", "ratio"] = "ratio", per_element: bool = False) -> None:
        super().__init__()
        self.per_element = per_element
        proj = (basis * factors.to(basis.dtype)) @ basis.T
        self.register_buffer("projection", proj.to(torch.float32))  # symmetric [D, D]
        self.register_buffer("mean", mean.to(torch.float32))  # mean of the per-image sums
        self.spatial_size = spatial_size
        self.conv_mode = conv_mode

    @classmethod
    def empty(cls, dim: int, spatial_size: int, conv_mode: Literal["linear", "ratio"] = "ratio",
              per_element: bool = False) -> "PcaExposure":
        """A unit of ``dim`` components with zero buffers, to be filled by ``load_state_dict``."""
        zeros = torch.zeros(dim, dtype=torch.float32)  # no components: the projection starts at 0 without a D x D basis
        return cls(zeros, torch.zeros(dim, 0, dtype=torch.float32), torch.zeros(0), spatial_size, conv_mode, per_element)

    def forward(self, a: torch.Tensor) -> torch.Tensor:
        if a.ndim == 2 or self.per_element:
            flat = a.flatten(1)
            return ((flat - self.mean) @ self.projection + self.mean).view(a.shape)
        if a.ndim == 3:  # tokens [N, T, D]: units on the last axis, the linear rule at every token
            return self._maps(a.transpose(1, 2), a.shape[1], "linear").transpose(1, 2)
        return self._maps(a, self.spatial_size, self.conv_mode)

    def _maps(self, a: torch.Tensor, spatial_size: int, mode: str) -> torch.Tensor:
        """Channel-first maps ``[N, C, ...]`` over ``spatial_size`` positions (``refinement.pca``)."""
        if mode == "ratio":
            s = a.flatten(2).sum(2)
            s_new = (s - self.mean) @ self.projection + self.mean
            nonzero = s.abs() > 1e-12
            ratio = torch.where(nonzero, s_new / torch.where(nonzero, s, torch.ones_like(s)), torch.zeros_like(s))
            return a * ratio.view(*ratio.shape, *(1,) * (a.ndim - 2))
        pixel_mean = (self.mean / spatial_size).view(1, -1, *(1,) * (a.ndim - 2))
        centred = (a - pixel_mean).movedim(1, -1) @ self.projection
        return centred.movedim(-1, 1) + pixel_mean


#: how a projection pools the concept layer (``concepts.cav.POOLINGS``; ``concepts`` sits above ``nn``)
PROJECTION_POOLINGS: tuple[str, ...] = ("mean", "max", "none")


def project_along(a: torch.Tensor, cav: torch.Tensor, target: float | torch.Tensor,
                  pooling: str = "mean") -> torch.Tensor:
    """Paper 001 (Dreyer, Pahde et al.), Eq. 3: ``a' = a + gamma(x) h`` with ``gamma = (z - pool(a) . h) / (h . h)``.

    ``a`` ``[N, C, *spatial]`` (or ``[N, D]``, taken as it is). ``mean``/``max``: ``pool`` is the
    per-channel spatial mean or max and ``h`` (length ``C``) is added at every position; a constant
    offset moves a channel's mean and its maximum alike, so the pooled length ``pool(a') . h``
    becomes ``z`` exactly. ``none``: ``h`` spans the full map (length ``C * H * W``). The pooling
    is that of ``concepts.cav.pool_channels`` and ``lift_cav``, with which the CAV was fitted.
    """
    if pooling not in PROJECTION_POOLINGS:
        raise ConfigError(f"unknown pooling {pooling!r}; choose from {list(PROJECTION_POOLINGS)}")
    h = cav.to(a)
    if a.dim() == 2:
        pooled, lifted = a, h.view(1, -1)
    elif pooling == "none":
        pooled, lifted = a.flatten(1), h.view(1, *a.shape[1:])
    else:
        flat = a.flatten(2)
        pooled, lifted = (flat.amax(2) if pooling == "max" else flat.mean(2)), h.view(1, -1, *(1,) * (a.dim() - 2))
    gamma = (target - pooled @ h) / (h @ h)  # [N]
    return a + gamma.view(-1, *(1,) * (a.dim() - 1)) * lifted


class ClarcProjection(nn.Module):
    """Paper 001, Eq. 3 as a module after the concept layer: each activation's pooled length along ``cav``
    becomes ``target`` (P-ClArC at test time: the mean length over clean samples; A-ClArC while fine-tuning).

    The CAV and the target are buffers (they travel in the state dict); ``pooling`` is a flag.
    """

    cav: torch.Tensor
    target: torch.Tensor

    def __init__(self, cav: torch.Tensor, target: float | torch.Tensor, pooling: str = "mean") -> None:
        super().__init__()
        if pooling not in PROJECTION_POOLINGS:
            raise ConfigError(f"unknown pooling {pooling!r}; choose from {list(PROJECTION_POOLINGS)}")
        if cav.dim() != 1 or cav.numel() == 0:
            raise ConfigError(f"a projection needs a non-empty CAV vector, got shape {list(cav.shape)}")
        self.register_buffer("cav", cav.detach().to(torch.float32).clone())
        self.register_buffer("target", torch.as_tensor(target, dtype=torch.float32).detach().clone().reshape(()))
        self.pooling = pooling

    @classmethod
    def empty(cls, dim: int, pooling: str = "mean") -> "ClarcProjection":
        """A projection along a zero CAV of length ``dim``, to be filled by ``load_state_dict``."""
        return cls(torch.zeros(dim, dtype=torch.float32), 0.0, pooling)

    def forward(self, a: torch.Tensor) -> torch.Tensor:
        return project_along(a, self.cav, self.target, self.pooling)


#: the kinds a manifest may name (``manifest.InsertedUnit.kind``) and their classes
UNIT_KINDS: dict[str, type[nn.Module]] = {"exposure_scale": ExposureScale, "pca_exposure": PcaExposure,
                                          "clarc_projection": ClarcProjection}


def unit_options(unit: nn.Module) -> tuple[str, UnitOptions]:
    """``(kind, options)`` of an inserted unit; ``UnsupportedUnit`` for any other module."""
    if type(unit) is ExposureScale:
        return "exposure_scale", {"shape": [int(d) for d in unit.factors.shape]}
    if type(unit) is PcaExposure:
        return "pca_exposure", {"dim": int(unit.mean.shape[0]), "spatial_size": int(unit.spatial_size),
                                "conv_mode": str(unit.conv_mode), "per_element": bool(unit.per_element)}
    if type(unit) is ClarcProjection:
        return "clarc_projection", {"dim": int(unit.cav.shape[0]), "pooling": str(unit.pooling)}
    raise UnsupportedUnit(f"cannot record an inserted {type(unit).__name__}; rebuildable units are "
                          f"{sorted(UNIT_KINDS)}")


def _int(options: Mapping[str, object], key: str) -> int:
    value = options.get(key)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ModelLoadError(f"unit option {key!r} must be a positive integer, got {value!r}")
    return value


def build_unit(kind: str, options: Mapping[str, object]) -> nn.Module:
    """An empty unit of ``kind`` with the shapes in ``options`` (its buffers are loaded afterwards)."""
    if kind == "exposure_scale":
        shape = options.get("shape")
        if not isinstance(shape, list) or not shape or any(isinstance(d, bool) or d < 1 for d in shape):
            raise ModelLoadError(f"exposure_scale needs a non-empty 'shape' of positive sizes, got {shape!r}")
        return ExposureScale(torch.zeros(*shape))
    if kind == "pca_exposure":
        mode = options.get("conv_mode")
        if mode not in ("linear", "ratio") or not isinstance(options.get("per_element"), bool):
            raise ModelLoadError(f"pca_exposure needs conv_mode 'linear'/'ratio' and a boolean per_element, got "
                                 f"{mode!r} and {options.get('per_element')!r}")
        return PcaExposure.empty(_int(options, "dim"), _int(options, "spatial_size"),
                                 "linear" if mode == "linear" else "ratio", bool(options["per_element"]))
    if kind == "clarc_projection":
        pooling = options.get("pooling")
        if pooling not in PROJECTION_POOLINGS:
            raise ModelLoadError(f"clarc_projection needs pooling in {list(PROJECTION_POOLINGS)}, got {pooling!r}")
        return ClarcProjection.empty(_int(options, "dim"), str(pooling))
    raise UnsupportedUnit(f"unknown refinement unit kind {kind!r}; known: {sorted(UNIT_KINDS)}")


def inserted_units(model: nn.Module) -> list[tuple[str, str, UnitOptions]]:
    """Every ``Refined`` wrapper of ``model`` as ``(layer, kind, options)``, outer layers first."""
    out = []
    for name, module in model.named_modules():
        if isinstance(module, Refined):
            kind, options = unit_options(module.refiner)
            out.append((name, kind, options))
    return out


def strip_units(model: nn.Module) -> nn.Module:
    """A deep copy of ``model`` with every ``Refined(inner, unit)`` replaced by ``inner`` (the source's layout)."""
    out = copy.deepcopy(model)
    for name, _, _ in reversed(inserted_units(out)):  # inner wrappers first, their paths still resolve
        parent_name, _, child = name.rpartition(".")
        parent = out.get_submodule(parent_name) if parent_name else out
        setattr(parent, child, getattr(parent, child).inner)
    return out


def skeleton(model: nn.Module) -> nn.Module:
    """A deep copy of ``model`` whose state-dict tensors live on the meta device (shapes only, no storage).

    Why: a copy to load a state dict into with ``assign=True`` (``rebuild``) need not hold a
    second set of weights first. Tied tensors stay tied; non-persistent buffers are copied.
    """
    memo: dict[int, object] = {}
    for t in model.state_dict(keep_vars=True).values():
        if id(t) not in memo:
            empty = torch.empty_like(t, device="meta")
            memo[id(t)] = nn.Parameter(empty, requires_grad=t.requires_grad) if isinstance(t, nn.Parameter) else empty
    return copy.deepcopy(model, memo)


def rebuild(source: nn.Module, units: Sequence[tuple[str, str, Mapping[str, object]]],
            state: dict[str, torch.Tensor], *, assign: bool = False) -> nn.Module:
    """The refined module: a copy of ``source`` with ``units`` inserted and ``state`` loaded strictly (eval mode).

    ``source`` is unchanged. A state dict that does not fit (a missing, extra or reshaped
    tensor) raises ``ModelLoadError`` naming the first difference. ``assign``: the module
    takes ``state``'s tensors themselves instead of copies (``torch.nn.Module.load_state_dict``),
    which a ``skeleton`` source needs.
    """
    model = copy.deepcopy(source)
    for layer, kind, options in units:  # one at a time: an inner layer's path goes through its outer wrapper
        try:
            with torch.device("meta") if assign else contextlib.nullcontext():  # assigned buffers need no storage
                unit = build_unit(kind, options)
            insert_after(model, {layer: unit})
        except AttributeError:
            raise ModelLoadError(f"the source model has no layer {layer!r} to insert a {kind} unit after") from None
    try:
        model.load_state_dict(state, strict=True, assign=assign)
    except RuntimeError as exc:
        lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
        raise ModelLoadError(f"the refined weights do not fit the rebuilt model: "
                             f"{(lines[1] if len(lines) > 1 else lines[0])[:300]}") from None
    return model.eval()


#: safetensors dtype names; the writer orders tensors as safetensors does (larger alignment first, then by name)
_DTYPES = {"U64": torch.uint64, "I64": torch.int64, "F64": torch.float64, "F32": torch.float32, "U32": torch.uint32,
           "I32": torch.int32, "BF16": torch.bfloat16, "F16": torch.float16, "U16": torch.uint16, "I16": torch.int16,
           "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool}
_NAMES = {dtype: name for name, dtype in _DTYPES.items()}


def state_bytes(model: nn.Module) -> bytes:
    """``model``'s full state dict as safetensors bytes (the format of ``safetensors.torch.save``, byte for byte).

    Each tensor is copied once, into the one buffer returned (a ``bytearray``): the
    library's ``save`` holds the whole file twice at its peak, which counts for large models.
    """
    import json

    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    for k, v in state.items():
        if v.dtype not in _NAMES:
            raise ExportError(f"cannot write {k} of dtype {v.dtype} to safetensors")
    rank = list(_DTYPES.values())
    order = sorted(state, key=lambda k: (rank.index(state[k].dtype), k))
    header: dict[str, dict[str, object]] = {}
    spans: dict[str, tuple[int, int]] = {}
    offset = 0
    for k in order:
        n = state[k].numel() * state[k].dtype.itemsize
        spans[k] = (offset, offset + n)
        header[k] = {"dtype": _NAMES[state[k].dtype], "shape": list(state[k].shape), "data_offsets": list(spans[k])}
        offset += n
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    buf = bytearray(8 + len(text) + offset)
    buf[:8] = len(text).to_bytes(8, "little")
    buf[8 : 8 + len(text)] = text
    base = 8 + len(text)
    for k in order:
        begin, stop = spans[k]
        if stop > begin:
            flat = state[k].contiguous().reshape(-1).view(torch.uint8)
            torch.frombuffer(buf, dtype=torch.uint8, count=stop - begin, offset=base + begin).copy_(flat)
    return buf  # type: ignore[return-value]  # bytes-like: hashed, written and read like bytes


def load_state_bytes(data: bytes) -> dict[str, torch.Tensor]:
    """A state dict from safetensors bytes (never unpickled); ``ModelLoadError`` for anything else."""
    from safetensors.torch import load

    try:
        return load(bytes(data) if isinstance(data, bytearray) else data)
    except Exception as exc:  # safetensors raises several types for a bad header
        raise ModelLoadError(f"cannot read the refined weights as safetensors: {str(exc)[:200]}") from None


def state_views(data: bytes) -> dict[str, torch.Tensor]:
    """The tensors of safetensors ``data`` as read-only views into it (no copy), for a check that only reads them.

    Why: ``refined_weights`` checks the recorded bytes while the model and the ONNX graph are
    also in memory; ``load_state_bytes`` would hold a further copy of every weight.
    ``ModelLoadError`` for bytes that are not a safetensors layout of known dtypes.
    """
    import json
    import warnings

    try:
        n = int.from_bytes(data[:8], "little")
        header = json.loads(data[8 : 8 + n])
        out: dict[str, torch.Tensor] = {}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the buffer is read-only (bytes): the views are only read
            for name, info in header.items():
                if name == "__metadata__":
                    continue
                dtype, shape = _DTYPES[info["dtype"]], [int(d) for d in info["shape"]]
                begin, end = (8 + n + int(o) for o in info["data_offsets"])
                count = end - begin
                if count != torch.Size(shape).numel() * dtype.itemsize or end > len(data):
                    raise ValueError(f"{name}: {count} bytes for shape {shape}")
                out[name] = (torch.frombuffer(data, dtype=dtype, count=count // dtype.itemsize, offset=begin)
                             if count else torch.empty(0, dtype=dtype)).view(shape)
    except (ValueError, KeyError, TypeError) as exc:
        raise ModelLoadError(f"cannot read the refined weights as safetensors: {str(exc)[:200]}") from None
    return out


def refined_weights(model: nn.Module, x_model: torch.Tensor) -> tuple[bytes, RefinedModelSpec] | None:
    """The served model's state dict (safetensors) and its rebuild recipe, checked by rebuilding it here.

    ``None`` when the model holds an inserted module that is none of ``UNIT_KINDS``: the bundle
    then carries no refined weights and is audited by its predictions.
    """
    try:
        units = inserted_units(model)
    except UnsupportedUnit:
        return None
    data = state_bytes(model)
    # the rebuild holds views into the bytes themselves: no copy of the weights beside model and bytes
    rebuilt = rebuild(strip_units(skeleton(model)), units, state_views(data), assign=True)
    with torch.no_grad(), eval_mode(model):  # two images at a time: the check's activations stay small
        same = all(bool(torch.allclose(rebuilt(x_model[i : i + 2]), model(x_model[i : i + 2]), rtol=1e-6, atol=1e-6))
                   for i in range(0, len(x_model), 2))
    if not same:
        raise ExportError("the refined model rebuilt from its recorded weights differs from it; no bundle written")
    spec = RefinedModelSpec(sha256=hashlib.sha256(data).hexdigest(), inserted=[InsertedUnit(layer=layer, kind=kind, options=opts)
                                                                 for layer, kind, opts in units])
    return data, spec

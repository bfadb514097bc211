"""Exact directional derivatives through a network head without autograd (forward-mode JVP).

The concept sensitivity of paper 001 (Sec. 3, Eq. 9: ``S = grad_a f_k(a) . h``) and the
RR-ClArC penalty (Eq. 5: ``(grad_a [m . f(a)] . h)^2``) are both directional derivatives
of the head ``f`` along a CAV direction ``h``, i.e. Jacobian-vector products ``J_f(a) h``.
``Linearized`` computes them as ordinary tensor operations, beside the forward pass:
every op of the head maps its primal value ``p`` and its tangent ``t`` (``M`` directions
stacked in front, ``[M, N, ...]``) by its derivative:

- linear ops (``Conv``, ``Linear`` without bias, average pools, flatten and batch-preserving
  reshapes, batch-norm in eval mode, dropout with the primal's mask): applied to ``t``;
- ``ReLU``: ``t * (p > 0)`` (autograd's convention at 0); ``MaxPool2d``: ``t`` at the first
  maximum of each window (torch's tie rule), picked by the pool's indices, or, for graphs
  to export (``window_pools=True``) with non-overlapping windows, by a ``where`` chain over
  the window offsets (``_tiled_maxpool``); ``Sigmoid``/``Tanh``: the closed-form derivative;
- a ``ReLU`` whose input tangent is the same for every sample (a CAV direction) keeps its
  tangent as ``u * (p > 0)`` unevaluated through ``MaxPool2d`` (when ``u`` is the same at
  every position of a channel, as for a channel-pooled CAV: ``u_c * (maxpool > 0)``, exact
  because every positive position of a window carries ``u_c``, ties included), ``Flatten``
  and into the next ``Linear`` (one matrix product ``mask @ (W * u)^T`` for all M). This
  avoids onnxruntime's slow ``MaxPool`` with indices, which alone cost more than the rest
  of the heads, and the ``[M, N, D]`` tangent before the first linear layer;
- ``+``/``-``/``*`` between values: sum and product rules;
- P-ClArC's projection (``nn.units.ClarcProjection``, paper 001 Eq. 3, ``a + (z - pool(a) . h) / (h . h) h``):
  ``t - (pool'(t) . h) / (h . h) h``, where ``pool'`` is the spatial mean of ``t``, ``t`` at each
  channel's first maximum of ``a`` (``max``; autograd splits ties evenly) or ``t`` itself (``none``).

So the result equals autograd up to float32 rounding (no step size, unlike finite
differences), it exports to ONNX as plain ops, and a penalty on it trains with a
first-order backward pass instead of a double backward. A head with any other op is
refused at construction (``UnsupportedOp``), so callers can fall back.
"""

from __future__ import annotations

import operator
from typing import Any, Callable

import torch
import torch.fx
import torch.nn.functional as F
from torch import nn

from hansgate.errors import ConfigError
from hansgate.nn.units import ClarcProjection

__all__ = ["Linearized", "UnsupportedOp", "linearizable"]


class UnsupportedOp(ConfigError):
    """The head contains an op whose derivative ``Linearized`` does not know."""


_RELUS = (F.relu, torch.relu, torch.relu_)
_ADDS = (operator.add, operator.iadd, torch.add)
_SUBS = (operator.sub, operator.isub, torch.sub)
_MULS = (operator.mul, operator.imul, torch.mul)
_FLATTENS = (torch.flatten,)
_MODULES: tuple[type, ...] = (nn.Conv1d, nn.Conv2d, nn.Linear, nn.ReLU, nn.MaxPool2d, nn.AvgPool2d,
                              nn.AdaptiveAvgPool2d, nn.Flatten, nn.Dropout, nn.Identity, nn.BatchNorm1d,
                              nn.BatchNorm2d, nn.Sigmoid, nn.Tanh, ClarcProjection)
_METHODS = ("relu", "relu_", "flatten", "view", "reshape", "size", "dim", "add", "add_", "mul", "mul_", "contiguous")


class _Masked:
    """The tangent ``u * (source > 0)`` of a ReLU whose input tangent ``u`` ``[M, 1, ...]`` is
    the same for every sample, kept unevaluated until a consumer needs it (``_masked_rule``)."""

    def __init__(self, u: torch.Tensor, source: torch.Tensor, per_channel: torch.Tensor | None = None) -> None:
        self.u, self.source = u, source
        self.per_channel = per_channel  # [M, C] when ``u`` is a flattened ``[M, 1, C, 1, ...]``

    def value(self) -> torch.Tensor:
        return self.u * (self.source > 0).to(self.u.dtype)


def _spatially_constant(t: torch.Tensor) -> bool:
    return t.dim() >= 4 and t.shape[1] == 1 and all(d == 1 for d in t.shape[3:])


def _full(t: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """The tangent ``[M, 1 or N, ...]`` broadcast to ``[M, *p.shape]``."""
    return t.expand((t.shape[0],) + tuple(p.shape))


def _batched(fn: Callable[[torch.Tensor], torch.Tensor], t: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """Apply a batch-wise linear ``fn`` to every tangent direction at once."""
    t = _full(t, p)
    out = fn(t.reshape((-1,) + tuple(p.shape[1:])))
    return out.reshape((t.shape[0], p.shape[0]) + tuple(out.shape[1:]))


class Linearized(nn.Module):
    """``head`` and its JVPs: ``forward(a, tangents) -> (head(a), [N, M, K] derivatives)``.

    ``tangents`` ``[M, *a.shape[1:]]`` (or anything broadcasting to ``[M, N, ...]``, e.g. a
    CAV lifted to ``[M, 1, C, 1, 1]``): the directions. Shares ``head``'s parameters.
    ``window_pools``: max-pool tangents by window offsets instead of the pool's indices (for
    ONNX export: onnxruntime runs ``MaxPool`` with indices several times slower).
    """

    def __init__(self, head: nn.Module, window_pools: bool = False) -> None:
        super().__init__()
        self.window_pools = window_pools
        try:
            self.graph_module = head if isinstance(head, torch.fx.GraphModule) and _is_flat(head) \
                else torch.fx.GraphModule(head, _RuleTracer().trace(head))
        except Exception as exc:  # fx raises TraceError, TypeError, ... for dynamic control flow
            raise UnsupportedOp(f"cannot trace the head: {str(exc).splitlines()[0]}") from exc
        self.modules_by_name = dict(self.graph_module.named_modules())
        for node in self.graph_module.graph.nodes:
            _check_supported(node, self.modules_by_name)

    def forward(self, a: torch.Tensor, tangents: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if tangents.dim() == a.dim():  # [M, C, ...] -> [M, 1, C, ...]
            tangents = tangents.unsqueeze(1)
        primal: dict[torch.fx.Node, Any] = {}
        tangent: dict[torch.fx.Node, Any] = {}
        for node in self.graph_module.graph.nodes:
            if node.op == "placeholder":
                primal[node], tangent[node] = a, tangents.to(a)
            elif node.op == "get_attr":
                primal[node], tangent[node] = _fetch(self.graph_module, str(node.target)), None
            elif node.op == "output":
                (out,) = node.args
                p, t = primal[out], tangent[out]
                t = t.value() if isinstance(t, _Masked) else t
                if t is None:
                    t = torch.zeros((tangents.shape[0],) + tuple(p.shape), dtype=p.dtype, device=p.device)
                return p, _full(t, p).permute(1, 0, *range(2, p.dim() + 1))
            else:
                args = torch.fx.node.map_arg(node.args, lambda n: primal[n])
                kwargs = torch.fx.node.map_arg(node.kwargs, lambda n: primal[n])
                raw = [tangent.get(n) if isinstance(n, torch.fx.Node) else None for n in node.args]
                if isinstance(raw[0], _Masked) and node.op == "call_module":
                    done = _masked_rule(self.modules_by_name[str(node.target)], args[0], raw[0], self.window_pools)
                    if done is not None:
                        primal[node], tangent[node] = done
                        continue
                targs = [t.value() if isinstance(t, _Masked) else t for t in raw]
                primal[node], tangent[node] = self._step(node, args, kwargs, targs)
                if _is_relu(node, self.modules_by_name) and targs[0] is not None and targs[0].shape[1] == 1:
                    tangent[node] = _Masked(targs[0], args[0])  # type: ignore[assignment]
        raise ConfigError("the head's graph has no output")

    def _step(self, node: torch.fx.Node, args: Any, kwargs: Any,
              targs: list[torch.Tensor | None]) -> tuple[Any, torch.Tensor | None]:
        if node.op == "call_module":
            return _module_rule(self.modules_by_name[str(node.target)], args[0], targs[0], self.window_pools)
        if node.op == "call_method":
            return _method_rule(str(node.target), args, kwargs, targs)
        return _function_rule(node.target, args, kwargs, targs)


class _RuleTracer(torch.fx.Tracer):
    """fx's tracer, but modules with a rule of their own here (the projection) stay one call."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return isinstance(m, ClarcProjection) or super().is_leaf_module(m, module_qualified_name)


def linearizable(head: nn.Module) -> bool:
    """Whether ``Linearized(head)`` can be built."""
    try:
        Linearized(head)
    except UnsupportedOp:
        return False
    return True


# --------------------------------------------------------------------------- rules


def _is_flat(gm: torch.fx.GraphModule) -> bool:
    """A graph whose called modules are all ones with a known rule (no nested containers)."""
    named = dict(gm.named_modules())
    return all(isinstance(named.get(str(n.target)), _MODULES) for n in gm.graph.nodes if n.op == "call_module")


def _is_relu(node: torch.fx.Node, modules: dict[str, nn.Module]) -> bool:
    if node.op == "call_module":
        return isinstance(modules[str(node.target)], nn.ReLU)
    return node.target in _RELUS or (node.op == "call_method" and node.target in ("relu", "relu_"))


def _masked_rule(mod: nn.Module, p: torch.Tensor, t: _Masked, window_pools: bool) -> tuple[torch.Tensor, Any] | None:
    """Rules that keep a masked tangent ``u * (source > 0)`` unevaluated; ``None``: evaluate it.

    ``MaxPool2d`` (``u`` the same at every position of a channel): every positive position of a
    window carries ``u_c``, so the output tangent is ``u * (maxpool > 0)``, ties included.
    ``Flatten`` to ``[N, D]``: flatten ``u`` and the mask alike. ``Linear``: ``W (u_m * mask_n)`` =
    ``mask_n @ (W * u_m)^T`` for all ``m`` in one matrix product, no ``[M, N, D]`` tangent.
    """
    if isinstance(mod, nn.MaxPool2d) and _spatially_constant(t.u):
        out = mod(p)
        return out, _Masked(t.u, out)
    if isinstance(mod, nn.MaxPool2d) and window_pools:
        return _tiled_maxpool(mod, p, t.u, relu_input=True)
    if isinstance(mod, nn.Flatten) and mod.start_dim == 1 and mod.end_dim == -1:
        m = t.u.shape[0]
        u = t.u.expand((m, 1) + tuple(t.source.shape[1:])).reshape(m, 1, -1)
        per_channel = t.u.reshape(m, -1) if _spatially_constant(t.u) else None
        return mod(p), _Masked(u, t.source.flatten(1), per_channel)
    if isinstance(mod, nn.Linear) and t.u.dim() == 3:
        m, n = t.u.shape[0], p.shape[0]
        mask = (t.source > 0).to(p.dtype)  # [N, D]
        if t.per_channel is not None and m > 1:
            # W (u_m * mask_n) = sum_c u_mc Q_nc with Q_nc = W[:, channel c] mask_n[channel c]: one
            # product of the layer's size whatever M is, then an [M, C] contraction
            c = t.per_channel.shape[1]
            w = mod.weight.reshape(mod.weight.shape[0], c, -1).permute(1, 2, 0)  # [C, S, O]
            q = torch.bmm(mask.reshape(n, c, -1).transpose(0, 1), w)  # [C, N, O]
            return mod(p), (t.per_channel @ q.reshape(c, -1)).reshape(m, n, -1)
        scaled = (mod.weight.unsqueeze(0) * t.u).reshape(-1, p.shape[1])  # [M * O, D]
        return mod(p), (mask @ scaled.T).reshape(n, m, -1).permute(1, 0, 2)
    return None


def _fetch(gm: nn.Module, target: str) -> Any:
    obj: Any = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def _check_supported(node: torch.fx.Node, modules: dict[str, nn.Module]) -> None:
    if node.op in ("placeholder", "get_attr", "output"):
        return
    if node.op == "call_module":
        mod = modules[str(node.target)]
        if not isinstance(mod, _MODULES):
            raise UnsupportedOp(f"no derivative rule for module {node.target} ({type(mod).__name__})")
        if isinstance(mod, (nn.Conv1d, nn.Conv2d)) and mod.padding_mode != "zeros":
            raise UnsupportedOp(f"no derivative rule for {node.target}: padding mode {mod.padding_mode!r}")
        return
    if node.op == "call_method":
        if node.target not in _METHODS:
            raise UnsupportedOp(f"no derivative rule for method .{node.target}()")
        return
    known = _RELUS + _ADDS + _SUBS + _MULS + _FLATTENS + (getattr, F.dropout, torch.sigmoid, torch.tanh)
    if node.target not in known:
        raise UnsupportedOp(f"no derivative rule for function {getattr(node.target, '__name__', node.target)}")


def _relu(p: torch.Tensor, t: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    return F.relu(p), None if t is None else t * (p > 0).to(t.dtype)


def _reshape(p: torch.Tensor, out: torch.Tensor, t: torch.Tensor | None, what: str) -> torch.Tensor | None:
    """Tangent of a reshape that keeps each sample's values in its own leading slice."""
    if t is None:
        return None
    if out.dim() == 0 or out.shape[0] != p.shape[0]:
        raise UnsupportedOp(f"{what} changes the batch dimension ({tuple(p.shape)} -> {tuple(out.shape)})")
    return _full(t, p).reshape((t.shape[0],) + tuple(out.shape))


def _tiled_maxpool(mod: nn.MaxPool2d, p: torch.Tensor, t: torch.Tensor,
                   relu_input: bool = False) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Max pooling over non-overlapping windows: the tangent at each window's first maximum.

    Without pooling indices (onnxruntime runs ``MaxPool`` with indices, and
    ``GatherElements``, several times slower than the pooling itself): the window offsets
    are strided slices on the pooled grid, visited last to first, and each offset whose
    value equals the window's maximum overwrites the picked tangent, so the first maximum in
    row-major order wins (torch's tie rule). ``relu_input``: ``p`` is a ReLU's output and
    ``t`` the ReLU's unmasked input tangent; its mask is 1 at the maximum exactly when the
    maximum is positive. ``None`` for other pools.
    """
    kh, kw = _pair(mod.kernel_size)
    sh, sw = _pair(mod.stride if mod.stride is not None else mod.kernel_size)
    if (sh, sw) != (kh, kw) or _pair(mod.padding) != (0, 0) or _pair(mod.dilation) != (1, 1) or p.dim() != 4:
        return None
    h, w = p.shape[2:]
    ho, wo = h // kh, w // kw
    if mod.ceil_mode and (h % kh or w % kw):
        return None
    out = mod(p)
    t = t.expand(tuple(t.shape[:2]) + tuple(p.shape[1:]))  # [M, 1 or N, C, H, W]
    picked: torch.Tensor | None = None
    for i in reversed(range(kh)):
        for j in reversed(range(kw)):
            tq = t[..., i : ho * kh : kh, j : wo * kw : kw]
            picked = tq if picked is None else torch.where(p[:, :, i : ho * kh : kh, j : wo * kw : kw] == out,
                                                           tq, picked)
    assert picked is not None
    if relu_input:
        picked = picked * (out > 0).to(picked.dtype)
    return out, _full(picked, out)


def _pair(v: Any) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else (int(v[0]), int(v[1]))


def _module_rule(mod: nn.Module, p: torch.Tensor, t: torch.Tensor | None,
                 window_pools: bool = False) -> tuple[Any, torch.Tensor | None]:
    if isinstance(mod, nn.ReLU):
        return _relu(p, t)
    if isinstance(mod, nn.MaxPool2d):
        if t is None:
            return mod(p), None
        tiled = _tiled_maxpool(mod, p, t) if window_pools else None
        if tiled is not None:
            return tiled
        out, idx = F.max_pool2d(p, mod.kernel_size, mod.stride, mod.padding, mod.dilation,
                                ceil_mode=mod.ceil_mode, return_indices=True)
        m = t.shape[0]
        flat = _full(t, p).flatten(3)  # [M, N, C, H*W]
        picked = flat.gather(3, idx.flatten(2).unsqueeze(0).expand(m, -1, -1, -1))
        return out, picked.reshape((m,) + tuple(out.shape))
    if isinstance(mod, nn.Dropout):
        if not mod.training or mod.p == 0:
            return p, t
        keep = F.dropout(torch.ones_like(p), mod.p, True)  # one mask for the value and its tangent
        return p * keep, None if t is None else t * keep
    out = mod(p)
    if t is None or isinstance(mod, nn.Identity):
        return out, t
    if isinstance(mod, nn.Linear):
        return out, F.linear(t, mod.weight)
    if isinstance(mod, (nn.Conv1d, nn.Conv2d)):
        conv = F.conv1d if isinstance(mod, nn.Conv1d) else F.conv2d
        return out, _batched(lambda v: conv(v, mod.weight, None, mod.stride, mod.padding,  # type: ignore[operator]
                                            mod.dilation, mod.groups), t, p)
    if isinstance(mod, (nn.AvgPool2d, nn.AdaptiveAvgPool2d)):
        return out, _batched(mod, t, p)
    if isinstance(mod, nn.Flatten):
        return out, _reshape(p, out, t, "Flatten")
    if isinstance(mod, (nn.BatchNorm1d, nn.BatchNorm2d)):
        if mod.training or mod.running_var is None:
            raise UnsupportedOp("batch norm in training mode has no per-sample derivative rule here")
        scale = torch.rsqrt(mod.running_var + mod.eps)
        if mod.weight is not None:
            scale = scale * mod.weight
        return out, t * scale.view((1, 1, -1) + (1,) * (p.dim() - 2))
    if isinstance(mod, ClarcProjection):
        return out, _projection_tangent(mod, p, t)
    if isinstance(mod, nn.Sigmoid):
        return out, t * out * (1 - out)
    if isinstance(mod, nn.Tanh):
        return out, t * (1 - out * out)
    raise UnsupportedOp(f"no derivative rule for {type(mod).__name__}")


def _projection_tangent(mod: ClarcProjection, p: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """The JVP of Eq. 3 of paper 001 (see the module docstring); ``t`` ``[M, N, ...]``."""
    h = mod.cav.to(p)
    t = _full(t, p)
    m = t.shape[0]
    if p.dim() == 2 or mod.pooling == "none":
        dpool, lifted = t.flatten(2), h.view(1, 1, *p.shape[1:])
    elif mod.pooling == "max":
        first = p.flatten(2).argmax(2)  # [N, C]: torch's first maximum
        dpool = t.flatten(3).gather(3, first.unsqueeze(0).unsqueeze(-1).expand(m, -1, -1, 1)).squeeze(3)
        lifted = h.view(1, 1, -1, *(1,) * (p.dim() - 2))
    else:
        dpool, lifted = t.flatten(3).mean(3), h.view(1, 1, -1, *(1,) * (p.dim() - 2))
    gamma = -(dpool @ h) / (h @ h)  # [M, N]
    return t + gamma.view(m, -1, *(1,) * (p.dim() - 1)) * lifted


def _combine(op: str, args: Any, targs: list[torch.Tensor | None]) -> torch.Tensor | None:
    """Sum / difference / product rule for two operands, either of which may be a constant."""
    a, b = args[0], args[1]
    ta, tb = (list(targs) + [None, None])[:2]
    if op == "mul":  # d(a b) = da b + a db
        ta = None if ta is None else ta * b
        tb = None if tb is None else tb * a
    elif op == "sub" and tb is not None:
        tb = -tb
    if ta is None and tb is None:
        return None
    return ta if tb is None else tb if ta is None else ta + tb


def _function_rule(fn: Any, args: Any, kwargs: Any, targs: list[torch.Tensor | None]) -> tuple[Any, torch.Tensor | None]:
    if fn is getattr:
        return getattr(*args), None
    if fn in _RELUS:
        return _relu(args[0], targs[0])
    if fn in _ADDS + _SUBS + _MULS:
        op = "add" if fn in _ADDS else "sub" if fn in _SUBS else "mul"
        out = {"add": operator.add, "sub": operator.sub, "mul": operator.mul}[op](args[0], args[1])
        return out, _combine(op, args, targs)
    if fn in _FLATTENS:
        out = torch.flatten(*args, **kwargs)
        return out, _reshape(args[0], out, targs[0], "flatten")
    if fn is F.dropout:
        if not kwargs.get("training", args[2] if len(args) > 2 else True):
            return args[0], targs[0]
        raise UnsupportedOp("functional dropout in training mode has no derivative rule here; use nn.Dropout")
    if fn is torch.sigmoid:
        out = torch.sigmoid(args[0])
        return out, None if targs[0] is None else targs[0] * out * (1 - out)
    if fn is torch.tanh:
        out = torch.tanh(args[0])
        return out, None if targs[0] is None else targs[0] * (1 - out * out)
    raise UnsupportedOp(f"no derivative rule for {getattr(fn, '__name__', fn)}")


def _method_rule(name: str, args: Any, kwargs: Any, targs: list[torch.Tensor | None]) -> tuple[Any, torch.Tensor | None]:
    p = args[0]
    if name in ("size", "dim"):
        return getattr(p, name)(*args[1:], **kwargs), None
    if name == "contiguous":
        return p, targs[0]
    if name in ("relu", "relu_"):
        return _relu(p, targs[0])
    if name in ("add", "add_", "mul", "mul_"):
        return _function_rule(operator.add if name.startswith("add") else operator.mul, args, kwargs, targs)
    out = getattr(p, name)(*args[1:], **kwargs)
    return out, _reshape(p, out, targs[0], f".{name}()")


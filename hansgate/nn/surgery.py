"""Which activations to refine, and how refined modules are inserted into a model.

Automatic choice (paper 000, Sec. 4.4): the output of every block, plus every
activation (ReLU, ReLU6, Hardswish, SiLU, GELU) that follows a conv or linear layer
outside blocks. Concretely, in the order the modules run on one forward pass:

- a stage (a container whose children are all residual blocks of one torchvision
  family) counts as one block; its output is refined. This follows the authors' ResNet
  code (the input of each stage and of the classifier); a block outside such a stage is
  refined on its own. Per torchvision family: ResNet ``layer1..4`` (``BasicBlock``/
  ``Bottleneck`` stages); EfficientNet ``features.1..7`` (``MBConv`` stages) plus the
  stem's and head's SiLU; ConvNeXt ``features.1,3,5,7`` (``CNBlock`` stages; the
  down-sampling layers between them have no activation); MobileNet ``features.N``, each
  ``InvertedResidual`` block on its own (torchvision lists them flat), plus the stem's
  and the classifier's Hardswish;
- transformer encoder blocks (torchvision ViT ``encoder.layers.encoder_layer_N``,
  ``nn.TransformerEncoderLayer``) are refined one by one, never merged into a stage:
  their output ``[N, T, D]`` has the ``D`` embedding dimensions as units, shared over the
  ``T`` tokens as a conv map's channels are over space (``refinement.egem``);
- VGG: an activation that follows a conv or linear layer (norm and dropout layers in between are
  transparent) is refined; if a max-pool follows it, the pool's output is refined
  instead, which makes a VGG block (conv-ReLU-...-pool) one refined activation and
  reproduces the authors' choice for the MNIST net (inputs of conv2, fc1, fc2).
  Scaling by a positive per-channel factor commutes with max-pooling, so for EGEM the
  position only changes where the statistics are read.

A module that runs more than once per forward pass (a shared ``self.relu``) cannot
be refined by replacing it, so the automatic choice skips it and an explicit choice
of it is an error.

``explicit_batchnorm`` swaps a model's batch-norm layers, for the duration of a ``with``
block, for the same computation written with elementary ops: PyTorch's fused kernel has
no third derivative, which RBR (``refinement.xs``) needs.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Iterator

import torch
import torch.fx
from torch import nn
from torchvision.models.convnext import CNBlock
from torchvision.models.efficientnet import FusedMBConv, MBConv
from torchvision.models.mobilenetv2 import InvertedResidual as InvertedResidualV2
from torchvision.models.mobilenetv3 import InvertedResidual as InvertedResidualV3
from torchvision.models.resnet import BasicBlock, Bottleneck
from torchvision.models.vision_transformer import EncoderBlock

from hansgate.errors import ConfigError, ModelRunError

__all__ = ["LayerCall", "run_hooked", "trace_calls", "auto_layers", "resolve_layers", "capture_outputs", "get_module",
           "insert_after", "Refined", "split_at", "nonlinear_after", "is_block", "explicit_batchnorm", "TOKEN_BLOCKS"]

#: conv blocks with a skip connection, refined per stage (all children such blocks) or alone
_CONV_BLOCKS = (BasicBlock, Bottleneck, InvertedResidualV2, InvertedResidualV3, MBConv, FusedMBConv, CNBlock)
#: transformer encoder blocks, refined one by one (output [N, T, D], units on the last axis)
TOKEN_BLOCKS = (EncoderBlock, nn.TransformerEncoderLayer)
_RESIDUAL = (*_CONV_BLOCKS, *TOKEN_BLOCKS)
_ACTIVATIONS = (nn.ReLU, nn.ReLU6, nn.Hardswish, nn.SiLU, nn.GELU)
_WEIGHTED = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)
_TRANSPARENT = (nn.modules.batchnorm._BatchNorm, nn.GroupNorm, nn.LayerNorm, nn.Dropout, nn.Dropout2d, nn.Identity)
_POOLS = (nn.MaxPool2d, nn.MaxPool1d)


@dataclass(frozen=True)
class LayerCall:
    """One call of a module during the traced forward pass."""

    name: str
    module: nn.Module
    output_shape: tuple[int, ...]


def _is_stage(module: nn.Module) -> bool:
    children = list(module.children())
    return bool(children) and all(isinstance(c, _CONV_BLOCKS) for c in children)


def is_block(module: nn.Module) -> bool:
    """A residual block of a known torchvision family or a transformer encoder block (module doc)."""
    return isinstance(module, _RESIDUAL)


def _units(model: nn.Module) -> dict[str, nn.Module]:
    """Modules traced as atomic units: residual stages/blocks and leaves outside them."""
    units: dict[str, nn.Module] = {}

    def visit(prefix: str, module: nn.Module) -> None:
        for name, child in module.named_children():
            path = f"{prefix}.{name}" if prefix else name
            if _is_stage(child) or isinstance(child, _RESIDUAL) or not list(child.children()):
                units[path] = child
            else:
                visit(path, child)

    visit("", model)
    return units


def run_hooked(model: nn.Module, example: torch.Tensor,
               hooks: list[tuple[nn.Module, Callable[[nn.Module, object, object], None]]]) -> None:
    """One no-grad, eval-mode forward pass with forward ``hooks`` that are removed afterwards.

    A model that cannot run on ``example`` raises ``ModelRunError`` with a one-line reason.
    """
    handles = [module.register_forward_hook(hook) for module, hook in hooks]
    try:
        with torch.no_grad():
            model.eval()(example)
    except RuntimeError as exc:
        raise ModelRunError(f"the model does not run on inputs of shape {tuple(example.shape[1:])}: "
                            f"{str(exc).splitlines()[0]}") from exc
    finally:
        for h in handles:
            h.remove()


def trace_calls(model: nn.Module, example: torch.Tensor) -> list[LayerCall]:
    """Run ``model`` once on ``example`` and list its atomic units in call order."""
    calls: list[LayerCall] = []

    def record(name: str) -> Callable[[nn.Module, object, object], None]:
        def hook(mod: nn.Module, inp: object, out: object) -> None:
            if isinstance(out, torch.Tensor):
                calls.append(LayerCall(name, mod, tuple(out.shape)))
        return hook

    run_hooked(model, example, [(module, record(name)) for name, module in _units(model).items()])
    return calls


def _call_counts(calls: list[LayerCall]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for c in calls:
        counts[c.name] = counts.get(c.name, 0) + 1
    return counts


def _block_end(calls: list[LayerCall], i: int) -> int | None:
    """Index of the max-pool that closes a conv/ReLU run starting after ``calls[i]``, if any."""
    for j in range(i + 1, len(calls)):
        mod = calls[j].module
        if isinstance(mod, _POOLS):
            return j
        if not isinstance(mod, (*_TRANSPARENT, *_ACTIVATIONS, nn.Conv2d)):
            return None
    return None


def auto_layers(model: nn.Module, example: torch.Tensor) -> list[str]:
    """Names of the modules whose outputs are refined by default (Sec. 4.4, rules above)."""
    calls = trace_calls(model, example)
    counts = _call_counts(calls)
    chosen: list[str] = []
    previous: nn.Module | None = None
    for i, call in enumerate(calls):
        mod = call.module
        if isinstance(mod, _TRANSPARENT):
            continue
        if _is_stage(mod) or isinstance(mod, _RESIDUAL):
            chosen.append(call.name)
        elif isinstance(mod, _ACTIVATIONS) and isinstance(previous, _WEIGHTED):
            end = _block_end(calls, i)
            if end is None:
                chosen.append(call.name)
            elif all(not isinstance(c.module, _ACTIVATIONS) for c in calls[i + 1 : end]):
                chosen.append(calls[end].name)  # the last ReLU of a VGG-style block: refine the pool
        previous = mod
    out: list[str] = []
    for name in chosen:  # modules that run more than once cannot be replaced
        if counts[name] == 1 and name not in out:
            out.append(name)
    return out


def resolve_layers(model: nn.Module, example: torch.Tensor, layers: list[str] | None) -> list[str]:
    """The automatic choice, or the user's module names checked against the model."""
    if not layers:
        chosen = auto_layers(model, example)
        if not chosen:
            raise ConfigError("found no layer to refine automatically; name the layers explicitly")
        return chosen
    named = dict(model.named_modules())
    counts: dict[str, int] = {}
    for name in layers:
        if name not in named or name == "":
            raise ConfigError(f"model has no module named {name!r}")

    def count(name: str) -> Callable[[nn.Module, object, object], None]:
        def hook(mod: nn.Module, inp: object, out: object) -> None:
            counts[name] = counts.get(name, 0) + 1
        return hook

    run_hooked(model, example, [(named[name], count(name)) for name in layers])
    for name in layers:
        if counts.get(name, 0) != 1:
            raise ConfigError(f"module {name!r} runs {counts.get(name, 0)} times per forward pass; "
                              "only a module that runs exactly once can be refined")
    return list(layers)


def get_module(model: nn.Module, name: str) -> nn.Module:
    """The submodule at dotted path ``name``."""
    return model.get_submodule(name)


@contextmanager
def capture_outputs(model: nn.Module, names: list[str]) -> Iterator[dict[str, torch.Tensor]]:
    """Within the block, ``store[name]`` holds the latest output of each named module."""
    store: dict[str, torch.Tensor] = {}
    handles = []
    for name in names:
        def hook(mod: nn.Module, inp: object, out: torch.Tensor, name: str = name) -> None:
            store[name] = out
        handles.append(get_module(model, name).register_forward_hook(hook))
    try:
        yield store
    finally:
        for h in handles:
            h.remove()


class Refined(nn.Module):
    """``refiner(inner(x))``: a module followed by the refinement module inserted after it."""

    def __init__(self, inner: nn.Module, refiner: nn.Module) -> None:
        super().__init__()
        self.inner = inner
        self.refiner = refiner

    def forward(self, *args: torch.Tensor, **kwargs: torch.Tensor) -> torch.Tensor:
        return self.refiner(self.inner(*args, **kwargs))


def insert_after(model: nn.Module, modules: dict[str, nn.Module]) -> nn.Module:
    """Replace each named submodule ``m`` by ``Refined(m, modules[name])`` in place; returns ``model``.

    Callers that must keep the original deep-copy the model first (see ``egem.refine``).
    """
    for name, refiner in modules.items():
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, Refined(getattr(parent, child), refiner))
    return model


class _PathTracer(torch.fx.Tracer):
    """Traces only into the modules on the path to ``layer``; everything else stays one call."""

    def __init__(self, layer: str) -> None:
        super().__init__()
        self.layer = layer

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        name = module_qualified_name
        return not (name == "" or self.layer.startswith(name + ".")) or name == self.layer


def split_at(model: nn.Module, layer: str) -> tuple[torch.fx.GraphModule, torch.fx.GraphModule]:
    """``(features, head)`` with ``head(features(x)) == model(x)``; both share ``model``'s modules.

    ``layer`` must run once and be a cut of the graph: nothing after it may read a value
    computed before it (a conv inside a residual block is not; the block is).
    """
    try:
        model.get_submodule(layer)
    except AttributeError:
        raise ConfigError(f"model has no module named {layer!r}") from None
    try:
        graph = _PathTracer(layer).trace(model)
    except Exception as exc:  # fx raises TraceError, TypeError, ... for dynamic control flow
        raise ConfigError(f"cannot trace the model to split it at {layer!r}: {str(exc).splitlines()[0]}") from exc
    nodes = list(graph.nodes)
    hits = [i for i, n in enumerate(nodes) if n.op == "call_module" and n.target == layer]
    if len(hits) != 1:
        raise ConfigError(f"layer {layer!r} is called {len(hits)} times in the traced graph; need exactly once")
    cut = hits[0]
    before = set(nodes[:cut])
    for n in nodes[cut + 1 :]:
        if n.op == "placeholder" or any(a in before for a in n.all_input_nodes):
            raise ConfigError(f"layer {layer!r} is not a cut of the model: {n.name} reads a value computed before "
                              "it (e.g. a skip connection); choose the enclosing block")

    fg = torch.fx.Graph()
    env: dict[torch.fx.Node, torch.fx.Node] = {}
    for n in nodes[: cut + 1]:
        env[n] = fg.node_copy(n, lambda a: env[a])
    fg.output(env[nodes[cut]])
    hg = torch.fx.Graph()
    env = {nodes[cut]: hg.placeholder("a")}
    for n in nodes[cut + 1 :]:
        env[n] = hg.node_copy(n, lambda a: env[a])
    features = torch.fx.GraphModule(model, fg)
    features.graph.eliminate_dead_code()
    features.recompile()
    return features, torch.fx.GraphModule(model, hg)


_NONLINEAR_MODULES = (*_ACTIVATIONS, nn.Sigmoid, nn.Tanh, nn.Hardsigmoid, nn.Softmax, nn.MultiheadAttention,
                      nn.MaxPool1d, nn.MaxPool2d, nn.AdaptiveMaxPool2d, nn.LayerNorm, nn.GroupNorm)
_NONLINEAR_FUNCTIONS = {torch.relu, torch.nn.functional.relu, torch.nn.functional.gelu, torch.nn.functional.silu,
                        torch.nn.functional.hardswish, torch.sigmoid, torch.tanh, torch.nn.functional.max_pool2d,
                        torch.nn.functional.softmax, torch.softmax, torch.nn.functional.layer_norm, torch.max,
                        torch.nn.functional.relu6, torch.nn.functional.adaptive_max_pool2d}
_NONLINEAR_METHODS = {"relu", "relu_", "sigmoid", "tanh", "softmax", "max", "clamp", "clamp_min"}


def nonlinear_after(model: nn.Module, layer: str) -> bool:
    """Whether a nonlinearity lies between ``layer``'s output and the logits (on the traced head).

    With only linear ops after it (pooling by averages, flattening, linear layers, sums),
    the logits are affine in the activation: the directional derivative along any CAV is
    the same for every input, so TCAV there is constant (0 or 1 per class). A head module
    counts as nonlinear when it or any submodule is an activation, max-pool, softmax,
    attention or layer/group norm; a product of two computed values counts too.
    """
    _, head = split_at(model, layer)
    modules = dict(head.named_modules())
    for node in head.graph.nodes:
        if node.op == "call_module":
            mod = modules.get(str(node.target))
            if mod is not None and any(isinstance(m, _NONLINEAR_MODULES) for m in mod.modules()):
                return True
        elif node.op == "call_function":
            if node.target in _NONLINEAR_FUNCTIONS:
                return True
            if getattr(node.target, "__name__", "") in ("mul", "truediv", "matmul") and \
                    sum(isinstance(a, torch.fx.Node) for a in node.args) == 2:
                return True
        elif node.op == "call_method" and node.target in _NONLINEAR_METHODS:
            return True
    return False


class _ExplicitBatchNorm(nn.Module):
    """The batch-norm of a wrapped ``_BatchNorm`` written with elementary ops (differentiable to any order).

    PyTorch's fused batch-norm has no third derivative, which RBR needs; this computes
    the same normalisation and running-statistics update on the wrapped module's own
    parameters and buffers.
    """

    def __init__(self, bn: nn.modules.batchnorm._BatchNorm) -> None:
        super().__init__()
        self.bn = bn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bn = self.bn
        dims = [0, *range(2, x.dim())]
        shape = [1, -1] + [1] * (x.dim() - 2)
        running_mean, running_var = bn.running_mean, bn.running_var
        tracked = bn.num_batches_tracked
        if bn.training or running_mean is None or running_var is None:
            mean, var = x.mean(dim=dims), x.var(dim=dims, unbiased=False)
            if bn.training and running_mean is not None and running_var is not None and tracked is not None:
                with torch.no_grad():
                    tracked.add_(1)
                    momentum = bn.momentum if bn.momentum is not None else 1.0 / float(tracked.item())
                    n = x.numel() / x.shape[1]
                    running_mean.mul_(1 - momentum).add_(momentum * mean.detach())
                    running_var.mul_(1 - momentum).add_(momentum * var.detach() * n / max(n - 1, 1))
        else:
            mean, var = running_mean, running_var
        out = (x - mean.view(shape)) * torch.rsqrt(var.view(shape) + bn.eps)
        if bn.affine:
            out = out * bn.weight.view(shape) + bn.bias.view(shape)
        return out


class explicit_batchnorm:
    """Context manager: every batch-norm layer of ``model`` computed by ``_ExplicitBatchNorm``, restored on exit.

    Parameters, buffers and the optimizer's references are untouched (the wrapper
    holds the original module); only the forward computation changes.
    """

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self._swapped: list[tuple[nn.Module, str, nn.Module]] = []

    def __enter__(self) -> nn.Module:
        for parent in list(self.model.modules()):
            if isinstance(parent, _ExplicitBatchNorm):
                continue  # already swapped by an enclosing context
            for name, child in list(parent.named_children()):
                if isinstance(child, nn.modules.batchnorm._BatchNorm):
                    setattr(parent, name, _ExplicitBatchNorm(child))
                    self._swapped.append((parent, name, child))
        return self.model

    def __exit__(self, *exc: object) -> None:
        for parent, name, child in reversed(self._swapped):
            setattr(parent, name, child)
        self._swapped = []

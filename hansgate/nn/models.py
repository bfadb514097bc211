"""Built-in "third-party" models and safe loading of a user's model.

Built-ins, addressable by name (``builtin:NAME`` or just ``NAME``):

- ``mnist_cnn`` — the paper's small MNIST net (paper 000, Supp. E, Table 1):
  conv(8, 3) ReLU max-pool, conv(16, 5) ReLU max-pool, FC(200) ReLU, FC(K).
- ``small_vgg`` — two VGG-style blocks (conv-ReLU-conv-ReLU-max-pool) and a
  two-layer classifier, laid out like torchvision's VGG (``features``/``classifier``).
- ``small_resnet`` — a stem and two stages of torchvision ``BasicBlock``s, laid out
  like torchvision's ResNet (``layer1``, ``layer2``, ``fc``).

User models never go through pickle: ``package.module:factory`` plus a weights file
(safetensors, or a state dict read with ``torch.load(weights_only=True)``),
``torchvision:ARCH`` (random init, then the weights file), or ``torchscript:PATH``.

A source model's identity (``source_sha256``, what the manifest stores and the audit
checks) is the sha256 of its loaded state dict (``state_dict_sha256``): the same
weights give the same hash whether they came as safetensors, a ``.pt`` state dict,
a TorchScript file or a factory's own initialisation.
"""

from __future__ import annotations

import hashlib
import importlib
import warnings
from pathlib import Path
from typing import Callable

import torch
from torch import nn
from torchvision.models.resnet import BasicBlock

from hansgate.errors import ModelLoadError

__all__ = [
    "BUILTIN_MODELS",
    "MnistCNN",
    "SmallVGG",
    "SmallResNet",
    "build_builtin",
    "load_model",
    "load_state_dict_file",
    "state_dict_sha256",
    "source_sha256",
]


class MnistCNN(nn.Module):
    """Paper 000, Supp. Table 1, for ``in_channels x 28 x 28`` inputs."""

    def __init__(self, num_classes: int = 10, in_channels: int = 1, image_size: int = 28) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 8, 3)
        self.relu1 = nn.ReLU()
        self.pool1 = nn.MaxPool2d(2)
        self.conv2 = nn.Conv2d(8, 16, 5)
        self.relu2 = nn.ReLU()
        self.pool2 = nn.MaxPool2d(2)
        self.flatten = nn.Flatten()
        side = ((image_size - 2) // 2 - 4) // 2
        self.fc1 = nn.Linear(16 * side * side, 200)
        self.relu3 = nn.ReLU()
        self.fc2 = nn.Linear(200, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool1(self.relu1(self.conv1(x)))
        x = self.pool2(self.relu2(self.conv2(x)))
        return self.fc2(self.relu3(self.fc1(self.flatten(x))))


class SmallVGG(nn.Module):
    """Two VGG blocks and a classifier, in torchvision's VGG layout (in-place ReLUs)."""

    def __init__(self, num_classes: int = 10, in_channels: int = 1, image_size: int = 28) -> None:
        super().__init__()

        def block(cin: int, cout: int) -> list[nn.Module]:
            return [
                nn.Conv2d(cin, cout, 3, padding=1),
                nn.ReLU(inplace=True),
                nn.Conv2d(cout, cout, 3, padding=1),
                nn.ReLU(inplace=True),
                nn.MaxPool2d(2),
            ]

        self.features = nn.Sequential(*block(in_channels, 16), *block(16, 32))
        side = image_size // 4
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(32 * side * side, 128),
            nn.ReLU(inplace=True),
            nn.Dropout(0.25),
            nn.Linear(128, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


class SmallResNet(nn.Module):
    """A stem and two stages of torchvision ``BasicBlock``s, in torchvision's ResNet layout."""

    def __init__(self, num_classes: int = 10, in_channels: int = 1, image_size: int = 28) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 16, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.relu = nn.ReLU(inplace=True)
        self.layer1 = nn.Sequential(BasicBlock(16, 16), BasicBlock(16, 16))
        down = nn.Sequential(nn.Conv2d(16, 32, 1, stride=2, bias=False), nn.BatchNorm2d(32))
        self.layer2 = nn.Sequential(BasicBlock(16, 32, stride=2, downsample=down), BasicBlock(32, 32))
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(32, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer2(self.layer1(x))
        return self.fc(self.flatten(self.avgpool(x)))


BUILTIN_MODELS: dict[str, Callable[..., nn.Module]] = {
    "mnist_cnn": MnistCNN,
    "small_vgg": SmallVGG,
    "small_resnet": SmallResNet,
}


def build_builtin(name: str, num_classes: int = 10, in_channels: int = 1, image_size: int = 28) -> nn.Module:
    """A fresh, randomly initialised built-in model chosen by name."""
    try:
        factory = BUILTIN_MODELS[name]
    except KeyError:
        raise ModelLoadError(f"unknown built-in model {name!r}; choose from {sorted(BUILTIN_MODELS)}") from None
    return factory(num_classes=num_classes, in_channels=in_channels, image_size=image_size)


def load_state_dict_file(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a state dict without unpickling arbitrary objects (safetensors or ``weights_only``)."""
    path = Path(path)
    if not path.is_file():
        raise ModelLoadError(f"weights file not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except Exception as exc:  # safetensors raises several types for a bad header
            raise ModelLoadError(f"cannot read safetensors file {path}: {exc}") from exc
    try:
        with warnings.catch_warnings():  # torch's notes on pickle protocols would add lines to a one-line refusal
            warnings.simplefilter("ignore", UserWarning)
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # UnpicklingError for anything that is not plain tensors
        raise ModelLoadError(f"refused {path}: not a plain state dict of tensors (read with weights_only=True, never "
                             f"unpickled): {_first_reason(exc)}") from None
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ModelLoadError(f"{path} does not hold a state dict of tensors")
    return state


def _first_reason(exc: BaseException) -> str:
    """One line from an exception whose message may be paragraphs of advice (torch's unpickler's is)."""
    text = str(exc)
    marker = "WeightsUnpickler error:"
    if marker in text:
        text = text.split(marker, 1)[1]
    line = next((ln.strip() for ln in text.splitlines() if ln.strip()), type(exc).__name__)
    return line.split(". ")[0].rstrip(".")[:200]


def _apply_weights(model: nn.Module, weights: str | Path | None, spec: str) -> nn.Module:
    if weights is None:
        return model
    state = load_state_dict_file(weights)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        lines = [ln.strip() for ln in str(exc).strip().splitlines() if ln.strip()]
        detail = lines[1] if len(lines) > 1 else lines[0]
        raise ModelLoadError(f"weights {weights} do not fit model {spec}: {detail[:300]}") from exc
    return model


def load_model(spec: str, weights: str | Path | None = None, num_classes: int = 10, in_channels: int = 1,
               image_size: int = 28) -> nn.Module:
    """Load a model by specification, in eval mode on CPU.

    ``spec`` is one of ``NAME`` / ``builtin:NAME`` (built-ins), ``torchvision:ARCH``,
    ``torchscript:PATH``, or ``package.module:factory`` (called with no arguments).
    """
    kind, _, rest = spec.partition(":")
    if not rest and kind in BUILTIN_MODELS:
        kind, rest = "builtin", kind
    if kind == "builtin":
        model = build_builtin(rest, num_classes=num_classes, in_channels=in_channels, image_size=image_size)
    elif kind == "torchvision":
        import torchvision

        try:
            model = torchvision.models.get_model(rest, weights=None, num_classes=num_classes)
        except (ValueError, KeyError) as exc:
            raise ModelLoadError(f"unknown torchvision architecture {rest!r}") from exc
    elif kind == "torchscript":
        if not Path(rest).is_file():
            raise ModelLoadError(f"TorchScript file not found: {rest}")
        try:
            with warnings.catch_warnings():  # TorchScript is deprecated upstream; a user's file is still valid
                warnings.simplefilter("ignore", FutureWarning)
                model = torch.jit.load(rest, map_location="cpu")
        except Exception as exc:  # torch raises RuntimeError/ValueError for non-TorchScript files
            raise ModelLoadError(f"cannot load TorchScript file {rest}: {exc}") from exc
    elif rest and all(part.isidentifier() for part in kind.split(".")) and rest.isidentifier():
        try:
            factory = getattr(importlib.import_module(kind), rest)
        except (ImportError, AttributeError) as exc:
            raise ModelLoadError(f"cannot import model factory {spec!r}: {exc}") from exc
        if not callable(factory):
            raise ModelLoadError(f"{spec!r} is a {type(factory).__name__}, not a model factory")
        try:
            model = factory()
        except Exception as exc:  # any error of a user's factory: one line naming it
            raise ModelLoadError(f"model factory {spec!r} failed when called without arguments: "
                                 f"{type(exc).__name__}: {_first_reason(exc)}") from None
        if not isinstance(model, nn.Module):
            raise ModelLoadError(f"factory {spec!r} returned {type(model).__name__}, not a torch.nn.Module")
    else:
        raise ModelLoadError(
            f"cannot parse model spec {spec!r}; use NAME, torchvision:ARCH, torchscript:PATH or package.module:factory"
        )
    return _apply_weights(model, weights, spec).eval()


def state_dict_sha256(model: nn.Module | dict[str, torch.Tensor]) -> str:
    """sha256 over a state dict (sorted names, dtypes, shapes and raw bytes), 0-dim buffers included.

    ``model``: a module (its ``state_dict()``) or a state dict. BatchNorm's 0-dim
    ``num_batches_tracked`` is hashed as its one value's bytes.
    """
    state = model.state_dict() if isinstance(model, nn.Module) else model
    h = hashlib.sha256()
    for name, tensor in sorted(state.items()):
        t = tensor.detach().cpu().contiguous()
        h.update(name.encode())
        h.update(str(t.dtype).encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def source_sha256(spec: str, weights: str | Path | None, model: nn.Module) -> str:
    """The source model's identity for the manifest (module docstring): ``state_dict_sha256`` of the loaded model.

    ``spec`` and ``weights`` name where it came from; the hash does not depend on the file
    format, so the audit can check it from the model it loads (``load_model``).
    """
    del spec, weights  # the identity is the weights themselves, however they were stored
    return state_dict_sha256(model)

"""What an audit reads: labelled data, the subgroup attributes CSV, bundles and the source model.

Every problem ends in one ``hansgate.errors`` exception with a one-line reason, raised
before anything is written.

The attributes CSV (``--attributes``)
-------------------------------------
UTF-8, comma-separated, one header row, then **one row per sample of the data, in the
data's order** (row ``i`` describes ``x[i]``). Columns:

- ``index`` (optional): the sample's position ``0 .. N-1``; when present it must list
  every position exactly once (rows may then come in any order);
- one column per attribute, named like the manifest's attributes (``[A-Za-z0-9_]{1,64}``),
  values non-empty strings. Every attribute the bundle's manifest declares must be present
  and its values must be among the declared ones; undeclared extra attributes are audited
  too (at most 64 distinct values each, at most 16 attributes).

Example (the demo writes ``DIR/data/deploy_attributes.csv``)::

    index,site,stroke
    0,A,thin
    1,B,thick
"""

from __future__ import annotations

import csv
import re
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import numpy as np

from hansgate.bundle import Bundle
from hansgate.errors import DataError, ModelLoadError
from hansgate.manifest import Manifest

if TYPE_CHECKING:
    from torch import nn

__all__ = ["read_attributes", "write_attributes", "onnx_predictor", "normalize", "source_weights_path",
           "load_source_model", "tcav_sign_counts", "MAX_ATTRIBUTES", "MAX_VALUES"]

MAX_ATTRIBUTES = 16
MAX_VALUES = 64
_NAME = re.compile(r"^[A-Za-z0-9_]{1,64}$")


def read_attributes(path: str | Path, n_samples: int, manifest: Manifest | None = None) -> dict[str, np.ndarray]:
    """Read and validate the attributes CSV (format in the module docstring) -> ``{attribute: values [N]}``."""
    p = Path(path)
    if not p.is_file():
        raise DataError(f"attributes file not found: {p}")
    try:
        with open(p, newline="", encoding="utf-8") as fh:
            reader = csv.reader(fh)
            header = next(reader, None)
            rows = [r for r in reader if r]
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise DataError(f"cannot read attributes CSV {p}: {exc}") from exc
    if not header:
        raise DataError(f"{p}: empty file; expected a header row like 'index,site,stroke'")
    header = [h.strip() for h in header]
    if len(set(header)) != len(header):
        raise DataError(f"{p}: duplicate column names in header {header}")
    attrs = [h for h in header if h != "index"]
    if not attrs:
        raise DataError(f"{p}: no attribute columns in header {header}")
    bad = [h for h in attrs if not _NAME.match(h)]
    if bad:
        raise DataError(f"{p}: attribute column names must match [A-Za-z0-9_]{{1,64}}, got {bad}")
    if len(attrs) > MAX_ATTRIBUTES:
        raise DataError(f"{p}: at most {MAX_ATTRIBUTES} attributes, got {len(attrs)}")
    if len(rows) != n_samples:
        raise DataError(f"{p}: {len(rows)} rows, but the data has {n_samples} samples (one row per sample)")
    for i, r in enumerate(rows):
        if len(r) != len(header):
            raise DataError(f"{p}: row {i + 2} has {len(r)} fields, the header has {len(header)}")
    table = np.array([[v.strip() for v in r] for r in rows], dtype=object).reshape(len(rows), len(header))
    order = np.arange(n_samples)
    if "index" in header:
        col = table[:, header.index("index")]
        try:
            idx = np.array([int(v) for v in col])
        except ValueError:
            raise DataError(f"{p}: column 'index' must hold integers 0..{n_samples - 1}") from None
        if sorted(idx.tolist()) != list(range(n_samples)):
            raise DataError(f"{p}: column 'index' must list every sample 0..{n_samples - 1} exactly once")
        order = np.argsort(idx)
    declared = {a.name: a.values for a in manifest.subgroups} if manifest is not None else {}
    missing = sorted(set(declared) - set(attrs))
    if missing:
        raise DataError(f"{p}: the bundle declares attributes {missing} that the CSV lacks (columns: {header})")
    out: dict[str, np.ndarray] = {}
    for a in attrs:
        values = table[order, header.index(a)].astype(str)
        if (values == "").any():
            raise DataError(f"{p}: attribute {a!r} has empty values (row {int(np.flatnonzero(values == '')[0]) + 2})")
        distinct = sorted(set(values.tolist()))
        if a in declared:
            unknown = sorted(set(distinct) - set(declared[a]))
            if unknown:
                raise DataError(f"{p}: attribute {a!r} has values {unknown[:5]} that the bundle does not declare "
                                f"(allowed: {declared[a]})")
        elif len(distinct) > MAX_VALUES:
            raise DataError(f"{p}: attribute {a!r} has {len(distinct)} distinct values, at most {MAX_VALUES}")
        out[a] = values
    return out


def write_attributes(path: str | Path, attributes: dict[str, np.ndarray]) -> Path:
    """Write ``{attribute: values [N]}`` in the CSV format ``read_attributes`` reads (with ``index``)."""
    path = Path(path)
    names = list(attributes)
    n = len(next(iter(attributes.values())))
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(["index", *names])
        for i in range(n):
            w.writerow([i, *(str(attributes[a][i]) for a in names)])
    return path


def normalize(x: np.ndarray, manifest: Manifest) -> np.ndarray:
    """Apply the manifest's per-channel mean/std unless the graph does it itself."""
    spec = manifest.input
    if spec.normalization_in_graph:
        return x.astype(np.float32)
    mean = np.asarray(spec.mean, dtype=np.float32)[None, :, None, None]
    std = np.asarray(spec.std, dtype=np.float32)[None, :, None, None]
    return ((x - mean) / std).astype(np.float32)


def onnx_predictor(bundle: Bundle, batch_size: int | None = None,
                   outputs: tuple[str, ...] = ("logits",)) -> Callable[[np.ndarray], np.ndarray]:
    """``x [N, C, H, W]`` (raw, in the manifest's value range) -> logits ``[N, K]`` through onnxruntime (CPU);
    with several ``outputs`` (e.g. ``("logits", "concept_sensitivity")``) a tuple of arrays in that order.
    ``batch_size`` ``None``: ``nn.training.forward_batch_size`` of the input (at most 256), so that
    onnxruntime's activations stay bounded at 224 px."""
    import onnxruntime as ort

    from hansgate.nn.training import forward_batch_size

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    session = ort.InferenceSession(str(bundle.onnx_path), opts, providers=["CPUExecutionProvider"])
    manifest = bundle.manifest
    expected = tuple(manifest.input.shape)
    step = batch_size or forward_batch_size(int(np.prod(expected)), cap=256)

    def predict(x: np.ndarray) -> np.ndarray:
        if tuple(x.shape[1:]) != expected:
            raise DataError(f"data samples have shape {tuple(x.shape[1:])}, the bundle expects {expected}")
        if len(x) == 0:
            raise DataError("no samples to run the bundle on")
        xn = normalize(np.asarray(x, dtype=np.float32), manifest)
        parts = [session.run(list(outputs), {manifest.graph.input_name: xn[i : i + step]})
                 for i in range(0, len(xn), step)]
        joined = tuple(np.concatenate([p[j] for p in parts]) for j in range(len(outputs)))
        # several outputs come back as a tuple of arrays (callers unpack them)
        return joined[0] if len(outputs) == 1 else joined  # type: ignore[return-value]

    return predict


def source_weights_path(bundle: Bundle, override: str | Path | None = None) -> Path | None:
    """Where the source model's weights are: ``override``, or ``manifest.source_model.weights`` next to the
    bundle directory or inside it (as recorded, then by file name), or as recorded (absolute, or relative
    to the working directory, as ``hansgate refine`` was given it); ``None`` when none of these exists."""
    if override is not None:
        p = Path(override)
        if not p.is_file():
            raise ModelLoadError(f"source weights not found: {p}")
        return p
    name = bundle.manifest.source_model.weights
    if not name:
        return None
    recorded = Path(name)
    candidates = [base / rel for base in (bundle.path.parent, bundle.path) for rel in (recorded, Path(recorded.name))]
    for path in [*candidates, recorded]:
        if path.is_file():
            return path
    return None


def load_source_model(bundle: Bundle, weights: Path) -> nn.Module:
    """The bundle's source model as a torch module (never unpickled), checked against the manifest's hash.

    The hash is the one the refine side records (``nn.models.source_sha256``: the weights file's
    sha256); bundles that record the state dict's hash instead (``hansgate demo``) match on that.
    """
    from hansgate.nn.models import load_model, source_sha256, state_dict_sha256

    m = bundle.manifest
    spec = m.source_model.spec
    name = spec.split(":", 1)[1] if spec.startswith("builtin:") else spec
    model = load_model(name, weights=weights, num_classes=len(m.classes), in_channels=m.input.channels,
                       image_size=m.input.height)
    digest = source_sha256(spec, weights, model)
    if digest != m.source_model.sha256 and state_dict_sha256(model) != m.source_model.sha256:
        raise ModelLoadError(f"source model weights {weights} have sha256 {digest[:12]}..., the manifest says "
                             f"{m.source_model.sha256[:12]}...; they are not the model this bundle was refined from")
    return model


def tcav_sign_counts(logits: np.ndarray, sensitivity: np.ndarray, concepts: list[str],
                     classes: list[str]) -> tuple[dict[tuple[str, str], int], dict[tuple[str, str], int]]:
    """TCAV sign counts as the gateway counts them: each sample counts for its *predicted* class ``k``,
    positive when ``sensitivity[n, m, k] > 0`` (Kim et al. 2018, Eq. 2). ``logits [N, K]``,
    ``sensitivity [N, M, K]`` (the bundle's ``concept_sensitivity``). Returns ``(positive, samples)``
    keyed ``(concept, class)``, the inputs of ``audit.compliance.tcav_table``."""
    pred = logits.argmax(1)
    own = sensitivity[np.arange(len(pred)), :, pred] > 0  # [N, M]
    positive: dict[tuple[str, str], int] = {}
    samples: dict[tuple[str, str], int] = {}
    for k, cls in enumerate(classes):
        rows = pred == k
        if not rows.any():
            continue
        for m, concept in enumerate(concepts):
            samples[(concept, cls)] = int(rows.sum())
            positive[(concept, cls)] = int(own[rows, m].sum())
    return positive, samples

"""ONNX export of a refined model and the torch-vs-onnxruntime check (DESIGN.md, the bundle).

The exported graph has input ``input`` ``[N, C, H, W]`` (dynamic batch) and the outputs
the manifest declares, in that order: ``logits`` and, when concepts are registered,
``concept_scores`` and ``concept_sensitivity``. ``export_checked`` runs the graph on
real samples with onnxruntime and refuses (``ExportError``) when the largest absolute
difference on the logits exceeds the tolerance (1e-4 by default).
"""

from __future__ import annotations

import tempfile
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

from hansgate.errors import ExportError
from hansgate.nn.training import forward_batch_size

__all__ = ["OPSET", "LOGIT_TOLERANCE", "export_onnx", "run_onnx", "export_checked"]

OPSET = 18
LOGIT_TOLERANCE = 1e-4


def export_onnx(graph: nn.Module, example: torch.Tensor, output_names: list[str]) -> bytes:
    """Serialise ``graph`` (eval mode) to ONNX bytes with a dynamic batch axis."""
    graph = graph.eval()
    batch = torch.export.Dim("batch", min=1, max=1 << 16)
    example = example[:2] if len(example) >= 2 else torch.cat([example, example])
    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")  # exporter chatter (deprecations inside torch.onnx)
        path = Path(tmp) / "model.onnx"
        try:
            torch.onnx.export(graph, (example,), str(path), input_names=["input"], output_names=output_names,
                              dynamic_shapes=({0: batch},), opset_version=OPSET, dynamo=True,
                              external_data=False, verbose=False)
        except Exception as exc:  # the exporter raises many types; the user needs one line
            raise ExportError(f"ONNX export failed: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") \
                from exc
        return path.read_bytes()


def run_onnx(onnx_bytes: bytes, x: np.ndarray, batch_size: int | None = None) -> list[np.ndarray]:
    """Run an ONNX graph on CPU with onnxruntime, batched; returns every output, concatenated.

    The default batch is ``nn.training.forward_batch_size`` (bounded activation memory at large image sizes).
    """
    import onnxruntime as ort

    if batch_size is None:
        batch_size = forward_batch_size(int(np.prod(x.shape[1:])), cap=256)
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    # a one-off check: no arena kept for the activations, no pre-packed second copy of the weights
    opts.enable_cpu_mem_arena = False
    opts.add_session_config_entry("session.disable_prepacking", "1")
    sess = ort.InferenceSession(onnx_bytes, opts, providers=["CPUExecutionProvider"])
    parts = [sess.run(None, {"input": x[i : i + batch_size]}) for i in range(0, len(x), batch_size)]
    return [np.concatenate([p[j] for p in parts]) for j in range(len(parts[0]))]


def export_checked(graph: nn.Module, x_check: torch.Tensor, output_names: list[str],
                   tolerance: float = LOGIT_TOLERANCE) -> tuple[bytes, float]:
    """Export, then compare logits with torch on ``x_check``; returns ``(onnx_bytes, max_abs_diff)``."""
    if len(x_check) == 0:
        raise ExportError("no samples to check the export on")
    onnx_bytes = export_onnx(graph, x_check, output_names)
    batch = forward_batch_size(int(x_check[0].numel()), cap=256)
    parts = []
    with torch.no_grad():
        graph.eval()
        for i in range(0, len(x_check), batch):  # batched: activation memory bounded at large image sizes
            ref = graph(x_check[i : i + batch])
            parts.append((ref[0] if isinstance(ref, (tuple, list)) else ref).numpy())
    ref_logits = np.concatenate(parts)
    got = run_onnx(onnx_bytes, x_check.numpy().astype(np.float32, copy=False))[0]
    diff = float(np.abs(got - ref_logits).max())
    if not np.isfinite(diff) or diff > tolerance:
        raise ExportError(f"exported graph disagrees with torch: max |logit difference| {diff:.3g} > {tolerance:g}; "
                          "no bundle written")
    return onnx_bytes, diff

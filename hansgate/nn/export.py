"""ONNX export of a refined model and the torch-vs-onnxruntime check (DESIGN.md, the bundle).

The exported graph has input ``input`` ``[N, C, H, W]`` (dynamic batch) and the outputs
the manifest declares, in that order: ``logits`` and, when concepts are registered,
``concept_scores`` and ``concept_sensitivity``. ``export_checked`` runs the graph on
real samples with onnxruntime and refuses (``ExportError``) when the largest absolute
difference on the logits exceeds ``allowed_difference``: the tolerance (1e-4 by default) times
the largest logit's size when that exceeds 1, since float32 rounding grows with the values
(a model with logits in the hundreds differs by more than 1e-4 from rounding alone).
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

__all__ = ["OPSET", "LOGIT_TOLERANCE", "allowed_difference", "export_onnx", "run_onnx", "export_checked",
           "export_checked_to"]

OPSET = 18
LOGIT_TOLERANCE = 1e-4


def allowed_difference(reference: np.ndarray, tolerance: float = LOGIT_TOLERANCE) -> float:
    """The largest |logit difference| two runs of one model may show: ``tolerance * max(1, max |reference|)``."""
    size = float(np.abs(reference).max()) if reference.size else 0.0
    return tolerance * max(1.0, size) if np.isfinite(size) else 0.0


def export_onnx(graph: nn.Module, example: torch.Tensor, output_names: list[str]) -> bytes:
    """Serialise ``graph`` (eval mode) to ONNX bytes with a dynamic batch axis (``torch.onnx.export``, dynamo).

    The bytes are one self-contained ONNX file, written by ``_single_file`` with each weight
    copied once, straight from the model's tensors (torch's own ``save`` holds two to three
    copies of all weights at once, which dominates refine memory for large models).
    """
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "model.onnx"
        _export_file(graph, example, output_names, path)
        return path.read_bytes()


def _export_file(graph: nn.Module, example: torch.Tensor, output_names: list[str], path: Path) -> None:
    """``export_onnx`` into the file ``path``."""
    graph = graph.eval()
    batch = torch.export.Dim("batch", min=1, max=1 << 16)
    example = example[:2] if len(example) >= 2 else torch.cat([example, example])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # exporter chatter (deprecations inside torch.onnx)
        try:
            program = torch.onnx.export(graph, (example,), None, input_names=["input"], output_names=output_names,
                                        dynamic_shapes=({0: batch},), opset_version=OPSET, dynamo=True,
                                        verbose=False)
            assert program is not None
            _single_file(program.model, path)
        except Exception as exc:  # the exporter raises many types; the user needs one line
            raise ExportError(f"ONNX export failed: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") \
                from exc
        del program


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _field(number: int, payload_len: int) -> bytes:
    """The key and length of a length-delimited protobuf field (wire type 2)."""
    return _varint(number << 3 | 2) + _varint(payload_len)


def _single_file(model: object, path: Path) -> None:
    """Write an ``onnx_ir`` model to ``path`` as one ONNX file, each initializer streamed from its tensor.

    The model without initializers is serialised as usual; each initializer follows as a
    further ``ModelProto.graph`` (field 7) holding one ``GraphProto.initializer`` (field 5): a
    ``TensorProto`` with ``dims`` (1), ``data_type`` (2), ``name`` (8) and ``raw_data`` (9,
    little-endian). Protobuf merges repeated occurrences of a message field, so every reader
    (onnx, onnxruntime) sees one graph with all initializers.
    """
    from onnx_ir import serde

    inits = model.graph.initializers  # type: ignore[attr-defined]
    held = list(inits.items())
    for name, _ in held:
        inits.pop(name)
    try:
        head = serde.serialize_model(model).SerializeToString()  # type: ignore[arg-type]
    finally:
        for name, value in held:
            inits[name] = value
    with open(path, "wb") as fh:
        fh.write(head)
        for name, value in held:
            tensor = value.const_value
            raw = np.ascontiguousarray(tensor.numpy()).reshape(-1).view(np.uint8)
            meta = b"".join(_varint(1 << 3) + _varint(int(d) & (2**64 - 1)) for d in tensor.shape.dims)
            meta += _varint(2 << 3) + _varint(int(tensor.dtype))
            name_bytes = name.encode()
            meta += _field(8, len(name_bytes)) + name_bytes + _field(9, raw.nbytes)
            proto_len = len(meta) + raw.nbytes
            graph_len = len(_field(5, proto_len)) + proto_len
            fh.write(_field(7, graph_len) + _field(5, proto_len) + meta)
            fh.write(raw.data)


def run_onnx(onnx_bytes: bytes | Path, x: np.ndarray, batch_size: int | None = None) -> list[np.ndarray]:
    """Run an ONNX graph (bytes or a file) on CPU with onnxruntime, batched; returns every output, concatenated.

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
    model = str(onnx_bytes) if isinstance(onnx_bytes, Path) else onnx_bytes
    sess = ort.InferenceSession(model, opts, providers=["CPUExecutionProvider"])
    parts = [sess.run(None, {"input": x[i : i + batch_size]}) for i in range(0, len(x), batch_size)]
    return [np.concatenate([p[j] for p in parts]) for j in range(len(parts[0]))]


def _trim_heap() -> None:
    """Return freed heap memory to the system (glibc ``malloc_trim``; a no-op elsewhere).

    Why: freed blocks of a large session otherwise stay in the process's heap, and its peak
    resident memory grows by them when the next large buffer is allocated.
    """
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    try:
        ctypes.CDLL(name).malloc_trim(0) if name else None
    except (OSError, AttributeError):  # not glibc
        pass


def export_checked_to(path: Path, graph: nn.Module, x_check: torch.Tensor, output_names: list[str],
                      tolerance: float = LOGIT_TOLERANCE) -> float:
    """Export to ``path``, then compare logits with torch on ``x_check``; returns the max |logit difference|.

    The graph stays a file: onnxruntime reads it from there, and a caller that writes a bundle
    copies it from there, so a large model's serialized weights are never held in memory.
    """
    if len(x_check) == 0:
        raise ExportError("no samples to check the export on")
    batch = forward_batch_size(int(x_check[0].numel()), cap=256)
    _export_file(graph, x_check, output_names, path)
    parts = []
    with torch.no_grad():
        graph.eval()
        for i in range(0, len(x_check), batch):  # batched: activation memory bounded at large image sizes
            ref = graph(x_check[i : i + batch])
            parts.append((ref[0] if isinstance(ref, (tuple, list)) else ref).numpy())
    ref_logits = np.concatenate(parts)
    got = run_onnx(path, x_check.numpy().astype(np.float32, copy=False))[0]
    _trim_heap()  # the session's freed weights and arena go back to the system
    diff = float(np.abs(got - ref_logits).max())
    allowed = allowed_difference(ref_logits, tolerance)
    if not np.isfinite(diff) or diff > allowed:
        raise ExportError(f"exported graph disagrees with torch: max |logit difference| {diff:.3g} > "
                          f"{allowed:.3g} ({tolerance:g} x max(1, max |logit|)); no bundle written")
    return diff


def export_checked(graph: nn.Module, x_check: torch.Tensor, output_names: list[str],
                   tolerance: float = LOGIT_TOLERANCE) -> tuple[bytes, float]:
    """``export_checked_to`` a temporary file; returns ``(onnx_bytes, max_abs_diff)`` (the bytes are read
    after the check, so the session's copy of the weights and the bytes are never in memory together)."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "model.onnx"
        diff = export_checked_to(path, graph, x_check, output_names, tolerance)
        return path.read_bytes(), diff

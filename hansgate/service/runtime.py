"""The onnxruntime session of a bundle: provider choice, the check of what runs, IO binding.

onnxruntime-gpu lists ``CUDAExecutionProvider`` as available whether or not a GPU and
its libraries are there, and when CUDA cannot start it falls back to CPU with only a log
line. So the gateway (1) asks for CUDA only when the CUDA driver reports a device
(``cuda_device_count``), (2) reads the providers the session actually uses after
creating it, and (3) exports that as the ``provider`` label of ``hansgate_model_info``.
``provider="cuda"`` turns a fall-back into a start-up error instead.

On CUDA, ``OnnxRuntime.run`` uses IO binding: the input is copied to the device once and
the outputs are bound to host memory, which saves onnxruntime's per-call staging copies.
"""

from __future__ import annotations

import ctypes
import logging
from dataclasses import dataclass
from typing import Literal

import numpy as np

from hansgate.bundle import Bundle
from hansgate.errors import BundleError, ConfigError, ModelRunError

__all__ = ["CPU", "CUDA", "cuda_device_count", "select_providers", "provider_in_use", "Outputs", "OnnxRuntime"]

log = logging.getLogger("hansgate.service")

CPU = "CPUExecutionProvider"
CUDA = "CUDAExecutionProvider"


def cuda_device_count() -> int:
    """Number of CUDA devices the driver reports (0 without a driver or device)."""
    for name in ("libcuda.so.1", "libcuda.so"):
        try:
            lib = ctypes.CDLL(name)
        except OSError:
            continue
        try:
            if lib.cuInit(0) != 0:
                return 0
            count = ctypes.c_int(0)
            if lib.cuDeviceGetCount(ctypes.byref(count)) != 0:
                return 0
            return int(count.value)
        except AttributeError:
            return 0
    return 0


def select_providers(preference: Literal["auto", "cuda", "cpu"], available: list[str],
                     cuda_devices: int) -> list[str]:
    """The provider list to ask onnxruntime for, best first (CPU always last as the fall-back).

    ``auto``: CUDA when onnxruntime has it and a device exists; ``cuda``: CUDA or a
    ``ConfigError``; ``cpu``: CPU only.
    """
    cuda_ok = CUDA in available and cuda_devices > 0
    if preference == "cpu":
        return [CPU]
    if preference == "cuda" and not cuda_ok:
        why = "onnxruntime has no CUDA provider" if CUDA not in available else "no CUDA device is visible"
        raise ConfigError(f"HANSGATE_PROVIDER=cuda, but {why}")
    return [CUDA, CPU] if cuda_ok else [CPU]


def provider_in_use(requested: list[str], active: list[str], preference: str) -> str:
    """The provider the session really runs on; refuses a silent fall-back when CUDA was demanded."""
    if not active:
        raise BundleError("onnxruntime session reports no execution provider")
    used = active[0]
    if requested[0] != used:
        if preference == "cuda":
            raise ConfigError(f"asked for {requested[0]}, but onnxruntime runs on {used}")
        log.warning("onnxruntime fell back from %s to %s", requested[0], used)
    return used


def _logits_only(bundle: Bundle) -> bytes:
    """The bundle's (verified) graph without the nodes only the concept heads need."""
    import onnx
    from onnx.utils import Extractor

    model = onnx.load(str(bundle.onnx_path))
    sub = Extractor(model).extract_model([bundle.manifest.graph.input_name], ["logits"])
    return sub.SerializeToString()


@dataclass(frozen=True)
class Outputs:
    """One run's outputs; concept arrays are ``None`` when the bundle has no concepts."""

    logits: np.ndarray  # [N, K]
    concept_scores: np.ndarray | None  # [N, M]
    concept_sensitivity: np.ndarray | None  # [N, M, K]

    @staticmethod
    def concatenate(runs: list["Outputs"]) -> "Outputs":
        """The outputs of consecutive runs as those of one run over all their rows."""
        if len(runs) == 1:
            return runs[0]

        def joined(parts: list[np.ndarray | None]) -> np.ndarray | None:
            present = [p for p in parts if p is not None]
            return np.concatenate(present) if present else None

        return Outputs(np.concatenate([r.logits for r in runs]), joined([r.concept_scores for r in runs]),
                       joined([r.concept_sensitivity for r in runs]))


class OnnxRuntime:
    """An onnxruntime session over a verified bundle.

    ``monitoring=False`` runs the graph cut down to ``logits`` (the concept heads' nodes are
    removed, not merely left unfetched), the "monitoring off" configuration of the overhead
    benchmark. ``memory_patterns``: onnxruntime's per-shape memory plans (``GatewayConfig.ort_memory_patterns``).
    """

    def __init__(self, bundle: Bundle, preference: Literal["auto", "cuda", "cpu"] = "auto", threads: int = 1,
                 monitoring: bool = True, cuda_devices: int | None = None, memory_patterns: bool = False) -> None:
        import onnxruntime as ort

        self.bundle = bundle
        self.manifest = bundle.manifest
        devices = cuda_device_count() if cuda_devices is None else cuda_devices
        self.requested_ = select_providers(preference, ort.get_available_providers(), devices)
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
        # off by default: faster runs, more memory held (config.GatewayConfig.ort_memory_patterns)
        opts.enable_mem_pattern = memory_patterns
        opts.log_severity_level = 3
        self.has_concepts = bool(self.manifest.concepts)
        graph: str | bytes = str(bundle.onnx_path)
        if not monitoring and self.has_concepts:
            graph = _logits_only(bundle)
        try:
            self.session_ = ort.InferenceSession(graph, opts, providers=self.requested_)
        except Exception as exc:  # onnxruntime raises its own exception types
            raise BundleError(f"onnxruntime cannot load {bundle.onnx_path}: {str(exc).splitlines()[0]}") from exc
        self.provider_ = provider_in_use(self.requested_, self.session_.get_providers(), preference)
        log.info("onnxruntime runs %s on %s (threads=%d)", bundle.onnx_path, self.provider_, threads)
        self.output_names_ = ["logits"] + (["concept_scores", "concept_sensitivity"]
                                           if monitoring and self.has_concepts else [])
        self.input_name = self.manifest.graph.input_name
        self._io_binding = self.provider_ == CUDA

    def run(self, x: np.ndarray) -> Outputs:
        """Run on ``x`` ``[N, C, H, W]`` float32 (already preprocessed)."""
        try:
            if self._io_binding:
                outs = self._run_bound(x)
            else:
                outs = self.session_.run(self.output_names_, {self.input_name: x})
        except Exception as exc:
            raise ModelRunError(f"onnxruntime failed: {str(exc).splitlines()[0] if str(exc) else exc!r}") from exc
        if len(outs) == 3:
            return Outputs(outs[0], outs[1], outs[2])
        return Outputs(outs[0], None, None)

    def _run_bound(self, x: np.ndarray) -> list[np.ndarray]:
        import onnxruntime as ort

        binding = self.session_.io_binding()
        binding.bind_ortvalue_input(self.input_name, ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(x), "cuda", 0))
        for name in self.output_names_:
            binding.bind_output(name, "cpu")
        self.session_.run_with_iobinding(binding)
        return binding.copy_outputs_to_cpu()

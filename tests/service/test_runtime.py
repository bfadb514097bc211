"""hansgate.service.runtime: provider choice, the check of the provider in use, outputs vs onnxruntime."""

from __future__ import annotations

import sys

import numpy as np
import pytest

from hansgate.bundle import load_bundle
from hansgate.errors import ConfigError
from hansgate.service.runtime import (
    CPU,
    CUDA,
    OnnxRuntime,
    cuda_device_count,
    provider_in_use,
    select_providers,
)


@pytest.mark.parametrize("pref, available, devices, expected", [
    ("auto", [CUDA, CPU], 1, [CUDA, CPU]),
    ("auto", [CUDA, CPU], 0, [CPU]),          # onnxruntime-gpu without a device: do not ask for CUDA
    ("auto", [CPU], 2, [CPU]),
    ("cpu", [CUDA, CPU], 1, [CPU]),
    ("cuda", [CUDA, CPU], 1, [CUDA, CPU]),
])
def test_select_providers(pref, available, devices, expected):
    assert select_providers(pref, available, devices) == expected


def test_cuda_demanded_but_unusable_is_refused():
    with pytest.raises(ConfigError, match="no CUDA device"):
        select_providers("cuda", [CUDA, CPU], 0)
    with pytest.raises(ConfigError, match="no CUDA provider"):
        select_providers("cuda", [CPU], 1)


def test_silent_fallback_is_detected(caplog):
    assert provider_in_use([CUDA, CPU], [CPU], "auto") == CPU
    assert "fell back" in caplog.text
    with pytest.raises(ConfigError, match="runs on CPUExecutionProvider"):
        provider_in_use([CUDA, CPU], [CPU], "cuda")
    assert provider_in_use([CPU], [CPU], "cpu") == CPU


def test_cuda_device_count_is_an_int():
    assert cuda_device_count() >= 0


def test_runtime_matches_plain_onnxruntime(concept_bundle):
    import onnxruntime as ort

    bundle = load_bundle(concept_bundle)
    rt = OnnxRuntime(bundle, "auto", threads=1, cuda_devices=0)
    assert rt.provider_ == CPU
    x = np.random.default_rng(0).random((5, 1, 8, 8), dtype=np.float32)
    out = rt.run(x)
    ref = ort.InferenceSession(str(bundle.onnx_path), providers=[CPU]).run(None, {"input": x})
    np.testing.assert_allclose(out.logits, ref[0], rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(out.concept_scores, ref[1], rtol=1e-6, atol=1e-6)
    assert out.concept_sensitivity.shape == (5, 2, 3)
    off_rt = OnnxRuntime(bundle, "cpu", threads=1, monitoring=False)
    off = off_rt.run(x)
    assert off.concept_scores is None and np.allclose(off.logits, out.logits)
    assert [o.name for o in off_rt.session_.get_outputs()] == ["logits"]  # the heads are cut from the graph


def test_memory_patterns_are_a_setting_off_by_default(concept_bundle):
    """``HANSGATE_ORT_MEMORY_PATTERNS`` reaches onnxruntime's session (off unless set); runs give the same
    outputs either way, at every batch size."""
    from hansgate.service.config import GatewayConfig

    bundle = load_bundle(concept_bundle)
    assert GatewayConfig(bundle=concept_bundle).ort_memory_patterns is False
    assert GatewayConfig.from_env({"HANSGATE_BUNDLE": str(concept_bundle),
                                   "HANSGATE_ORT_MEMORY_PATTERNS": "1"}).ort_memory_patterns is True
    plain = OnnxRuntime(bundle, "cpu", threads=1)
    planned = OnnxRuntime(bundle, "cpu", threads=1, memory_patterns=True)
    assert not plain.session_.get_session_options().enable_mem_pattern
    assert planned.session_.get_session_options().enable_mem_pattern
    x = np.random.default_rng(1).random((7, 1, 8, 8), dtype=np.float32)
    for n in (7, 1, 3, 7):
        a, b = plain.run(x[:n]), planned.run(x[:n])
        np.testing.assert_array_equal(a.logits, b.logits)
        np.testing.assert_array_equal(a.concept_sensitivity, b.concept_sensitivity)


def test_service_package_is_torch_free():
    import subprocess

    code = ("import sys, service, service.app, service.gateway; "
            "assert 'torch' not in sys.modules, 'torch imported'; "
            "assert 'prometheus_client' not in sys.modules, 'prometheus_client imported at import time'")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr

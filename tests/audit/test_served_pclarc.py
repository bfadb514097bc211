"""The audit explains a P-ClArC bundle's served model: its projection rebuilt from the bundle, checked on the graph.

An ``mnist_cnn`` briefly trained on embedded digits where every class-8 image carries the corner
(a Clever-Hans model) is refined with P-ClArC through ``hansgate refine``'s pipeline (paper 001,
Eq. 3: a projection after the concept layer). The bundle carries the refined weights with the
projection's CAV and target; the audit rebuilds that module, compares it with ``model.onnx`` and
explains it. A changed byte of the weights, or a re-hashed projection target that no longer
matches the graph, refuses the audit (mirrors ``test_served.py`` for PCA-EGEM).

200 refinement samples: with finite-difference heads (before the projection had an ``nn.jvp``
rule) a few of them crossed ReLU kinks within the step and the export was refused.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from hansgate.audit.config import AuditConfig
from hansgate.audit.inputs import write_attributes
from hansgate.audit.loading import AuditSources, load_inputs
from hansgate.audit.runner import run_audit
from hansgate.audit.served import SERVED, SOURCE, rebuild_served, served_model
from hansgate.bundle import MANIFEST_FILE, load_bundle, sha256_file
from hansgate.data.datasets import save_npz
from hansgate.errors import BundleError, BundleHashError
from hansgate.nn.models import build_builtin
from hansgate.nn.training import TrainConfig, train_classifier

N = 60


@pytest.fixture(scope="module")
def pclarc(tmp_path_factory, digits_data) -> dict[str, Path]:
    from hansgate.refinement.pipeline import refine_from_files

    root = tmp_path_factory.mktemp("pclarc")
    d = digits_data
    torch.manual_seed(0)
    idx = torch.randperm(len(d.y_train), generator=torch.Generator().manual_seed(0))[:1000]
    x, y = d.x_train[idx], d.y_train[idx]
    model = train_classifier(build_builtin("mnist_cnn"), d.artifact.apply_where(x, y == 8), y, TrainConfig(epochs=3))
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(root / "w.safetensors"))
    classes = [str(c) for c in d.classes]
    save_npz(root / "refine.npz", d.x_refine[:200], d.y_refine[:200], classes)
    clean = d.x_refine[200:220]
    np.savez(root / "corner.npz", x=torch.cat([clean, d.artifact.apply(clean)]).numpy(),
             y=torch.cat([d.y_refine[200:220]] * 2).numpy(), concept=np.arange(40) >= 20)
    refine_from_files(model_spec="mnist_cnn", weights=str(root / "w.safetensors"), data=str(root / "refine.npz"),
                      out=root / "bundle", method="p-clarc", concepts={"corner": str(root / "corner.npz")},
                      calibration_share=0.0)
    data = save_npz(root / "audit.npz", d.x_test[:N], d.y_test[:N], classes)
    attrs = write_attributes(root / "attrs.csv", {"site": np.where(np.arange(N) % 2 == 0, "A", "B")})
    return {"root": root, "bundle": root / "bundle", "data": data, "attributes": attrs}


def _config() -> AuditConfig:
    return AuditConfig(heatmaps=4, concepts=True, tcav_runs=2, influence=False, artifacts=("corner",), pdf=False,
                       min_samples=5)


def _sources(p: dict[str, Path], bundle: Path | None = None) -> AuditSources:
    return AuditSources(bundle=bundle or p["bundle"], data=p["data"], attributes=p["attributes"])


def test_p_clarc_bundle_carries_the_projection(pclarc):
    b = load_bundle(pclarc["bundle"])
    spec = b.manifest.refined
    assert b.manifest.method.name == "p-clarc" and spec is not None and b.refined_path is not None
    assert sha256_file(b.refined_path) == spec.sha256
    assert [(u.layer, u.kind, u.options) for u in spec.inserted] == [
        ("conv2", "clarc_projection", {"dim": 16, "pooling": "max"})]
    state = load_file(str(b.refined_path))
    target = b.manifest.method.hyperparameters["target_length"]
    assert float(state["conv2.refiner.target"]) == pytest.approx(target, rel=1e-6)
    # the watched concept sits before the projection: its heads differentiate through it exactly
    assert [c.sensitivity_method for c in b.manifest.concepts] == ["jvp"]


def test_audit_explains_the_served_p_clarc_model(pclarc):
    audit = run_audit(load_inputs(_sources(pclarc)), _config())
    report = audit.as_dict()
    assert report["served"]["status"] == "rebuilt" and report["served"]["explains"] == SERVED
    assert report["served"]["max_abs_logit_diff"] <= report["served"]["tolerance"]
    assert "before" in report["accuracy"] and "after" in report["accuracy"]
    assert report["attributions"]["explains"] == {"before": SOURCE, "after": SERVED}
    assert report["concepts"]["model"] == "after" and report["concepts"]["explains"] == SERVED
    heat = audit.figure_data().heatmaps  # the projection changes the relevance: these are the served model's
    assert heat is not None and not np.allclose(heat.rows["before"], heat.rows["after"])


def test_the_rebuilt_module_projects_as_the_graph_does(pclarc):
    """Without the source's weights: every tensor, the projection's CAV and target included, comes from the bundle;
    at the concept layer each sample's max-pooled length along the CAV is the target (Eq. 3)."""
    from hansgate.concepts.cav import layer_activations, pool_channels

    b = load_bundle(pclarc["bundle"])
    x = torch.from_numpy(np.load(pclarc["data"])["x"])
    res = served_model(b, x, source_model=None)
    assert res.status == "rebuilt" and res.samples == N and res.max_abs_logit_diff is not None
    assert res.max_abs_logit_diff <= 1e-4
    assert res.module is not None
    unit = res.module.get_submodule("conv2.refiner")
    lengths = pool_channels(layer_activations(res.module, "conv2", x), "max") @ unit.cav
    assert torch.allclose(lengths, torch.full_like(lengths, float(unit.target)), atol=1e-4)


def test_one_changed_byte_of_the_p_clarc_weights_refuses_the_audit(pclarc, tmp_path):
    bundle = Path(shutil.copytree(pclarc["bundle"], tmp_path / "bundle"))
    weights = bundle / "refined.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0x01
    weights.write_bytes(bytes(data))
    with pytest.raises(BundleHashError, match="refined.safetensors sha256"):
        load_inputs(_sources(pclarc, bundle))
    ok = load_bundle(pclarc["bundle"])  # loaded before the change: the audit re-checks the file itself
    with pytest.raises(BundleHashError):
        rebuild_served(type(ok)(bundle, ok.manifest))


def test_a_re_hashed_projection_that_disagrees_with_the_graph_refuses_the_audit(pclarc, tmp_path):
    """The projection's target moved *and* re-hashed into the (unsigned) manifest: the rebuilt module is no
    longer the graph, and the audit refuses rather than explain it; a missing CAV is one line too."""
    bundle = Path(shutil.copytree(pclarc["bundle"], tmp_path / "bundle"))
    weights = bundle / "refined.safetensors"
    raw = json.loads((bundle / MANIFEST_FILE).read_text())

    def write(state: dict[str, torch.Tensor]) -> None:
        save_file(state, str(weights))
        raw["refined"]["sha256"] = sha256_file(weights)
        (bundle / MANIFEST_FILE).write_text(json.dumps(raw))

    state = load_file(str(weights))
    write({**state, "conv2.refiner.target": state["conv2.refiner.target"] + 5.0})
    with pytest.raises(BundleError, match="disagrees with model.onnx"):
        run_audit(load_inputs(_sources(pclarc, bundle)), _config())
    write({k: v for k, v in state.items() if k != "conv2.refiner.cav"})
    with pytest.raises(BundleError, match='Missing key.*"conv2.refiner.cav"'):
        run_audit(load_inputs(_sources(pclarc, bundle)), _config())

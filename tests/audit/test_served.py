"""The audit explains the served model: rebuilt from the bundle's refined weights, checked against its graph.

A BatchNorm model (the built-in ``small_resnet``, 3x16x16, ``--mean/--std``) is refined with
PCA-EGEM through ``hansgate refine``'s pipeline on data labelled with its own predictions. The
audit rebuilds the refined module, compares it with ``model.onnx``, and its heatmaps and TCAV
name the model they explain; one changed byte of the weights, or weights that fit the manifest's
hash but not the graph, refuse the audit; a schema 1.1 bundle is audited by its predictions.
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
from hansgate.audit.report import write_report
from hansgate.audit.runner import run_audit
from hansgate.audit.served import SERVED, SOURCE, rebuild_served, served_model
from hansgate.bundle import MANIFEST_FILE, load_bundle, sha256_file
from hansgate.data.datasets import save_npz
from hansgate.errors import BundleError, BundleHashError
from hansgate.nn.models import build_builtin
from hansgate.nn.normalisation import Normalised
from hansgate.nn.training import predict_logits

MEAN, STD = [0.4, 0.5, 0.6], [0.2, 0.25, 0.3]
CLASSES = ["a", "b", "c"]
N = 60


def _labelled_by_model(root: Path) -> tuple[Path, Path]:
    """A small_resnet's weights and N random RGB images labelled with its own predictions (all verified)."""
    torch.manual_seed(0)
    model = build_builtin("small_resnet", num_classes=3, in_channels=3, image_size=16).eval()
    x = torch.rand(N, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    norm = Normalised(torch.nn.Identity(), MEAN, STD)
    with torch.no_grad():  # centre the logits so that the random model predicts every class
        model.fc.bias -= predict_logits(model, norm(x)).mean(0)
    y = predict_logits(model, norm(x)).argmax(1)
    assert len(set(y.tolist())) == 3
    weights = root / "source.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(weights))
    return weights, save_npz(root / "data.npz", x, y, CLASSES)


def _refine(root: Path, method: str, **refine: object) -> Path:
    from hansgate.refinement.methods import RefineConfig
    from hansgate.refinement.pipeline import DataOptions, refine_from_files
    from hansgate.refinement.refiners import RefinerConfig

    refine_from_files(model_spec="small_resnet", weights=str(root / "source.safetensors"), data=str(root / "data.npz"),
                      out=root / method, method=method, config=RefinerConfig(refine=RefineConfig(**refine)),
                      options=DataOptions(channels=3, image_size=(16, 16), mean=tuple(MEAN), std=tuple(STD)),
                      calibration_share=0.0)
    return root / method


@pytest.fixture(scope="module")
def served(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("served")
    _labelled_by_model(root)
    bundle = _refine(root, "pca-egem", layers=["layer1", "layer2"], repetitions=1, alpha_grid=(0.5, 0.9))
    attrs = write_attributes(root / "attrs.csv", {"site": np.where(np.arange(N) % 2 == 0, "A", "B")})
    return {"root": root, "bundle": bundle, "data": root / "data.npz", "attributes": attrs}


def _config() -> AuditConfig:
    return AuditConfig(heatmaps=4, concepts=True, tcav_runs=2, influence=False, artifacts=("corner",), pdf=False,
                       min_samples=5)


def _copy(bundle: Path, to: Path) -> Path:
    shutil.copytree(bundle, to)
    return to


def test_bundle_carries_the_refined_weights_and_recipe(served):
    b = load_bundle(served["bundle"])
    spec = b.manifest.refined
    assert spec is not None and b.refined_path == served["bundle"] / "refined.safetensors"
    assert sha256_file(b.refined_path) == spec.sha256
    assert {u.layer: u.kind for u in spec.inserted} == {"layer1": "pca_exposure", "layer2": "pca_exposure"}
    state = load_file(str(b.refined_path))
    assert "layer1.refiner.projection" in state and "bn1.num_batches_tracked" in state


def test_audit_explains_the_served_model(served, tmp_path):
    """Bar: a BatchNorm bundle's audit compares before/after and shows heatmaps of the refined model; every
    heatmap and TCAV figure names the model it explains."""
    inputs = load_inputs(AuditSources(bundle=served["bundle"], data=served["data"], attributes=served["attributes"]))
    audit = run_audit(inputs, _config())
    report = audit.as_dict()
    assert report["served"]["status"] == "rebuilt" and report["served"]["explains"] == SERVED
    assert report["served"]["max_abs_logit_diff"] <= report["served"]["tolerance"]
    assert report["accuracy"]["before"]["value"] == 1.0 and "after" in report["accuracy"]
    assert report["models"]["before"]["kind"] == "torch" and report["models"]["after"]["kind"] == "onnx"
    assert report["attributions"]["models"] == ["before", "after"]
    assert report["attributions"]["explains"] == {"before": SOURCE, "after": SERVED}
    assert report["attributions"]["methods_explains"] == SERVED
    assert report["concepts"]["model"] == "after" and report["concepts"]["explains"] == SERVED
    # the served model's heatmaps are its own: refinement changed the relevance
    heat = audit.figure_data().heatmaps
    assert heat is not None and not np.allclose(heat.rows["before"], heat.rows["after"])
    paths = write_report(tmp_path / "report", audit, pdf=False)
    written = json.loads(paths["json"].read_text())
    explaining = {k: f for k, f in written["figures"].items()
                  if k.startswith(("heatmaps_", "artifact_heatmap_", "cav_localisation_", "tcav"))}
    assert {"heatmaps_lrp", "heatmaps_methods", "tcav"} <= set(explaining)
    for fid, fig in explaining.items():
        assert fig["explains"], fid
        for name in fig["explains"]:
            assert name in fig["title"], (fid, fig["title"])
    assert written["figures"]["heatmaps_lrp"]["explains"] == [SOURCE, SERVED]
    assert written["figures"]["tcav"]["explains"] == [SERVED]
    html = paths["html"].read_text()
    assert f"Explanations are of the <b>{SERVED}</b>" in html


def test_served_model_without_source_weights(served):
    """The refined state dict holds every tensor: the architecture alone rebuilds the served model."""
    b = load_bundle(served["bundle"])
    x = torch.from_numpy(np.load(served["data"])["x"][:16])
    res = served_model(b, x, source_model=None)
    assert res.status == "rebuilt" and res.max_abs_logit_diff is not None and res.max_abs_logit_diff <= 1e-4


def test_one_changed_byte_of_the_refined_weights_refuses_the_audit(served, tmp_path):
    bundle = _copy(served["bundle"], tmp_path / "bundle")
    weights = bundle / "refined.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0x01
    weights.write_bytes(bytes(data))
    with pytest.raises(BundleHashError, match="refined.safetensors sha256"):
        load_inputs(AuditSources(bundle=bundle, data=served["data"], attributes=served["attributes"]))
    ok = load_bundle(served["bundle"])  # loaded before the change: the audit re-checks the file itself
    tampered = type(ok)(bundle, ok.manifest)
    with pytest.raises(BundleHashError):
        rebuild_served(tampered)


def test_weights_that_disagree_with_the_graph_refuse_the_audit(served, tmp_path):
    """Weights changed *and* re-hashed into the (unsigned) manifest: the rebuilt module no longer matches
    model.onnx, and the audit refuses rather than explain a model that is not the one served."""
    bundle = _copy(served["bundle"], tmp_path / "bundle")
    weights = bundle / "refined.safetensors"
    state = load_file(str(weights))
    state["fc.bias"] = state["fc.bias"] + 0.5
    save_file(state, str(weights))
    raw = json.loads((bundle / MANIFEST_FILE).read_text())
    raw["refined"]["sha256"] = sha256_file(weights)
    (bundle / MANIFEST_FILE).write_text(json.dumps(raw))
    inputs = load_inputs(AuditSources(bundle=bundle, data=served["data"], attributes=served["attributes"]))
    with pytest.raises(BundleError, match="disagrees with model.onnx"):
        run_audit(inputs, _config())
    # a tensor the source architecture has no place for is refused with one line too
    state["fc.extra"] = torch.zeros(1)
    save_file(state, str(weights))
    raw["refined"]["sha256"] = sha256_file(weights)
    (bundle / MANIFEST_FILE).write_text(json.dumps(raw))
    with pytest.raises(BundleError, match='Unexpected key.*"fc.extra"'):
        run_audit(load_inputs(AuditSources(bundle=bundle, data=served["data"], attributes=served["attributes"])),
                  _config())


def test_a_1_1_bundle_is_audited_by_its_predictions(served, tmp_path):
    bundle = _copy(served["bundle"], tmp_path / "bundle")
    raw = json.loads((bundle / MANIFEST_FILE).read_text())
    raw["schema_version"] = "1.1"
    for key in ("refined", "verified_share"):
        raw.pop(key, None)
    for c in raw["concepts"]:
        c.pop("layer_reason", None)
    (bundle / MANIFEST_FILE).write_text(json.dumps(raw))
    (bundle / "refined.safetensors").unlink()
    inputs = load_inputs(AuditSources(bundle=bundle, data=served["data"], attributes=served["attributes"]))
    report = run_audit(inputs, _config().model_copy(update={"concepts": False})).as_dict()
    assert report["served"]["status"] == "absent" and report["served"]["explains"] == SOURCE
    assert "schema 1.1 carries no refined weights" in report["served"]["reason"]
    assert "audited by its predictions" in report["served"]["reason"]
    assert any("audited by its predictions" in n for n in report["inputs"]["notes"])
    assert report["attributions"]["models"] == ["before"]
    assert report["attributions"]["explains"] == {"before": SOURCE}
    assert "after" in report["accuracy"]


@pytest.mark.parametrize("method, refine, kinds", [
    ("egem", {"layers": ["layer2"], "repetitions": 1, "alpha_grid": (0.5,)}, {"layer2": "exposure_scale"}),
    ("ridge", {}, {}),  # changes the last layer's weights, inserts nothing
])
def test_rebuilt_module_matches_the_graph_for_each_kind_of_refinement(served, method, refine, kinds):
    """EGEM (per-channel scale), PCA-EGEM (above) and a weights-changing method all rebuild to the graph."""
    bundle = load_bundle(_refine(served["root"], method, **refine))
    assert bundle.manifest.refined is not None
    assert {u.layer: u.kind for u in bundle.manifest.refined.inserted} == kinds
    x = torch.from_numpy(np.load(served["data"])["x"])
    res = served_model(bundle, x, source_model=None)
    assert res.status == "rebuilt" and res.samples == N and res.max_abs_logit_diff is not None
    assert res.max_abs_logit_diff <= 1e-4
    if method == "ridge":  # the rebuilt module carries the refit weights, not the source's
        source = load_file(str(served["root"] / "source.safetensors"))
        assert not torch.equal(res.module.state_dict()["fc.weight"], source["fc.weight"])

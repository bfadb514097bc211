"""Loading an audit from files: the input spec from the manifest, the source model by the manifest's hash.

The bundle is refined (``hansgate refine``'s pipeline) from a BatchNorm model with RGB ImageFolder
data, ``--mean/--std`` and images larger than the model's input, so the audit has to read the data at
the bundle's size, normalise for the source model but not for the graph, and match the weights file's
hash.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from hansgate.audit.config import AuditConfig
from hansgate.audit.inputs import write_attributes
from hansgate.audit.loading import AuditSources, load_audit_data, load_inputs
from hansgate.audit.runner import run_audit
from hansgate.data.datasets import load_labelled
from hansgate.errors import DataError, ModelLoadError
from hansgate.nn.models import build_builtin
from hansgate.nn.normalisation import Normalised
from hansgate.nn.training import predict_logits

MEAN, STD = [0.4, 0.5, 0.6], [0.2, 0.25, 0.3]
CLASSES = ["a", "b", "c"]


@pytest.fixture(scope="module")
def rgb_bundle(tmp_path_factory) -> dict[str, Path]:
    """A small_resnet (BatchNorm) on 3x16x16 inputs, 60 RGB 20x20 PNGs labelled with its own predictions."""
    from hansgate.refinement.methods import RefineConfig
    from hansgate.refinement.pipeline import DataOptions, refine_from_files
    from hansgate.refinement.refiners import RefinerConfig

    root = tmp_path_factory.mktemp("rgb")
    torch.manual_seed(0)
    model = build_builtin("small_resnet", num_classes=3, in_channels=3, image_size=16).eval()
    rng = np.random.default_rng(0)
    data = root / "data"
    for i in range(60):
        (data / CLASSES[i % 3]).mkdir(parents=True, exist_ok=True)
        img = (rng.random((20, 20, 3)) * 255).astype(np.uint8)
        Image.fromarray(img, "RGB").save(data / CLASSES[i % 3] / f"{i:03d}.png")
    x = load_labelled(data, channels=3, size=(16, 16)).x
    norm = Normalised(torch.nn.Identity(), MEAN, STD)
    with torch.no_grad():  # centre the logits so that the random model predicts every class
        model.fc.bias -= predict_logits(model, norm(x)).mean(0)
    pred = predict_logits(model, norm(x)).argmax(1)
    assert len(set(pred.tolist())) == 3
    files = [f for d in sorted(data.iterdir()) for f in sorted(d.iterdir())]
    for f, p in zip(files, pred.tolist()):  # label every image with the model's prediction
        if f.parent.name != CLASSES[p]:
            shutil.move(f, data / CLASSES[p] / f.name)
    weights = root / "source.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(weights))
    refine_from_files(model_spec="small_resnet", weights=str(weights), data=str(data), out=root / "bundle",
                      method="egem", config=RefinerConfig(refine=RefineConfig(layers=["layer2"])),
                      options=DataOptions(channels=3, image_size=(16, 16), mean=tuple(MEAN), std=tuple(STD)))
    attrs = write_attributes(root / "attrs.csv", {"site": np.where(np.arange(60) % 2 == 0, "A", "B")})
    return {"root": root, "bundle": root / "bundle", "data": data, "weights": weights, "attributes": attrs}


def test_imagefolder_read_at_the_manifests_spec(rgb_bundle):
    from hansgate.bundle import load_bundle

    spec = load_bundle(rgb_bundle["bundle"]).manifest.input
    data, note = load_audit_data(rgb_bundle["data"], spec)
    assert tuple(data.x.shape) == (60, 3, 16, 16)
    assert "RGB" in note and "3x16x16" in note
    ranged = spec.model_copy(update={"value_range": (0.0, 255.0)})
    scaled, _ = load_audit_data(rgb_bundle["data"], ranged)
    torch.testing.assert_close(scaled.x.take(slice(None)), data.x.take(slice(None)) * 255.0)


def test_audit_of_a_batchnorm_bundle_compares_with_its_source_model(rgb_bundle):
    """The source model is found next to the bundle, matches the manifest's hash, and the report compares
    it (torch, normalised inputs) with the bundle (ONNX, normalisation in the graph) on the same images."""
    from hansgate.bundle import load_bundle

    manifest = load_bundle(rgb_bundle["bundle"]).manifest
    assert manifest.input.normalization_in_graph
    inputs = load_inputs(AuditSources(bundle=rgb_bundle["bundle"], data=rgb_bundle["data"],
                                      attributes=rgb_bundle["attributes"]))
    assert inputs.source_model is not None and tuple(inputs.x.shape[1:]) == (3, 16, 16)
    report = run_audit(inputs, AuditConfig(heatmaps=2, concepts=False, influence=False, artifacts=("corner",),
                                           pdf=False, min_samples=5)).as_dict()
    assert report["models"]["before"]["kind"] == "torch" and report["models"]["after"]["kind"] == "onnx"
    assert set(report["subgroups"]["delta"]["site"]) == {"A", "B"}
    assert report["attributions"]["status"] == "done"
    # the data are labelled with the source model's predictions: normalising for it must give accuracy 1,
    # and the bundle must score on the audit as the refine side measured it on the same (all verified) images
    assert report["accuracy"]["before"]["value"] == 1.0
    assert abs(report["accuracy"]["after"]["value"] - manifest.evaluation.after["verified_acc"]) <= 1 / 60


def test_tampered_source_weights_are_refused(demo_dir, tmp_path):
    """Weights that are not the manifest's source model stop the audit with one ModelLoadError."""
    from hansgate.nn.models import load_state_dict_file

    state = load_state_dict_file(demo_dir / "source_model.safetensors")
    name = next(k for k in state if k.endswith("bias"))
    state[name] = state[name] + 1.0
    other = tmp_path / "other.safetensors"
    save_file({k: v.contiguous() for k, v in state.items()}, str(other))
    src = AuditSources(bundle=demo_dir / "bundle", data=demo_dir / "data" / "deploy.npz",
                       attributes=demo_dir / "data" / "deploy_attributes.csv", source_weights=other)
    with pytest.raises(ModelLoadError, match="not the model this bundle was refined from"):
        load_inputs(src)
    # the weights the demo wrote next to its bundle do match (the manifest records their state dict's hash)
    assert load_inputs(AuditSources(bundle=demo_dir / "bundle", data=demo_dir / "data" / "deploy.npz",
                                    attributes=demo_dir / "data" / "deploy_attributes.csv",
                                    max_samples=20)).source_model is not None


def test_npz_of_the_wrong_shape_is_one_data_error(rgb_bundle, tmp_path):
    bad = tmp_path / "bad.npz"
    np.savez(bad, x=np.zeros((4, 1, 28, 28), np.float32), y=np.arange(4) % 3)
    with pytest.raises(DataError, match=r"the bundle expects \(3, 16, 16\)"):
        load_inputs(AuditSources(bundle=rgb_bundle["bundle"], data=bad, attributes=rgb_bundle["attributes"]))


def test_data_larger_than_the_memory_bound_are_streamed_with_the_same_figures(rgb_bundle):
    """With room for 20 of the 60 images, predictions, subgroups, fairness and calibration stream over all 60
    and equal the figures of the audit that holds everything; the torch sections see a seeded 20."""
    src = AuditSources(bundle=rgb_bundle["bundle"], data=rgb_bundle["data"], attributes=rgb_bundle["attributes"])
    cfg = AuditConfig(heatmaps=4, concepts=False, influence=False, artifacts=("corner",), pdf=False, min_samples=5)
    held = load_inputs(src)
    assert held.images is None and len(held.x) == 60
    per_image_mb = 3 * 16 * 16 * 4 / 2**20
    streamed = load_inputs(AuditSources(**{**src.__dict__, "held_mb": 20.5 * per_image_mb}))
    assert streamed.images is not None and len(streamed.images) == 60 and len(streamed.x) == 20
    assert len(streamed.y) == 60 and all(len(v) == 60 for v in streamed.attributes.values())
    torch.testing.assert_close(streamed.x, held.x[torch.as_tensor(streamed.explained)])
    a, b = (run_audit(i, cfg).as_dict() for i in (held, streamed))
    for key in ("accuracy", "subgroups", "headline", "fairness", "calibration"):
        assert a[key] == b[key], key
    assert b["inputs"]["n_samples"] == 60 and b["inputs"]["explained_samples"] == 20
    assert any("read all 60 images from disk" in n for n in b["inputs"]["notes"])
    # heatmap samples are named by their position in the audited data, drawn from the held ones
    assert {s["index"] for s in b["attributions"]["samples"]} <= set(streamed.explained.tolist())
    assert b["artifact_tests"]["artifacts"]["corner"]["n_clean"] <= 20


def test_a_non_positive_memory_bound_is_one_data_error(rgb_bundle):
    with pytest.raises(DataError, match="must be positive"):
        load_inputs(AuditSources(bundle=rgb_bundle["bundle"], data=rgb_bundle["data"],
                                 attributes=rgb_bundle["attributes"], held_mb=0))

"""The one pipeline (refinement.pipeline): inputs checked once, normalisation baked into every bundle, one hash."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from hansgate.bundle import load_bundle
from hansgate.errors import ConfigError, DataError
from hansgate.manifest import InputSpec, SourceModel
from hansgate.nn.models import load_model, state_dict_sha256
from hansgate.nn.normalisation import Normalised
from hansgate.refinement.methods import RefinementResult
from hansgate.refinement.pipeline import (
    DataOptions,
    Inputs,
    build_bundle,
    calibration_spec,
    calibration_split,
    load_inputs,
    per_class_subset,
    refine,
    refine_from_files,
    verified_subset,
)
from hansgate.refinement.selection import Candidate, RuleSelection
from tests.grey_models import self_labelled_grey

MEAN, STD = [0.3], [0.2]


def _tiny() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 3)).eval()


def _result(model: nn.Module) -> RefinementResult:
    chosen = Candidate({}, 1.0)
    return RefinementResult(model, "none", [], {}, RuleSelection(chosen, [chosen], "fixed"))


def _spec(mean: list[float], std: list[float]) -> InputSpec:
    return InputSpec(channels=1, height=8, width=8, mean=mean, std=std)


@pytest.mark.parametrize("mean, std", [([0.0], [1.0]), (MEAN, STD)])
def test_build_bundle_bakes_the_declared_normalisation(tmp_path, mean, std):
    model = _tiny()
    x = torch.rand(16, 1, 8, 8)
    bundle = build_bundle(tmp_path / "b", _result(model), x_check=x, classes=["a", "b", "c"],
                          input_spec=_spec(mean, std), source=SourceModel(spec="x", sha256="0" * 64))
    baked = mean != [0.0]
    assert bundle.manifest.input.normalization_in_graph is baked
    served = ort.InferenceSession(str(tmp_path / "b" / "model.onnx")).run(None, {"input": x.numpy()})[0]
    with torch.no_grad():
        expected = Normalised(model, mean, std)(x)
    np.testing.assert_allclose(served, expected.numpy(), atol=1e-5)
    if baked:  # the raw-pixel graph is not the bare model
        assert np.abs(served - model(x).detach().numpy()).max() > 1e-2


def _inputs(**changes) -> Inputs:
    base = dict(x=torch.rand(10, 1, 8, 8), y=torch.arange(10) % 3, classes=["a", "b", "c"], mean=MEAN, std=STD,
                description="test")
    return Inputs(**(base | changes))


@pytest.mark.parametrize("changes, message", [
    ({"classes": ["a"]}, "at least 2 classes"),
    ({"std": [0.0]}, "--mean/--std need 1 value"),
    ({"mean": [0.1, 0.2]}, "--mean/--std need 1 value"),
    ({"y": torch.arange(10)}, "labels go up to 9"),
    ({"x": torch.rand(10, 1, 8, 8) * 3}, "outside [0, 1]"),
    ({"evaluation": {"clean_acc": (torch.rand(4, 3, 8, 8), torch.zeros(4, dtype=torch.long))}}, "differ from"),
    ({"val": (torch.rand(4, 1, 9, 9), torch.zeros(4, dtype=torch.long))}, "validation data: images"),
])
def test_inputs_are_checked_once_for_every_split(changes, message):
    with pytest.raises(DataError, match=message.replace("[", r"\[").replace("]", r"\]")):
        _inputs(**changes).check()


def test_inputs_map_raw_pixels_to_the_models_space():
    inputs = _inputs()
    x = torch.rand(2, 1, 8, 8)
    assert torch.allclose(inputs.to_model(x), (x - 0.3) / 0.2)
    plain = _inputs(mean=[0.0], std=[1.0])
    assert plain.to_model(x) is x and not plain.input_spec().normalization_in_graph
    spec = inputs.input_spec()
    assert spec.normalization_in_graph and spec.mean == MEAN and tuple(spec.value_range) == (0.0, 1.0)


def test_verified_and_per_class_subsets():
    model = _tiny()
    x = torch.rand(60, 1, 8, 8)
    pred = model(x).argmax(1).detach()
    y = pred.clone()
    y[:7] = (y[:7] + 1) % 3
    xv, yv = verified_subset(model, x, y)
    assert len(yv) == 53 and torch.equal(model(xv).argmax(1), yv)
    with pytest.raises(DataError, match="predicted correctly"):
        verified_subset(model, x[:10], (pred[:10] + 1) % 3)
    xs, ys = per_class_subset(x, pred, 2, seed=0)
    assert all(int((ys == c).sum()) == min(2, int((pred == c).sum())) for c in pred.unique())


@pytest.fixture(scope="module")
def grey_files(tmp_path_factory):
    """An .npz of raw grey 28x28 pixels labelled by a random mnist_cnn's own normalised predictions."""
    root = tmp_path_factory.mktemp("grey")
    model, x, y = self_labelled_grey(root, 90, MEAN[0], STD[0])
    assert len(y.unique()) >= 2  # labels from the model's own decisions, not one class
    np.savez(root / "data.npz", x=x.numpy(), y=y.numpy(), classes=np.array(["a", "b", "c"]))
    return root, model, x


def test_refine_from_files_runs_every_step(grey_files, tmp_path):
    root, model, x = grey_files
    out = tmp_path / "b"
    bundle, summary = refine_from_files(model_spec="mnist_cnn", weights=str(root / "w.safetensors"),
                                        data=str(root / "data.npz"), out=out, method="rgem",
                                        options=DataOptions(mean=tuple(MEAN), std=tuple(STD)))
    m = bundle.manifest
    assert m.method.name == "rgem" and m.input.normalization_in_graph and m.input.mean == MEAN
    assert summary["n_verified"] == summary["n_data"] == 90
    assert m.evaluation.before["verified_acc"] == 1.0 and set(m.evaluation.after) == {"verified_acc"}
    assert m.source_model.sha256 == state_dict_sha256(model)
    assert m.method.hyperparameters["selection"]["candidates"]
    assert load_bundle(out).manifest == m
    with pytest.raises(DataError, match="exists"):
        refine_from_files(model_spec="mnist_cnn", weights=str(root / "w.safetensors"), data=str(root / "data.npz"),
                          out=out, method="rgem")
    with pytest.raises(ConfigError, match="unknown refinement method"):
        refine_from_files(model_spec="mnist_cnn", weights=None, data=str(root / "data.npz"), out=tmp_path / "c",
                          method="tap")


def test_refine_refuses_a_concept_method_without_concepts(grey_files, tmp_path):
    root, _, _ = grey_files
    inputs = load_inputs(str(root / "data.npz"), DataOptions(mean=tuple(MEAN), std=tuple(STD)))
    with pytest.raises(ConfigError, match="needs at least one --concept"):
        refine("rr-clarc", inputs, model_spec="mnist_cnn", weights=None, out=tmp_path / "never")
    assert not (tmp_path / "never").exists()


def test_calibration_split_holds_out_a_seeded_share():
    x, y = torch.arange(100.0).view(100, 1), torch.arange(100) % 3
    (xk, yk), held = calibration_split(x, y, 0.25, seed=1)
    assert held is not None and len(held[1]) == 25 and len(yk) == 75
    assert set(held[0].flatten().tolist()).isdisjoint(xk.flatten().tolist())
    assert torch.equal(calibration_split(x, y, 0.25, seed=1)[1][0], held[0])
    assert calibration_split(x, y, 0.1, seed=1)[1] is None  # 10 < MIN_CALIBRATION_SAMPLES
    assert calibration_split(x, y, 0.0, seed=1)[0][0] is x


def test_refine_records_the_calibration_of_the_refined_model(grey_files, tmp_path):
    root, _, _ = grey_files
    bundle, summary = refine_from_files(model_spec="mnist_cnn", weights=str(root / "w.safetensors"),
                                        data=str(root / "data.npz"), out=tmp_path / "cal", method="rgem",
                                        options=DataOptions(mean=tuple(MEAN), std=tuple(STD)),
                                        calibration_share=0.3)
    cal = bundle.manifest.calibration
    assert cal is not None and cal.samples == 27 and summary["n_verified"] == 63
    assert cal.nll_after <= cal.nll_before + 1e-9 and cal.temperature > 0
    assert bundle.manifest.schema_version == "1.4" and summary["calibration"]["temperature"] == cal.temperature
    assert cal.family in ("temperature", "vector") and cal.cv_scores is not None and "temperature" in cal.cv_scores


@pytest.mark.parametrize("family", ["temperature", "vector"])
def test_calibration_spec_fits_the_family_asked_for(family):
    """A linear model whose class 2 is under-confident: each family's spec, in the manifest's shape."""
    from hansgate.calibration import CalibrationFit, calibrated_probabilities

    torch.manual_seed(0)
    model = nn.Linear(4, 3)
    x = torch.randn(300, 4)
    with torch.no_grad():
        z = model(x).double().numpy()
    rng = np.random.default_rng(0)
    truth = calibrated_probabilities(z, scales=[1.0, 1.0, 3.0], biases=[0.0, 0.0, 0.5])
    y = torch.as_tensor([rng.choice(3, p=row) for row in truth])
    spec = calibration_spec(model, x, y, CalibrationFit(family=family, objective="nll", folds=3))
    assert spec.family == family and spec.samples == 300 and spec.objective == "nll"
    if family == "vector":
        assert len(spec.scales) == len(spec.biases) == 3 and spec.scales[2] > spec.scales[0]
        assert set(spec.cv_scores) == {"vector@0.0001", "vector@0.001", "vector@0.01", "vector@0.1", "vector@1"}
    else:
        assert spec.scales is None and spec.cv_scores is None


@pytest.fixture(scope="module")
def digit_files(tmp_path_factory):
    """Embedded digits (raw [0, 1] pixels) labelled by a random mnist_cnn's own normalised predictions, as .npz."""
    from hansgate.data.digits import CleverHansConfig, make_clever_hans

    root = tmp_path_factory.mktemp("digits")
    data = make_clever_hans(CleverHansConfig(seed=0))
    torch.manual_seed(1)
    model = load_model("mnist_cnn", num_classes=10)
    with torch.no_grad():
        model.fc2.weight *= 20
        x = data.x_refine[:300]
        y = Normalised(model, MEAN, STD)(x).argmax(1)
        y[::10] = (y[::10] + 1) % 10  # a tenth is wrong: the verified set is a real subset
    save_file(model.state_dict(), str(root / "w.safetensors"))
    np.savez(root / "digits.npz", x=x.numpy(), y=y.numpy(), classes=np.array([str(i) for i in range(10)]))
    return root


@pytest.mark.parametrize("method", ["pca-egem", "rgem"])
def test_streamed_and_eager_refinement_give_the_same_bundle(digit_files, tmp_path, method):
    from hansgate.refinement.methods import RefineConfig
    from hansgate.refinement.refiners import RefinerConfig

    cfg = RefinerConfig(refine=RefineConfig(repetitions=2, alpha_grid=(0.1, 0.5, 1.0)))
    runs = {}
    for stream in (True, False):
        bundle, summary = refine_from_files(model_spec="mnist_cnn", weights=str(digit_files / "w.safetensors"),
                                            data=str(digit_files / "digits.npz"), out=tmp_path / str(stream),
                                            method=method, config=cfg, stream=stream,
                                            options=DataOptions(mean=tuple(MEAN), std=tuple(STD)))
        runs[stream] = bundle.manifest, summary
    (ms, ss), (me, se) = runs[True], runs[False]
    assert ss["n_verified"] == se["n_verified"] < 0.8 * 300 and ss["verified_share"] == se["verified_share"]
    assert ms.evaluation == me.evaluation and ms.method == me.method and ms.calibration == me.calibration
    assert ms.graph.sha256 == me.graph.sha256  # the same refined model, byte for byte


def test_streamed_inputs_hold_no_images(digit_files):
    from hansgate.data.streaming import LazyImages

    inputs = load_inputs(str(digit_files / "digits.npz"), DataOptions(mean=tuple(MEAN), std=tuple(STD)),
                         test_data=str(digit_files / "digits.npz"))
    assert isinstance(inputs.x, LazyImages) and isinstance(inputs.evaluation["clean_acc"][0], LazyImages)
    (kept, _), held = calibration_split(inputs.to_model(inputs.x), inputs.y, 0.2, seed=0)
    assert isinstance(kept, LazyImages) and held is not None and isinstance(held[0], LazyImages)
    assert len(kept) + len(held[0]) == 300

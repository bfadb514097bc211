"""Semantic checks of a manifest read from disk (issue 13, item 7): every hand edit the attack tried
(a renamed class with odd characters, an inverted value range, a NaN presence threshold, a subgroup
value with quotes and a newline, a graph file outside the bundle) is refused with one BundleError line."""

from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path

import onnx
import pytest

from hansgate.bundle import load_bundle, sha256_file
from hansgate.errors import BundleError
from hansgate.manifest import SCHEMA_VERSION, SAFE_NAME, Manifest, SubgroupAttribute
from tests.service.bundles import make_bundle


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return make_bundle(tmp_path_factory.mktemp("tiny") / "b", concepts=True).path


@pytest.fixture
def bundle(tiny, tmp_path) -> Path:
    return Path(shutil.copytree(tiny, tmp_path / "b"))


def _edit(bundle: Path, change) -> None:
    raw = json.loads((bundle / "manifest.json").read_text())
    change(raw)
    (bundle / "manifest.json").write_text(json.dumps(raw))  # json.dumps writes NaN/Infinity as the attack did


def _refused(bundle: Path, *needles: str) -> str:
    with pytest.raises(BundleError) as info:
        load_bundle(bundle)
    msg = str(info.value)
    assert "\n" not in msg and all(n in msg for n in needles), msg
    return msg


def test_the_unedited_bundle_loads(bundle):
    assert load_bundle(bundle).manifest.classes == ["cat", "dog", "fox"]


def _set_class(raw, name):
    raw["classes"][1] = name


EDITS = {
    "renamed class with a quote and newline": (lambda r: _set_class(r, 'dog"} 1\n# HELP'), "classes.1", "not a safe name"),
    "class as markup": (lambda r: _set_class(r, "<script>"), "classes.1", "not a safe name"),
    "class with a trailing space": (lambda r: _set_class(r, "dog "), "classes.1"),
    "inverted value range": (lambda r: r["input"].update(value_range=[1.0, 0.0]), "value_range", "not ordered"),
    "empty value range": (lambda r: r["input"].update(value_range=[0.5, 0.5]), "not ordered"),
    "NaN presence threshold": (lambda r: r["concepts"][0].update(presence_threshold=math.nan), "NaN"),
    "NaN as a string": (lambda r: r["concepts"][0].update(presence_threshold="nan"), "finite number"),
    "infinite std": (lambda r: r["input"].update(std=[math.inf]), "Infinity"),
    "subgroup value with quotes and newline": (
        lambda r: r["subgroups"][0]["values"].__setitem__(0, 'A",x="1\n'), "subgroups.0.values.0", "not a safe name"),
    "graph file outside the bundle": (lambda r: r["graph"].update(file="../model.onnx"), "graph.file"),
    "absolute graph file": (lambda r: r["graph"].update(file="/etc/passwd"), "graph.file"),
    "hidden graph file": (lambda r: r["graph"].update(file=".model.onnx"), "graph.file"),
    "baseline TCAV above 1": (lambda r: r["concepts"][0]["baseline_tcav"].update(cat=1.5), "not a fraction"),
    "baseline TCAV of an undeclared class": (lambda r: r["concepts"][0]["baseline_tcav"].update(cow=0.5),
                                             "undeclared classes"),
    "baseline recall of an undeclared value": (lambda r: r["subgroups"][0]["baseline_recall"].update(C={"cat": 0.5}),
                                               "undeclared values"),
    "reserved attribute name": (lambda r: r["subgroups"][0].update(name="_all"), "reserved"),
    "duplicate attribute": (lambda r: r["subgroups"][1].update(name="site"), "unique"),
    "method name as a label injection": (lambda r: r["method"].update(name='x"} 1'), "method.name"),
    "version with a newline": (lambda r: r.update(hansgate_version="0.1\n"), "hansgate_version"),
    "layer with a control character": (lambda r: r["concepts"][0].update(layer="conv\x1b[2J"), "control characters"),
    "negative image height": (lambda r: r["input"].update(height=-8), "input.height"),
    "huge image": (lambda r: r["input"].update(height=10**9), "input.height"),
    "unknown output name": (lambda r: r["graph"]["outputs"][0].update(name="logits\n"), "graph.outputs.0.name"),
    "L with three channels": (lambda r: r["input"].update(channels=3, mean=[0, 0, 0], std=[1, 1, 1]), "needs 1 channel"),
}


@pytest.mark.parametrize("case", sorted(EDITS))
def test_each_hostile_edit_is_refused_with_one_line(bundle, case):
    change, *needles = EDITS[case]
    _edit(bundle, change)
    _refused(bundle, *needles)


def test_nan_is_refused_in_python_too():
    """Building the model in code (refinement) refuses non-finite numbers as well."""
    with pytest.raises(ValueError, match="finite"):
        SubgroupAttribute(name="site", values=["A"], baseline_recall={"A": {"cat": math.nan}})


def test_safe_names_keep_real_class_names():
    for ok in ("0", "cat", "golden retriever", "T-shirt.1+", "n01440764", "Katze_ä"):
        assert SAFE_NAME.fullmatch(ok), ok
    for bad in ("", " a", "a  b", "a\tb", 'a"b', "a\\b", "a/b", "a{b}", "x\u200b"):
        assert not SAFE_NAME.fullmatch(bad) or not bad.isprintable(), bad


def test_graph_reached_through_a_link_outside_the_bundle_is_refused(bundle, tmp_path):
    outside = tmp_path / "elsewhere.onnx"
    shutil.copy(bundle / "model.onnx", outside)
    (bundle / "model.onnx").unlink()
    os.symlink(outside, bundle / "model.onnx")  # same bytes, same hash: only the location is wrong
    _refused(bundle, "outside the bundle")


def test_class_count_must_equal_the_graph_width(bundle):
    """A dynamic class axis cannot be checked against the classes: refused too."""
    model = onnx.load(str(bundle / "model.onnx"))
    dim = model.graph.output[0].type.tensor_type.shape.dim[1]
    dim.dim_param = "K"
    onnx.save(model, str(bundle / "model.onnx"))
    _edit(bundle, lambda r: r["graph"].update(sha256=sha256_file(bundle / "model.onnx")))
    _refused(bundle, "dynamic number of", "manifest 3")


def test_external_tensor_data_is_refused(bundle):
    model = onnx.load(str(bundle / "model.onnx"))
    onnx.save(model, str(bundle / "model.onnx"), save_as_external_data=True, all_tensors_to_one_file=True,
              location="weights.bin", size_threshold=0)
    _edit(bundle, lambda r: r["graph"].update(sha256=sha256_file(bundle / "model.onnx")))
    _refused(bundle, "external files")


def test_schema_1_0_manifests_written_before_these_checks_still_load(tiny):
    raw = json.loads((tiny / "manifest.json").read_text())
    assert raw["schema_version"] == SCHEMA_VERSION == "1.4"
    raw["schema_version"] = "1.0"
    assert Manifest.model_validate(raw).classes == ["cat", "dog", "fox"]


def test_calibration_needs_schema_1_1(tiny):
    raw = json.loads((tiny / "manifest.json").read_text())
    raw["calibration"] = {"temperature": 1.5, "ece_before": 0.1, "ece_after": 0.02, "nll_before": 0.5,
                          "nll_after": 0.4, "samples": 100, "bins": 15}
    assert Manifest.model_validate(raw).calibration.temperature == 1.5
    for bad in ({"temperature": 0.0}, {"temperature": float("nan")}, {"ece_after": 1.5}):
        with pytest.raises(ValueError):
            Manifest.model_validate({**raw, "calibration": {**raw["calibration"], **bad}})
    with pytest.raises(ValueError, match="schema 1.1"):
        Manifest.model_validate({**raw, "schema_version": "1.0"})


_VECTOR = {"family": "vector", "scales": [0.9, 1.1, 1.0], "biases": [0.1, -0.2, 0.1], "penalty": 0.01,
           "objective": "nll", "cv_scores": {"temperature": 0.5, "vector@0.01": 0.45}}


def test_vector_calibration_needs_schema_1_3_and_one_finite_pair_per_class(tiny):
    raw = json.loads((tiny / "manifest.json").read_text())
    plain = {"temperature": 1.5, "ece_before": 0.1, "ece_after": 0.02, "nll_before": 0.5, "nll_after": 0.4,
             "samples": 100, "bins": 15}
    m = Manifest.model_validate({**raw, "calibration": {**plain, **_VECTOR}})
    assert m.calibration.family == "vector" and m.calibration.scales == [0.9, 1.1, 1.0]
    assert Manifest.model_validate_json(m.model_dump_json()) == m
    # a 1.1/1.2 temperature-only calibration keeps loading, under its own schema
    for version in ("1.1", "1.2"):
        old = Manifest.model_validate({**raw, "schema_version": version, "calibration": plain})
        assert old.calibration.family == "temperature" and old.calibration.scales is None
    with pytest.raises(ValueError, match="schema 1.3"):
        Manifest.model_validate({**raw, "schema_version": "1.2", "calibration": {**plain, **_VECTOR}})
    for bad, needle in (({"scales": [1.0, 1.0]}, "2 scales but 3 biases"),
                        ({"scales": [1.0, 1.0], "biases": [0.0, 0.0]}, "2 scales for 3 classes"),
                        ({"biases": [0.0, 0.0]}, "3 scales but 2 biases"),
                        ({"scales": [1.0, float("nan"), 1.0]}, "finite"),
                        ({"biases": [0.0, float("inf"), 0.0]}, "finite"),
                        ({"biases": None}, "needs scales and biases"),
                        ({"family": "temperature"}, "takes no scales"),
                        ({"family": "matrix"}, "family"),
                        ({"penalty": 0.0}, "greater than 0"),
                        ({"objective": "ece"}, "objective")):
        with pytest.raises(ValueError, match=needle):
            Manifest.model_validate({**raw, "calibration": {**plain, **_VECTOR, **bad}})


def test_a_bad_vector_calibration_on_disk_is_one_bundle_error(bundle):
    plain = {"temperature": 1.5, "ece_before": 0.1, "ece_after": 0.02, "nll_before": 0.5, "nll_after": 0.4,
             "samples": 100, "bins": 15}
    _edit(bundle, lambda r: r.update(calibration={**plain, **_VECTOR, "scales": [1.0, math.inf, 1.0]}))
    _refused(bundle, "calibration")


_REFINED = {"file": "refined.safetensors", "sha256": "a" * 64,
            "inserted": [{"layer": "layer2.0", "kind": "pca_exposure",
                          "options": {"dim": 16, "spatial_size": 4, "conv_mode": "ratio", "per_element": False}},
                         {"layer": "fc", "kind": "exposure_scale", "options": {"shape": [3, 4]}}]}


def test_refined_weights_round_trip(tiny):
    raw = json.loads((tiny / "manifest.json").read_text())
    m = Manifest.model_validate({**raw, "refined": _REFINED})
    again = Manifest.model_validate_json(m.model_dump_json())
    assert again == m and again.refined is not None
    opts = again.refined.inserted[0].options
    assert opts["per_element"] is False and opts["dim"] == 16 and again.refined.inserted[1].options["shape"] == [3, 4]
    assert Manifest.model_validate(raw).refined is None  # optional: bundles without it still load


@pytest.mark.parametrize("change, needle", [
    ({"file": "../refined.safetensors"}, "file"),
    ({"file": "/etc/refined.safetensors"}, "file"),
    ({"file": ".hidden.safetensors"}, "file"),
    ({"file": "refined.pt"}, "safetensors"),
    ({"file": "model.onnx"}, "safetensors"),
    ({"sha256": "A" * 64}, "sha256"),
    ({"format": "pickle"}, "format"),
    ({"inserted": [{"layer": "../x", "kind": "pca_exposure", "options": {}}]}, "layer"),
    ({"inserted": [{"layer": "fc", "kind": "pickle", "options": {}}]}, "kind"),
    ({"inserted": [{"layer": "fc", "kind": "clarc_projection", "options": {"pooling": "sum"}}]}, "options"),
    ({"inserted": [{"layer": "fc", "kind": "exposure_scale", "options": {"shape": [0]}}]}, "options"),
    ({"inserted": [{"layer": "fc", "kind": "exposure_scale", "options": {"shape": [1.5]}}]}, "options"),
    ({"inserted": [{"layer": "fc", "kind": "exposure_scale", "options": {"Bad Key": 1}}]}, "options"),
    ({"inserted": [{"layer": "fc", "kind": "exposure_scale", "options": {}}] * 2}, "at most one"),
])
def test_hostile_refined_specs_are_refused(tiny, change, needle):
    raw = json.loads((tiny / "manifest.json").read_text())
    with pytest.raises(ValueError, match=needle):
        Manifest.model_validate({**raw, "refined": {**_REFINED, **change}})


def test_refined_weights_need_schema_1_2(tiny):
    raw = json.loads((tiny / "manifest.json").read_text())
    for old in ("1.0", "1.1"):
        with pytest.raises(ValueError, match="schema 1.2"):
            Manifest.model_validate({**raw, "schema_version": old, "refined": _REFINED})


def test_clarc_projection_units_need_schema_1_4(tiny):
    raw = json.loads((tiny / "manifest.json").read_text())
    projection = {**_REFINED, "inserted": [{"layer": "fc", "kind": "clarc_projection",
                                            "options": {"dim": 8, "pooling": "mean"}}]}
    assert Manifest.model_validate({**raw, "refined": projection}).refined.inserted[0].options["pooling"] == "mean"
    for old in ("1.2", "1.3"):
        with pytest.raises(ValueError, match="schema 1.4"):
            Manifest.model_validate({**raw, "schema_version": old, "refined": projection})


def test_refined_file_outside_the_bundle_or_tampered_is_refused(bundle, tmp_path):
    from hansgate.errors import BundleHashError

    outside = tmp_path / "elsewhere.safetensors"
    outside.write_bytes(b"weights")
    (bundle / "refined.safetensors").symlink_to(outside)
    _edit(bundle, lambda r: r.update(refined={**_REFINED, "sha256": sha256_file(outside)}))
    _refused(bundle, "refined.safetensors", "outside the bundle")
    (bundle / "refined.safetensors").unlink()
    _refused(bundle, "refined weights missing")
    (bundle / "refined.safetensors").write_bytes(b"weights")
    assert load_bundle(bundle).refined_path == bundle / "refined.safetensors"
    (bundle / "refined.safetensors").write_bytes(b"weightz")
    with pytest.raises(BundleHashError, match="refined.safetensors sha256"):
        load_bundle(bundle)

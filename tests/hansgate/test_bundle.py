"""Bundle verification: hashes, schema version, graph signature; atomic writes; the export check."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from hansgate.bundle import load_bundle, read_manifest, write_bundle
from hansgate.errors import (
    BundleError,
    BundleHashError,
    ExportError,
    SchemaVersionError,
)
from hansgate.nn.export import export_checked


def test_demo_bundle_verifies(demo_bundle):
    bundle = load_bundle(demo_bundle)
    m = bundle.manifest
    assert m.classes == [str(i) for i in range(10)]
    assert m.method.name == "pca-egem" and m.method.hyperparameters["alpha"] > 0
    assert m.graph.max_abs_logit_diff <= 1e-4
    assert len(m.source_model.sha256) == 64
    assert {"clean_acc", "poisoned_acc"} <= set(m.evaluation.before)
    assert {s.name for s in m.subgroups} == {"site", "stroke"}


def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst


def test_tampered_graph_is_refused(demo_bundle, tmp_path):
    b = _copy(demo_bundle, tmp_path / "b")
    with open(b / "model.onnx", "ab") as fh:
        fh.write(b"\0")
    with pytest.raises(BundleHashError):
        load_bundle(b)


def test_unknown_schema_version_is_refused(demo_bundle, tmp_path):
    b = _copy(demo_bundle, tmp_path / "b")
    raw = json.loads((b / "manifest.json").read_text())
    raw["schema_version"] = "99.0"
    (b / "manifest.json").write_text(json.dumps(raw))
    with pytest.raises(SchemaVersionError):
        read_manifest(b)


def test_manifest_disagreeing_with_graph_is_refused(demo_bundle, tmp_path):
    b = _copy(demo_bundle, tmp_path / "b")
    raw = json.loads((b / "manifest.json").read_text())
    raw["classes"] = raw["classes"] + ["extra"]
    for out in raw["graph"]["outputs"]:
        out["shape"] = [None, len(raw["classes"])] + out["shape"][2:] if out["name"] == "logits" else out["shape"]
    (b / "manifest.json").write_text(json.dumps(raw))
    with pytest.raises(BundleError):
        load_bundle(b)


def test_missing_or_broken_manifest(tmp_path):
    with pytest.raises(BundleError, match="not found"):
        load_bundle(tmp_path / "nope")
    (tmp_path / "manifest.json").write_text("{not json")
    with pytest.raises(BundleError):
        load_bundle(tmp_path)


def test_write_bundle_is_atomic(demo_bundle, tmp_path):
    manifest = load_bundle(demo_bundle).manifest
    onnx_bytes = (demo_bundle / "model.onnx").read_bytes()
    with pytest.raises(BundleHashError):
        write_bundle(tmp_path / "out", onnx_bytes + b"x", manifest)
    assert list(tmp_path.iterdir()) == []  # nothing half-written, no temp dir left
    refined = load_bundle(demo_bundle).refined_path
    assert refined is not None  # the demo bundle carries the served model's weights
    extra = {refined.name: refined.read_bytes()}
    with pytest.raises(BundleHashError, match="refined"):  # weights that are not the manifest's
        write_bundle(tmp_path / "out", onnx_bytes, manifest, extra_files={refined.name: b"other"})
    assert list(tmp_path.iterdir()) == []
    write_bundle(tmp_path / "out", onnx_bytes, manifest, extra_files=extra)
    assert load_bundle(tmp_path / "out").manifest == manifest
    with pytest.raises(BundleError, match="refusing to overwrite"):
        write_bundle(tmp_path / "out", onnx_bytes, manifest, extra_files=extra)


def test_write_bundle_copies_a_graph_file_and_checks_its_hash(demo_bundle, tmp_path):
    b = load_bundle(demo_bundle)
    refined = b.refined_path
    assert refined is not None
    extra = {refined.name: refined.read_bytes()}
    edited = tmp_path / "edited.onnx"
    edited.write_bytes(b.onnx_path.read_bytes() + b"x")
    with pytest.raises(BundleHashError):  # the file is hashed as it is, not trusted
        write_bundle(tmp_path / "out", edited, b.manifest, extra_files=extra)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["edited.onnx"]
    written = write_bundle(tmp_path / "out", b.onnx_path, b.manifest, extra_files=extra)
    assert (written.path / "model.onnx").read_bytes() == b.onnx_path.read_bytes()
    assert b.onnx_path.exists()  # copied, not moved
    assert load_bundle(tmp_path / "out").manifest == b.manifest


class _ExportsDifferently(nn.Module):
    """Computes something else while being exported: a stand-in for an op the exporter lowers wrongly."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.lin(x.flatten(1))
        return out + 1e-3 if torch.compiler.is_exporting() else out


def test_export_check_refuses_a_disagreeing_graph():
    x = torch.rand(8, 1, 2, 2)
    with pytest.raises(ExportError, match="disagrees"):
        export_checked(_ExportsDifferently(), x, ["logits"])
    good = nn.Sequential(nn.Flatten(), nn.Linear(4, 3))
    _, diff = export_checked(good, x, ["logits"])
    assert diff <= 1e-4


def test_manifest_linked_from_outside_is_refused(demo_bundle, tmp_path):
    b = _copy(demo_bundle, tmp_path / "b")
    outside = tmp_path / "manifest-elsewhere.json"
    (b / "manifest.json").rename(outside)
    (b / "manifest.json").symlink_to(outside)
    with pytest.raises(BundleError, match="outside the bundle"):
        load_bundle(b)


def test_nan_literal_in_manifest_is_refused(demo_bundle, tmp_path):
    b = _copy(demo_bundle, tmp_path / "b")
    text = (b / "manifest.json").read_text()
    (b / "manifest.json").write_text(text.replace('"max_abs_logit_diff": ', '"max_abs_logit_diff": NaN, "x": ', 1))
    with pytest.raises(BundleError, match="NaN is not a number in strict JSON"):
        load_bundle(b)


def test_write_bundle_refuses_extra_files_that_are_not_plain_names(demo_bundle, tmp_path):
    from hansgate.bundle import load_bundle, write_bundle
    from hansgate.errors import BundleError

    b = load_bundle(demo_bundle)
    onnx_bytes = b.onnx_path.read_bytes()
    for name in ("../escape.bin", "manifest.json", b.manifest.graph.file, ".hidden"):
        with pytest.raises(BundleError, match="plain file name"):
            write_bundle(tmp_path / "out", onnx_bytes, b.manifest, extra_files={name: b"x"})
    assert not (tmp_path / "out").exists()


def test_write_bundle_refuses_a_manifest_naming_refined_weights_it_does_not_write(demo_bundle, tmp_path):
    from hansgate.bundle import load_bundle, sha256_bytes, write_bundle
    from hansgate.errors import BundleError
    from hansgate.manifest import RefinedModelSpec

    b = load_bundle(demo_bundle)
    manifest = b.manifest.model_copy(update={"refined": RefinedModelSpec(sha256=sha256_bytes(b"w"))})
    with pytest.raises(BundleError, match="none are written"):
        write_bundle(tmp_path / "out", b.onnx_path.read_bytes(), manifest)
    written = write_bundle(tmp_path / "out", b.onnx_path.read_bytes(), manifest,
                           extra_files={"refined.safetensors": b"w"})
    assert written.refined_path is not None and written.refined_path.read_bytes() == b"w"


def test_demo_bundle_carries_the_served_model_and_the_signature_covers_it(demo_bundle, tmp_path):
    """The refined weights are hashed in the signed manifest: one changed byte fails the hash; a manifest
    edited to match fails the signature."""
    from hansgate.bundle import sha256_file
    from hansgate.errors import SignatureError
    from hansgate.signing import generate_key_pair, load_private_key, sign_bundle

    refined = load_bundle(demo_bundle).manifest.refined
    assert refined is not None and refined.inserted and {u.kind for u in refined.inserted} == {"pca_exposure"}
    b = _copy(demo_bundle, tmp_path / "b")
    generate_key_pair(tmp_path / "k.pem", tmp_path / "k.pub")
    sign_bundle(b, load_private_key(tmp_path / "k.pem"))
    assert load_bundle(b, public_key=tmp_path / "k.pub").signed_by
    weights = b / refined.file
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0x10
    weights.write_bytes(bytes(data))
    with pytest.raises(BundleHashError, match="refined"):
        load_bundle(b, public_key=tmp_path / "k.pub")
    raw = json.loads((b / "manifest.json").read_text())
    raw["refined"]["sha256"] = sha256_file(weights)
    (b / "manifest.json").write_text(json.dumps(raw))
    with pytest.raises(SignatureError):
        load_bundle(b, public_key=tmp_path / "k.pub")


def _reference_signature(data: bytes) -> tuple[list[str], dict[str, list[int | None]]]:
    import onnx

    model = onnx.ModelProto.FromString(data)
    outputs = {o.name: [d.dim_value if d.HasField("dim_value") else None for d in o.type.tensor_type.shape.dim]
               for o in model.graph.output}
    return [i.name for i in model.graph.input], outputs


def _small_graph() -> bytes:
    """A graph with a symbolic batch axis, two outputs, a dense and a sparse initializer."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    w = numpy_helper.from_array(np.arange(12, dtype=np.float32).reshape(3, 4), "w")
    sparse = helper.make_sparse_tensor(numpy_helper.from_array(np.ones(2, np.float32), "sv"),
                                       numpy_helper.from_array(np.array([0, 5], np.int64), "si"), [2, 3])
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["input", "w"], ["logits"]), helper.make_node("Relu", ["logits"], ["act"])],
        "g", [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 3])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 4]),
         helper.make_tensor_value_info("act", TensorProto.FLOAT, [None, 4])], [w], sparse_initializer=[sparse])
    return helper.make_model(graph).SerializeToString()


def test_graph_signature_walker_reads_what_onnx_reads(demo_bundle, tmp_path):
    from hansgate.bundle import graph_signature

    for data in (_small_graph(), (demo_bundle / "model.onnx").read_bytes()):
        path = tmp_path / "g.onnx"
        path.write_bytes(data)
        assert graph_signature(path) == _reference_signature(data)
    assert graph_signature(path)[1]["logits"] == [None, 10]


def test_graph_signature_refuses_tensors_kept_outside_the_file(tmp_path):
    import onnx

    from hansgate.bundle import graph_signature

    model = onnx.ModelProto.FromString(_small_graph())
    model.graph.initializer[0].data_location = onnx.TensorProto.EXTERNAL
    path = tmp_path / "g.onnx"
    path.write_bytes(model.SerializeToString())
    with pytest.raises(BundleError, match=r"external files \(\['w'\]\)"):
        graph_signature(path)
    model.graph.initializer[0].name = ""  # an unnamed tensor is refused all the same
    path.write_bytes(model.SerializeToString())
    with pytest.raises(BundleError, match=r"external files \(\['<unnamed>'\]\)"):
        graph_signature(path)


@settings(max_examples=60, deadline=None)
@given(cut=st.integers(0, 10_000), flip=st.integers(0, 10_000), byte=st.integers(0, 255))
def test_graph_signature_on_damaged_files_gives_onnx_answer_or_bundle_error(tmp_path_factory, cut, flip, byte):
    """Any truncation or one changed byte: the walker raises ``BundleError`` or answers, and where
    onnx can parse the file the answer is onnx's (the walker skips nodes and weights, so a file
    broken only there passes it; onnxruntime refuses that one when the gateway loads it)."""
    from google.protobuf.message import DecodeError

    from hansgate.bundle import graph_signature

    data = bytearray(_small_graph())
    data = data[: cut % (len(data) + 1)]
    if data:
        data[flip % len(data)] = byte
    path = tmp_path_factory.mktemp("g") / "g.onnx"
    path.write_bytes(bytes(data))
    try:
        got = graph_signature(path)
    except BundleError:
        return
    try:
        expected = _reference_signature(bytes(data))
    except DecodeError:
        return
    assert got == expected

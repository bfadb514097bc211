"""Reading, verifying and atomically writing bundles (DESIGN.md, "The bundle").

Torch-free: the service uses it at start-up. ``load_bundle`` refuses a bundle whose
hashes do not match, whose schema version it does not know, or whose graph
signature disagrees with the manifest. ``write_bundle`` writes into a temporary
sibling directory and renames it into place, so a failure leaves no partial bundle.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from pydantic import ValidationError

from hansgate.errors import BundleError, BundleHashError, SchemaVersionError
from hansgate.files import atomic_directory
from hansgate.manifest import KNOWN_SCHEMA_VERSIONS, Manifest

__all__ = ["MANIFEST_FILE", "Bundle", "sha256_file", "sha256_bytes", "load_bundle", "read_manifest",
           "graph_signature", "write_bundle"]

MANIFEST_FILE = "manifest.json"


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


@dataclass(frozen=True)
class Bundle:
    """A verified bundle on disk."""

    path: Path
    manifest: Manifest

    @property
    def onnx_path(self) -> Path:
        return self.path / self.manifest.graph.file


def read_manifest(path: str | Path) -> Manifest:
    """Parse ``manifest.json`` of a bundle directory, checking the schema version first."""
    file = Path(path) / MANIFEST_FILE
    if not file.is_file():
        raise BundleError(f"no {MANIFEST_FILE} in {path}")
    try:
        raw = json.loads(file.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise BundleError(f"cannot read {file}: {exc}") from exc
    version = raw.get("schema_version") if isinstance(raw, dict) else None
    if version not in KNOWN_SCHEMA_VERSIONS:
        raise SchemaVersionError(f"manifest schema version {version!r} is not one of {sorted(KNOWN_SCHEMA_VERSIONS)}")
    try:
        return Manifest.model_validate(raw)
    except ValidationError as exc:
        first = exc.errors()[0]
        raise BundleError(f"invalid manifest {file}: {'.'.join(map(str, first['loc']))}: {first['msg']}") from exc


def graph_signature(onnx_path: str | Path) -> tuple[list[str], dict[str, list[int | None]]]:
    """Input names and ``{output: shape}`` of an ONNX file (symbolic dims as ``None``)."""
    import onnx

    try:
        model = onnx.load(str(onnx_path), load_external_data=False)
    except Exception as exc:  # onnx raises DecodeError and others for a corrupt file
        raise BundleError(f"cannot parse ONNX graph {onnx_path}: {exc}") from exc
    inputs = [i.name for i in model.graph.input]
    outputs: dict[str, list[int | None]] = {}
    for out in model.graph.output:
        dims = out.type.tensor_type.shape.dim
        outputs[out.name] = [d.dim_value if d.HasField("dim_value") else None for d in dims]
    return inputs, outputs


def load_bundle(path: str | Path) -> Bundle:
    """Read and verify a bundle; raises a ``BundleError`` subclass with a one-line reason."""
    root = Path(path)
    if not root.is_dir():
        raise BundleError(f"bundle directory not found: {root}")
    manifest = read_manifest(root)
    onnx_path = root / manifest.graph.file
    if not onnx_path.is_file():
        raise BundleError(f"bundle graph missing: {onnx_path}")
    digest = sha256_file(onnx_path)
    if digest != manifest.graph.sha256:
        raise BundleHashError(f"{onnx_path.name} sha256 {digest[:12]}... does not match the manifest's "
                              f"{manifest.graph.sha256[:12]}...")
    inputs, outputs = graph_signature(onnx_path)
    if manifest.graph.input_name not in inputs:
        raise BundleError(f"graph has no input {manifest.graph.input_name!r} (has {inputs})")
    expected = manifest.expected_outputs()
    declared = {o.name: o.shape for o in manifest.graph.outputs}
    if declared != expected:
        raise BundleError(f"manifest declares outputs {declared}, but its classes/concepts imply {expected}")
    for name, shape in expected.items():
        if name not in outputs:
            raise BundleError(f"graph lacks output {name!r} that the manifest declares")
        got = outputs[name]
        if len(got) != len(shape) or any(e is not None and g is not None and e != g for e, g in zip(shape, got)):
            raise BundleError(f"graph output {name!r} has shape {got}, manifest says {shape}")
    return Bundle(root, manifest)


def write_bundle(out: str | Path, onnx_bytes: bytes, manifest: Manifest, overwrite: bool = False,
                 extra_files: dict[str, bytes] | None = None) -> Bundle:
    """Write ``model.onnx`` + ``manifest.json`` (+ extras) atomically and verify the result."""
    out = Path(out)
    if out.exists() and not overwrite:
        if any(out.iterdir()) if out.is_dir() else True:
            raise BundleError(f"refusing to overwrite existing {out}")
    if sha256_bytes(onnx_bytes) != manifest.graph.sha256:
        raise BundleHashError("manifest hash does not match the graph being written")
    with atomic_directory(out) as tmp:
        (tmp / manifest.graph.file).write_bytes(onnx_bytes)
        (tmp / MANIFEST_FILE).write_text(manifest.model_dump_json(indent=2))
        for name, data in (extra_files or {}).items():
            (tmp / name).write_bytes(data)
        load_bundle(tmp)
    return Bundle(out, manifest)

"""Reading, verifying and atomically writing bundles (DESIGN.md, "The bundle").

Torch-free: the service uses it at start-up. ``load_bundle`` refuses a bundle whose
hashes do not match, whose schema version it does not know, whose manifest fails the
semantic checks of ``hansgate.manifest`` (strict JSON: no NaN or Infinity literals), whose
files lie outside its directory, or whose graph signature disagrees with the manifest
(the class axis of ``logits`` must be fixed and equal to the number of classes). With a
``public_key`` it also requires a valid detached signature (``hansgate.signing``) over the
exact manifest bytes it parses and the graph. A bundle that carries the served model's torch
weights (``manifest.refined``) must hold that file inside its directory with the manifest's
sha256; the signature covers it through the manifest. ``write_bundle`` writes into a temporary
sibling directory and renames it into place, so a failure leaves no partial bundle.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import ValidationError

from hansgate.errors import BundleError, BundleHashError, SchemaVersionError
from hansgate.files import atomic_directory
from hansgate.manifest import KNOWN_SCHEMA_VERSIONS, Manifest

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

__all__ = ["MANIFEST_FILE", "Bundle", "sha256_file", "sha256_bytes", "verify_refined", "load_bundle", "read_manifest",
           "parse_manifest", "graph_signature", "write_bundle"]

MANIFEST_FILE = "manifest.json"
_MAX_MANIFEST_BYTES = 16 * 1024 * 1024
_PLAIN_FILE = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9_.-]{0,127}")


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
    #: id of the public key whose signature was verified on load (``None``: no key was configured)
    signed_by: str | None = None

    @property
    def onnx_path(self) -> Path:
        return self.path / self.manifest.graph.file

    @property
    def refined_path(self) -> Path | None:
        """The served model's torch weights (``manifest.refined``), ``None`` when the bundle carries none."""
        refined = self.manifest.refined
        return None if refined is None else self.path / refined.file


def _inside(root: Path, name: str) -> Path:
    """``root / name``, refused when it resolves (through links) outside ``root``."""
    path = root / name
    if not path.resolve().is_relative_to(root.resolve()):
        raise BundleError(f"{name} of bundle {root} points outside the bundle directory")
    return path


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a number in strict JSON")


def _manifest_bytes(root: Path) -> bytes:
    file = root / MANIFEST_FILE
    if not file.is_file():
        raise BundleError(f"no {MANIFEST_FILE} in {root}")
    _inside(root, MANIFEST_FILE)
    try:
        if file.stat().st_size > _MAX_MANIFEST_BYTES:
            raise BundleError(f"{file} is larger than {_MAX_MANIFEST_BYTES} bytes")
        return file.read_bytes()
    except OSError as exc:
        raise BundleError(f"cannot read {file}: {exc}") from exc


def parse_manifest(data: bytes, source: str | Path = MANIFEST_FILE) -> Manifest:
    """Validate manifest bytes: strict JSON, a known schema version, then the pydantic model's checks."""
    try:
        raw = json.loads(data, parse_constant=_reject_constant)
    except (ValueError, UnicodeDecodeError) as exc:
        raise BundleError(f"cannot read {source}: {str(exc).splitlines()[0]}") from exc
    version = raw.get("schema_version") if isinstance(raw, dict) else None
    if version not in KNOWN_SCHEMA_VERSIONS:
        raise SchemaVersionError(f"manifest schema version {version!r} is not one of {sorted(KNOWN_SCHEMA_VERSIONS)}")
    try:
        return Manifest.model_validate(raw)
    except ValidationError as exc:
        first = exc.errors()[0]
        msg = str(first["msg"]).removeprefix("Value error, ").splitlines()[0]
        where = ".".join(map(str, first["loc"])) or "manifest"
        raise BundleError(f"invalid manifest {source}: {where}: {msg}") from exc


def read_manifest(path: str | Path) -> Manifest:
    """Parse ``manifest.json`` of a bundle directory, checking the schema version first."""
    root = Path(path)
    return parse_manifest(_manifest_bytes(root), root / MANIFEST_FILE)


def graph_signature(onnx_path: str | Path) -> tuple[list[str], dict[str, list[int | None]]]:
    """Input names and ``{output: shape}`` of an ONNX file (symbolic dims as ``None``)."""
    import onnx

    try:
        model = onnx.load(str(onnx_path), load_external_data=False)
    except Exception as exc:  # onnx raises DecodeError and others for a corrupt file
        raise BundleError(f"cannot parse ONNX graph {onnx_path}: {exc}") from exc
    external = [t.name for t in model.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL]
    if external:  # data outside the hashed file would escape both the hash and the signature
        raise BundleError(f"graph {onnx_path} keeps tensors in external files ({external[:3]}); bundles must be "
                          "one self-contained ONNX file")
    inputs = [i.name for i in model.graph.input]
    outputs: dict[str, list[int | None]] = {}
    for out in model.graph.output:
        dims = out.type.tensor_type.shape.dim
        outputs[out.name] = [d.dim_value if d.HasField("dim_value") else None for d in dims]
    return inputs, outputs


def _hashed_file(root: Path, name: str, sha256: str, what: str, why: str = "") -> Path:
    """``root/name``: inside ``root``, present, and with ``sha256`` (``BundleHashError`` ending in ``why``)."""
    path = _inside(root, name)
    if not path.is_file():
        raise BundleError(f"{what} missing: {path}")
    digest = sha256_file(path)
    if digest != sha256:
        raise BundleHashError(f"{path.name} sha256 {digest[:12]}... does not match the manifest's "
                              f"{sha256[:12]}...{why}")
    return path


def verify_refined(root: str | Path, manifest: Manifest) -> Path:
    """The refined weights file of ``manifest.refined``: inside ``root``, present, with the manifest's sha256."""
    root = Path(root)
    if manifest.refined is None:
        raise BundleError(f"bundle {root} carries no refined weights")
    return _hashed_file(root, manifest.refined.file, manifest.refined.sha256, "refined weights",
                        ": the refined weights changed after the bundle was written")


def load_bundle(path: str | Path, public_key: "Ed25519PublicKey | str | Path | None" = None) -> Bundle:
    """Read and verify a bundle; raises a ``BundleError`` subclass with a one-line reason.

    ``public_key`` (a key or a key file): also require a valid signature from it, over the
    manifest bytes that are parsed here and over the graph (``hansgate.signing``).
    """
    root = Path(path)
    if not root.is_dir():
        raise BundleError(f"bundle directory not found: {root}")
    data = _manifest_bytes(root)
    signed_by = None
    if public_key is not None:
        from hansgate.signing import Signature, load_public_key, verify_bundle

        key = load_public_key(public_key) if isinstance(public_key, (str, Path)) else public_key
        signed_by = verify_bundle(root, key, manifest_bytes=data)
    manifest = parse_manifest(data, root / MANIFEST_FILE)
    if public_key is not None and Signature.read(root).graph_file != manifest.graph.file:
        raise BundleError(f"the signature covers {Signature.read(root).graph_file!r}, the manifest names "
                          f"{manifest.graph.file!r}")
    onnx_path = _hashed_file(root, manifest.graph.file, manifest.graph.sha256, "bundle graph")
    if manifest.refined is not None:
        verify_refined(root, manifest)
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
    width = outputs["logits"][-1]
    if width != len(manifest.classes):  # a dynamic class axis could not be checked against the classes
        raise BundleError(f"graph output 'logits' has {width if width is not None else 'a dynamic number of'} "
                          f"classes, the manifest {len(manifest.classes)}")
    return Bundle(root, manifest, signed_by)


def write_bundle(out: str | Path, onnx_bytes: bytes, manifest: Manifest, overwrite: bool = False,
                 extra_files: dict[str, bytes] | None = None,
                 signing_key: "Ed25519PrivateKey | str | Path | None" = None) -> Bundle:
    """Write ``model.onnx`` + ``manifest.json`` (+ extras) atomically and verify the result.

    ``signing_key`` (a key or a key file): sign the bundle as it is written (``signature.json``).
    """
    out = Path(out)
    if out.exists() and not overwrite:
        if any(out.iterdir()) if out.is_dir() else True:
            raise BundleError(f"refusing to overwrite existing {out}")
    if sha256_bytes(onnx_bytes) != manifest.graph.sha256:
        raise BundleHashError("manifest hash does not match the graph being written")
    for name in extra_files or {}:
        if not _PLAIN_FILE.fullmatch(name) or name in (MANIFEST_FILE, manifest.graph.file, "signature.json"):
            raise BundleError(f"extra bundle file {name!r} is not a plain file name of its own")
    if manifest.refined is not None and manifest.refined.file not in (extra_files or {}):
        raise BundleError(f"the manifest names refined weights {manifest.refined.file!r}, but none are written")
    with atomic_directory(out) as tmp:
        (tmp / manifest.graph.file).write_bytes(onnx_bytes)
        (tmp / MANIFEST_FILE).write_text(manifest.model_dump_json(indent=2))
        for name, data in (extra_files or {}).items():
            (tmp / name).write_bytes(data)
        public = None
        if signing_key is not None:
            from hansgate.signing import load_private_key, sign_bundle

            key = load_private_key(signing_key) if isinstance(signing_key, (str, Path)) else signing_key
            sign_bundle(tmp, key, manifest.graph.file)
            public = key.public_key()
        written = load_bundle(tmp, public_key=public)
    return Bundle(out, manifest, written.signed_by)

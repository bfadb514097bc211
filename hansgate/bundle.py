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
import shutil
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


# field numbers of onnx.proto (ModelProto.graph; GraphProto.initializer, input, output, sparse_initializer;
# TensorProto.name, external_data, data_location; SparseTensorProto.values, indices)
_MODEL_GRAPH, _GRAPH_INIT, _GRAPH_INPUT, _GRAPH_OUTPUT, _GRAPH_SPARSE = 7, 5, 11, 12, 15
_TENSOR_NAME, _TENSOR_EXTERNAL, _TENSOR_LOCATION = 8, 13, 14


def _varint(buf: memoryview, pos: int, end: int) -> tuple[int, int]:
    value, shift = 0, 0
    while True:
        if pos >= end or shift > 63:
            raise ValueError("truncated varint")
        byte = buf[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, pos
        shift += 7


def _fields(buf: memoryview, start: int, end: int) -> Any:
    """``(field number, wire type, value or (begin, end) of the bytes)`` of one protobuf message, in order."""
    pos = start
    while pos < end:
        key, pos = _varint(buf, pos, end)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = _varint(buf, pos, end)
            yield number, wire, value
        elif wire == 2:
            length, pos = _varint(buf, pos, end)
            if pos + length > end:
                raise ValueError(f"field {number} runs past its message")
            yield number, wire, (pos, pos + length)
            pos += length
        elif wire in (1, 5):
            pos += 8 if wire == 1 else 4
            if pos > end:
                raise ValueError(f"field {number} runs past its message")
        else:
            raise ValueError(f"unsupported wire type {wire}")


def _external_tensor(buf: memoryview, span: tuple[int, int]) -> str | None:
    """A TensorProto's name (``"<unnamed>"`` without one) when it keeps its data in an external file,
    else ``None`` (payload skipped)."""
    name, external = "", False
    for number, wire, value in _fields(buf, *span):
        if number == _TENSOR_NAME and wire == 2:
            name = bytes(buf[value[0]:value[1]]).decode("utf-8", "replace")
        elif (number == _TENSOR_EXTERNAL and wire == 2) or (number == _TENSOR_LOCATION and wire == 0 and value == 1):
            external = True
    return (name or "<unnamed>") if external else None


def graph_signature(onnx_path: str | Path) -> tuple[list[str], dict[str, list[int | None]]]:
    """Input names and ``{output: shape}`` of an ONNX file (symbolic dims as ``None``).

    Walks the protobuf wire format over a memory map and parses only the graph's inputs and
    outputs: the weights (most of the file) are skipped, not copied, so a bundle of a VGG
    is checked without holding its graph twice. A tensor kept in an external file is refused.
    """
    import mmap

    import onnx
    from google.protobuf.message import DecodeError

    external: list[str | None] = []  # per tensor: its name when its data lie outside the file
    inputs: list[str] = []
    outputs: dict[str, list[int | None]] = {}
    try:
        with open(onnx_path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
            buf = memoryview(mm)
            try:
                for number, wire, graph in _fields(buf, 0, len(buf)):
                    if number != _MODEL_GRAPH or wire != 2:
                        continue
                    for field, kind, span in _fields(buf, *graph):
                        if kind != 2:
                            continue
                        if field in (_GRAPH_INPUT, _GRAPH_OUTPUT):
                            info = onnx.ValueInfoProto.FromString(bytes(buf[span[0]:span[1]]))
                            if field == _GRAPH_INPUT:
                                inputs.append(info.name)
                            else:
                                dims = info.type.tensor_type.shape.dim
                                outputs[info.name] = [d.dim_value if d.HasField("dim_value") else None for d in dims]
                        elif field == _GRAPH_INIT:
                            external.append(_external_tensor(buf, span))
                        elif field == _GRAPH_SPARSE:
                            external += [_external_tensor(buf, part) for n, k, part in _fields(buf, *span)
                                         if k == 2 and n in (1, 2)]  # SparseTensorProto.values, .indices
            finally:
                buf.release()
    except (ValueError, OSError, DecodeError) as exc:
        raise BundleError(f"cannot parse ONNX graph {onnx_path}: {exc}") from exc
    outside = [name for name in external if name is not None]
    if outside:  # data outside the hashed file would escape both the hash and the signature
        raise BundleError(f"graph {onnx_path} keeps tensors in external files ({outside[:3]}); bundles must be "
                          "one self-contained ONNX file")
    if not outputs:
        raise BundleError(f"cannot parse ONNX graph {onnx_path}: it declares no graph outputs")
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


def write_bundle(out: str | Path, onnx_bytes: bytes | Path, manifest: Manifest, overwrite: bool = False,
                 extra_files: dict[str, bytes] | None = None,
                 signing_key: "Ed25519PrivateKey | str | Path | None" = None) -> Bundle:
    """Write ``model.onnx`` + ``manifest.json`` (+ extras) atomically and verify the result.

    ``onnx_bytes``: the graph, or a file holding it (copied in chunks: a large model's graph need
    not be in memory). ``signing_key`` (a key or a key file): sign the bundle as it is written
    (``signature.json``).
    """
    out = Path(out)
    if out.exists() and not overwrite:
        if any(out.iterdir()) if out.is_dir() else True:
            raise BundleError(f"refusing to overwrite existing {out}")
    graph_sha = sha256_file(onnx_bytes) if isinstance(onnx_bytes, Path) else sha256_bytes(onnx_bytes)
    if graph_sha != manifest.graph.sha256:
        raise BundleHashError("manifest hash does not match the graph being written")
    for name in extra_files or {}:
        if not _PLAIN_FILE.fullmatch(name) or name in (MANIFEST_FILE, manifest.graph.file, "signature.json"):
            raise BundleError(f"extra bundle file {name!r} is not a plain file name of its own")
    if manifest.refined is not None and manifest.refined.file not in (extra_files or {}):
        raise BundleError(f"the manifest names refined weights {manifest.refined.file!r}, but none are written")
    with atomic_directory(out) as tmp:
        if isinstance(onnx_bytes, Path):
            shutil.copyfile(onnx_bytes, tmp / manifest.graph.file)
        else:
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

"""Detached Ed25519 signatures of bundles: who wrote this manifest and this graph.

The hashes in the manifest detect an accidental change of the graph, but anyone who can
edit the graph can edit the hash beside it. A signature made with a private key that
only the publisher holds closes that gap: ``sign_bundle`` writes ``signature.json`` next
to the manifest, and ``verify_bundle`` (``load_bundle(..., public_key=...)``, the gateway's
``HANSGATE_PUBLIC_KEY``) refuses a bundle whose manifest or graph changed by one byte.

What is signed is ``payload()``: a domain tag, the sha256 of ``manifest.json``'s exact
bytes, the graph's file name and the sha256 of its bytes. Other files of the bundle (the served
model's torch weights, ``manifest.refined``) are covered through the sha256 the signed manifest
records, which ``load_bundle`` checks. Keys are PEM (PKCS#8 private,
SubjectPublicKeyInfo public; ``openssl genpkey -algorithm ed25519`` makes them too) or
OpenSSH (``ssh-keygen -t ed25519``). Torch-free, like the rest of the bundle contract.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from hansgate.errors import ConfigError, SignatureError

__all__ = ["SIGNATURE_FILE", "ALGORITHM", "payload", "key_id", "load_private_key", "load_public_key",
           "generate_key_pair", "sign_bundle", "verify_bundle", "Signature"]

SIGNATURE_FILE = "signature.json"
ALGORITHM = "ed25519"
_TAG = b"hansgate-bundle-signature-v1"
_FILE = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9_.-]{0,127}")
_MAX_SIGNATURE_BYTES = 4096


if TYPE_CHECKING:
    from types import ModuleType

    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey


def _crypto() -> "ModuleType":  # imported lazily: `hansgate --help` and unsigned bundles do not need it
    from cryptography.hazmat.primitives.asymmetric import ed25519

    return ed25519


def payload(manifest_bytes: bytes, graph_file: str, graph_sha256: str) -> bytes:
    """The bytes that are signed: tag, sha256(manifest.json), graph file name, sha256(graph)."""
    return b"\n".join([_TAG, hashlib.sha256(manifest_bytes).hexdigest().encode(), graph_file.encode(),
                       graph_sha256.encode()])


def _raw_public(public_key: Ed25519PublicKey) -> bytes:
    from cryptography.hazmat.primitives import serialization

    return public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def key_id(public_key: Ed25519PublicKey) -> str:
    """First 16 hex digits of the sha256 of the raw 32-byte public key (names a key in messages)."""
    return hashlib.sha256(_raw_public(public_key)).hexdigest()[:16]


def _read_key_file(path: str | Path, what: str) -> bytes:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{what} key file not found: {p}")
    data = p.read_bytes()
    if len(data) > 16384:
        raise ConfigError(f"{what} key file {p} is larger than any Ed25519 key file")
    return data


def load_private_key(path: str | Path) -> Ed25519PrivateKey:
    """An unencrypted Ed25519 private key from a PEM (PKCS#8) or OpenSSH file."""
    from cryptography.exceptions import UnsupportedAlgorithm
    from cryptography.hazmat.primitives import serialization

    ed25519 = _crypto()
    data = _read_key_file(path, "private")
    try:
        key: object
        if data.lstrip().startswith(b"-----BEGIN OPENSSH PRIVATE KEY"):
            key = serialization.load_ssh_private_key(data, password=None)
        else:
            key = serialization.load_pem_private_key(data, password=None)
    except TypeError as exc:  # cryptography: "Password was not given but private key is encrypted"
        raise ConfigError(f"private key {path} is encrypted; hansgate needs an unencrypted key file "
                          "(keep it in a secret store)") from exc
    except (ValueError, UnsupportedAlgorithm) as exc:
        raise ConfigError(f"cannot read private key {path}: not a PEM or OpenSSH private key") from exc
    if not isinstance(key, ed25519.Ed25519PrivateKey):
        raise ConfigError(f"private key {path} is not an Ed25519 key")
    return key


def load_public_key(path: str | Path) -> Ed25519PublicKey:
    """An Ed25519 public key from a PEM (SubjectPublicKeyInfo) or OpenSSH (``ssh-ed25519 ...``) file."""
    from cryptography.exceptions import UnsupportedAlgorithm
    from cryptography.hazmat.primitives import serialization

    ed25519 = _crypto()
    data = _read_key_file(path, "public")
    try:
        key: object
        if data.lstrip().startswith(b"ssh-"):
            key = serialization.load_ssh_public_key(data.strip())
        else:
            key = serialization.load_pem_public_key(data)
    except (ValueError, UnsupportedAlgorithm) as exc:
        raise ConfigError(f"cannot read public key {path}: not a PEM or OpenSSH public key") from exc
    if not isinstance(key, ed25519.Ed25519PublicKey):
        raise ConfigError(f"public key {path} is not an Ed25519 key")
    return key


def generate_key_pair(private_path: str | Path, public_path: str | Path, overwrite: bool = False) -> str:
    """Write a new Ed25519 key pair (private PEM mode 0600, public PEM 0644); returns its key id."""
    from cryptography.hazmat.primitives import serialization

    private_path, public_path = Path(private_path), Path(public_path)
    for p in (private_path, public_path):
        if p.exists() and not overwrite:
            raise ConfigError(f"refusing to overwrite existing key file {p}")
    key = _crypto().Ed25519PrivateKey.generate()
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())
    private_path.parent.mkdir(parents=True, exist_ok=True)
    public_path.parent.mkdir(parents=True, exist_ok=True)
    if overwrite:
        private_path.unlink(missing_ok=True)
    fd = os.open(private_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)  # never readable by others
    with os.fdopen(fd, "wb") as fh:
        fh.write(pem)
    public_path.write_bytes(key.public_key().public_bytes(serialization.Encoding.PEM,
                                                          serialization.PublicFormat.SubjectPublicKeyInfo))
    return key_id(key.public_key())


@dataclass(frozen=True)
class Signature:
    """A parsed ``signature.json``."""

    key_id: str
    graph_file: str
    signature: bytes

    @classmethod
    def read(cls, root: Path) -> "Signature":
        file = root / SIGNATURE_FILE
        if not file.is_file():
            raise SignatureError(f"bundle {root} is not signed (no {SIGNATURE_FILE}), but a public key is configured")
        try:
            if file.stat().st_size > _MAX_SIGNATURE_BYTES:
                raise ValueError("too large")
            raw = json.loads(file.read_bytes())
            if raw.get("algorithm") != ALGORITHM:
                raise ValueError(f"algorithm {raw.get('algorithm')!r} is not {ALGORITHM!r}")
            sig = base64.b64decode(raw["signature"], validate=True)
            graph_file = raw["graph_file"]
            if len(sig) != 64 or not isinstance(graph_file, str) or not _FILE.fullmatch(graph_file):
                raise ValueError("bad signature length or graph file name")
            return cls(str(raw.get("key_id", "?"))[:16], graph_file, sig)
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            raise SignatureError(f"malformed {file}: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}"
                                 ) from exc


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def sign_bundle(root: str | Path, private_key: Ed25519PrivateKey, graph_file: str | None = None) -> Path:
    """Sign ``manifest.json`` and the graph of the bundle at ``root``; writes ``signature.json`` atomically.

    ``graph_file`` defaults to the manifest's ``graph.file`` (the caller has verified the bundle).
    """
    root = Path(root)
    manifest_bytes = (root / "manifest.json").read_bytes()
    if graph_file is None:
        graph_file = str(json.loads(manifest_bytes)["graph"].get("file", "model.onnx"))
    if not _FILE.fullmatch(graph_file):
        raise SignatureError(f"graph file name {graph_file!r} is not a plain file name")
    message = payload(manifest_bytes, graph_file, _sha256_file(root / graph_file))
    doc = {"algorithm": ALGORITHM, "key_id": key_id(private_key.public_key()), "graph_file": graph_file,
           "signature": base64.b64encode(private_key.sign(message)).decode()}
    tmp = root / f".{SIGNATURE_FILE}.tmp"
    tmp.write_text(json.dumps(doc, indent=2) + "\n")
    os.replace(tmp, root / SIGNATURE_FILE)
    return root / SIGNATURE_FILE


def verify_bundle(root: str | Path, public_key: Ed25519PublicKey, manifest_bytes: bytes | None = None) -> str:
    """Check ``signature.json`` against ``public_key``; returns the key id, raises ``SignatureError``.

    ``manifest_bytes``: the exact bytes the caller is about to parse (so what is verified is
    what is used); read from disk when omitted.
    """
    from cryptography.exceptions import InvalidSignature

    root = Path(root)
    sig = Signature.read(root)
    if manifest_bytes is None:
        manifest_bytes = (root / "manifest.json").read_bytes()
    graph = root / sig.graph_file
    if not graph.is_file():
        raise SignatureError(f"signed graph {sig.graph_file!r} is missing from {root}")
    expected = key_id(public_key)
    try:
        public_key.verify(sig.signature, payload(manifest_bytes, sig.graph_file, _sha256_file(graph)))
    except InvalidSignature:
        why = ("the manifest or the graph changed after signing" if sig.key_id == expected
               else f"it was signed by key {sig.key_id}, not the trusted key {expected}")
        raise SignatureError(f"signature of bundle {root} does not verify: {why}") from None
    return expected

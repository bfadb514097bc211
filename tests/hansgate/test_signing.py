"""Detached Ed25519 bundle signatures (issue 13, item 7): with a key configured, a bundle whose manifest
or graph changed by one byte after signing is refused; keys from openssl/ssh-keygen formats work."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519

from hansgate.bundle import load_bundle, write_bundle
from hansgate.cli import main
from hansgate.errors import ConfigError, SignatureError
from hansgate.signing import SIGNATURE_FILE, generate_key_pair, load_private_key, load_public_key, sign_bundle
from tests.service.bundles import make_bundle


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return make_bundle(tmp_path_factory.mktemp("tiny") / "b", concepts=False).path


@pytest.fixture
def keys(tmp_path) -> tuple[Path, Path]:
    generate_key_pair(tmp_path / "k.key", tmp_path / "k.pub")
    return tmp_path / "k.key", tmp_path / "k.pub"


@pytest.fixture
def signed(tiny, tmp_path, keys) -> Path:
    b = Path(shutil.copytree(tiny, tmp_path / "b"))
    sign_bundle(b, load_private_key(keys[0]))
    return b


def _flip(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


def test_signed_bundle_verifies_and_names_its_key(signed, keys):
    b = load_bundle(signed, public_key=keys[1])
    assert b.signed_by and len(b.signed_by) == 16
    assert load_bundle(signed).signed_by is None  # no key configured: the signature is not required
    assert (keys[0].stat().st_mode & 0o777) == 0o600


@pytest.mark.parametrize("which, where", [("manifest.json", "first"), ("manifest.json", "middle"),
                                          ("manifest.json", "last"), ("model.onnx", "first"),
                                          ("model.onnx", "middle"), ("model.onnx", "last")])
def test_one_changed_byte_is_refused(signed, keys, which, where):
    """Even a byte that keeps the manifest valid JSON with the same meaning (trailing whitespace)."""
    path = signed / which
    size = path.stat().st_size
    offset = {"first": 0, "middle": size // 2, "last": size - 1}[where]
    if which == "manifest.json" and where == "last":
        path.write_bytes(path.read_bytes() + b" ")
    else:
        _flip(path, offset)
    with pytest.raises(SignatureError, match="changed after signing") as info:
        load_bundle(signed, public_key=keys[1])
    assert "\n" not in str(info.value)


def test_unsigned_or_foreign_or_malformed_signatures_are_refused(tiny, signed, keys, tmp_path):
    with pytest.raises(SignatureError, match="not signed"):
        load_bundle(tiny, public_key=keys[1])
    generate_key_pair(tmp_path / "other.key", tmp_path / "other.pub")
    with pytest.raises(SignatureError, match="not the trusted key"):
        load_bundle(signed, public_key=tmp_path / "other.pub")
    sig = json.loads((signed / SIGNATURE_FILE).read_text())
    for bad in ({**sig, "signature": "!!"}, {**sig, "algorithm": "rsa"}, {**sig, "graph_file": "../x.onnx"}, []):
        (signed / SIGNATURE_FILE).write_text(json.dumps(bad))
        with pytest.raises(SignatureError, match="malformed"):
            load_bundle(signed, public_key=keys[1])


def test_re_signing_an_edited_manifest_needs_the_private_key(signed, keys, tmp_path):
    """An attacker who edits the manifest and recomputes hashes still lacks the key."""
    raw = json.loads((signed / "manifest.json").read_text())
    raw["method"]["name"] = "tampered"
    (signed / "manifest.json").write_text(json.dumps(raw))
    generate_key_pair(tmp_path / "attacker.key", tmp_path / "attacker.pub")
    sign_bundle(signed, load_private_key(tmp_path / "attacker.key"))
    with pytest.raises(SignatureError, match="not the trusted key"):
        load_bundle(signed, public_key=keys[1])
    assert load_bundle(signed, public_key=tmp_path / "attacker.pub").manifest.method.name == "tampered"


def test_openssh_and_pem_keys_from_other_tools(tiny, tmp_path):
    key = ed25519.Ed25519PrivateKey.generate()
    (tmp_path / "id").write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                                    serialization.NoEncryption()))
    (tmp_path / "id.pub").write_bytes(key.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                                                    serialization.PublicFormat.OpenSSH))
    b = Path(shutil.copytree(tiny, tmp_path / "b"))
    sign_bundle(b, load_private_key(tmp_path / "id"))
    assert load_bundle(b, public_key=tmp_path / "id.pub").signed_by


def test_bad_key_files_are_one_line_config_errors(tmp_path):
    enc = ed25519.Ed25519PrivateKey.generate().private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.BestAvailableEncryption(b"pw"))
    (tmp_path / "enc.key").write_bytes(enc)
    with pytest.raises(ConfigError, match="encrypted"):
        load_private_key(tmp_path / "enc.key")
    (tmp_path / "junk.pub").write_text("hello")
    with pytest.raises(ConfigError, match="not a PEM or OpenSSH public key"):
        load_public_key(tmp_path / "junk.pub")
    with pytest.raises(ConfigError, match="not found"):
        load_public_key(tmp_path / "missing.pub")
    from cryptography.hazmat.primitives.asymmetric import ec

    (tmp_path / "ec.pub").write_bytes(ec.generate_private_key(ec.SECP256R1()).public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    with pytest.raises(ConfigError, match="not an Ed25519 key"):
        load_public_key(tmp_path / "ec.pub")


def test_write_bundle_can_sign_as_it_writes(tiny, keys, tmp_path):
    manifest = load_bundle(tiny).manifest
    out = write_bundle(tmp_path / "out", (tiny / "model.onnx").read_bytes(), manifest, signing_key=keys[0])
    assert out.signed_by and load_bundle(out.path, public_key=keys[1]).signed_by == out.signed_by


def test_cli_keygen_sign_verify(tiny, tmp_path, capsys):
    b = Path(shutil.copytree(tiny, tmp_path / "b"))
    assert main(["keygen", "--out", str(tmp_path / "pub")]) == 0
    assert main(["keygen", "--out", str(tmp_path / "pub")]) == 2  # never overwrites a key silently
    assert main(["sign", str(b), "--key", str(tmp_path / "pub.key")]) == 0
    assert main(["verify", str(b), "--public-key", str(tmp_path / "pub.pub")]) == 0
    assert "signature of key" in capsys.readouterr().out
    _flip(b / "model.onnx", 10)
    assert main(["verify", str(b), "--public-key", str(tmp_path / "pub.pub")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "changed after signing" in err[0]
    assert main(["sign", str(b), "--key", str(tmp_path / "pub.key")]) == 2  # refuses to sign a broken bundle
    assert "sha256" in capsys.readouterr().err

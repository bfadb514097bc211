"""``hansgate keygen``, ``hansgate sign BUNDLE --key KEY`` and ``hansgate verify BUNDLE --public-key PUB``.

One module registers the three subcommands of bundle signing (``hansgate.signing``): a
publisher makes a key pair once, signs each bundle it ships, and the gateway refuses
unsigned or edited bundles once ``HANSGATE_PUBLIC_KEY`` names the public key.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def add_parser(sub: argparse._SubParsersAction) -> None:
    k = sub.add_parser("keygen", help="make an Ed25519 key pair for signing bundles",
                       description="Writes OUT.key (private, PEM PKCS#8, mode 0600: keep it secret) and OUT.pub "
                                   "(public, PEM: give it to the gateway as HANSGATE_PUBLIC_KEY). Keys from "
                                   "`openssl genpkey -algorithm ed25519` or `ssh-keygen -t ed25519` work as well.")
    k.add_argument("--out", required=True, help="path prefix of the key files (writes OUT.key and OUT.pub)")
    k.add_argument("--force", action="store_true", help="overwrite existing key files")
    k.set_defaults(run=run_keygen)

    s = sub.add_parser("sign", help="sign a bundle (detached Ed25519 signature over manifest and graph)",
                       description="Verifies BUNDLE, then writes BUNDLE/signature.json: an Ed25519 signature over "
                                   "the exact bytes of manifest.json and the graph. A gateway with "
                                   "HANSGATE_PUBLIC_KEY refuses the bundle if either changes afterwards.")
    s.add_argument("bundle", help="bundle directory (model.onnx + manifest.json)")
    s.add_argument("--key", required=True, help="private key file (PEM or OpenSSH, unencrypted Ed25519)")
    s.set_defaults(run=run_sign)

    v = sub.add_parser("verify", help="check a bundle and its signature against a public key",
                       description="Checks BUNDLE as the gateway does (manifest, hashes, graph outputs) and, with "
                                   "--public-key, its signature. Exit code 0: valid; 2: refused, with the reason.")
    v.add_argument("bundle", help="bundle directory")
    v.add_argument("--public-key", help="public key file (PEM or OpenSSH); without it only the bundle is checked")
    v.set_defaults(run=run_verify)


def run_keygen(args: argparse.Namespace) -> int:
    from hansgate.signing import generate_key_pair

    out = Path(args.out)
    private, public = out.with_name(out.name + ".key"), out.with_name(out.name + ".pub")
    kid = generate_key_pair(private, public, overwrite=args.force)
    print(f"hansgate: key {kid}: private {private} (keep it secret), public {public}")
    return 0


def run_sign(args: argparse.Namespace) -> int:
    from hansgate.bundle import load_bundle
    from hansgate.signing import key_id, load_private_key, sign_bundle

    key = load_private_key(args.key)
    bundle = load_bundle(args.bundle)  # never sign a bundle that would be refused anyway
    path = sign_bundle(bundle.path, key, bundle.manifest.graph.file)
    load_bundle(bundle.path, public_key=key.public_key())
    print(f"hansgate: signed {bundle.path} with key {key_id(key.public_key())} -> {path}")
    return 0


def run_verify(args: argparse.Namespace) -> int:
    from hansgate.bundle import load_bundle

    bundle = load_bundle(args.bundle, public_key=args.public_key)
    how = f"signature of key {bundle.signed_by} valid" if bundle.signed_by else "signature not checked (no key)"
    print(f"hansgate: {bundle.path} verified ({bundle.manifest.method.name}, sha256 "
          f"{bundle.manifest.graph.sha256[:12]}...); {how}", file=sys.stdout)
    return 0

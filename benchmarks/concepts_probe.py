"""Can a head-only correction help an unlocalized artifact? Oracle heads on the frozen concept layer (issue 14).

RR-ClArC (and P-/A-ClArC) keep every layer up to the concept layer fixed (paper 001, Eq. 6),
so no such method can do better than the best head trained *with* the answer: here a head
fitted on concept-layer features of artifact-carrying training images with their true
labels (avgpool + linear, the ResNet's own head shape, and a linear probe on the full map),
scored on the artifact-carrying test set; and one head fitted on clean and artifact features
together (can a single head serve both?). If that oracle stays far below the clean
accuracy, the artifact has destroyed the class evidence before the concept layer and the
gap cannot be closed at that layer; the logit-8 ceiling (argmax over the other classes)
shows how much removing the shortcut class alone could give.

Usage: ``python benchmarks/concepts_probe.py --out benchmarks/results/concepts_probe.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hansgate.concepts.cav import default_concept_layer, layer_activations  # noqa: E402
from hansgate.data.digits import CleverHansConfig, make_clever_hans  # noqa: E402
from hansgate.nn.models import build_builtin  # noqa: E402,F401
from hansgate.nn.training import TrainConfig, predict_logits  # noqa: E402
from hansgate.refinement.evaluation import BenchmarkConfig, train_demo_model  # noqa: E402

TARGET = 8


def _fit_head(feats: torch.Tensor, y: torch.Tensor, kind: str, k: int, epochs: int = 60, seed: int = 0) -> Any:
    torch.manual_seed(seed)
    d = feats.shape[1] if kind == "avgpool+linear" else feats[0].numel()
    head = torch.nn.Linear(d, k)
    opt = torch.optim.Adam(head.parameters(), lr=1e-2)
    z = feats.mean((2, 3)) if kind == "avgpool+linear" else feats.flatten(1)
    mu, sd = z.mean(0), z.std(0) + 1e-6
    gen = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        for idx in torch.randperm(len(y), generator=gen).split(128):
            opt.zero_grad()
            F.cross_entropy(head((z[idx] - mu) / sd), y[idx]).backward()
            opt.step()
    return lambda f: head(((f.mean((2, 3)) if kind == "avgpool+linear" else f.flatten(1)) - mu) / sd)


def probe(model_name: str, artifact: str, train_epochs: int, n_probe: int) -> dict[str, Any]:
    data = make_clever_hans(CleverHansConfig(artifact=artifact, seed=0, train_copies=4))
    t0 = time.perf_counter()
    model = train_demo_model(BenchmarkConfig(model=model_name, train=TrainConfig(epochs=train_epochs)), data, seed=0)
    t_train = time.perf_counter() - t0
    layer = default_concept_layer(model, data.x_test[:1])
    idx = torch.randperm(len(data.y_train), generator=torch.Generator().manual_seed(3))[:n_probe]
    x_tr, y_tr = data.artifact.apply(data.x_train[idx]), data.y_train[idx]
    f_tr = layer_activations(model, layer, x_tr)
    f_te_p = layer_activations(model, layer, data.x_test_poisoned)
    f_te_c = layer_activations(model, layer, data.x_test)
    k = len(data.classes)
    logits_p = predict_logits(model, data.x_test_poisoned)
    masked = logits_p.clone()
    masked[:, TARGET] = -float("inf")
    non8 = data.y_test != TARGET
    ceiling = (non8 & (masked.argmax(1) == data.y_test)) | (~non8)
    out: dict[str, Any] = {
        "model": model_name, "artifact": artifact, "layer": layer, "train_seconds": t_train, "n_probe": n_probe,
        "model_clean_acc": float((predict_logits(model, data.x_test).argmax(1) == data.y_test).float().mean()),
        "model_biased_acc": float((logits_p.argmax(1) == data.y_test).float().mean()),
        "ceiling_without_target_logit": float(ceiling.float().mean()),
        "oracle_heads": {},
    }
    for kind in ("avgpool+linear", "linear on full map"):
        head = _fit_head(f_tr, y_tr, kind, k)
        with torch.no_grad():
            out["oracle_heads"][f"{kind}, fitted on artifact"] = {
                "biased_acc": float((head(f_te_p).argmax(1) == data.y_test).float().mean()),
                "clean_acc": float((head(f_te_c).argmax(1) == data.y_test).float().mean())}
    # the same head shape fitted on clean features only, and on clean + artifact features (one head for both)
    f_clean = layer_activations(model, layer, data.x_train[idx])
    for label, feats, labels in (("fitted on clean", f_clean, y_tr),
                                 ("fitted on clean + artifact", torch.cat([f_clean, f_tr]), torch.cat([y_tr, y_tr]))):
        for kind in ("avgpool+linear", "linear on full map"):
            head = _fit_head(feats, labels, kind, k)
            with torch.no_grad():
                out["oracle_heads"][f"{kind}, {label}"] = {
                    "biased_acc": float((head(f_te_p).argmax(1) == data.y_test).float().mean()),
                    "clean_acc": float((head(f_te_c).argmax(1) == data.y_test).float().mean())}
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="benchmarks/results/concepts_probe.json")
    ap.add_argument("--settings", nargs="+", default=["small_resnet:brightness"])
    ap.add_argument("--train-epochs", type=int, default=10)
    ap.add_argument("--n-probe", type=int, default=3000)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    res = {"load_average": os.getloadavg(), "torch": torch.__version__, "runs": []}
    for pair in args.settings:
        name, _, artifact = pair.partition(":")
        res["runs"].append(probe(name, artifact, args.train_epochs, args.n_probe))
        print(json.dumps(res["runs"][-1], indent=2), flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(res, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

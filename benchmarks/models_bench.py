"""The torchvision model matrix at 224 px (issue 12, "a model matrix"): refine, export, serve, audit.

For each architecture (random init, seeded, ``num_classes=10``) the benchmark writes an
ImageFolder of ``--images`` smooth random RGB images at 224 px (plus an audit folder of
``--audit-images``), labelled with the model's own predictions on exactly the pixels the
CLI will read back (so every sample is verified), saves the weights as safetensors and runs
the real command line in subprocesses:

- ``hansgate refine --model torchvision:ARCH --method pca-egem`` with ImageNet
  ``--mean/--std``: wall time and peak RSS of that process (read by a small wrapper process
  that starts it: an exec'd child's ``ru_maxrss`` starts at its parent's, and this one is large), the automatic layers and the export's max |logit difference| from the
  manifest;
- the gateway's inference runtime in-process (``service.runtime.OnnxRuntime`` on the
  bundle, CPU, the threads given) at batch 1 and 32, rows/s, with a bare onnxruntime
  session on the same ``model.onnx`` beside it (no HTTP server: one BentoML server per
  architecture does not fit the time this machine gives);
- ``hansgate audit`` on the audit folder (``AUDIT_FLAGS``: no PDF, influence, concepts or
  known-artifact tests, 16 heatmaps, which keeps the shared machine's run bounded): wall
  time and peak RSS.

Batch-norm statistics are recalibrated on the refinement images before anything else (a
random init's default statistics make the logits tie), and a linear layer initialised to
zero (torchvision's ViT head) is redrawn, so that no comparison is vacuous.

Every architecture's failure is recorded with its error text; the run goes on. The JSON
is rewritten after each architecture, so a partial run leaves what it measured.

Usage: ``nice python benchmarks/models_bench.py [--archs resnet18 ...] [--images 48]``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from timing import run_with_usage  # noqa: E402  (benchmarks/timing.py, beside this script)

ARCHS = ("resnet18", "vit_b_16", "mobilenet_v3_small", "efficientnet_b0", "convnext_tiny", "vgg11_bn", "resnet50")
AUDIT_FLAGS = ("--no-pdf", "--no-influence", "--no-concepts", "--heatmaps", "16", "--artifacts")  # no artifact tests
MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)
SIZE = 224
RSS_BAR_MIB = 3 * 1024


def smooth_images(n: int, seed: int) -> np.ndarray:
    """``n`` uint8 RGB images ``[n, 224, 224, 3]``: upsampled low-frequency noise plus a coloured square."""
    g = torch.Generator().manual_seed(seed)
    low = torch.rand(n, 3, 7, 7, generator=g)
    x = torch.nn.functional.interpolate(low, size=(SIZE, SIZE), mode="bicubic", align_corners=False)
    for i in range(n):
        r, c = torch.randint(0, SIZE - 64, (2,), generator=g).tolist()
        x[i, :, r : r + 64, c : c + 64] = torch.rand(3, 1, 1, generator=g)
    return (x.clamp(0, 1) * 255).round().byte().permute(0, 2, 3, 1).numpy()


def normalised(images: np.ndarray) -> torch.Tensor:
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255.0
    return (x - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)


def recalibrate(model: torch.nn.Module, images: np.ndarray) -> bool:
    """Batch-norm running statistics from the images (cumulative average): at random init the default
    statistics let activations shrink layer by layer until the logits tie. Returns whether it had BN."""
    bns = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None
    if bns:
        model.train()
        with torch.no_grad():
            for i in range(0, len(images), 16):
                model(normalised(images[i : i + 16]))
    model.eval()
    return bool(bns)


def zero_head(model: torch.nn.Module) -> str | None:
    """torchvision's ViT initialises its linear head to zero (all logits 0, every comparison vacuous):
    redraw it (normal, std 0.02, seeded). Returns the head's name when it did."""
    for name, mod in model.named_modules():
        if isinstance(mod, torch.nn.Linear) and not mod.weight.any():
            torch.nn.init.normal_(mod.weight, std=0.02)
            return name
    return None


def predict(model: torch.nn.Module, images: np.ndarray) -> np.ndarray:
    x = normalised(images)
    with torch.no_grad():
        return torch.cat([model(x[i : i + 16]).argmax(1) for i in range(0, len(x), 16)]).numpy()


def write_folder(root: Path, images: np.ndarray, labels: np.ndarray) -> None:
    from PIL import Image

    for k in range(10):
        (root / f"c{k}").mkdir(parents=True, exist_ok=True)
    for i, (im, y) in enumerate(zip(images, labels)):
        Image.fromarray(im).save(root / f"c{int(y)}" / f"{i:04d}.png")


def timed(cmd: list[str], log: Path) -> dict:
    """Run ``cmd``; wall seconds, its own CPU seconds and peak RSS (MiB), return code, output tail, load
    averages (through ``timing.run_with_usage``: this process holds models and graphs)."""
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="2", MKL_NUM_THREADS="2")
    load_before = os.getloadavg()
    start = time.perf_counter()
    with open(log, "w") as out:
        proc, usage = run_with_usage(cmd, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)  # inherits nice
    wall = time.perf_counter() - start
    text = log.read_text(errors="replace").strip()
    return {"wall_seconds": round(wall, 2), "cpu_seconds": round(usage["cpu_seconds"], 1),
            "load_average_before": load_before, "load_average_after": os.getloadavg(),
            "peak_rss_mib": round(usage["peak_rss_mib"], 1), "returncode": proc.returncode,
            "output_tail": text.splitlines()[-3:] if text else []}


def rows_per_second(run: Callable[[np.ndarray], object], x: np.ndarray, budget: float = 3.0) -> float:
    run(x)  # warm-up
    n, start = 0, time.perf_counter()
    while time.perf_counter() - start < budget or n == 0:
        run(x)
        n += 1
    return round(n * len(x) / (time.perf_counter() - start), 2)


def throughput(bundle_dir: Path, threads: int) -> dict:
    import onnxruntime as ort

    from hansgate.bundle import load_bundle
    from hansgate.service.runtime import OnnxRuntime

    gateway = OnnxRuntime(load_bundle(bundle_dir), preference="cpu", threads=threads)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    bare = ort.InferenceSession(str(bundle_dir / "model.onnx"), opts, providers=["CPUExecutionProvider"])
    name = bare.get_inputs()[0].name
    rng = np.random.default_rng(0)
    out: dict = {"measured": "in-process: service.runtime.OnnxRuntime (the gateway's inference path, no HTTP) "
                             "beside a bare onnxruntime session", "threads": threads}
    for batch in (1, 32):
        x = rng.random((batch, 3, SIZE, SIZE), dtype=np.float32)
        out[f"gateway_rows_per_s_batch{batch}"] = rows_per_second(gateway.run, x)
        out[f"bare_ort_rows_per_s_batch{batch}"] = rows_per_second(lambda v: bare.run(None, {name: v}), x)
    return out


def bench_arch(arch: str, work: Path, n_images: int, n_audit: int, threads: int, skip_audit: bool = False) -> dict:
    import torchvision
    from safetensors.torch import save_file

    torch.manual_seed(0)
    model = torchvision.models.get_model(arch, weights=None, num_classes=10).eval()
    head = zero_head(model)
    images = smooth_images(n_images + n_audit, seed=1)
    bn = recalibrate(model, images[:n_images])
    weights = work / "weights.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(weights))
    labels = predict(model, images)
    write_folder(work / "data", images[:n_images], labels[:n_images])
    write_folder(work / "audit_data", images[n_images:], labels[n_images:])
    order = np.argsort(labels[n_images:], kind="stable")  # ImageFolder order: by class, then file name
    with open(work / "attributes.csv", "w") as fh:
        fh.write("index,site\n" + "".join(f"{i},{'AB'[int(j) % 2]}\n" for i, j in enumerate(order)))
    rec: dict = {"classes_predicted": int(len(np.unique(labels[:n_images]))), "n_images": n_images,
                 "batchnorm_recalibrated_on_the_refinement_images": bn, "zero_head_reinitialised": head}
    del model
    bundle = work / "bundle"
    cli = [sys.executable, "-m", "hansgate.cli"]
    rec["refine"] = timed([*cli, "refine", "--model", f"torchvision:{arch}", "--weights", str(weights), "--data",
                           str(work / "data"), "--method", "pca-egem", "--channels", "3", "--image-size", "224", "224",
                           "--mean", *map(str, MEAN), "--std", *map(str, STD), "--calibration-share", "0",
                           "--out", str(bundle), "--quiet"], work / "refine.log")
    rec["refine"]["peak_rss_under_3gb"] = rec["refine"]["peak_rss_mib"] < RSS_BAR_MIB
    if rec["refine"]["returncode"] != 0:
        rec["error"] = "refine failed: " + " | ".join(rec["refine"]["output_tail"])
        return rec
    manifest = json.loads((bundle / "manifest.json").read_text())
    rec["layers"] = manifest["method"]["layers"]
    rec["alpha"] = manifest["method"]["hyperparameters"].get("alpha")
    rec["export_max_abs_logit_diff"] = manifest["graph"]["max_abs_logit_diff"]
    rec["opset"] = manifest["graph"].get("opset")
    rec["onnx_mib"] = round((bundle / "model.onnx").stat().st_size / 2**20, 1)
    try:
        rec["serving"] = throughput(bundle, threads)
    except Exception as exc:  # record and go on: one architecture must not stop the matrix
        rec["serving"] = {"error": f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"}
    if skip_audit:
        rec["audit"] = {"skipped": "--skip-audit (time on the shared machine)"}
        return rec
    rec["audit"] = timed([*cli, "audit", str(bundle), "--data", str(work / "audit_data"), "--attributes",
                          str(work / "attributes.csv"), "--source-weights", str(weights), "--out", str(work / "report"),
                          *AUDIT_FLAGS, "--quiet"], work / "audit.log")
    rec["audit"]["n_images"] = n_audit
    if rec["audit"]["returncode"] != 0:
        rec["error"] = "audit failed: " + " | ".join(rec["audit"]["output_tail"])
    else:
        report = json.loads((work / "report" / "report.json").read_text())
        rec["audit"]["attribution_notes"] = (report.get("attributions") or {}).get("notes")
        rec["audit"]["attribution_methods_used"] = (report.get("attributions") or {}).get("methods_used")
    return rec


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--archs", nargs="+", default=list(ARCHS))
    ap.add_argument("--images", type=int, default=48)
    ap.add_argument("--audit-images", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--skip-audit", action="store_true", help="refine, export and serve only")
    ap.add_argument("--keep-bundles", type=Path, help="copy each architecture's bundle to KEEP_BUNDLES/ARCH "
                    "(e.g. for benchmarks/gateway_model_bench.py)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "models.json"))
    args = ap.parse_args()
    result: dict = {
        "what": "torchvision model matrix at 224 px: hansgate refine --method pca-egem from an ImageFolder "
                "(random init, num_classes=10, labels = the model's own predictions), export parity, gateway "
                "throughput in-process, hansgate audit",
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__,
                    "load_average_at_start": os.getloadavg(), "shared": "2 cores shared with other jobs; runs niced"},
        "requested_archs": args.archs, "not_run": [a for a in ARCHS if a not in args.archs],
        "rss_bar_mib": RSS_BAR_MIB, "audit_flags": " ".join(AUDIT_FLAGS) + " (none: no known-artifact tests)",
        "architectures": {},
    }
    for arch in args.archs:
        with tempfile.TemporaryDirectory(prefix=f"models_bench_{arch}_") as tmp:
            start = time.perf_counter()
            try:
                rec = bench_arch(arch, Path(tmp), args.images, args.audit_images, args.threads, args.skip_audit)
            except Exception as exc:  # record and go on
                rec = {"error": f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"}
            rec["total_seconds"] = round(time.perf_counter() - start, 1)
            if args.keep_bundles is not None and (Path(tmp) / "bundle" / "manifest.json").exists():
                shutil.copytree(Path(tmp) / "bundle", args.keep_bundles / arch, dirs_exist_ok=True)
        result["architectures"][arch] = rec
        print(arch, json.dumps(rec)[:400], flush=True)
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()

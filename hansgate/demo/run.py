"""The embedded default end to end: benchmark, demo bundle, results, demo data.

``run_demo`` writes into ``out``:

- ``results.json`` / ``results.md`` / ``results.png`` — the Sec. 4.3 table over seeds;
- ``bundle/`` — the seed-0 model refined with ``bundle_method`` (default PCA-EGEM);
- ``source_model.safetensors`` — the seed-0 "third-party" model, for audits;
- ``data/{refine,test,test_poisoned,deploy}.npz`` — the seed-0 splits (``deploy`` with
  its subgroup attributes), so the other commands can run on the same data.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from pydantic import BaseModel, ConfigDict, Field
from safetensors.torch import save_file

from hansgate.data.datasets import save_npz
from hansgate.errors import ConfigError
from hansgate.manifest import Evaluation, InputSpec, SourceModel, SubgroupAttribute
from hansgate.nn.models import source_sha256
from hansgate.nn.training import TrainConfig, predict_logits
from hansgate.refinement.concept_heads import ConceptHeads, watch_concept
from hansgate.refinement.evaluation import (
    BenchmarkConfig,
    SeedRun,
    run_benchmark,
    write_results,
)
from hansgate.refinement.methods import RefineConfig
from hansgate.refinement.pipeline import build_bundle
from hansgate.refinement.registry import names

__all__ = ["DemoConfig", "run_demo", "subgroup_specs"]


class DemoConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    benchmark: BenchmarkConfig = BenchmarkConfig()
    bundle_method: str = "pca-egem"
    bundle_seed_index: int = Field(0, ge=0)

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> "DemoConfig":
        if args.seeds < 1:
            raise ConfigError("--seeds must be at least 1")
        methods = tuple(args.methods) if args.methods else tuple(names("pruning"))
        if args.bundle_method not in methods:
            raise ConfigError(f"--bundle-method {args.bundle_method!r} is not among the methods run {list(methods)}")
        bench = BenchmarkConfig(model=args.model, artifact=args.artifact, seeds=tuple(range(args.seeds)),
                                methods=methods, refine_per_class=args.refine_per_class,
                                train=TrainConfig(epochs=args.epochs), refine=RefineConfig())
        return cls(benchmark=bench, bundle_method=args.bundle_method)


def subgroup_specs(run: SeedRun, model_preds: np.ndarray) -> list[SubgroupAttribute]:
    """Declared attributes of the demo data with the bundled model's recall on the deploy split."""
    from hansgate.audit.subgroups import recall_by_group

    specs = []
    for name, values in run.data.attributes_deploy.items():
        recall = recall_by_group(run.data.y_deploy.numpy(), model_preds, values, run.data.classes)
        allowed = sorted({"A", "B"} if name == "site" else {"thin", "thick"})
        specs.append(SubgroupAttribute(name=name, values=allowed, baseline_recall=recall))
    return specs


def _save_data(run: SeedRun, out: Path) -> None:
    d = run.data
    save_npz(out / "refine.npz", run.x_verified, run.y_verified, d.classes)
    save_npz(out / "test.npz", d.x_test, d.y_test, d.classes, **{f"attr_{k}": v for k, v in d.attributes_test.items()})
    save_npz(out / "test_poisoned.npz", d.x_test_poisoned, d.y_test, d.classes)
    save_npz(out / "deploy.npz", d.x_deploy, d.y_deploy, d.classes,
             **{f"attr_{k}": v for k, v in d.attributes_deploy.items()})


def run_demo(cfg: DemoConfig, out_dir: str | Path, progress: bool = True) -> str:
    """Run the demo into ``out_dir``; returns the results table as Markdown."""
    out = Path(out_dir)
    result = run_benchmark(cfg.benchmark, progress=progress)
    run = result.runs[cfg.bundle_seed_index]
    refined = run.results[cfg.bundle_method]
    d = run.data
    before = run.scores["original"]
    after = run.scores[cfg.bundle_method]
    preds = predict_logits(refined.model, d.x_deploy).argmax(1).numpy()
    # the demo's artifact as a watched concept: its CAV on the bundled model's activations after
    # the last conv block (full map: a channel-pooled score cannot tell a 3-pixel corner from
    # digit strokes), clean verified samples vs the same samples with the artifact pasted
    watched = watch_concept(refined.model, d.config.artifact, run.x_verified, d.artifact.apply(run.x_verified),
                            run.x_verified, run.y_verified, d.classes, pooling="none", seed=run.seed)
    out.mkdir(parents=True, exist_ok=True)
    build_bundle(
        out / "bundle",
        refined,
        x_check=d.x_test[:256],
        classes=d.classes,
        input_spec=InputSpec(channels=d.input_shape[0], height=d.input_shape[1], width=d.input_shape[2],
                             mean=[0.0], std=[1.0], color_mode="L"),
        source=SourceModel(spec=(spec := f"builtin:{cfg.benchmark.model}"),
                           sha256=source_sha256(spec, "source_model.safetensors", run.original),
                           weights="source_model.safetensors"),
        evaluation=Evaluation(data=f"embedded digits, artifact '{d.config.artifact}', seed {run.seed}",
                              before=before, after=after),
        subgroups=subgroup_specs(run, preds),
        concepts=ConceptHeads([watched]),
        overwrite=True,
    )
    save_file({k: v.contiguous() for k, v in run.original.state_dict().items()}, str(out / "source_model.safetensors"))
    _save_data(run, out / "data")
    paths = write_results(result, out)
    from hansgate.demo.audit import (
        write_demo_audit,  # the audit of original vs refined: DIR/audit/report.{html,json,pdf}
    )

    audit = write_demo_audit(run, refined.model, out, progress=progress)
    return (paths["markdown"].read_text() + f"\nbundle: {out / 'bundle'}  ({result.seconds:.0f} s)\n"
            f"audit: {audit['html']}\n")

"""The evaluation protocol of paper 000, Sec. 4.3, on the embedded Clever-Hans data.

For every seed: build the dataset, train the "third-party" model on the biased
training split, draw the verified refinement set (correctly predicted, artifact-free,
``refine_per_class`` per class), refine with every method, and measure accuracy on
the clean and the 100 %-poisoned test set. The table reports mean and standard
deviation over seeds (the equivalent of Fig. 3), as JSON, Markdown and a bar plot.
"""

from __future__ import annotations

import json
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn
from tqdm.auto import tqdm

from hansgate.data.digits import CleverHansConfig, CleverHansData, make_clever_hans
from hansgate.nn.models import build_builtin
from hansgate.nn.training import TrainConfig, accuracy, train_classifier
from hansgate.refinement.methods import (
    METHODS,
    RefineConfig,
    RefinementResult,
    refine_model,
)
from hansgate.refinement.pipeline import per_class_subset, verified_subset

__all__ = ["BenchmarkConfig", "SeedRun", "BenchmarkResult", "run_benchmark", "write_results", "train_demo_model"]


class BenchmarkConfig(BaseModel):
    """What the embedded benchmark runs; defaults are the demo's."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    model: str = "small_vgg"
    artifact: str = "corner"
    target_class: int = 8
    rate: float = 0.7
    seeds: tuple[int, ...] = (0, 1, 2)
    methods: tuple[str, ...] = ("egem", "pca-egem", "rgem", "ridge", "retrain")
    refine_per_class: int = Field(200, ge=5)
    train: TrainConfig = TrainConfig()
    refine: RefineConfig = RefineConfig()


@dataclass
class SeedRun:
    """One seed's data, original model and refined models (kept for bundling and audits)."""

    seed: int
    data: CleverHansData
    original: nn.Module
    x_verified: torch.Tensor
    y_verified: torch.Tensor
    scores: dict[str, dict[str, float]]
    results: dict[str, RefinementResult] = field(default_factory=dict)


@dataclass
class BenchmarkResult:
    config: BenchmarkConfig
    runs: list[SeedRun]
    seconds: float

    def table(self) -> dict[str, dict[str, float]]:
        """``{method: {clean_acc, clean_acc_std, poisoned_acc, poisoned_acc_std, gap}}`` over seeds."""
        out: dict[str, dict[str, float]] = {}
        for method in ["original", *self.config.methods]:
            row: dict[str, float] = {}
            for key in ("clean_acc", "poisoned_acc"):
                vals = [r.scores[method][key] for r in self.runs]
                row[key] = statistics.fmean(vals)
                row[f"{key}_std"] = statistics.pstdev(vals) if len(vals) > 1 else 0.0
            row["gap"] = row["clean_acc"] - row["poisoned_acc"]
            out[method] = row
        return out

    def as_dict(self) -> dict[str, Any]:
        table = self.table()
        return {
            **table,
            "config": json.loads(self.config.model_dump_json()),
            "per_seed": {str(r.seed): r.scores for r in self.runs},
            "chosen": {str(r.seed): {m: res.hyperparameters for m, res in r.results.items()} for r in self.runs},
            "seconds": self.seconds,
        }


def train_demo_model(cfg: BenchmarkConfig, data: CleverHansData, seed: int, progress: bool = False) -> nn.Module:
    """The "third-party" model: a built-in net trained on the biased training split."""
    torch.manual_seed(seed)
    model = build_builtin(cfg.model, num_classes=len(data.classes), in_channels=data.input_shape[0],
                          image_size=data.input_shape[1])
    return train_classifier(model, data.x_train, data.y_train, cfg.train.model_copy(update={"seed": seed}),
                            progress=progress, desc=f"train {cfg.model} (seed {seed})")


def _scores(model: nn.Module, data: CleverHansData) -> dict[str, float]:
    return {"clean_acc": accuracy(model, data.x_test, data.y_test),
            "poisoned_acc": accuracy(model, data.x_test_poisoned, data.y_test)}


def run_benchmark(cfg: BenchmarkConfig, progress: bool = False) -> BenchmarkResult:
    """Run the Sec. 4.3 protocol for every seed and method."""
    unknown = set(cfg.methods) - set(METHODS)
    if unknown:
        from hansgate.errors import ConfigError

        raise ConfigError(f"unknown methods {sorted(unknown)}; choose from {sorted(METHODS)}")
    t0 = time.perf_counter()
    runs = []
    steps = tqdm(total=len(cfg.seeds) * (1 + len(cfg.methods)), desc="benchmark", disable=not progress)
    for seed in cfg.seeds:
        data = make_clever_hans(CleverHansConfig(artifact=cfg.artifact, target_class=cfg.target_class,
                                                 rate=cfg.rate, seed=seed))
        steps.set_postfix_str(f"seed {seed}: training")
        original = train_demo_model(cfg, data, seed)
        steps.update()
        xr, yr = per_class_subset(*verified_subset(original, data.x_refine, data.y_refine), cfg.refine_per_class,
                                  seed)
        run = SeedRun(seed, data, original, xr, yr, {"original": _scores(original, data)})
        for method in cfg.methods:
            steps.set_postfix_str(f"seed {seed}: {method}")
            res = refine_model(original, xr, yr, cfg.refine.model_copy(update={"method": method, "seed": seed}))
            run.results[method] = res
            run.scores[method] = _scores(res.model, data)
            steps.update()
        runs.append(run)
    steps.close()
    return BenchmarkResult(cfg, runs, time.perf_counter() - t0)


def _markdown(table: dict[str, dict[str, float]], cfg: BenchmarkConfig) -> str:
    lines = [
        f"Embedded Clever-Hans benchmark: `{cfg.model}`, artifact `{cfg.artifact}` on class {cfg.target_class} "
        f"(rate {cfg.rate}), {len(cfg.seeds)} seed(s), slack {cfg.refine.slack:.0%}.",
        "",
        "| method | clean acc | 100 % poisoned acc | gap |",
        "|---|---|---|---|",
    ]
    for method, row in table.items():
        lines.append(f"| {method} | {row['clean_acc']:.3f} ± {row['clean_acc_std']:.3f} | "
                     f"{row['poisoned_acc']:.3f} ± {row['poisoned_acc_std']:.3f} | {row['gap']:+.3f} |")
    return "\n".join(lines) + "\n"


def _plot(table: dict[str, dict[str, float]], cfg: BenchmarkConfig, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = list(table)
    pos = range(len(methods))
    fig, ax = plt.subplots(figsize=(1.3 * len(methods) + 2, 3.6))
    w = 0.38
    ax.bar([p - w / 2 for p in pos], [table[m]["clean_acc"] for m in methods], w,
           yerr=[table[m]["clean_acc_std"] for m in methods], label="0 % poisoned", color="#9ecae1", capsize=3)
    ax.bar([p + w / 2 for p in pos], [table[m]["poisoned_acc"] for m in methods], w,
           yerr=[table[m]["poisoned_acc_std"] for m in methods], label="100 % poisoned", color="#08519c", capsize=3)
    ax.set_xticks(list(pos), methods)
    ax.set_ylim(0, 1)
    ax.set_ylabel("test accuracy")
    ax.set_title(f"{cfg.model}, artifact '{cfg.artifact}': mean ± std over {len(cfg.seeds)} seed(s)")
    ax.legend(loc="lower right")
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_results(result: BenchmarkResult, out_dir: str | Path) -> dict[str, Path]:
    """Write ``results.json``, ``results.md`` and ``results.png`` into ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    table = result.table()
    paths = {"json": out / "results.json", "markdown": out / "results.md", "plot": out / "results.png"}
    paths["json"].write_text(json.dumps(result.as_dict(), indent=2))
    paths["markdown"].write_text(_markdown(table, result.config))
    _plot(table, result.config, paths["plot"])
    return paths

"""Guards that speak: refuse refinement data a model cannot be refined on, warn on suspicious pixels.

What: before refining, ``check_verified`` refuses (one ``DataError`` line with a hint) when the
share of refinement samples the model predicts correctly -- the verified share, paper 000
Supp. F.1 -- is below ``min_verified_share``, or when that accuracy is near chance
(below ``chance_factor / classes``); ``force`` turns either refusal into a warning.
``pixel_warnings`` compares the data's pixel statistics with the declared normalisation.

Why: a wrong ``--image-size``, ``--channels`` or ``--mean/--std`` does not crash a model; it
makes it answer one class. Refining on the few samples it still gets right gives a bundle
that looks valid and is not.
"""

from __future__ import annotations

import torch
from pydantic import BaseModel, ConfigDict, Field

from hansgate.errors import DataError

__all__ = ["GuardConfig", "check_verified", "pixel_warnings"]

_HINT = ("check that the data are read as the model expects (--channels, --image-size, --mean/--std, class order); "
         "pass --force to refine anyway")


class GuardConfig(BaseModel):
    """Thresholds of the refusals; ``force`` turns them into warnings."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    min_verified_share: float = Field(0.5, ge=0, le=1)
    chance_factor: float = Field(1.5, ge=0)
    #: a normalised channel whose mean lies further from 0, or whose std lies outside this ratio of 1, is reported
    max_abs_mean: float = Field(1.5, gt=0)
    std_ratio: float = Field(4.0, gt=1)
    force: bool = False


def check_verified(correct: int, total: int, classes: int, config: GuardConfig) -> list[str]:
    """Refuse (``DataError``) or, with ``force``, return the warnings about ``correct`` of ``total`` right answers."""
    share = correct / total if total else 0.0
    chance = config.chance_factor / classes
    problems = []
    if share < config.min_verified_share:
        problems.append(f"only {share:.1%} of the refinement samples ({correct} of {total}) are predicted correctly "
                        f"(at least {config.min_verified_share:.0%} needed to call them verified)")
    if share < chance:
        problems.append(f"the model's accuracy on the refinement data, {share:.3f}, is near chance for {classes} "
                        f"classes (below {config.chance_factor:g}/{classes} = {chance:.3f})")
    if problems and not config.force:
        raise DataError(f"{problems[0]}; {_HINT}")
    return [f"warning: {p}; refining anyway (--force)" for p in problems]


def pixel_warnings(raw: torch.Tensor, model_space: torch.Tensor, declared: bool, config: GuardConfig) -> list[str]:
    """Warnings about a sample of the data: ``raw`` pixels (declared range [0, 1]) and the same in model space.

    With a declared normalisation (``declared``), each channel of ``model_space`` should have a
    mean near 0 and a std near 1; pixels that never exceed 0.1 of the [0, 1] range look scaled twice.
    """
    out = []
    if len(raw) and float(raw.max()) <= 0.1:
        out.append(f"warning: pixel values reach at most {float(raw.max()):.3g} of the declared range [0, 1]: "
                   "were the images scaled twice (e.g. divided by 255 again)?")
    if declared and len(model_space):
        dims = [0, *range(2, model_space.ndim)]
        mean, std = model_space.double().mean(dims), model_space.double().std(dims)
        off = [c for c in range(len(mean)) if abs(float(mean[c])) > config.max_abs_mean
               or not 1 / config.std_ratio <= float(std[c]) <= config.std_ratio]
        if off:
            stats = ", ".join(f"channel {c}: mean {float(mean[c]):.3g}, std {float(std[c]):.3g}" for c in off)
            out.append(f"warning: the data contradict the declared --mean/--std: after (x - mean) / std, {stats} "
                       "(expected about 0 and 1); --mean/--std are in units of [0, 1] pixels (e.g. ImageNet's "
                       "0.485 0.456 0.406 / 0.229 0.224 0.225)")
    return out

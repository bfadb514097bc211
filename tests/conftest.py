"""Shared fixtures: the embedded data, a trained demo model and a demo bundle (built once per session)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("TQDM_DISABLE", "1")


@pytest.fixture(scope="session")
def digits_data():
    """Seed-0 embedded Clever-Hans digits with the default corner artifact."""
    from hansgate.data.digits import CleverHansConfig, make_clever_hans

    return make_clever_hans(CleverHansConfig(seed=0))


@pytest.fixture(scope="session")
def demo_model(digits_data):
    """The demo's third-party model (small_vgg, 5 epochs) trained on the biased split; do not mutate."""
    from hansgate.refinement.evaluation import BenchmarkConfig, train_demo_model

    return train_demo_model(BenchmarkConfig(), digits_data, seed=0)


@pytest.fixture(scope="session")
def demo_dir(tmp_path_factory) -> Path:
    """A directory written by ``hansgate demo`` (one seed, PCA-EGEM and RGEM only, to stay quick)."""
    from hansgate.cli import main

    out = tmp_path_factory.mktemp("demo")
    assert main(["demo", "--out", str(out), "--seeds", "1", "--methods", "pca-egem", "rgem", "--quiet"]) == 0
    return out


@pytest.fixture(scope="session")
def demo_bundle(demo_dir) -> Path:
    """Path of the demo bundle directory (PCA-EGEM model)."""
    return demo_dir / "bundle"

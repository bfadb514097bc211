"""Fixtures of the service tests: tiny bundles (with and without concept heads) and gateways."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.service.bundles import make_bundle


@pytest.fixture(scope="session")
def concept_bundle(tmp_path_factory) -> Path:
    return make_bundle(tmp_path_factory.mktemp("bundles") / "concepts", concepts=True).path


@pytest.fixture(scope="session")
def plain_bundle(tmp_path_factory) -> Path:
    return make_bundle(tmp_path_factory.mktemp("bundles") / "plain", concepts=False).path


@pytest.fixture
def gateway_factory(tmp_path):
    """Builds in-process gateways with private metric registries; closes them afterwards."""
    from prometheus_client import CollectorRegistry

    from hansgate.service.config import GatewayConfig
    from hansgate.service.gateway import Gateway

    made = []

    def make(bundle: Path, **overrides):
        cfg = GatewayConfig(bundle=bundle, state_dir=tmp_path / "state", receipt_key="k" * 32, provider="cpu",
                            **overrides)
        gw = Gateway(cfg, registry=CollectorRegistry(), cuda_devices=0)
        made.append(gw)
        return gw

    yield make
    for gw in made:
        gw.close()

"""hansgate.service.config: the environment is read in one place, bad values are one-line ConfigErrors."""

from __future__ import annotations

import os
import threading

import pytest

from hansgate.errors import ConfigError
from hansgate.service.config import GatewayConfig, ServiceOptions, load_receipt_key


def test_from_env_reads_hansgate_variables(tmp_path):
    cfg = GatewayConfig.from_env({"HANSGATE_BUNDLE": str(tmp_path), "HANSGATE_MAX_BATCH": "8",
                                  "HANSGATE_PROVIDER": "cpu", "HANSGATE_MONITORING": "0", "UNRELATED": "x"})
    assert cfg.bundle == tmp_path and cfg.max_batch == 8 and cfg.provider == "cpu" and cfg.monitoring is False


def test_missing_bundle_and_bad_values_name_the_variable(tmp_path):
    with pytest.raises(ConfigError, match="HANSGATE_BUNDLE"):
        GatewayConfig.from_env({})
    with pytest.raises(ConfigError, match="HANSGATE_MAX_BATCH"):
        GatewayConfig.from_env({"HANSGATE_BUNDLE": str(tmp_path), "HANSGATE_MAX_BATCH": "0"})
    with pytest.raises(ConfigError, match="HANSGATE_PROVIDER"):
        GatewayConfig.from_env({"HANSGATE_BUNDLE": str(tmp_path), "HANSGATE_PROVIDER": "tpu"})
    with pytest.raises(ConfigError, match="HANSGATE_WORKERS"):
        ServiceOptions.from_env({"HANSGATE_WORKERS": "zero"})
    assert ServiceOptions.from_env({"HANSGATE_WORKERS": "2"}).workers == 2


def test_threads_share_the_cores(tmp_path):
    cfg = GatewayConfig(bundle=tmp_path)
    assert cfg.threads(workers=2, cores=8) == 4
    assert cfg.threads(workers=4, cores=2) == 1
    assert GatewayConfig(bundle=tmp_path, ort_threads=3).threads(workers=2, cores=8) == 3


def test_receipt_key_shared_by_concurrent_workers(tmp_path):
    cfg = GatewayConfig(bundle=tmp_path, state_dir=tmp_path / "state")
    keys: list[bytes] = []
    threads = [threading.Thread(target=lambda: keys.append(load_receipt_key(cfg))) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(set(keys)) == 1 and len(keys[0]) == 64
    assert os.stat(tmp_path / "state" / "receipt.key").st_mode & 0o777 == 0o600
    assert load_receipt_key(GatewayConfig(bundle=tmp_path, receipt_key="s" * 20)) == b"s" * 20

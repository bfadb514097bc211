"""hansgate.service.config: the environment is read in one place, bad values are one-line ConfigErrors."""

from __future__ import annotations

import ast
import os
import threading
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

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


@given(st.integers(1, 1024), st.integers(1, 4096), st.integers(1024, 2**30), st.integers(1, 2**24))
def test_merged_batches_are_never_larger_than_the_largest_request_nor_smaller_than_a_micro_batch(
        fill, max_batch, max_body, row_bytes):
    cfg = GatewayConfig(bundle=Path("b"), microbatch_rows=fill, max_batch=max_batch, max_body_bytes=max_body)
    rows = cfg.merge_rows(row_bytes)
    assert rows >= fill
    assert rows == fill or (rows <= max_batch and rows * row_bytes <= max_body)


def test_merged_batches_by_model_size():
    """Defaults: digits (28 x 28 grey) merge four 64-row requests; 224 px RGB stays at 64 rows (16 MiB bodies)."""
    cfg = GatewayConfig(bundle=Path("b"))
    assert cfg.merge_rows(4 * 28 * 28) == 256
    assert cfg.merge_rows(4 * 3 * 224 * 224) == 64


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


def test_check_environment_refuses_unknown_names_and_unwritable_state(tmp_path):
    from hansgate.service.config import check_environment

    base = {"HANSGATE_BUNDLE": str(tmp_path), "HANSGATE_STATE_DIR": str(tmp_path / "state")}
    cfg, options = check_environment(base | {"HANSGATE_GRACE_S": "5", "HANSGATE_WORKERS": "2"})
    assert options.grace_s == 5 and options.workers == 2 and (tmp_path / "state").is_dir()
    with pytest.raises(ConfigError, match="unknown setting HANSGATE_RECIEPT_KEY; did you mean HANSGATE_RECEIPT_KEY"):
        check_environment(base | {"HANSGATE_RECIEPT_KEY": "x" * 32})
    (tmp_path / "file").write_text("")
    with pytest.raises(ConfigError, match="HANSGATE_STATE_DIR: cannot write"):
        check_environment(base | {"HANSGATE_STATE_DIR": str(tmp_path / "file" / "sub")})
    with pytest.raises(ConfigError, match="HANSGATE_TIMEOUT_S") as info:
        check_environment(base | {"HANSGATE_TIMEOUT_S": "abc"})
    assert "\n" not in str(info.value) and "'abc'" in str(info.value)
    with pytest.raises(ConfigError, match="HANSGATE_RECEIPT_KEY") as info:
        check_environment(base | {"HANSGATE_RECEIPT_KEY": "short-secret"})
    assert "short-secret" not in str(info.value)  # a secret is never echoed
    with pytest.raises(ConfigError, match="HANSGATE_MICROBATCH_WAIT_MS"):
        check_environment(base | {"HANSGATE_MICROBATCH_WAIT_MS": "inf"})


def test_public_key_setting_must_be_a_readable_ed25519_key(tmp_path):
    from hansgate.signing import generate_key_pair

    env = {"HANSGATE_BUNDLE": str(tmp_path)}
    with pytest.raises(ConfigError, match="HANSGATE_PUBLIC_KEY: public key file not found"):
        GatewayConfig.from_env(env | {"HANSGATE_PUBLIC_KEY": str(tmp_path / "none.pub")})
    generate_key_pair(tmp_path / "k.key", tmp_path / "k.pub")
    with pytest.raises(ConfigError, match="HANSGATE_PUBLIC_KEY: .*not a PEM or OpenSSH public key"):
        GatewayConfig.from_env(env | {"HANSGATE_PUBLIC_KEY": str(tmp_path / "k.key")})  # the private key by mistake
    assert GatewayConfig.from_env(env | {"HANSGATE_PUBLIC_KEY": str(tmp_path / "k.pub")}).public_key == tmp_path / "k.pub"


def test_service_options_end_the_import_with_one_line(tmp_path):
    import subprocess
    import sys

    code = "from hansgate.service.config import service_options\nservice_options()\n"
    env = dict(os.environ, HANSGATE_TIMEOUT_S="abc")
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and r.stderr.strip().splitlines() == [
        "hansgate: error: HANSGATE_TIMEOUT_S: Input should be a valid integer, unable to parse string as an integer "
        "(got 'abc')"]


_PARENT = """
import signal, subprocess, sys, time
got = []
signal.signal(signal.SIGTERM, lambda *a: got.append("TERM"))
child = subprocess.run([sys.executable, "-c", sys.argv[1]], capture_output=True, text=True, timeout=60)
deadline = time.monotonic() + 5
while not got and time.monotonic() < deadline:
    time.sleep(0.05)
print(child.returncode, got, repr(child.stderr))
"""
_CHILD = ("from hansgate.errors import ConfigError\nfrom hansgate.service.config import refuse_start\n"
          "refuse_start(ConfigError('HANSGATE_MAX_BATCH: Input should be greater than or equal to 1'))\n")


@pytest.mark.parametrize("parent_name, signalled", [("bentoml", True), ("something-else", False)])
def test_refuse_start_stops_the_bentoml_arbiter_with_one_line(parent_name, signalled):
    """A worker that cannot start SIGTERMs its parent only when the parent is BentoML's arbiter."""
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-c", _PARENT, _CHILD, parent_name], capture_output=True, text=True,
                       timeout=90)
    code, got, stderr = r.stdout.strip().split(" ", 2)
    assert code == "2" and (got == "['TERM']") == signalled, r.stdout
    assert ast.literal_eval(stderr).strip().splitlines() == [
        "hansgate: error: worker cannot start: HANSGATE_MAX_BATCH: Input should be greater than or equal to 1; "
        "stopping the server"]

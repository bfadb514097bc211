"""``hansgate bench xs`` (benchmarks/xs_bench.py through the thin entry point) on a tiny configuration: files, table, bars and the cost probes."""

from __future__ import annotations

import json

from benchmarks.xs_bench import _memory_probe, step_times
from hansgate.cli import main


def test_bench_xs_cli_writes_json_markdown_and_plot(tmp_path):
    rc = main(["bench", "xs", "--out", str(tmp_path), "--archs", "mnist_cnn", "--methods", "tap", "--n-train", "48",
               "--epochs", "1", "--lambdas", "tap=1e-3", "--teacher-shares", "0.1", "--no-memory", "--quiet"])
    assert rc == 0
    result = json.loads((tmp_path / "xs.json").read_text())
    res = result["archs"]["mnist_cnn"]
    assert {"base", "none", "tap", "tap-teacher-10%", "cost", "bars"} <= set(res)
    for row in ("base", "none", "tap"):
        assert abs(res[row]["delta"] - (res[row]["acc_contaminated"] - res[row]["acc_permuted"])) < 1e-9
    assert res["cost"]["none"]["step_time_ratio"] == 1.0 and res["cost"]["tap"]["step_s"] > 0
    assert set(res["bars"]) >= {"tap_delta_at_most_third_of_noxs", "tap_step_time_at_most_1.2x"}
    assert "10%" in result["teachers"] and 0 <= result["teachers"]["10%"]["masks_vs_ground_truth"]["recall"] <= 1
    table = (tmp_path / "xs.md").read_text()
    assert "| mnist_cnn | tap |" in table and "## Bars" in table
    assert (tmp_path / "xs.png").read_bytes()[:4] == b"\x89PNG"


def test_bench_rejects_bad_options(tmp_path, capsys):
    assert main(["bench", "xs", "--out", str(tmp_path), "--lambdas", "tap=abc"]) == 2
    assert main(["bench", "xs", "--out", str(tmp_path), "--n-train", "1"]) == 2
    assert "n_train" in capsys.readouterr().err


def test_bench_without_the_repository_says_where_the_benchmarks_are(tmp_path, monkeypatch, capsys):
    from hansgate.commands import bench

    monkeypatch.setattr(bench, "benchmark_script", lambda name: tmp_path / "benchmarks" / f"{name}_bench.py")
    assert main(["bench", "xs", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "source repository" in err and "not with the installed package" in err
    assert bench.benchmark_script("xs").name == "xs_bench.py"


def test_cost_probes_measure_something():
    times = step_times("mnist_cnn", ["none", "tap", "rrr"], {"tap": 1e-3, "rrr": 1e3}, batch_size=8, steps=1,
                       repeats=1)
    assert set(times) == {"none", "tap", "rrr"} and all(t > 0 for t in times.values())
    probe = _memory_probe("mnist_cnn", "rrr", batch_size=32, steps=1, threads=1)
    assert probe["peak_rss"] >= probe["baseline_rss"] > 0 and probe["step_peak_bytes"] > 0


def _fake_run(seed: int, acc: dict[str, float], n_train: int = 48) -> dict:
    config = {"seed": seed, "n_train": n_train, "epochs": 1, "batch_size": 8, "lr": 1e-3, "lambdas": {},
              "data": "decoy", "threads": 1}
    rows = {name: {"delta": 0.0, "acc_clean": a, "acc_contaminated": a, "acc_permuted": a, "lambda": 1.0}
            for name, a in acc.items()}
    return {"config": config, "archs": {"mnist_cnn": rows}, "seconds": 1.0, "environment": {}}


def test_merging_seeds_pairs_each_variant_with_its_default():
    import pytest

    from benchmarks.xs_bench import merge_seed_results
    from hansgate.errors import ConfigError

    variant = "rrr[train-mode, no area norm]"
    merged = merge_seed_results([_fake_run(0, {"rrr": 0.5, variant: 0.7}), _fake_run(1, {"rrr": 0.6, variant: 0.5})])
    pair = merged["pairs"]["mnist_cnn"][variant]
    assert pair["seeds"] == [0, 1] and pair["default"] == "rrr"
    assert [round(v, 9) for v in pair["acc_clean_variant_minus_default"]["per_seed"]] == [0.2, -0.1]
    assert merged["summary"]["mnist_cnn"]["rrr"]["acc_clean"]["mean"] == 0.55
    # the same row of the same seed from two runs must agree; a disagreement is reported
    again = merge_seed_results([_fake_run(0, {"rrr": 0.5}), _fake_run(0, {"rrr": 0.75})])
    assert again["duplicate_max_abs_diff"] == 0.25
    with pytest.raises(ConfigError, match="n_train"):
        merge_seed_results([_fake_run(0, {"rrr": 0.5}), _fake_run(1, {"rrr": 0.5}, n_train=96)])

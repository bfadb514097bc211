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

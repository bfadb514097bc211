"""The demo's audit report end to end: bars, HTML numbers vs JSON, figures, Chromium rendering, CLI errors."""

from __future__ import annotations

import base64
import hashlib
import json
from pathlib import Path

import numpy as np
import pytest

from hansgate.audit.consistency import HtmlContents, html_numbers_missing_from_json
from hansgate.audit.report import find_chromium, fmt_num, screenshot
from hansgate.cli import main


@pytest.fixture(scope="module")
def report_dir(demo_dir) -> Path:
    return demo_dir / "audit"


@pytest.fixture(scope="module")
def report(report_dir) -> dict:
    return json.loads((report_dir / "report.json").read_text())


def test_demo_writes_html_json_pdf(report_dir):
    for name in ("report.html", "report.json"):
        assert (report_dir / name).stat().st_size > 10_000
    if find_chromium():
        assert (report_dir / "report.pdf").read_bytes()[:5] == b"%PDF-"


def test_suppressed_subgroup_shown_and_raised_by_refinement(report):
    """Bar: site B (the artifact carriers) is flagged for the original, refinement raises its recall."""
    heads = {(h["attribute"], h["value"]): h for h in report["headline"]}
    b = heads[("site", "B")]
    assert b["raised"] and b["macro_recall_after"] > b["macro_recall_before"] + 0.1
    assert "8" not in b["classes_below_overall_before"] and len(b["classes_below_overall_before"]) >= 5
    sub = report["subgroups"]
    assert sub["models"]["before"]["attributes"]["site"]["B"]["flagged"]
    assert not sub["models"]["before"]["attributes"]["site"]["A"]["flagged"]
    assert sub["delta"]["site"]["B"]["accuracy"] > 0.1


def test_training_artifact_flagged_control_not(report):
    """Bar: the corner artifact the model was trained with is flagged for it; the unseen dot is not."""
    arts = report["artifact_tests"]["artifacts"]
    assert arts["corner"]["models"]["before"]["flagged"]
    assert arts["corner"]["models"]["before"]["top_target"] == "8"
    assert not arts["dot"]["models"]["before"]["flagged"]
    # the refined model reacts less to the corner than the original
    assert arts["corner"]["models"]["after"]["flip_rate"] < arts["corner"]["models"]["before"]["flip_rate"]
    rel = arts["corner"]["models"]["before"]
    assert rel["relevance_share"] > 5 * arts["corner"]["mask_area_share"]


def test_bundle_concepts_counted_like_the_gateway(demo_dir, report):
    """The demo bundle watches its artifact; the report's TCAV rows come from compliance.tcav_table on
    sign counts of the bundle's concept_sensitivity output, as the gateway's snapshot does."""
    from hansgate.audit.compliance import tcav_table
    from hansgate.audit.inputs import onnx_predictor, tcav_sign_counts
    from hansgate.bundle import load_bundle

    bundle = load_bundle(demo_dir / "bundle")
    if not bundle.manifest.concepts:
        assert report["bundle_tcav"]["status"] == "skipped"
        return
    x = np.load(demo_dir / "data" / "deploy.npz")["x"]
    lg, sens = onnx_predictor(bundle, outputs=("logits", "concept_sensitivity"))(x)
    names = [c.name for c in bundle.manifest.concepts]
    pos, n = tcav_sign_counts(lg, sens, names, list(bundle.manifest.classes))
    base = {(c.name, k): v for c in bundle.manifest.concepts for k, v in c.baseline_tcav.items()}
    rows = [r.as_dict() for r in tcav_table(pos, n, base)]
    assert report["bundle_tcav"]["rows"] == json.loads(json.dumps(rows))


def test_every_number_in_the_html_tables_is_in_the_json(report_dir, report):
    html = (report_dir / "report.html").read_text()
    numbers, missing = html_numbers_missing_from_json(html, report)
    assert len(numbers) > 500
    assert not missing, f"numbers in the HTML but not in report.json: {missing[:10]}"
    # and a few by value: the headline's site-B figures
    b = next(h for h in report["headline"] if h["value"] == "B")
    parser = HtmlContents()
    parser.feed(html)
    cells = " ".join(parser.cells)
    assert fmt_num(b["accuracy_before"]) in cells and fmt_num(b["accuracy_after"]) in cells


def test_fairness_shows_the_shortcut_and_its_numbers_are_in_the_html(report_dir, report):
    """Site B carries the corner artifact, which pushes the original towards class 8: its selection rate of 8
    in site B dwarfs site A's, the four-fifths rule flags it, and refinement brings the ratio up."""
    fair = report["fairness"]
    assert fair["status"] == "done" and fair["bound"] == 0.8 and set(fair["models"]) == {"before", "after"}

    def parity(model: str) -> dict:
        return next(p for p in fair["models"][model]["parity"] if p["attribute"] == "site" and p["class"] == "8")

    assert parity("before")["flagged"] and parity("before")["ratio"] < 0.8
    assert parity("after")["ratio"] > parity("before")["ratio"]
    sel = {r["value"]: r for r in fair["models"]["before"]["selection"] if r["attribute"] == "site" and r["class"] == "8"}
    assert sel["B"]["rate"] > sel["A"]["rate"] and sel["B"]["ratio_to_max"] == 1.0 and "four_fifths" in sel["A"]["flags"]
    assert sel["A"]["total"] + sel["B"]["total"] == report["inputs"]["n_samples"]
    # every selection rate and TPR of the JSON is printed in the HTML's tables (the consistency check reads them)
    parser = HtmlContents()
    parser.feed((report_dir / "report.html").read_text())
    cells = set(parser.cells)
    for model in ("before", "after"):
        for row in fair["models"][model]["selection"]:
            assert fmt_num(row["rate"]) in cells and f"{fmt_num(row['low'])} – {fmt_num(row['high'])}" in cells
        for row in fair["models"][model]["odds"]:
            assert fmt_num(row["tpr"]) in cells
    assert report["calibration"]["status"] == "skipped" and "temperature" in report["calibration"]["reason"]


def test_consistency_check_catches_a_fairness_number_the_json_lacks(report_dir, report):
    html = (report_dir / "report.html").read_text()
    row = report["fairness"]["models"]["before"]["selection"][0]
    cell = f"<td>{fmt_num(row['ratio_to_max'])}</td>"
    assert cell in html
    _, missing = html_numbers_missing_from_json(html.replace(cell, "<td>0.98765</td>", 1), report)
    assert missing == ["0.98765"]


def test_every_figure_in_the_html_is_in_the_json(report_dir, report):
    parser = HtmlContents()
    parser.feed((report_dir / "report.html").read_text())
    imgs = [i for i in parser.imgs if "data-figure" in i]
    assert len(imgs) >= 8 and len(imgs) == len(parser.imgs)
    assert {i["data-figure"] for i in imgs} == set(report["figures"])
    for img in imgs:
        fig = report["figures"][img["data-figure"]]
        png = base64.b64decode(img["src"].split(",", 1)[1])
        assert hashlib.sha256(png).hexdigest() == fig["sha256"]
        assert (report_dir / fig["file"]).read_bytes() == png
        assert fig["data"]  # the plotted numbers travel with the figure
    for required in ("subgroup_accuracy", "recall_site", "heatmaps_lrp", "heatmaps_methods", "artifact_tests"):
        assert required in report["figures"]


@pytest.mark.skipif(find_chromium() is None, reason="headless Chromium is installed by scripts/test.sh")
def test_html_renders_in_headless_chromium(report_dir, tmp_path):
    from PIL import Image

    png = screenshot(report_dir / "report.html", tmp_path / "shot.png", width=1200, height=1600)
    img = np.asarray(Image.open(png).convert("RGB")).astype(int)
    assert img.shape == (1600, 1200, 3)
    assert img.std() > 20  # not blank
    # matplotlib's default blue and orange bars (the before/after subgroup plots) are on the page
    blue = (np.abs(img - [31, 119, 180]).sum(-1) < 30).sum()
    orange = (np.abs(img - [255, 127, 14]).sum(-1) < 30).sum()
    assert blue > 2000 and orange > 2000


def _audit_args(demo_dir: Path, out: Path, **over) -> list[str]:
    args = {"--data": str(demo_dir / "data" / "deploy.npz"),
            "--attributes": str(demo_dir / "data" / "deploy_attributes.csv"), "--out": str(out)}
    args.update(over)
    flat = ["audit", str(demo_dir / "bundle")]
    for k, v in args.items():
        flat += [k, v]
    return flat + ["--no-concepts", "--no-influence", "--no-pdf", "--heatmaps", "4", "--artifacts", "corner",
                   "--quiet"]


def test_cli_audit_agrees_with_the_demo_report(demo_dir, report, tmp_path):
    out = tmp_path / "audit2"
    assert main(_audit_args(demo_dir, out)) == 0
    got = json.loads((out / "report.json").read_text())
    assert got["models"]["before"]["kind"] == "torch" and got["models"]["after"]["kind"] == "onnx"
    # from the command line the served model is rebuilt from the bundle's refined weights and explained
    assert got["served"]["status"] == "rebuilt" and got["served"]["explains"] == "served (refined) model"
    assert got["attributions"]["explains"] == {"before": "source model", "after": "served (refined) model"}
    assert report["served"]["status"] == "given"  # the demo passes its refined module itself
    for model in ("before", "after"):
        assert got["subgroups"]["models"][model] == report["subgroups"]["models"][model]
    assert got["artifact_tests"]["artifacts"]["corner"]["models"]["before"]["flip_rate"] == \
        report["artifact_tests"]["artifacts"]["corner"]["models"]["before"]["flip_rate"]


def test_cli_audit_against_a_second_bundle(demo_dir, tmp_path):
    """--before BUNDLE compares two ONNX bundles: same bundle, zero change; without the source model the
    explanations are of the served model alone (rebuilt from the bundle's weights and its architecture)."""
    out = tmp_path / "two"
    args = _audit_args(demo_dir, out, **{"--before": str(demo_dir / "bundle"), "--max-samples": "200"})
    assert main(args + ["--no-source"]) == 0
    got = json.loads((out / "report.json").read_text())
    assert got["models"]["before"]["kind"] == "onnx" and got["served"]["status"] == "rebuilt"
    assert got["attributions"]["models"] == ["after"]
    assert got["inputs"]["n_samples"] == 200
    assert all(d["accuracy"] == 0.0 for groups in got["subgroups"]["delta"].values() for d in groups.values())


def test_cli_bad_inputs_fail_cleanly(demo_dir, tmp_path, capsys):
    good_csv = (demo_dir / "data" / "deploy_attributes.csv").read_text().splitlines()
    short = tmp_path / "short.csv"
    short.write_text("\n".join(good_csv[:-5]) + "\n")
    wrong = tmp_path / "wrong.csv"
    wrong.write_text("\n".join([good_csv[0].replace("site", "sight")] + good_csv[1:]) + "\n")
    cases = [
        ({"--data": str(tmp_path / "missing.npz")}, "data not found"),
        ({"--attributes": str(short)}, "rows, but the data has"),
        ({"--attributes": str(wrong)}, "lacks"),
        ({"--attributes": str(tmp_path / "none.csv")}, "attributes file not found"),
    ]
    for i, (over, message) in enumerate(cases):
        out = tmp_path / f"out{i}"
        assert main(_audit_args(demo_dir, out, **over)) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message in err[0]
        assert not out.exists() and not list(tmp_path.glob(f".out{i}.*"))
    missing_bundle = ["audit", str(tmp_path / "nobundle")] + _audit_args(demo_dir, tmp_path / "o")[2:]
    assert main(missing_bundle) == 2 and "bundle directory not found" in capsys.readouterr().err
    existing = tmp_path / "existing"
    existing.mkdir()
    (existing / "keep.txt").write_text("x")
    assert main(_audit_args(demo_dir, existing)) == 2
    assert "refusing to overwrite" in capsys.readouterr().err and (existing / "keep.txt").exists()


def test_pdf_without_chromium_is_a_config_error_and_writes_nothing(tmp_path, monkeypatch):
    import hansgate.audit.report as rep
    from hansgate.errors import ConfigError

    monkeypatch.setattr(rep, "find_chromium", lambda: None)
    out = tmp_path / "r"
    with pytest.raises(ConfigError, match="--no-pdf"):
        rep.write_report(out, None, pdf=True)  # type: ignore[arg-type]  # refused before the report is read
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_fmt_num_formats():
    assert fmt_num(3) == "3" and fmt_num(0.12345) == "0.123" and fmt_num(None) == "–"
    assert fmt_num(float("nan")) == "–" and fmt_num(True) == "yes" and fmt_num(0.5, 4) == "0.5000"


def test_cli_invalid_option_is_one_line_from_the_cli_layer(tmp_path, capsys):
    """Option values are validated by AuditConfig before any file is read; cli.py maps the error once."""
    out = tmp_path / "o"
    args = ["audit", str(tmp_path / "nobundle"), "--data", "x.npz", "--attributes", "a.csv", "--out", str(out),
            "--no-pdf", "--gap-threshold", "2"]
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["hansgate: error: invalid option recall_margin: Input should be less than 1"]
    assert main(args[:-2] + ["--parity-bound", "0"]) == 2
    assert "invalid option parity_bound" in capsys.readouterr().err and not out.exists()


def test_calibration_paragraph_names_the_calibration_used(report):
    """A bundle with vector scaling: the HTML says so and prints the ECE figures the section measured."""
    import copy

    from hansgate.audit.report import render_html

    edited = copy.deepcopy(report)
    edited["calibration"] = {"status": "done", "temperature": 0.92, "bins": 15, "ece_raw": 0.031, "ece_calibrated": 0.027,
                             "manifest_ece_before": 0.028, "manifest_ece_after": 0.044, "reliability_raw": [],
                             "reliability_calibrated": [], "family": "vector", "scales": [1.0] * 10,
                             "biases": [0.0] * 10, "penalty": 0.01, "label": "vector scaling, penalty 0.01"}
    html = render_html(edited, {k: {"png": b""} for k in report["figures"]})
    assert "vector scaling (a scale and a bias per class" in html and "0.027 calibrated" in html
    edited["calibration"].update(family="temperature", scales=None, biases=None, penalty=None, label="T = 0.92")
    html = render_html(edited, {k: {"png": b""} for k in report["figures"]})
    assert "records a temperature T = 0.92" in html and "vector scaling" not in html

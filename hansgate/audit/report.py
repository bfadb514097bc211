"""Rendering an audit: matplotlib figures, ``report.json``, ``report.html`` (Jinja2) and ``report.pdf``.

Rules that the tests hold the report to:

- the HTML is rendered from the report dict alone, and every number it prints goes through
  the ``num``/``signed`` filters, so every number in the HTML is a number of ``report.json``;
- every figure is a PNG embedded in the HTML *and* filed under ``figures/`` with its sha256
  and the numbers it plots in ``report.json["figures"]``;
- every heatmap, TCAV and influence figure names the model it explains (``explains`` in
  ``report.json["figures"]``, and its title): the served (refined) model or the source model;
- the PDF is the HTML printed by headless Chromium (``--print-to-pdf``);
- everything is written into a temporary sibling directory and renamed into place, so a
  failure leaves no half-written report.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import math
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from hansgate.errors import ConfigError, HansgateError
from hansgate.files import atomic_directory, to_jsonable

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

    from hansgate.audit.runner import AuditReport, FigureData

__all__ = ["CHROMIUM_FLAGS", "find_chromium", "check_pdf_renderer", "chromium_command", "render_figures",
           "render_html", "write_report", "fmt_num"]

#: Flags for a headless Chromium that touches nothing outside its fresh profile directory.
CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--disable-dev-shm-usage", "--hide-scrollbars")
TEMPLATES = Path(__file__).parent / "templates"


def find_chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome", "chrome"):
        path = shutil.which(name)
        if path:
            return path
    return None


def check_pdf_renderer() -> str:
    """The Chromium binary, or ``ConfigError`` telling the user to install it or skip the PDF."""
    path = find_chromium()
    if path is None:
        raise ConfigError("the PDF needs headless Chromium (apt-get install chromium); install it or pass --no-pdf")
    return path


def chromium_command(binary: str, profile: Path, *action: str) -> list[str]:
    return [binary, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", *action]


def _run_chromium(html: Path, *action: str, timeout: float = 120) -> None:
    binary = check_pdf_renderer()
    with tempfile.TemporaryDirectory(prefix="hansgate-chromium-") as profile:
        cmd = chromium_command(binary, Path(profile), *action, html.resolve().as_uri())
        try:
            res = subprocess.run(cmd, capture_output=True, timeout=timeout, check=False)
        except subprocess.TimeoutExpired:
            raise HansgateError(f"headless Chromium did not finish within {timeout:.0f} s") from None
    if res.returncode != 0:
        tail = res.stderr.decode(errors="replace").strip().splitlines()[-1:] or ["(no output)"]
        raise HansgateError(f"headless Chromium failed ({res.returncode}): {tail[0]}")


def print_pdf(html: Path, pdf: Path) -> Path:
    """Print ``html`` to ``pdf`` with headless Chromium."""
    _run_chromium(html, "--no-pdf-header-footer", f"--print-to-pdf={pdf.resolve()}")
    if not pdf.is_file() or pdf.stat().st_size == 0:
        raise HansgateError("headless Chromium wrote no PDF")
    return pdf


def screenshot(html: Path, png: Path, width: int = 1200, height: int = 2400) -> Path:
    """Screenshot of ``html`` (used by the tests and available to users)."""
    _run_chromium(html, f"--window-size={width},{height}", f"--screenshot={png.resolve()}")
    return png


# --------------------------------------------------------------------------- numbers


def fmt_num(v: Any, digits: int = 3) -> str:
    """How the report prints a number: ints as they are, floats with ``digits`` decimals, None as a dash."""
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "–"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, (int, np.integer)):
        return str(int(v))
    return f"{float(v):.{digits}f}"


def _signed(v: Any, digits: int = 3) -> str:
    s = fmt_num(v, digits)
    return s if s == "–" or s.startswith("-") else "+" + s


# --------------------------------------------------------------------------- figures


def _png(fig: Figure) -> bytes:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()


def _bar_groups(ax: Axes, labels: list[str], series: dict[str, list[Any]],
                errors: dict[str, tuple[list[Any], list[Any]]] | None,
                ylabel: str) -> None:
    n = len(series)
    width = 0.8 / max(n, 1)
    xs = np.arange(len(labels))
    for i, (name, vals) in enumerate(series.items()):
        v = np.array([np.nan if a is None else a for a in vals], dtype=float)
        err = None
        if errors is not None:
            lo_hi = errors[name]
            err = np.array([[0 if a is None or b is None else max(b - a, 0) for a, b in zip(lo_hi[0], v)],
                            [0 if a is None or b is None else max(a - b, 0) for a, b in zip(lo_hi[1], v)]])
        ax.bar(xs + (i - (n - 1) / 2) * width, v, width, label=name, yerr=err, capsize=2)
    ax.set_xticks(xs)
    ax.set_xticklabels(labels, fontsize=8)
    ax.set_ylabel(ylabel)
    ax.set_ylim(0, 1.05)
    # below the axes, so that the legend never hides a bar
    ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=min(n, 3), frameon=False)


def render_figures(report: dict[str, Any], data: FigureData) -> dict[str, dict[str, Any]]:
    """``{figure id: {"title", "png" (bytes), "data" (the plotted numbers)}}``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figs: dict[str, dict[str, Any]] = {}
    sub = report["subgroups"]
    order = sub["order"]
    labels_of = {m: report["models"][m]["label"] for m in order}

    # subgroup accuracy with Wilson intervals, before vs after
    groups = [(a, v) for a, vals in sub["models"][order[-1]]["attributes"].items() for v in vals]
    labels = [f"{a}={v}" for a, v in groups]
    series, lo, hi = {}, {}, {}
    plot_data: dict[str, Any] = {"groups": labels}
    for m in order:
        rows = [sub["models"][m]["attributes"][a][v]["accuracy"] for a, v in groups]
        series[labels_of[m]] = [r["value"] for r in rows]
        lo[labels_of[m]] = [r["low"] for r in rows]
        hi[labels_of[m]] = [r["high"] for r in rows]
        plot_data[m] = {"accuracy": series[labels_of[m]], "low": lo[labels_of[m]], "high": hi[labels_of[m]]}
    fig, ax = plt.subplots(figsize=(max(4, 1.2 * len(labels)), 3))
    _bar_groups(ax, labels, series, {k: (lo[k], hi[k]) for k in series}, "accuracy (micro recall)")
    ax.set_title("Accuracy per subgroup, Wilson interval", fontsize=9)
    figs["subgroup_accuracy"] = {"title": "Accuracy per subgroup with Wilson intervals", "png": _png(fig),
                                 "data": plot_data}

    # per-class recall for each attribute value, before vs after
    classes = report["inputs"]["classes"]
    for attr, vals in sub["models"][order[-1]]["attributes"].items():
        values = list(vals)
        fig, axes = plt.subplots(1, len(values), figsize=(4.2 * len(values), 2.8), squeeze=False)
        pdata: dict[str, Any] = {"classes": classes}
        for ax, value in zip(axes[0], values):
            series = {labels_of[m]: [sub["models"][m]["attributes"][attr][value]["classes"][c]["recall"]["value"]
                                     for c in classes] for m in order}
            _bar_groups(ax, classes, series, None, "recall")
            ax.set_title(f"{attr} = {value}", fontsize=9)
            pdata[value] = {m: series[labels_of[m]] for m in order}
        figs[f"recall_{attr}"] = {"title": f"Recall per class, subgroups of '{attr}'", "png": _png(fig),
                                  "data": pdata}

    from hansgate.audit.attributions import heatmap_grid_png
    from hansgate.audit.served import explained_name

    def grid(images: np.ndarray, rows: dict[str, np.ndarray], titles: list[str]) -> bytes:
        cols = [list(r) for r in zip(*rows.values())]  # one row per sample
        return base64.b64decode(heatmap_grid_png(cols, None, ["input", *titles], images=list(images)))

    def named(roles: list[str]) -> list[str]:
        return [explained_name(m) for m in roles]

    if data.heatmaps is not None:
        h = data.heatmaps
        figs["heatmaps_lrp"] = {
            "title": f"LRP heatmaps ({report['attributions']['composite']}) of the predicted class, red = evidence "
                     f"for it; columns: {', '.join(named(list(h.rows)))}",
            "explains": named(list(h.rows)),
            "png": grid(h.images, h.rows, named(list(h.rows))),
            "data": {"samples": data.heatmap_samples,
                     "relevance_sum": {m: [float(a.sum()) for a in v] for m, v in h.rows.items()}}}
    if data.methods is not None:
        h = data.methods
        who = explained_name(report["attributions"]["methods_model"])
        figs["heatmaps_methods"] = {
            "title": f"The same samples under every attribution method (paper 003, App. B), {who}",
            "explains": [who],
            "png": grid(h.images, h.rows, list(h.rows)),
            "data": {"methods": list(h.rows),
                     "abs_relevance_sum": {k: [float(np.abs(a).sum()) for a in v] for k, v in h.rows.items()}}}

    arts = report["artifact_tests"]["artifacts"]
    if arts:
        names = list(arts)
        models = list(next(iter(arts.values()))["models"])
        fig, axes = plt.subplots(1, 2, figsize=(9, 3))
        pdata = {"artifacts": names}
        for ax, key, thr in ((axes[0], "flip_rate", report["config"]["flip_threshold"]),
                             (axes[1], "accuracy_drop", report["config"]["accuracy_drop_threshold"])):
            series = {labels_of.get(m, m): [arts[a]["models"][m][key] for a in names] for m in models}
            _bar_groups(ax, names, series, None, key.replace("_", " "))
            ax.axhline(thr, color="k", ls="--", lw=0.8)
            ax.set_ylim(min(0, min(min(v) for v in series.values())) - 0.02, 1.05)
            pdata[key] = {m: [arts[a]["models"][m][key] for a in names] for m in models}
            pdata[f"{key}_threshold"] = thr
        figs["artifact_tests"] = {"title": "Known-artifact tests: flip rate and accuracy drop (dashed: flag threshold)",
                                  "png": _png(fig), "data": pdata}
    for name, ah in data.artifact_heatmaps.items():
        figs[f"artifact_heatmap_{name}"] = {
            "title": f"LRP heatmaps with artifact '{name}' pasted; columns: {', '.join(named(list(ah.rows)))}",
            "explains": named(list(ah.rows)),
            "png": grid(ah.images, ah.rows, named(list(ah.rows))),
            "data": {m: arts[name]["models"][m].get("relevance_share") for m in ah.rows}}
    con = report.get("concepts", {})
    for concept, loc in data.localisation.items():
        fid = "cav_localisation_" + concept.replace(":", "_").replace("=", "_")
        who = explained_name(con["model"])
        figs[fid] = {"title": f"CAV localisation of '{concept}' (LRP epsilon-z+-box of a.h), {who}",
                     "explains": [who],
                     "png": grid(loc.images, {"a.h": loc.heatmaps}, ["a.h"]),
                     "data": {"abs_relevance_sum": [float(np.abs(a).sum()) for a in loc.heatmaps]}}

    if con.get("status") == "done" and con["per_class"]:
        cls = list(con["per_class"])
        concepts = list(next(iter(con["per_class"].values()))["results"])
        fig, ax = plt.subplots(figsize=(max(5, 0.6 * len(cls) * max(1, len(concepts)) / 2), 3))
        series = {c: [con["per_class"][k]["results"][c]["mean"] for k in cls] for c in concepts}
        _bar_groups(ax, cls, series, None, "mean TCAV score")
        ax.axhline(0.5, color="k", ls="--", lw=0.8)
        who = explained_name(con["model"])
        figs["tcav"] = {"title": f"TCAV per class and concept, {who} (dashed: 0.5 = no consistent influence)",
                        "explains": [who], "png": _png(fig), "data": {"classes": cls, "mean": series}}

    inf = report.get("influence", {})
    if inf.get("status") == "done":
        keys = list(inf["rankings"])
        fig, ax = plt.subplots(figsize=(6, 3))
        series = {"class share": [inf["rankings"][k]["top_k_class_share"] for k in keys],
                  "artifact share": [inf["rankings"][k]["top_k_artifact_share"] for k in keys]}
        _bar_groups(ax, keys, series, None, f"share of top-{inf['top_k']}")
        if inf.get("train_artifact_rate") is not None:
            ax.axhline(inf["train_artifact_rate"], color="k", ls=":", lw=0.8)
        who = explained_name(inf["model"])
        figs["influence"] = {"title": f"Influence ranking, {who}: top-k shares (dotted: artifact rate in training "
                                      "data)", "explains": [who], "png": _png(fig), "data": series}

    cal = report.get("calibration", {})
    if cal.get("status") == "done":
        fig, ax = plt.subplots(figsize=(4.2, 4))
        plotted: dict[str, list[tuple[float, float]]] = {}
        for key, label, colour in (("reliability_raw", "raw", "#9ecae1"),
                                   ("reliability_calibrated", cal.get("label") or f"T = {cal['temperature']:.3g}",
                                    "#08519c")):
            pts = [(b["confidence"], b["accuracy"]) for b in cal[key] if b["count"]]
            ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", color=colour, label=label, ms=4)
            plotted[key] = pts
        ax.plot([0, 1], [0, 1], "k--", lw=0.8)
        ax.set_xlabel("confidence (top class)")
        ax.set_ylabel("accuracy")
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
        ax.legend(loc="upper left")
        figs["calibration"] = {"title": "Reliability of the bundle's probabilities on the audited data "
                               "(dashed: perfect calibration)", "png": _png(fig), "data": plotted}
    return figs


# --------------------------------------------------------------------------- HTML, JSON, PDF


def render_html(report: dict[str, Any], figures: dict[str, dict[str, Any]]) -> str:
    from jinja2 import Environment, FileSystemLoader, StrictUndefined, select_autoescape

    env = Environment(loader=FileSystemLoader(str(TEMPLATES)), autoescape=select_autoescape(["html"]),
                      undefined=StrictUndefined, trim_blocks=True, lstrip_blocks=True)
    env.filters["num"] = fmt_num
    env.filters["signed"] = _signed
    imgs = {k: base64.b64encode(v["png"]).decode("ascii") for k, v in figures.items()}
    return env.get_template("report.html.j2").render(r=report, figures=report["figures"], imgs=imgs)


def write_report(out: str | Path, audit: AuditReport, pdf: bool = True, overwrite: bool = False) -> dict[str, Path]:
    """Render figures, write ``report.json``, ``report.html``, ``figures/*.png`` and ``report.pdf``
    into a temporary sibling of ``out`` and rename it into place (nothing partial is ever left).
    This is where the typed report becomes JSON."""
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        raise ConfigError(f"refusing to overwrite existing {out} (pass --overwrite)")
    if pdf:
        check_pdf_renderer()
    report = audit.as_dict()
    figures = render_figures(report, audit.figure_data())
    report["figures"] = {k: {"title": v["title"], "file": f"figures/{k}.png",
                             "sha256": hashlib.sha256(v["png"]).hexdigest(), "data": to_jsonable(v["data"])}
                         | ({"explains": v["explains"]} if "explains" in v else {})
                         for k, v in figures.items()}
    report = to_jsonable(report)
    with atomic_directory(out) as tmp:
        (tmp / "figures").mkdir()
        for k, v in figures.items():
            (tmp / "figures" / f"{k}.png").write_bytes(v["png"])
        (tmp / "report.json").write_text(json.dumps(report, indent=2, allow_nan=False))
        (tmp / "report.html").write_text(render_html(report, figures), encoding="utf-8")
        if pdf:
            print_pdf(tmp / "report.html", tmp / "report.pdf")
    paths = {"json": out / "report.json", "html": out / "report.html"}
    if pdf:
        paths["pdf"] = out / "report.pdf"
    return paths

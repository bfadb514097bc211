"""``hansgate audit``: the compliance report of a bundle on labelled data with subgroup attributes.

The flags map onto ``audit.loading.AuditSources`` (where the inputs are) and ``audit.config.AuditConfig``
(what to measure); the library never sees argparse. Invalid option values surface as pydantic
``ValidationError``, which ``hansgate.cli`` turns into one error line.
"""

from __future__ import annotations

import argparse
import time


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "audit", help="write the compliance report (subgroup bias, fairness, attributions, artifact tests, influence)",
        description="Audits BUNDLE on labelled DATA whose subgroup attributes are in ATTRS.csv (one row per sample, "
                    "header 'index,<attribute>,...'; see audit/inputs.py). An ImageFolder is read at the input "
                    "spec the bundle's manifest declares (colour mode, size, value range). Compares the bundle with "
                    "its source model (weights next to the bundle) or with --before BUNDLE, and writes "
                    "DIR/report.{html,json,pdf} and DIR/figures/ atomically.")
    p.add_argument("bundle", help="bundle directory (model.onnx + manifest.json)")
    p.add_argument("--data", required=True, help="labelled data: .npz (x, y) or an ImageFolder directory")
    p.add_argument("--attributes", required=True, help="subgroup attributes CSV, one row per sample")
    p.add_argument("--out", required=True, help="report directory to write")
    p.add_argument("--before", help="compare with this bundle instead of the source model")
    p.add_argument("--source-weights", help="weights of the source model (default: manifest's file next to the bundle)")
    p.add_argument("--no-source", action="store_true", help="do not load the source model (explanations then cover the served model alone, "
                   "when the bundle carries its weights)")
    p.add_argument("--train-data", help="training data .npz (x, y, optional bool 'artifact') for the influence ranking")
    p.add_argument("--artifacts", nargs="*", default=["corner", "frame", "stamp", "dot"],
                   help="built-in artifacts to test (the first is the one the influence check pastes)")
    p.add_argument("--patch", action="append", metavar="NAME=PATH@ROW,COL",
                   help="user artifact: a .npy or image patch pasted at ROW,COL (repeatable)")
    p.add_argument("--region-mask", help="[H, W] .npy mask of where relevance should lie (verification rule)")
    p.add_argument("--accept-share", type=float, default=0.75, help="verification rule threshold (default 0.75)")
    p.add_argument("--gap-threshold", type=float, default=0.10,
                   help="flag subgroup recall this far below the overall figure (default 0.10)")
    p.add_argument("--min-samples", type=int, default=30, help="no subgroup flag from fewer positives (default 30)")
    p.add_argument("--parity-bound", type=float, default=0.8,
                   help="flag selection-rate ratios below this (default 0.8, the four-fifths rule)")
    p.add_argument("--odds-gap", type=float, default=0.10,
                   help="flag true/false-positive-rate gaps between subgroups above this (default 0.10)")
    p.add_argument("--flip-threshold", type=float, default=0.10, help="artifact flagged at this flip rate")
    p.add_argument("--accuracy-drop-threshold", type=float, default=0.05,
                   help="artifact flagged at this accuracy drop")
    p.add_argument("--heatmaps", type=int, default=32, help="samples with LRP heatmaps (default 32)")
    p.add_argument("--max-samples", type=int, help="audit a seeded subset of the data")
    p.add_argument("--held-mb", type=float, default=256.0,
                   help="hold at most this many MiB of images (default 256): larger data are streamed from disk "
                        "for predictions, subgroups, fairness and calibration, and a seeded subset that fits is "
                        "explained (heatmaps, artifact tests, concepts, influence)")
    p.add_argument("--no-concepts", action="store_true", help="skip TCAV concept evidence")
    p.add_argument("--no-influence", action="store_true", help="skip the influence ranking")
    p.add_argument("--no-pdf", action="store_true", help="skip the PDF (needs headless Chromium)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--overwrite", action="store_true", help="replace an existing report directory")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from hansgate.audit.artifact_tests import resolve_artifacts
    from hansgate.audit.config import AuditConfig
    from hansgate.audit.loading import AuditSources, load_inputs
    from hansgate.audit.report import check_pdf_renderer, write_report
    from hansgate.audit.runner import run_audit

    cfg = AuditConfig(
        recall_margin=args.gap_threshold, min_samples=args.min_samples, artifacts=tuple(args.artifacts),
        patches=tuple(args.patch or ()), heatmaps=args.heatmaps, accept_share=args.accept_share,
        concepts=not args.no_concepts, influence=not args.no_influence, max_samples=args.max_samples,
        parity_bound=args.parity_bound, odds_margin=args.odds_gap, pdf=not args.no_pdf, seed=args.seed,
        flip_threshold=args.flip_threshold, accuracy_drop_threshold=args.accuracy_drop_threshold)
    if cfg.pdf:
        check_pdf_renderer()
    resolve_artifacts(list(cfg.artifacts), list(cfg.patches))  # fail on a bad patch before any work
    inputs = load_inputs(AuditSources(
        bundle=args.bundle, data=args.data, attributes=args.attributes, before=args.before,
        source_weights=args.source_weights, no_source=args.no_source, train_data=args.train_data,
        train_artifact=args.artifacts[0] if args.artifacts else None, region_mask=args.region_mask,
        max_samples=args.max_samples, seed=args.seed, held_mb=args.held_mb))
    start = time.perf_counter()
    report = run_audit(inputs, cfg, progress=None if args.quiet else (lambda s: print(f"audit: {s}")))
    paths = write_report(args.out, report, pdf=cfg.pdf, overwrite=args.overwrite)
    seconds = time.perf_counter() - start
    print(f"audit written to {paths['html'].parent} ({seconds:.0f} s): " + ", ".join(p.name for p in paths.values()))
    return 0

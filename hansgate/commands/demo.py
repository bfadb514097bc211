"""``hansgate demo``: train the demo "third-party" model, refine it, write bundle and results."""

from __future__ import annotations

import argparse


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="run the embedded Clever-Hans benchmark and write a demo bundle",
                       description="Builds the embedded Clever-Hans digits, trains the third-party model on the "
                                   "biased split, refines it with every method, and writes DIR/bundle (the "
                                   "PCA-EGEM model), DIR/results.{json,md,png} and the demo data.")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--model", default="small_vgg", help="built-in model (mnist_cnn, small_vgg, small_resnet)")
    p.add_argument("--artifact", default="corner", help="artifact (corner, frame, stamp, ...)")
    p.add_argument("--seeds", type=int, default=3, help="number of seeds (0..N-1)")
    p.add_argument("--methods", nargs="+", default=None, help="methods to compare (default: all)")
    p.add_argument("--bundle-method", default="pca-egem", help="method whose model goes into the bundle")
    p.add_argument("--refine-per-class", type=int, default=200)
    p.add_argument("--epochs", type=int, default=5, help="training epochs of the demo model")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from hansgate.demo.run import DemoConfig, run_demo

    cfg = DemoConfig.from_args(args)
    summary = run_demo(cfg, args.out, progress=not args.quiet)
    print(summary)
    return 0

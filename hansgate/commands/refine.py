"""``hansgate refine``: refine a user's model on verified data and write a bundle."""

from __future__ import annotations

import argparse

from hansgate.refinement.registry import describe


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("refine", help="refine a model on verified samples and export a bundle",
                       description="Loads a model without unpickling (package.module:factory, torchvision:ARCH, "
                                   "torchscript:PATH or a built-in name, plus --weights), keeps the samples it "
                                   "predicts correctly as the verified set, refines, checks the ONNX export and "
                                   "writes the bundle atomically.")
    p.add_argument("--model", required=True, help="model spec")
    p.add_argument("--weights", help="weights file (.safetensors or a plain state dict)")
    p.add_argument("--data", required=True, help="verified data: .npz (x, y) or an ImageFolder directory")
    p.add_argument("--method", default="pca-egem", help=f"refinement method (default pca-egem): {describe('pruning', 'concept')}")
    p.add_argument("--slack", type=float, default=0.05, help="relative validation-accuracy slack (default 0.05)")
    p.add_argument("--layers", nargs="+", help="module names to refine (default: automatic, paper Sec. 4.4)")
    p.add_argument("--schedule", choices=["deep", "shallow"], default="deep")
    p.add_argument("--test-data", help="optional labelled test data for before/after accuracy")
    p.add_argument("--poisoned-data", help="optional labelled data with the suspected artifact")
    p.add_argument("--classes", nargs="+", help="class names (default: from the data)")
    p.add_argument("--image-size", type=int, nargs=2, default=(28, 28), metavar=("H", "W"),
                   help="resize for ImageFolder data")
    p.add_argument("--channels", type=int, default=1, help="channels for ImageFolder data")
    p.add_argument("--mean", type=float, nargs="+", help="normalisation mean per channel the model expects")
    p.add_argument("--std", type=float, nargs="+", help="normalisation std per channel the model expects")
    p.add_argument("--calibration-share", type=float, default=0.2,
                   help="share of the labelled data held out to fit the calibration recorded in the manifest "
                        "for the gateway's label-free recall estimate (default 0.2; 0 fits none)")
    p.add_argument("--calibration", choices=["auto", "vector", "temperature"], default="auto",
                   help="calibration family: temperature scaling (one T), vector scaling (a scale and bias per "
                        "class, ridge-shrunk towards T), or auto (default): whichever family and penalty "
                        "5-fold cross-validation on the hold-out prefers")
    p.add_argument("--calibration-objective", choices=["nll", "brier"], default="nll",
                   help="what the calibration fit and its cross-validation minimise (default nll)")
    p.add_argument("--min-verified-share", type=float, default=0.5,
                   help="refuse when the model predicts fewer than this share of --data correctly (default 0.5)")
    p.add_argument("--force", action="store_true",
                   help="refine even when the guards refuse (low verified share, accuracy near chance); "
                        "they are then warnings")
    p.add_argument("--sign-key", metavar="KEY",
                   help="Ed25519 private key file: sign the bundle as it is written (see `hansgate keygen`)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True, help="bundle directory to write")
    p.add_argument("--overwrite", action="store_true", help="replace an existing bundle")
    p.add_argument("--quiet", action="store_true")
    c = p.add_argument_group("concepts", "ClArC methods (p-clarc, a-clarc, rr-clarc) and watched concepts; DATA is "
                             "an .npz with x, y and a boolean 'concept', or two ImageFolder directories "
                             "WITH,WITHOUT (samples with / without the concept, class sub-directories named like "
                             "the data's), read with --channels/--image-size and normalised with --mean/--std")
    c.add_argument("--concept", action="append", metavar="NAME=DATA",
                   help="a concept and its labelled samples; repeatable; ClArC corrects the first, all are watched")
    c.add_argument("--concept-layer", help="concept layer (default: the last conv layer)")
    c.add_argument("--cav-kind", default="signal", help="signal, svm, ridge, lasso, logistic")
    c.add_argument("--pooling", choices=["none", "mean", "max"],
                   help="activation pooling for the ClArC CAV (default max, as the authors' code; none: the full map)")
    c.add_argument("--rr-mode", default="random", choices=["random", "all", "class"],
                   help="RR-ClArC annotation vector m (random +-1, ones, one-hot on --target-class)")
    c.add_argument("--target-class", type=int, help="class index for --rr-mode class")
    c.add_argument("--epochs", type=int, default=10, help="ClArC fine-tuning epochs")
    c.add_argument("--lambdas", type=float, nargs="+", help="RR-ClArC lambda grid (default 0.05, 0.1, 1 ... 1e8)")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    import json
    import sys

    from hansgate.calibration import CalibrationFit
    from hansgate.errors import ConfigError
    from hansgate.refinement.clarc import ClarcConfig
    from hansgate.refinement.concept_refine import parse_concept_args
    from hansgate.refinement.guards import GuardConfig
    from hansgate.refinement.methods import RefineConfig
    from hansgate.refinement.pipeline import DataOptions, refine_from_files
    from hansgate.refinement.refiners import RefinerConfig

    if not 0.0 <= args.calibration_share < 0.9:
        raise ConfigError(f"--calibration-share must lie in [0, 0.9), got {args.calibration_share}")
    if not 0.0 <= args.min_verified_share <= 1.0:
        raise ConfigError(f"--min-verified-share must lie in [0, 1], got {args.min_verified_share}")
    clarc = ClarcConfig(layer=args.concept_layer, cav_kind=args.cav_kind, mode=args.rr_mode,
                        **({"pooling": args.pooling} if args.pooling else {}),
                        target_class=args.target_class, epochs=args.epochs, seed=args.seed,
                        **({"lambdas": tuple(args.lambdas)} if args.lambdas else {}))
    config = RefinerConfig(refine=RefineConfig(slack=args.slack, layers=args.layers, schedule=args.schedule,
                                               seed=args.seed), clarc=clarc)
    options = DataOptions(channels=args.channels, image_size=tuple(args.image_size), classes=args.classes,
                          mean=tuple(args.mean) if args.mean else None, std=tuple(args.std) if args.std else None)
    def say(msg: str, quiet: bool) -> None:  # warnings always; notes (e.g. data held in memory) unless --quiet
        if not quiet or msg.startswith("warning"):
            print(f"hansgate: {msg}", file=sys.stderr)

    bundle, summary = refine_from_files(
        model_spec=args.model, weights=args.weights, data=args.data, out=args.out, method=args.method,
        config=config, options=options, test_data=args.test_data, poisoned_data=args.poisoned_data,
        concepts=parse_concept_args(args.concept), overwrite=args.overwrite, progress=not args.quiet,
        calibration_share=args.calibration_share,
        guards=GuardConfig(min_verified_share=args.min_verified_share, force=args.force),
        signing_key=args.sign_key, log=lambda msg: say(msg, args.quiet),
        calibration_fit=CalibrationFit(family=args.calibration, objective=args.calibration_objective))
    print(json.dumps(summary, indent=2, default=str))
    print(f"bundle written to {bundle.path}")
    return 0

"""``hansgate train --xs {rrr,rbr,tap}``: train (or fine-tune) a model with explanatory supervision, write a bundle."""

from __future__ import annotations

import argparse

from hansgate.refinement.registry import describe, names


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="train a model with explanatory supervision (RRR, RBR, TAP) and export a bundle",
                       description="Trains MODEL on DATA with cross-entropy plus an explanatory-supervision term "
                                   "(papers 002, 004) that keeps it from using the pixels the masks mark: masks from "
                                   "--masks, or made by a teacher pre-trained on a small clean set (--teacher-share). "
                                   "--data decoy uses the embedded decoy digits (ground-truth masks, permuted "
                                   "validation and test splits). The model is exported and checked like any refined "
                                   "model and written as a bundle.")
    p.add_argument("--xs", required=True, choices=names("xs"), help=f"the XS objective: {describe('xs')}")
    p.add_argument("--model", required=True, help="model spec (built-in name, torchvision:ARCH, package.module:factory)")
    p.add_argument("--weights", help="initial weights to fine-tune (.safetensors or a plain state dict)")
    p.add_argument("--data", required=True, help="training data: .npz (x, y), an ImageFolder directory, or 'decoy'")
    p.add_argument("--masks", help=".npz with 'mask' [N, 1, H, W] (1 = pixels the model must not use)")
    p.add_argument("--teacher-share", type=float,
                   help="make masks with a teacher trained on this share of the training size (e.g. 0.1)")
    p.add_argument("--teacher-data", help="small clean labelled set for the teacher (not needed with --data decoy)")
    p.add_argument("--teacher-tau", type=float, default=0.01, help="mask = normalised saliency < tau (default 0.01)")
    p.add_argument("--teacher-model", default="mnist_cnn", help="built-in teacher architecture")
    p.add_argument("--lam", type=float, help="XS weight lambda (default per method: tap 3e-3, rrr 1.6e3, rbr 6.4e5)")
    p.add_argument("--lambdas", type=float, nargs="+",
                   help="tune lambda over these on --val-data (permuted spurious signal): lowest cross-entropy")
    p.add_argument("--val-data", help="validation data whose spurious signal is permuted (for --lambdas)")
    p.add_argument("--test-data", help="contaminated test data, for accuracy before/after")
    p.add_argument("--permuted-data", help="the same test data with the spurious signal permuted (Delta)")
    p.add_argument("--layers", nargs="+", help="TAP's targeted layers (default: automatic)")
    p.add_argument("--epochs", type=int, default=16)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--n-train", type=int, help="with --data decoy: number of training images")
    p.add_argument("--classes", nargs="+", help="class names (default: from the data)")
    p.add_argument("--image-size", type=int, nargs=2, default=(28, 28), metavar=("H", "W"))
    p.add_argument("--channels", type=int, default=1, help="channels for ImageFolder data")
    p.add_argument("--mean", type=float, nargs="+", help="normalisation mean per channel the model expects")
    p.add_argument("--std", type=float, nargs="+", help="normalisation std per channel the model expects")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True, help="bundle directory to write")
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    import json

    from hansgate.refinement.pipeline import DataOptions
    from hansgate.refinement.xs import XSConfig
    from hansgate.refinement.xs_pipeline import (
        DEFAULT_LAMBDAS,
        TrainXSConfig,
        train_xs_from_files,
    )

    xs = XSConfig(method=args.xs, lam=DEFAULT_LAMBDAS[args.xs] if args.lam is None else args.lam,
                  epochs=args.epochs, lr=args.lr, batch_size=args.batch_size, seed=args.seed, layers=args.layers)
    config = TrainXSConfig(xs=xs, lambdas=tuple(args.lambdas) if args.lambdas else None,
                           teacher_share=args.teacher_share, teacher_tau=args.teacher_tau,
                           teacher_model=args.teacher_model, n_train=args.n_train)
    options = DataOptions(channels=args.channels, image_size=tuple(args.image_size), classes=args.classes,
                          mean=tuple(args.mean) if args.mean else None, std=tuple(args.std) if args.std else None)
    bundle, summary = train_xs_from_files(
        model_spec=args.model, weights=args.weights, data=args.data, out=args.out, config=config, masks=args.masks,
        teacher_data=args.teacher_data, val_data=args.val_data, test_data=args.test_data,
        permuted_data=args.permuted_data, options=options, overwrite=args.overwrite,
        log=None if args.quiet else print)
    print(json.dumps(summary, indent=2, default=str))
    print(f"bundle written to {bundle.path}")
    return 0

"""``hansgate bench NAME --out DIR``: run a built-in benchmark and write DIR/NAME.{json,md,png}."""

from __future__ import annotations

import argparse

#: Benchmarks by name: module and function ``run(args) -> dict of written paths``.
BENCHMARKS = ("xs",)


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench", help="run a built-in benchmark (xs: RRR/RBR/TAP on the decoy digits)",
                       description="xs: explanatory supervision on the decoy digits (papers 002, 004): No-XS, RRR, "
                                   "RBR and TAP (ground-truth and teacher masks) on several architectures; accuracy "
                                   "on contaminated data, Delta under permutation, step-time and memory ratios to "
                                   "No-XS. Writes DIR/xs.json, DIR/xs.md and DIR/xs.png.")
    p.add_argument("name", choices=BENCHMARKS, help="which benchmark")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--archs", nargs="+", help="built-in architectures (default: mnist_cnn small_vgg)")
    p.add_argument("--methods", nargs="+", choices=["rrr", "rbr", "tap"], help="XS losses (default: all)")
    p.add_argument("--n-train", type=int, help="training images (default 800)")
    p.add_argument("--epochs", type=int, help="training epochs (default 16)")
    p.add_argument("--lambdas", nargs="+", metavar="METHOD=L1,L2",
                   help="lambda candidates per method, e.g. tap=1e-4,1e-3 rrr=1e3")
    p.add_argument("--teacher-shares", type=float, nargs="+", help="teacher data shares (default 0.1 0.01)")
    p.add_argument("--no-memory", action="store_true", help="skip the memory subprocesses")
    p.add_argument("--threads", type=int, help="torch threads (default 1)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from pydantic import ValidationError

    from benchmarks.xs_bench import XSBenchConfig, run_xs_bench, write_xs_results
    from hansgate.errors import ConfigError

    options: dict[str, object] = {"seed": args.seed, "memory": not args.no_memory}
    for key in ("archs", "methods", "teacher_shares"):
        if getattr(args, key):
            options[key] = tuple(getattr(args, key))
    for key in ("n_train", "epochs", "threads"):
        if getattr(args, key) is not None:
            options[key] = getattr(args, key)
    if args.lambdas:
        lambdas = dict(XSBenchConfig().lambdas)
        for item in args.lambdas:
            method, _, values = item.partition("=")
            try:
                lambdas[method] = tuple(float(v) for v in values.split(","))
            except ValueError:
                raise ConfigError(f"cannot parse --lambdas {item!r}; use METHOD=L1,L2") from None
        options["lambdas"] = lambdas
    try:
        config = XSBenchConfig(**options)  # type: ignore[arg-type]
    except ValidationError as exc:
        err = exc.errors()[0]
        raise ConfigError(f"invalid option {'.'.join(map(str, err['loc']))}: {err['msg']}") from None
    result = run_xs_bench(config, log=None if args.quiet else (lambda msg: print(msg, flush=True)))
    paths = write_xs_results(result, args.out)
    for arch, res in result["archs"].items():
        for bar, val in res["bars"].items():
            print(f"{arch} {bar}: {'pass' if val['pass'] else 'FAIL'}")
    print("wrote", ", ".join(str(p) for p in paths.values()))
    return 0

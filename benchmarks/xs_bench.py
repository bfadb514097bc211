"""Explanatory supervision benchmark (issue 6): No-XS, RRR, RBR and TAP on the decoy digits.

    python benchmarks/xs_bench.py --out benchmarks/results/xs.json

writes the JSON plus a Markdown table (``.md``) and a plot (``.png``) beside it.
Every figure is measured in this run; the bars are evaluated per architecture in
``archs.<arch>.bars``. See ``refinement/xs_bench.py`` for the protocol.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from refinement.xs_bench import XSBenchConfig, run_xs_bench, write_xs_results  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="benchmarks/results/xs.json", help="JSON path (.md and .png go beside it)")
    p.add_argument("--archs", nargs="+", default=list(XSBenchConfig().archs))
    p.add_argument("--n-train", type=int, default=XSBenchConfig().n_train)
    p.add_argument("--epochs", type=int, default=XSBenchConfig().epochs)
    p.add_argument("--threads", type=int, default=XSBenchConfig().threads)
    args = p.parse_args(argv)
    cfg = XSBenchConfig(archs=tuple(args.archs), n_train=args.n_train, epochs=args.epochs, threads=args.threads)
    result = run_xs_bench(cfg, log=lambda msg: print(msg, flush=True))
    out = Path(args.out)
    paths = write_xs_results(result, out.parent, out.stem)
    for bar_arch, res in result["archs"].items():
        for bar, val in res["bars"].items():
            print(f"{bar_arch} {bar}: {'pass' if val['pass'] else 'FAIL'} {val}")
    print("wrote", ", ".join(str(p) for p in paths.values()))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""``hansgate bench NAME [OPTIONS]``: run a benchmark of the source repository (``benchmarks/NAME_bench.py``).

The benchmarks are not part of the installed package (they live beside it, in the
repository's ``benchmarks/``); this command is a thin entry point that finds them in a
source checkout and hands every option to the script's own ``main``. Installed without
the repository, it says where the benchmarks are instead.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path
from types import ModuleType

__all__ = ["BENCHMARKS", "add_parser", "run", "benchmark_script"]

#: Benchmarks ``hansgate bench`` runs, by name: ``benchmarks/<name>_bench.py`` with ``main(argv) -> int``.
BENCHMARKS = ("xs",)


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench", help="run a benchmark from a source checkout (xs: RRR/RBR/TAP on the decoy digits)",
                       description="Runs benchmarks/NAME_bench.py of the hansgate source repository; the options "
                                   "after NAME go to that script (see `hansgate bench xs --help`). xs: explanatory "
                                   "supervision on the decoy digits (papers 002, 004), writes DIR/xs.json, .md, .png.")
    p.add_argument("name", choices=BENCHMARKS, help="which benchmark")
    p.add_argument("options", nargs=argparse.REMAINDER, help="options of the benchmark script, e.g. --out DIR")
    p.set_defaults(run=run)


def benchmark_script(name: str) -> Path:
    """``benchmarks/<name>_bench.py`` of the checkout this package was imported from (it may not exist)."""
    import hansgate

    return Path(hansgate.__file__).resolve().parents[1] / "benchmarks" / f"{name}_bench.py"


def _load(path: Path, name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"_hansgate_bench_{name}", path)
    assert spec is not None and spec.loader is not None  # a .py file always has a loader
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # pydantic and dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def run(args: argparse.Namespace) -> int:
    from hansgate.errors import ConfigError

    path = benchmark_script(args.name)
    if not path.is_file():
        raise ConfigError(f"benchmark {args.name!r} not found at {path}: the benchmarks ship with the hansgate source "
                          "repository, not with the installed package; run `hansgate bench` from a clone of the "
                          "repository (with the package installed from it, e.g. `pip install -e .`)")
    return int(_load(path, args.name).main(list(args.options), prog=f"hansgate bench {args.name}") or 0)

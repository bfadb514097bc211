"""The ``hansgate`` command line: one subcommand per module in ``hansgate.commands``.

Subcommand modules define ``add_parser(subparsers)`` and a ``run(args) -> int``
handler; they import torch, bentoml etc. only inside ``run`` so that ``--help`` and
``serve`` stay light. Errors map to exit codes here, in one place:
``HansgateError`` -> 2 with one line on stderr, interrupt -> 130.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from pydantic import ValidationError

from hansgate import __version__
from hansgate.errors import HansgateError

__all__ = ["COMMANDS", "build_parser", "main"]

#: Subcommand modules, in the order ``--help`` lists them.
COMMANDS: tuple[str, ...] = ("demo", "refine", "serve", "sign", "audit", "train", "bench")

EXIT_ERROR = 2
EXIT_INTERRUPTED = 130


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hansgate", description=(
        "Deployment gateway with audit for third-party image classifiers: prune Clever-Hans shortcuts, "
        "export a bundle, serve and monitor it."))
    parser.add_argument("--version", action="version", version=f"hansgate {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMANDS:
        importlib.import_module(f"hansgate.commands.{name}").add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.run(args) or 0)
    except HansgateError as exc:
        print(f"hansgate: error: {exc}", file=sys.stderr)
        return EXIT_ERROR
    except ValidationError as exc:  # a pydantic config built from the command line
        first = exc.errors()[0]
        where = ".".join(map(str, first["loc"]))
        print(f"hansgate: error: invalid option {where}: {first['msg']}".replace("Value error, ", ""), file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        print("hansgate: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

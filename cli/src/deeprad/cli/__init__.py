"""The `deeprad` command: the front door to every Deep-Rad tool.

Each subcommand lives in a module of this package (or, for `operator` and `dev`, beside the code
it runs) and imports its heavy dependencies only when it runs, so `deeprad --help` and the
commands that only compute or print start at once.
"""

from __future__ import annotations

import argparse
import sys

from deeprad.cli import audit, bundle, catalogue, inference, keys, privacy, simulate
from deeprad.cli.simulate import apply_recipe
from deeprad.core import __version__
from deeprad.core.errors import DeepRadError
from deeprad.operator.cli import register as register_operator


def _register_dev(sub: argparse._SubParsersAction) -> None:
    """`deeprad dev` when the development tools are installed (the workspace has them)."""
    try:
        from deeprad.devenv.cli import register
    except ImportError:
        return
    register(sub)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="deeprad",
        description="Deep-Rad: federated medical-imaging training across hospitals.")
    parser.add_argument("--version", action="version", version=f"deeprad {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    simulate.register(sub)
    catalogue.register(sub)
    bundle.register(sub)
    inference.register(sub)
    register_operator(sub)
    keys.register(sub)
    privacy.register(sub)
    audit.register(sub)
    _register_dev(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except DeepRadError as exc:
        print(f"deeprad {args.command}: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


__all__ = ["apply_recipe", "build_parser", "main"]

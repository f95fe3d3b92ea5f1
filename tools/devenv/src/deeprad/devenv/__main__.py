"""`python -m deeprad.devenv dev up|down|status`: the dev command without the product CLI."""

from __future__ import annotations

import argparse
import sys

from deeprad.devenv.cli import register


def main(argv: list[str] | None = None) -> int:
    """Parse argv and run the chosen `dev` subcommand."""
    parser = argparse.ArgumentParser(prog="python -m deeprad.devenv")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())

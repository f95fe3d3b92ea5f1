"""Write the dashboards into the hub chart (`make dashboards`), or check they are current.

    python -m deeprad.operator.dashboards.gen [--out helm/deeprad/files/dashboards] [--check]

The output is deterministic (sorted keys), so a unit test and `make lint` can regenerate it and
compare with what is committed.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from grafana_foundation_sdk.cog.encoder import JSONEncoder

from deeprad.operator.dashboards import DASHBOARDS, DASHBOARDS_DIR
from deeprad.operator.dashboards.panels import numbered
from deeprad.operator.generated import sync


def render(stem: str) -> str:
    """The JSON text of one dashboard."""
    board = numbered(DASHBOARDS[stem]().build())
    return json.dumps(board, cls=JSONEncoder, indent=2, sort_keys=True, ensure_ascii=False) + "\n"


def render_all() -> dict[str, str]:
    """File name → JSON text of every dashboard."""
    return {f"{stem}.json": render(stem) for stem in DASHBOARDS}


def main(argv: list[str] | None = None) -> int:
    """Write the dashboards, or with --check report any that differ from the source."""
    parser = argparse.ArgumentParser(prog="dashboards", description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DASHBOARDS_DIR,
                        help="folder (default: the hub chart's files/dashboards)")
    parser.add_argument("--check", action="store_true",
                        help="write nothing; exit 1 if a file is missing, extra or differs")
    args = parser.parse_args(argv)
    return sync(args.out, render_all(), "*.json", args.check, "dashboards")


if __name__ == "__main__":
    sys.exit(main())

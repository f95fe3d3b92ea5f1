"""Write the dashboards into the hub chart (`make dashboards`), or check they are current.

    python -m deeprad.operator.dashboards.gen [--out helm/deeprad/files/dashboards] [--check]

The output is deterministic (sorted keys), so a unit test and `make lint` can regenerate it and
compare with what is committed.
"""

from __future__ import annotations

import json
import sys

from grafana_foundation_sdk.cog.encoder import JSONEncoder

from deeprad.operator.dashboards import DASHBOARDS, DASHBOARDS_DIR
from deeprad.operator.dashboards.panels import numbered
from deeprad.operator.generated import generator_main


def render(stem: str) -> str:
    """The JSON text of one dashboard."""
    board = numbered(DASHBOARDS[stem]().build())
    return json.dumps(board, cls=JSONEncoder, indent=2, sort_keys=True, ensure_ascii=False) + "\n"


def render_all() -> dict[str, str]:
    """File name → JSON text of every dashboard."""
    return {f"{stem}.json": render(stem) for stem in DASHBOARDS}


def main(argv: list[str] | None = None) -> int:
    """Write the dashboards, or with --check report any that differ from the source."""
    return generator_main(argv, prog="dashboards", description=__doc__.splitlines()[0],
                          default_out=DASHBOARDS_DIR, render_all=render_all, pattern="*.json",
                          make_target="dashboards")

if __name__ == "__main__":
    sys.exit(main())

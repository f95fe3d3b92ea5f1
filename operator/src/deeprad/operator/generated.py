"""Files generated from a Python source and committed (CRDs, admission policies, dashboards):
write them, or check that what is committed is what the source gives."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path


def sync(out: Path, files: dict[str, str], pattern: str, check: bool, make_target: str) -> int:
    """Make `out` hold exactly `files` (name → text) among the names matching `pattern`; with
    `check`, write nothing and return 1 when anything is missing, extra or different."""
    stale = sorted(p.name for p in out.glob(pattern) if p.name not in files)
    for name in stale:  # its source no longer exists
        if not check:
            (out / name).unlink()
            print(f"removed {out / name}")
    for name, text in files.items():
        path = out / name
        if path.exists() and path.read_text(encoding="utf-8") == text:
            continue
        stale.append(name)
        if not check:
            out.mkdir(parents=True, exist_ok=True)
            path.write_text(text, encoding="utf-8")
            print(f"wrote {path}")
    if check and stale:
        print(f"out of date: {', '.join(stale)}; run `make {make_target}`", file=sys.stderr)
        return 1
    return 0


def generator_main(argv: list[str] | None, *, prog: str, description: str, default_out: Path,
                   render_all: Callable[[], dict[str, str]], pattern: str, make_target: str
                   ) -> int:
    """The command line every generator shares: `--out DIR` to write, `--check` to compare."""
    parser = argparse.ArgumentParser(prog=prog, description=description)
    parser.add_argument("--out", type=Path, default=default_out,
                        help=f"folder (default: {default_out})")
    parser.add_argument("--check", action="store_true",
                        help="write nothing; exit 1 if a file is missing, extra or differs")
    args = parser.parse_args(argv)
    return sync(args.out, render_all(), pattern, args.check, make_target)

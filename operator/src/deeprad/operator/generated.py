"""Files generated from a Python source and committed (CRDs, dashboards): write them, or check
that what is committed is what the source gives."""

from __future__ import annotations

import sys
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

"""Each component's installed size and the start time of the light commands.

Size: for each component (its distribution and extras, as its image installs it) the closure of
its requirements is resolved from the installed distributions' metadata, and the files each
distribution installed are added up: the size of an environment holding that component alone,
at the versions installed here (pip and setuptools themselves not counted). Goal: the operator's
environment at most 1/10 of the trainer's.

Start time: each light command (it only computes or prints) runs `--repeats` times as a fresh
process; the median wall time is printed. Goal: under 1 s each.

    python benchmarks/bench_footprint.py [--repeats 5] [--sizes-only]

Exits 1 when a goal is missed.
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from importlib import metadata
from pathlib import Path

from packaging.markers import Marker
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

# component -> the requirement its image (images/*/Dockerfile) or its users install
COMPONENTS = {
    "operator": "deeprad-operator",
    "aggregator": "deeprad-aggregator",
    "trainer": "deeprad-trainer",
    "core (base)": "deeprad-core",
    "deeprad command": "deeprad",
}
SIZE_GOAL = 0.10  # operator / trainer
START_GOAL_S = 1.0
BIN = Path(sys.executable).parent


def _light_commands(scratch: Path) -> dict[str, list[str]]:
    deeprad = str(BIN / "deeprad")
    return {
        "deeprad --help": [deeprad, "--help"],
        "deeprad models": [deeprad, "models"],
        "deeprad strategies": [deeprad, "strategies"],
        "deeprad privacy epsilon": [deeprad, "privacy", "epsilon", "--noise-multiplier", "1.1",
                                    "--sample-rate", "0.01", "--steps", "1000",
                                    "--delta", "1e-5"],
        "deeprad keys generate": [deeprad, "keys", "generate", "--out", str(scratch / "keys"),
                                  "--role", "site", "--name", "st-marys", "--force"],
    }


def _marker_ok(req: Requirement, extras: set[str]) -> bool:
    if req.marker is None:
        return True
    return any(Marker(str(req.marker)).evaluate({"extra": e}) for e in extras or {""})


def closure(requirement: str) -> set[str]:
    """Canonical names of every distribution `requirement` needs, itself included."""
    seen: set[str] = set()
    todo = [Requirement(requirement)]
    wanted_extras: dict[str, set[str]] = {}
    while todo:
        req = todo.pop()
        name = canonicalize_name(req.name)
        extras = set(req.extras)
        if name in seen and extras <= wanted_extras.get(name, set()):
            continue
        seen.add(name)
        wanted_extras[name] = wanted_extras.get(name, set()) | extras
        try:
            dist = metadata.distribution(name)
        except metadata.PackageNotFoundError:
            raise SystemExit(f"{name} is not installed: run `make install` first") from None
        for line in dist.requires or []:
            sub = Requirement(line)
            if _marker_ok(sub, wanted_extras[name]):
                todo.append(sub)
    return seen


def installed_bytes(name: str) -> int:
    """Bytes of the files distribution `name` installed (editable: its source folder)."""
    dist = metadata.distribution(name)
    total = 0
    for file in dist.files or []:
        path = Path(str(dist.locate_file(file)))
        if path.is_file():
            total += path.stat().st_size
    direct = dist.read_text("direct_url.json") or ""
    match = re.search(r'"url":\s*"file://([^"]+)"', direct)
    if match and '"editable": true' in direct:  # the source is the installed code
        src = Path(match[1]) / "src"
        total += sum(p.stat().st_size for p in src.rglob("*") if p.is_file()
                     and "__pycache__" not in p.parts)
    return total


def start_time(argv: list[str], repeats: int) -> float:
    """Median wall seconds of `argv` as a fresh process."""
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        subprocess.run(argv, check=True, stdout=subprocess.DEVNULL, env=dict(os.environ))
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--sizes-only", action="store_true",
                        help="skip the start times (timings belong to a quiet machine)")
    args = parser.parse_args()
    ok = True

    sizes: dict[str, int] = {}
    print(f"{'component':<18} {'distributions':>13} {'installed MiB':>14}")
    for label, req in COMPONENTS.items():
        names = closure(req)
        sizes[label] = sum(installed_bytes(n) for n in names)
        heavy = sorted(n for n in names if n in {"torch", "monai", "opacus"})
        print(f"{label:<18} {len(names):>13} {sizes[label] / 2**20:>14.1f}  "
              f"{'with ' + ', '.join(heavy) if heavy else 'no torch'}")
    ratio = sizes["operator"] / sizes["trainer"]
    verdict = "goal met" if ratio <= SIZE_GOAL else "GOAL MISSED"
    ok &= ratio <= SIZE_GOAL
    print(f"operator / trainer = {ratio:.3f} (goal <= {SIZE_GOAL}): {verdict}\n")
    if args.sizes_only:
        return 0 if ok else 1

    print(f"{'light command':<26} {'median s':>9}  (of {args.repeats} fresh processes)")
    with tempfile.TemporaryDirectory() as scratch:
        for label, argv in _light_commands(Path(scratch)).items():
            seconds = start_time(argv, args.repeats)
            ok &= seconds < START_GOAL_S
            print(f"{label:<26} {seconds:>9.2f}  "
                  f"{'ok' if seconds < START_GOAL_S else 'OVER ' + str(START_GOAL_S) + ' s'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

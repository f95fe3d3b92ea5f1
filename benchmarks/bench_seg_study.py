"""The default 3D segmentation study (`deeprad simulate --task segmentation`) over several seeds,
judged against issue #15's acceptance, side by side in one run.

Each seed changes the anatomy benchmark's patients (SYNTHETIC lesions on real MNI152 anatomy),
the weight init and the batches. Per seed it prints the final test-set Dice of the federated
model, the centralized baseline and the mean of the hospitals training alone, the two ratios the
acceptance names, the share of healthy test scans where the federated and the centralized
model predict nothing ("clean": Dice counts only scans with a lesion, so this is where false
alarms show), the final federated and centralized models' pooled VALIDATION Dice (what a
recipe may be chosen on; the test columns may not), the held-out hospital's Dice, HD95 and
lesion sensitivity at 1 false positive per scan (the federated model on a hospital that never
trained), and, with leave-one-site-out (the default), the mean Dice of the studies run without
each hospital on that hospital's test split. Then min and median rows, and PASS/FAIL:
federated Dice >= 0.95 x centralized and >= local-only mean + 0.05 on every seed.

    python benchmarks/bench_seg_study.py [--seeds 0 1 2 3 4] [--no-leave-one-out] [--keep DIR]

About 8-15 minutes per seed on 2 cores with leave-one-site-out, 5-8 without.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

RATIO_GOAL = 0.95  # federated Dice >= 0.95 x centralized
MARGIN_GOAL = 0.05  # federated Dice >= local-only mean + 0.05
COLUMNS = ("fed", "central", "local", "fed/cen", "fed-loc", "fed clean", "cen clean", "fed val",
           "cen val", "held Dice", "held HD95", "held s@1FP", "LOSO Dice", "seconds")


def run_study(out: Path, seed: int, leave_one_out: bool) -> dict[str, Any]:
    """One default 3D study; its report."""
    deeprad = str(Path(sys.executable).parent / "deeprad")  # the command beside this Python
    cmd = [deeprad, "simulate", "--task", "segmentation", "--seed", str(seed), "--output",
           str(out), *(["--leave-one-out"] if leave_one_out else [])]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed:\n{proc.stderr[-2000:]}")
    report: dict[str, Any] = json.loads((out / "report.json").read_text())
    return report


def seed_row(report: dict[str, Any], seconds: float) -> dict[str, float | None]:
    final = report["final"]
    fed, cen = final["federated"]["dice"], final["centralized"]["dice"]
    loc = final["local_only"]["mean"].get("dice")
    held = final["held_out"]["federated"]
    loso = report.get("leave_one_out")
    pooled_val = report["cross_site"]["rows"]
    both = fed is not None and cen is not None and loc is not None  # None: no lesion scan
    return {"fed": fed, "central": cen, "local": loc,
            "fed/cen": fed / cen if both and cen else None,
            "fed-loc": fed - loc if both else None,
            "fed clean": final["federated"]["specificity"],
            "cen clean": final["centralized"]["specificity"],
            "fed val": pooled_val["federated"]["pooled"],
            "cen val": pooled_val["centralized"]["pooled"],
            "held Dice": held["dice"], "held HD95": held["hd95"],
            "held s@1FP": (held.get("lesion_sensitivity") or {}).get("1"),
            "LOSO Dice": loso["mean"].get("dice") if loso else None, "seconds": seconds}


def _cell(value: float | None, column: str) -> str:
    if value is None:
        return f"{'n/a':>10}"
    if column == "seconds":
        return f"{value:>10.0f}"
    if column == "held HD95":
        return f"{value:>10.1f}"
    return f"{value:>+10.3f}" if column == "fed-loc" else f"{value:>10.3f}"


def _print_row(label: str, row: dict[str, float | None]) -> None:
    print(f"{label:>6} " + " ".join(_cell(row[c], c) for c in COLUMNS), flush=True)


def _summary(rows: list[dict[str, float | None]], pick: Any) -> dict[str, float | None]:
    out: dict[str, float | None] = {}
    for column in COLUMNS:
        values = [r[column] for r in rows if r[column] is not None]
        out[column] = pick(values) if values else None
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--no-leave-one-out", action="store_true",
                        help="skip the leave-one-site-out studies (about half the time)")
    parser.add_argument("--keep", type=Path, metavar="DIR",
                        help="keep each seed's study (report.json, checkpoint, plot) in "
                             "DIR/seed<N> instead of a temporary folder")
    args = parser.parse_args()
    print("Default 3D study (SYNTHETIC lesions on real MNI152 anatomy): final test-set Dice; "
          "held = the held-out hospital (never trained on), federated model; LOSO = mean Dice "
          "without each hospital on its test split", flush=True)
    print(f"{'seed':>6} " + " ".join(f"{c:>10}" for c in COLUMNS), flush=True)
    rows = []
    passed = []
    with tempfile.TemporaryDirectory(prefix="deeprad-bench-seg-") as tmp:
        for seed in args.seeds:
            start = time.perf_counter()
            report = run_study((args.keep or Path(tmp)) / f"seed{seed}", seed,
                               not args.no_leave_one_out)
            row = seed_row(report, time.perf_counter() - start)
            rows.append(row)
            _print_row(str(seed), row)
            ratio, margin = row["fed/cen"], row["fed-loc"]
            passed.append(ratio is not None and margin is not None
                          and ratio >= RATIO_GOAL and margin >= MARGIN_GOAL)
    _print_row("min", _summary(rows, min))
    _print_row("median", _summary(rows, statistics.median))
    verdict = "PASS" if all(passed) else "FAIL"
    print(f"{verdict}: federated Dice >= {RATIO_GOAL} x centralized and >= local-only mean + "
          f"{MARGIN_GOAL} on {sum(passed)} of {len(passed)} seeds")


if __name__ == "__main__":
    main()

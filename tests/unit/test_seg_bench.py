"""The segmentation trainer benchmark still runs at tiny sizes and does the same work as its
bare MONAI loop; its timings are not judged here."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[2]


def test_segmentation_trainer_benchmark_quick_matches_the_bare_monai_loop() -> None:
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_seg_trainer.py"),
                           "--quick"], cwd=ROOT, capture_output=True, text=True, timeout=300,
                          check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "SYNTHETIC" in proc.stdout
    assert "step-time ratio trainer / bare" in proc.stdout
    assert "% of the trainer's step" in proc.stdout
    assert "identical final weights: yes" in proc.stdout

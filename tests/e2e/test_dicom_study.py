"""A 3D segmentation study on hospital data as hospitals hold it: each site a folder of patients,
every sequence a DICOM series (one file per slice, shuffled names) with a NIfTI lesion mask,
written from the anatomy benchmark's volumes (SYNTHETIC tumours on REAL MNI152 anatomy) and
trained end to end through `deeprad simulate --task segmentation --dataset <folder>`."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from deeprad.core.data.anatomy import anatomy_sites, generate_patients
from deeprad.core.data.volumes import load_volumes
from deeprad.core.protocol import DatasetSpec
from tests.support.volume_files import write_site

pytestmark = pytest.mark.e2e

PATIENTS = 8  # per hospital
SIZE = 24


def _dice(metrics: dict[str, object]) -> float:
    value = metrics["dice"]
    assert isinstance(value, float) and 0.0 <= value <= 1.0, metrics
    return value


def test_dicom_series_study_trains_end_to_end(tmp_path: Path) -> None:
    root = tmp_path / "hospitals"
    for k, site in enumerate(anatomy_sites(3, seed=0)[:2]):  # two training-like scanners
        volumes = generate_patients(site, PATIENTS, seed=0, image_size=SIZE)
        write_site(root / site.name, volumes, dicom=True, seed=k)
    first_patient = sorted((root / "hospital-a").iterdir())[0]
    assert len(list((first_patient / "flair").iterdir())) == SIZE  # one DICOM file per slice

    out = tmp_path / "run"
    proc = subprocess.run(
        ["deeprad", "simulate", "--task", "segmentation", "--dataset", str(root),
         "--rounds", "2", "--image-size", str(SIZE), "--local-epochs", "1",
         "--output", str(out), "--report-json", str(tmp_path / "report.json")],
        capture_output=True, text=True, check=False, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]

    report = json.loads((tmp_path / "report.json").read_text())
    assert (report["task"], report["primary_metric"]) == ("segmentation", "dice")
    assert report["config"]["model"]["kwargs"]["in_channels"] == 3  # flair, t1, t2
    assert list(report["sites"]) == ["hospital-a", "hospital-b"]
    final = report["final"]
    _dice(final["federated"])
    _dice(final["centralized"])
    assert set(final["local_only"]["sites"]) == {"hospital-a", "hospital-b"}
    _dice(final["local_only"]["mean"])

    for name, dumped in report["sites"].items():
        spec = DatasetSpec.model_validate(dumped)
        assert spec.kind == "volumes" and Path(spec.path or "") == root / name
        splits = load_volumes(spec)
        patients = {split: set(s.patients) for split, s in splits.items()}
        # Every patient of the hospital is in exactly one split, and the study trained on all
        # of its training patients (one scan each).
        assert sorted(p for ids in patients.values() for p in ids) == \
            sorted(p.name for p in (root / name).iterdir())
        assert not patients["train"] & patients["val"]
        assert not patients["train"] & patients["test"]
        assert not patients["val"] & patients["test"]
        assert all(patients.values())
        for row in report["rounds"]:
            assert row["sites"][name]["num_samples"] == len(splits["train"])

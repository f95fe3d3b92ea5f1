"""Patient-level train/val/test splits of a hospital's volumes: every scan of a patient lands in
one split, so a model is never scored on a patient it trained on.

The test patients are held out first (`options["test_fraction"]`, default 0.2, chosen by
`options["test_seed"]`, default 0, so changing the validation seed never reshuffles the test
set): in each stratum (patients with / without a lesion) those whose id has the smallest keyed
hash, so a patient added to (or removed from) the site moves at most one other patient in or out
of the test set, where a permutation of the sorted ids would reshuffle it all. The rest is split
into train/val by `VolumeSet.split_by_patient(val_fraction, split_seed)`. A `splits.json` in the
site folder ({"<patient>": "train" | "val" | "test"}) overrides both and must name every
patient.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch

from deeprad.core.data.volumeset import VolumeSet
from deeprad.core.errors import DataError
from deeprad.core.protocol import DatasetSpec

SPLITS_FILE = "splits.json"
SPLITS = ("train", "val", "test")


def _fraction(value: object, name: str) -> float:
    try:
        fraction = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        fraction = -1.0
    if not 0.0 <= fraction < 1.0:
        raise DataError(f"dataset option {name}={value!r}: give a fraction in [0, 1)")
    return fraction


def read_splits_file(path: Path, patients: set[str]) -> dict[str, str]:
    """patient -> split from a splits.json, validated against the site's patients."""
    try:
        raw = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise DataError(f"{path}: not readable JSON ({exc})") from exc
    if not isinstance(raw, dict):
        raise DataError(f"{path}: expected an object {{\"<patient>\": \"train|val|test\"}}")
    bad = sorted(p for p, s in raw.items() if s not in SPLITS)
    if bad:
        raise DataError(f"{path}: patient {bad[0]} has split {raw[bad[0]]!r}; use one of "
                        f"{', '.join(SPLITS)}")
    unknown = sorted(set(raw) - patients)
    if unknown:
        raise DataError(f"{path}: names patient(s) {', '.join(unknown)} that have no folder "
                        "in the site")
    unlisted = sorted(patients - set(raw))
    if unlisted:
        raise DataError(f"{path}: patient(s) {', '.join(unlisted)} not assigned; give every "
                        "patient a split")
    return {str(p): str(s) for p, s in raw.items()}


def _by_assignment(volumes: VolumeSet, assignment: dict[str, str]) -> dict[str, VolumeSet]:
    return {split: volumes.subset(torch.tensor(
        [i for i, p in enumerate(volumes.patients) if assignment[p] == split], dtype=torch.long))
        for split in SPLITS}


def _test_patients(volumes: VolumeSet, fraction: float, seed: int) -> set[str]:
    """round(n * fraction) patients of each lesion stratum: the smallest keyed hashes of ids."""
    ill = {p for p, label in zip(volumes.patients, volumes.labels.tolist(), strict=True)
           if label > 0}
    chosen: set[str] = set()
    for group in (sorted(set(volumes.patients) - ill), sorted(ill)):
        ranked = sorted(group, key=lambda p: hashlib.blake2b(
            p.encode(), key=str(seed).encode(), digest_size=8).digest())
        chosen.update(ranked[:round(len(group) * fraction)])
    return chosen


def split_patients(volumes: VolumeSet, spec: DatasetSpec, site: Path) -> dict[str, VolumeSet]:
    """{"train", "val", "test"} VolumeSets with no patient in two of them."""
    splits_file = site / SPLITS_FILE
    if splits_file.is_file():
        return _by_assignment(volumes, read_splits_file(splits_file, set(volumes.patients)))
    opts = dict(spec.options)
    test_fraction = _fraction(opts.get("test_fraction", 0.2), "test_fraction")
    held_out = _test_patients(volumes, test_fraction, int(opts.get("test_seed", 0)))
    rest, test = (volumes.subset(torch.tensor(
        [i for i, p in enumerate(volumes.patients) if (p in held_out) == side], dtype=torch.long))
        for side in (False, True))
    train, val = rest.split_by_patient(spec.val_fraction, spec.split_seed)
    return {"train": train, "val": val, "test": test}

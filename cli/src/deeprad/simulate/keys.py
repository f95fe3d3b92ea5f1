"""Identities of a local study: the hub's and one per simulated hospital.

Each key folder is written like a mounted Kubernetes Secret (private files 0600 in a 0700
folder) under the output folder, and handed to the trainer and aggregator Jobs by path; private
keys are never printed, logged or put in a report. The registry holds public keys only.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from deeprad.core.identity import Identity, KeyRegistry

HUB_NAME = "hub"


@dataclass(frozen=True)
class StudyKeys:
    """Where each party's key folder is, and the public registry of them all."""

    hub_dir: Path
    site_dirs: dict[str, Path]
    registry: KeyRegistry


def make_study_keys(folder: Path, sites: list[str]) -> StudyKeys:
    """Fresh identities for the hub and `sites` under `folder` (replacing older ones)."""
    folder.mkdir(parents=True, exist_ok=True)
    os.chmod(folder, 0o700)
    publics = []
    dirs: dict[str, Path] = {}
    for name, role in [(HUB_NAME, "hub"), *((s, "site") for s in sites)]:
        ident = Identity.generate(name, "hub" if role == "hub" else "site")
        ident.save(folder / name, overwrite=True)
        publics.append(ident.public())
        dirs[name] = folder / name
    hub_dir = dirs.pop(HUB_NAME)
    return StudyKeys(hub_dir=hub_dir, site_dirs=dirs, registry=KeyRegistry.of(publics))

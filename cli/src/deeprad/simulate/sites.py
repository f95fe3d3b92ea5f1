"""The simulated hospitals: one dataset spec each, and the held-out test set."""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

from deeprad.core.data import ImageSet, load_dataset
from deeprad.core.data.phantoms import generate_phantoms, site_profiles
from deeprad.core.errors import ConfigError
from deeprad.core.protocol import DatasetSpec
from deeprad.simulate.config import SIZE_SKEW, SimulationConfig


@dataclass(frozen=True)
class Site:
    name: str
    dataset: DatasetSpec


def make_sites(cfg: SimulationConfig) -> list[Site]:
    """Synthetic phantom hospitals, or one per sub-folder / .npz file of `cfg.dataset`."""
    if cfg.dataset == "phantom":
        sites = []
        for i, profile in enumerate(site_profiles(cfg.sites, cfg.seed)):
            n = max(8, round(cfg.samples_per_site * SIZE_SKEW[i % len(SIZE_SKEW)]))
            spec = DatasetSpec(kind="phantom", image_size=cfg.image_size, split_seed=cfg.seed + i,
                               options={"profile": profile.as_dict(), "samples": n,
                                        "seed": cfg.seed * 1000 + i})
            sites.append(Site(f"hospital-{i + 1}", spec))
        return sites
    root = Path(cfg.dataset)
    if not root.is_dir():
        raise ConfigError(f"--dataset {cfg.dataset!r}: not 'phantom' and not a folder")
    entries = sorted(p for p in root.iterdir() if p.is_dir() or p.suffix == ".npz")
    if len(entries) < cfg.sites:
        raise ConfigError(f"--dataset {root}: {len(entries)} site folders / .npz files, "
                          f"--sites asks for {cfg.sites}")
    return [
        Site(p.stem.lower().replace("_", "-"),
             DatasetSpec(kind="npz" if p.suffix == ".npz" else "folder", path=str(p),
                         image_size=cfg.image_size, split_seed=cfg.seed + i))
        for i, p in enumerate(entries[: cfg.sites])
    ]


def make_test_set(cfg: SimulationConfig, sites: list[Site]) -> ImageSet:
    """Held out from all training: fresh balanced phantoms from every hospital's scanner, or,
    for real data, the union of the sites' validation splits."""
    if cfg.dataset == "phantom":
        parts = [
            generate_phantoms(cfg.test_samples_per_site, replace(profile, prevalence=0.5),
                              cfg.image_size, seed=10_000_000 + cfg.seed * 1000 + i)
            for i, profile in enumerate(site_profiles(cfg.sites, cfg.seed))
        ]
        return ImageSet.concat(parts)
    return ImageSet.concat([load_dataset(s.dataset)[1] for s in sites])

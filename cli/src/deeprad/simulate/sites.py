"""The simulated hospitals: one dataset spec each, and the held-out test set."""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

from deeprad.core.data import ImageSet, load_dataset
from deeprad.core.data.loaders import load_split
from deeprad.core.data.phantoms import generate_phantoms, site_profiles
from deeprad.core.errors import ConfigError
from deeprad.core.protocol import DatasetSpec
from deeprad.simulate.config import SIZE_SKEW, SimulationConfig, site_entries


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
    entries = site_entries(root)
    if len(entries) != cfg.sites:
        raise ConfigError(f"--dataset {root} holds {len(entries)} site folders / .npz files "
                          f"but the study has {cfg.sites} sites: leave --sites out (the folder "
                          "decides)")
    return [
        Site(p.stem.lower().replace("_", "-"),
             DatasetSpec(kind="npz" if p.suffix == ".npz" else "folder", path=str(p),
                         image_size=cfg.image_size, split_seed=cfg.seed + i,
                         options=data_options(cfg, npz=p.suffix == ".npz")))
        for i, p in enumerate(entries)
    ]


def data_options(cfg: SimulationConfig, npz: bool) -> dict[str, object]:
    """The loader options the flags set: the intensity scaling and which label is positive
    (a class folder's name, or a .npz file's label values)."""
    options: dict[str, object] = {"normalize": cfg.normalize}
    if cfg.positive_label is not None:
        if not npz:
            options["positive_class"] = cfg.positive_label
        else:
            try:
                options["positive_labels"] = [int(v) for v in cfg.positive_label.split(",")]
            except ValueError:
                raise ConfigError(f"--positive-label {cfg.positive_label!r}: a .npz site's "
                                  "labels are integers; give them comma-separated, e.g. "
                                  "--positive-label 1,2") from None
    return options


def make_test_set(cfg: SimulationConfig, sites: list[Site]) -> ImageSet:
    """Held out from all training: fresh balanced phantoms from every hospital's scanner; for
    real data, the sites' own test splits (a .npz file's test_images) when every site has one,
    else the union of the sites' validation splits."""
    if cfg.dataset == "phantom":
        parts = [
            generate_phantoms(cfg.test_samples_per_site, replace(profile, prevalence=0.5),
                              cfg.image_size, seed=10_000_000 + cfg.seed * 1000 + i)
            for i, profile in enumerate(site_profiles(cfg.sites, cfg.seed))
        ]
        return ImageSet.concat(parts)
    tests = [load_split(s.dataset, "test") for s in sites]
    if all(t is not None for t in tests):
        return ImageSet.concat([t for t in tests if t is not None])
    return ImageSet.concat([load_dataset(s.dataset)[1] for s in sites])

"""The simulated hospitals: one dataset spec each (the ones that train, then the ones held out
of training), and the held-out test set."""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

from deeprad.core.data import ImageSet, Samples, concat_samples, load_dataset, load_split
from deeprad.core.data.phantoms import generate_phantoms, site_profiles
from deeprad.core.errors import ConfigError
from deeprad.core.protocol import DatasetSpec
from deeprad.simulate.config import SIZE_SKEW, SimulationConfig, site_entries

# New patients per anatomy hospital in its own test split (the study's test set is the union
# of the training hospitals').
ANATOMY_TEST_PATIENTS = 8


@dataclass(frozen=True)
class Site:
    name: str
    dataset: DatasetSpec


def make_sites(cfg: SimulationConfig) -> list[Site]:
    """The hospitals that train: synthetic benchmark hospitals, or one per sub-folder / .npz
    file of `cfg.dataset` (less the held-out ones)."""
    return _hospitals(cfg)[: cfg.sites]


def make_held_out(cfg: SimulationConfig) -> list[Site]:
    """The hospitals no model of the study trains on (`cfg.held_out_sites`, after the others)."""
    return _hospitals(cfg)[cfg.sites:]


def _hospitals(cfg: SimulationConfig) -> list[Site]:
    total = cfg.sites + cfg.held_out_sites
    if cfg.dataset == "phantom":
        sites = []
        for i, profile in enumerate(site_profiles(total, cfg.seed)):
            n = max(8, round(cfg.samples_per_site * SIZE_SKEW[i % len(SIZE_SKEW)]))
            spec = DatasetSpec(kind="phantom", image_size=cfg.image_size, split_seed=cfg.seed + i,
                               options={"profile": profile.as_dict(), "samples": n,
                                        "seed": cfg.seed * 1000 + i})
            sites.append(Site(f"hospital-{i + 1}", spec))
        return sites
    if cfg.dataset == "anatomy":
        return _anatomy_hospitals(cfg, total)
    root = Path(cfg.dataset)
    if not root.is_dir():
        raise ConfigError(f"--dataset {cfg.dataset!r}: not a benchmark and not a folder")
    entries = site_entries(root)
    if len(entries) != total:
        raise ConfigError(f"--dataset {root} holds {len(entries)} site folders / .npz files "
                          f"but the study has {cfg.sites} sites and {cfg.held_out_sites} held "
                          "out: leave --sites out (the folder decides)")
    if cfg.task == "segmentation":
        return [Site(_site_name(p), DatasetSpec(kind="volumes", path=str(p),
                                                image_size=cfg.image_size,
                                                split_seed=cfg.seed + i,
                                                options=volume_options(cfg)))
                for i, p in enumerate(entries)]
    return [
        Site(_site_name(p),
             DatasetSpec(kind="npz" if p.suffix == ".npz" else "folder", path=str(p),
                         image_size=cfg.image_size, split_seed=cfg.seed + i,
                         options=data_options(cfg, npz=p.suffix == ".npz")))
        for i, p in enumerate(entries)
    ]


def _site_name(entry: Path) -> str:
    return entry.stem.lower().replace("_", "-")


def _anatomy_hospitals(cfg: SimulationConfig, total: int) -> list[Site]:
    """Benchmark hospitals on real anatomy, each with its own scanner and lesion mix, sizes
    skewed like the phantom hospitals' (in patients), each with its own test patients. The
    benchmark's last hospital has a scanner unlike the others (`hospital-x`): it is the first
    one held out, and left out when none is."""
    from deeprad.core.data.anatomy import anatomy_sites

    profiles = anatomy_sites(max(total, cfg.sites + 1), cfg.seed)[:total]
    sites = []
    for i, profile in enumerate(profiles):
        patients = max(6, round(cfg.samples_per_site * SIZE_SKEW[i % len(SIZE_SKEW)]))
        spec = DatasetSpec(kind="anatomy", image_size=cfg.image_size, split_seed=cfg.seed + i,
                           options={"profile": profile.as_dict(), "patients": patients,
                                    "test_patients": ANATOMY_TEST_PATIENTS, "seed": cfg.seed})
        sites.append(Site(profile.name, spec))
    return sites


def volume_options(cfg: SimulationConfig) -> dict[str, object]:
    """A volume folder's loader options the flags set: the intensity scaling."""
    return {"normalize": cfg.normalize}


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


def make_test_set(cfg: SimulationConfig, sites: list[Site]) -> Samples:
    """Held out from all training: fresh balanced phantoms from every hospital's scanner; for
    other data, the sites' own test splits (a .npz file's test_images, a volume dataset's
    held-out patients) when every site has one, else the union of the sites' validation
    splits."""
    if cfg.dataset == "phantom":
        parts = [
            generate_phantoms(cfg.test_samples_per_site, replace(profile, prevalence=0.5),
                              cfg.image_size, seed=10_000_000 + cfg.seed * 1000 + i)
            for i, profile in enumerate(site_profiles(cfg.sites, cfg.seed))
        ]
        return ImageSet.concat(parts)
    tests = [load_split(s.dataset, "test") for s in sites]
    if all(t is not None and len(t) for t in tests):
        return concat_samples([t for t in tests if t is not None])
    return concat_samples([load_dataset(s.dataset)[1] for s in sites])


def describe_test_set(cfg: SimulationConfig, sites: list[Site]) -> str:
    """What `make_test_set` scored on, as the report says it: an independent test set, or —
    when a hospital has no test split — the validation splits the best round is chosen on."""
    if cfg.dataset == "phantom":
        return "fresh phantoms from every hospital's scanner (never trained on)"
    tests = [load_split(s.dataset, "test") for s in sites]
    if all(t is not None and len(t) for t in tests):
        return "the training hospitals' own test splits (never trained on or chosen on)"
    return ("the union of the hospitals' validation splits (not every hospital has a test "
            "split): the data the best round is chosen on, so not an independent test")


def held_out_data(site: Site) -> Samples:
    """Everything a held-out hospital holds (every split: none of it was trained on)."""
    train, val = load_dataset(site.dataset)
    test = load_split(site.dataset, "test")
    return concat_samples([train, val, *([test] if test is not None and len(test) else [])])

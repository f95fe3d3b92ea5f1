"""Setting up a local study: a fresh store, the simulated hospitals (those that train and those
held out) and the test set, an identity for the hub and each hospital, the hub-signed initial
model (round 0), and — when the study asks — the privacy plan and the secure-aggregation
settings every round shares. `without_site` derives the leave-one-site-out studies."""

from __future__ import annotations

import shutil
import sys
from dataclasses import dataclass, replace

import torch

from deeprad.core import __version__, distributed_dp
from deeprad.core.checkpoint import write_checkpoint
from deeprad.core.data import Samples, VolumeSet, load_dataset
from deeprad.core.errors import ConfigError
from deeprad.core.identity import Identity
from deeprad.core.layout import StudyLayout
from deeprad.core.models import build_model, model_weights
from deeprad.core.privacy import PrivacyBudget
from deeprad.core.protocol import DistributedDPSpec, SecAggSpec
from deeprad.core.secagg import threshold_for
from deeprad.core.secagg.quantize import VectorLayout
from deeprad.core.store.local import LocalStore
from deeprad.simulate.config import SimulationConfig
from deeprad.simulate.keys import StudyKeys, make_study_keys
from deeprad.simulate.privacy_plan import PrivacyPlan
from deeprad.simulate.sites import Site, make_held_out, make_sites, make_test_set

NAMESPACE = "local"
STUDY = "simulated-study"


@dataclass
class LocalStudy:
    """Everything the rounds, the baselines and the report share."""

    cfg: SimulationConfig
    store: LocalStore
    layout: StudyLayout
    sites: list[Site]  # the hospitals that train
    test_set: Samples
    keys: StudyKeys
    hub: Identity
    initial_weights: dict[str, torch.Tensor]
    plan: PrivacyPlan | None  # None: no privacy budget
    secagg: SecAggSpec | None  # None: plain FedAvg (or another strategy) at the hub
    held_out: list[Site]  # hospitals no model of the study trains on


def set_up(cfg: SimulationConfig) -> LocalStudy:
    """Create the study in `cfg.output` (replacing an earlier one) up to its round-0 model.
    Torch's thread count is the caller's (the runner's workers hold the cores meanwhile)."""
    cfg.output.mkdir(parents=True, exist_ok=True)
    store = LocalStore(cfg.output / "store")
    layout = StudyLayout(NAMESPACE, STUDY)
    shutil.rmtree(store.root / layout.root, ignore_errors=True)  # a fresh study every run
    sites, held_out = make_sites(cfg), make_held_out(cfg)
    _say_what_the_data_are(cfg, sites, held_out)
    cfg = _with_input_channels(cfg, sites)
    test_set = make_test_set(cfg, sites)
    keys = make_study_keys(cfg.output / "keys", [s.name for s in sites])
    hub = Identity.load(keys.hub_dir)
    torch.manual_seed(cfg.seed)
    initial_weights = model_weights(build_model(cfg.model, allow_code=True))
    study = LocalStudy(cfg=cfg, store=store, layout=layout, sites=sites, test_set=test_set,
                       keys=keys, hub=hub, initial_weights=initial_weights, plan=None,
                       secagg=None, held_out=held_out)
    return _start(study)


def without_site(study: LocalStudy, left_out: str) -> LocalStudy:
    """The same study without hospital `left_out`, from the same initial model, under a study
    name of its own in the same store (leave-one-site-out)."""
    layout = StudyLayout(NAMESPACE, f"{STUDY}-without-{left_out}")
    shutil.rmtree(study.store.root / layout.root, ignore_errors=True)
    others = [s for s in study.sites if s.name != left_out]
    return _start(replace(study, layout=layout, sites=others, plan=None, secagg=None))


def _start(study: LocalStudy) -> LocalStudy:
    """Sign the round-0 model and plan what every round shares (privacy, secure aggregation)
    for the study's hospitals."""
    cfg, sites = study.cfg, study.sites
    write_checkpoint(study.store, study.layout, {
        "study": study.layout.study, "round": 0, "model": cfg.model,
        "producer": f"deeprad-simulate/{__version__}", "parent_sha256": None},
        study.initial_weights, hub=study.hub)
    need_sizes = cfg.dp_epsilon is not None or cfg.secure_aggregation
    train_sizes = {s.name: len(load_dataset(s.dataset)[0]) for s in sites} if need_sizes else {}
    plan = _privacy_plan(cfg, train_sizes)
    threshold = threshold_for(len(sites), cfg.secagg_threat_model)
    secagg = SecAggSpec(roster=sorted(s.name for s in sites), clip=cfg.secagg_clip,
                        weight_normalizer=float(sum(train_sizes.values())),
                        threshold=threshold, timeout_s=cfg.secagg_timeout_s,
                        distributed_dp=_distributed_dp(cfg, len(sites), study.initial_weights,
                                                       threshold)
                        ) if cfg.secure_aggregation else None
    return replace(study, plan=plan, secagg=secagg)


def _say_what_the_data_are(cfg: SimulationConfig, sites: list[Site],
                           held_out: list[Site]) -> None:
    """Synthetic data say so wherever they are shown."""
    kept = f" ({len(held_out)} more held out of training)" if held_out else ""
    if cfg.dataset == "phantom":
        print("Data: SYNTHETIC tumour phantoms (seeded; not patient data) for "
              f"{len(sites)} simulated hospitals{kept} with different scanners and prevalence.",
              file=sys.stderr)
    elif cfg.dataset == "anatomy":
        from deeprad.core.data.anatomy import DESCRIPTION

        print(f"Data: {DESCRIPTION} for {len(sites)} simulated hospitals{kept}.",
              file=sys.stderr)


def _with_input_channels(cfg: SimulationConfig, sites: list[Site]) -> SimulationConfig:
    """A segmentation network takes as many input channels as the data have sequences; fill
    model.kwargs["in_channels"] from the data, or refuse one that disagrees."""
    if cfg.task != "segmentation":
        return cfg
    data = load_dataset(sites[0].dataset)[0]
    if not isinstance(data, VolumeSet):
        raise ConfigError(f"--task segmentation: hospital {sites[0].name}'s data are 2D "
                          "images, not volumes with lesion masks")
    channels = int(data.images.shape[1])
    given = cfg.model.kwargs.get("in_channels")
    if given is not None and int(given) != channels:
        names = f" ({', '.join(data.channels)})" if data.channels else ""
        raise ConfigError(f"--model-kwargs in_channels {given}, but the data have {channels} "
                          f"sequences{names}: leave in_channels out (the data decide) or pass "
                          f"{channels}")
    model = cfg.model.model_copy(update={"kwargs": {**cfg.model.kwargs,
                                                    "in_channels": channels}})
    return replace(cfg, model=model)


def _distributed_dp(cfg: SimulationConfig, sites: int, weights: dict[str, torch.Tensor],
                    threshold: int) -> DistributedDPSpec | None:
    """Noise calibrated to spend the site-level budget over the planned rounds, one share per
    site, sized for the smallest sum the round unmasks (the threshold)."""
    if cfg.distributed_dp_epsilon is None:
        return None
    return distributed_dp.plan(
        epsilon=cfg.distributed_dp_epsilon, delta=cfg.dp_delta, rounds=cfg.rounds,
        l2_clip=cfg.distributed_dp_clip, dim=VectorLayout.of(weights).size, sites=sites,
        noise_shares=threshold)


def _privacy_plan(cfg: SimulationConfig, train_sizes: dict[str, int]) -> PrivacyPlan | None:
    if cfg.dp_epsilon is None:
        return None
    budget = PrivacyBudget(epsilon=cfg.dp_epsilon, delta=cfg.dp_delta,
                           accountant=cfg.dp_accountant)  # type: ignore[arg-type]
    return PrivacyPlan.create(budget, train_sizes, cfg.train.batch_size, cfg.train.local_epochs,
                              cfg.rounds, cfg.max_grad_norm, cfg.dp_noise_multiplier)

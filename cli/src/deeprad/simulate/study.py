"""Setting up a local study: a fresh store, the simulated hospitals and the test set, an
identity for the hub and each hospital, the hub-signed initial model (round 0), and — when the
study asks — the privacy plan and the secure-aggregation settings every round shares."""

from __future__ import annotations

import os
import shutil
import sys
from dataclasses import dataclass

import torch

from deeprad.core import __version__, distributed_dp
from deeprad.core.checkpoint import write_checkpoint
from deeprad.core.data import ImageSet, load_dataset
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
from deeprad.simulate.sites import Site, make_sites, make_test_set

NAMESPACE = "local"
STUDY = "simulated-study"


@dataclass
class LocalStudy:
    """Everything the rounds, the baselines and the report share."""

    cfg: SimulationConfig
    store: LocalStore
    layout: StudyLayout
    sites: list[Site]
    test_set: ImageSet
    keys: StudyKeys
    hub: Identity
    initial_weights: dict[str, torch.Tensor]
    plan: PrivacyPlan | None  # None: no privacy budget
    secagg: SecAggSpec | None  # None: plain FedAvg (or another strategy) at the hub


def set_up(cfg: SimulationConfig) -> LocalStudy:
    """Create the study in `cfg.output` (replacing an earlier one) up to its round-0 model."""
    torch.set_num_threads(len(os.sched_getaffinity(0)))
    cfg.output.mkdir(parents=True, exist_ok=True)
    store = LocalStore(cfg.output / "store")
    layout = StudyLayout(NAMESPACE, STUDY)
    shutil.rmtree(store.root / layout.root, ignore_errors=True)  # a fresh study every run
    sites = make_sites(cfg)
    if cfg.dataset == "phantom":
        print("Data: SYNTHETIC tumour phantoms (seeded; not patient data) for "
              f"{len(sites)} simulated hospitals with different scanners and prevalence.",
              file=sys.stderr)
    test_set = make_test_set(cfg, sites)
    keys = make_study_keys(cfg.output / "keys", [s.name for s in sites])
    hub = Identity.load(keys.hub_dir)
    torch.manual_seed(cfg.seed)
    initial_weights = model_weights(build_model(cfg.model, allow_code=True))
    write_checkpoint(store, layout, {"study": STUDY, "round": 0, "model": cfg.model,
                                     "producer": f"deeprad-simulate/{__version__}",
                                     "parent_sha256": None}, initial_weights, hub=hub)
    need_sizes = cfg.dp_epsilon is not None or cfg.secure_aggregation
    train_sizes = {s.name: len(load_dataset(s.dataset)[0]) for s in sites} if need_sizes else {}
    plan = _privacy_plan(cfg, train_sizes)
    threshold = threshold_for(len(sites), cfg.secagg_threat_model)
    secagg = SecAggSpec(roster=sorted(s.name for s in sites), clip=cfg.secagg_clip,
                        weight_normalizer=float(sum(train_sizes.values())),
                        threshold=threshold, timeout_s=cfg.secagg_timeout_s,
                        distributed_dp=_distributed_dp(cfg, len(sites), initial_weights,
                                                       threshold)
                        ) if cfg.secure_aggregation else None
    return LocalStudy(cfg=cfg, store=store, layout=layout, sites=sites, test_set=test_set,
                      keys=keys, hub=hub, initial_weights=initial_weights,
                      plan=plan, secagg=secagg)


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

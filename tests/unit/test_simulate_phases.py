"""`deeprad simulate`'s phases read and run alone: a study set up, a round the privacy budget
refuses before any hospital trains, and the report written for a study that ran no round."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from concurrent.futures import BrokenExecutor, Executor, Future
from pathlib import Path
from typing import Any, cast

import pytest

from deeprad.core.checkpoint import read_checkpoint
from deeprad.core.data import load_dataset
from deeprad.core.privacy import round_steps
from deeprad.simulate.baselines import Baselines
from deeprad.simulate.config import SimulationConfig
from deeprad.simulate.finish import finish
from deeprad.simulate.round import Stop, run_round
from deeprad.simulate.study import set_up
from deeprad.simulate.workers import WorkerLanes


class _NoWorkers(Executor):
    """Fails the test if the phase under test starts any work."""

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Future[Any]:
        raise AssertionError(f"unexpected work submitted: {fn.__name__}")

    def submit_to(self, site: str, fn: Callable[..., Any], /, *args: Any,
                  **kwargs: Any) -> Future[Any]:
        raise AssertionError(f"unexpected work submitted for {site}: {fn.__name__}")


def test_a_refused_round_stops_the_study_and_the_report_says_why(tmp_path: Path) -> None:
    cfg = SimulationConfig(sites=2, rounds=3, samples_per_site=16, test_samples_per_site=8,
                           image_size=16, output=tmp_path / "out", baselines=False,
                           dp_epsilon=0.5, dp_noise_multiplier=0.5)
    study = set_up(cfg)
    _, initial = read_checkpoint(study.store, study.layout, 0, hub=study.hub.public())
    assert initial.round == 0 and initial.signature is not None

    outcome = run_round(study, 1, cast(WorkerLanes, _NoWorkers()), _NoWorkers())
    assert isinstance(outcome, Stop)
    assert outcome.reason.startswith("privacy budget: before round 1: the next round would "
                                     "raise ε to")

    report = finish(study, [], Baselines(), outcome.reason, started=0.0)
    assert (report["stopped"], report["final_round"], report["rounds"]) == (outcome.reason, 0, [])
    assert report["epsilon_spent"] == 0.0
    assert report["privacy"]["noise_multiplier"] == {s.name: 0.5 for s in study.sites}
    assert report["final"]["federated"] is not None  # the initial model, scored
    assert (tmp_path / "out" / "final.safetensors").is_file()
    assert json.loads((tmp_path / "out" / "final.json").read_text())["round"] == 0
    assert json.loads((tmp_path / "out" / "report.json").read_text()) == report


def test_the_plan_charges_each_site_the_core_rule(tmp_path: Path) -> None:
    cfg = SimulationConfig(sites=2, rounds=2, samples_per_site=16, test_samples_per_site=8,
                           image_size=16, output=tmp_path / "out", baselines=False,
                           dp_epsilon=8.0, dp_noise_multiplier=1.0)
    study = set_up(cfg)
    assert study.plan is not None
    for site in study.sites:
        records = len(load_dataset(site.dataset)[0])
        assert study.plan.per_round[site.name] == round_steps(
            records, batch_size=cfg.train.batch_size, local_epochs=cfg.train.local_epochs,
            noise_multiplier=1.0)


def test_a_hospitals_worker_that_dies_fails_its_task_and_the_lane_takes_a_fresh_one() -> None:
    lanes = WorkerLanes(1, 1, [])
    try:
        died = lanes.submit_to("hospital-a", os._exit, 1)  # the worker process dies mid-task
        with pytest.raises(BrokenExecutor):
            died.result(timeout=120)
        assert lanes.submit_to("hospital-a", abs, -3).result(timeout=120) == 3
    finally:
        lanes.shutdown()

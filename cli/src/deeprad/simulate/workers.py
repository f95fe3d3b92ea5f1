"""Warm worker processes for a local study: each simulated hospital's round runs the same
`run_training_task` a Kubernetes trainer Job runs; datasets stay cached between rounds."""

from __future__ import annotations

import multiprocessing
from concurrent.futures import ProcessPoolExecutor

import torch
from safetensors.torch import save

from deeprad.core.checkpoint import read_checkpoint
from deeprad.core.data import Samples, concat_samples, load_dataset
from deeprad.core.layout import StudyLayout
from deeprad.core.models import build_model
from deeprad.core.protocol import ClinicalMetrics, DatasetSpec, TrainConfig, TrainingTask
from deeprad.core.store import open_store
from deeprad.trainer import evaluate, train_epochs
from deeprad.trainer.job import run_training_task
from deeprad.trainer.local_training import select_device

_TEST_SET: Samples | None = None


def _init(threads: int, test_set: Samples) -> None:
    global _TEST_SET
    torch.set_num_threads(threads)
    _TEST_SET = test_set


def start_pool(workers: int, threads: int, test_set: Samples) -> ProcessPoolExecutor:
    """Worker processes started once per study (spawned: no forked torch thread pools)."""
    return ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("spawn"),
                               initializer=_init, initargs=(threads, test_set))


def train_site_round(task_json: str, store_url: str) -> str:
    """One hospital, one round: the trainer Job's code path, through the local store."""
    task = TrainingTask.model_validate_json(task_json)
    # The user's own machine and config: a --model package.module:factory may run here.
    return run_training_task(task, open_store(store_url),
                             allow_model_code=True).model_dump_json()


def train_baseline(name: str, datasets: list[str], cfg_json: str, store_url: str, namespace: str,
                   study: str, rounds: int) -> tuple[str, list[ClinicalMetrics], bytes]:
    """A non-federated comparison: train from the study's initial model on the pooled train
    splits of `datasets`, `rounds` x local_epochs epochs, scoring the test set after each
    round's worth of epochs. Returns the curve and the final weights (safetensors bytes, for
    the cross-site evaluation)."""
    assert _TEST_SET is not None, "worker not initialised"
    cfg = TrainConfig.model_validate_json(cfg_json)
    weights, manifest = read_checkpoint(open_store(store_url), StudyLayout(namespace, study), 0)
    model = build_model(manifest.model, allow_code=True)
    model.load_state_dict(weights)
    device = select_device(cfg.device)
    model.to(device)
    train = concat_samples([load_dataset(DatasetSpec.model_validate_json(d))[0]
                            for d in datasets])
    curve: list[ClinicalMetrics] = []
    for r in range(rounds):
        train_epochs(model, train, cfg.model_copy(update={"seed": cfg.seed + r}), device)
        metrics = evaluate(model, _TEST_SET, device)
        assert metrics is not None
        curve.append(metrics)
    return name, curve, save({k: v.detach().cpu().contiguous()
                              for k, v in model.state_dict().items()})

"""Warm worker processes for a local study: each simulated hospital's round runs the same
`run_training_task` a Kubernetes trainer Job runs. A hospital always runs in the same worker
(its lane), which generates or reads its data once, before the first round, and scores the
global models on its validation split for the report; the main process loads it only
when a privacy budget or secure aggregation needs its size."""

from __future__ import annotations

import contextlib
import multiprocessing
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import BrokenExecutor, Executor, Future, ProcessPoolExecutor
from dataclasses import dataclass
from typing import Any, ParamSpec, TypeVar

import torch
from safetensors.torch import save

from deeprad.core.checkpoint import read_checkpoint
from deeprad.core.data import ImageSet, Samples, concat_samples, load_dataset
from deeprad.core.layout import StudyLayout
from deeprad.core.metrics import clinical_metrics
from deeprad.core.models import build_model
from deeprad.core.protocol import (
    ClinicalMetrics,
    DatasetSpec,
    ModelSpec,
    TrainConfig,
    TrainingTask,
)
from deeprad.core.store import open_store
from deeprad.trainer import evaluate, image_logits, inference_roi, train_epochs
from deeprad.trainer.job import run_training_task
from deeprad.trainer.local_training import select_device

P = ParamSpec("P")
T = TypeVar("T")


def _init(threads: int) -> None:
    torch.set_num_threads(threads)


class WorkerLanes(Executor):
    """`lanes` worker processes (`_worker_context`) of `threads` torch threads each. Each of
    `sites` has a home lane (their expected sizes balanced), so its data are loaded in one
    process only; other work goes to the least busy lane."""

    def __init__(self, lanes: int, threads: int,
                 sites: Sequence[tuple[str, DatasetSpec]] = ()) -> None:
        self._threads = threads
        self._context = _worker_context()
        self._lanes = [self._new_lane() for _ in range(max(1, lanes))]
        self._queued = [0] * len(self._lanes)
        self._lock = threading.Lock()  # futures finish on the executors' own threads
        self._homes = _balance(sites, len(self._lanes))
        # Start every worker now, each loading its hospitals' data, from a thread of its own
        # (starting a worker waits for the fork server): the caller sets the study up meanwhile.
        self._starter = threading.Thread(target=self._start, args=(sites,),
                                         name="worker-start", daemon=True)
        self._starter.start()

    def _start(self, sites: Sequence[tuple[str, DatasetSpec]]) -> None:
        with contextlib.suppress(RuntimeError):  # the study failed and shut the lanes
            for name, spec in sites:
                self._on(self._homes[name], warm_site, spec.model_dump_json())
            for lane in set(range(len(self._lanes))) - set(self._homes.values()):
                self._on(lane, _init, self._threads)

    def submit_to(self, site: str, fn: Callable[P, T], /, *args: P.args,
                  **kwargs: P.kwargs) -> Future[T]:
        """Run `fn` in `site`'s lane (the least busy one for a site without a home)."""
        self._starter.join()  # its data first
        lane = self._homes.get(site)
        return self._on(self._least_busy() if lane is None else lane, fn, *args, **kwargs)

    def submit(self, fn: Callable[P, T], /, *args: P.args,
               **kwargs: P.kwargs) -> Future[T]:
        self._starter.join()
        return self._on(self._least_busy(), fn, *args, **kwargs)

    def submit_on(self, lane: int, fn: Callable[P, T], /, *args: P.args,
                  **kwargs: P.kwargs) -> Future[T]:
        """Run `fn` in lane `lane` (0 .. `lanes` - 1): for a caller that keeps each lane busy
        with one job at a time itself."""
        self._starter.join()
        return self._on(lane, fn, *args, **kwargs)

    @property
    def lanes(self) -> int:
        return len(self._lanes)

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        for lane in self._lanes:  # stop them all, then wait: they exit side by side
            lane.shutdown(wait=False, cancel_futures=cancel_futures)
        if wait:
            for lane in self._lanes:
                lane.shutdown(wait=True)

    def _least_busy(self) -> int:
        return min(range(len(self._lanes)), key=self._queued.__getitem__)

    def _new_lane(self) -> ProcessPoolExecutor:
        return ProcessPoolExecutor(max_workers=1, mp_context=self._context, initializer=_init,
                                   initargs=(self._threads,))

    def _on(self, lane: int, fn: Callable[..., T], *args: Any, **kwargs: Any) -> Future[T]:
        with self._lock:
            self._queued[lane] += 1
            pool = self._lanes[lane]
        try:
            future = pool.submit(fn, *args, **kwargs)
        except BrokenExecutor:
            # its worker died (its task failed with it, and that hospital dropped out of the
            # round): a fresh worker takes the lane, reloading the data it needs
            with self._lock:
                if self._lanes[lane] is pool:
                    self._lanes[lane] = self._new_lane()
                pool = self._lanes[lane]
            future = pool.submit(fn, *args, **kwargs)
        future.add_done_callback(lambda _: self._done(lane))
        return future

    def _done(self, lane: int) -> None:
        with self._lock:
            self._queued[lane] -= 1


def _balance(sites: Sequence[tuple[str, DatasetSpec]], lanes: int) -> dict[str, int]:
    """Each hospital's lane: largest first onto the lightest lane."""
    load = [0.0] * lanes
    homes: dict[str, int] = {}
    for name, spec in sorted(sites, key=lambda s: -expected_size(s[1])):
        homes[name] = min(range(lanes), key=load.__getitem__)
        load[homes[name]] += expected_size(spec)
    return homes


def _worker_context() -> multiprocessing.context.BaseContext:
    """Workers forked from a fork server that imported their code once (a clean process that
    runs no torch thread pool, so forking it is safe): each worker then starts at once instead
    of importing torch and MONAI again. Spawned workers where there is no fork server."""
    if "forkserver" not in multiprocessing.get_all_start_methods():
        return multiprocessing.get_context("spawn")
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload([__name__])
    return context


def expected_size(spec: DatasetSpec) -> float:
    """A hospital's size before its data are loaded: a benchmark's sample count, else 1."""
    return float(spec.options.get("samples", spec.options.get("patients", 1)))


def start_pool(workers: int, threads: int,
               sites: Sequence[tuple[str, DatasetSpec]] = ()) -> WorkerLanes:
    """The study's worker lanes, started at once, each loading its hospitals' data (`sites`:
    name and dataset) while the study is set up."""
    return WorkerLanes(workers, threads, sites)


def warm_site(dataset_json: str) -> None:
    """Load a hospital's data into its worker's cache before the first round needs them."""
    load_dataset(DatasetSpec.model_validate_json(dataset_json))


def train_site_round(task_json: str, store_url: str) -> str:
    """One hospital, one round: the trainer Job's code path, through the local store."""
    task = TrainingTask.model_validate_json(task_json)
    # The user's own machine and config: a --model package.module:factory may run here.
    return run_training_task(task, open_store(store_url),
                             allow_model_code=True).model_dump_json()


@dataclass(frozen=True)
class SiteScore:
    """A model on one hospital's validation split: the metrics, and for images the logits and
    labels themselves, so the simulator can score the pooled splits exactly (they stay on the
    user's machine; a real hospital sends only its metrics)."""

    metrics: ClinicalMetrics | None
    logits: torch.Tensor | None = None
    labels: torch.Tensor | None = None


def score_validation(store_url: str, namespace: str, study: str, round_no: int,
                     model_json: str, dataset_json: str, train_json: str) -> SiteScore:
    """The global model of `round_no` (from the store) on one hospital's validation split,
    on the CPU like the report's other scores."""
    weights, _ = read_checkpoint(open_store(store_url), StudyLayout(namespace, study), round_no)
    model = build_model(ModelSpec.model_validate_json(model_json), allow_code=True)
    model.load_state_dict(weights)
    return site_score(model, load_dataset(DatasetSpec.model_validate_json(dataset_json))[1],
                      TrainConfig.model_validate_json(train_json))


def site_score(model: torch.nn.Module, data: Samples, cfg: TrainConfig) -> SiteScore:
    """`model` (trained under `cfg`) on one set on the CPU: images keep their logits for
    pooling (each set scored once); volumes pool by their metrics' statistics."""
    if len(data) == 0:
        return SiteScore(None)
    if not isinstance(data, ImageSet):
        return SiteScore(evaluate(model, data, torch.device("cpu"),
                                  roi_size=inference_roi(cfg)))
    logits = image_logits(model, data, torch.device("cpu"))
    return SiteScore(clinical_metrics(logits, data.labels), logits, data.labels)


def train_baseline(name: str, datasets: list[str], cfg_json: str, store_url: str, namespace: str,
                   study: str, rounds: int, test_set: Samples
                   ) -> tuple[str, list[ClinicalMetrics], bytes]:
    """A non-federated comparison: train from the study's initial model on the pooled train
    splits of `datasets`, `rounds` x local_epochs epochs, scoring `test_set` after each
    round's worth of epochs. Returns the curve and the final weights (safetensors bytes, for
    the cross-site evaluation)."""
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
        metrics = evaluate(model, test_set, device, roi_size=inference_roi(cfg))
        assert metrics is not None
        curve.append(metrics)
    return name, curve, save({k: v.detach().cpu().contiguous()
                              for k, v in model.state_dict().items()})

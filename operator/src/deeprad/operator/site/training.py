"""From a SiteTask (what the hub asks) and the agent's config (what the hospital allows) to the
trainer's TrainingTask and the presigned URLs its Job gets; from the trainer's SiteResult back
to the task's status. Pure functions: the agent loop does the I/O."""

from __future__ import annotations

import json
import math

from deeprad.core.errors import ConfigError, PolicyViolation
from deeprad.core.identity import KeyRegistry, PublicIdentity
from deeprad.core.privacy import DPConfig, epsilon_of
from deeprad.core.protocol import (
    VOLUME_KINDS,
    SecAggSpec,
    SiteResult,
    TrainConfig,
    TrainingTask,
)
from deeprad.core.store.endpoint import StoreEndpoint
from deeprad.core.store.presigned import ENDPOINT_ENV, URLS_ENV
from deeprad.operator.api.common import RoundMode
from deeprad.operator.api.sitetask import SiteTaskSpec, TaskResult
from deeprad.operator.decide.round import to_metrics
from deeprad.operator.site.config import AgentConfig

DEFAULT_DELTA = 1e-5  # reported ε when the round names no δ


def training_task(task: SiteTaskSpec, config: AgentConfig) -> TrainingTask:
    """The trainer's task for this site, or ConfigError naming what is wrong."""
    if task.site != config.site:
        raise ConfigError(f"task for site {task.site} reached the agent of {config.site}; "
                          "check the agent's hub kubeconfig (it must be this site's)")
    if config.hub_signing_key and task.hub.signing_key != config.hub_signing_key:
        raise ConfigError(f"the task names hub key {task.hub.signing_key[:12]}…, this site "
                          f"pins {config.hub_signing_key[:12]}… (hubSigningKey); refusing work "
                          "from an unknown hub")
    hub = PublicIdentity(name=task.hub.name, role="hub", signing_key=task.hub.signing_key,
                         key_agreement_key=task.hub.key_agreement_key)
    peers: list[PublicIdentity] = []
    secagg: SecAggSpec | None = None
    sa = task.secure_aggregation
    if sa is not None:
        peers = [PublicIdentity(name=p.name, signing_key=p.signing_key,
                                key_agreement_key=p.key_agreement_key) for p in sa.roster]
        secagg = SecAggSpec(roster=sorted(p.name for p in sa.roster), threshold=sa.threshold,
                            clip=sa.clip, weight_normalizer=sa.weight_normalizer,
                            timeout_s=sa.timeout_seconds)
    dp = task.privacy.differential_privacy
    noise = dp.noise_multiplier if dp is not None else None
    if dp is not None and noise is None:
        raise ConfigError(f"SiteTask for round {task.round_ref.name}: "
                          "privacy.differentialPrivacy.noiseMultiplier is missing; the hub must "
                          "send the calibrated multiplier (upgrade the hub operator)")
    kind_problem = data_kind_problem(task, config)
    if kind_problem is not None:
        raise ConfigError(kind_problem)
    t = task.training
    dataset = config.training.dataset.model_copy(update={
        "image_size": task.data.image_size, "val_fraction": task.data.val_fraction,
        "split_seed": task.data.split_seed})
    return TrainingTask(
        namespace=task.round_ref.namespace, study=task.study, study_uid=task.study_uid,
        round=task.round, site=task.site,
        model=task.model.core(), mode=task.mode.value,
        dataset=dataset,
        train=TrainConfig(local_epochs=t.local_epochs, batch_size=t.batch_size, lr=t.lr,
                          optimizer=t.optimizer.value, momentum=t.momentum,
                          weight_decay=t.weight_decay, fedprox_mu=t.fedprox_mu,
                          patch_size=t.patch_size, patch_foreground=t.patch_foreground,
                          seed=t.seed, precision=t.precision),
        registry_json=KeyRegistry.of([hub, *peers]).to_json(),
        privacy=DPConfig(noise_multiplier=noise, max_grad_norm=dp.max_grad_norm,
                         clipping=dp.clipping) if dp is not None and noise is not None else None,
        secagg=secagg)


def data_kind_problem(task: SiteTaskSpec, config: AgentConfig) -> str | None:
    """Why this site's data cannot serve the task's model (2D slices for a segmentation study,
    volumes for a classification one), with the fix; None when they fit."""
    kind = config.training.dataset.kind
    volumes = kind in VOLUME_KINDS
    wanted = task.model.task.value
    if (wanted == "segmentation") == volumes:
        return None
    holds = "3D volumes" if volumes else "2D images"
    return (f"site {config.site}: study {task.study} trains {wanted} with "
            f"{task.model.name.value}, but training.dataset.kind {kind} holds {holds}; this "
            f"site can join only {'segmentation' if volumes else 'classification'} studies "
            "(declare it in HospitalSite spec.data.kind)")


def presigned_env(task: SiteTaskSpec, config: AgentConfig) -> dict[str, str]:
    """The trainer Job's view of its granted objects (key -> URL as JSON) and of the store
    endpoint the site allows, which the trainer checks again; PolicyViolation when the site
    allows no endpoint or a URL leads anywhere else."""
    if config.store.endpoint is None:
        raise PolicyViolation(
            "this site allows no store endpoint, so no presigned URL is followed: set "
            "store.endpoint in the agent config (the site chart's value store.endpoint) to the "
            "hub's object store, e.g. https://minio.hub.example.org")
    endpoint = StoreEndpoint.parse(config.store.endpoint, "store.endpoint")
    for obj in task.objects:
        try:
            endpoint.check(obj.url)
        except PolicyViolation as exc:
            raise PolicyViolation(f"object {obj.key}: {exc}") from None
    return {URLS_ENV: json.dumps({o.key: o.url for o in task.objects}, sort_keys=True),
            ENDPOINT_ENV: endpoint.text}


def task_result(result: SiteResult, task: SiteTaskSpec) -> TaskResult:
    """The trainer's report as the SiteTask's status.result (ε at the round's δ)."""
    eps: float | None = None
    dp = task.privacy.differential_privacy
    if result.privacy is not None and dp is not None:
        value = epsilon_of([result.privacy], dp.delta or DEFAULT_DELTA)
        eps = value if math.isfinite(value) else None
    evaluated = task.mode == RoundMode.EVALUATE
    return TaskResult(samples=result.num_samples,
                      train_loss=None if evaluated else result.train_loss,
                      update_digest=result.update_sha256 or None,
                      global_metrics=to_metrics(result.global_metrics),
                      local_metrics=to_metrics(result.local_metrics),
                      test_metrics=to_metrics(result.test_metrics),
                      test_split=result.test_split,
                      duration_seconds=max(0.0, result.duration_s), epsilon=eps)

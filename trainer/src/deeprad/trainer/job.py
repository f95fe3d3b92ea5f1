"""The trainer Job: fetch and verify the global model, train on local data (with DP-SGD when the
round asks), then sign, encrypt and upload the update — masked for secure aggregation when the
round uses it.

`run_training_task` is what `python -m deeprad.trainer` runs in a hospital's Job and what each
`deeprad simulate` worker runs: one implementation for both. Signing and encryption are always
on: the update leaves the process only as an envelope sealed to the hub's key, bound to
(namespace, study, round, site), and signed over the envelope's sha256.
"""

from __future__ import annotations

import hashlib
import logging
import time
from typing import Literal

import numpy as np
import torch

from deeprad.core import __version__, distributed_dp
from deeprad.core.checkpoint import read_checkpoint, sha256_bytes, update_bytes, write_update
from deeprad.core.data import load_dataset, load_split
from deeprad.core.envelope import EnvelopeContext, seal
from deeprad.core.errors import ConfigError
from deeprad.core.identity import Identity, KeyRegistry, load_job_identity
from deeprad.core.layout import StudyLayout
from deeprad.core.models import build_model
from deeprad.core.protocol import (
    CheckpointManifest,
    DistributedDPSpec,
    SecAggSpec,
    SecAggUpload,
    SiteResult,
    TrainingTask,
    UpdateManifest,
)
from deeprad.core.secagg import (
    AdvertiseKeys,
    ConsistencySignature,
    EncryptedShare,
    SiteSession,
    SurvivorSet,
)
from deeprad.core.secagg.quantize import (
    Quantizer,
    flatten,
    pack,
)
from deeprad.core.secagg.relay import StoreRelay, round_config
from deeprad.core.signing import new_nonce, sign_statement
from deeprad.core.store import ObjectStore
from deeprad.trainer import site_checks
from deeprad.trainer.audit_record import write_site_record
from deeprad.trainer.local_training import (
    SiteTraining,
    evaluate,
    limit_threads,
    select_device,
    train_site,
)
from deeprad.trainer.segmentation import inference_roi

log = logging.getLogger("deeprad.trainer")


def run_training_task(task: TrainingTask, store: ObjectStore, *,
                      allow_model_code: bool = False) -> SiteResult:
    """Train one site for one round and write its update, manifest and result to the store.
    The Job never allows model code; `deeprad simulate` does, for the user's own factory."""
    # The hospital's policy first (a hospital Job only): nothing is read or built before it.
    checks = site_checks.check_task(task)
    identity = load_job_identity(task.identity_dir, "site")
    if identity.name != task.site:
        raise ConfigError(f"task is for site {task.site} but the mounted identity is "
                          f"{identity.name}'s; mount site {task.site}'s key folder")
    registry = KeyRegistry.from_json(task.registry_json)
    hub = registry.require_hub()
    layout = StudyLayout(task.namespace, task.study, task.study_uid)
    # The hub's signature and the payload digest are checked before any byte is used.
    weights, parent = read_checkpoint(store, layout, task.round - 1, hub=hub)
    if parent.model != task.model:
        raise ConfigError(
            f"site {task.site}, round {task.round}: task model {task.model.name!r} "
            f"({task.model.task}) differs from the checkpoint's {parent.model.name!r} "
            f"({parent.model.task}); the checkpoint decides the architecture and task"
        )
    if task.mode == "evaluate":
        return _evaluate(task, store, layout, weights, allow_model_code=allow_model_code)
    train, val = load_dataset(task.dataset)
    if checks is not None:  # the ε ceiling, with the real record count, before any step
        checks.check_records(task, len(train))
    out = train_site(parent.model, weights, train, val, task.train, dp=task.privacy,
                     allow_model_code=allow_model_code)
    relay = session = None
    if task.secagg is None:
        payload, upload = update_bytes(out.delta, out.num_samples), None
    else:
        relay = StoreRelay(store, layout, task.round, task.secagg.timeout_s, task.secagg.poll_s)
        session, x, upload = _secagg_setup(task, task.secagg, identity, registry, relay, out)
        shares = relay.wait_hub("routed", list[EncryptedShare], task.site)
        payload = pack(session.masked_input(shares, x))
    manifest = _upload(store, layout, task, identity, parent, out, payload, upload)
    write_site_record(store, layout, task, identity, parent, manifest, out.privacy)
    result = SiteResult(
        study=task.study,
        round=task.round,
        site=task.site,
        num_samples=out.num_samples,
        global_metrics=out.global_metrics,
        local_metrics=out.local_metrics,
        train_loss=out.train_loss,
        update_sha256=manifest.payload_sha256,
        duration_s=out.duration_s,
        privacy=out.privacy,
    )
    store.put_text(layout.result(task.round, task.site), result.model_dump_json(indent=2))
    if relay is not None and session is not None:
        _secagg_finish(session, relay, task.site)
    return result


def _evaluate(task: TrainingTask, store: ObjectStore, layout: StudyLayout,
              weights: dict[str, torch.Tensor], *, allow_model_code: bool) -> SiteResult:
    """Evaluate mode: score the verified checkpoint on the site's validation split and on its
    held-out test split (the validation split where the site has none, which the result says),
    and write the result. Nothing is trained or uploaded and no ε is spent: the site's ledger
    gets no run, and the ε checks of a training run do not apply."""
    start = time.perf_counter()
    _, val = load_dataset(task.dataset)
    test = load_split(task.dataset, "test")
    split: Literal["test", "validation"] = "test"
    if test is None or len(test) == 0:
        log.warning("site %s: the data have no test split; the final model is scored on the "
                    "validation split", task.site)
        test, split = val, "validation"
    limit_threads()
    device = select_device(task.train.device)
    model = build_model(task.model, allow_code=allow_model_code)
    model.load_state_dict(weights)
    model.to(device)
    roi = inference_roi(task.train)
    result = SiteResult(
        study=task.study, round=task.round, site=task.site, num_samples=len(test),
        global_metrics=evaluate(model, val, device, roi_size=roi), local_metrics=None,
        train_loss=0.0, update_sha256="", duration_s=time.perf_counter() - start,
        test_metrics=evaluate(model, test, device, roi_size=roi), test_split=split)
    store.put_text(layout.result(task.round, task.site), result.model_dump_json(indent=2))
    return result


def _upload(store: ObjectStore, layout: StudyLayout, task: TrainingTask, identity: Identity,
            parent: CheckpointManifest, out: SiteTraining, payload: bytes,
            secagg: SecAggUpload | None) -> UpdateManifest:
    """Seal `payload` to the hub, sign the envelope's digest, and store both."""
    hub = KeyRegistry.from_json(task.registry_json).require_hub()
    context = EnvelopeContext(task.namespace, task.study, task.round, task.site)
    envelope = seal(hub, context, payload)
    unsigned = UpdateManifest(
        namespace=task.namespace, study=task.study, round=task.round, site=task.site,
        nonce=new_nonce(), parent_sha256=parent.payload_sha256,
        payload_sha256=sha256_bytes(envelope), num_samples=out.num_samples,
        producer=f"deeprad-trainer/{__version__}", secagg=secagg,
    )
    signature = sign_statement(identity, unsigned.statement())
    manifest = unsigned.model_copy(update={"signature": signature})
    write_update(store, layout, manifest, envelope)
    return manifest


def _secagg_setup(task: TrainingTask, spec: SecAggSpec, identity: Identity,
                  registry: KeyRegistry, relay: StoreRelay, out: SiteTraining
                  ) -> tuple[SiteSession, np.ndarray, SecAggUpload]:
    """Quantize (n/N)·delta and n/N — or, with distributed DP, the clipped delta with this
    site's noise share — then advertise keys and share them (steps 0 and 1)."""
    vector, _ = flatten(out.delta)
    config = round_config(task.namespace, task.study, task.round, spec, vector.size)
    x = _quantize(task, spec, out, vector) if spec.distributed_dp is None \
        else _distributed_dp_share(task, spec.distributed_dp, vector, config.digest)
    session = SiteSession(config, identity, registry)
    relay.post("advertise", session.advertise_keys(), task.site)
    advertised = relay.wait_hub("advertised", list[AdvertiseKeys])
    relay.post("shares", session.share_keys(advertised), task.site)
    upload = SecAggUpload(vector_length=config.vector_length, clip=spec.clip,
                          max_sites=len(spec.roster))
    return session, x, upload


def _distributed_dp_share(task: TrainingTask, ddp: DistributedDPSpec, vector: np.ndarray,
                          rotation_seed: bytes) -> np.ndarray:
    """The delta clipped to L2 `ddp.l2_clip`, rotated, rounded and noised with this site's
    share (fresh CSPRNG noise: the task's seed comes from the hub, who must not know it),
    once the spec the hub sent is checked to deliver the ε it claims."""
    distributed_dp.check_share(ddp, vector.size, task.round)
    norm = float(np.linalg.norm(vector))
    if norm > ddp.l2_clip:
        log.info("site %s: update L2 norm %.4g clipped to the distributed-DP bound %g",
                 task.site, norm, ddp.l2_clip)
    return distributed_dp.encode(vector, ddp, rotation_seed)


def _quantize(task: TrainingTask, spec: SecAggSpec, out: SiteTraining, vector: np.ndarray
              ) -> np.ndarray:
    """(n/N)·delta and n/N in the ring: the hub learns the weighted sum and total weight."""
    weight = out.num_samples / spec.weight_normalizer
    if weight > 1:
        raise ConfigError(f"secure aggregation: site {task.site} has {out.num_samples} samples, "
                          f"more than the round's weight_normalizer {spec.weight_normalizer:g} "
                          "(the roster's declared total); fix the declared sample counts")
    weighted = np.append(vector.astype(np.float64) * weight, weight)
    quantizer = Quantizer(spec.clip, max_sites=len(spec.roster))
    clipped = int(np.count_nonzero(np.abs(weighted) > spec.clip))
    if clipped:
        log.warning("site %s: %d of %d weighted update values exceed the secure-aggregation "
                    "clip %g and were clipped", task.site, clipped, weighted.size, spec.clip)
    # Stochastic rounding needs unbiased randomness, not secrecy (the masks come from the
    # cryptographic PRG): drawn from the task's seed, a seeded study is reproducible.
    site_key = int.from_bytes(hashlib.sha256(task.site.encode()).digest()[:8], "big")
    return quantizer.encode(weighted,
                            np.random.default_rng([task.train.seed, task.round, site_key]))


def _secagg_finish(session: SiteSession, relay: StoreRelay, site: str) -> None:
    """Steps 3 and 4: check the hub's survivor set, then reveal the unmasking shares."""
    survivors = relay.wait_hub("survivors", SurvivorSet)
    relay.post("consistency", session.consistency_signature(survivors), site)
    confirmed = relay.wait_hub("confirmed", list[ConsistencySignature])
    relay.post("unmask", session.unmask(confirmed), site)




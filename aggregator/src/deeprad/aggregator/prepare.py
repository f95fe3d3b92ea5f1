"""The prepare Job: write the checkpoint a round starts from, signed by the hub.

`python -m deeprad.aggregator.prepare` runs it in the hub before a round's sites are scheduled
when the round's input (round n-1 of the study's store) does not exist yet: for a study's first
round it initialises the model from the study's seed; for a round that names an input
checkpoint elsewhere in the store it verifies that checkpoint's hub signature and digest, then
writes it into this study's store re-signed for this study and round, with the source's digest
as its parent. Running it again changes nothing once the checkpoint exists.
"""

from __future__ import annotations

import logging
import sys

import torch

from deeprad.core import __version__
from deeprad.core.checkpoint import read_checkpoint, write_checkpoint
from deeprad.core.errors import CheckpointError, ConfigError
from deeprad.core.identity import KeyRegistry, load_job_identity
from deeprad.core.jobargs import job_main
from deeprad.core.layout import StudyLayout
from deeprad.core.manifests import read_manifest, verify_checkpoint_manifest
from deeprad.core.models import build_model, model_weights
from deeprad.core.privacy_ledger import inherit
from deeprad.core.protocol import CheckpointManifest, PrepareTask
from deeprad.core.store import ObjectStore

log = logging.getLogger("deeprad.prepare")


def run_prepare_task(task: PrepareTask, store: ObjectStore) -> CheckpointManifest:
    """Write (or find) round `task.round`'s global checkpoint; returns its manifest."""
    hub_identity = load_job_identity(task.identity_dir, "hub")
    hub = KeyRegistry.from_json(task.registry_json).require_hub()
    if hub.signing_key != hub_identity.public().signing_key:
        raise ConfigError("the mounted hub identity does not match the hub key in the task's "
                          "registry; mount the hub's key Secret that the operator was given")
    layout = StudyLayout(task.namespace, task.study, task.study_uid)
    # a model imported from another study carries the ε its training spent: that study's
    # privacy ledger is copied into this one's (the aggregator Jobs index the study's own
    # records: they hold the sites' keys to verify them, this Job only the hub's)
    if task.source is not None:
        inherit(store, task.namespace, task.study, task.source.namespace, task.source.study,
                hub_identity)
    if store.exists(layout.global_manifest(task.round)):
        existing = read_manifest(store, layout, task.round)
        verify_checkpoint_manifest(existing, hub, layout, task.round)
        log.info("round %d's checkpoint already exists (%s); nothing to do", task.round,
                 existing.payload_sha256[:12])
        return existing
    parent: str | None = None
    if task.source is None:
        torch.manual_seed(task.seed)
        weights = model_weights(build_model(task.model))
        log.info("initialised %s with seed %d", task.model.name, task.seed)
    else:
        src = task.source
        weights, manifest = read_checkpoint(store, StudyLayout(src.namespace, src.study, src.uid),
                                            src.round, hub=hub)
        if src.sha256 is not None and manifest.payload_sha256 != src.sha256:
            raise CheckpointError(
                f"input checkpoint {src.namespace}/{src.study} round {src.round}: sha256 "
                f"{manifest.payload_sha256[:16]}… differs from the round's "
                f"spec.inputCheckpoint.digest {src.sha256[:16]}…; fix the digest or the URI")
        if manifest.model != task.model:
            raise ConfigError(f"input checkpoint {src.namespace}/{src.study} round {src.round} "
                              f"holds a {manifest.model.name!r} model, the round trains "
                              f"{task.model.name!r}; use a checkpoint of the same model")
        parent = manifest.payload_sha256
        log.info("imported %s/%s round %d (%s)", src.namespace, src.study, src.round,
                 parent[:12])
    return write_checkpoint(store, layout, {
        "study": task.study, "round": task.round, "model": task.model,
        "producer": f"deeprad-prepare/{__version__}", "parent_sha256": parent},
        weights, hub=hub_identity)


if __name__ == "__main__":
    sys.exit(job_main("deeprad.aggregator.prepare", "Write the checkpoint a round starts from.",
                      PrepareTask, run_prepare_task))

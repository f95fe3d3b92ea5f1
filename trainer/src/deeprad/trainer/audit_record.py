"""The site's signed audit record of one training task (`deeprad.core.audit.SiteTaskRecord`).

Written after the update is stored, so it names the exact envelope the hub will aggregate.
The trainer image and the site policy come from the environment the site agent gives the Job
(absent in `deeprad simulate` and other local runs, and then recorded as absent): the hospital
configures both, so the record shows what the hospital's own configuration allowed to run.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

from deeprad.core.audit import SiteTaskRecord, StudyRef
from deeprad.core.identity import Identity
from deeprad.core.layout import StudyLayout
from deeprad.core.model_catalogue import model_digest
from deeprad.core.privacy import DPSteps
from deeprad.core.protocol import CheckpointManifest, TrainingTask, UpdateManifest
from deeprad.core.store import ObjectStore
from deeprad.trainer.site_checks import policy_from_env, trainer_image_from_env


def site_record(layout: StudyLayout, task: TrainingTask, identity: Identity,
                parent: CheckpointManifest, update: UpdateManifest, privacy: DPSteps | None,
                environ: Mapping[str, str] | None = None) -> SiteTaskRecord:
    """The signed record of `task`, which trained from `parent` and stored `update`."""
    env = os.environ if environ is None else environ
    policy = policy_from_env(env)
    record = SiteTaskRecord(
        study=StudyRef.of(layout),
        round=task.round, site=task.site, model=parent.model.name,
        model_digest=model_digest(parent.model.name, parent.model.kwargs),
        trainer_image=trainer_image_from_env(env),
        policy_digest=None if policy is None else policy[1],
        privacy=privacy, num_samples=update.num_samples,
        max_grad_norm=task.privacy.max_grad_norm if privacy is not None and task.privacy
        else None,
        parent_sha256=update.parent_sha256, update_sha256=update.payload_sha256)
    return record.signed(identity)


def write_site_record(store: ObjectStore, layout: StudyLayout, task: TrainingTask,
                      identity: Identity, parent: CheckpointManifest, update: UpdateManifest,
                      privacy: DPSteps | None) -> SiteTaskRecord:
    """Sign the task's record and store it where the hub granted it."""
    record = site_record(layout, task, identity, parent, update, privacy)
    store.put_bytes(layout.site_audit(task.round, task.site), record.to_bytes())
    return record

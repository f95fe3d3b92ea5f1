"""The trainer Job: fetch and verify the global model, train on local data, upload the update.

`run_training_task` is what `python -m deeprad.trainer` runs in a hospital's Job and what each
`deeprad simulate` worker runs: one implementation for both.
"""

from __future__ import annotations

import secrets

from deeprad import __version__
from deeprad.core.checkpoint import read_checkpoint, sha256_bytes, to_bytes, write_update
from deeprad.core.data import load_dataset
from deeprad.core.errors import ConfigError
from deeprad.core.layout import StudyLayout
from deeprad.core.protocol import SiteResult, TrainingTask, UpdateManifest
from deeprad.core.store import ObjectStore
from deeprad.trainer.local_training import train_site


def run_training_task(task: TrainingTask, store: ObjectStore) -> SiteResult:
    """Train one site for one round and write its update, manifest and result to the store."""
    layout = StudyLayout(task.namespace, task.study)
    weights, parent = read_checkpoint(store, layout, task.round - 1)
    if parent.model != task.model:
        raise ConfigError(
            f"site {task.site}, round {task.round}: task model {task.model.name!r} differs from "
            f"the checkpoint's {parent.model.name!r}; the checkpoint decides the architecture"
        )
    train, val = load_dataset(task.dataset)
    out = train_site(parent.model, weights, train, val, task.train)
    payload = to_bytes(out.delta)
    manifest = UpdateManifest(
        study=task.study,
        round=task.round,
        site=task.site,
        nonce=secrets.token_hex(16),
        parent_sha256=parent.payload_sha256,
        payload_sha256=sha256_bytes(payload),
        num_samples=out.num_samples,
        producer=f"deeprad-trainer/{__version__}",
    )
    write_update(store, layout, manifest, payload)
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
    )
    store.put_text(layout.result(task.round, task.site), result.model_dump_json(indent=2))
    return result

"""Checkpoint manifests without tensors: read one from the store, check the hub's signature.

Kept apart from `deeprad.core.checkpoint` (which needs torch) so the operator, which only reads
manifests, starts without loading torch.
"""

from __future__ import annotations

from deeprad.core.errors import CheckpointError, ObjectNotFound
from deeprad.core.identity import PublicIdentity
from deeprad.core.layout import StudyLayout
from deeprad.core.protocol import CheckpointManifest
from deeprad.core.signing import verify_checkpoint
from deeprad.core.store import ObjectStore


def read_manifest(store: ObjectStore, layout: StudyLayout, round_no: int) -> CheckpointManifest:
    key = layout.global_manifest(round_no)
    try:
        return CheckpointManifest.model_validate_json(store.get_bytes(key))
    except ObjectNotFound:
        raise CheckpointError(
            f"checkpoint of round {round_no} missing: no {store.url}/{key}") from None
    except ValueError as exc:
        raise CheckpointError(f"checkpoint manifest {store.url}/{key} is corrupt: {exc}") from exc


def verify_checkpoint_manifest(manifest: CheckpointManifest, hub: PublicIdentity,
                               layout: StudyLayout, round_no: int) -> None:
    """Raise CheckpointError unless `hub` signed `manifest` for this study and round."""
    verify_checkpoint(manifest.statement(hub.name), manifest.signature, hub,
                      namespace=layout.namespace, study=layout.study, round_no=round_no,
                      payload_sha256=manifest.payload_sha256)

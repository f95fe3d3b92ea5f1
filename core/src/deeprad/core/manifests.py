"""Checkpoint manifests without tensors: read one from the store, check the hub's signature.

Kept apart from `deeprad.core.checkpoint` (which needs torch) so the operator, which only reads
manifests, starts without loading torch.
"""

from __future__ import annotations

from deeprad.core.errors import CheckpointError, ObjectNotFound
from deeprad.core.identity import PublicIdentity
from deeprad.core.layout import StudyLayout
from deeprad.core.protocol import CheckpointManifest
from deeprad.core.signing import Statement, verify_checkpoint
from deeprad.core.store import ObjectStore


def checkpoint_statement(manifest: CheckpointManifest, signer: str) -> Statement:
    """The statement the hub signs for a checkpoint manifest."""
    if manifest.namespace is None or manifest.nonce is None:
        raise CheckpointError(f"checkpoint {manifest.study} round {manifest.round}: manifest has "
                              "no namespace or nonce, so it cannot carry the hub's signature")
    try:
        return Statement(kind="checkpoint", namespace=manifest.namespace, study=manifest.study,
                         round=manifest.round, site=signer, nonce=manifest.nonce,
                         parent_sha256=manifest.parent_sha256,
                         payload_sha256=manifest.payload_sha256)
    except ValueError as exc:
        raise CheckpointError(f"checkpoint {manifest.study} round {manifest.round}: manifest "
                              f"fields cannot form a signed statement: {exc}") from None


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
    statement = checkpoint_statement(manifest, hub.name)
    verify_checkpoint(statement, manifest.signature, hub, namespace=layout.namespace,
                      study=layout.study, round_no=round_no,
                      payload_sha256=manifest.payload_sha256)

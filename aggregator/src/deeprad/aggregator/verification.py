"""Trust in one site's update: its manifest, signature, nonce and envelope.

An update is accepted only if the registered site signed (namespace, study, round, site, nonce,
parent digest, sha256 of the stored envelope), the nonce was never accepted before in the
study (see replay_ledger.py), and the envelope opens with the hub's key under AES-GCM bound to
(namespace, study, round, site). The decrypted plaintext is not hashed again: the signature
covers the envelope and AES-GCM authenticates every chunk of it, so the plaintext is exactly
what the site sealed. Whoever decrypts also checks that the sample count inside the signed
payload equals the manifest's.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

from pydantic import ValidationError

from deeprad.core.checkpoint import sha256_file
from deeprad.core.envelope import EnvelopeContext
from deeprad.core.errors import ObjectNotFound, UpdateRejected
from deeprad.core.identity import Identity, KeyRegistry
from deeprad.core.layout import StudyLayout
from deeprad.core.protocol import AggregationTask, CheckpointManifest, UpdateManifest
from deeprad.core.signing import ReplayGuard, parse_statement, verify_update
from deeprad.core.store import ObjectStore


def read_update_manifest(store: ObjectStore, layout: StudyLayout, round_no: int,
                         site: str) -> UpdateManifest:
    """A site's update manifest, or UpdateRejected when it is missing or malformed."""
    key = layout.update_manifest(round_no, site)
    try:
        manifest = UpdateManifest.model_validate_json(store.get_bytes(key))
    except ObjectNotFound:
        raise UpdateRejected(site, f"manifest {key} is missing") from None
    except ValidationError as exc:
        raise UpdateRejected(site, f"manifest {key} is malformed: "
                                   f"{exc.errors()[0]['msg']} at {exc.errors()[0]['loc']}"
                             ) from None
    if manifest.num_samples < 1:
        raise UpdateRejected(site, f"num_samples must be >= 1, got {manifest.num_samples}")
    return manifest


class UpdateVerifier:
    """Checks signatures, nonces and envelopes of one round's updates."""

    def __init__(self, store: ObjectStore, layout: StudyLayout, task: AggregationTask,
                 parent: CheckpointManifest, hub: Identity, registry: KeyRegistry,
                 replay: ReplayGuard) -> None:
        self.store, self.layout, self.task, self.parent = store, layout, task, parent
        self.hub, self.registry, self.replay = hub, registry, replay

    @contextlib.contextmanager
    def envelope(self, site: str) -> Iterator[tuple[UpdateManifest, Path]]:
        """The verified manifest and a local copy of the envelope, or UpdateRejected."""
        manifest = read_update_manifest(self.store, self.layout, self.task.round, site)
        statement = parse_statement(site, manifest.statement_fields())
        key = self.layout.update_payload(self.task.round, site)
        with contextlib.ExitStack() as stack:
            try:
                path = stack.enter_context(self.store.local_copy(key))
            except ObjectNotFound:
                raise UpdateRejected(site, f"payload {key} is missing") from None
            assert self.parent.payload_sha256 is not None
            verify_update(statement, manifest.signature, self.registry, site=site,
                          namespace=self.task.namespace, study=self.task.study,
                          round_no=self.task.round, parent_sha256=self.parent.payload_sha256,
                          payload_sha256=sha256_file(path), replay=self.replay)
            yield manifest, path

    def context(self, site: str) -> EnvelopeContext:
        """What the site's envelope is bound to: (namespace, study, round, site)."""
        return EnvelopeContext(self.task.namespace, self.task.study, self.task.round, site)

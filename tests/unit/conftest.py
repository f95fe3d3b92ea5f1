"""A study with real identities, for tests that need signed checkpoints and updates."""

from __future__ import annotations

import base64
from pathlib import Path
from typing import Any

import pytest
import torch

from deeprad.core.checkpoint import (
    read_checkpoint,
    sha256_bytes,
    update_bytes,
    write_checkpoint,
    write_update,
)
from deeprad.core.envelope import EnvelopeContext, seal
from deeprad.core.identity import Identity
from deeprad.core.layout import StudyLayout
from deeprad.core.protocol import AggregationTask, ModelSpec, UpdateManifest
from deeprad.core.signing import Statement, new_nonce
from deeprad.core.store.local import LocalStore
from deeprad.simulate.keys import make_study_keys

REGISTERED = ["a", "b", "c", "bad", "good", "intruder", "late", "st-marys"]


class SignedStudy:
    """Study `ns/study` in a local store, with a hub and registered sites."""

    def __init__(self, root: Path) -> None:
        self.store = LocalStore(root / "store")
        self.layout = StudyLayout("ns", "study")
        self.keys = make_study_keys(root / "keys", REGISTERED)
        self.hub = Identity.load(self.keys.hub_dir)
        self.sites = {s: Identity.load(d) for s, d in self.keys.site_dirs.items()}

    def write_global(self, weights: dict[str, torch.Tensor], round_no: int = 0,
                     **fields: Any) -> None:
        write_checkpoint(self.store, self.layout,
                         {"study": "study", "round": round_no, "producer": "test",
                          "model": ModelSpec(), "parent_sha256": None, **fields},
                         weights, hub=self.hub)

    def task(self, **kw: Any) -> AggregationTask:
        return AggregationTask.model_validate({
            "namespace": "ns", "study": "study", "round": 1,
            "registry_json": self.keys.registry.to_json(),
            "identity_dir": str(self.keys.hub_dir), **kw})

    def put_update(self, site: str, delta: dict[str, torch.Tensor], n: int = 10,
                   round_no: int = 1, payload: bytes | None = None,
                   signer: Identity | None = None, sign: bool = True,
                   seal_as: EnvelopeContext | None = None, envelope: bytes | None = None,
                   statement: dict[str, Any] | None = None, slot: str | None = None,
                   **manifest: Any) -> UpdateManifest:
        """Seal, sign and store an update the way the trainer does; keyword arguments alter
        one piece to play an attacker."""
        _, parent = read_checkpoint(self.store, self.layout, round_no - 1)
        payload = update_bytes(delta, n) if payload is None else payload
        context = seal_as or EnvelopeContext("ns", "study", round_no, site)
        envelope = seal(self.hub.public(), context, payload) if envelope is None else envelope
        fields: dict[str, Any] = {
            "kind": "update", "namespace": "ns", "study": "study", "round": round_no,
            "site": site, "nonce": new_nonce(), "parent_sha256": parent.payload_sha256,
            "payload_sha256": sha256_bytes(envelope), **(statement or {})}
        stmt = Statement.model_validate(fields)
        who = signer or self.sites[site]
        # signed directly (not via sign_statement, which refuses a mismatched signer)
        signature = base64.b64encode(who.sign(stmt.to_bytes())).decode() if sign else None
        m = UpdateManifest.model_validate({
            **{k: v for k, v in fields.items() if k != "kind"}, "signature": signature,
            "num_samples": n, "producer": "test", **manifest})
        if slot is None:
            write_update(self.store, self.layout, m, envelope)
        else:  # another site's slot in the store
            self.store.put_bytes(self.layout.update_payload(round_no, slot), envelope)
            self.store.put_text(self.layout.update_manifest(round_no, slot),
                                m.model_dump_json())
        return m


@pytest.fixture
def study(tmp_path: Path) -> SignedStudy:
    return SignedStudy(tmp_path)

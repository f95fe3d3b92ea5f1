"""A checkpoint as a pair of files (`<stem>.safetensors` + manifest `<stem>.json`), verified
against the manifest's sha256 and the hub's signature over the manifest (`inference.hub_key`)
before a single tensor is read.

`deeprad simulate` leaves `final.safetensors` + `final.json`; the store holds
`rounds/<n>/global.safetensors` + `global.json`. Either file of a pair names the checkpoint.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from pydantic import ValidationError
from safetensors.torch import load as st_load
from torch import nn

from deeprad.core.checkpoint import sha256_bytes
from deeprad.core.errors import CheckpointError, ConfigError
from deeprad.core.models import build_model
from deeprad.core.protocol import CheckpointManifest
from deeprad.inference.hub_key import HubTrust, PinnedHub, hub_trust, verify_hub_signature

CHECKPOINT_SUFFIXES = (".json", ".safetensors")


@dataclass(frozen=True)
class CheckpointFile:
    """A verified checkpoint: its weights in memory, the manifest that vouched for them and
    the hub whose signature over it was checked (None: --insecure-skip-signature)."""

    weights_path: Path
    manifest_path: Path
    manifest: CheckpointManifest
    weights: dict[str, torch.Tensor]
    signed_by: PinnedHub | None = None


def checkpoint_paths(path: Path) -> tuple[Path, Path]:
    """(payload, manifest) for a checkpoint named by either of its two files."""
    if path.suffix == ".json":
        return path.with_suffix(".safetensors"), path
    if path.suffix == ".safetensors":
        return path, path.with_suffix(".json")
    raise ConfigError(f"{path}: a checkpoint is a manifest (.json, e.g. global.json) or its "
                      "payload (.safetensors, with <stem>.json beside it)")


def load_checkpoint_file(path: Path, trust: HubTrust | None = None) -> CheckpointFile:
    """Read and verify a checkpoint: the payload's sha256 must equal the manifest's
    `payload_sha256` and the hub of `trust` (default: `hub_trust(path)`) must have signed the
    manifest, otherwise it is refused."""
    weights_path, manifest_path = checkpoint_paths(path)
    for p, what in ((manifest_path, "manifest"), (weights_path, "payload")):
        if not p.is_file():
            raise CheckpointError(f"checkpoint {what} {p} does not exist; a checkpoint needs "
                                  f"both {weights_path.name} and {manifest_path.name}")
    try:
        manifest = CheckpointManifest.model_validate_json(manifest_path.read_bytes())
    except ValidationError as exc:
        raise CheckpointError(f"{manifest_path}: not a Deep-Rad checkpoint manifest: "
                              f"{exc.errors()[0]['loc']}: {exc.errors()[0]['msg']}") from exc
    # Hash and parse the same bytes: the file cannot change between the check and the use.
    data = weights_path.read_bytes()
    actual = sha256_bytes(data)
    if actual != manifest.payload_sha256:
        raise CheckpointError(
            f"{weights_path}: sha256 {actual[:16]}… does not match payload_sha256 "
            f"{manifest.payload_sha256[:16]}… in {manifest_path}; the checkpoint was altered or "
            "is corrupt — refusing to use it; fetch it again from the study's store")
    trust = trust if trust is not None else hub_trust(path)
    verify_hub_signature(manifest, manifest_path, trust)
    try:
        weights = st_load(data)
    except Exception as exc:
        raise CheckpointError(f"{weights_path}: not a readable safetensors file: {exc}") from exc
    return CheckpointFile(weights_path, manifest_path, manifest, weights,
                          trust if isinstance(trust, PinnedHub) else None)


def load_checkpoint_model(path: Path, trust: HubTrust | None = None
                          ) -> tuple[nn.Module, CheckpointFile]:
    """The verified checkpoint's network (from the manifest's model spec), in eval mode on CPU;
    `trust` as in `load_checkpoint_file`."""
    ckpt = load_checkpoint_file(path, trust)
    model = build_model(ckpt.manifest.model)
    try:
        model.load_state_dict(ckpt.weights)
    except RuntimeError as exc:
        raise CheckpointError(
            f"{ckpt.weights_path}: weights do not fit model {ckpt.manifest.model.name!r} named "
            f"in {ckpt.manifest_path}: {str(exc).splitlines()[0]}") from exc
    return model.eval(), ckpt

"""The plain path: each admitted site's update is verified, decrypted (streaming, to a private
temporary file), checked against the global model and folded into the round's strategy."""

from __future__ import annotations

import contextlib
import logging
import tempfile
from collections.abc import Mapping
from pathlib import Path

import torch

from deeprad.aggregator.strategies import Strategy
from deeprad.aggregator.verification import UpdateVerifier
from deeprad.core.checkpoint import NUM_SAMPLES_KEY, TensorFile, UpdateReader, validate_update
from deeprad.core.envelope import open_file
from deeprad.core.errors import DeepRadError, UpdateRejected
from deeprad.core.protocol import Contribution, Rejection

log = logging.getLogger("deeprad.aggregator")

Reference = dict[str, tuple[str, tuple[int, ...]]]  # tensor name -> (dtype, shape)


def aggregate_plain(verifier: UpdateVerifier, sites: list[str], strategy: Strategy,
                    reference: Reference, keep: contextlib.ExitStack
                    ) -> tuple[list[Contribution], list[Rejection]]:
    """Fold every valid update of `sites` into `strategy`; bad ones are rejected and the round
    goes on. A strategy that does not stream reads the updates again in `finish`, so theirs
    stay open (and on disk) until `keep` closes."""
    reader = UpdateReader() if strategy.streaming else None
    workdir = Path(keep.enter_context(tempfile.TemporaryDirectory(prefix="deeprad-aggregate-")))
    contributions: list[Contribution] = []
    rejections: list[Rejection] = []
    for site in sites:
        try:
            contributions.append(_take(verifier, site, strategy, reader, reference, workdir,
                                       keep))
        except UpdateRejected as exc:
            log.warning("round %s: %s", verifier.task.round, exc)
            rejections.append(Rejection(site=site, reason=exc.reason))
    return contributions, rejections


def _take(verifier: UpdateVerifier, site: str, strategy: Strategy, reader: UpdateReader | None,
          reference: Reference, workdir: Path, keep: contextlib.ExitStack) -> Contribution:
    """Verify, decrypt and fold in one update."""
    with contextlib.ExitStack() as one:
        manifest, envelope = one.enter_context(verifier.envelope(site))
        plain = workdir / f"{site}.safetensors"
        open_file(verifier.hub, verifier.context(site), envelope, plain)
        one.callback(plain.unlink, missing_ok=True)
        update: Mapping[str, torch.Tensor]
        if reader is not None:
            update = one.enter_context(reader.open(site, plain, None))
            metadata = update.metadata  # type: ignore[attr-defined]
        else:
            try:
                update = TensorFile(plain)
            except DeepRadError as exc:
                raise UpdateRejected(site, str(exc)) from exc
            metadata = update.metadata
        if metadata.get(NUM_SAMPLES_KEY) != str(manifest.num_samples):
            raise UpdateRejected(site, f"manifest says num_samples {manifest.num_samples}, the "
                                       f"signed payload {metadata.get(NUM_SAMPLES_KEY)}")
        validate_update(site, update, reference)
        strategy.add(update, manifest.num_samples)
        if not strategy.streaming:  # it reads the update again in finish(): keep it open
            keep.enter_context(one.pop_all())
    return Contribution(site=site, update_sha256=manifest.payload_sha256,
                        num_samples=manifest.num_samples)

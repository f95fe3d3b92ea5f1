"""The one checkpoint format: safetensors payloads with JSON manifests, digests checked on read.

Global models, server-optimizer state and site updates are all safetensors; nothing is pickled.
Global checkpoints are signed by the hub (`write_checkpoint(..., hub=)`) and verified against
its public key by every reader that trains or aggregates from them (`open_checkpoint(...,
hub=)`). The strategy state's digest and the model's digest (network and arguments) are written
into the signed weights file's metadata, so the signature covers them too.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save
from safetensors.torch import save_file as st_save_file

from deeprad.core.errors import CheckpointError, ObjectNotFound, UpdateRejected
from deeprad.core.identity import Identity, PublicIdentity
from deeprad.core.layout import StudyLayout
from deeprad.core.manifests import (
    read_manifest,
    verify_checkpoint_manifest,
)
from deeprad.core.model_catalogue import model_digest
from deeprad.core.protocol import CheckpointManifest, ModelSpec, UpdateManifest
from deeprad.core.signing import new_nonce, sign_statement
from deeprad.core.store import ObjectStore

Tensors = Mapping[str, torch.Tensor]


NUM_SAMPLES_KEY = "num_samples"
STATE_DIGEST_KEY = "strategy_state_sha256"
# The model the weights are for (`model_catalogue.model_digest` of the manifest's model), inside
# the signed payload: the hub's signature covers which network and arguments they belong to.
MODEL_DIGEST_KEY = "model_sha256"
# The uid of the object that owns the study (the layout's), inside the signed payload: a study
# re-created under an old name gets checkpoints with other digests, so no update signed for its
# predecessor (whose parent digest names the predecessor's checkpoint) is ever fresh in it.
STUDY_UID_KEY = "study_uid"


def to_bytes(tensors: Tensors, metadata: dict[str, str] | None = None) -> bytes:
    """Serialise tensors as safetensors (deterministic: keys sorted, optional metadata)."""
    return st_save({k: v.detach().to("cpu").contiguous() for k, v in tensors.items()},
                   metadata=metadata)


def update_bytes(delta: Tensors, num_samples: int) -> bytes:
    """A site's update payload: the delta, with its sample count in the safetensors metadata so
    the signed, encrypted payload (not only the manifest) vouches for the FedAvg weight."""
    return to_bytes(delta, {NUM_SAMPLES_KEY: str(int(num_samples))})


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(8 * 1024 * 1024):
            h.update(chunk)
    return h.hexdigest()


class TensorFile(Mapping[str, torch.Tensor]):
    """A safetensors file read one tensor at a time, so a whole model is never held twice."""

    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            with safe_open(str(path), framework="pt") as f:
                self.metadata: dict[str, str] = dict(f.metadata() or {})
                self._keys = sorted(f.keys())
                self._meta = {k: (f.get_slice(k).get_dtype(), tuple(f.get_slice(k).get_shape()))
                              for k in self._keys}
        except Exception as exc:
            raise CheckpointError(f"{path}: not a readable safetensors file: {exc}") from exc

    def __getitem__(self, key: str) -> torch.Tensor:
        with safe_open(str(self.path), framework="pt") as f:
            return f.get_tensor(key)

    def __iter__(self) -> Iterator[str]:
        return iter(self._keys)

    def __len__(self) -> int:
        return len(self._keys)

    def signature(self) -> dict[str, tuple[str, tuple[int, ...]]]:
        """name -> (safetensors dtype name, shape), read from the header alone."""
        return dict(self._meta)

    def load_all(self) -> dict[str, torch.Tensor]:
        with safe_open(str(self.path), framework="pt") as f:
            return {k: f.get_tensor(k) for k in self._keys}


_DTYPE_NAMES = {torch.float32: "F32", torch.float64: "F64", torch.float16: "F16",
                torch.bfloat16: "BF16", torch.int64: "I64", torch.int32: "I32",
                torch.uint8: "U8", torch.bool: "BOOL"}


def signature(tensors: Tensors) -> dict[str, tuple[str, tuple[int, ...]]]:
    """name -> (safetensors dtype name, shape) of in-memory tensors."""
    return {k: (_DTYPE_NAMES.get(v.dtype, str(v.dtype)), tuple(v.shape))
            for k, v in tensors.items()}


# ---- global checkpoints -------------------------------------------------------------------


def write_checkpoint(
    store: ObjectStore,
    layout: StudyLayout,
    manifest_fields: dict[str, object],
    weights: Tensors,
    strategy_state: Tensors | None = None,
    hub: Identity | None = None,
) -> CheckpointManifest:
    """Write round `manifest_fields['round']`'s global model, signed by `hub` when given (the
    Jobs always give it); the manifest goes last, so a reader that finds the manifest finds the
    payload it describes. Payloads go through a temporary file, so a large model is never held
    twice in memory (and S3 uploads stream)."""
    round_no = int(manifest_fields["round"])  # type: ignore[call-overload]
    state_sha = None
    if strategy_state:
        state_sha = _put_tensors(store, layout.strategy_state(round_no), strategy_state)
    model = ModelSpec.model_validate(manifest_fields["model"])
    metadata = {MODEL_DIGEST_KEY: model_digest(model.name, model.kwargs)}
    if state_sha:
        metadata[STATE_DIGEST_KEY] = state_sha
    if layout.uid:
        metadata[STUDY_UID_KEY] = layout.uid
    payload_sha = _put_tensors(store, layout.global_weights(round_no), weights, metadata)
    manifest = CheckpointManifest.model_validate(
        {"namespace": layout.namespace, "nonce": new_nonce(), **manifest_fields,
         "payload_sha256": payload_sha, "strategy_state_sha256": state_sha}
    )
    if hub is not None:
        signature = sign_statement(hub, manifest.statement(hub.name))
        manifest = manifest.model_copy(update={"signature": signature})
    store.put_text(layout.global_manifest(round_no), manifest.model_dump_json(indent=2))
    return manifest


def _put_tensors(store: ObjectStore, key: str, tensors: Tensors,
                 metadata: dict[str, str] | None = None) -> str:
    """Serialise `tensors` to a temporary file, upload it, return its sha256."""
    fd, tmp = tempfile.mkstemp(prefix="deeprad-", suffix=".safetensors")
    os.close(fd)
    try:
        st_save_file({k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}, tmp,
                     metadata=metadata)
        digest = sha256_file(Path(tmp))
        store.put_file(key, Path(tmp))
        return digest
    finally:
        os.unlink(tmp)


def _check_digest(where: str, actual: str, expected: str | None) -> None:
    if actual != expected:
        raise CheckpointError(
            f"{where}: sha256 {actual[:16]}… does not match the manifest's "
            f"{(expected or 'none')[:16]}…; the object was altered or is corrupt — re-create it"
        )


@contextlib.contextmanager
def open_checkpoint(
    store: ObjectStore, layout: StudyLayout, round_no: int, hub: PublicIdentity | None = None
) -> Iterator[tuple[TensorFile, CheckpointManifest]]:
    """Round `round_no`'s global weights as a lazy TensorFile, refused unless they match the
    manifest's digest and, when `hub` is given, unless the hub signed the manifest (and the
    strategy-state digest inside the signed payload matches the manifest's)."""
    manifest = read_manifest(store, layout, round_no)
    if hub is not None:
        verify_checkpoint_manifest(manifest, hub, layout, round_no)
    key = layout.global_weights(round_no)
    with contextlib.ExitStack() as stack:
        try:
            path = stack.enter_context(store.local_copy(key))
        except ObjectNotFound:
            raise CheckpointError(f"checkpoint payload missing: no {store.url}/{key}") from None
        _check_digest(f"{store.url}/{key}", sha256_file(path), manifest.payload_sha256)
        weights = TensorFile(path)
        if weights.metadata.get(STATE_DIGEST_KEY) != manifest.strategy_state_sha256:
            raise CheckpointError(f"{store.url}/{key}: the manifest's strategy_state_sha256 "
                                  "differs from the one inside the signed payload")
        if hub is not None and MODEL_DIGEST_KEY not in weights.metadata:
            raise CheckpointError(f"{store.url}/{key}: no model digest inside the signed "
                                  "payload (an older Deep-Rad wrote it), so the hub's signature "
                                  "does not say which model it is; re-create it with this "
                                  "version")
        if hub is not None and weights.metadata.get(MODEL_DIGEST_KEY) != model_digest(
                manifest.model.name, manifest.model.kwargs):
            raise CheckpointError(f"{store.url}/{key}: the manifest's model "
                                  f"{manifest.model.name!r} (with its kwargs) is not the one "
                                  "the hub signed inside the payload; the manifest was altered")
        if hub is not None and layout.uid and weights.metadata.get(STUDY_UID_KEY) != layout.uid:
            raise CheckpointError(f"{store.url}/{key}: the hub signed these weights for study "
                                  f"uid {weights.metadata.get(STUDY_UID_KEY) or '(none)'}, not "
                                  f"{layout.uid}; a checkpoint is never carried from one study "
                                  "object to another (import it with spec.inputCheckpoint)")
        yield weights, manifest


def read_checkpoint(
    store: ObjectStore, layout: StudyLayout, round_no: int, hub: PublicIdentity | None = None
) -> tuple[dict[str, torch.Tensor], CheckpointManifest]:
    """Round `round_no`'s global weights in memory, verified like `open_checkpoint`."""
    with open_checkpoint(store, layout, round_no, hub) as (weights, manifest):
        return weights.load_all(), manifest


def read_strategy_state(
    store: ObjectStore, layout: StudyLayout, manifest: CheckpointManifest
) -> dict[str, torch.Tensor] | None:
    """The server-optimizer state saved with a checkpoint, if its strategy keeps one."""
    if manifest.strategy_state_sha256 is None:
        return None
    key = layout.strategy_state(manifest.round)
    try:
        data = store.get_bytes(key)
    except ObjectNotFound:
        raise CheckpointError(f"strategy state missing: no {store.url}/{key}") from None
    _check_digest(f"{store.url}/{key}", sha256_bytes(data), manifest.strategy_state_sha256)
    return st_load(data)


# ---- site updates -------------------------------------------------------------------------


def write_update(
    store: ObjectStore, layout: StudyLayout, manifest: UpdateManifest, payload: bytes
) -> None:
    """Store a site's update payload, then its manifest (the manifest marks it complete)."""
    store.put_bytes(layout.update_payload(manifest.round, manifest.site), payload)
    store.put_text(layout.update_manifest(manifest.round, manifest.site),
                   manifest.model_dump_json(indent=2))


def validate_update(site: str, update: Mapping[str, torch.Tensor],
                    reference: dict[str, tuple[str, tuple[int, ...]]]) -> None:
    """Reject an update whose names, shapes or dtypes differ from `reference` (the global
    model's signature), or that holds NaN or Inf."""
    got = update.signature() if isinstance(update, TensorFile) else signature(update)
    missing, extra = sorted(set(reference) - set(got)), sorted(set(got) - set(reference))
    if missing or extra:
        raise UpdateRejected(site, f"tensor names differ from the global model: missing "
                                   f"{missing[:5]}, unexpected {extra[:5]}")
    for name, (dtype, shape) in reference.items():
        if got[name][1] != shape:
            raise UpdateRejected(site, f"tensor {name!r} has shape {list(got[name][1])}, "
                                       f"the global model has {list(shape)}")
        if got[name][0] != dtype:
            raise UpdateRejected(site, f"tensor {name!r} has dtype {got[name][0]}, "
                                       f"the global model has {dtype}")
    for name in update:
        t = update[name]
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise UpdateRejected(site, f"tensor {name!r} contains NaN or Inf")


_TORCH_DTYPES = {name: dtype for dtype, name in _DTYPE_NAMES.items()}
_CHUNK = 8 * 1024 * 1024


class StreamedUpdate(Mapping[str, torch.Tensor]):
    """A verified update payload read one tensor at a time through a small reusable buffer.

    Each tensor returned is a view that the next lookup overwrites: streaming strategies use it
    at once and let go, so memory stays at one accumulator plus the largest tensor.
    """

    def __init__(self, file: io.BufferedReader, header: dict[str, Any], base: int,
                 buffer: torch.Tensor) -> None:
        self._file, self._base, self._buf = file, base, buffer
        self._info = {k: v for k, v in header.items() if k != "__metadata__"}
        self.metadata: dict[str, str] = dict(header.get("__metadata__") or {})

    def __getitem__(self, key: str) -> torch.Tensor:
        info = self._info[key]
        begin, end = info["data_offsets"]
        raw = self._buf[: end - begin]
        self._file.seek(self._base + begin)
        if self._file.readinto(raw.numpy().data) != end - begin:
            raise CheckpointError(f"tensor {key!r}: payload ended early")
        return raw.view(_TORCH_DTYPES[info["dtype"]]).view(info["shape"])

    def __iter__(self) -> Iterator[str]:
        return iter(self._info)

    def __len__(self) -> int:
        return len(self._info)


class UpdateReader:
    """Verifies update payloads (sha256 over the whole file first) and hands them out as
    StreamedUpdates sharing one buffer sized to the largest tensor."""

    def __init__(self) -> None:
        self._buf = torch.empty(0, dtype=torch.uint8)

    @contextlib.contextmanager
    def open(self, site: str, path: Path, expected_sha256: str | None
             ) -> Iterator[StreamedUpdate]:
        """`expected_sha256` None: the caller authenticated the bytes already (a decrypted
        envelope: AES-GCM plus the site's signature over the envelope's digest)."""
        # Verified and read through one open file: a rename over the path cannot swap the
        # bytes between the check and the use.
        with path.open("rb") as f:
            digest = hashlib.sha256()
            while expected_sha256 is not None and (chunk := f.read(_CHUNK)):
                digest.update(chunk)
            if expected_sha256 is not None and digest.hexdigest() != expected_sha256:
                raise UpdateRejected(site, f"payload sha256 {digest.hexdigest()[:16]}… does not "
                                           f"match its manifest ({expected_sha256[:16]}…)")
            try:
                TensorFile(path)  # let safetensors validate the header and offsets
            except CheckpointError as exc:
                raise UpdateRejected(site, str(exc)) from exc
            f.seek(0)
            header_len = int.from_bytes(f.read(8), "little")
            header = json.loads(f.read(header_len))
            largest = max((e - b for k, v in header.items() if k != "__metadata__"
                           for b, e in [v["data_offsets"]]), default=0)
            if self._buf.numel() < largest:
                self._buf = torch.empty(largest, dtype=torch.uint8)
            yield StreamedUpdate(f, header, 8 + header_len, self._buf)


@contextlib.contextmanager
def open_update(
    store: ObjectStore, layout: StudyLayout, manifest: UpdateManifest,
    reader: UpdateReader | None = None,
) -> Iterator[Mapping[str, torch.Tensor]]:
    """A site's update payload, refused unless it matches its manifest's digest: streamed
    through `reader`'s buffer when given, else a lazy TensorFile that stays valid while open."""
    key = layout.update_payload(manifest.round, manifest.site)
    with contextlib.ExitStack() as stack:
        try:
            path = stack.enter_context(store.local_copy(key))
        except ObjectNotFound:
            raise UpdateRejected(manifest.site, f"payload {key} is missing") from None
        if reader is not None:
            yield stack.enter_context(reader.open(manifest.site, path, manifest.payload_sha256))
            return
        actual = sha256_file(path)
        if actual != manifest.payload_sha256:
            raise UpdateRejected(manifest.site, f"payload sha256 {actual[:16]}… does not match "
                                                f"its manifest ({manifest.payload_sha256[:16]}…)")
        try:
            lazy = TensorFile(path)
        except CheckpointError as exc:
            raise UpdateRejected(manifest.site, str(exc)) from exc
        yield lazy

"""The one checkpoint format: safetensors payloads with JSON manifests, digests checked on read.

Global models, server-optimizer state and site updates are all safetensors; nothing is pickled.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save
from safetensors.torch import save_file as st_save_file

from deeprad.core.errors import CheckpointError, ObjectNotFound, UpdateRejected
from deeprad.core.layout import StudyLayout
from deeprad.core.protocol import CheckpointManifest, UpdateManifest
from deeprad.core.store import ObjectStore

Tensors = Mapping[str, torch.Tensor]


def to_bytes(tensors: Tensors) -> bytes:
    """Serialise tensors as safetensors (deterministic: keys sorted, no metadata)."""
    return st_save({k: v.detach().to("cpu").contiguous() for k, v in tensors.items()})


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
) -> CheckpointManifest:
    """Write round `manifest_fields['round']`'s global model; the manifest goes last, so a
    reader that finds the manifest finds the payload it describes. Payloads go through a
    temporary file, so a large model is never held twice in memory (and S3 uploads stream)."""
    round_no = int(manifest_fields["round"])  # type: ignore[call-overload]
    state_sha = None
    if strategy_state:
        state_sha = _put_tensors(store, layout.strategy_state(round_no), strategy_state)
    payload_sha = _put_tensors(store, layout.global_weights(round_no), weights)
    manifest = CheckpointManifest.model_validate(
        {**manifest_fields, "payload_sha256": payload_sha, "strategy_state_sha256": state_sha}
    )
    store.put_text(layout.global_manifest(round_no), manifest.model_dump_json(indent=2))
    return manifest


def _put_tensors(store: ObjectStore, key: str, tensors: Tensors) -> str:
    """Serialise `tensors` to a temporary file, upload it, return its sha256."""
    fd, tmp = tempfile.mkstemp(prefix="deeprad-", suffix=".safetensors")
    os.close(fd)
    try:
        st_save_file({k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}, tmp)
        digest = sha256_file(Path(tmp))
        store.put_file(key, Path(tmp))
        return digest
    finally:
        os.unlink(tmp)


def read_manifest(store: ObjectStore, layout: StudyLayout, round_no: int) -> CheckpointManifest:
    key = layout.global_manifest(round_no)
    try:
        return CheckpointManifest.model_validate_json(store.get_bytes(key))
    except ObjectNotFound:
        raise CheckpointError(
            f"checkpoint of round {round_no} missing: no {store.url}/{key}") from None
    except ValueError as exc:
        raise CheckpointError(f"checkpoint manifest {store.url}/{key} is corrupt: {exc}") from exc


def _check_digest(where: str, actual: str, expected: str | None) -> None:
    if actual != expected:
        raise CheckpointError(
            f"{where}: sha256 {actual[:16]}… does not match the manifest's "
            f"{(expected or 'none')[:16]}…; the object was altered or is corrupt — re-create it"
        )


@contextlib.contextmanager
def open_checkpoint(
    store: ObjectStore, layout: StudyLayout, round_no: int
) -> Iterator[tuple[TensorFile, CheckpointManifest]]:
    """Round `round_no`'s global weights as a lazy TensorFile, refused unless they match the
    manifest's digest."""
    manifest = read_manifest(store, layout, round_no)
    key = layout.global_weights(round_no)
    with contextlib.ExitStack() as stack:
        try:
            path = stack.enter_context(store.local_copy(key))
        except ObjectNotFound:
            raise CheckpointError(f"checkpoint payload missing: no {store.url}/{key}") from None
        _check_digest(f"{store.url}/{key}", sha256_file(path), manifest.payload_sha256)
        yield TensorFile(path), manifest


def read_checkpoint(
    store: ObjectStore, layout: StudyLayout, round_no: int
) -> tuple[dict[str, torch.Tensor], CheckpointManifest]:
    """Round `round_no`'s global weights in memory, verified like `open_checkpoint`."""
    with open_checkpoint(store, layout, round_no) as (weights, manifest):
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


class UpdateReader:
    """Reads update payloads into one reusable buffer, hashing while it reads.

    The tensors it returns are views into the buffer, valid until the next `read`: streaming
    strategies fold them in and let go, so memory stays at one model whatever the site count,
    and each payload crosses memory once instead of page-faulting through a fresh mapping.
    """

    def __init__(self) -> None:
        self._buf = torch.empty(0, dtype=torch.uint8)

    def read(self, site: str, path: Path, expected_sha256: str) -> dict[str, torch.Tensor]:
        size = path.stat().st_size
        if self._buf.numel() < size:
            self._buf = torch.empty(size, dtype=torch.uint8)
        view = self._buf.numpy().data
        digest = hashlib.sha256()
        with path.open("rb", buffering=0) as f:
            done = 0
            while done < size:
                n = f.readinto(view[done : min(done + _CHUNK, size)])
                if not n:
                    break
                digest.update(view[done : done + n])
                done += n
        if digest.hexdigest() != expected_sha256:
            raise UpdateRejected(site, f"payload sha256 {digest.hexdigest()[:16]}… does not "
                                       f"match its manifest ({expected_sha256[:16]}…)")
        try:
            TensorFile(path)  # let safetensors validate the header and offsets
        except CheckpointError as exc:
            raise UpdateRejected(site, str(exc)) from exc
        header_len = int.from_bytes(view[:8], "little")
        header = json.loads(bytes(view[8 : 8 + header_len]))
        base = 8 + header_len
        out = {}
        for name, info in header.items():
            if name == "__metadata__":
                continue
            begin, end = info["data_offsets"]
            raw = self._buf[base + begin : base + end]
            dtype = _TORCH_DTYPES[info["dtype"]]
            try:
                out[name] = raw.view(dtype).view(info["shape"])
            except RuntimeError:  # misaligned: copy instead of viewing
                out[name] = raw.clone().view(dtype).view(info["shape"])
        return out


@contextlib.contextmanager
def open_update(
    store: ObjectStore, layout: StudyLayout, manifest: UpdateManifest,
    reader: UpdateReader | None = None,
) -> Iterator[Mapping[str, torch.Tensor]]:
    """A site's update payload, refused unless it matches its manifest's digest: views in
    `reader`'s buffer when given, else a lazy TensorFile that stays valid while open."""
    key = layout.update_payload(manifest.round, manifest.site)
    with contextlib.ExitStack() as stack:
        try:
            path = stack.enter_context(store.local_copy(key))
        except ObjectNotFound:
            raise UpdateRejected(manifest.site, f"payload {key} is missing") from None
        if reader is not None:
            yield reader.read(manifest.site, path, manifest.payload_sha256)
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

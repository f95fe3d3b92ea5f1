"""Model packages: MONAI bundles, identified by the sha256 of their content, governed as code.

A bundle is a folder (or a `.tar` of one) in MONAI's layout, restricted to what Deep-Rad can
check without running anything:

    configs/metadata.json      MONAI metadata (version, monai_version, pytorch_version, task,
                               description, network_data_format: inputs / outputs)
    configs/inference.json     network_def (the network), preprocessing, postprocessing, ...
    configs/train.json         optional
    models/model.safetensors   optional weights; safetensors only, never a pickle
    docs/...                   optional documentation (docs/README.md); LICENSE at the root

Nothing else: no `.py` (MONAI's `scripts/`), no `logging.conf` (its handlers are classes by
import path), no TorchScript or `.pt` (pickles run code when loaded).

Identity. The bundle's digest is `sha256:` + the sha256 of its SHA256SUMS listing: one line
`<sha256 hex>  <relative path>` per regular file (coreutils `sha256sum` format), sorted by the
UTF-8 bytes of the path, every file of the bundle except a root `SHA256SUMS` itself. It covers
each file's relative path and content; not file modes, times, owners or empty folders.
Symlinks, devices and names that could make the listing ambiguous (newlines, backslashes, `..`)
are refused, so the listing is a faithful description of the tree. `pack` writes a plain `.tar`
whose members carry fixed times, owners and modes in sorted order, with SHA256SUMS inside, so
the same content always packs to the same bytes and `sha256sum -c SHA256SUMS` checks an
unpacked copy; the archive's digest (of the members under its one top folder) equals the
folder's.

Size. A bundle is read before anyone knows it is the reviewed one (`find_bundle` looks through a
folder of them), so reading is bounded: archives are plain tar (a compressed one can unpack a
few kilobytes into gigabytes), each file's size is checked before it is read (limits below),
only configs and the listing are held in memory, JSON nests at most `MAX_JSON_DEPTH` deep, and
weights are hashed as a stream and parsed by their safetensors header only.

The digest shares `policy.models` with the catalogue's model digests (`model_digest`: the
sha256 of a canonical JSON object {name, kwargs}) without ambiguity: a bundle digest hashes a
SHA256SUMS listing, which starts with a hex digit, never with `{`, so no text is the preimage of
both; and a bundle is checked only against bundle digests (`site_policy`), a catalogue network
only against model digests.

Governance. A config's `_target_` names a class to instantiate: that is code. Deep-Rad never
hands a bundle config to MONAI's ConfigParser; `verify_bundle` accepts a `_target_` only from
the allowlist below (MONAI networks, transforms, inferers and losses reviewed not to import,
download or write anything from their arguments, plus Deep-Rad's own catalogue reference),
and refuses `$` expressions (Python) and `%` macros (text from other files) anywhere. A study
runs a bundle only where the hospital's site policy lists its digest; `build_model` finds the
bundle locally and checks the digest before it instantiates anything. No torch here:
`deeprad bundle pack/inspect/verify` and the site agent use it; `bundle_model` builds networks.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import stat
import struct
import tarfile
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import IO, Any

from deeprad.core.errors import ConfigError

# ModelSpec(name=BUNDLE_MODEL, kwargs={"digest": "sha256:<hex>"}): a study's model as a bundle.
BUNDLE_MODEL = "bundle"
# Folders (os.pathsep-separated) where a site keeps the bundles it reviewed (folders or .tar).
BUNDLES_ENV = "DEEPRAD_BUNDLES"
LISTING = "SHA256SUMS"
METADATA = "configs/metadata.json"
INFERENCE = "configs/inference.json"
WEIGHTS = "models/model.safetensors"
DIGEST_PREFIX = "sha256:"

# The one Deep-Rad target: a catalogue network by name (for the networks that are not plain
# MONAI classes); resolved by `bundle_model`, never imported by path.
CATALOGUE_TARGET = "deeprad.core.bundle_model.catalogue_network"
# MONAI classes a bundle may instantiate, by module. Each was reviewed: none imports, downloads
# or writes anything chosen by its arguments (EfficientNet and `pretrained=` download weights;
# SaveImage writes files; Lambda runs a callable; LoadImage imports a `reader` given by path,
# so its reader is limited to MONAI's own, see RESTRICTED_ARGS).
ALLOWED_TARGETS: dict[str, tuple[str, ...]] = {
    "monai.networks.nets": ("UNet", "BasicUNet", "AttentionUnet", "SegResNet", "DynUNet",
                            "UNETR", "SwinUNETR", "DenseNet121", "DenseNet169", "ResNet"),
    "monai.transforms": (
        "Compose", "LoadImage", "LoadImaged", "EnsureChannelFirstd", "EnsureType", "EnsureTyped",
        "Orientationd", "Spacingd", "ScaleIntensity", "ScaleIntensityd", "ScaleIntensityRanged",
        "NormalizeIntensity", "NormalizeIntensityd", "CropForegroundd", "Resized", "SpatialPadd",
        "CenterSpatialCropd", "ConcatItemsd", "Activations", "Activationsd", "AsDiscrete",
        "AsDiscreted", "KeepLargestConnectedComponentd"),
    "monai.inferers": ("SimpleInferer", "SlidingWindowInferer"),
    "monai.losses": ("DiceLoss", "DiceCELoss", "FocalLoss"),
}
_READERS = ("NibabelReader", "PydicomReader", "ITKReader", "NumpyReader", "PILReader")
# Arguments whose values are limited: target -> argument -> allowed values.
RESTRICTED_ARGS: dict[str, dict[str, tuple[Any, ...]]] = {
    "LoadImage": {"reader": (None, *_READERS)},
    "LoadImaged": {"reader": (None, *_READERS)},
    **{net: {"pretrained": (None, False)} for net in ALLOWED_TARGETS["monai.networks.nets"]},
}
# Config keys MONAI reserves that a bundle may use; `_mode_` (callable/debug) and `_requires_`
# change what instantiation does and are refused.
_RESERVED_OK = ("_target_", "_desc_", "_disabled_")
_PICKLE_SUFFIXES = (".pt", ".pth", ".pkl", ".pickle", ".ckpt", ".bin", ".joblib", ".npy",
                    ".npz", ".ts", ".pb")
_CHUNK = 1 << 20
# Reading limits (see "Size" above); generous for real MONAI bundles, whose configs are tens of
# kilobytes and whose weights are megabytes to hundreds of megabytes.
MAX_CONFIG_BYTES = 1 << 20  # each configs/*.json and the SHA256SUMS listing
MAX_KEPT_BYTES = 2 << 20  # configs and listing together (held in memory and parsed)
MAX_WEIGHTS_BYTES = 2 << 30  # each models/*.safetensors
MAX_OTHER_BYTES = 16 << 20  # each other file (docs, LICENSE)
MAX_BUNDLE_BYTES = 4 << 30  # all files together
MAX_MEMBERS = 256  # archive members, or files and folders in a bundle folder
MAX_SAFETENSORS_HEADER = 16 << 20  # the JSON header of a weights file
MAX_JSON_DEPTH = 64  # nesting of arrays and objects in a config
# Magic numbers of compressed files: gzip, bzip2, xz, zstd.
_COMPRESSED = (b"\x1f\x8b", b"BZh", b"\xfd7zXZ\x00", b"\x28\xb5\x2f\xfd")


class BundleError(ConfigError):
    """A bundle that cannot be used: one line naming the file (and key) and the fix."""


@dataclass(frozen=True)
class BundleFile:
    path: str  # relative POSIX path inside the bundle
    sha256: str  # hex
    size: int
    head: bytes  # the first bytes, to recognise the file's format


@dataclass(frozen=True)
class Bundle:
    """A bundle as read from a folder or an archive: its files, digest and parsed configs."""

    source: Path
    files: tuple[BundleFile, ...]
    configs: Mapping[str, Any]  # configs/*.json, parsed
    packed_listing: str | None  # the SHA256SUMS it carries, if any

    @property
    def listing(self) -> str:
        return listing_text(self.files)

    @property
    def digest(self) -> str:
        return DIGEST_PREFIX + hashlib.sha256(self.listing.encode()).hexdigest()

    @property
    def metadata(self) -> dict[str, Any]:
        found = self.configs.get(METADATA)
        return found if isinstance(found, dict) else {}

    @property
    def network_def(self) -> Any:
        inference = self.configs.get(INFERENCE)
        return inference.get("network_def") if isinstance(inference, dict) else None

    @property
    def task(self) -> str:
        """The Deep-Rad task, from MONAI's `network_data_format.outputs.pred.format`."""
        formats = self.metadata.get("network_data_format")
        outputs = formats.get("outputs") if isinstance(formats, dict) else None
        first = next(iter(outputs.values()), None) if isinstance(outputs, dict) else None
        fmt = first.get("format") if isinstance(first, dict) else None
        if fmt == "segmentation":
            return "segmentation"
        if fmt in ("classes", "classification"):
            return "classification"
        raise BundleError(f"{METADATA}: network_data_format.outputs.<pred>.format is "
                          f"{fmt!r}; Deep-Rad runs 'segmentation' or 'classes' "
                          "(classification) bundles")

    @property
    def weights(self) -> BundleFile | None:
        return next((f for f in self.files if f.path == WEIGHTS), None)

    def read(self, path: str) -> bytes:
        """One file's bytes, read once and checked against the sha256 this Bundle listed (the
        digest that was verified covers those bytes, whatever happened to the file since)."""
        entry = self._entry(path)
        with self._open(path) as stream:
            data = stream.read(entry.size + 1)
        if len(data) != entry.size or hashlib.sha256(data).hexdigest() != entry.sha256:
            raise BundleError(f"{path}: changed in {self.source} since the bundle was read and "
                              "verified; restore the reviewed bundle and run again")
        return data

    def safetensors_header(self, path: str) -> dict[str, Any]:
        """A weights file's safetensors header, read without reading its tensors."""
        self._entry(path)
        with self._open(path) as stream:
            return read_safetensors_header(stream, path)

    def _entry(self, path: str) -> BundleFile:
        entry = next((f for f in self.files if f.path == path), None)
        if entry is None:
            raise BundleError(f"{self.source}: no {path} in the bundle")
        return entry

    @contextmanager
    def _open(self, path: str) -> Iterator[IO[bytes]]:
        if self.source.is_dir():
            with (self.source / path).open("rb") as stream:
                yield stream
            return
        with _open_archive(self.source) as tar:
            for member, rel in _archive_members(tar, self.source):
                if rel == path:
                    handle = tar.extractfile(member)
                    assert handle is not None
                    yield handle
                    return
        raise BundleError(f"{self.source}: no {path} in the archive")


def listing_text(files: tuple[BundleFile, ...]) -> str:
    """SHA256SUMS: `<hex>  <path>` per file, sorted by the path's UTF-8 bytes."""
    ordered = sorted(files, key=lambda f: f.path.encode())
    return "".join(f"{f.sha256}  {f.path}\n" for f in ordered)


# ---- reading ----------------------------------------------------------------------------------


def read_bundle(path: str | Path) -> Bundle:
    """A bundle from a folder or a plain `.tar` made by `pack_bundle`. Refuses symlinks, special
    files, unsafe names and files over the size limits; parses every configs/*.json."""
    source = Path(path)
    if source.is_dir():
        entries = list(_folder_files(source))
    elif source.is_file():
        entries = list(_archive_files(source))
    else:
        raise BundleError(f"{source}: no such bundle folder or archive")
    files, configs, packed = [], {}, None
    for rel, sha, size, head, data in entries:
        _check_name(source, rel)
        if rel == LISTING:
            packed = (data or b"").decode("utf-8", "replace")
            continue
        files.append(BundleFile(rel, sha, size, head))
        if rel.startswith("configs/") and rel.endswith(".json"):
            configs[rel] = _parse_json(rel, data or b"")
    if len({f.path for f in files}) != len(files):
        raise BundleError(f"{source}: a path appears twice in the archive; pack it again with "
                          "`deeprad bundle pack`")
    return Bundle(source, tuple(sorted(files, key=lambda f: f.path.encode())), configs, packed)


def _parse_json(rel: str, data: bytes) -> Any:
    try:
        value = json.loads(data)
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:
        reason = "nested too deeply" if isinstance(exc, RecursionError) else str(exc)
        raise BundleError(f"{rel}: not valid JSON ({reason}); fix the file and pack "
                          "again") from None
    check_depth(rel, value)
    return value


def check_depth(rel: str, value: Any) -> None:
    """Refuse JSON nested deeper than MAX_JSON_DEPTH (checked without recursion), so the
    recursive walkers of configs never run out of stack."""
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        node, depth = stack.pop()
        children = node.values() if isinstance(node, dict) else node \
            if isinstance(node, list) else ()
        if children and depth > MAX_JSON_DEPTH:
            raise BundleError(f"{rel}: arrays and objects nest more than {MAX_JSON_DEPTH} "
                              "deep; flatten the config")
        stack.extend((child, depth + 1) for child in children)


_Entry = tuple[str, str, int, bytes, bytes | None]  # path, sha256, size, head, data of configs


class _Budget:
    """The reading limits of one bundle: member count, each file's size (checked before it is
    read), the bytes held in memory and the total."""

    def __init__(self, source: Path) -> None:
        self.source, self.members, self.kept, self.total = source, 0, 0, 0

    def member(self) -> None:
        self.members += 1
        if self.members > MAX_MEMBERS:
            raise BundleError(f"{self.source}: more than {MAX_MEMBERS} files and folders; a "
                              "bundle holds configs, weights and a few docs")

    def admit(self, rel: str, size: int) -> int:
        """The most bytes `rel` may have; BundleError when its stated size is over it."""
        limit, kind = _limit(rel)
        self.total += size
        if _wanted(rel):
            self.kept += size
        if size > limit:
            raise BundleError(f"{rel}: {size} bytes, over the {limit} byte limit for {kind}; "
                              "a bundle larger than that is not accepted")
        if self.kept > MAX_KEPT_BYTES:
            raise BundleError(f"{rel}: configs together over {MAX_KEPT_BYTES} bytes; keep "
                              "the bundle's configs small")
        if self.total > MAX_BUNDLE_BYTES:
            raise BundleError(f"{self.source}: files together over {MAX_BUNDLE_BYTES} bytes; "
                              "a bundle larger than that is not accepted")
        return limit


def _limit(rel: str) -> tuple[int, str]:
    if _wanted(rel):
        return MAX_CONFIG_BYTES, "a config"
    if rel.startswith("models/") and rel.endswith(".safetensors"):
        return MAX_WEIGHTS_BYTES, "weights"
    return MAX_OTHER_BYTES, "a document"


def _hash_stream(stream: IO[bytes], keep: bool, rel: str, limit: int
                 ) -> tuple[str, int, bytes, bytes]:
    digest, size, head, kept = hashlib.sha256(), 0, b"", bytearray()
    while chunk := stream.read(_CHUNK):
        if not head:
            head = chunk[:64]
        digest.update(chunk)
        size += len(chunk)
        if size > limit:  # the file grew after its size was checked
            raise BundleError(f"{rel}: over the {limit} byte limit while it was read; a "
                              "bundle's files must not change while it is read")
        if keep:
            kept += chunk
    return digest.hexdigest(), size, head, bytes(kept)


def _wanted(rel: str) -> bool:
    """Files whose bytes are kept while hashing: the configs and the listing."""
    return rel == LISTING or (rel.startswith("configs/") and rel.endswith(".json"))


def _folder_files(root: Path) -> Iterator[_Entry]:
    budget = _Budget(root)
    for folder, dirs, names in os.walk(root, followlinks=False):
        for name in sorted(dirs + names):
            budget.member()
            full = Path(folder) / name
            rel = full.relative_to(root).as_posix()
            info = full.lstat()
            mode = info.st_mode
            if stat.S_ISLNK(mode):
                raise BundleError(f"{rel}: a symlink; a bundle holds its files itself (copy "
                                  "the file in place of the link)")
            if stat.S_ISDIR(mode):
                continue
            if not stat.S_ISREG(mode):
                raise BundleError(f"{rel}: not a regular file; remove it from the bundle")
            limit = budget.admit(rel, info.st_size)
            with full.open("rb") as stream:
                sha, size, head, data = _hash_stream(stream, _wanted(rel), rel, limit)
            yield rel, sha, size, head, data if _wanted(rel) else None


def _archive_members(tar: tarfile.TarFile, source: Path
                     ) -> Iterator[tuple[tarfile.TarInfo, str]]:
    """(member, path inside the bundle) for each file under the archive's one top folder."""
    top: str | None = None
    budget = _Budget(source)
    for member in tar:
        budget.member()
        parts = PurePosixPath(member.name).parts
        if member.name.startswith("/") or ".." in parts or not parts:
            raise BundleError(f"{source}: member {member.name!r} points outside the bundle")
        if top is None:
            top = parts[0]
        if parts[0] != top:
            raise BundleError(f"{source}: members under both {top!r} and {parts[0]!r}; a "
                              "bundle archive holds one top folder")
        if member.isdir():
            continue
        rel = "/".join(parts[1:])
        if not member.isreg() or member.issparse():
            raise BundleError(f"{rel or member.name}: a link or special file in {source}; a "
                              "bundle holds regular files only")
        if not rel:
            raise BundleError(f"{source}: member {member.name!r} is not inside a top folder; "
                              "pack the bundle with `deeprad bundle pack`")
        yield member, rel


def _open_archive(source: Path) -> tarfile.TarFile:
    """A plain tar archive, opened for reading; compressed archives are refused."""
    try:
        with source.open("rb") as stream:
            magic = stream.read(6)
        if magic.startswith(_COMPRESSED):
            raise BundleError(f"{source}: a compressed archive; bundles are plain .tar (as "
                              "`deeprad bundle pack` writes them): decompress it first")
        return tarfile.open(source, "r:")
    except (tarfile.TarError, OSError) as exc:
        raise BundleError(f"{source}: not a bundle folder or tar archive ({exc})") from None


def _archive_files(source: Path) -> Iterator[_Entry]:
    budget = _Budget(source)
    with _open_archive(source) as tar:
        for member, rel in _archive_members(tar, source):
            limit = budget.admit(rel, member.size)
            handle = tar.extractfile(member)
            assert handle is not None
            sha, size, head, data = _hash_stream(handle, _wanted(rel), rel, limit)
            yield rel, sha, size, head, data if _wanted(rel) else None


def _check_name(source: Path, rel: str) -> None:
    parts = rel.split("/")
    if any(p in ("", ".", "..") for p in parts) or any(c in rel for c in "\\\n\r\t\0"):
        raise BundleError(f"{source}: file name {rel!r} cannot be listed unambiguously; "
                          "rename it (no backslashes, control characters or `..`)")


# ---- packing ----------------------------------------------------------------------------------


def pack_bundle(folder: str | Path, out: str | Path) -> str:
    """Write the folder as a deterministic `.tar` (sorted members, fixed times, owners and
    modes, SHA256SUMS inside) and return the digest, which equals the folder's."""
    bundle = read_bundle(folder)
    if not bundle.source.is_dir():
        raise BundleError(f"{folder}: pack takes a bundle folder; {folder} is an archive "
                          "already")
    top = bundle.source.resolve().name or "bundle"
    target = Path(out)
    partial = target.with_name(target.name + ".partial")
    listing = bundle.listing.encode()
    with tarfile.open(partial, "w", format=tarfile.PAX_FORMAT) as tar:
        tar.addfile(_member(f"{top}/{LISTING}", len(listing)), io.BytesIO(listing))
        for entry in bundle.files:
            with (bundle.source / entry.path).open("rb") as stream:
                tar.addfile(_member(f"{top}/{entry.path}", entry.size), stream)
    packed = read_bundle(partial)
    if packed.digest != bundle.digest:  # the folder changed while it was packed
        partial.unlink()
        raise BundleError(f"{folder}: files changed while packing; pack again")
    partial.replace(target)
    return bundle.digest


def _member(name: str, size: int) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = size, 0, 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    return info


# ---- verification -----------------------------------------------------------------------------


def verify_bundle(bundle: Bundle, digest: str | None = None) -> None:
    """Refuse (BundleError, one line) a bundle Deep-Rad may not run: files outside the layout,
    pickles, missing metadata, a `_target_` off the allowlist, `$` expressions or `%` macros,
    weights that are not safetensors, a file that changed since packing, or a digest other
    than `digest`."""
    if digest is not None and not (digest.startswith(DIGEST_PREFIX)
                                   and len(digest) == len(DIGEST_PREFIX) + 64):
        raise BundleError(f"--digest {digest!r}: expected sha256:<64 hex>, as `deeprad bundle "
                          "pack` prints")
    _check_packed_listing(bundle)
    for entry in bundle.files:
        _check_file(entry)
    if METADATA not in bundle.configs:
        raise BundleError(f"{bundle.source}: missing {METADATA} (MONAI metadata: version, "
                          "monai_version, pytorch_version, task, description, "
                          "network_data_format)")
    _check_metadata(bundle.metadata)
    bundle.task  # noqa: B018 - raises when the outputs name no task Deep-Rad runs
    inference = bundle.configs.get(INFERENCE)
    if not isinstance(inference, dict) or not isinstance(inference.get("network_def"), dict):
        raise BundleError(f"{INFERENCE}: missing or has no network_def object; the network "
                          "is defined there")
    for rel, config in sorted(bundle.configs.items()):
        check_config(rel, config)
    for entry in bundle.files:
        if entry.path.endswith(".safetensors"):
            _check_safetensors(bundle, entry.path)
    if digest is not None and bundle.digest != digest:
        raise BundleError(f"{bundle.source}: digest {bundle.digest} is not the expected "
                          f"{digest}: its content differs from the bundle that was reviewed "
                          "(a SHA256SUMS from `deeprad bundle pack` names the changed file)")


def _check_packed_listing(bundle: Bundle) -> None:
    if bundle.packed_listing is None or bundle.packed_listing == bundle.listing:
        return
    packed = {}
    for line in bundle.packed_listing.splitlines():
        sha, _, rel = line.partition("  ")
        packed[rel] = sha
    for entry in bundle.files:
        if packed.get(entry.path) != entry.sha256:
            was = packed.get(entry.path)
            raise BundleError(f"{entry.path}: " + (
                f"sha256 {entry.sha256[:12]}… does not match {LISTING} ({was[:12]}…): the "
                "file changed after the bundle was packed" if was else
                f"not in {LISTING}: added after the bundle was packed"))
    missing = sorted(set(packed) - {f.path for f in bundle.files})
    raise BundleError(f"{missing[0] if missing else LISTING}: listed in {LISTING} but "
                      "missing from the bundle")


def _check_file(entry: BundleFile) -> None:
    rel, head = entry.path, entry.head
    # A safetensors file starts with its header's length, which can look like a pickle's
    # opcode; its header is parsed instead (`_check_safetensors`).
    sniffed = not rel.endswith(".safetensors") and (
        (head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05"))
        or head.startswith(b"PK\x03\x04") or head.startswith(b"\x93NUMPY"))
    pickle_like = rel.lower().endswith(_PICKLE_SUFFIXES) or sniffed
    if pickle_like:
        raise BundleError(f"{rel}: a pickle-format file (torch.save, TorchScript, numpy or "
                          "zip); loading it can run code, so bundles carry weights as "
                          f"safetensors only: save them to {WEIGHTS} "
                          "(safetensors.torch.save_file) and remove this file")
    top, _, rest = rel.partition("/")
    if rel in ("LICENSE", "README.md") or (top == "docs" and rest):
        return
    if top == "configs" and "/" not in rest and rest.endswith(".json"):
        return
    if top == "models" and "/" not in rest and rest.endswith(".safetensors"):
        return
    raise BundleError(f"{rel}: not part of a Deep-Rad bundle (configs/*.json, "
                      "models/*.safetensors, docs/*, LICENSE); code and config formats that "
                      "name classes (.py, logging.conf, YAML) are refused: remove it")


def _check_metadata(metadata: dict[str, Any]) -> None:
    for field in ("version", "monai_version", "pytorch_version", "task", "description"):
        if not isinstance(metadata.get(field), str) or not metadata[field]:
            raise BundleError(f"{METADATA}: missing {field} (MONAI metadata schema); add it")
    fmt = metadata.get("network_data_format")
    if not isinstance(fmt, dict) or not fmt.get("inputs") or not fmt.get("outputs"):
        raise BundleError(f"{METADATA}: network_data_format needs inputs and outputs (type, "
                          "num_channels, spatial_shape per tensor); add them")


def check_config(rel: str, node: Any, where: str = "") -> None:
    """Every `_target_` in a config on the allowlist, its restricted arguments within bounds,
    and no `$` expression or `%` macro anywhere; BundleError naming file and key otherwise."""
    if not where:
        check_depth(rel, node)
    if isinstance(node, dict):
        if "_target_" in node:
            _check_target(rel, where, node)
        for key, value in node.items():
            at = f"{where}.{key}" if where else str(key)
            if key.startswith("_") and key.endswith("_") and key not in _RESERVED_OK:
                raise BundleError(f"{rel}: {at} is a MONAI instantiation option Deep-Rad "
                                  "does not allow; remove it")
            check_config(rel, value, at)
    elif isinstance(node, list):
        for i, value in enumerate(node):
            check_config(rel, value, f"{where}[{i}]")
    elif isinstance(node, str) and node[:1] in ("$", "%"):
        kind = ("a `$` expression is Python code" if node[0] == "$"
                else "a `%` macro pulls text from another file")
        raise BundleError(f"{rel}: {where or '<root>'} {node[:60]!r}: {kind}, which "
                          "bundles may not carry; write the literal value")


def target_class_name(target: str) -> str | None:
    """The allowlisted class a `_target_` names ("UNet", "monai.networks.nets.UNet"), or
    None; CATALOGUE_TARGET for Deep-Rad's catalogue reference."""
    if target == CATALOGUE_TARGET:
        return target
    module, _, name = target.rpartition(".")
    for allowed_module, names in ALLOWED_TARGETS.items():
        if name in names and module in ("", allowed_module):
            return name
    return None


def allowed_targets_text() -> str:
    return "; ".join(f"{module}: {', '.join(names)}"
                     for module, names in ALLOWED_TARGETS.items()) + f"; {CATALOGUE_TARGET}"


def _check_target(rel: str, where: str, node: dict[str, Any]) -> None:
    at = f"{where}._target_" if where else "_target_"
    target = node["_target_"]
    name = target_class_name(target) if isinstance(target, str) else None
    if name is None:
        raise BundleError(f"{rel}: {at} {target!r} is not a MONAI network or transform; "
                          "bundles may only instantiate allowlisted MONAI networks, "
                          "transforms, inferers and losses or Deep-Rad's catalogue reference "
                          "(`deeprad bundle verify --help` lists them)")
    for arg, allowed in RESTRICTED_ARGS.get(name, {}).items():
        if node.get(arg) not in allowed:
            raise BundleError(f"{rel}: {where or '<root>'}.{arg} {node.get(arg)!r} is not "
                              f"allowed for {name} (allowed: {list(allowed)})")


def _check_safetensors(bundle: Bundle, rel: str) -> None:
    bundle.safetensors_header(rel)


def read_safetensors_header(stream: IO[bytes], rel: str) -> dict[str, Any]:
    """The JSON header of a safetensors file (tensor name -> dtype, shape, offsets), reading
    only its 8-byte length and the header (at most MAX_SAFETENSORS_HEADER bytes)."""
    not_safetensors = BundleError(f"{rel}: not a safetensors file (a pickle renamed?); save "
                                  "the weights with safetensors.torch.save_file")
    prefix = stream.read(8)
    if len(prefix) < 8:
        raise not_safetensors
    (length,) = struct.unpack("<Q", prefix)
    if length > MAX_SAFETENSORS_HEADER:
        raise BundleError(f"{rel}: not a safetensors file (its header would be {length} "
                          f"bytes, over the {MAX_SAFETENSORS_HEADER} byte limit; a pickle "
                          "renamed?); save the weights with safetensors.torch.save_file")
    raw = stream.read(length)
    try:
        header = json.loads(raw) if len(raw) == length else None
    except (ValueError, UnicodeDecodeError, RecursionError):
        header = None
    if not isinstance(header, dict):
        raise not_safetensors
    return header


def safetensors_header(data: bytes) -> dict[str, Any] | None:
    """The JSON header of safetensors bytes (the file, or at least its start), or None when
    they are not one."""
    try:
        return read_safetensors_header(io.BytesIO(data), "weights")
    except BundleError:
        return None


# ---- finding a bundle by digest --------------------------------------------------------------


def _packed_digest(candidate: Path) -> str | None:
    """The digest a candidate's SHA256SUMS claims (an archive's first member, as `pack` writes
    it, or a folder's root file), read alone; None when it carries none. A match is only a
    hint: `read_bundle` hashes every file and `verify_bundle` compares them with it."""
    if candidate.is_dir():
        listing = candidate / LISTING
        if not listing.is_file() or listing.is_symlink():
            return None
        with listing.open("rb") as stream:
            data = stream.read(MAX_CONFIG_BYTES + 1)
    else:
        with _open_archive(candidate) as tar:
            first = next(_archive_members(tar, candidate), None)
            if first is None or first[1] != LISTING or first[0].size > MAX_CONFIG_BYTES:
                return None
            handle = tar.extractfile(first[0])
            assert handle is not None
            data = handle.read()
    return DIGEST_PREFIX + hashlib.sha256(data).hexdigest()


def find_bundle(digest: str, hint: str | Path | None = None,
                env: Mapping[str, str] | None = None) -> Bundle:
    """The bundle with this digest: at `hint` (a folder or archive), else in the folders of
    $DEEPRAD_BUNDLES; verified (digest included) before it is returned."""
    env = os.environ if env is None else env
    if hint is not None:
        bundle = read_bundle(hint)
        verify_bundle(bundle, digest)
        return bundle
    folders = [Path(p) for p in env.get(BUNDLES_ENV, "").split(os.pathsep) if p]
    for folder in folders:
        for candidate in sorted(folder.iterdir()) if folder.is_dir() else ():
            if not (candidate.is_dir() or candidate.suffix == ".tar"):
                continue
            try:
                if _packed_digest(candidate) not in (None, digest):
                    continue  # another bundle: not read further
                bundle = read_bundle(candidate)
            except BundleError:
                continue
            if bundle.digest == digest:
                verify_bundle(bundle, digest)
                return bundle
    where = ", ".join(str(f) for f in folders) or f"${BUNDLES_ENV} (unset)"
    raise BundleError(f"bundle {digest}: not found in {where}; put the reviewed bundle (folder "
                      f"or .tar) in one of the folders of ${BUNDLES_ENV}")


__all__ = ["ALLOWED_TARGETS", "BUNDLES_ENV", "BUNDLE_MODEL", "CATALOGUE_TARGET", "INFERENCE",
           "LISTING", "MAX_JSON_DEPTH", "METADATA", "WEIGHTS", "Bundle", "BundleError",
           "BundleFile", "allowed_targets_text", "check_config", "check_depth", "find_bundle",
           "listing_text", "pack_bundle", "read_bundle", "read_safetensors_header",
           "safetensors_header", "target_class_name", "verify_bundle"]

"""`deeprad bundle`: pack, inspect, verify and export MONAI bundles (deeprad.core.bundle).

pack, inspect and verify never import torch, so they answer at once; export builds the network.
Every refusal is one line on stderr with exit code 2 (the `deeprad` front door's DeepRadError
handling).
"""

from __future__ import annotations

import argparse
import json
from typing import Any

_ABOUT = ("A bundle is a MONAI bundle folder (configs/metadata.json, configs/inference.json "
          "with network_def, optional models/model.safetensors, docs/) or a .tar of one from "
          "`deeprad bundle pack`. Its digest, sha256:<hex> of its SHA256SUMS listing (every "
          "file's path and sha256), is what a hospital lists in policy.models to let studies "
          "run it; a study names it as model bundle with kwargs {\"digest\": \"sha256:...\"}.")


def _pack(args: argparse.Namespace) -> int:
    from deeprad.core.bundle import pack_bundle, read_bundle, verify_bundle

    verify_bundle(read_bundle(args.folder))
    digest = pack_bundle(args.folder, args.output)
    print(f"{args.output}: {digest}")
    return 0


def _inspect(args: argparse.Namespace) -> int:
    from deeprad.core.bundle import BundleError, read_bundle, verify_bundle

    bundle = read_bundle(args.bundle)
    meta = bundle.metadata
    try:
        verify_bundle(bundle)
        verdict = "ok (deeprad bundle verify)"
    except BundleError as exc:
        verdict = f"REFUSED: {exc}"
    try:
        task = bundle.task
    except BundleError:
        task = "unknown"
    formats = meta.get("network_data_format")
    formats = formats if isinstance(formats, dict) else {}
    lines = [f"bundle   {args.bundle}",
             f"digest   {bundle.digest}",
             f"version  {meta.get('version', '-')} (MONAI {meta.get('monai_version', '-')}, "
             f"PyTorch {meta.get('pytorch_version', '-')})",
             f"task     {task}: {meta.get('task', '-')}",
             f"about    {meta.get('description', '-')}"]
    for kind in ("inputs", "outputs"):
        tensors = formats.get(kind)
        for name, tensor in (tensors if isinstance(tensors, dict) else {}).items():
            lines.append(f"{kind[:-1]:<8} {name}: {_tensor_text(tensor)}")
    for rel, config in sorted(bundle.configs.items()):
        for where, target in _targets(config):
            lines.append(f"target   {rel}: {where} -> {target}")
    weights = bundle.weights
    lines.append(f"weights  {_weights_text(bundle) if weights else 'none (initialised)'}")
    lines.append(f"files    {len(bundle.files)}, {sum(f.size for f in bundle.files)} bytes")
    lines.append(f"verify   {verdict}")
    print("\n".join(lines))
    return 0


def _verify(args: argparse.Namespace) -> int:
    from deeprad.core.bundle import read_bundle, verify_bundle

    bundle = read_bundle(args.bundle)
    verify_bundle(bundle, args.digest)
    print(f"OK {args.bundle}: {bundle.digest} ({bundle.task}, "
          f"{'weights' if bundle.weights else 'no weights'})")
    return 0


def _export(args: argparse.Namespace) -> int:
    from deeprad.core.errors import ConfigError

    try:
        kwargs = json.loads(args.kwargs)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"--kwargs: not JSON ({exc.msg}); e.g. --kwargs "
                          "'{\"in_channels\": 3}'") from None
    if not isinstance(kwargs, dict):
        raise ConfigError("--kwargs: a JSON object of the model's arguments, e.g. "
                          "'{\"in_channels\": 3}'")
    from deeprad.core.bundle_model import export_bundle
    from deeprad.core.protocol import ModelSpec

    bundle = export_bundle(ModelSpec(name=args.model, kwargs=kwargs), args.output,
                           seed=args.seed)
    print(f"{args.output}: {bundle.digest} ({bundle.task}; untrained weights, seed "
          f"{args.seed})")
    return 0


def _tensor_text(tensor: Any) -> str:
    if not isinstance(tensor, dict):
        return str(tensor)
    return (f"{tensor.get('type', '?')}/{tensor.get('format', '?')}, "
            f"{tensor.get('num_channels', '?')} channel(s), shape {tensor.get('spatial_shape')}, "
            f"{tensor.get('dtype', '?')}")


def _targets(node: Any, where: str = "") -> list[tuple[str, str]]:
    found: list[tuple[str, str]] = []
    if isinstance(node, dict):
        if "_target_" in node:
            found.append((where or "<root>", str(node["_target_"])))
        for key, value in node.items():
            found += _targets(value, f"{where}.{key}" if where else str(key))
    elif isinstance(node, list):
        for i, value in enumerate(node):
            found += _targets(value, f"{where}[{i}]")
    return found


def _weights_text(bundle: Any) -> str:
    from deeprad.core.bundle import WEIGHTS, BundleError

    try:  # the header only: inspect never reads the tensors
        header = bundle.safetensors_header(WEIGHTS)
    except BundleError:
        header = {}
    tensors = {k: v for k, v in header.items() if k != "__metadata__" and isinstance(v, dict)}
    params = 0
    for tensor in tensors.values():
        count = 1
        for edge in tensor.get("shape", []):
            count *= int(edge)
        params += count
    return f"{WEIGHTS}: {len(tensors)} tensors, {params} values"


def register(sub: argparse._SubParsersAction) -> None:
    """Add `bundle` (pack, inspect, verify, export) to the `deeprad` command."""
    from deeprad.core.bundle import allowed_targets_text

    bundle = sub.add_parser("bundle", help="pack, inspect, verify or export a MONAI bundle",
                            description=_ABOUT)
    actions = bundle.add_subparsers(dest="action", required=True)
    pack = actions.add_parser(
        "pack", help="write a bundle folder as a deterministic .tar and print its digest",
        description="Verifies the folder, then writes it as a .tar with sorted members, fixed "
                    "times, owners and modes and a SHA256SUMS inside: the same content always "
                    "gives the same bytes, and the archive's digest equals the folder's.")
    pack.add_argument("folder", help="the bundle folder")
    pack.add_argument("-o", "--output", required=True, metavar="FILE",
                      help="the archive to write (.tar)")
    pack.set_defaults(func=_pack)
    inspect = actions.add_parser(
        "inspect", help="show a bundle's metadata, inputs/outputs, targets, weights, digest",
        description="Prints what a reviewer needs before listing the digest in a site "
                    "policy: metadata, task, input and output tensors, every _target_ the "
                    "configs instantiate, the weights and the verdict of verify.")
    inspect.add_argument("bundle", metavar="FILE|FOLDER")
    inspect.set_defaults(func=_inspect)
    verify = actions.add_parser(
        "verify", help="check a bundle may run here: one line, exit 0 (OK) or 2 (why not)",
        description="Refuses pickle-format files (weights travel as safetensors), files "
                    "outside the bundle layout, missing metadata, $ expressions and % macros, "
                    "a file changed since packing, a digest other than --digest, and any "
                    "_target_ not on the allowlist: " + allowed_targets_text() + ".")
    verify.add_argument("bundle", metavar="FILE|FOLDER")
    verify.add_argument("--digest", metavar="sha256:HEX",
                        help="the digest the bundle must have (e.g. the one a policy lists)")
    verify.set_defaults(func=_verify)
    export = actions.add_parser(
        "export", help="write a catalogue network as a bundle folder",
        description="Writes a catalogue network (see `deeprad models`) as a bundle folder "
                    "with untrained weights (the network's initialisation under --seed). A "
                    "task name exports that task's shipped network: segmentation is unet3d "
                    "with 3 sequences, classification is tumor-cnn.")
    export.add_argument("model", metavar="MODEL",
                        help="a catalogue network (e.g. unet3d) or a task (segmentation, "
                             "classification)")
    export.add_argument("-o", "--output", required=True, metavar="FOLDER",
                        help="a new (or empty) folder")
    export.add_argument("--kwargs", default="{}", metavar="JSON",
                        help="the network's arguments as in spec.model.kwargs, e.g. "
                             "'{\"in_channels\": 3}' (default {})")
    export.add_argument("--seed", type=int, default=0, help="seed of the initial weights")
    export.set_defaults(func=_export)

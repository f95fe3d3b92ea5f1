"""Networks from bundles, and catalogue networks as bundles (torch; see `bundle` for the format
and its governance).

`build_bundle_model` is `build_model`'s branch for `ModelSpec(name="bundle", kwargs={"digest":
"sha256:<hex>"})`: it finds the bundle locally, verifies it against that digest, instantiates
`network_def` with its own walker (only allowlisted classes, JSON values as arguments; MONAI's
ConfigParser never sees the config) and loads the bundle's safetensors weights. Whether a study
may run the bundle at a hospital is the site policy's call (`policy.models` lists its digest),
checked by the agent and the trainer before this runs.

`export_bundle` writes a catalogue network as a bundle: MONAI networks as their MONAI class
with explicit arguments (portable to MONAI's own tools), Deep-Rad's own networks as a
`catalogue_network` reference by name.
"""

from __future__ import annotations

import importlib
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import monai
import numpy as np
import safetensors.torch
import torch
from torch import nn

from deeprad.core.bundle import (
    ALLOWED_TARGETS,
    BUNDLE_MODEL,
    CATALOGUE_TARGET,
    INFERENCE,
    METADATA,
    WEIGHTS,
    Bundle,
    BundleError,
    check_depth,
    find_bundle,
    read_bundle,
    target_class_name,
    verify_bundle,
)
from deeprad.core.errors import ConfigError
from deeprad.core.model_catalogue import MODEL_TASKS, MODELS
from deeprad.core.protocol import ModelSpec

_SPEC_KEYS = ("digest", "path")
# Each shipped task as a bundle: the catalogue network `deeprad bundle export <task>` writes
# (the default studies' networks: 3 sequences for segmentation, 2D slices for classification).
TASK_NETWORKS: dict[str, ModelSpec] = {
    "segmentation": ModelSpec(name="unet3d", kwargs={"in_channels": 3}, task="segmentation"),
    "classification": ModelSpec(name="tumor-cnn", task="classification"),
}
# Size of the example input each task's bundle documents (the shipped studies' defaults); the
# networks take other sizes too.
_SPATIAL = {"segmentation": [48, 48, 48], "classification": [64, 64]}


def catalogue_network(name: str, task: str, in_channels: int = 1, out_channels: int = 1,
                      kwargs: Mapping[str, Any] | None = None) -> nn.Module:
    """A Deep-Rad catalogue network by name (the bundle target for networks that are not a
    plain MONAI class); never an import path or another bundle."""
    from deeprad.core.models import build_model

    if name not in MODELS:
        raise BundleError(f"{INFERENCE}: network_def.name {name!r} is not a catalogue network "
                          f"({', '.join(MODELS)})")
    spec = ModelSpec(name=name, kwargs={**(kwargs or {}), "in_channels": in_channels},
                     task=task)  # type: ignore[arg-type]
    return build_model(spec, num_classes=out_channels)


def build_bundle_model(spec: ModelSpec, *, allow_code: bool = False) -> nn.Module:
    """The network of the bundle the spec names by digest, verified and with its weights.
    `path` (a folder or archive) is a location hint for `deeprad simulate` only; a Job finds
    bundles in $DEEPRAD_BUNDLES."""
    kwargs = dict(spec.kwargs)
    unknown = sorted(set(kwargs) - set(_SPEC_KEYS))
    if unknown or not isinstance(kwargs.get("digest"), str):
        raise ConfigError(f"model bundle: kwargs must be {{\"digest\": \"sha256:<hex>\"}} "
                          f"(plus \"path\" with deeprad simulate), got {sorted(kwargs)}; "
                          "`deeprad bundle pack` prints the digest")
    if "path" in kwargs and not allow_code:
        raise ConfigError("model bundle: kwargs.path is for `deeprad simulate` only; a Job "
                          "finds the bundle by digest in the site's $DEEPRAD_BUNDLES")
    bundle = find_bundle(kwargs["digest"], kwargs.get("path"))
    if bundle.task != spec.task:
        raise ConfigError(f"model bundle {bundle.digest[:19]}…: a {bundle.task} bundle but the "
                          f"study's task is {spec.task}; set model.task: {bundle.task}")
    return network_from_bundle(bundle)


def network_from_bundle(bundle: Bundle) -> nn.Module:
    """Instantiate a verified bundle's network_def and load its weights (when it has them).
    The weights are read once and checked against the sha256 the verified digest covers
    (`Bundle.read`), so a file swapped after verification is refused, never loaded."""
    check_depth(INFERENCE, bundle.network_def)  # `instantiate` recurses
    model = instantiate(bundle.network_def, f"{INFERENCE}: network_def")
    if not isinstance(model, nn.Module):
        raise BundleError(f"{INFERENCE}: network_def builds a {type(model).__name__}, not a "
                          "torch network")
    if bundle.weights is not None:
        data = bundle.read(WEIGHTS)
        try:
            weights = safetensors.torch.load(data)
        except safetensors.SafetensorError as exc:
            raise BundleError(f"{WEIGHTS}: unreadable safetensors ({exc}); save the weights "
                              "with safetensors.torch.save_file") from None
        load_weights(model, weights)
    return model


def _aliases(model: nn.Module) -> dict[str, str]:
    """Parameter name -> the name that stands for it in a bundle's weights: networks such as
    DynUNet reach one tensor under several names, and safetensors stores each tensor once."""
    first: dict[int, str] = {}
    names: dict[str, str] = {}
    for name, tensor in sorted(model.state_dict().items()):
        key = tensor.data_ptr() if tensor.numel() else id(tensor)
        names[name] = first.setdefault(key, name)
    return names


def load_weights(model: nn.Module, weights: Mapping[str, torch.Tensor]) -> None:
    """Load a bundle's weights (each shared tensor once) into `model`, every tensor required."""
    aliases = _aliases(model)
    expected = set(aliases.values())
    if set(weights) != expected:
        missing, extra = sorted(expected - set(weights)), sorted(set(weights) - expected)
        raise BundleError(f"{WEIGHTS}: does not fit network_def (missing {missing[:3]}, "
                          f"unexpected {extra[:3]}); export the weights from this network")
    try:
        model.load_state_dict({name: weights[alias] for name, alias in aliases.items()})
    except RuntimeError as exc:
        lines = str(exc).splitlines()
        raise BundleError(f"{WEIGHTS}: does not fit network_def "
                          f"({lines[1].strip() if len(lines) > 1 else lines[0]}); export the "
                          "weights from this network") from None


def bundle_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's weights as a bundle stores them: CPU, contiguous, each shared tensor once."""
    state = model.state_dict()
    return {alias: state[alias].detach().to("cpu").contiguous()
            for alias in sorted(set(_aliases(model).values()))}


def instantiate(node: Any, where: str) -> Any:
    """Build a config node: dicts with an allowlisted `_target_` become objects, other values
    stay JSON. `@` references are not resolved (a network definition needs none)."""
    if isinstance(node, list):
        return [instantiate(item, f"{where}[{i}]") for i, item in enumerate(node)]
    if isinstance(node, str) and node[:1] in ("@", "$", "%"):
        raise BundleError(f"{where}: {node[:60]!r}: references and expressions are not "
                          "resolved by Deep-Rad; write the value")
    if not isinstance(node, dict):
        return node
    if "_target_" not in node:
        return {k: instantiate(v, f"{where}.{k}") for k, v in node.items()}
    if node.get("_disabled_") is True:
        return None
    target = node["_target_"]
    name = target_class_name(target) if isinstance(target, str) else None
    if name is None:  # verify_bundle refuses these first; checked again where it matters
        raise BundleError(f"{where}._target_ {target!r} is not a MONAI network or transform")
    args = {k: instantiate(v, f"{where}.{k}") for k, v in node.items()
            if not (k.startswith("_") and k.endswith("_"))}
    factory: Any
    if name == CATALOGUE_TARGET:
        factory = catalogue_network
    else:
        module = next(m for m, names in ALLOWED_TARGETS.items() if name in names)
        factory = getattr(importlib.import_module(module), name)
    try:
        return factory(**args)
    except (TypeError, ValueError) as exc:
        raise BundleError(f"{where}: {name}({', '.join(args)}) failed: {exc}") from None


# ---- export -----------------------------------------------------------------------------------


def _network_def(name: str, in_channels: int, num_classes: int, kwargs: dict[str, Any]
                 ) -> dict[str, Any]:
    """network_def for a catalogue network: its MONAI class with the catalogue's defaults
    spelled out, or a catalogue reference. `export_bundle` checks both build the same
    parameters as the catalogue."""
    kw = dict(kwargs)
    if name == "unet3d":
        channels = list(kw.pop("channels", [8, 16, 32, 64]))
        return {"_target_": "monai.networks.nets.UNet", "spatial_dims": 3,
                "in_channels": in_channels, "out_channels": num_classes, "channels": channels,
                "strides": list(kw.pop("strides", [2] * (len(channels) - 1))),
                "num_res_units": kw.pop("num_res_units", 1), "norm": kw.pop("norm", "instance"),
                **kw}
    if name == "segresnet3d":
        return {"_target_": "monai.networks.nets.SegResNet", "spatial_dims": 3,
                "in_channels": in_channels, "out_channels": num_classes,
                "init_filters": kw.pop("init_filters", 8),
                "norm": kw.pop("norm", ["group", {"num_groups": 8}]), **kw}
    if name == "densenet121":
        return {"_target_": "monai.networks.nets.DenseNet121", "spatial_dims": 2,
                "in_channels": in_channels, "out_channels": num_classes,
                "norm": kw.pop("norm", ["group", {"num_groups": 8}]), **kw}
    return {"_target_": CATALOGUE_TARGET, "name": name, "task": MODEL_TASKS[name],
            "in_channels": in_channels, "out_channels": num_classes, "kwargs": kw}


def _metadata(name: str, task: str, in_channels: int, num_classes: int) -> dict[str, Any]:
    spatial = _SPATIAL[task]
    output = ({"type": "image", "format": "segmentation", "num_channels": num_classes,
               "spatial_shape": spatial, "dtype": "float32", "value_range": [0, 1],
               "is_patch_data": False, "channel_def": {"0": "lesion (sigmoid of the logit)"}}
              if task == "segmentation" else
              {"type": "probabilities", "format": "classes", "num_channels": num_classes,
               "spatial_shape": [1], "dtype": "float32", "value_range": [0, 1],
               "is_patch_data": False, "channel_def": {"0": "lesion present"}})
    return {
        "version": "0.1.0",
        "changelog": {"0.1.0": f"exported from the Deep-Rad catalogue network {name}"},
        "monai_version": monai.__version__,
        "pytorch_version": torch.__version__.split("+")[0],
        "numpy_version": np.__version__,
        "task": f"Lesion {task} (Deep-Rad {name})",
        "description": MODELS[name],
        "authorship": "Deep-Rad",
        "network_data_format": {
            "inputs": {"image": {
                "type": "image", "format": "magnitude", "modality": "MR",
                "num_channels": in_channels, "spatial_shape": spatial, "dtype": "float32",
                "value_range": [0, 1], "is_patch_data": False,
                "channel_def": {str(i): f"sequence {i}" for i in range(in_channels)}}},
            "outputs": {"pred": output},
        },
    }


def _inference(network_def: dict[str, Any], task: str) -> dict[str, Any]:
    config: dict[str, Any] = {
        "network_def": network_def,
        "preprocessing": {"_target_": "Compose", "transforms": [
            {"_target_": "EnsureTyped", "keys": "image"},
            {"_target_": "ScaleIntensityd", "keys": "image", "minv": 0.0, "maxv": 1.0}]},
        "postprocessing": {"_target_": "Compose", "transforms": [
            {"_target_": "Activationsd", "keys": "pred", "sigmoid": True},
            {"_target_": "AsDiscreted", "keys": "pred", "threshold": 0.5}]},
    }
    if task == "segmentation":
        config["inferer"] = {"_target_": "SlidingWindowInferer", "roi_size": _SPATIAL[task],
                             "sw_batch_size": 2, "overlap": 0.25}
    return config


def export_bundle(spec: ModelSpec, folder: str | Path, *,
                  weights: Mapping[str, torch.Tensor] | None = None, seed: int = 0) -> Bundle:
    """Write catalogue network `spec` (or a task's network, `TASK_NETWORKS`) as a bundle folder
    (weights: the given ones, else the network's initialisation under `seed`) and return it,
    verified."""
    if spec.name in TASK_NETWORKS and not spec.kwargs:
        spec = TASK_NETWORKS[spec.name]
    if spec.name not in MODELS:
        raise ConfigError(f"export: {spec.name!r} is neither a catalogue network "
                          f"({', '.join(MODELS)}) nor a task ({', '.join(TASK_NETWORKS)})")
    from deeprad.core.models import build_model

    kwargs = dict(spec.kwargs)
    in_channels = int(kwargs.pop("in_channels", 1))
    task = MODEL_TASKS[spec.name]
    torch.manual_seed(seed)
    reference = build_model(spec.model_copy(update={"task": task}))
    network_def = _network_def(spec.name, in_channels, 1, kwargs)
    built = instantiate(network_def, "network_def")
    shapes = {k: tuple(v.shape) for k, v in reference.state_dict().items()}
    if {k: tuple(v.shape) for k, v in built.state_dict().items()} != shapes:
        raise RuntimeError(f"export {spec.name}: network_def {network_def['_target_']} does "
                           "not build the catalogue's network; update _network_def")
    root = Path(folder)
    if root.exists() and any(root.iterdir()):
        raise ConfigError(f"export: {root} exists and is not empty; choose a new folder")
    (root / "configs").mkdir(parents=True, exist_ok=True)
    (root / "models").mkdir(exist_ok=True)
    (root / "docs").mkdir(exist_ok=True)
    _write_json(root / METADATA, _metadata(spec.name, task, in_channels, 1))
    _write_json(root / INFERENCE, _inference(network_def, task))
    if weights is not None:
        reference.load_state_dict(dict(weights))
    safetensors.torch.save_file(bundle_weights(reference), str(root / WEIGHTS))
    origin = "given weights" if weights is not None else \
        f"the network's initialisation with seed {seed} (untrained)"
    (root / "docs" / "README.md").write_text(
        f"# {spec.name} ({task})\n\n{MODELS[spec.name]}.\n\nExported by `deeprad bundle "
        f"export` from the Deep-Rad catalogue network `{spec.name}` with kwargs "
        f"`{json.dumps(spec.kwargs, sort_keys=True)}`; weights: {origin}.\n\nDeep-Rad builds "
        "the network from `configs/inference.json` `network_def` only (allowlisted targets); "
        "preprocessing, postprocessing and inferer document what the network expects.\n")
    bundle = read_bundle(root)
    verify_bundle(bundle)
    return bundle


def _write_json(path: Path, value: Any) -> None:
    path.write_text(json.dumps(value, indent=2, sort_keys=True) + "\n")


__all__ = [
    "BUNDLE_MODEL",
    "TASK_NETWORKS",
    "build_bundle_model",
    "bundle_weights",
    "catalogue_network",
    "export_bundle",
    "instantiate",
    "load_weights",
    "network_from_bundle",
]

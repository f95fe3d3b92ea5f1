"""The networks a study can name: name and one-line summary. No torch here: the operator's API
and `deeprad models` read it; `deeprad.core.models` builds each one (and checks at import that it
builds exactly these).

A model's identity is its digest (`model_digest`): what a hospital's site policy allows
(`policy.models`), what the hub signs into every checkpoint's payload (`checkpoint.py`, so the
signature covers which network the weights are for) and what each audit record names. Model
packages fit the same three places: a MONAI bundle (`deeprad.core.bundle`, `deeprad bundle`) is
code, since its config instantiates `_target_` callables, so a study names it by the sha256 of
its content (`ModelSpec(name="bundle", kwargs={"digest": "sha256:..."})`), never a catalogue
name or an import path. `build_model` checks the local copy against that digest and
instantiates only allowlisted MONAI classes; it runs only where a site policy lists that
digest (a bundle digest hashes a SHA256SUMS listing, a model digest a JSON object, so one
`sha256:` list holds both without ambiguity); the checkpoint and audit records carry
`model_digest("bundle", kwargs)`, which binds the bundle digest.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from typing import Any

from deeprad.core.signing import canonical_json

MODELS: dict[str, str] = {
    "tumor-cnn": "small 2D max-pooling CNN (23.6k params); the CPU demo",
    "tumor-jet": "fixed Gaussian-jet filters + 209 trained params; for DP-SGD on the 2D "
                 "phantoms only (its filters match the phantom generator's lesion sizes)",
    "densenet121": "MONAI DenseNet121, GroupNorm (6.9M params); GPUs",
    "resnet18": "MONAI ResNet-18, GroupNorm (11.2M params); GPUs",
    "unet3d": "MONAI 3D UNet, instance norm; lesion segmentation of multi-sequence volumes "
              "(also with DP-SGD)",
    "segresnet3d": "MONAI 3D SegResNet, GroupNorm; lesion segmentation (larger volumes, GPUs; "
                   "no DP-SGD)",
    "dynunet3d": "MONAI 3D DynUNet (nnU-Net style), instance norm; lesion segmentation "
                 "(no DP-SGD)",
}
MODEL_NAMES: tuple[str, ...] = tuple(MODELS)
# The task each catalogue network is built for (protocol.TaskKind).
MODEL_TASKS: dict[str, str] = {
    "tumor-cnn": "classification",
    "tumor-jet": "classification",
    "densenet121": "classification",
    "resnet18": "classification",
    "unet3d": "segmentation",
    "segresnet3d": "segmentation",
    "dynunet3d": "segmentation",
}


def model_digest(name: str, kwargs: Mapping[str, Any]) -> str:
    """`sha256:<hex>` of the canonical JSON {name, kwargs}: one network with exactly these
    arguments, as site policies allow it and audit records name it."""
    body = canonical_json({"name": name, "kwargs": dict(kwargs)})
    return f"sha256:{hashlib.sha256(body).hexdigest()}"

"""The networks a study can name: name and one-line summary. No torch here: the operator's API
and `deeprad models` read it; `deeprad.core.models` builds each one (and checks at import that it
builds exactly these).

A model's identity is its digest (`model_digest`): what a hospital's site policy allows
(`policy.models`), what the hub signs into every checkpoint's payload (`checkpoint.py`, so the
signature covers which network the weights are for) and what each audit record names. Model
packages are to fit the same three places (not built yet; MONAI bundles arrive with the
workloads issue): a bundle is code, since its config instantiates `_target_` callables, so it
will be named by the sha256 of its content rather than a catalogue name, checked against that
digest where it is fetched, run only where a site policy lists the digest, and never resolved
from an import path in the API.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from typing import Any

from deeprad.core.signing import canonical_json

MODELS: dict[str, str] = {
    "tumor-cnn": "small 2D max-pooling CNN (23.6k params); the CPU demo",
    "tumor-jet": "fixed Gaussian-jet filters + 209 trained params; for DP-SGD",
    "densenet121": "MONAI DenseNet121, GroupNorm (6.9M params); GPUs",
    "resnet18": "MONAI ResNet-18, GroupNorm (11.2M params); GPUs",
}
MODEL_NAMES: tuple[str, ...] = tuple(MODELS)


def model_digest(name: str, kwargs: Mapping[str, Any]) -> str:
    """`sha256:<hex>` of the canonical JSON {name, kwargs}: one network with exactly these
    arguments, as site policies allow it and audit records name it."""
    body = canonical_json({"name": name, "kwargs": dict(kwargs)})
    return f"sha256:{hashlib.sha256(body).hexdigest()}"

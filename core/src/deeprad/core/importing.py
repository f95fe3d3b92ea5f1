"""Bring-your-own code by import path `package.module:attribute`."""

from __future__ import annotations

import importlib
from typing import Any

from deeprad.core.errors import ConfigError


def is_import_path(name: str) -> bool:
    """True for `package.module:attribute` strings."""
    return ":" in name


def load_object(path: str, what: str) -> Any:
    """Import `package.module:attribute`; errors say which `what` (model, dataset) failed."""
    module_name, _, attr = path.partition(":")
    if not module_name or not attr:
        raise ConfigError(f"{what} {path!r}: expected 'package.module:attribute'")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ConfigError(f"{what} {path!r}: cannot import {module_name!r}: {exc}") from exc
    try:
        obj = module
        for part in attr.split("."):
            obj = getattr(obj, part)
    except AttributeError:
        raise ConfigError(f"{what} {path!r}: module {module_name!r} has no {attr!r}") from None
    if not callable(obj):
        raise ConfigError(f"{what} {path!r}: {attr!r} is not callable")
    return obj

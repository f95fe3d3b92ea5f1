"""Container image references: the one rule for every image Deep-Rad runs.

A reference is `[registry[:port]/]path[:tag][@sha256:<64 hex digits>]`, the grammar of
distribution/reference restricted to sha256 digests. The site agent's configuration
(`training.image`), the hub's `--job-image` and both charts' values schemas check it; the charts
split a reference into `repository`, `tag` and `digest` and carry `CHART_IMAGE_PATTERNS`
(tests/unit/test_image_references.py checks that they do). A reference with a digest is used
exactly as given: the runtime pulls that digest whatever the tag says.

The patterns use only what Python's `re`, Rust's `regex` (pydantic) and Go's RE2 (Helm's JSON
schema) read alike, and ASCII classes only (Python's `\\w` would accept any letter).
"""

from __future__ import annotations

import re
from typing import Annotated

from pydantic import AfterValidator

_DOMAIN_COMPONENT = r"(?:[a-zA-Z0-9]|[a-zA-Z0-9][a-zA-Z0-9-]*[a-zA-Z0-9])"
_DOMAIN = rf"{_DOMAIN_COMPONENT}(?:\.{_DOMAIN_COMPONENT})*(?::[0-9]+)?"
_PATH_COMPONENT = r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*"
REPOSITORY = rf"(?:{_DOMAIN}/)?{_PATH_COMPONENT}(?:/{_PATH_COMPONENT})*"
TAG = r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}"
DIGEST = r"sha256:[0-9a-f]{64}"
IMAGE_REFERENCE_PATTERN = rf"^{REPOSITORY}(?::{TAG})?(?:@{DIGEST})?$"
IMAGE_REFERENCE_MAX = 512  # a repository is at most 255 characters, a tag 128, a digest 71
IMAGE_REFERENCE_FORM = "[registry/]path[:tag][@sha256:<64 hex digits>]"

# The charts' `image` blocks: a repository, and a tag and a digest that may each be empty.
CHART_IMAGE_PATTERNS = {"repository": f"^{REPOSITORY}$", "tag": f"^(?:{TAG})?$",
                        "digest": f"^(?:{DIGEST})?$"}

_REFERENCE = re.compile(IMAGE_REFERENCE_PATTERN)


def image_reference_problem(value: str) -> str | None:
    """Why `value` is not an image reference, or None when it is one."""
    if len(value) > IMAGE_REFERENCE_MAX:
        return f"an image reference is at most {IMAGE_REFERENCE_MAX} characters"
    if _REFERENCE.fullmatch(value) is None:
        return (f"{value!r} is not an image reference; write {IMAGE_REFERENCE_FORM} with a "
                "lowercase path, e.g. ghcr.io/deeprad/trainer:0.1.0 or, pinned, "
                "ghcr.io/deeprad/trainer@sha256:<digest>")
    return None


def check_image_reference(value: str) -> str:
    """`value` when it is an image reference; ValueError saying what to write otherwise."""
    problem = image_reference_problem(value)
    if problem:
        raise ValueError(problem)
    return value


ImageReference = Annotated[str, AfterValidator(check_image_reference)]

__all__ = ["CHART_IMAGE_PATTERNS", "IMAGE_REFERENCE_PATTERN", "ImageReference",
           "check_image_reference", "image_reference_problem"]

"""Deterministic names of the objects the operator creates, and the name limits that make them fit.

Children are named from their parents, so a name the API server accepts must leave room for the
suffixes: a study's rounds are `<study>-r<n>`, a round's work items `<round>-<site>` (also the
name of the training Job on the site's cluster, and Job names are at most 63 characters because
they become label values), and each site gets the hub namespace `deeprad-site-<site>`.
"""

from __future__ import annotations

DNS_LABEL_PATTERN = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"
DNS_LABEL_MAX = 63

SITE_NAMESPACE_PREFIX = "deeprad-site-"
MAX_ROUNDS = 1000  # a study's spec.rounds and a round's spec.round are at most this

SITE_NAME_MAX = 24
ROUND_NAME_MAX = DNS_LABEL_MAX - 1 - SITE_NAME_MAX  # 38: `<round>-<site>` fits 63
STUDY_NAME_MAX = ROUND_NAME_MAX - len(f"-r{MAX_ROUNDS}")  # 32: `<study>-r1000` fits 38
TASK_NAME_MAX = DNS_LABEL_MAX
AGGREGATOR_SUFFIX = "-aggregate"


def site_namespace(site: str) -> str:
    """The hub namespace reserved for one site's work items."""
    return f"{SITE_NAMESPACE_PREFIX}{site}"


def round_name(study: str, round_number: int) -> str:
    """Name of a study's round `round_number` (1-based)."""
    return f"{study}-r{round_number}"


def task_name(round_: str, site: str) -> str:
    """Name of a round's work item for one site, and of that site's training Job."""
    return f"{round_}-{site}"


def aggregator_job_name(round_: str) -> str:
    """Name of a round's aggregator Job in the hub."""
    return f"{round_}{AGGREGATOR_SUFFIX}"

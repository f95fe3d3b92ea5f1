"""Deterministic names of the objects the operator creates, and the name limits that make them fit.

Children are named from their parents, so a name the API server accepts must leave room for the
suffixes: a study's rounds are `<study>-r<n>`; a round's work item for a site is
`<round>-<uid8>` in that site's hub namespace `deeprad-site-<site>` (also the name of the
training Job on the site's cluster, and Job names are at most 63 characters because they become
label values); its hub Jobs are `<round>-<uid8>-prepare` and `<round>-<uid8>-aggregate`. Rounds
of every hub namespace (and a round deleted and created again) meet in a site's namespace and in
the hub's jobs namespace: the first 8 characters of the round's uid tell them apart.
"""

from __future__ import annotations

DNS_LABEL_PATTERN = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"
DNS_LABEL_MAX = 63

SITE_NAMESPACE_PREFIX = "deeprad-site-"
MAX_ROUNDS = 1000  # a study's spec.rounds and a round's spec.round are at most this

SITE_NAME_MAX = 24
ROUND_NAME_MAX = 38  # `<round>-<uid8>-aggregate` is at most 57
STUDY_NAME_MAX = ROUND_NAME_MAX - len(f"-r{MAX_ROUNDS}")  # 32: `<study>-r1000` fits 38
TASK_NAME_MAX = DNS_LABEL_MAX
AGGREGATOR_SUFFIX = "-aggregate"
PREPARE_SUFFIX = "-prepare"
MAX_ROUND_SITES = 2048  # sites listed in one round's status
MAX_SECAGG_SITES = 256  # secure aggregation's pairwise exchange is quadratic in the roster


def site_namespace(site: str) -> str:
    """The hub namespace reserved for one site's work items."""
    return f"{SITE_NAMESPACE_PREFIX}{site}"


def round_name(study: str, round_number: int) -> str:
    """Name of a study's round `round_number` (1-based)."""
    return f"{study}-r{round_number}"


def task_name(round_: str, uid: str) -> str:
    """Name of a round's work item in each site's namespace, and of the sites' training Jobs."""
    return f"{round_}-{uid[:8]}"


def aggregator_job_name(round_: str, uid: str) -> str:
    """Name of a round's aggregator Job in the hub's jobs namespace: the round's name plus a
    piece of its uid, since rounds of every namespace (and a recreated round) share it."""
    return f"{round_}-{uid[:8]}{AGGREGATOR_SUFFIX}"


def prepare_job_name(round_: str, uid: str) -> str:
    """Name of the hub Job that writes a round's input checkpoint (fresh or imported)."""
    return f"{round_}-{uid[:8]}{PREPARE_SUFFIX}"

"""The one place that knows where objects live in the store.

Every key starts at the study's root, `<namespace>/<study>/<uid>`: `<uid>` is the Kubernetes
uid of the object that owns the study's store (the FederatedStudy, or a hand-made
FederatedRound, whose store "study" is its own name). A study deleted and re-created under the
same name gets a new uid, so it never reads (or is fed) its predecessor's objects. Runs without
a cluster (`deeprad simulate`, local tools) have no uid: their root is `<namespace>/<study>`.
Below the root (shown here without the uid):

    <namespace>/<study>/rounds/<n>/global.safetensors      model weights after round n (0: initial)
    <namespace>/<study>/rounds/<n>/global.json             its manifest (digests, lineage)
    <namespace>/<study>/rounds/<n>/strategy-state.safetensors  server-optimizer state, if any
    <namespace>/<study>/rounds/<n>/updates/<site>.bin      the site's update for round n
    <namespace>/<study>/rounds/<n>/updates/<site>.json     the update's manifest
    <namespace>/<study>/rounds/<n>/results/<site>.json     the site's non-sensitive metrics
    <namespace>/<study>/rounds/<n>/aggregate.json          what the aggregator did in round n
    <namespace>/<study>/rounds/<n>/audit/sites/<site>.json the site's signed audit record
    <namespace>/<study>/rounds/<n>/audit/hub.json          the hub's signed audit record
    <namespace>/<study>/rounds/<n>/secagg/...              secure-aggregation messages, relayed
    <namespace>/<study>/nonces.json                        accepted update nonces (replay guard)

Updates are encrypted envelopes (`deeprad.core.envelope`): the store never holds a plaintext
update. Secure-aggregation messages are signed JSON: sites write `<step>/<site>.json`, the hub
answers in `<step>.json` (to all) or `<step>/<site>.json` (to one), or writes `aborted.json`.

Round n trains from the global model of round n-1 and its aggregator writes round n's global.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from deeprad.core.errors import ConfigError

_NAME = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")


def check_name(kind: str, value: str) -> str:
    """Names become key segments and Kubernetes names: DNS-1123 labels, at most 63 characters."""
    if not _NAME.match(value) or len(value) > 63:
        raise ConfigError(
            f"{kind} name {value!r} must be a DNS-1123 label: lowercase letters, digits and '-', "
            "starting and ending with a letter or digit, at most 63 characters"
        )
    return value


@dataclass(frozen=True)
class StudyLayout:
    """Keys of one study's objects; `uid` is the owning object's Kubernetes uid (None: a run
    without a cluster)."""

    namespace: str
    study: str
    uid: str | None = None

    def __post_init__(self) -> None:
        check_name("namespace", self.namespace)
        check_name("study", self.study)
        if self.uid is not None:
            check_name("uid", self.uid)

    @property
    def root(self) -> str:
        base = f"{self.namespace}/{self.study}"
        return f"{base}/{self.uid}" if self.uid else base

    def round_prefix(self, round_no: int) -> str:
        if round_no < 0:
            raise ConfigError(f"round number must be >= 0, got {round_no}")
        return f"{self.root}/rounds/{round_no}"

    def global_weights(self, round_no: int) -> str:
        return f"{self.round_prefix(round_no)}/global.safetensors"

    def global_manifest(self, round_no: int) -> str:
        return f"{self.round_prefix(round_no)}/global.json"

    def strategy_state(self, round_no: int) -> str:
        return f"{self.round_prefix(round_no)}/strategy-state.safetensors"

    def updates_prefix(self, round_no: int) -> str:
        return f"{self.round_prefix(round_no)}/updates/"

    def update_payload(self, round_no: int, site: str) -> str:
        return f"{self.updates_prefix(round_no)}{check_name('site', site)}.bin"

    def update_manifest(self, round_no: int, site: str) -> str:
        return f"{self.updates_prefix(round_no)}{check_name('site', site)}.json"

    def result(self, round_no: int, site: str) -> str:
        return f"{self.round_prefix(round_no)}/results/{check_name('site', site)}.json"

    def aggregate(self, round_no: int) -> str:
        return f"{self.round_prefix(round_no)}/aggregate.json"

    def site_audits_prefix(self, round_no: int) -> str:
        """Round n's site audit records (`deeprad.core.audit`), under their own folder so that
        no site name can reach the hub's record."""
        return f"{self.round_prefix(round_no)}/audit/sites/"

    def site_audit(self, round_no: int, site: str) -> str:
        """A site's signed audit record of its task in round n."""
        return f"{self.site_audits_prefix(round_no)}{check_name('site', site)}.json"

    def hub_audit(self, round_no: int) -> str:
        """The hub's signed audit record of round n."""
        return f"{self.round_prefix(round_no)}/audit/hub.json"

    def seen_nonces(self) -> str:
        """Nonces of accepted updates, with the round that accepted each (replay protection
        across rounds)."""
        return f"{self.root}/nonces.json"

    def secagg_prefix(self, round_no: int) -> str:
        return f"{self.round_prefix(round_no)}/secagg/"

    def secagg_message(self, round_no: int, step: str, site: str | None = None) -> str:
        """A relayed secure-aggregation message: `step/site.json`, or `step.json` from the hub."""
        check_name("secure-aggregation step", step)
        tail = f"{step}/{check_name('site', site)}.json" if site else f"{step}.json"
        return f"{self.secagg_prefix(round_no)}{tail}"

    @staticmethod
    def parse_global_weights(key: str) -> tuple[StudyLayout, int]:
        """The study (with its owner's uid, when the key has one) and round of a
        `<namespace>/<study>[/<uid>]/rounds/<n>/global.safetensors` key."""
        parts = key.split("/")
        head, tail = parts[:-3], parts[-3:]
        if (len(head) not in (2, 3) or tail[0] != "rounds" or not tail[1].isdigit()
                or tail[2] != "global.safetensors"):
            raise ConfigError(f"{key!r} is not a global checkpoint key "
                              "(<namespace>/<study>/<uid>/rounds/<n>/global.safetensors)")
        uid = head[2] if len(head) == 3 else None
        return StudyLayout(head[0], head[1], uid), int(tail[1])

    def sites_with_updates(self, keys: list[str], round_no: int) -> list[str]:
        """Site names that have an update manifest among `keys` (a store listing)."""
        prefix = self.updates_prefix(round_no)
        return sorted(
            k[len(prefix) : -len(".json")]
            for k in keys
            if k.startswith(prefix) and k.endswith(".json")
        )

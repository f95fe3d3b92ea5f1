"""The one place that knows where objects live in the store.

    <namespace>/<study>/rounds/<n>/global.safetensors      model weights after round n (0: initial)
    <namespace>/<study>/rounds/<n>/global.json             its manifest (digests, lineage)
    <namespace>/<study>/rounds/<n>/strategy-state.safetensors  server-optimizer state, if any
    <namespace>/<study>/rounds/<n>/updates/<site>.bin      the site's update for round n
    <namespace>/<study>/rounds/<n>/updates/<site>.json     the update's manifest
    <namespace>/<study>/rounds/<n>/results/<site>.json     the site's non-sensitive metrics
    <namespace>/<study>/rounds/<n>/aggregate.json          what the aggregator did in round n
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
    """Keys of one study's objects."""

    namespace: str
    study: str

    def __post_init__(self) -> None:
        check_name("namespace", self.namespace)
        check_name("study", self.study)

    @property
    def root(self) -> str:
        return f"{self.namespace}/{self.study}"

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
        """The study and round of a `<namespace>/<study>/rounds/<n>/global.safetensors` key."""
        parts = key.split("/")
        if (len(parts) != 5 or parts[2] != "rounds" or not parts[3].isdigit()
                or parts[4] != "global.safetensors"):
            raise ConfigError(f"{key!r} is not a global checkpoint key "
                              "(<namespace>/<study>/rounds/<n>/global.safetensors)")
        return StudyLayout(parts[0], parts[1]), int(parts[3])

    def sites_with_updates(self, keys: list[str], round_no: int) -> list[str]:
        """Site names that have an update manifest among `keys` (a store listing)."""
        prefix = self.updates_prefix(round_no)
        return sorted(
            k[len(prefix) : -len(".json")]
            for k in keys
            if k.startswith(prefix) and k.endswith(".json")
        )

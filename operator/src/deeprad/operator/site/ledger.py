"""The site's own privacy ledger: the DP-SGD runs each study did on this hospital's data.

The hospital does not take the hub's word for how much ε a study spent here: the agent records
the steps every Succeeded DP task's trainer reported, in a ConfigMap in the training namespace
(one data key per hub namespace and study, a JSON list of `LedgerEntry`), and checks the
study's total against `policy.maxEpsilonPerStudy` before it starts the next task. Entries are
keyed by the task's uid, so an agent restarted between writing the ledger and reporting the
task never counts a run twice. Pure functions: `site.observe` reads the ConfigMap, `site.agent`
writes what `with_entry` returns (create, or replace at the resourceVersion it read).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from deeprad.core.privacy import DPSteps
from deeprad.core.site_policy import LedgerEntry, ledger_json, parse_ledger
from deeprad.operator.render.meta import Manifest

LEDGER_CONFIGMAP = "deeprad-privacy-ledger"


def ledger_key(namespace: str, study: str) -> str:
    """The ConfigMap data key of a study: `<hub namespace>_<study>` (`_` is in neither name,
    so no two studies share a key)."""
    return f"{namespace}_{study}"


@dataclass(frozen=True)
class Ledger:
    """Every study's recorded runs at this site, by data key."""

    studies: Mapping[str, tuple[LedgerEntry, ...]] = field(default_factory=dict)

    def runs(self, namespace: str, study: str) -> tuple[LedgerEntry, ...]:
        """The study's recorded runs."""
        return self.studies.get(ledger_key(namespace, study), ())

    def steps(self, namespace: str, study: str) -> list[DPSteps]:
        """The study's recorded DP-SGD steps, for the accountant."""
        return [e.steps for e in self.runs(namespace, study)]

    def has(self, namespace: str, study: str, task_uid: str) -> bool:
        """Whether the task's run is recorded already."""
        return any(e.task == task_uid for e in self.runs(namespace, study))


def read_ledger(configmap: Manifest | None, where: str) -> Ledger:
    """The ledger in the ConfigMap (None: nothing recorded yet); ConfigError naming the key
    when an entry is malformed, so no study trains on a ledger nobody can read."""
    data = (configmap or {}).get("data") or {}
    return Ledger({key: tuple(parse_ledger(text, f"{where} key {key}"))
                   for key, text in sorted(data.items())})


def with_entry(configmap: Manifest | None, namespace: str, key: str, entry: LedgerEntry
               ) -> Manifest:
    """The ConfigMap to write: `configmap` (None: a new one in `namespace`) with `entry` added
    under `key` (an entry of the same task replaces itself). The read resourceVersion is kept,
    so a concurrent writer makes the replace fail (409) instead of losing a run."""
    if configmap is None:
        body: Manifest = {"apiVersion": "v1", "kind": "ConfigMap",
                          "metadata": {"name": LEDGER_CONFIGMAP, "namespace": namespace,
                                       "labels": {"app.kubernetes.io/part-of": "deeprad",
                                                  "app.kubernetes.io/component": "site-agent"}},
                          "data": {}}
    else:
        body = {**configmap, "data": dict(configmap.get("data") or {})}
    where = f"ConfigMap {namespace}/{LEDGER_CONFIGMAP} key {key}"
    old = body["data"].get(key)
    entries = parse_ledger(old, where) if old else []
    merged = {e.task: e for e in entries}
    merged[entry.task] = entry
    body["data"][key] = ledger_json(list(merged.values()))
    return body


__all__ = ["LEDGER_CONFIGMAP", "Ledger", "ledger_key", "read_ledger",
           "with_entry"]

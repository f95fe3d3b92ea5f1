"""The site's own privacy ledger: the DP-SGD runs each study did on this hospital's data.

The hospital does not take the hub's word for how much ε a study spent here. The agent keeps a
ConfigMap in the training namespace (one data key per hub namespace and study, a JSON list of
`LedgerEntry`, each naming the dataset it trained on). Before it creates a DP task's Job it
records a *reservation*, the run's planned upper bound; when the task succeeds the trainer's
reported steps replace it; when the run fails (or crashes after training) the reservation stays,
as spent. A study's runs are checked against `policy.maxEpsilonPerStudy` and every run on the
dataset — all studies, all hubs whose agents share this training namespace — against
`policy.maxEpsilonPerDataset` before the next task starts.

Entries are keyed by the task's uid, so an agent restarted between any two steps (reservation,
Job, report) replaces its own entry instead of adding one, and never loses one: every write is
a create, or a replace at the resourceVersion read (a concurrent writer's 409 fails the pass,
which retries). Two hubs' studies of the same namespace and name share a key; they are
distinct entries (task uids) and the per-study rule then counts both, which errs on the safe
side. Pure functions: `site.observe` reads the ConfigMap, `site.agent` writes what
`with_entry` returns.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from deeprad.core.privacy import DPSteps
from deeprad.core.site_policy import LedgerEntry, dataset_steps, ledger_json, parse_ledger
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
        """Whether the task's run is recorded already (reserved or reported)."""
        return self.entry(namespace, study, task_uid) is not None

    def entry(self, namespace: str, study: str, task_uid: str) -> LedgerEntry | None:
        """The task's recorded run, None before its reservation."""
        return next((e for e in self.runs(namespace, study) if e.task == task_uid), None)

    def others(self, namespace: str, study: str, task_uid: str) -> tuple[LedgerEntry, ...]:
        """The study's runs but the task's own (its reservation is replaced, never added to)."""
        return tuple(e for e in self.runs(namespace, study) if e.task != task_uid)

    def entries(self) -> list[LedgerEntry]:
        """Every recorded run at this site, each once."""
        return list({e.task: e for runs in self.studies.values() for e in runs}.values())

    def dataset(self, dataset: str, task_uid: str = "") -> list[DPSteps]:
        """The steps of every run on `dataset`, of every study and hub, but `task_uid`'s."""
        return dataset_steps([e for e in self.entries() if e.task != task_uid], dataset)


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


__all__ = ["LEDGER_CONFIGMAP", "Ledger", "ledger_key", "read_ledger", "with_entry"]

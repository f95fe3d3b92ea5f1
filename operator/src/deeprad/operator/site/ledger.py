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
which retries). A reservation is checked against the ceilings again on the very ledger its
write is based on (`site.decide.check_reservation`), so two tasks of one pass, or two agents
sharing the dataset, cannot together pass a ceiling each alone fits under.

The ConfigMap (1 MiB at most) would fill after some thousands of runs and then block every DP
task, so every write compacts the study's key (`compacted`): a study's older reported runs on
one dataset with the same noise multiplier and sample rate become one entry whose steps (and
`runs`) add up, which composes to exactly the same ε. What a restarted agent needs to never
count a run twice is kept whole: every reservation (its report replaces it by task uid) and
the newest `RECENT_REPORTS` reports of the key. A report's uid is looked up only until its
task is reported Succeeded on the hub, which the agent does in the same pass it writes the
report (the next one if that patch fails); a written entry moves to the end of its key, so
it stays whole until RECENT_REPORTS newer runs of the same study were recorded here, each of
a later round. Were that ever outrun, the run would be counted twice: more ε, never less.

Two hubs' studies of the same namespace and name share a key; they are distinct entries (task
uids) and the per-study rule then counts both, which errs on the safe side. Pure functions:
`site.observe` reads the ConfigMap, `site.agent` writes what `with_entry` returns.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from deeprad.core.privacy import DPSteps
from deeprad.core.site_policy import LedgerEntry, dataset_steps, ledger_json, parse_ledger
from deeprad.operator.render.meta import Manifest

LEDGER_CONFIGMAP = "deeprad-privacy-ledger"
# Reports of a study kept whole (with their task uids) by compaction: see the module docstring.
RECENT_REPORTS = 8
COMPACTED_PREFIX = "compacted-"  # task "uid" of a compacted entry (real uids are UUIDs)


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

    def recorded(self, key: str, entry: LedgerEntry) -> Ledger:
        """This ledger with `entry` written under `key`, as `with_entry` writes it: what the
        next task of the same pass is decided on."""
        runs = _written(key, self.studies.get(key, ()), entry)
        return Ledger({**self.studies, key: tuple(runs)})


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
    body["data"][key] = ledger_json(_written(key, parse_ledger(old, where) if old else [], entry))
    return body


def _written(key: str, entries: Sequence[LedgerEntry], entry: LedgerEntry
             ) -> list[LedgerEntry]:
    """A key's entries after writing `entry`: its earlier entry of the same task dropped, it
    appended (the newest), the whole compacted."""
    return compacted(key, [*(e for e in entries if e.task != entry.task), entry])


def compacted(key: str, entries: Sequence[LedgerEntry]) -> list[LedgerEntry]:
    """One study's entries (data key `key`, oldest first) in fewer: reservations and the newest
    RECENT_REPORTS reports stay as they are; older reports with the same dataset, noise
    multiplier and sample rate merge into one entry (steps and runs add up, the latest round
    is kept), which composes to exactly the same ε. Merged entries come first."""
    reports = [i for i, e in enumerate(entries) if not e.reserved]
    old = set(reports[:-RECENT_REPORTS]) if len(reports) > RECENT_REPORTS else set()
    groups: dict[tuple[str | None, float, float], list[LedgerEntry]] = {}
    for i in sorted(old):
        e = entries[i]
        groups.setdefault((e.dataset, e.steps.noise_multiplier, e.steps.sample_rate),
                          []).append(e)
    merged = [_merge(key, mechanism, runs) for mechanism, runs in sorted(
        groups.items(), key=lambda item: (item[0][0] or "", item[0][1], item[0][2]))]
    return [*merged, *(e for i, e in enumerate(entries) if i not in old)]


def _merge(key: str, mechanism: tuple[str | None, float, float], runs: list[LedgerEntry]
           ) -> LedgerEntry:
    """Runs of one mechanism as one entry, under a task name derived from the study and the
    mechanism (unique in the whole ledger), so later merges of the same mechanism fold into
    it."""
    if len(runs) == 1:
        return runs[0]
    dataset = mechanism[0]
    name = hashlib.sha256(repr((key, mechanism)).encode()).hexdigest()[:32]
    first = runs[0].steps
    return LedgerEntry(task=COMPACTED_PREFIX + name, round=max(r.round for r in runs),
                       dataset=dataset, runs=sum(r.runs for r in runs),
                       steps=first.model_copy(update={"steps": sum(r.steps.steps
                                                                   for r in runs)}))


__all__ = ["COMPACTED_PREFIX", "LEDGER_CONFIGMAP", "RECENT_REPORTS", "Ledger", "compacted",
           "ledger_key", "read_ledger", "with_entry"]

"""A hospital's site policy: what a study may run on the hospital's cluster and data.

The hospital admin writes it in the site chart's values (`policy:`, rendered into the agent's
config). The site agent checks every task against it before it creates a Job, and passes it to
the trainer (`POLICY_ENV`), which checks the task again before it reads the checkpoint or the
data, and once more with the real record count before its first training step: nothing a study
author or the hub sends can widen it. The hub sees only its digest (`policy_digest`), on the
HospitalSite's status.

It lives in the core because both the operator (agent) and the trainer enforce it, and they
meet only here. Each refusal is one line: `PolicyViolation: policy.<rule>: <what the task
asked>, <what the policy allows>; <the fix>` (`PrivacyCeiling: ...` for the per-dataset ε
ceiling, which a study can reach without breaking any rule of its own).

The ε ceilings are enforced from the site's own ledger (`LedgerEntry`, kept by the agent): a
per-study one (`maxEpsilonPerStudy`) and a per-dataset one (`maxEpsilonPerDataset`) that composes
every run on the dataset, whatever its study or hub. Before a Job starts the agent records a
*reservation*, the run's planned upper bound (`planned_steps`); the trainer refuses a run the
reservation does not bound at every order of the RDP accountant (`check_reserved`), so a run
that crashes half-way is never counted below what it spent, alone or composed with later runs.
The round's secure-aggregation threshold is checked against the site's own threat model
(`secureAggregationThreatModel`), since the party it guards against is the one that sets it.
"""

from __future__ import annotations

import fnmatch
import functools
import hashlib
import json
import math
import re
from collections.abc import Sequence

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from pydantic.alias_generators import to_camel

from deeprad.core.bundle import BUNDLE_MODEL
from deeprad.core.errors import ConfigError, PolicyViolation, field_problems
from deeprad.core.model_catalogue import MODEL_NAMES, model_digest
from deeprad.core.privacy import DPSteps, epsilon_of, make_accountant, merge_runs, round_steps
from deeprad.core.protocol import TrainingTask
from deeprad.core.secagg.threat import DEFAULT_THREAT_MODEL, ThreatModel, threshold_for
from deeprad.core.signing import canonical_json

# What the site agent hands its trainer Job: the policy (JSON, camelCase), the trainer image it
# configured, this study's privacy ledger at the site (JSON list of LedgerEntry), every run on
# the dataset (JSON list of DPSteps, compacted) — both without the run itself — and the
# reservation recorded for the run (one LedgerEntry): the trainer may not spend more than that.
POLICY_ENV = "DEEPRAD_SITE_POLICY"
TRAINER_IMAGE_ENV = "DEEPRAD_TRAINER_IMAGE"
LEDGER_ENV = "DEEPRAD_PRIVACY_LEDGER"
DATASET_LEDGER_ENV = "DEEPRAD_DATASET_LEDGER"
RESERVATION_ENV = "DEEPRAD_PRIVACY_RESERVATION"

DEFAULT_DELTA = 1e-5
DIGEST_PATTERN = re.compile(r"^sha256:[0-9a-f]{64}$")
# A dataset's name in the ledger: a DNS-style label (a PVC's name fits).
DATASET_PATTERN = r"^[a-z0-9]([-a-z0-9._]{0,251}[a-z0-9])?$"
# "<namespace>/<study>", each side a DNS name in which `*` stands for any run of characters.
STUDY_PATTERN = re.compile(r"^[a-z0-9*][-a-z0-9.*]*/[a-z0-9*][-a-z0-9.*]*$")
_SHOWN = 6  # allowed entries quoted in a refusal
# Batches per epoch a run of unknown size is planned to bound: ε peaks below this for noise
# multipliers from 0.5 up (at 2-4 batches); a larger run the plan does not bound is refused by
# the trainer's check (set training.datasetRecords).
WORST_CASE_BATCHES = 16


class PrivacyCeiling(PolicyViolation):
    """A task that would take a dataset's ε past the site's `maxEpsilonPerDataset`, or a run
    that would spend more than the site agent reserved for it."""


class LedgerEntry(BaseModel):
    """One DP training run of a study at this site: the task (its uid, so a restarted agent
    never counts a run twice), its round, the dataset it trained on and its DP-SGD steps:
    `reserved` while they are the planned upper bound recorded before the Job started (kept as
    spent when the run fails), the trainer's report once it succeeded."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    task: str = Field(min_length=1, max_length=64)
    round: int = Field(ge=1)
    steps: DPSteps
    # None: recorded before the site named its datasets; such a run counts against every one.
    dataset: str | None = Field(default=None, pattern=DATASET_PATTERN)
    reserved: bool = False
    # The reported runs this entry stands for: more than one once the agent compacted older
    # runs of the study with the same dataset and DP-SGD settings (their steps add up).
    runs: int = Field(default=1, ge=1)


class SitePolicy(BaseModel):
    """What this site lets a study do. Every default allows what an unconfigured site always
    allowed, except that models are limited to the built-in catalogue."""

    model_config = ConfigDict(alias_generator=to_camel, validate_by_name=True,
                              validate_by_alias=True, serialize_by_alias=True, extra="forbid",
                              frozen=True)

    studies: list[str] = Field(
        default_factory=lambda: ["*/*"], max_length=256,
        description='Studies allowed to train here, "<hub namespace>/<study>" with `*` as a '
                    'wildcard, e.g. "oncology/*"; empty: none.')
    models: list[str] = Field(
        default_factory=lambda: list(MODEL_NAMES), max_length=256,
        description="Allowed models: a catalogue name allows that network with any kwargs; "
                    "sha256:<64 hex> allows exactly one network: a model digest (`deeprad "
                    "models --digest`) one catalogue network with exactly its kwargs, a bundle "
                    "digest (`deeprad bundle verify`) one MONAI bundle with exactly its "
                    "content.")
    max_local_epochs: int | None = Field(
        default=None, ge=1, description="Largest localEpochs a round may ask for; unset: any.")
    require_differential_privacy: bool = Field(
        default=False, description="Refuse tasks that train without DP-SGD (or with a noise "
                                   "multiplier of 0).")
    max_epsilon_per_study: float | None = Field(
        default=None, gt=0, description="Largest ε (at `delta`) one study may spend on this "
                                        "site's data over all its rounds; implies DP is "
                                        "required.")
    max_epsilon_per_dataset: float | None = Field(
        default=None, gt=0, description="Largest ε (at `delta`) all studies together, from "
                                        "every hub, may spend on this site's dataset; implies "
                                        "DP is required.")
    delta: float = Field(default=DEFAULT_DELTA, gt=0, lt=1,
                         description="δ at which maxEpsilonPerStudy and maxEpsilonPerDataset "
                                     "are accounted (RDP).")
    require_secure_aggregation: bool = Field(
        default=False, description="Refuse tasks whose round does not use secure aggregation.")
    secure_aggregation_threat_model: ThreatModel = Field(
        default=DEFAULT_THREAT_MODEL,
        description="The hub this site's masked updates must withstand: semi-honest accepts "
                    "a round threshold t >= floor(n/2)+1, malicious requires t >= "
                    "floor(2n/3)+1 (n: the round's roster). The study author picks the round's "
                    "threshold; this is the site's floor under it.")

    @field_validator("studies")
    @classmethod
    def _studies(cls, patterns: list[str]) -> list[str]:
        for i, pattern in enumerate(patterns):
            if not STUDY_PATTERN.match(pattern):
                raise ValueError(f"studies[{i}] {pattern!r} is not <namespace>/<study> (lowercase "
                                 "DNS names, `*` as a wildcard), e.g. oncology/* or */*")
        return patterns

    @field_validator("models")
    @classmethod
    def _models(cls, entries: list[str]) -> list[str]:
        for i, entry in enumerate(entries):
            if entry not in MODEL_NAMES and not DIGEST_PATTERN.match(entry):
                raise ValueError(f"models[{i}] {entry!r} is neither a catalogue network "
                                 f"({', '.join(MODEL_NAMES)}) nor a model digest "
                                 "sha256:<64 lowercase hex>")
        return entries

    # ---- the rules ----------------------------------------------------------------------------

    def check(self, task: TrainingTask, *, spent: Sequence[DPSteps] = (),
              records: int | None = None) -> None:
        """Refuse `task` (PolicyViolation, one line) unless every rule allows it. `spent`: the
        study's earlier DP runs at this site; `records`: the real training record count, known
        once the trainer opened the data, which makes the planned run's ε exact."""
        where = f"study {task.namespace}/{task.study} round {task.round}"
        self._check_study(task, where)
        self._check_model(task, where)
        if self.max_local_epochs is not None and task.train.local_epochs > self.max_local_epochs:
            raise _violation("maxLocalEpochs", f"{where} asks for {task.train.local_epochs} "
                             "local epochs", f"this site allows at most {self.max_local_epochs}",
                             "lower the round's training.localEpochs (study author) or raise "
                             "policy.maxLocalEpochs (hospital admin)")
        self._check_dp(task, where)
        if self.require_secure_aggregation and task.secagg is None:
            raise _violation("requireSecureAggregation", f"{where} trains without secure "
                             "aggregation", "this site sends updates only masked for secure "
                             "aggregation", "set privacy.secureAggregation: true in the study "
                             "(study author) or set policy.requireSecureAggregation: false "
                             "(hospital admin)")
        self._check_threshold(task, where)
        self.check_epsilon(task, spent, records)

    def _check_threshold(self, task: TrainingTask, where: str) -> None:
        """The round's secure-aggregation threshold against the site's threat model: the
        threshold is chosen by the study author and sent by the hub, the very party a
        malicious threat model protects against, so the site holds its own floor."""
        if task.secagg is None:
            return
        n = len(task.secagg.roster)
        asked = task.secagg.threshold or threshold_for(n)
        needed = threshold_for(n, self.secure_aggregation_threat_model)
        if asked >= needed:
            return
        raise _violation(
            "secureAggregationThreatModel", f"{where} uses secure aggregation with threshold "
            f"t={asked} of n={n} sites", f"this site's threat model "
            f"{self.secure_aggregation_threat_model} needs t >= {needed} of {n}",
            "set privacy.secureAggregationThreatModel: "
            f"{self.secure_aggregation_threat_model} in the study (study author) or lower "
            "policy.secureAggregationThreatModel (hospital admin)")

    def _check_bundle(self, digest: object, where: str) -> None:
        """A bundle runs only where its content digest is listed: a catalogue name never allows
        one, nor does the model digest of the spec that names it (see `deeprad.core.bundle`)."""
        if isinstance(digest, str) and DIGEST_PATTERN.match(digest) and digest in self.models:
            return
        raise _violation("models", f"{where} asks for MONAI bundle {digest!r}",
                         f"this site allows {_listed(self.models)}",
                         "use an allowed model (study author) or review the bundle "
                         "(`deeprad bundle inspect`) and add its digest (`deeprad bundle "
                         "verify` prints it) to policy.models (hospital admin)")

    def _check_study(self, task: TrainingTask, where: str) -> None:
        if not any(_study_matches(p, task.namespace, task.study) for p in self.studies):
            raise _violation("studies", f"{where} is from hub namespace {task.namespace}",
                             f"this site allows {_listed(self.studies)}",
                             f"add {task.namespace}/{task.study} (or {task.namespace}/*) to "
                             "policy.studies (hospital admin); a study author cannot")

    def _check_model(self, task: TrainingTask, where: str) -> None:
        name, kwargs = task.model.name, dict(task.model.kwargs)
        if name == BUNDLE_MODEL:
            self._check_bundle(kwargs.get("digest"), where)
            return
        if name in self.models:
            return
        digest = model_digest(name, kwargs)
        if digest in self.models:
            return
        asked = f"{where} asks for model {name}"
        if kwargs:
            shown = json.dumps(kwargs, sort_keys=True, default=str)
            asked += f" with kwargs {shown[:160]}{'…' if len(shown) > 160 else ''}"
        raise _violation("models", f"{asked} (digest {digest})",
                         f"this site allows {_listed(self.models)}",
                         "use an allowed model (study author) or add this digest to "
                         "policy.models after reviewing it (hospital admin)")

    def _check_dp(self, task: TrainingTask, where: str) -> None:
        if self.require_differential_privacy:
            rule, allows = "requireDifferentialPrivacy", "this site requires DP-SGD"
        elif self.max_epsilon_per_study is not None:
            rule, allows = "maxEpsilonPerStudy", (
                f"this site caps ε per study at {self.max_epsilon_per_study:g} "
                f"(δ={self.delta:g}), which needs DP-SGD")
        elif self.max_epsilon_per_dataset is not None:
            rule, allows = "maxEpsilonPerDataset", (
                f"this site caps ε per dataset at {self.max_epsilon_per_dataset:g} "
                f"(δ={self.delta:g}), which needs DP-SGD")
        else:
            return
        fix = ("set privacy.differentialPrivacy with a noiseMultiplier > 0 in the study (study "
               "author)")
        if task.privacy is None:
            raise _violation(rule, f"{where} trains without differential privacy", allows, fix)
        if task.privacy.noise_multiplier <= 0:
            raise _violation(rule, f"{where} asks for DP-SGD with noise multiplier 0 (no "
                             "privacy)", allows, fix)

    def check_epsilon(self, task: TrainingTask, spent: Sequence[DPSteps],
                      records: int | None = None) -> None:
        """The per-study ε ceiling: refuse when the study's earlier runs at this site already
        reached it, or (with `records`) when this run would take it past the ceiling."""
        ceiling = self.max_epsilon_per_study
        if ceiling is None:
            return
        where = f"study {task.namespace}/{task.study} round {task.round}"
        before = epsilon_of(list(spent), self.delta)
        if before >= ceiling:
            raise _violation("maxEpsilonPerStudy", f"{where}: the study already spent "
                             f"ε={before:.4g} (δ={self.delta:g}) on this site's data in "
                             f"{len(spent)} run(s)", f"this site allows at most ε={ceiling:.4g} "
                             "per study", "the study cannot train here any more; only the "
                             "hospital admin can raise policy.maxEpsilonPerStudy")
        if records is None or task.privacy is None:
            return
        planned = round_steps(records, batch_size=task.train.batch_size,
                              local_epochs=task.train.local_epochs,
                              noise_multiplier=task.privacy.noise_multiplier)
        after = epsilon_of([*spent, planned], self.delta)
        if after > ceiling:
            raise _violation(
                "maxEpsilonPerStudy", f"{where} would raise the study's ε on this site's data "
                f"from {before:.4g} to {after:.4g} (δ={self.delta:g}; {records} records, batch "
                f"{task.train.batch_size}, {task.train.local_epochs} local epochs, noise "
                f"multiplier {task.privacy.noise_multiplier:g})",
                f"this site allows at most ε={ceiling:.4g} per study",
                "raise the noise multiplier or lower localEpochs (study author), or raise "
                "policy.maxEpsilonPerStudy (hospital admin)")

    def check_dataset(self, task: TrainingTask, dataset: str, spent: Sequence[DPSteps],
                      planned: DPSteps, records: int | None = None) -> None:
        """The per-dataset ε ceiling: refuse (PrivacyCeiling) when every recorded run on
        `dataset` (all studies, all hubs) composed with this run's `planned` steps passes it.
        `records`: the record count the plan assumed (None: the worst case)."""
        ceiling = self.max_epsilon_per_dataset
        if ceiling is None:
            return
        before = epsilon_of(list(spent), self.delta)
        after = epsilon_of([*spent, planned], self.delta)
        if after <= ceiling:
            return
        where = f"study {task.namespace}/{task.study} round {task.round}"
        basis = (f"{records} training records" if records is not None else
                 "no record count known, planned above every batch count up to "
                 f"{WORST_CASE_BATCHES}")
        tail = ("" if records is not None else ", or set training.datasetRecords so the "
                "plan uses the real record count")
        raise _violation(
            "maxEpsilonPerDataset", f"{where} would take dataset {dataset} from ε={before:.4g} "
            f"({len(spent)} recorded run(s) of every study and hub) to ε={after:.4g} (δ="
            f"{self.delta:g}; {planned.steps} steps at sample rate {planned.sample_rate:.4g}, "
            f"noise multiplier {planned.noise_multiplier:g}: {basis})",
            f"this site allows at most ε={ceiling:.4g} per dataset",
            "raise the noise multiplier or lower localEpochs (study author), or raise "
            f"policy.maxEpsilonPerDataset (hospital admin){tail}", kind=PrivacyCeiling)

    def check_reserved(self, task: TrainingTask, reserved: DPSteps, planned: DPSteps,
                       records: int) -> None:
        """The trainer's run may not spend more than the agent reserved for it before the Job
        started: otherwise a crash would leave the ledger below what was spent.

        "More" is judged on the RDP curve, order by order, not on the stand-alone ε: runs of
        different batch counts have curves that cross, so a run can have the smaller ε alone
        and still the larger ε once composed with other runs (its curve above the reserved
        one at the order that composition selects). A crashed run stays in the ledger as its
        reservation and is composed with every later run on the dataset, which nobody knows
        yet, so only dominance at every order of the accountant keeps the ledger an upper
        bound for all of them; checking one composition (today's history) would not."""
        above = _rdp_excess(reserved, planned)
        if above is None:
            return
        order, reserved_rdp, planned_rdp = above
        reserved_eps = epsilon_of([reserved], self.delta)
        planned_eps = epsilon_of([planned], self.delta)
        raise _violation(
            "maxEpsilonPerDataset", f"study {task.namespace}/{task.study} round {task.round} "
            f"would spend ε={planned_eps:.4g} on {records} training records (δ="
            f"{self.delta:g}), with a Rényi divergence of {planned_rdp:.4g} at order "
            f"{order:g}: more than the ε={reserved_eps:.4g} the site agent reserved for it in "
            f"the site's privacy ledger allows there ({reserved_rdp:.4g})", "a run may not "
            "exceed its reservation at any order of the RDP accountant (else, composed with "
            "later runs, it could spend more than the ledger counts)",
            "set training.datasetRecords to at most the dataset's real record count, or unset "
            "it (hospital admin)", kind=PrivacyCeiling)

    def check_run(self, task: TrainingTask, records: int, *, spent: Sequence[DPSteps],
                  dataset_spent: Sequence[DPSteps], reservation: LedgerEntry | None) -> None:
        """The trainer's check once the data is open, before its first step: the per-study and
        per-dataset ceilings with the real number of training records, and the run within
        what the agent reserved for it. A DP run without a reservation is refused where a
        dataset ceiling applies (the Job was not made by this site's agent)."""
        self.check_epsilon(task, spent, records)
        if task.privacy is None:
            return
        if reservation is None:
            if self.max_epsilon_per_dataset is not None:
                raise _violation(
                    "maxEpsilonPerDataset", f"study {task.namespace}/{task.study} round "
                    f"{task.round} reached the trainer without a reservation in the site's "
                    f"privacy ledger (${RESERVATION_ENV})", "this site accounts every run on "
                    "its dataset before it starts", "run trainer Jobs only through the site "
                    "agent (hospital admin)", kind=PrivacyCeiling)
            return
        planned = round_steps(records, batch_size=task.train.batch_size,
                              local_epochs=task.train.local_epochs,
                              noise_multiplier=task.privacy.noise_multiplier)
        self.check_reserved(task, reservation.steps, planned, records)
        self.check_dataset(task, reservation.dataset or "(unnamed)", dataset_spent, planned,
                           records)


def planned_steps(task: TrainingTask, records: int | None, delta: float = DEFAULT_DELTA
                  ) -> DPSteps:
    """An upper bound of the DP-SGD steps the task's run takes, to reserve before it starts.

    A run of E epochs over n training records takes b = ceil(n / batch) batches per epoch, E·b
    steps at sample rate 1/b. The plan must bound every b the run can have: with `records`
    (the dataset's record count before the round's validation split, which is stratified per
    label and so keeps within one record of the fraction) the one or two b of the training
    records that split can leave, without b from 1 to WORST_CASE_BATCHES. It bounds them on
    the RDP curve, order by order (see `check_reserved`): the runs of two batch counts cross
    (fewer batches cost more at low orders, more batches at high ones), so the run of highest
    ε is no bound for the others. The plan is the one run, at a sample rate 1/b of the range
    and the fewest steps there, whose curve lies above every candidate's, of least ε at
    `delta`; one always exists (the range's smallest b with E·(largest b) steps, since the
    Rényi divergence grows with the sample rate and the steps). The trainer checks its real
    run against this plan (`check_reserved`), so the ledger stays an upper bound even where a
    plan falls short: that run is refused, not under-counted.
    """
    if task.privacy is None:
        raise ValueError("planned_steps: the task trains without DP-SGD")
    batch = task.train.batch_size
    if records is None:
        low, high = 1, WORST_CASE_BATCHES
    else:
        kept = records * (1.0 - task.dataset.val_fraction)
        fewest = max(1, math.ceil(kept - 1e-9) - 1)
        most = max(fewest, min(records, math.floor(kept + 1e-9) + 1))
        low, high = math.ceil(fewest / batch), math.ceil(most / batch)
    batches, steps = _bounding_plan(task.privacy.noise_multiplier, task.train.local_epochs,
                                    low, high, delta)
    return DPSteps(noise_multiplier=task.privacy.noise_multiplier, sample_rate=1.0 / batches,
                   steps=steps)


@functools.lru_cache(maxsize=256)
def _bounding_plan(noise: float, epochs: int, low: int, high: int, delta: float
                   ) -> tuple[int, int]:
    """(batches, steps): the run at sample rate 1/batches, batches in [low, high], whose RDP
    curve bounds those of `epochs` epochs at every b in [low, high], with the least ε
    (cached: the tasks of a study share their settings, and each curve costs the accountant
    tens of milliseconds)."""
    corner = (low, epochs * high)  # bounds every candidate (monotone in rate and steps)
    if noise <= 0:
        return corner  # no noise: every curve is infinite
    candidates = range(low, high + 1)
    needed = [[epochs * b * value for value in _step_curve(noise, 1.0 / b)] for b in candidates]
    plans = []
    for b in candidates:
        per_step = _step_curve(noise, 1.0 / b)
        ratio: float | None = 0.0
        for curve in needed:
            for need, value in zip(curve, per_step, strict=True):
                if need <= 0 or value == math.inf:
                    continue  # nothing to bound, or bounded by an infinite divergence
                if need == math.inf or value <= 0:
                    ratio = None  # this sample rate cannot bound that order
                    break
                ratio = max(ratio or 0.0, need / value)
            if ratio is None:
                break
        if ratio is None:
            continue
        steps = max(epochs * b, math.ceil(ratio * (1 - 1e-12)))
        # The accountant composes a run as steps × one step's divergence: check the rounding.
        if all(steps * value >= need * (1 - 1e-9) for curve in needed
               for need, value in zip(curve, per_step, strict=True)):
            plan = DPSteps(noise_multiplier=noise, sample_rate=1.0 / b, steps=steps)
            plans.append((epsilon_of([plan], delta), b, steps))
    if not plans:
        return corner
    _, batches, steps = min(plans)
    return batches, steps


@functools.lru_cache(maxsize=1024)
def _step_curve(noise: float, sample_rate: float) -> tuple[float, ...]:
    """The Rényi divergence of one DP-SGD step at every order of the RDP accountant."""
    return tuple(value for _, value in
                 _rdp_curve(DPSteps(noise_multiplier=noise, sample_rate=sample_rate, steps=1)))


def _rdp_curve(run: DPSteps) -> list[tuple[float, float]]:
    """(order, Rényi divergence) of one run at every order of the RDP accountant."""
    accountant = make_accountant("rdp")
    if run.steps > 0:
        accountant.compose(run.event())
    return [(float(order), float(value))
            for order, value in zip(accountant.orders, accountant.rdp, strict=True)]


def _rdp_excess(reserved: DPSteps, planned: DPSteps) -> tuple[float, float, float] | None:
    """The first order at which `planned`'s Rényi divergence exceeds `reserved`'s (order,
    reserved's, planned's), None where `reserved` dominates at every order."""
    for (order, bound), (_, value) in zip(_rdp_curve(reserved), _rdp_curve(planned),
                                          strict=True):
        if value > bound * (1 + 1e-9) + 1e-12:
            return order, bound, value
    return None


def steps_json(runs: Sequence[DPSteps]) -> str:
    """DP-SGD runs as JSON (the dataset's runs a trainer Job gets, compacted)."""
    return canonical_json([r.model_dump(mode="json") for r in merge_runs(runs)]).decode()


def parse_steps(text: str, where: str) -> list[DPSteps]:
    """DP-SGD runs from JSON; ConfigError naming `where`."""
    try:
        raw = json.loads(text)
        if not isinstance(raw, list):
            raise ValueError("not a JSON list")
        return [DPSteps.model_validate(item) for item in raw]
    except (ValueError, ValidationError) as exc:
        raise ConfigError(f"{where}: not a list of DP-SGD runs ({exc}); it is written by the "
                          "site agent only") from None


def dataset_steps(entries: Sequence[LedgerEntry], dataset: str) -> list[DPSteps]:
    """The DP-SGD steps of every recorded run on `dataset`, including runs recorded before the
    site named its datasets (they count against every dataset)."""
    return [e.steps for e in entries if e.dataset in (None, dataset)]


# ---- digests and the trainer's environment ----------------------------------------------------


def policy_digest(policy: SitePolicy) -> str:
    """sha256:<hex> of the policy's canonical JSON, defaults included: what the hub shows."""
    return "sha256:" + hashlib.sha256(canonical_json(policy.model_dump(mode="json"))).hexdigest()


def policy_json(policy: SitePolicy) -> str:
    """The policy as the trainer receives it in `POLICY_ENV`."""
    return canonical_json(policy.model_dump(mode="json")).decode()


def parse_policy(text: str, where: str) -> SitePolicy:
    """A policy from JSON; ConfigError naming `where` and each bad field on one line."""
    try:
        return SitePolicy.model_validate_json(text)
    except ValidationError as exc:
        raise ConfigError(f"{where}: {field_problems(exc, 'policy.')}") from None


def entry_json(entry: LedgerEntry) -> str:
    """One ledger entry as JSON (the reservation a trainer Job gets)."""
    return canonical_json(_entry_dump(entry)).decode()


def parse_entry(text: str, where: str) -> LedgerEntry:
    """One ledger entry from JSON; ConfigError naming `where`."""
    try:
        return LedgerEntry.model_validate_json(text)
    except ValidationError as exc:
        raise ConfigError(f"{where}: not a privacy ledger entry "
                          f"({field_problems(exc)})") from None


def ledger_json(entries: Sequence[LedgerEntry]) -> str:
    """A study's ledger as JSON, in the order given (the agent keeps the order of writes: its
    compaction keeps the newest entries whole). `runs` is written only where it is not 1, so
    an entry of one run reads as before compaction existed."""
    return canonical_json([_entry_dump(e) for e in entries]).decode()


def _entry_dump(entry: LedgerEntry) -> dict[str, object]:
    dumped = entry.model_dump(mode="json")
    if entry.runs == 1:
        del dumped["runs"]
    return dumped


def parse_ledger(text: str, where: str) -> list[LedgerEntry]:
    """A study's ledger from JSON, one entry per task uid; ConfigError naming `where`."""
    try:
        raw = json.loads(text)
        if not isinstance(raw, list):
            raise ValueError("not a JSON list")
        entries = [LedgerEntry.model_validate(item) for item in raw]
    except (ValueError, ValidationError) as exc:
        raise ConfigError(f"{where}: the privacy ledger is not a list of DP runs ({exc}); it "
                          "is written by the site agent only, do not edit it") from None
    return list({e.task: e for e in entries}.values())


# ---- helpers ----------------------------------------------------------------------------------


def _study_matches(pattern: str, namespace: str, study: str) -> bool:
    """Each side of "<namespace>/<study>" matched on its own, so `*` never spans the slash."""
    ns_pattern, _, study_pattern = pattern.partition("/")
    return fnmatch.fnmatchcase(namespace, ns_pattern) and \
        fnmatch.fnmatchcase(study, study_pattern)


def _listed(entries: Sequence[str]) -> str:
    if not entries:
        return "none"
    shown = [e[:19] + "…" if DIGEST_PATTERN.match(e) else e for e in entries[:_SHOWN]]
    more = f" and {len(entries) - _SHOWN} more" if len(entries) > _SHOWN else ""
    return ", ".join(shown) + more


def _violation(rule: str, asked: str, allows: str, fix: str,
               kind: type[PolicyViolation] = PolicyViolation) -> PolicyViolation:
    text = f"{kind.__name__}: policy.{rule}: {asked}, {allows}; {fix}"
    return kind(" ".join(text.split()))  # one line, whatever the task carried


__all__ = ["DATASET_LEDGER_ENV", "DEFAULT_DELTA", "LEDGER_ENV", "POLICY_ENV", "RESERVATION_ENV",
           "TRAINER_IMAGE_ENV", "LedgerEntry", "PrivacyCeiling", "SitePolicy",
           "dataset_steps", "entry_json", "ledger_json", "parse_entry", "parse_ledger",
           "parse_policy", "parse_steps", "planned_steps", "policy_digest", "policy_json",
           "steps_json"]

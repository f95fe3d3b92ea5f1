"""A hospital's site policy: what a study may run on the hospital's cluster and data.

The hospital admin writes it in the site chart's values (`policy:`, rendered into the agent's
config). The site agent checks every task against it before it creates a Job, and passes it to
the trainer (`POLICY_ENV`), which checks the task again before it reads the checkpoint or the
data, and once more with the real record count before its first training step: nothing a study
author or the hub sends can widen it. The hub sees only its digest (`policy_digest`), on the
HospitalSite's status.

It lives in the core because both the operator (agent) and the trainer enforce it, and they
meet only here. Each refusal is one line: `PolicyViolation: policy.<rule>: <what the task
asked>, <what the policy allows>; <the fix>`.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import re
from collections.abc import Sequence

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from pydantic.alias_generators import to_camel

from deeprad.core.errors import ConfigError, PolicyViolation, field_problems
from deeprad.core.model_catalogue import MODEL_NAMES, model_digest
from deeprad.core.privacy import DPSteps, epsilon_of, round_steps
from deeprad.core.protocol import TrainingTask
from deeprad.core.signing import canonical_json

# What the site agent hands its trainer Job: the policy (JSON, camelCase), the trainer image it
# configured, and this study's privacy ledger at the site (JSON list of LedgerEntry).
POLICY_ENV = "DEEPRAD_SITE_POLICY"
TRAINER_IMAGE_ENV = "DEEPRAD_TRAINER_IMAGE"
LEDGER_ENV = "DEEPRAD_PRIVACY_LEDGER"

DEFAULT_DELTA = 1e-5
DIGEST_PATTERN = re.compile(r"^sha256:[0-9a-f]{64}$")
# "<namespace>/<study>", each side a DNS name in which `*` stands for any run of characters.
STUDY_PATTERN = re.compile(r"^[a-z0-9*][-a-z0-9.*]*/[a-z0-9*][-a-z0-9.*]*$")
_SHOWN = 6  # allowed entries quoted in a refusal


class LedgerEntry(BaseModel):
    """One finished DP training run of a study at this site: the task (its uid, so a restarted
    agent never counts a run twice), its round and the DP-SGD steps it took."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    task: str = Field(min_length=1, max_length=64)
    round: int = Field(ge=1)
    steps: DPSteps


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
                    "sha256:<64 hex> (a model digest) allows exactly one network with exactly "
                    "its kwargs.")
    max_local_epochs: int | None = Field(
        default=None, ge=1, description="Largest localEpochs a round may ask for; unset: any.")
    require_differential_privacy: bool = Field(
        default=False, description="Refuse tasks that train without DP-SGD (or with a noise "
                                   "multiplier of 0).")
    max_epsilon_per_study: float | None = Field(
        default=None, gt=0, description="Largest ε (at `delta`) one study may spend on this "
                                        "site's data over all its rounds; implies DP is "
                                        "required.")
    delta: float = Field(default=DEFAULT_DELTA, gt=0, lt=1,
                         description="δ at which maxEpsilonPerStudy is accounted (RDP).")
    require_secure_aggregation: bool = Field(
        default=False, description="Refuse tasks whose round does not use secure aggregation.")

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
        self.check_epsilon(task, spent, records)

    def _check_study(self, task: TrainingTask, where: str) -> None:
        if not any(_study_matches(p, task.namespace, task.study) for p in self.studies):
            raise _violation("studies", f"{where} is from hub namespace {task.namespace}",
                             f"this site allows {_listed(self.studies)}",
                             f"add {task.namespace}/{task.study} (or {task.namespace}/*) to "
                             "policy.studies (hospital admin); a study author cannot")

    def _check_model(self, task: TrainingTask, where: str) -> None:
        name, kwargs = task.model.name, dict(task.model.kwargs)
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
        capped = self.max_epsilon_per_study is not None
        if not (self.require_differential_privacy or capped):
            return
        rule = "requireDifferentialPrivacy" if self.require_differential_privacy \
            else "maxEpsilonPerStudy"
        allows = ("this site requires DP-SGD" if self.require_differential_privacy else
                  f"this site caps ε per study at {self.max_epsilon_per_study:g} "
                  f"(δ={self.delta:g}), which needs DP-SGD")
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


def ledger_json(entries: Sequence[LedgerEntry]) -> str:
    """A study's ledger as JSON (a list ordered by round, then task uid)."""
    ordered = sorted(entries, key=lambda e: (e.round, e.task))
    return canonical_json([e.model_dump(mode="json") for e in ordered]).decode()


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


def _violation(rule: str, asked: str, allows: str, fix: str) -> PolicyViolation:
    text = f"PolicyViolation: policy.{rule}: {asked}, {allows}; {fix}"
    return PolicyViolation(" ".join(text.split()))  # one line, whatever the task carried


__all__ = ["DEFAULT_DELTA", "LEDGER_ENV", "POLICY_ENV", "TRAINER_IMAGE_ENV", "LedgerEntry",
           "SitePolicy", "ledger_json", "parse_ledger",
           "parse_policy", "policy_digest", "policy_json"]

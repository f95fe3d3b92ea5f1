"""The trainer's own check of the hospital's site policy (defense in depth).

The site agent refuses a task that breaks the policy before it creates a Job; the trainer does
not take that for granted. The agent hands its Job the policy ($DEEPRAD_SITE_POLICY), the
trainer image it configured ($DEEPRAD_TRAINER_IMAGE), the study's privacy ledger at this
site ($DEEPRAD_PRIVACY_LEDGER), the dataset's runs ($DEEPRAD_DATASET_LEDGER) and the run's
reservation ($DEEPRAD_PRIVACY_RESERVATION); the trainer checks the task against the policy
before it builds a model, reads the data or touches the store, and checks the ε ceilings again
with the real record count once the data is open, before its first training step, together
with the reservation: it never takes more steps than the ledger holds for it. A refusal is the
one-line PolicyViolation (or PrivacyCeiling); nothing is uploaded.

A study's MONAI bundle (`ModelSpec(name="bundle", kwargs={"digest": ...})`) passes only where
`policy.models` lists that bundle digest; `build_model` then finds the bundle in the site's
$DEEPRAD_BUNDLES and checks its content against the digest before it instantiates anything.

A trainer without $DEEPRAD_SITE_POLICY (`deeprad simulate`, a run on one's own machine) has
no hospital policy to honour and skips these checks.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass

from deeprad.core.privacy import DPSteps
from deeprad.core.protocol import TrainingTask
from deeprad.core.site_policy import (
    DATASET_LEDGER_ENV,
    LEDGER_ENV,
    POLICY_ENV,
    RESERVATION_ENV,
    TRAINER_IMAGE_ENV,
    LedgerEntry,
    SitePolicy,
    parse_entry,
    parse_ledger,
    parse_policy,
    parse_steps,
    policy_digest,
)

log = logging.getLogger("deeprad.trainer")


@dataclass(frozen=True)
class SiteChecks:
    """The hospital's policy as this Job received it, its digest (for the audit trail), the
    trainer image the agent configured, the study's earlier DP runs at this site, every other
    run on the dataset and what the agent reserved for this run."""

    policy: SitePolicy
    digest: str
    image: str | None
    spent: tuple[DPSteps, ...]
    dataset_spent: tuple[DPSteps, ...] = ()
    reservation: LedgerEntry | None = None

    def check_task(self, task: TrainingTask) -> None:
        """Every rule the task alone decides, and the ε the study already spent here."""
        self.policy.check(task, spent=self.spent)

    def check_records(self, task: TrainingTask, records: int) -> None:
        """The ε ceilings with the planned run at the real number of training records, and
        the run within its reservation."""
        self.policy.check_run(task, records, spent=self.spent, dataset_spent=self.dataset_spent,
                              reservation=self.reservation)


def policy_from_env(env: Mapping[str, str] | None = None) -> tuple[SitePolicy, str] | None:
    """The site policy in force for this Job and its digest; None outside a hospital's Job."""
    env = os.environ if env is None else env
    text = env.get(POLICY_ENV)
    if text is None:
        return None
    policy = parse_policy(text, f"${POLICY_ENV}")
    return policy, policy_digest(policy)


def trainer_image_from_env(env: Mapping[str, str] | None = None) -> str | None:
    """The trainer image the hospital configured for this Job, when the agent set it."""
    env = os.environ if env is None else env
    return env.get(TRAINER_IMAGE_ENV) or None


def site_checks(env: Mapping[str, str] | None = None) -> SiteChecks | None:
    """What this Job must honour, from the agent's environment; None without a policy."""
    env = os.environ if env is None else env
    found = policy_from_env(env)
    if found is None:
        return None
    policy, digest = found
    ledger = env.get(LEDGER_ENV)
    runs = parse_ledger(ledger, f"${LEDGER_ENV}") if ledger else []
    dataset = env.get(DATASET_LEDGER_ENV)
    reserved = env.get(RESERVATION_ENV)
    return SiteChecks(policy, digest, trainer_image_from_env(env),
                      tuple(e.steps for e in runs),
                      tuple(parse_steps(dataset, f"${DATASET_LEDGER_ENV}")) if dataset else (),
                      parse_entry(reserved, f"${RESERVATION_ENV}") if reserved else None)


def check_task(task: TrainingTask, env: Mapping[str, str] | None = None) -> SiteChecks | None:
    """Refuse the task (PolicyViolation) unless the site's policy allows it; the checks to run
    again once the data is open, or None where no policy applies."""
    checks = site_checks(env)
    if checks is None:
        return None
    log.info("site %s: policy %s in force (trainer image %s)", task.site, checks.digest,
             checks.image or "not reported")
    checks.check_task(task)
    return checks

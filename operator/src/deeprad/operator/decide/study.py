"""A FederatedStudy's next step, from its spec and its rounds' statuses alone.

The study is level-based: every pass rebuilds its state from the FederatedRounds it owns, so an
operator killed at any moment resumes where the API says it is. Each pass yields one action:

- `WaitForRound`: the newest round has not finished;
- `CreateRound`: round N+1, starting from round N's output checkpoint (round 1 from
  spec.initialCheckpoint, or a fresh model);
- `Blocked`: the next round cannot start yet (too few sites, ε not accountable), a condition
  says why and the study retries;
- `Stop`: a round failed, the target was reached, every round ran, patience ran out, or the
  next round would pass the privacy budget.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Final, Literal, cast

from deeprad.core.audit import StudyRef as StoreStudyRef
from deeprad.core.errors import ConfigError
from deeprad.core.privacy import (
    DPSteps,
    PrivacyBudget,
    PrivacyBudgetExceeded,
    calibrate_noise,
    epsilon_of,
    plan_round,
    round_steps,
)
from deeprad.core.privacy_ledger import LedgerBudget, Reservation, Run
from deeprad.core.protocol import PRIMARY_METRIC
from deeprad.operator.api.common import (
    CheckpointRef,
    DataSelector,
    DifferentialPrivacy,
    LocalTraining,
    Metrics,
    RoundMode,
)
from deeprad.operator.api.federatedround import RoundState, SiteState
from deeprad.operator.api.federatedstudy import (
    LOWER_IS_BETTER,
    BestMetric,
    FederatedStudySpec,
    FederatedStudyStatus,
    FinalEvaluation,
    MetricName,
    SiteEpsilon,
    SiteFinalMetrics,
    StudyPrivacy,
    StudyState,
)
from deeprad.operator.api.names import MAX_ROUNDS, round_name
from deeprad.operator.decide.conditions import Desired, merge
from deeprad.operator.decide.tenancy import (
    NAMESPACE_NOT_ALLOWED,
    namespace_allowed,
    namespace_refusal,
)
from deeprad.operator.decide.timeutil import rfc3339

PROGRESSING: Final = "Progressing"
SUCCEEDED: Final = "Succeeded"
FAILED: Final = "Failed"
# A site in one of these states may have taken DP-SGD steps in the round: its ε counts (a
# Queued site's Job exists at the hospital and may start at any moment).
SPENT_STATES = (SiteState.QUEUED, SiteState.TRAINING, SiteState.REPORTED, SiteState.FAILED,
                SiteState.DROPPED, SiteState.REJECTED)


# ---- inputs -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class RoundView:
    """What the study needs from one of its FederatedRounds (spec and status)."""

    number: int
    state: RoundState | None = None
    uid: str | None = None  # the FederatedRound's metadata.uid
    input_checkpoint: CheckpointRef | None = None
    output_checkpoint: CheckpointRef | None = None
    metrics: Metrics | None = None  # the round's output model (aggregateMetrics)
    input_metrics: Metrics | None = None  # the round's input model, as its sites measured it
    epsilon: float | None = None
    failure: str | None = None  # the Failed condition's message
    sites: Mapping[str, SiteState] = field(default_factory=dict)
    training: LocalTraining = field(default_factory=LocalTraining)
    data: DataSelector = field(default_factory=DataSelector)
    dp: DifferentialPrivacy | None = None
    mode: RoundMode = RoundMode.TRAIN
    test_metrics: Metrics | None = None  # an evaluation round's pooled held-out scores
    site_scores: tuple[SiteFinalMetrics, ...] = ()  # an evaluation round's, per site

    @property
    def evaluates(self) -> bool:
        """An evaluation round: it trains nothing and spends no ε."""
        return self.mode == RoundMode.EVALUATE


@dataclass(frozen=True)
class LedgerFacts:
    """What the store's privacy ledger holds for the study (`deeprad.core.privacy_ledger`):
    the runs of every incarnation of its name and of the studies it inherits from."""

    runs: tuple[Run, ...] = ()
    inherited_from: tuple[str, ...] = ()  # "<namespace>/<study>" whose ledgers are included
    problem: str | None = None  # the ledger could not be read or verified: the study waits
    pins: tuple[LedgerBudget, ...] = ()  # the δ and accountant each ledger is accounted at
    reservations: tuple[Reservation, ...] = ()  # stored plans of rounds, by round uid


@dataclass(frozen=True)
class Candidate:
    """A HospitalSite the study may draw from, with its declared training records and the hub
    namespaces it serves (spec.studyNamespaces; empty: none)."""

    name: str
    sample_count: int | None = None
    study_namespaces: tuple[str, ...] = ()


# ---- actions ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class CreateRound:
    """Create round `number` (name `<study>-r<number>`)."""

    number: int
    input_checkpoint: CheckpointRef | None
    sites: tuple[str, ...] | None  # None: every Ready site
    epsilon_after: float | None = None  # the study's ε once this round ran (planned)
    noise_multiplier: float | None = None  # DP: the multiplier the round trains with
    evaluate: bool = False  # the final evaluation round (spec.mode: evaluate)


@dataclass(frozen=True)
class WaitForRound:
    """Round `number` runs; nothing to do until it ends."""

    number: int
    evaluate: bool = False  # the final evaluation round


@dataclass(frozen=True)
class Blocked:
    """The next round cannot be created yet; retried on the next pass."""

    reason: str
    message: str


@dataclass(frozen=True)
class Stop:
    """The study is over."""

    outcome: Literal["Succeeded", "Failed"]
    reason: str
    message: str


Action = CreateRound | WaitForRound | Blocked | Stop


@dataclass(frozen=True)
class StudyDecision:
    """The action of this pass and the status to write."""

    action: Action
    status: FederatedStudyStatus


# ---- privacy ----------------------------------------------------------------------------------


def train_records(sample_count: int, val_fraction: float) -> int:
    """Records a site trains on once `val_fraction` is held out (at least one)."""
    return max(1, sample_count - math.floor(sample_count * val_fraction))


def dp_steps(records: int, training: LocalTraining, noise_multiplier: float) -> DPSteps:
    """The DP-SGD steps one round with `training` costs a site (the rule is the core's)."""
    return round_steps(records, batch_size=training.batch_size,
                       local_epochs=training.local_epochs, noise_multiplier=noise_multiplier)


@dataclass(frozen=True)
class _Ledger:
    history: dict[str, list[DPSteps]]
    planned: dict[str, DPSteps]
    runs: dict[str, int]  # runs accounted per site


def _ledger(study: str, spec: FederatedStudySpec, rounds: Sequence[RoundView],
            sites: Sequence[str], candidates: Sequence[Candidate], facts: LedgerFacts,
            uid: str | None, noise_multiplier: float | None) -> _Ledger | Blocked:
    """Past DP-SGD runs per site and the next round's planned ones (at `noise_multiplier`;
    None plans nothing), or Blocked naming a site whose sampleCount is missing.

    The past is the privacy ledger's facts (what the sites' trainers signed), plus, for every
    round that exists now and whose site may have trained without a report yet, a reservation
    computed from the round's settings and the site's declared sampleCount (an upper bound).
    Facts outlive the rounds: deleting one removes at most a reservation."""
    counts = {c.name: c.sample_count for c in candidates}

    def count(site: str) -> int | Blocked:
        n = counts.get(site)
        if n is None:
            return Blocked("PrivacyNotAccountable",
                           f"FederatedStudy {study}: cannot account ε for HospitalSite {site}: "
                           "its spec.data.sampleCount is not set; set it, or remove the site "
                           "from the study")
        return n

    history: dict[str, list[DPSteps]] = {}
    runs: dict[str, int] = {}
    reported = {(r.site, r.study_uid, r.round) for r in facts.runs}

    def add(site: str, steps: DPSteps) -> None:
        history.setdefault(site, []).append(steps)
        runs[site] = runs.get(site, 0) + 1

    for run in facts.runs:
        add(run.site, run.steps)
    live = {r.uid for r in rounds if r.uid is not None}
    for held in facts.reservations:  # rounds that no longer exist: their stored plan
        if held.round_uid not in live:
            for site, steps in sorted(held.sites.items()):
                if (site, held.study.uid, held.round) not in reported:
                    add(site, steps)
    for r in rounds:
        planned_here = _round_reservation(r, count)
        if isinstance(planned_here, Blocked):
            return planned_here
        for site, steps in sorted(planned_here.items()):
            if (site, uid, r.number) not in reported:
                add(site, steps)
    planned: dict[str, DPSteps] = {}
    for site in sites:
        if site not in counts:
            continue  # no such HospitalSite: it cannot be admitted, so it spends nothing
        n = count(site)
        if isinstance(n, Blocked):
            return n
        if noise_multiplier is not None:
            planned[site] = dp_steps(train_records(n, spec.data.val_fraction),
                                     spec.round_template.training, noise_multiplier)
    return _Ledger(history, planned, runs)


def _round_reservation(r: RoundView, count: Callable[[str], int | Blocked]
                       ) -> dict[str, DPSteps] | Blocked:
    """The planned steps of each site of round `r` that may have trained (an upper bound from
    the round's settings and the site's declared sampleCount), or Blocked."""
    if r.dp is None or r.dp.noise_multiplier is None or r.evaluates:
        return {}
    out: dict[str, DPSteps] = {}
    for site, state in sorted(r.sites.items()):
        if state in SPENT_STATES:
            n = count(site)
            if isinstance(n, Blocked):
                return n
            out[site] = dp_steps(train_records(n, r.data.val_fraction), r.training,
                                 r.dp.noise_multiplier)
    return out


def reservations_to_store(study: str, namespace: str, uid: str | None,
                          rounds: Sequence[RoundView], candidates: Sequence[Candidate],
                          facts: LedgerFacts) -> list[Reservation]:
    """The reservations to (re)write in the store: one per DP round of the study whose stored
    one is missing or out of date (a site started training, or the round ended: `settled`),
    so that deleting the round later leaves its plan accounted."""
    counts = {c.name: c.sample_count for c in candidates}
    stored = {h.round_uid: h for h in facts.reservations}
    out = []
    for r in rounds:
        if r.uid is None or r.dp is None or r.evaluates:
            continue
        sites = _round_reservation(r, lambda s: counts.get(s) or Blocked("", ""))
        if isinstance(sites, Blocked) or not sites:
            continue
        settled = bool(r.state and r.state.terminal)
        have = stored.get(r.uid)
        if have is not None:
            if have.settled:
                continue
            sites = {**sites, **have.sites}  # what was stored stays: a plan never shrinks
            if (have.sites, have.settled) == (sites, settled):
                continue
        out.append(Reservation(ledger=StoreStudyRef(namespace=namespace, name=study),
                               study=StoreStudyRef(namespace=namespace, name=study, uid=uid),
                               round=r.number, round_uid=r.uid, sites=sites, settled=settled))
    return out


def _noise(spec: FederatedStudySpec, status: FederatedStudyStatus, budget: PrivacyBudget,
           ledger: _Ledger, sites: Sequence[str], candidates: Sequence[Candidate],
           rounds_left: int) -> float:
    """The round's noise multiplier: the template's; else the one calibrated earlier (kept, so
    every round of the study uses one plan); else the smallest that lets every drawn site
    train `rounds_left` more rounds within the budget. Raises PrivacyBudgetExceeded or
    ConfigError (no multiplier fits)."""
    dp = spec.round_template.privacy.differential_privacy
    assert dp is not None
    if dp.noise_multiplier is not None:
        return dp.noise_multiplier
    kept = status.privacy.noise_multiplier if status.privacy and status.privacy.calibrated \
        else None
    if kept is not None:
        return kept
    counts = {c.name: c.sample_count for c in candidates}
    z = 0.0
    for site in sites:
        n = counts.get(site)
        if n is None:
            continue  # not a HospitalSite (spends nothing) or Blocked earlier
        shape = dp_steps(train_records(n, spec.data.val_fraction), spec.round_template.training,
                         0.0)
        z = max(z, _calibrated(budget, tuple(ledger.history.get(site, ())), shape,
                               rounds_left))
    if z == 0.0:
        raise ConfigError("no site to calibrate the noise multiplier for")
    return z


@functools.lru_cache(maxsize=256)
def _calibration(budget: PrivacyBudget, history: tuple[DPSteps, ...], shape: DPSteps,
                 rounds: int) -> float | PrivacyBudgetExceeded | ConfigError:
    try:
        return calibrate_noise(budget, history, shape, rounds)
    except (PrivacyBudgetExceeded, ConfigError) as exc:
        return exc


def _calibrated(budget: PrivacyBudget, history: tuple[DPSteps, ...], shape: DPSteps,
                rounds: int) -> float:
    """calibrate_noise, remembered (its refusals too): a study that cannot start (inherited ε
    leaves no room) asks again on every pass, and each answer takes seconds of accounting."""
    out = _calibration(budget, history, shape, rounds)
    if isinstance(out, Exception):
        raise type(out)(str(out))
    return out


@functools.lru_cache(maxsize=4096)
def _epsilon(history: tuple[DPSteps, ...], delta: float, accountant: str) -> float:
    """ε of a site's runs; every pass asks again for the same runs, so it is remembered."""
    return epsilon_of(history, delta, accountant)


def _privacy_status(budget: PrivacyBudget, ledger: _Ledger, facts: LedgerFacts,
                    noise_multiplier: float | None, calibrated: bool) -> StudyPrivacy:
    sites = []
    for site, history in sorted(ledger.history.items()):
        spent = _epsilon(tuple(history), budget.delta, budget.accountant)
        sites.append(SiteEpsilon(site=site, epsilon_spent=spent,
                                 epsilon_remaining=max(0.0, budget.epsilon - spent),
                                 runs=ledger.runs.get(site, 0)))
    return StudyPrivacy(noise_multiplier=noise_multiplier, calibrated=calibrated or None,
                        inherited_from=list(facts.inherited_from) or None, sites=sites or None,
                        problem=facts.problem)


# ---- metrics ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Progress:
    best: BestMetric | None
    since_improvement: int
    target_round: int | None  # first round that reached spec.stopping.target


def _progress(spec: FederatedStudySpec, succeeded: Sequence[RoundView]) -> _Progress:
    """Best value (an improvement must beat it by more than minDelta), rounds since the last
    improvement, and the first round that reached the target. A round whose output has not
    been measured yet (the next round's sites measure it) counts neither way."""
    rules = spec.stopping
    metric = monitored_metric(spec)
    sign = -1.0 if metric in LOWER_IS_BETTER else 1.0  # compare as "higher is better"
    best: BestMetric | None = None
    since = 0
    target_round: int | None = None
    for r in succeeded:
        value = getattr(r.metrics, metric, None) if r.metrics else None
        if value is None:
            continue
        if rules.target is not None and target_round is None and \
                sign * value >= sign * rules.target:
            target_round = r.number
        if best is None or sign * value > sign * best.value + rules.min_delta:
            best = BestMetric(name=metric, value=value, round=r.number)
            since = 0
        else:
            since += 1
    return _Progress(best, since, target_round)


def monitored_metric(spec: FederatedStudySpec) -> MetricName:
    """spec.stopping.metric, else the primary metric of the study's task."""
    return spec.stopping.metric or cast(MetricName, PRIMARY_METRIC[spec.model.task.value])


# ---- the decision -----------------------------------------------------------------------------


def decide_study(name: str, generation: int | None, spec: FederatedStudySpec,
                 status: FederatedStudyStatus, rounds: Sequence[RoundView],
                 candidates: Sequence[Candidate], now: datetime, *, namespace: str,
                 uid: str | None = None, facts: LedgerFacts | None = None) -> StudyDecision:
    """This pass's action and status. `rounds` are the study's FederatedRounds; `candidates`
    the HospitalSites matching spec.sites / spec.siteSelector (every site when both are
    empty), with their sampleCount for privacy accounting; `namespace` the study's, which a
    site must allow to be drawn; `uid` the study's; `facts` its privacy ledger (None: no store
    to read one from, so only the rounds that exist are accounted)."""
    facts = facts if facts is not None else LedgerFacts()
    ordered = sorted(rounds, key=lambda r: r.number)
    trained = [r for r in ordered if not r.evaluates]
    evaluation = next((r for r in ordered if r.evaluates), None)
    succeeded = [r for r in trained if r.state == RoundState.SUCCEEDED]
    progress = _progress(spec, succeeded)
    latest = trained[-1] if trained else None
    action = _action(name, spec, status, trained, succeeded, progress, candidates, namespace,
                     uid, facts)
    action = _final_evaluation(name, spec, action, succeeded, evaluation, candidates, namespace)
    final_metrics, final = _final_status(name, spec, evaluation)

    spent, privacy = _spent(name, spec, status, ordered, candidates, facts, uid, action)
    checkpoint = next((r.output_checkpoint for r in reversed(succeeded) if r.output_checkpoint),
                      spec.initial_checkpoint)
    started = status.start_time or (rfc3339(now) if ordered or isinstance(action, CreateRound)
                                    else None)
    new = FederatedStudyStatus(
        observed_generation=generation,
        current_round=(action.number if isinstance(action, CreateRound)
                       else evaluation.number if evaluation
                       else latest.number if latest else 0),
        completed_rounds=len(succeeded),
        rounds_without_improvement=progress.since_improvement,
        best_metric=progress.best,
        final_metrics=final_metrics,
        final_evaluation=final,
        epsilon_spent=spent,
        privacy=privacy,
        latest_checkpoint=checkpoint,
        start_time=started,
        completion_time=(status.completion_time or rfc3339(now)) if isinstance(action, Stop)
        else None,
        state=_state(action, latest),
    )
    new.conditions = merge(status.conditions, _conditions(name, action), generation, now)
    return StudyDecision(action, new)


def _action(name: str, spec: FederatedStudySpec, status: FederatedStudyStatus,
            ordered: Sequence[RoundView], succeeded: Sequence[RoundView], progress: _Progress,
            candidates: Sequence[Candidate], namespace: str, uid: str | None,
            facts: LedgerFacts) -> Action:
    failed = next((r for r in ordered if r.state == RoundState.FAILED), None)
    if failed is not None:
        return Stop(FAILED, "RoundFailed",
                    f"FederatedRound {round_name(name, failed.number)} failed: "
                    f"{failed.failure or 'no reason recorded'}; delete that round to run it "
                    "again")
    latest = ordered[-1] if ordered else None
    if latest is not None and not (latest.state and latest.state.terminal):
        return WaitForRound(latest.number)
    rules = spec.stopping
    if progress.target_round is not None:
        return Stop(SUCCEEDED, "TargetReached",
                    f"{monitored_metric(spec)} reached the target {rules.target:g} in round "
                    f"{progress.target_round}")
    done = latest.number if latest else 0
    if done >= spec.rounds:
        return Stop(SUCCEEDED, "RoundsCompleted", f"all {spec.rounds} rounds ran")
    if rules.patience is not None and progress.since_improvement >= rules.patience:
        best = progress.best
        where = f"best {best.value:g} in round {best.round}" if best else "no value yet"
        return Stop(SUCCEEDED, "PatienceExhausted",
                    f"{monitored_metric(spec)} did not improve by more than "
                    f"{rules.min_delta:g} for "
                    f"{progress.since_improvement} rounds ({where}); spec.stopping.patience is "
                    f"{rules.patience}")
    number = done + 1
    checkpoint = spec.initial_checkpoint
    if latest is not None:
        checkpoint = latest.output_checkpoint
        if checkpoint is None:
            return Blocked("MissingCheckpoint",
                           f"FederatedRound {round_name(name, latest.number)} succeeded but "
                           "has no status.outputCheckpoint to start the next round from")
    allowed = [c for c in candidates if namespace_allowed(c.study_namespaces, namespace)]
    refusing = [c for c in candidates if c not in allowed]
    sites = _round_sites(spec, allowed)
    min_sites = spec.round_template.min_sites
    if spec.sites and refusing and len(spec.sites) - len(refusing) < min_sites:
        return Blocked(NAMESPACE_NOT_ALLOWED, "; ".join(
            namespace_refusal(c.name, c.study_namespaces, namespace) for c in refusing)
            + f"; spec.sites leaves {len(spec.sites) - len(refusing)}, below "
              f"roundTemplate.minSites {min_sites}")
    if not spec.sites and sites is not None and len(sites) < min_sites:
        unserved = (f"; {', '.join(c.name for c in refusing)} match but do not allow namespace "
                    f"{namespace}: add it to their spec.studyNamespaces" if refusing else "")
        return Blocked("NotEnoughSites",
                       f"spec.siteSelector matches {len(sites)} HospitalSite(s) that allow "
                       f"namespace {namespace} ({', '.join(sites) or 'none'}), below "
                       f"roundTemplate.minSites {min_sites}{unserved}; label more sites or "
                       "lower minSites")
    epsilon_after = noise = None
    budget = _budget(spec)
    if budget is not None:
        if facts.problem is not None:
            return Blocked("PrivacyLedgerUnreadable",
                           f"FederatedStudy {name}: no round starts until its ε can be "
                           f"accounted: {facts.problem}")
        pin = _mismatched_pin(budget, facts)
        if pin is not None:
            return Blocked("PrivacyBudgetMismatch",
                           f"FederatedStudy {name}: the privacy ledger of {pin.ledger} is "
                           f"accounted at δ={pin.delta:g} with the {pin.accountant} accountant "
                           f"(pinned by its first DP round); a study of that name, or one "
                           "starting from its checkpoints, accounts the same runs the same way "
                           f"(a larger δ would show a smaller ε): set spec.privacyBudget.delta "
                           f"to {pin.delta:g} and accountant to {pin.accountant}")
        drawn = _drawn(sites, allowed)
        past = _ledger(name, spec, ordered, drawn, candidates, facts, uid, None)
        if isinstance(past, Blocked):
            return past
        try:
            noise = _noise(spec, status, budget, past, drawn, candidates, spec.rounds - done)
            ledger = _ledger(name, spec, ordered, drawn, candidates, facts, uid, noise)
            assert not isinstance(ledger, Blocked)  # the same sites' counts passed above
            plan = plan_round(budget, ledger.history, ledger.planned)
        except PrivacyBudgetExceeded as exc:
            return Stop(SUCCEEDED, "PrivacyBudgetExhausted", f"before round {number}: {exc}")
        except ConfigError as exc:
            return Blocked("NoiseNotCalibrated", f"FederatedStudy {name}: {exc}")
        epsilon_after = plan.spent_after
    return CreateRound(number, checkpoint, sites, epsilon_after, noise)


def _final_evaluation(name: str, spec: FederatedStudySpec, action: Action,
                      succeeded: Sequence[RoundView], evaluation: RoundView | None,
                      candidates: Sequence[Candidate], namespace: str) -> Action:
    """Before a study that succeeded stops: one evaluation round in which the sites score the
    final global model on held-out data (spec.finalEvaluation), then the stop. An evaluation
    that fails does not fail the study (its training succeeded); the condition says so."""
    if not (isinstance(action, Stop) and action.outcome == SUCCEEDED and spec.final_evaluation):
        return action
    last = succeeded[-1] if succeeded else None
    if last is None or last.output_checkpoint is None:
        return action  # nothing was trained: no final model to score
    if evaluation is None:
        number = last.number + 1
        if number > MAX_ROUNDS:
            return Stop(SUCCEEDED, action.reason, f"{action.message}; no final evaluation: "
                                                  f"round numbers end at {MAX_ROUNDS}")
        allowed = [c for c in candidates if namespace_allowed(c.study_namespaces, namespace)]
        return CreateRound(number, last.output_checkpoint, _round_sites(spec, allowed),
                           noise_multiplier=last.dp.noise_multiplier if last.dp else None,
                           evaluate=True)
    rn = round_name(name, evaluation.number)
    if not (evaluation.state and evaluation.state.terminal):
        return WaitForRound(evaluation.number, evaluate=True)
    if evaluation.state == RoundState.FAILED:
        return Stop(SUCCEEDED, action.reason,
                    f"{action.message}; the final evaluation (FederatedRound {rn}) failed: "
                    f"{evaluation.failure or 'no reason recorded'}")
    return Stop(SUCCEEDED, action.reason,
                f"{action.message}; the final model was evaluated by FederatedRound {rn}")


def _final_status(name: str, spec: FederatedStudySpec, evaluation: RoundView | None
                  ) -> tuple[Metrics | None, FinalEvaluation | None]:
    """status.finalMetrics and status.finalEvaluation from the evaluation round."""
    if evaluation is None:
        return None, None
    metric = cast(MetricName, PRIMARY_METRIC[spec.model.task.value])
    pooled = evaluation.test_metrics
    return pooled, FinalEvaluation(
        round=round_name(name, evaluation.number), checkpoint=evaluation.input_checkpoint,
        state=evaluation.state.value if evaluation.state else None,
        message=evaluation.failure, metric=metric,
        value=getattr(pooled, metric, None) if pooled else None,
        validation_metrics=evaluation.input_metrics,
        sites=list(evaluation.site_scores) or None)


def _mismatched_pin(budget: PrivacyBudget, facts: LedgerFacts) -> LedgerBudget | None:
    """The first ledger pinned at another δ or accountant than the study's budget."""
    return next((p for p in facts.pins
                 if (p.delta, p.accountant) != (budget.delta, budget.accountant)), None)


def _budget(spec: FederatedStudySpec) -> PrivacyBudget | None:
    """The study's budget when its rounds train with DP-SGD (CEL requires one then)."""
    b = spec.privacy_budget
    if b is None or spec.round_template.privacy.differential_privacy is None:
        return None
    return PrivacyBudget(epsilon=b.epsilon, delta=b.delta, accountant=b.accountant)


def _drawn(sites: tuple[str, ...] | None, candidates: Sequence[Candidate]) -> list[str]:
    return list(sites) if sites is not None else sorted(c.name for c in candidates)


def _spent(name: str, spec: FederatedStudySpec, status: FederatedStudyStatus,
           rounds: Sequence[RoundView], candidates: Sequence[Candidate], facts: LedgerFacts,
           uid: str | None, action: Action) -> tuple[float | None, StudyPrivacy | None]:
    """ε spent so far (the largest site's) and the per-site view, or (None, None) without a
    budget; ε is None when a site's sampleCount is missing (the Progressing condition then
    says which)."""
    budget = _budget(spec)
    if budget is None:
        return None, None
    dp = spec.round_template.privacy.differential_privacy
    assert dp is not None
    calibrated = dp.noise_multiplier is None
    if isinstance(action, CreateRound):
        noise = action.noise_multiplier
    elif calibrated:
        noise = status.privacy.noise_multiplier if status.privacy else None
    else:
        noise = dp.noise_multiplier
    if facts.problem is not None:
        # the ledger cannot be read: what was shown stays (never a lower number), the problem
        # beside it, and no round starts (the action is Blocked)
        kept = (status.privacy or StudyPrivacy()).model_copy(update={"problem": facts.problem})
        return status.epsilon_spent, kept
    ledger = _ledger(name, spec, rounds, [], candidates, facts, uid, None)
    if isinstance(ledger, Blocked):
        return None, StudyPrivacy(noise_multiplier=noise, calibrated=calibrated or None)
    pin = _mismatched_pin(budget, facts)
    if pin is not None:  # shown as the pinned ledger accounts it, never lower
        budget = budget.model_copy(update={"delta": pin.delta, "accountant": pin.accountant})
    view = _privacy_status(budget, ledger, facts, noise, calibrated and noise is not None)
    return max((s.epsilon_spent for s in view.sites or ()), default=0.0), view


def _round_sites(spec: FederatedStudySpec, candidates: Sequence[Candidate]
                 ) -> tuple[str, ...] | None:
    """The sites a new round names: spec.sites as listed (the round excludes, with the reason,
    those that refuse its namespace), the selector's matches among `candidates` (the sites
    that allow the study's namespace, resolved now, since a round has no selector), or None
    for every Ready site that allows it."""
    if spec.sites:
        return tuple(spec.sites)
    if spec.site_selector is not None:
        return tuple(sorted(c.name for c in candidates))
    return None


def _state(action: Action, latest: RoundView | None) -> StudyState:
    if isinstance(action, Stop):
        return StudyState.SUCCEEDED if action.outcome == SUCCEEDED else StudyState.FAILED
    if isinstance(action, Blocked) and latest is None:
        return StudyState.PENDING
    return StudyState.RUNNING


def _conditions(name: str, action: Action) -> list[Desired]:
    if isinstance(action, CreateRound | WaitForRound) and action.evaluate:
        rn = round_name(name, action.number)
        return [Desired.true(PROGRESSING, "EvaluatingFinalModel",
                             f"FederatedRound {rn} scores the final model on the sites' "
                             "held-out data"),
                Desired.false(SUCCEEDED, "Running", ""), Desired.false(FAILED, "Running", "")]
    if isinstance(action, CreateRound):
        rn = round_name(name, action.number)
        return [Desired.true(PROGRESSING, "RoundCreated", f"created FederatedRound {rn}"),
                Desired.false(SUCCEEDED, "Running", ""), Desired.false(FAILED, "Running", "")]
    if isinstance(action, WaitForRound):
        rn = round_name(name, action.number)
        return [Desired.true(PROGRESSING, "RoundRunning", f"FederatedRound {rn} is running"),
                Desired.false(SUCCEEDED, "Running", ""), Desired.false(FAILED, "Running", "")]
    if isinstance(action, Blocked):
        return [Desired.false(PROGRESSING, action.reason, action.message),
                Desired.false(SUCCEEDED, "Running", ""), Desired.false(FAILED, "Running", "")]
    if action.outcome == SUCCEEDED:
        return [Desired.false(PROGRESSING, action.reason, action.message),
                Desired.true(SUCCEEDED, action.reason, action.message),
                Desired.false(FAILED, action.reason, "")]
    return [Desired.false(PROGRESSING, action.reason, action.message),
            Desired.false(SUCCEEDED, action.reason, ""),
            Desired.true(FAILED, action.reason, action.message)]


def metrics_to_backfill(rounds: Sequence[RoundView]) -> list[tuple[int, Metrics]]:
    """(round, metrics) for rounds whose output model the next round has measured but whose
    aggregateMetrics is still empty: round n's output is round n+1's input."""
    by_number = {r.number: r for r in rounds}
    return [(r.number, nxt.input_metrics) for r in rounds
            if r.metrics is None and (nxt := by_number.get(r.number + 1)) is not None
            and nxt.input_metrics is not None]

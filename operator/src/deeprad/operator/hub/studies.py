"""FederatedStudy: re-derive the study from the FederatedRounds it owns (`decide.study`),
create the next round when due (deterministic name, create-or-get, so a restart never
duplicates one), fill in measured metrics of earlier rounds, export its progress."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import kopf

from deeprad.operator import metrics
from deeprad.operator.api import API_VERSION
from deeprad.operator.api.common import Metrics
from deeprad.operator.api.federatedround import FederatedRoundSpec, FederatedRoundStatus
from deeprad.operator.api.federatedstudy import (
    FederatedStudySpec,
    FederatedStudyStatus,
    SiteFinalMetrics,
    StudyState,
)
from deeprad.operator.api.names import round_name
from deeprad.operator.client import Kube, parse, reconciling
from deeprad.operator.decide import conditions as cond
from deeprad.operator.decide import sites as site_rules
from deeprad.operator.decide import study as study_rules
from deeprad.operator.decide.timeutil import now
from deeprad.operator.hub.cleanup import deleted
from deeprad.operator.hub.memo import HubMemo
from deeprad.operator.hub.privacy import LedgerReader
from deeprad.operator.hub.resources import (
    FEDERATED_ROUNDS,
    FEDERATED_STUDIES,
    HOSPITAL_SITES,
    reads_indices,
    write_status,
)
from deeprad.operator.options import HubOptions
from deeprad.operator.render import rounds as round_render

LEDGER_MAX_AGE = 300.0  # seconds a finished study's ledger reading stays good


@dataclass(frozen=True)
class SiteFacts:
    """Index entry of one HospitalSite: what studies select and account by, and the hub
    namespaces it serves."""

    name: str
    labels: dict[str, str]
    sample_count: int | None
    study_namespaces: tuple[str, ...] = ()


@dataclass(frozen=True)
class OwnedRound:
    """Index entry of one FederatedRound that belongs to a study."""

    owner_uid: str | None
    view: study_rules.RoundView


# ---- handlers ---------------------------------------------------------------------------------


def site_facts(name: str, labels: kopf.Labels, spec: kopf.Spec, **_: Any
               ) -> dict[None, SiteFacts]:
    """Index of HospitalSites: every site, for the studies' site selection."""
    count = (spec.get("data") or {}).get("sampleCount")
    return {None: SiteFacts(name, dict(labels), count,
                            tuple(str(n) for n in spec.get("studyNamespaces") or ()))}


def study_rounds(namespace: str | None, spec: kopf.Spec, status: kopf.Status, meta: kopf.Meta,
                 **_: Any) -> dict[tuple[str, str], OwnedRound]:
    """Index of FederatedRounds by (namespace, study), with the study that owns each."""
    study = (spec.get("studyRef") or {}).get("name")
    if not study or namespace is None:
        return {}
    owner = next((o.get("uid") for o in meta.get("ownerReferences") or ()
                  if o.get("kind") == "FederatedStudy" and o.get("name") == study), None)
    view = round_view(parse(FederatedRoundSpec, spec), parse(FederatedRoundStatus, status),
                      meta.get("uid"))
    return {(namespace, study): OwnedRound(owner, view)}


def reconcile(name: str, namespace: str, uid: str, meta: kopf.Meta, spec: kopf.Spec,
              status: kopf.Status, body: kopf.Body, memo: HubMemo,
              site_facts: kopf.Index[None, SiteFacts],
              study_rounds: kopf.Index[tuple[str, str], OwnedRound], **_: Any) -> None:
    """On create, update, resume and a timer: one pass over the study."""
    with reconciling("FederatedStudy", f"{namespace}/{name}"):
        owned = [r.view for r in study_rounds.get((namespace, name), ()) if r.owner_uid == uid]
        old = parse(FederatedStudyStatus, status)
        parsed = parse(FederatedStudySpec, spec)
        # a finished study whose spec has not changed since re-reads its ledger every few
        # minutes, not on every timer pass
        settled = old.state in (StudyState.SUCCEEDED, StudyState.FAILED) and \
            old.observed_generation == meta.get("generation")
        facts = (memo.ledger.facts(namespace, name, parsed, LEDGER_MAX_AGE if settled else 0.0)
                 if memo.ledger is not None and parsed.privacy_budget is not None else None)
        new = reconcile_study(memo.kube, namespace, name, uid, meta.get("generation"),
                              parsed, old, owned, list(site_facts.get(None, ())), body, facts,
                              memo.ledger)
        write_status(memo.kube, "FederatedStudy", name, namespace, old, new)
        backfill_metrics(memo.kube, namespace, name, owned)


def register(registry: kopf.OperatorRegistry, options: HubOptions) -> None:
    """Add the FederatedStudy handlers, and the indices they read, to `registry`."""
    kopf.index(*HOSPITAL_SITES, id="site_facts", registry=registry)(site_facts)
    kopf.index(*FEDERATED_ROUNDS, id="study_rounds", registry=registry)(study_rounds)
    for on in (kopf.on.update, kopf.on.create, kopf.on.resume):
        on(*FEDERATED_STUDIES, id="study", registry=registry)(reads_indices(reconcile))
    kopf.timer(*FEDERATED_STUDIES, id="study-timer", interval=options.study_interval,
               registry=registry)(reads_indices(reconcile))
    kopf.on.event(*FEDERATED_STUDIES, id="study-gone", when=deleted,
                  registry=registry)(forget)


def forget(name: str, namespace: str | None, **_: Any) -> None:
    """A deleted study's gauges go with it (no finalizer: the study never waits for this)."""
    if namespace is not None:
        metrics.forget_study(namespace, name)


# ---- the pass ---------------------------------------------------------------------------------


def round_view(spec: FederatedRoundSpec, status: FederatedRoundStatus, uid: str | None = None
               ) -> study_rules.RoundView:
    """What decide.study needs from a round."""
    failed = cond.find(status.conditions, study_rules.FAILED)
    return study_rules.RoundView(
        number=spec.round, state=status.state, uid=uid,
        input_checkpoint=spec.input_checkpoint, output_checkpoint=status.output_checkpoint,
        metrics=status.aggregate_metrics, input_metrics=status.input_metrics,
        epsilon=status.epsilon,
        failure=failed.message if failed and failed.status == "True" else None,
        sites={s.site: s.state for s in status.sites or ()},
        training=spec.training, data=spec.data, dp=spec.privacy.differential_privacy,
        mode=spec.mode, test_metrics=status.test_metrics,
        site_scores=tuple(SiteFinalMetrics(site=s.site, split=s.test_split,
                                           metrics=s.test_metrics)
                          for s in status.sites or () if s.test_metrics is not None))


def candidates(spec: FederatedStudySpec, sites: list[SiteFacts]) -> list[study_rules.Candidate]:
    """The HospitalSites the study draws from, by name."""
    if spec.sites:
        chosen = [s for s in sites if s.name in set(spec.sites)]
    else:
        chosen = [s for s in sites if site_rules.matches_selector(s.labels, spec.site_selector)]
    return [study_rules.Candidate(s.name, s.sample_count, s.study_namespaces)
            for s in sorted(chosen, key=lambda s: s.name)]


def reconcile_study(kube: Kube, namespace: str, name: str, uid: str, generation: int | None,
                    spec: FederatedStudySpec, status: FederatedStudyStatus,
                    rounds: list[study_rules.RoundView], sites: list[SiteFacts],
                    body: kopf.Body, facts: study_rules.LedgerFacts | None = None,
                    ledger: LedgerReader | None = None) -> FederatedStudyStatus:
    """One pass over a study: decide, create the next round if due, return the status."""
    decided_at = now()
    decision = study_rules.decide_study(name, generation, spec, status, rounds,
                                        candidates(spec, sites), decided_at,
                                        namespace=namespace, uid=uid, facts=facts)
    action, new = decision.action, decision.status
    if isinstance(action, study_rules.CreateRound):
        if ledger is not None and spec.privacy_budget is not None:
            ledger.pin(namespace, name, uid, spec)  # before the round: a crash leaves a pin
        taken = create_round(kube, namespace, name, uid, spec, action, body)
        if taken is not None:
            new.conditions = cond.merge(new.conditions, [cond.Desired.false(
                study_rules.PROGRESSING, "RoundNameTaken", taken)], generation, decided_at)
    if ledger is not None and facts is not None and facts.problem is None:
        ledger.reserve(study_rules.reservations_to_store(
            name, namespace, uid, rounds, candidates(spec, sites), facts))
    if isinstance(action, study_rules.Stop) and status.completion_time is None:
        kind = "Normal" if action.outcome == study_rules.SUCCEEDED else "Warning"
        kopf.event(body, type=kind, reason=action.reason, message=action.message)
    succeeded = [r for r in sorted(rounds, key=lambda r: r.number)
                 if r.state == "Succeeded" and not r.evaluates]
    export_study(namespace, name, spec, new, succeeded[-1].metrics if succeeded else None)
    return new


def create_round(kube: Kube, namespace: str, study: str, uid: str, spec: FederatedStudySpec,
                 action: study_rules.CreateRound, body: kopf.Body) -> str | None:
    """Create the study's next round (or find it); what is wrong when a round of that name
    exists but belongs to no such study, else None."""
    manifest = round_render.federated_round(study, namespace, uid, spec, action)
    obj, created = kube.create_or_get(manifest)
    owners = [o.get("uid") for o in obj.get("metadata", {}).get("ownerReferences") or ()]
    name = round_name(study, action.number)
    if uid not in owners:
        return (f"FederatedRound {namespace}/{name} exists but does not belong to this study; "
                "delete or rename it so the study can create its round")
    if created:
        metrics.ROUNDS_CREATED.labels(namespace=namespace, study=study).inc()
        source = (f" from checkpoint {action.input_checkpoint.uri}" if action.input_checkpoint
                  else " from a fresh model")
        kopf.event(body, type="Normal", reason="RoundCreated",
                   message=f"created FederatedRound {name}{source}")
    return None


def backfill_metrics(kube: Kube, namespace: str, study: str,
                     rounds: list[study_rules.RoundView]) -> None:
    """Give a round the metrics its successor measured on its output model."""
    for number, measured in study_rules.metrics_to_backfill(rounds):
        kube.patch_status(API_VERSION, "FederatedRound", round_name(study, number), namespace,
                          {"aggregateMetrics": measured.model_dump(mode="json",
                                                                   exclude_none=True)})


def export_study(namespace: str, name: str, spec: FederatedStudySpec,
                 status: FederatedStudyStatus, latest: Metrics | None) -> None:
    """Study progress gauges."""
    labels = {"namespace": namespace, "study": name}
    metrics.STUDY_ROUNDS_COMPLETED.labels(**labels).set(status.completed_rounds or 0)
    metrics.STUDY_ROUNDS_PLANNED.labels(**labels).set(spec.rounds)
    if status.epsilon_spent is not None:
        metrics.STUDY_EPSILON_SPENT.labels(**labels).set(status.epsilon_spent)
    metrics.record_study_budget(namespace, name, spec.privacy_budget.epsilon
                                if spec.privacy_budget is not None else None)
    privacy_sites = status.privacy.sites if status.privacy else None
    metrics.record_site_epsilon(namespace, name,
                                {s.site: s.epsilon_spent for s in privacy_sites or ()})
    if latest is not None and latest.auroc is not None:
        metrics.GLOBAL_AUROC.labels(**labels).set(latest.auroc)
    if latest is not None and latest.dice is not None:
        metrics.GLOBAL_DICE.labels(**labels).set(latest.dice)
    if latest is not None and latest.loss is not None:
        metrics.GLOBAL_LOSS.labels(**labels).set(latest.loss)

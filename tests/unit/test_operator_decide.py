"""The operator's decide layer with plain data: conditions, site health and admission, and a
study's next step."""

from __future__ import annotations

import json
import logging
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from pydantic import ValidationError

from deeprad.core.privacy import DPSteps, epsilon_of
from deeprad.operator.api.common import CheckpointRef, ConditionStatus, DataSelector, Metrics
from deeprad.operator.api.federatedround import FederatedRoundSpec, RoundState, SiteState
from deeprad.operator.api.federatedstudy import FederatedStudySpec, FederatedStudyStatus
from deeprad.operator.api.hospitalsite import HospitalSiteSpec, HospitalSiteStatus
from deeprad.operator.decide import conditions as cond
from deeprad.operator.decide import sites, study
from deeprad.operator.decide.timeutil import parse_duration, parse_time
from deeprad.operator.render.rounds import round_spec

logging.getLogger("absl").setLevel(logging.ERROR)  # dp-accounting's skipped RDP orders
KEY_A = "Psy2mQcyA7EZmI3zzfHv9PHBlyb1GNO4M644weEL8yQ="
KEY_B = "W7OAMzybUo+M6JmOq0mD4nXn2J9bn3UDcx1ivMUULBI="
T0 = datetime(2030, 7, 7, 12, 0, tzinfo=UTC)  # a Sunday, British Summer Time


def _site(**spec: Any) -> HospitalSiteSpec:
    return HospitalSiteSpec.model_validate(
        {"identity": {"signingKey": KEY_A, "keyAgreementKey": KEY_B}, **spec})


# ---- conditions -------------------------------------------------------------------------------


def test_transition_time_changes_only_when_the_status_flips() -> None:
    first = cond.set_condition(None, cond.Desired.false("Ready", "NoHeartbeat", "a"), 1, T0)
    later = T0 + timedelta(minutes=5)
    same = cond.set_condition(first, cond.Desired.false("Ready", "Other", "b"), 2, later)
    assert same[0].last_transition_time == "2030-07-07T12:00:00Z"
    assert (same[0].reason, same[0].message, same[0].observed_generation) == ("Other", "b", 2)
    flipped = cond.set_condition(same, cond.Desired.true("Ready", "AgentReady"), 2, later)
    assert flipped[0].last_transition_time == "2030-07-07T12:05:00Z"
    merged = cond.merge(flipped, [cond.Desired.true("Reachable", "HeartbeatRecent")], 2, later)
    assert [c.type for c in merged] == ["Ready", "Reachable"]
    assert cond.is_true(merged, "Ready") and not cond.is_true(merged, "Missing")
    assert cond.dump(merged)[1] == {"type": "Reachable", "status": "True",
                                    "observedGeneration": 2, "reason": "HeartbeatRecent",
                                    "message": "", "lastTransitionTime": "2030-07-07T12:05:00Z"}


def test_go_durations_and_timestamps() -> None:
    assert parse_duration("1h30m") == timedelta(minutes=90)
    assert parse_duration("500ms") == timedelta(milliseconds=500)
    with pytest.raises(ValueError, match=r"spec.deadline: '5 minutes' is not a Go duration"):
        parse_duration("5 minutes", "spec.deadline")
    assert parse_time("2030-07-07T12:00:00.123456Z") == T0 + timedelta(microseconds=123456)
    with pytest.raises(ValueError, match="no time zone"):
        parse_time("2030-07-07T12:00:00")


# ---- site health ------------------------------------------------------------------------------


def _lease(renew: datetime | None, **notes: str) -> dict[str, Any]:
    spec = {"renewTime": renew.strftime("%Y-%m-%dT%H:%M:%S.%fZ")} if renew else {}
    return {"metadata": {"name": "deeprad-agent", "annotations": notes}, "spec": spec}


def _health(spec: HospitalSiteSpec, lease: dict[str, Any] | None,
            now: datetime = T0) -> dict[str, tuple[str, str]]:
    report = sites.read_lease("st-marys", lease)
    status = sites.observed_status(HospitalSiteStatus(), report)
    return {d.type: (d.status.value, d.reason)
            for d in sites.site_conditions("st-marys", spec, status, report, now)}


def test_reachable_from_the_lease_renew_time_against_the_heartbeat_timeout() -> None:
    gpus = json.dumps({"resourceName": "nvidia.com/gpu", "allocatable": 1})
    report = {"deeprad.io/agent-version": "0.1.0", "deeprad.io/observed-gpus": gpus}
    spec = _site(connection={"heartbeatTimeout": "2m"})
    assert _health(spec, None) == {"Reachable": ("False", "NoHeartbeat"),
                                   "Ready": ("False", "NotReachable")}
    fresh = _lease(T0 - timedelta(seconds=30), **report)
    assert _health(spec, fresh) == {"Reachable": ("True", "HeartbeatRecent"),
                                    "Ready": ("True", "AgentReady")}
    stale = _lease(T0 - timedelta(minutes=3), **report)
    assert _health(spec, stale)["Reachable"] == ("False", "HeartbeatExpired")
    assert _health(spec, _lease(T0))["Ready"] == ("False", "AgentNotReported")
    assert _health(_site(suspend=True), fresh)["Ready"] == ("False", "Suspended")
    assert _health(_site(gpu={"count": 2}), fresh)["Ready"] == ("False", "InsufficientGPUs")
    bad = _lease(T0, **{"deeprad.io/agent-version": "0.1.0",
                        "deeprad.io/observed-gpus": "{not json"})
    assert _health(spec, bad)["Ready"] == ("False", "InvalidAgentReport")
    push = _site(connection={"mode": "push", "kubeconfigSecretRef": {
        "name": "kc", "namespace": "deeprad-system"}})
    # Push sites heartbeat through the hub's agent for them: the same Lease, the same rule.
    assert _health(push, None)["Reachable"] == ("False", "NoHeartbeat")
    assert _health(push, fresh) == _health(spec, fresh)


def test_heartbeat_message_says_how_old_and_which_field() -> None:
    spec = _site()
    d = sites.reachable("st-marys", spec, T0 - timedelta(minutes=5), T0)
    assert "5m0s ago" in d.message and "spec.connection.heartbeatTimeout 2m" in d.message


def test_maintenance_windows_follow_their_time_zone_and_daylight_saving() -> None:
    windows = _site(maintenanceWindows=[{"days": ["Sun"], "start": "02:00", "duration": "4h",
                                         "timeZone": "Europe/London"}]).maintenance_windows
    # 02:00 BST is 01:00 UTC in July; in January 02:00 GMT is 02:00 UTC.
    assert sites.active_window(windows, datetime(2030, 7, 7, 1, 0, tzinfo=UTC)) is not None
    assert sites.active_window(windows, datetime(2030, 7, 7, 0, 59, tzinfo=UTC)) is None
    assert sites.active_window(windows, datetime(2030, 7, 7, 4, 59, tzinfo=UTC)) is not None
    assert sites.active_window(windows, datetime(2030, 7, 7, 5, 0, tzinfo=UTC)) is None
    assert sites.active_window(windows, datetime(2030, 1, 6, 1, 30, tzinfo=UTC)) is None
    hit = sites.active_window(windows, datetime(2030, 1, 6, 2, 30, tzinfo=UTC))
    assert hit is not None and hit.end == datetime(2030, 1, 6, 6, 0, tzinfo=UTC)
    # A window that starts Saturday 22:00 for 6h still holds on Sunday morning.
    late = _site(maintenanceWindows=[{"days": ["Sat"], "start": "22:00",
                                      "duration": "6h"}]).maintenance_windows
    assert sites.active_window(late, datetime(2030, 7, 7, 3, 59, tzinfo=UTC)) is not None
    bad = _site(maintenanceWindows=[{"days": ["Sun"], "start": "02:00", "duration": "1h",
                                     "timeZone": "Mars/Olympus"}]).maintenance_windows
    with pytest.raises(ValueError, match=r"maintenanceWindows\[0\].timeZone: unknown"):
        sites.active_window(bad, T0)


def _ready_view(name: str = "st-marys", running: int = 0, **spec: Any) -> sites.SiteView:
    ready = cond.set_condition(None, cond.Desired.true("Ready", "AgentReady"), 1, T0)
    return sites.SiteView(name, _site(**spec), ready, HospitalSiteStatus(), running)


def test_admission_refuses_with_the_first_reason_that_applies() -> None:
    selector = DataSelector(modality="mri", labels=["normal", "tumor"], min_samples=100)
    data = {"modality": "mri", "labels": ["normal", "tumor"], "sampleCount": 500}
    assert sites.admit(_ready_view(data=data), selector, T0).admitted
    cases = {
        "Suspended": _ready_view(data=data, suspend=True),
        "NotReady": sites.SiteView("st-marys", _site(data=data)),
        "InMaintenanceWindow": _ready_view(data=data, maintenanceWindows=[
            {"days": ["Sun"], "start": "11:00", "duration": "2h", "timeZone": "UTC"}]),
        "AtCapacity": _ready_view(data=data, running=1),
        "DataMismatch": _ready_view(data={**data, "modality": "ct"}),
    }
    for reason, view in cases.items():
        got = sites.admit(view, selector, T0)
        assert (got.admitted, got.reason) == (False, reason), got
        assert got.message.startswith("HospitalSite st-marys: ")
    few = sites.admit(_ready_view(data={**data, "sampleCount": 50}), selector, T0)
    assert "sampleCount 50 is below the study's minSamples 100" in few.message
    assert sites.admit(_ready_view(), DataSelector(), T0).admitted  # no data, no selector
    assert sites.admit(_ready_view(), selector, T0).reason == "DataMismatch"


def test_label_selectors() -> None:
    from deeprad.operator.api.common import LabelSelector
    sel = LabelSelector.model_validate({"matchLabels": {"tier": "a"}, "matchExpressions": [
        {"key": "region", "operator": "In", "values": ["uk", "de"]},
        {"key": "retired", "operator": "DoesNotExist"}]})
    assert sites.matches_selector({"tier": "a", "region": "uk"}, sel)
    assert not sites.matches_selector({"tier": "a", "region": "fr"}, sel)
    assert not sites.matches_selector({"tier": "a", "region": "uk", "retired": "y"}, sel)
    assert sites.matches_selector({}, None) and sites.matches_selector({}, LabelSelector())


# ---- study ------------------------------------------------------------------------------------


def _study(**spec: Any) -> FederatedStudySpec:
    return FederatedStudySpec.model_validate({"model": {"name": "tumor-cnn"}, "rounds": 5,
                                              **spec})


def _done(n: int, auroc: float | None = None, state: RoundState = RoundState.SUCCEEDED,
          **kw: Any) -> study.RoundView:
    ckpt = CheckpointRef(uri=f"s3://b/ns/s/rounds/{n}/global.safetensors", round=n)
    return study.RoundView(number=n, state=state, output_checkpoint=ckpt,
                           metrics=Metrics(auroc=auroc, loss=1 - (auroc or 0)), **kw)


def _decide(spec: FederatedStudySpec, rounds: list[study.RoundView],
            candidates: list[study.Candidate] | None = None,
            status: FederatedStudyStatus | None = None) -> study.StudyDecision:
    return study.decide_study("s", 3, spec, status or FederatedStudyStatus(), rounds,
                              candidates or [], T0, namespace="ns")


def _candidate(name: str, sample_count: int | None = None, *namespaces: str
               ) -> study.Candidate:
    """A HospitalSite serving the study's namespace (or only `namespaces`, when given)."""
    return study.Candidate(name, sample_count, namespaces or ("ns",))


def test_first_round_starts_from_the_initial_checkpoint_then_carries_forward() -> None:
    initial = {"uri": "s3://b/init.safetensors", "digest": "a" * 64}
    d = _decide(_study(initialCheckpoint=initial), [])
    assert d.action == study.CreateRound(1, CheckpointRef(**initial), None, None)
    assert (d.status.state, d.status.current_round, d.status.start_time) == (
        "Running", 1, "2030-07-07T12:00:00Z")
    assert cond.is_true(d.status.conditions, "Progressing")
    nxt = _decide(_study(), [_done(1, 0.7), _done(2, 0.8)]).action
    assert isinstance(nxt, study.CreateRound) and nxt.number == 3
    assert nxt.input_checkpoint is not None and nxt.input_checkpoint.round == 2


def test_waits_while_the_newest_round_runs() -> None:
    d = _decide(_study(), [_done(1, 0.7), study.RoundView(2, RoundState.TRAINING)])
    assert d.action == study.WaitForRound(2)
    assert (d.status.completed_rounds, d.status.current_round) == (1, 2)
    assert d.status.best_metric is not None and d.status.best_metric.value == 0.7


@pytest.mark.parametrize(("spec", "aurocs", "reason"), [
    ({"rounds": 2}, [0.6, 0.7], "RoundsCompleted"),
    ({"stopping": {"target": 0.9}}, [0.6, 0.91], "TargetReached"),
    ({"stopping": {"patience": 2, "minDelta": 0.01}}, [0.8, 0.805, 0.79], "PatienceExhausted"),
    ({"stopping": {"metric": "loss", "target": 0.15}}, [0.6, 0.9], "TargetReached"),
])
def test_stopping_rules(spec: dict[str, Any], aurocs: list[float], reason: str) -> None:
    d = _decide(_study(**spec, finalEvaluation=False),
                [_done(i + 1, a) for i, a in enumerate(aurocs)])
    assert isinstance(d.action, study.Stop) and d.action.reason == reason, d.action
    assert d.status.state == "Succeeded" and d.status.completion_time == "2030-07-07T12:00:00Z"
    assert cond.is_true(d.status.conditions, "Succeeded")
    assert not cond.is_true(d.status.conditions, "Progressing")


def test_patience_counts_rounds_since_the_best_and_min_delta() -> None:
    d = _decide(_study(stopping={"patience": 3, "minDelta": 0.01}),
                [_done(1, 0.8), _done(2, 0.805), _done(3, 0.9)])
    assert d.status.rounds_without_improvement == 0
    assert d.status.best_metric is not None and d.status.best_metric.round == 3
    assert isinstance(d.action, study.CreateRound)


def test_a_failed_round_fails_the_study_and_says_how_to_retry() -> None:
    d = _decide(_study(), [_done(1, 0.7), _done(2, state=RoundState.FAILED,
                                               failure="1 site reported, minSites is 2")])
    assert isinstance(d.action, study.Stop) and d.action.outcome == "Failed"
    assert "FederatedRound s-r2 failed: 1 site reported" in d.action.message
    assert "delete that round" in d.action.message
    assert d.status.state == "Failed" and cond.is_true(d.status.conditions, "Failed")


def test_rounds_copy_the_studys_admission_timeout_and_priority_for_the_queue() -> None:
    spec = _study(admissionTimeout="30m", priority=7)
    made = round_spec("s", spec, study.CreateRound(1, None, ("a", "b")))
    assert (made.admission_timeout, made.priority) == ("30m", 7)
    default = round_spec("s", _study(), study.CreateRound(1, None, None))
    assert (default.admission_timeout, default.priority) == ("6h", 0)
    by_hand = FederatedRoundSpec.model_validate({"round": 1, "model": {"name": "tumor-cnn"}})
    assert (by_hand.admission_timeout, by_hand.priority) == ("6h", 0)
    with pytest.raises(ValidationError, match="admissionTimeout"):
        _study(admissionTimeout="6 hours")
    with pytest.raises(ValidationError, match="priority"):
        _study(priority=5000)


def test_a_round_failed_for_want_of_sites_fails_the_study_naming_each_sites_reason() -> None:
    why = ("FederatedRound s-r1: 1 site(s) admissible, spec.minSites is 2 (b: AtCapacity); "
           "still short after spec.admissionTimeout 6h; make more sites Ready or lower minSites")
    d = _decide(_study(), [_done(1, state=RoundState.FAILED, failure=why)])
    assert isinstance(d.action, study.Stop) and d.action.reason == "RoundFailed"
    assert d.action.message == f"FederatedRound s-r1 failed: {why}; delete that round to run " \
                               "it again"


def test_selector_is_resolved_and_quorum_checked() -> None:
    spec = _study(siteSelector={"matchLabels": {"x": "y"}}, roundTemplate={"minSites": 2})
    blocked = _decide(spec, [], [_candidate("a")]).action
    assert isinstance(blocked, study.Blocked) and blocked.reason == "NotEnoughSites"
    assert "matches 1 HospitalSite(s) that allow namespace ns (a), below roundTemplate.minSites" \
        " 2" in blocked.message
    ok = _decide(spec, [], [_candidate("b"), _candidate("a")]).action
    assert isinstance(ok, study.CreateRound) and ok.sites == ("a", "b")
    listed = _decide(_study(sites=["c", "a"], roundTemplate={"minSites": 2}), []).action
    assert isinstance(listed, study.CreateRound) and listed.sites == ("c", "a")


def test_conditions_keep_their_transition_time_across_passes() -> None:
    first = _decide(_study(), [])
    later = study.decide_study("s", 3, _study(), first.status,
                               [study.RoundView(1, RoundState.TRAINING)], [],
                               T0 + timedelta(minutes=1), namespace="ns")
    progressing = cond.find(later.status.conditions, "Progressing")
    assert progressing is not None and progressing.reason == "RoundRunning"
    assert progressing.last_transition_time == "2030-07-07T12:00:00Z"
    assert later.status.start_time == first.status.start_time


# ---- privacy ----------------------------------------------------------------------------------


def _dp_study(epsilon: float) -> FederatedStudySpec:
    return _study(rounds=50, privacyBudget={"epsilon": epsilon, "delta": 1e-5},
                  roundTemplate={"minSites": 2, "training": {"localEpochs": 1, "batchSize": 32},
                                 "privacy": {"differentialPrivacy": {
                                     "noiseMultiplier": 2.0, "maxGradNorm": 1.0}}})


def test_dp_steps_match_opacus_batches() -> None:
    from deeprad.operator.api.common import LocalTraining
    steps = study.dp_steps(study.train_records(1000, 0.2), LocalTraining(local_epochs=2,
                                                                          batch_size=32), 1.1)
    assert steps == DPSteps(noise_multiplier=1.1, sample_rate=1 / 25, steps=50)


def test_privacy_budget_stops_the_study_before_it_would_be_exceeded() -> None:
    sites_ = [_candidate("a", 1000), _candidate("b", 400)]
    spec = _dp_study(epsilon=1.5).model_copy(update={"final_evaluation": False})
    trained = {"a": SiteState.REPORTED, "b": SiteState.REPORTED}
    history: list[study.RoundView] = []
    created = 0
    for n in range(1, 51):
        d = _decide(spec, history, sites_)
        if not isinstance(d.action, study.CreateRound):
            break
        created += 1
        assert d.action.epsilon_after is not None and d.action.epsilon_after <= 1.5
        history.append(_done(n, 0.5 + n / 1000, sites=trained, dp=spec.round_template.privacy
                             .differential_privacy, training=spec.round_template.training))
    assert isinstance(d.action, study.Stop) and d.action.reason == "PrivacyBudgetExhausted"
    # The accountant, asked directly: the largest site's ε after k rounds.
    per_round = [study.dp_steps(study.train_records(n, 0.2), spec.round_template.training, 2.0)
                 for n in (1000, 400)]

    def spent(k: int) -> float:
        return max(epsilon_of([r] * k, 1e-5) for r in per_round)

    assert spent(created) <= 1.5 < spent(created + 1) and created >= 2
    assert d.status.epsilon_spent == pytest.approx(spent(created))


def test_privacy_needs_every_sites_sample_count() -> None:
    d = _decide(_dp_study(5.0), [], [_candidate("a", 1000), _candidate("b")])
    assert isinstance(d.action, study.Blocked) and d.action.reason == "PrivacyNotAccountable"
    assert "HospitalSite b: its spec.data.sampleCount is not set" in d.action.message
    progressing = cond.find(d.status.conditions, "Progressing")
    assert progressing is not None and progressing.status == ConditionStatus.FALSE


# ---- the heartbeat's status writes ------------------------------------------------------------


def test_a_renewing_agent_changes_the_site_status_only_every_few_minutes() -> None:
    """Each renewal of the Lease must not become a status write: the Reachable message carries
    no timestamp, and status.lastHeartbeat is copied only once it is HEARTBEAT_RECORD_EVERY
    behind the Lease (absent, unreadable or ahead: at once)."""
    spec = _site(connection={"heartbeatTimeout": "2m"})
    gpus = json.dumps({"resourceName": "nvidia.com/gpu", "allocatable": 1})
    every = sites.HEARTBEAT_RECORD_EVERY
    status = HospitalSiteStatus()
    written = []
    for seconds in range(0, int(every.total_seconds()) * 2 + 1, 10):  # a renewal every 10 s
        at = T0 + timedelta(seconds=seconds)
        report = sites.read_lease("st-marys", _lease(at, **{
            "deeprad.io/agent-version": "0.1.0", "deeprad.io/observed-gpus": gpus}))
        observed = sites.observed_status(status, report)
        observed.conditions = cond.merge(status.conditions, sites.site_conditions(
            "st-marys", spec, observed, report, at + timedelta(seconds=1)), 1, at)
        if observed != status:
            written.append(seconds)
        status = observed
    assert written == [0, every.total_seconds(), 2 * every.total_seconds()]
    assert cond.find(status.conditions, "Reachable").message == (  # type: ignore[union-attr]
        "the site agent renews its heartbeat Lease within spec.connection.heartbeatTimeout 2m")
    recorded = sites.recorded_heartbeat
    assert recorded(None, T0, every) == "2030-07-07T12:00:00Z"
    assert recorded("not a time", T0, every) == "2030-07-07T12:00:00Z"
    assert recorded("2030-07-07T13:00:00Z", T0, every) == "2030-07-07T12:00:00Z"  # clock reset
    assert recorded("2030-07-07T12:00:00Z", None, every) == "2030-07-07T12:00:00Z"


def test_an_expired_heartbeat_message_changes_once_a_minute() -> None:
    spec = _site()
    last = T0 - timedelta(minutes=5)
    messages = {sites.reachable("st-marys", spec, last, T0 + timedelta(seconds=s)).message
                for s in range(0, 60, 15)}
    assert messages == {f"last heartbeat {'2030-07-07T11:55:00Z'}, 5m0s ago, older than "
                        "spec.connection.heartbeatTimeout 2m"}

"""The operator for segmentation studies and the final evaluation, with plain data: the study
names its task (and the network must serve it), sites declare the kind of data they hold,
segmentation metrics reach the status, and a study that succeeded scores its final model on
the sites' held-out data in an evaluation round that uploads nothing and spends no ε."""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from pydantic import ValidationError

from deeprad.core.errors import ConfigError
from deeprad.core.identity import Identity
from deeprad.core.protocol import (
    AggregateReport,
    CheckpointManifest,
    ClinicalMetrics,
    LesionCounts,
    ModelSpec,
    SiteResult,
    StrategySpec,
)
from deeprad.operator.api.common import CheckpointRef, Metrics, RoundMode
from deeprad.operator.api.federatedround import (
    FederatedRoundSpec,
    FederatedRoundStatus,
    RoundState,
    SiteState,
)
from deeprad.operator.api.federatedstudy import (
    FederatedStudySpec,
    FederatedStudyStatus,
    SiteFinalMetrics,
)
from deeprad.operator.api.hospitalsite import HospitalSiteSpec
from deeprad.operator.api.sitetask import SiteTaskSpec, TaskResult, TaskState
from deeprad.operator.decide import round as rules
from deeprad.operator.decide import sites, study
from deeprad.operator.decide.conditions import Desired, set_condition
from deeprad.operator.render.rounds import round_spec
from deeprad.operator.site.config import AgentConfig
from deeprad.operator.site.training import task_result, training_task

T0 = datetime(2030, 7, 8, 9, 0, tzinfo=UTC)
HUB = Identity.generate("hub", "hub")
KEYS = {n: Identity.generate(n) for n in ("a", "b")}
SEG_MODEL = {"name": "unet3d", "task": "segmentation", "kwargs": {"in_channels": 3}}


def _seg_metrics(dice: float, hd95: float = 4.0) -> ClinicalMetrics:
    return ClinicalMetrics(n=4, positives=3, loss=0.5, auroc=0.8, sensitivity=0.7,
                           specificity=0.9, accuracy=0.75, dice=dice, hd95=hd95, hd95_cases=3,
                           lesion_sensitivity={"0.125": 0.2, "1": 0.6, "8": 0.9},
                           lesions=LesionCounts(thresholds=[0.5], hits=[3], false_positives=[1],
                                                lesions=5, scans=4))


# ---- the study names its task -----------------------------------------------------------------


def test_the_model_must_serve_the_studys_task() -> None:
    ok = FederatedStudySpec.model_validate({"model": SEG_MODEL, "rounds": 2})
    assert ok.model.core() == ModelSpec(name="unet3d", kwargs={"in_channels": 3},
                                        task="segmentation")
    assert FederatedStudySpec.model_validate(
        {"model": {"name": "tumor-cnn"}, "rounds": 1}).model.task == "classification"
    with pytest.raises(ValidationError, match=re.escape(
            "model.task is classification but unet3d is a segmentation network: set "
            "model.task: segmentation")):
        FederatedStudySpec.model_validate({"model": {"name": "unet3d"}, "rounds": 2})
    with pytest.raises(ValidationError, match="tumor-cnn is a classification network"):
        FederatedStudySpec.model_validate(
            {"model": {"name": "tumor-cnn", "task": "segmentation"}, "rounds": 2})


def test_the_best_round_is_ranked_by_the_tasks_primary_metric() -> None:
    seg = FederatedStudySpec.model_validate({"model": SEG_MODEL, "rounds": 5})
    rounds = [_round(1, Metrics(dice=0.4, auroc=0.9)), _round(2, Metrics(dice=0.6, auroc=0.7))]
    best = study.decide_study("s", 1, seg, FederatedStudyStatus(), rounds, [], T0,
                              namespace="ns").status.best_metric
    assert best is not None and (best.name, best.value, best.round) == ("dice", 0.6, 2)
    # hd95 is a distance: lower is better, like loss.
    by_hd95 = seg.model_copy(update={"stopping": seg.stopping.model_copy(
        update={"metric": "hd95"})})
    rounds = [_round(1, Metrics(hd95=9.0)), _round(2, Metrics(hd95=12.0))]
    best = study.decide_study("s", 1, by_hd95, FederatedStudyStatus(), rounds, [], T0,
                              namespace="ns").status.best_metric
    assert best is not None and (best.name, best.value, best.round) == ("hd95", 9.0, 1)


# ---- sites declare their kind of data ---------------------------------------------------------


def _site(kind: str | None) -> sites.SiteView:
    ident = KEYS["a"].public()
    data = {"modality": "mri", "sampleCount": 8, **({"kind": kind} if kind else {})}
    spec = HospitalSiteSpec.model_validate({
        "identity": {"signingKey": ident.signing_key, "keyAgreementKey": ident.key_agreement_key},
        "data": data, "studyNamespaces": ["ns"]})
    ready = set_condition(None, Desired.true(sites.READY, "AgentReady"), 1, T0)
    return sites.SiteView("a", spec, tuple(ready))


def test_a_site_of_2d_slices_cannot_join_a_segmentation_study() -> None:
    selector = FederatedStudySpec.model_validate({"model": SEG_MODEL, "rounds": 1}).data
    refused = sites.admit(_site(None), selector, T0, "segmentation")
    assert (refused.admitted, refused.reason) == (False, "DataMismatch")
    assert refused.message == ("HospitalSite a: spec.data.kind is slices, but the study trains "
                               "segmentation, which needs volumes; choose a study of the "
                               "site's kind of data")
    assert sites.admit(_site("volumes"), selector, T0, "segmentation").admitted
    assert not sites.admit(_site("volumes"), selector, T0, "classification").admitted
    assert sites.admit(_site("volumes"), selector, T0).admitted  # no task: any data


def _task(**over: Any) -> SiteTaskSpec:
    hub = HUB.public()
    base: dict[str, Any] = {
        "roundRef": {"namespace": "research", "name": "seg-r3", "uid": "u-3"},
        "study": "seg", "studyUid": "s-uid", "round": 3, "site": "a", "model": SEG_MODEL,
        "data": {"imageSize": 24}, "privacy": {"secureAggregation": False},
        "parentDigest": "1" * 64,
        "hub": {"name": "hub", "signingKey": hub.signing_key,
                "keyAgreementKey": hub.key_agreement_key},
        "objects": [{"key": "research/seg/rounds/2/global.safetensors", "method": "GET",
                     "url": "https://s3.example/x?sig=y"}],
        "deadline": "2030-07-08T10:00:00Z"}
    return SiteTaskSpec.model_validate({**base, **over})


def test_the_agent_refuses_a_task_its_data_cannot_serve() -> None:
    anatomy = AgentConfig.model_validate({"site": "a", "training": {"dataset": {
        "kind": "anatomy", "options": {"profile": "a", "patients": 8, "seed": 1}}}})
    task = training_task(_task(mode="evaluate"), anatomy)
    assert (task.model.task, task.mode, task.dataset.kind, task.dataset.image_size) == (
        "segmentation", "evaluate", "anatomy", 24)
    slices = AgentConfig.model_validate({"site": "a"})  # a folder of 2D images
    with pytest.raises(ConfigError, match=re.escape(
            "site a: study seg trains segmentation with unet3d, but training.dataset.kind "
            "folder holds 2D images")):
        training_task(_task(), slices)
    with pytest.raises(ConfigError, match="holds 3D volumes; this site can join only "
                                          "segmentation studies"):
        training_task(_task(model={"name": "tumor-cnn"}), anatomy)


def test_a_folder_of_volumes_must_say_where_it_is() -> None:
    with pytest.raises(ValidationError, match="kind volumes needs path"):
        AgentConfig.model_validate({"site": "a", "training": {"dataset": {"kind": "volumes"}}})
    config = AgentConfig.model_validate({"site": "a", "training": {"dataset": {
        "kind": "volumes", "path": "/data", "options": {"sequences": ["t1", "flair"]}}}})
    assert training_task(_task(), config).dataset.path == "/data"


def test_an_evaluation_result_maps_its_held_out_scores_and_no_update() -> None:
    result = SiteResult(study="seg", round=3, site="a", num_samples=2,
                        global_metrics=_seg_metrics(0.5), local_metrics=None, train_loss=0.0,
                        update_sha256="", duration_s=1.5, test_metrics=_seg_metrics(0.6, 3.5),
                        test_split="validation")
    mapped = task_result(result, _task(mode="evaluate"))
    assert (mapped.update_digest, mapped.train_loss, mapped.test_split) == (
        None, None, "validation")
    assert mapped.test_metrics is not None
    assert (mapped.test_metrics.dice, mapped.test_metrics.hd95) == (0.6, 3.5)
    assert mapped.test_metrics.lesion_sensitivity == {"0.125": 0.2, "1": 0.6, "8": 0.9}


def test_metrics_keep_segmentation_fields_in_range() -> None:
    odd = _seg_metrics(1.0000001).model_copy(update={"hd95": float("inf")})
    mapped = rules.to_metrics(odd)
    assert mapped is not None and (mapped.dice, mapped.hd95) == (1.0, None)
    with pytest.raises(ValidationError, match=re.escape("lesionSensitivity.1")):
        Metrics.model_validate({"lesionSensitivity": {"1": 1.5}})


# ---- the final evaluation: the study ----------------------------------------------------------


def _round(n: int, metrics: Metrics | None = None, state: RoundState = RoundState.SUCCEEDED,
           **kw: Any) -> study.RoundView:
    ckpt = CheckpointRef(uri=f"s3://b/ns/s/rounds/{n}/global.safetensors", round=n)
    return study.RoundView(number=n, state=state, output_checkpoint=ckpt, metrics=metrics, **kw)


def _seg_study(**over: Any) -> FederatedStudySpec:
    return FederatedStudySpec.model_validate({"model": SEG_MODEL, "rounds": 2,
                                              "sites": ["a", "b"], **over})


def test_after_the_last_round_the_study_evaluates_its_final_model_then_stops() -> None:
    spec = _seg_study()
    trained = [_round(1, Metrics(dice=0.5)), _round(2)]
    create = study.decide_study("s", 1, spec, FederatedStudyStatus(), trained, [], T0,
                                namespace="ns")
    assert create.action == study.CreateRound(3, trained[1].output_checkpoint, ("a", "b"),
                                              evaluate=True)
    assert create.status.state == "Running" and create.status.completed_rounds == 2
    evaluated = round_spec("s", spec, create.action)
    assert (evaluated.mode, evaluated.round, evaluated.input_checkpoint) == (
        RoundMode.EVALUATE, 3, trained[1].output_checkpoint)
    running = study.RoundView(3, RoundState.TRAINING, mode=RoundMode.EVALUATE,
                              input_checkpoint=trained[1].output_checkpoint)
    wait = study.decide_study("s", 1, spec, create.status, [*trained, running], [], T0,
                              namespace="ns")
    assert wait.action == study.WaitForRound(3, evaluate=True)
    assert wait.status.state == "Running" and wait.status.final_metrics is None
    # The evaluation round's validation scores are round 2's (its input) aggregateMetrics.
    scored = [SiteFinalMetrics(site="a", split="test", metrics=Metrics(dice=0.7)),
              SiteFinalMetrics(site="b", split="validation", metrics=Metrics(dice=0.5))]
    done_eval = study.RoundView(3, RoundState.SUCCEEDED, mode=RoundMode.EVALUATE,
                                input_checkpoint=trained[1].output_checkpoint,
                                input_metrics=Metrics(dice=0.62),
                                test_metrics=Metrics(dice=0.61, n=4), site_scores=tuple(scored))
    assert study.metrics_to_backfill([*trained, done_eval]) == [(2, Metrics(dice=0.62))]
    trained[1] = _round(2, Metrics(dice=0.62))
    stop = study.decide_study("s", 1, spec, wait.status, [*trained, done_eval], [], T0,
                              namespace="ns")
    assert isinstance(stop.action, study.Stop) and stop.action.reason == "RoundsCompleted"
    assert stop.action.message == ("all 2 rounds ran; the final model was evaluated by "
                                   "FederatedRound s-r3")
    status = stop.status
    assert status.state == "Succeeded" and status.completed_rounds == 2
    assert status.best_metric is not None and (status.best_metric.name,
                                               status.best_metric.round) == ("dice", 2)
    assert status.final_metrics == Metrics(dice=0.61, n=4)
    final = status.final_evaluation
    assert final is not None and (final.round, final.metric, final.value) == (
        "s-r3", "dice", 0.61)
    assert final.checkpoint == trained[1].output_checkpoint
    assert final.validation_metrics == Metrics(dice=0.62) and final.sites == scored


def test_a_failed_evaluation_does_not_fail_the_study_and_can_be_turned_off() -> None:
    spec = _seg_study()
    failed = study.RoundView(3, RoundState.FAILED, mode=RoundMode.EVALUATE,
                             failure="1 site(s) reported, spec.minSites is 2")
    stop = study.decide_study("s", 1, spec, FederatedStudyStatus(),
                              [_round(1), _round(2), failed], [], T0, namespace="ns")
    assert isinstance(stop.action, study.Stop) and stop.status.state == "Succeeded"
    assert stop.action.message.endswith("the final evaluation (FederatedRound s-r3) failed: "
                                        "1 site(s) reported, spec.minSites is 2")
    assert stop.status.final_metrics is None
    assert stop.status.final_evaluation is not None
    assert stop.status.final_evaluation.state == "Failed"
    off = study.decide_study("s", 1, _seg_study(finalEvaluation=False), FederatedStudyStatus(),
                             [_round(1), _round(2)], [], T0, namespace="ns")
    assert isinstance(off.action, study.Stop) and off.status.final_evaluation is None
    # A study that failed has no final model worth scoring.
    broken = study.decide_study("s", 1, spec, FederatedStudyStatus(),
                                [_round(1), _round(2, state=RoundState.FAILED)], [], T0,
                                namespace="ns")
    assert isinstance(broken.action, study.Stop) and broken.action.outcome == "Failed"


def test_an_evaluation_round_spends_no_epsilon() -> None:
    spec = _seg_study(privacyBudget={"epsilon": 8, "delta": 1e-5}, roundTemplate={
        "privacy": {"differentialPrivacy": {"noiseMultiplier": 1.0, "maxGradNorm": 1.0}}})
    dp = round_spec("s", spec, study.CreateRound(1, None, ("a", "b"))).privacy
    candidates = [study.Candidate("a", 8, ("ns",)), study.Candidate("b", 8, ("ns",))]
    reported = {"a": SiteState.REPORTED, "b": SiteState.REPORTED}
    trained = [_round(1, sites=reported, dp=dp.differential_privacy),
               _round(2, sites=reported, dp=dp.differential_privacy)]
    before = study.decide_study("s", 1, spec, FederatedStudyStatus(), trained, candidates, T0,
                                namespace="ns")
    assert isinstance(before.action, study.CreateRound) and before.action.evaluate
    assert before.action.noise_multiplier == 1.0  # the policy sees the training settings
    evaluation = study.RoundView(3, RoundState.SUCCEEDED, uid="u3", sites=reported,
                                 dp=dp.differential_privacy, mode=RoundMode.EVALUATE)
    after = study.decide_study("s", 1, spec, FederatedStudyStatus(), [*trained, evaluation],
                               candidates, T0, namespace="ns")
    assert after.status.epsilon_spent == before.status.epsilon_spent
    assert study.reservations_to_store("s", "ns", "uid", [evaluation], candidates,
                                       study.LedgerFacts()) == []


# ---- the final evaluation: the round ----------------------------------------------------------


PARENT = CheckpointManifest(study="s", round=2, producer="t",
                            model=ModelSpec(name="unet3d", task="segmentation"),
                            payload_sha256="1" * 64, parent_sha256=None)


def _eval_spec(**over: Any) -> FederatedRoundSpec:
    return FederatedRoundSpec.model_validate({
        "round": 3, "model": SEG_MODEL, "sites": ["a", "b"], "minSites": 2, "mode": "evaluate",
        **over})


def _world(now: datetime, **kw: Any) -> rules.RoundWorld:
    views = [_site("volumes"), _site("volumes")]
    views[1] = sites.SiteView("b", views[1].spec, views[1].conditions)
    kw.setdefault("store", rules.StoreView(input_manifest=PARENT))
    return rules.RoundWorld(now=now, created=T0, candidates=views, namespace="ns", **kw)


def _scored(site: str, dice: float) -> TaskResult:
    return TaskResult(samples=2, global_metrics=Metrics(dice=dice - 0.1),
                      test_metrics=Metrics(dice=dice), test_split="test", duration_seconds=2.0)


def test_an_evaluation_round_pools_its_sites_scores_without_an_exchange() -> None:
    # Secure aggregation as the study trains: the sites exchange nothing in an evaluation,
    # so the aggregator Job starts only once they reported, to pool their scores.
    spec = _eval_spec()
    assert spec.privacy.secure_aggregation
    admitted = rules.decide_round("s-r3", 1, spec, FederatedRoundStatus(), _world(T0))
    assert rules.CreateTasks(("a", "b"), "1" * 64, ("a", "b")) in admitted.actions
    assert not any(isinstance(a, rules.Aggregate) for a in admitted.actions)
    tasks = {"a": rules.TaskView("t-a", TaskState.SUCCEEDED, result=_scored("a", 0.7)),
             "b": rules.TaskView("t-b", TaskState.RUNNING)}
    later = T0 + timedelta(minutes=2)
    waiting = rules.decide_round("s-r3", 1, spec, admitted.status, _world(later, tasks=tasks))
    assert waiting.actions == [] and waiting.status.state == RoundState.TRAINING
    entry = {s.site: s for s in waiting.status.sites or ()}["a"]
    assert (entry.state, entry.reason, entry.test_split) == (
        SiteState.REPORTED, "ModelEvaluated", "test")
    assert entry.metrics == Metrics(dice=0.6) and entry.test_metrics == Metrics(dice=0.7)
    tasks["b"] = rules.TaskView("t-b", TaskState.SUCCEEDED, result=_scored("b", 0.5))
    pool = rules.decide_round("s-r3", 1, spec, waiting.status, _world(later, tasks=tasks))
    assert pool.actions == [rules.Aggregate(("a", "b"), ("a", "b"))]
    report = AggregateReport(study="s", round=3, strategy=StrategySpec(), contributors=[],
                             rejected=[], missing=[], federated_metrics=_seg_metrics(0.55),
                             test_metrics=_seg_metrics(0.6), evaluated_sites=["a", "b"],
                             checkpoint_sha256="1" * 64, duration_s=0.1)
    done = rules.decide_round("s-r3", 1, spec, pool.status, _world(
        later + timedelta(seconds=20), tasks=tasks, aggregator=rules.JobView("Succeeded"),
        store=rules.StoreView(input_manifest=PARENT, aggregate=report)))
    status = done.status
    assert done.finished and status.state == RoundState.SUCCEEDED
    assert status.output_checkpoint is None and status.reported_sites == 2
    assert status.input_metrics is not None and status.input_metrics.dice == 0.55
    assert status.test_metrics is not None and status.test_metrics.dice == 0.6
    assert status.test_metrics.lesion_sensitivity == {"0.125": 0.2, "1": 0.6, "8": 0.9}


def test_an_evaluation_task_reserves_no_epsilon_at_the_site() -> None:
    from deeprad.operator.site import decide as site_decide
    from deeprad.operator.site.ledger import Ledger
    dp = {"secureAggregation": False,
          "differentialPrivacy": {"noiseMultiplier": 1.1, "maxGradNorm": 1.0, "delta": 1e-5}}
    config = AgentConfig.model_validate({
        "site": "a", "store": {"endpoint": "https://s3.example"},
        "training": {"dataset": {"kind": "anatomy", "options": {"patients": 8}}}})
    for mode, reserved in (("train", True), ("evaluate", False)):
        task = site_decide.TaskView("t", "u", site_decide.SiteTaskStatus(),
                                    _task(mode=mode, privacy=dp))
        actions = site_decide.decide_task(config, task, None, T0, Ledger())
        kinds = [type(a).__name__ for a in actions]
        assert ("RecordPrivacy" in kinds) is reserved, (mode, actions)
        assert "CreateJob" in kinds, (mode, actions)


# ---- the Jobs of an evaluation round: the trainer scores, the aggregator pools ----------------


def test_an_evaluation_pass_scores_held_out_patients_uploads_nothing_and_pools(
        study: Any) -> None:
    import torch

    from deeprad.aggregator.job import run_aggregation_task
    from deeprad.core.models import build_model, model_weights
    from deeprad.core.privacy import DPConfig
    from deeprad.core.protocol import DatasetSpec, TrainingTask
    from deeprad.trainer.job import run_training_task

    model = ModelSpec(name="unet3d", task="segmentation",
                      kwargs={"in_channels": 3, "channels": [4, 8]})
    torch.manual_seed(0)
    study.write_global(model_weights(build_model(model)), round_no=2, model=model)
    results = {}
    for site, test_patients in (("a", 1), ("b", 0)):  # b holds no test split
        dataset = DatasetSpec(kind="anatomy", image_size=16, val_fraction=0.5, options={
            "patients": 3, "test_patients": test_patients, "seed": 1})
        task = TrainingTask(
            namespace="ns", study="study", round=3, site=site, model=model, dataset=dataset,
            registry_json=study.keys.registry.to_json(), mode="evaluate",
            identity_dir=str(study.keys.site_dirs[site]),
            privacy=DPConfig(noise_multiplier=1.0, max_grad_norm=1.0))  # as the study trains
        results[site] = run_training_task(task, study.store)
    scored, fallback = results["a"], results["b"]
    assert (scored.test_split, fallback.test_split) == ("test", "validation")
    assert scored.test_metrics is not None and scored.test_metrics.n == 1
    assert fallback.test_metrics == fallback.global_metrics  # scored on validation, and says so
    for result in results.values():
        assert result.privacy is None and result.update_sha256 == ""  # no ε, no update
        assert result.test_metrics is not None and 0 <= (result.test_metrics.dice or 0) <= 1
    assert not study.store.list(study.layout.updates_prefix(3))
    report = run_aggregation_task(study.task(round=3, sites=["a", "b"], min_sites=2,
                                             mode="evaluate"), study.store)
    assert report.evaluated_sites == ["a", "b"] and report.contributors == []
    assert report.test_metrics is not None and report.federated_metrics is not None
    assert report.test_metrics.n == scored.test_metrics.n + fallback.test_metrics.n
    assert report.federated_metrics.n == sum(r.global_metrics.n for r in results.values()
                                             if r.global_metrics is not None)
    assert not study.store.exists(study.layout.global_manifest(3))  # no checkpoint written

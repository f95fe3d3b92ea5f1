"""The hospital's site policy: each rule of `SitePolicy.check`, its digest, the privacy ledger,
the agent's decisions (refuse with reason PolicyViolation and no Job, hand the policy to the
Job, record DP runs before reporting), the trainer's re-check, and the digest's way to the hub
(Lease annotation -> HospitalSite status)."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from deeprad.core.errors import ConfigError, PolicyViolation
from deeprad.core.identity import Identity
from deeprad.core.layout import StudyLayout
from deeprad.core.model_catalogue import MODEL_NAMES, model_digest
from deeprad.core.privacy import DPConfig, DPSteps, epsilon_of, round_steps
from deeprad.core.protocol import ModelSpec, SecAggSpec, SiteResult, TrainConfig, TrainingTask
from deeprad.core.site_policy import (
    LEDGER_ENV,
    POLICY_ENV,
    TRAINER_IMAGE_ENV,
    LedgerEntry,
    SitePolicy,
    ledger_json,
    parse_ledger,
    parse_policy,
    policy_digest,
    policy_json,
)
from deeprad.core.store.presigned import site_grants
from deeprad.operator.api.hospitalsite import HospitalSiteStatus
from deeprad.operator.api.sitetask import SiteTaskSpec, SiteTaskStatus, TaskState
from deeprad.operator.decide.sites import (
    POLICY_DIGEST_ANNOTATION,
    observed_status,
    read_lease,
)
from deeprad.operator.site.config import AgentConfig, AllowedStore, parse_agent_config
from deeprad.operator.site.decide import (
    CreateJob,
    JobView,
    RecordPrivacy,
    ReportTask,
    TaskView,
    decide_task,
    renew_lease,
)
from deeprad.operator.site.ledger import (
    LEDGER_CONFIGMAP,
    Ledger,
    ledger_key,
    read_ledger,
    with_entry,
)
from deeprad.trainer import site_checks

T0 = datetime(2030, 7, 8, 9, 0, tzinfo=UTC)
HUB = Identity.generate("hub", "hub").public()
DP = DPConfig(noise_multiplier=1.1, max_grad_norm=1.0)
NAME, UID = "study-r2-a", "uid-2a"


def _task(**over: Any) -> TrainingTask:
    fields: dict[str, Any] = {"namespace": "research", "study": "brain", "round": 2,
                              "site": "a", "registry_json": "{}",
                              "train": TrainConfig(local_epochs=2, batch_size=16)}
    return TrainingTask(**{**fields, **over})


def _refusal(policy: SitePolicy, task: TrainingTask, **kw: Any) -> str:
    with pytest.raises(PolicyViolation) as exc:
        policy.check(task, **kw)
    text = str(exc.value)
    assert "\n" not in text
    return text


# ---- the rules --------------------------------------------------------------------------------


def test_the_default_policy_allows_every_catalogue_network_from_any_study() -> None:
    policy = SitePolicy()
    assert policy.models == list(MODEL_NAMES) and policy.studies == ["*/*"]
    for name in MODEL_NAMES:
        policy.check(_task(model=ModelSpec(name=name, kwargs={"anything": 1})))


@pytest.mark.parametrize(("patterns", "allowed"), [
    (["research/*"], True),
    (["research/brain"], True),
    (["*/brain"], True),
    (["research/br*"], True),
    (["oncology/*"], False),
    (["research/lung"], False),
    (["re*"], None),  # not <namespace>/<study>: refused when the config is read
    ([], False),
])
def test_studies_are_matched_per_namespace_and_study(patterns: list[str],
                                                     allowed: bool | None) -> None:
    if allowed is None:
        with pytest.raises(ValueError, match=r"studies\[0\] 're\*' is not <namespace>/<study>"):
            SitePolicy(studies=patterns)
        return
    policy = SitePolicy(studies=patterns)
    if allowed:
        policy.check(_task())
        return
    text = _refusal(policy, _task())
    assert text.startswith("PolicyViolation: policy.studies: study research/brain round 2 is "
                           "from hub namespace research, this site allows "), text
    assert "add research/brain (or research/*) to policy.studies (hospital admin)" in text


def test_a_wildcard_never_spans_the_slash() -> None:
    """`research*` must not match the namespace `research-x/...` through the study part."""
    policy = SitePolicy(studies=["r*/x"])
    _refusal(policy, _task(namespace="research", study="brain"))
    policy.check(_task(namespace="research", study="x"))


def test_a_digest_allows_exactly_one_network_with_exactly_its_kwargs() -> None:
    kwargs = {"channels": [4, 8]}
    digest = model_digest("tumor-cnn", kwargs)
    assert digest.startswith("sha256:") and len(digest) == 71
    assert model_digest("tumor-cnn", {"channels": [4, 8]}) == digest  # stable
    policy = SitePolicy(models=[digest])
    policy.check(_task(model=ModelSpec(name="tumor-cnn", kwargs=kwargs)))
    for other in (ModelSpec(name="tumor-cnn"), ModelSpec(name="tumor-cnn",
                                                          kwargs={"channels": [4, 16]}),
                  ModelSpec(name="tumor-jet", kwargs=kwargs)):
        text = _refusal(policy, _task(model=other))
        assert text.startswith(f"PolicyViolation: policy.models: study research/brain round 2 "
                               f"asks for model {other.name}"), text
        assert f"(digest {model_digest(other.name, other.kwargs)})" in text
        assert f"this site allows {digest[:19]}…" in text
        assert "add this digest to policy.models after reviewing it (hospital admin)" in text


def test_deeprad_models_digest_prints_the_entry_that_allows_exactly_that_model(
        capsys: pytest.CaptureFixture[str]) -> None:
    from deeprad.cli import main

    assert main(["models", "--digest", "tumor-cnn", "--kwargs", '{"channels": [4, 8]}']) == 0
    printed = capsys.readouterr().out.strip()
    assert printed == model_digest("tumor-cnn", {"channels": [4, 8]})
    SitePolicy(models=[printed]).check(_task(model=ModelSpec(name="tumor-cnn",
                                                             kwargs={"channels": [4, 8]})))
    assert main(["models", "--digest", "os:system"]) == 2
    assert "not a catalogue network" in capsys.readouterr().err


def test_a_name_entry_allows_any_kwargs_of_that_network_only() -> None:
    policy = SitePolicy(models=["tumor-jet"])
    policy.check(_task(model=ModelSpec(name="tumor-jet", kwargs={"sigma": 2})))
    assert "policy.models" in _refusal(policy, _task(model=ModelSpec(name="densenet121")))


@pytest.mark.parametrize("entry", ["os:system", "sha256:ABC", "sha256:" + "0" * 63, "monai"])
def test_model_entries_are_catalogue_names_or_digests(entry: str) -> None:
    with pytest.raises(ConfigError, match=r"policy\.models: .*neither a catalogue network"):
        parse_agent_config({"site": "a", "policy": {"models": [entry]}}, "agent.yaml")


def test_local_epochs_above_the_maximum_are_refused() -> None:
    policy = SitePolicy(max_local_epochs=2)
    policy.check(_task())
    text = _refusal(policy, _task(train=TrainConfig(local_epochs=3)))
    assert text == ("PolicyViolation: policy.maxLocalEpochs: study research/brain round 2 asks "
                    "for 3 local epochs, this site allows at most 2; lower the round's "
                    "training.localEpochs (study author) or raise policy.maxLocalEpochs "
                    "(hospital admin)")


def test_required_dp_refuses_no_dp_and_zero_noise() -> None:
    policy = SitePolicy(require_differential_privacy=True)
    policy.check(_task(privacy=DP))
    assert _refusal(policy, _task()).startswith(
        "PolicyViolation: policy.requireDifferentialPrivacy: study research/brain round 2 "
        "trains without differential privacy, this site requires DP-SGD; set "
        "privacy.differentialPrivacy")
    zero = _task(privacy=DPConfig(noise_multiplier=0, max_grad_norm=1.0))
    assert "noise multiplier 0 (no privacy)" in _refusal(policy, zero)


def test_an_epsilon_ceiling_implies_dp() -> None:
    text = _refusal(SitePolicy(max_epsilon_per_study=3), _task())
    assert text.startswith("PolicyViolation: policy.maxEpsilonPerStudy: study research/brain "
                           "round 2 trains without differential privacy, this site caps ε per "
                           "study at 3 (δ=1e-05), which needs DP-SGD"), text


def test_required_secure_aggregation() -> None:
    policy = SitePolicy(require_secure_aggregation=True)
    policy.check(_task(secagg=SecAggSpec(roster=["a", "b"], weight_normalizer=100)))
    assert _refusal(policy, _task()).startswith(
        "PolicyViolation: policy.requireSecureAggregation: study research/brain round 2 trains "
        "without secure aggregation")


def test_the_ceiling_counts_what_the_study_spent_and_then_the_planned_run() -> None:
    run = round_steps(200, batch_size=16, local_epochs=2, noise_multiplier=1.1)
    one = epsilon_of([run], 1e-5)
    two = epsilon_of([run, run], 1e-5)
    policy = SitePolicy(max_epsilon_per_study=(one + two) / 2)  # room for one run, not two
    task = _task(privacy=DP)
    policy.check(task, spent=[])
    policy.check(task, spent=[], records=200)  # the planned run alone fits
    text = _refusal(policy, task, spent=[run], records=200)
    assert text.startswith(f"PolicyViolation: policy.maxEpsilonPerStudy: study research/brain "
                           f"round 2 would raise the study's ε on this site's data from "
                           f"{one:.4g} to {two:.4g} (δ=1e-05; 200 records, batch 16, 2 local "
                           "epochs, noise multiplier 1.1)"), text
    spent = _refusal(SitePolicy(max_epsilon_per_study=one), task, spent=[run])
    assert f"the study already spent ε={one:.4g} (δ=1e-05) on this site's data in 1 run(s)" \
        in spent
    assert "only the hospital admin can raise policy.maxEpsilonPerStudy" in spent


def test_the_ceiling_is_accounted_at_the_policy_delta() -> None:
    run = DPSteps(noise_multiplier=1.0, sample_rate=0.1, steps=100)
    at_default, looser = epsilon_of([run], 1e-5), epsilon_of([run], 1e-3)
    assert looser < at_default
    SitePolicy(max_epsilon_per_study=(looser + at_default) / 2, delta=1e-3).check(
        _task(privacy=DP), spent=[run])
    _refusal(SitePolicy(max_epsilon_per_study=(looser + at_default) / 2), _task(privacy=DP),
             spent=[run])


# ---- digest and transport ---------------------------------------------------------------------


def test_the_digest_is_stable_includes_defaults_and_changes_with_any_rule() -> None:
    base = SitePolicy()
    assert policy_digest(base) == policy_digest(SitePolicy(delta=1e-5, studies=["*/*"]))
    assert policy_digest(base) == policy_digest(parse_policy(policy_json(base), "env"))
    assert policy_digest(base).startswith("sha256:") and len(policy_digest(base)) == 71
    changed = [SitePolicy(max_local_epochs=5), SitePolicy(require_secure_aggregation=True),
               SitePolicy(require_differential_privacy=True), SitePolicy(delta=1e-6),
               SitePolicy(max_epsilon_per_study=8), SitePolicy(studies=["a/*"]),
               SitePolicy(models=["tumor-cnn"])]
    digests = {policy_digest(p) for p in changed}
    assert len(digests) == len(changed) and policy_digest(base) not in digests


def test_the_policy_travels_as_camel_case_json() -> None:
    text = policy_json(SitePolicy(max_epsilon_per_study=2.5, require_secure_aggregation=True))
    data = json.loads(text)
    assert data["maxEpsilonPerStudy"] == 2.5 and data["requireSecureAggregation"] is True
    with pytest.raises(ConfigError, match=r"^\$X: policy\.maxLocalEpochs: "):
        parse_policy('{"maxLocalEpochs": 0}', "$X")


# ---- the ledger -------------------------------------------------------------------------------


def _entry(task: str = UID, round_no: int = 2) -> LedgerEntry:
    return LedgerEntry(task=task, round=round_no,
                       steps=DPSteps(noise_multiplier=1.1, sample_rate=0.2, steps=10))


def test_the_ledger_counts_each_task_once() -> None:
    key = ledger_key("research", "brain")
    assert key == "research_brain"
    cm = with_entry(None, "deeprad-training", key, _entry())
    assert cm["metadata"] == {"name": LEDGER_CONFIGMAP, "namespace": "deeprad-training",
                              "labels": cm["metadata"]["labels"]}
    again = with_entry(cm, "deeprad-training", key, _entry())  # a restarted agent, same task
    assert again["data"] == cm["data"]
    more = with_entry({**again, "metadata": {**again["metadata"], "resourceVersion": "7"}},
                      "deeprad-training", key, _entry("uid-3a", 3))
    assert more["metadata"]["resourceVersion"] == "7"  # replaced at the version read
    ledger = read_ledger(more, "cm")
    assert [e.task for e in ledger.runs("research", "brain")] == [UID, "uid-3a"]
    assert ledger.runs("research", "lung") == () and ledger.has("research", "brain", UID)


def test_a_malformed_ledger_stops_every_task_of_the_site() -> None:
    with pytest.raises(ConfigError, match="cm key research_brain: the privacy ledger is not a "
                                          "list of DP runs"):
        read_ledger({"data": {"research_brain": '{"steps": 1}'}}, "cm")
    assert parse_ledger(ledger_json([_entry(), _entry()]), "x") == [_entry()]


# ---- the agent --------------------------------------------------------------------------------


def _spec(**over: Any) -> dict[str, Any]:
    grants = site_grants(StudyLayout("research", "brain"), 2, "a", secure_aggregation=False)
    spec: dict[str, Any] = {
        "roundRef": {"namespace": "research", "name": "brain-r2", "uid": "u-2"},
        "study": "brain", "round": 2, "site": "a", "model": {"name": "tumor-cnn"},
        "training": {"localEpochs": 2, "batchSize": 16},
        "privacy": {"secureAggregation": False,
                    "differentialPrivacy": {"noiseMultiplier": 1.1, "maxGradNorm": 1.0}},
        "parentDigest": "1" * 64,
        "hub": {"name": "hub", "signingKey": HUB.signing_key,
                "keyAgreementKey": HUB.key_agreement_key},
        "objects": [{"key": k, "method": m, "url": f"https://s3.example/{k}?sig=x"}
                    for k, m in grants.items()],
        "deadline": "2030-07-08T10:00:00Z"}
    if "study_uid" in SiteTaskSpec.model_fields:  # tenant isolation keys the store by uid
        spec["studyUid"] = "s-uid-1"
    return {**spec, **over}


def task_view(status: dict[str, Any] | None = None, **spec: Any) -> TaskView:
    return TaskView(NAME, UID, SiteTaskStatus.model_validate(status or {}),
                    SiteTaskSpec.model_validate(_spec(**spec)))


def config(**policy: Any) -> AgentConfig:
    return AgentConfig(site="a", store=AllowedStore(endpoint="https://s3.example"),
                       policy=SitePolicy(**policy))


def _refused_by_agent(cfg: AgentConfig, task: TaskView, ledger: Ledger | None = None) -> str:
    actions = decide_task(cfg, task, None, T0, ledger or Ledger())
    assert [type(a) for a in actions] == [ReportTask], actions  # no CreateJob: nothing runs
    (only,) = actions
    assert isinstance(only, ReportTask)
    status = only.status
    assert status.state == TaskState.FAILED and status.reason == "PolicyViolation"
    assert status.completion_time is not None
    text = status.message or ""
    assert text.startswith("PolicyViolation: policy.") and "\n" not in text
    return text


@pytest.mark.parametrize(("policy", "spec", "rule"), [
    ({"studies": ["oncology/*"]}, {}, "studies"),
    ({"models": ["densenet121"]}, {}, "models"),
    ({"max_local_epochs": 1}, {}, "maxLocalEpochs"),
    ({"require_differential_privacy": True}, {"privacy": {"secureAggregation": False}},
     "requireDifferentialPrivacy"),
    ({"max_epsilon_per_study": 1.0}, {"privacy": {"secureAggregation": False}},
     "maxEpsilonPerStudy"),
    ({"require_secure_aggregation": True}, {}, "requireSecureAggregation"),
], ids=["studies", "models", "epochs", "dp", "epsilon-needs-dp", "secagg"])
def test_the_agent_refuses_each_rule_without_a_job(policy: dict[str, Any], spec: dict[str, Any],
                                                   rule: str) -> None:
    text = _refused_by_agent(config(**policy), task_view(**spec))
    assert text.startswith(f"PolicyViolation: policy.{rule}: "), text
    decide_task(config(), task_view(**spec), None, T0, Ledger())  # the default policy allows it


def test_the_agent_refuses_a_study_whose_ledger_reached_the_ceiling() -> None:
    run = DPSteps(noise_multiplier=1.1, sample_rate=0.2, steps=50)
    ledger = read_ledger(with_entry(None, "t", ledger_key("research", "brain"),
                                    LedgerEntry(task="uid-1a", round=1, steps=run)), "cm")
    ceiling = epsilon_of([run], 1e-5)
    text = _refused_by_agent(config(max_epsilon_per_study=ceiling), task_view(), ledger)
    assert "the study already spent ε=" in text
    # Another study's runs do not count; a higher ceiling lets this one through.
    other = read_ledger(with_entry(None, "t", ledger_key("research", "lung"),
                                   LedgerEntry(task="uid-1a", round=1, steps=run)), "cm")
    assert isinstance(decide_task(config(max_epsilon_per_study=ceiling), task_view(), None, T0,
                                  other)[1], CreateJob)
    assert isinstance(decide_task(config(max_epsilon_per_study=2 * ceiling), task_view(), None,
                                  T0, ledger)[1], CreateJob)


def test_the_job_carries_the_policy_the_image_and_the_studys_ledger() -> None:
    run = DPSteps(noise_multiplier=1.1, sample_rate=0.2, steps=5)
    entry = LedgerEntry(task="uid-1a", round=1, steps=run)
    ledger = read_ledger(with_entry(None, "t", ledger_key("research", "brain"), entry), "cm")
    cfg = config(max_epsilon_per_study=50, studies=["research/*"])
    _, create, accepted = decide_task(cfg, task_view(), None, T0, ledger)
    assert isinstance(create, CreateJob) and isinstance(accepted, ReportTask)
    env = {e["name"]: e.get("value") for e in
           create.manifest["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert parse_policy(env[POLICY_ENV], "env") == cfg.policy
    assert env[TRAINER_IMAGE_ENV] == cfg.training.image
    assert parse_ledger(env[LEDGER_ENV], "env") == [entry]
    assert accepted.status.reason is None


def _result(privacy: DPSteps | None) -> str:
    return SiteResult(study="brain", round=2, site="a", num_samples=80, global_metrics=None,
                      local_metrics=None, train_loss=0.3, update_sha256="4" * 64,
                      duration_s=12.0, privacy=privacy).model_dump_json()


def test_a_finished_dp_run_enters_the_ledger_before_the_task_is_reported() -> None:
    run = DPSteps(noise_multiplier=1.1, sample_rate=0.2, steps=10)
    job = JobView(NAME, UID, succeeded=1, outcome="Complete", log="training\n" + _result(run))
    record, done = decide_task(config(), task_view({"state": "Running"}), job, T0, Ledger())
    assert isinstance(record, RecordPrivacy) and isinstance(done, ReportTask)
    assert record == RecordPrivacy("research_brain", LedgerEntry(task=UID, round=2, steps=run,
                                                                 dataset="a"))
    assert done.status.state == TaskState.SUCCEEDED
    # Recorded already (the agent restarted before reporting): reported, not counted twice.
    ledger = read_ledger(with_entry(None, "t", record.key, record.entry), "cm")
    (only,) = decide_task(config(), task_view({"state": "Running"}), job, T0, ledger)
    assert isinstance(only, ReportTask) and only.status.state == TaskState.SUCCEEDED
    # A run without DP spends nothing.
    plain = JobView(NAME, UID, succeeded=1, outcome="Complete", log=_result(None))
    no_dp = task_view({"state": "Running"}, privacy={"secureAggregation": False})
    assert [type(a) for a in decide_task(config(), no_dp, plain,
                                         T0, Ledger())] == [ReportTask]


def test_a_trainer_refusal_is_reported_as_a_policy_violation() -> None:
    log = ("deeprad.trainer: PolicyViolation: policy.maxEpsilonPerStudy: study research/brain "
           "round 2 would raise ...")
    job = JobView(NAME, UID, failed=1, outcome="Failed", log=log)
    *_, report = decide_task(config(), task_view({"state": "Running"}), job, T0, Ledger())
    assert isinstance(report, ReportTask)
    assert (report.status.state, report.status.reason) == (TaskState.FAILED, "PolicyViolation")
    crash = JobView(NAME, UID, failed=1, outcome="Failed", log="Traceback ...\nOOM")
    *_, report = decide_task(config(), task_view({"state": "Running"}), crash, T0, Ledger())
    assert isinstance(report, ReportTask) and report.status.reason == "JobFailed"


def test_other_refusals_say_refused() -> None:
    actions = decide_task(config(), task_view(site="b"), None, T0, Ledger())
    (only,) = actions
    assert isinstance(only, ReportTask) and only.status.reason == "Refused"


def test_the_agent_config_carries_the_policy_in_camel_case(tmp_path: Path) -> None:
    cfg = parse_agent_config({"site": "a", "policy": {
        "studies": ["research/*"], "models": ["tumor-cnn", model_digest("tumor-jet", {})],
        "maxLocalEpochs": 5, "requireDifferentialPrivacy": True, "maxEpsilonPerStudy": 8,
        "delta": 1e-6, "requireSecureAggregation": True}}, "agent.yaml")
    assert cfg.policy.max_epsilon_per_study == 8 and cfg.policy.delta == 1e-6
    with pytest.raises(ConfigError, match=r"agent\.yaml: policy\.maxEpsilonPerStudy: "):
        parse_agent_config({"site": "a", "policy": {"maxEpsilonPerStudy": -1}}, "agent.yaml")
    with pytest.raises(ConfigError, match=r"agent\.yaml: policy\.allowEverything: "):
        parse_agent_config({"site": "a", "policy": {"allowEverything": True}}, "agent.yaml")


# ---- the trainer ------------------------------------------------------------------------------


def _env(policy: SitePolicy, spent: list[LedgerEntry] | None = None) -> dict[str, str]:
    env = {POLICY_ENV: policy_json(policy), TRAINER_IMAGE_ENV: "registry.example/t@sha256:"
           + "a" * 64}
    if spent is not None:
        env[LEDGER_ENV] = ledger_json(spent)
    return env


@pytest.mark.parametrize(("policy", "task", "rule"), [
    (SitePolicy(studies=["oncology/*"]), _task(), "studies"),
    (SitePolicy(models=[model_digest("tumor-cnn", {})]),
     _task(model=ModelSpec(kwargs={"channels": [8, 16]})), "models"),
    (SitePolicy(max_local_epochs=1), _task(), "maxLocalEpochs"),
    (SitePolicy(require_differential_privacy=True), _task(), "requireDifferentialPrivacy"),
    (SitePolicy(require_secure_aggregation=True), _task(), "requireSecureAggregation"),
], ids=["studies", "models", "epochs", "dp", "secagg"])
def test_the_trainer_rechecks_each_rule(policy: SitePolicy, task: TrainingTask,
                                        rule: str) -> None:
    with pytest.raises(PolicyViolation, match=rf"^PolicyViolation: policy\.{rule}: "):
        site_checks.check_task(task, _env(policy))
    assert site_checks.check_task(task, _env(SitePolicy())) is not None


def test_the_trainer_without_a_policy_checks_nothing() -> None:
    """`deeprad simulate` and runs on one's own machine have no hospital policy."""
    assert site_checks.check_task(_task(), {}) is None
    assert site_checks.policy_from_env({}) is None


def test_the_trainer_reports_the_policy_digest_and_image() -> None:
    policy = SitePolicy(max_local_epochs=4)
    found = site_checks.policy_from_env(_env(policy))
    assert found == (policy, policy_digest(policy))
    checks = site_checks.check_task(_task(), _env(policy))
    assert checks is not None and checks.digest == policy_digest(policy)
    assert checks.image == "registry.example/t@sha256:" + "a" * 64


def test_the_trainers_epsilon_check_uses_the_real_record_count() -> None:
    run = round_steps(100, batch_size=16, local_epochs=2, noise_multiplier=1.1)
    ceiling = epsilon_of([run], 1e-5) * 1.01
    checks = site_checks.check_task(_task(privacy=DP),
                                    _env(SitePolicy(max_epsilon_per_study=ceiling), []))
    assert checks is not None
    checks.check_records(_task(privacy=DP), 100)
    with pytest.raises(PolicyViolation, match="would raise the study's ε on this site's data "
                                              r"from 0 to [0-9.]+ \(δ=1e-05; 20 records"):
        checks.check_records(_task(privacy=DP), 20)  # fewer records: a larger sampling rate


def test_a_malformed_policy_in_the_jobs_environment_is_refused() -> None:
    with pytest.raises(ConfigError, match=r"^\$DEEPRAD_SITE_POLICY: policy\.studies: "):
        site_checks.check_task(_task(), {POLICY_ENV: '{"studies": ["everything"]}'})
    with pytest.raises(ConfigError, match="the privacy ledger is not a list of DP runs"):
        site_checks.check_task(_task(), {POLICY_ENV: "{}", LEDGER_ENV: "{}"})


# ---- the hub sees the digest ------------------------------------------------------------------


def test_the_lease_carries_the_policy_digest_to_the_hospital_site_status() -> None:
    cfg = config(max_local_epochs=3)
    lease = {"metadata": {"name": "deeprad-agent", "namespace": "deeprad-site-a"}, "spec": {}}
    renewal = renew_lease(cfg, lease, None, T0)
    assert renewal is not None
    notes = renewal.lease["metadata"]["annotations"]
    assert notes[POLICY_DIGEST_ANNOTATION] == policy_digest(cfg.policy)
    report = read_lease("a", renewal.lease)
    assert report.problem is None and report.policy_digest == policy_digest(cfg.policy)
    status = observed_status(HospitalSiteStatus(), report)
    assert status.policy_digest == policy_digest(cfg.policy)
    assert status.model_dump(mode="json", exclude_none=True)["policyDigest"].startswith("sha256:")


def test_a_malformed_policy_digest_is_a_problem_of_the_agent_report() -> None:
    lease = {"metadata": {"name": "deeprad-agent",
                          "annotations": {POLICY_DIGEST_ANNOTATION: "trust me"}},
             "spec": {"renewTime": "2030-07-08T09:00:00.000000Z"}}
    report = read_lease("a", lease)
    assert report.problem is not None and POLICY_DIGEST_ANNOTATION in report.problem

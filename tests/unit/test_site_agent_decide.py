"""The site agent's rules with plain data: accept a task, refuse it (policy, invalid spec,
deadline), follow its Job (created or adopted) to success or failure, report it Queued while
Kueue holds it or the scheduler cannot place its pod, notice a vanished Job, delete the Job of
a withdrawn task, and renew the heartbeat Lease."""

from __future__ import annotations

import dataclasses
import json
from datetime import UTC, datetime, timedelta
from typing import Any

from redteam import refused

from deeprad.core import __version__
from deeprad.core.errors import ConfigError
from deeprad.core.identity import Identity
from deeprad.core.layout import StudyLayout
from deeprad.core.privacy import DPSteps
from deeprad.core.protocol import SiteResult
from deeprad.core.site_policy import policy_digest
from deeprad.core.store.presigned import URLS_ENV, site_grants
from deeprad.operator.api.hospitalsite import GpuCapacity
from deeprad.operator.api.sitetask import SiteTaskSpec, SiteTaskStatus, TaskState
from deeprad.operator.decide.sites import (
    AGENT_VERSION_ANNOTATION,
    OBSERVED_GPUS_ANNOTATION,
    POLICY_DIGEST_ANNOTATION,
)
from deeprad.operator.decide.timeutil import rfc3339
from deeprad.operator.render.jobs import KUEUE_QUEUE_LABEL
from deeprad.operator.render.meta import LABEL_SITE
from deeprad.operator.site.config import (
    AgentConfig,
    AllowedStore,
    TrainingPlacement,
    parse_agent_config,
)
from deeprad.operator.site.decide import (
    DEADLINE_GRACE_SECONDS,
    LABEL_TASK_UID,
    CreateJob,
    DeleteJob,
    JobView,
    NodeView,
    RecordPrivacy,
    ReportTask,
    TaskView,
    agent_failure,
    decide_task,
    gpu_capacity,
    heartbeat_due,
    ledger_refusal,
    needs_log,
    orphan_jobs,
    renew_lease,
    report,
)
from deeprad.operator.site.ledger import Ledger, read_ledger, with_entry
from deeprad.operator.site.observe import (
    admission_messages,
    evicted_jobs,
    job_view,
    node_view,
    task_view,
    unschedulable_pods,
)

T0 = datetime(2030, 7, 8, 9, 0, tzinfo=UTC)
DEADLINE = "2030-07-08T10:00:00Z"
HUB = Identity.generate("hub", "hub").public()
STORE = AllowedStore(endpoint="https://s3.example")  # where the tasks' presigned URLs lead
CONFIG = AgentConfig(site="a", store=STORE)
EMPTY = Ledger()  # the site's privacy ledger before any DP run
NAME, UID = "study-r2-a", "uid-2a"


def _spec(**over: Any) -> dict[str, Any]:
    grants = site_grants(StudyLayout("research", "study", "s-uid"), 2, "a",
                         secure_aggregation=False)
    return {
        "roundRef": {"namespace": "research", "name": "study-r2", "uid": "u-2"},
        "study": "study", "studyUid": "s-uid", "round": 2, "site": "a",
        "model": {"name": "tumor-cnn"},
        "privacy": {"differentialPrivacy": {"noiseMultiplier": 1.1, "maxGradNorm": 2.0,
                                            "delta": 1e-5}},
        "parentDigest": "1" * 64,
        "hub": {"name": "hub", "signingKey": HUB.signing_key,
                "keyAgreementKey": HUB.key_agreement_key},
        "objects": [{"key": k, "method": m, "url": f"https://s3.example/{k}?sig=x"}
                    for k, m in grants.items()],
        "deadline": DEADLINE, **over}


def _task(status: dict[str, Any] | None = None, **spec: Any) -> TaskView:
    return TaskView(NAME, UID, SiteTaskStatus.model_validate(status or {}),
                    SiteTaskSpec.model_validate(_spec(**spec)))


def _job(**over: Any) -> JobView:
    return JobView(**{"name": NAME, "task_uid": UID, **over})


def _only_report(actions: list[Any]) -> SiteTaskStatus:
    assert len(actions) == 1 and isinstance(actions[0], ReportTask), actions
    assert actions[0].name == NAME
    return actions[0].status


def _reserved() -> Ledger:
    """The ledger once the task's run was reserved (its Job then created): a failed run keeps
    its reservation, nothing more is written."""
    record = decide_task(CONFIG, _task(), None, T0, EMPTY)[0]
    assert isinstance(record, RecordPrivacy) and record.entry.reserved
    return read_ledger(with_entry(None, "deeprad-training", record.key, record.entry), "cm")


def _result_line(**over: Any) -> str:
    result = SiteResult(study="study", round=2, site="a", num_samples=80, global_metrics=None,
                        local_metrics=None, train_loss=0.3, update_sha256="4" * 64,
                        duration_s=12.4,
                        privacy=DPSteps(noise_multiplier=1.1, sample_rate=0.2, steps=10))
    return result.model_copy(update=over).model_dump_json()


# ---- accepting a task -------------------------------------------------------------------------


def test_a_new_task_gets_a_trainer_job_and_is_accepted() -> None:
    actions = decide_task(CONFIG, _task(), None, T0, EMPTY)
    assert [type(a) for a in actions] == [RecordPrivacy, CreateJob, ReportTask]  # reserved first
    _, create, accepted = actions
    assert isinstance(create, CreateJob) and isinstance(accepted, ReportTask)
    assert (create.name, create.namespace) == (NAME, "deeprad-training")
    meta = create.manifest["metadata"]
    assert (meta["name"], meta["namespace"]) == (NAME, "deeprad-training")
    assert meta["labels"][LABEL_TASK_UID] == UID
    assert meta["labels"][LABEL_SITE] == "a"
    assert meta["labels"]["app.kubernetes.io/component"] == "trainer"
    assert create.manifest["spec"]["activeDeadlineSeconds"] <= 3600
    env = {e["name"]: e.get("value") for e in
           create.manifest["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert json.loads(env[URLS_ENV])["research/study/s-uid/rounds/2/updates/a.bin"].startswith(
        "https://s3.example/")
    st = accepted.status
    assert st.state == TaskState.ACCEPTED
    assert st.message == f"training Job deeprad-training/{NAME} created"
    assert (st.job_name, st.start_time, st.heartbeat_time) == (NAME, rfc3339(T0), rfc3339(T0))
    assert st.agent_version == __version__ and st.completion_time is None


def test_accepting_again_keeps_the_first_start_time() -> None:
    """A Pending task whose Job was deleted with its earlier task keeps its start time."""
    earlier = rfc3339(T0 - timedelta(minutes=5))
    actions = decide_task(CONFIG, _task({"state": "Pending", "startTime": earlier}), None, T0,
                          EMPTY)
    assert isinstance(actions[2], ReportTask) and actions[2].status.start_time == earlier


def test_the_job_of_an_earlier_task_of_that_name_is_deleted_first() -> None:
    actions = decide_task(CONFIG, _task(), _job(task_uid="uid-of-round-deleted-before"), T0,
                          EMPTY)
    assert actions == [DeleteJob(NAME, "it belongs to an earlier task of that name")]


def test_finished_tasks_are_left_alone() -> None:
    for state in ("Succeeded", "Failed"):
        assert decide_task(CONFIG, _task({"state": state}), None, T0, EMPTY) == []
        assert decide_task(CONFIG, _task({"state": state}),
                           _job(outcome="Complete", log="x"), T0, EMPTY) == []


# ---- refusing a task --------------------------------------------------------------------------


def test_a_task_for_another_site_is_refused() -> None:
    st = _only_report(decide_task(AgentConfig(site="b"), _task(), None, T0, EMPTY))
    assert st.state == TaskState.FAILED
    assert st.message is not None and st.message.startswith("refused by site b: task for site a")
    assert st.completion_time == rfc3339(T0) and st.job_name is None


def test_a_task_from_an_unknown_hub_is_refused() -> None:
    other = Identity.generate("other-hub", "hub").public().signing_key
    st = _only_report(decide_task(AgentConfig(site="a", hub_signing_key=other), _task(), None,
                                  T0, EMPTY))
    assert st.state == TaskState.FAILED
    assert st.message is not None and "refusing work from an unknown hub" in st.message
    pinned = AgentConfig(site="a", hub_signing_key=HUB.signing_key, store=STORE)
    assert isinstance(decide_task(pinned, _task(), None, T0, EMPTY)[1], CreateJob)


def test_an_unreadable_spec_fails_the_task_and_says_which_agent() -> None:
    task = task_view({"metadata": {"name": NAME, "uid": UID}, "spec": _spec(round=0)})
    assert task.spec is None and task.spec_error
    st = _only_report(decide_task(CONFIG, task, None, T0, EMPTY))
    assert st.state == TaskState.FAILED and st.completion_time == rfc3339(T0)
    assert st.message == (f"the task's spec is invalid for agent {__version__}: "
                          f"{task.spec_error}")


def test_a_task_past_its_deadline_is_not_started() -> None:
    for now in (T0 + timedelta(hours=1), T0 + timedelta(hours=2)):
        st = _only_report(decide_task(CONFIG, _task(), None, now, EMPTY))
        assert st.state == TaskState.FAILED
        assert st.message == ("the round's deadline passed before the site could start "
                              "training")
        assert st.completion_time == rfc3339(now)


def test_an_unexpected_error_fails_the_task_with_its_type() -> None:
    action = agent_failure(_task({"state": "Accepted", "jobName": NAME}),
                           ValueError("bad quantity"), T0)
    assert action.name == NAME and action.status.state == TaskState.FAILED
    assert action.status.message == (f"site agent {__version__} failed on this task: "
                                     "ValueError: bad quantity")
    assert action.status.job_name == NAME and action.status.completion_time == rfc3339(T0)


# ---- following the Job ------------------------------------------------------------------------


def test_a_vanished_job_fails_its_task_rather_than_training_twice() -> None:
    for state in ("Accepted", "Running"):
        st = _only_report(decide_task(CONFIG, _task({"state": state, "jobName": NAME}), None,
                                      T0, EMPTY))
        assert st.state == TaskState.FAILED
        assert st.message == f"training Job {NAME} disappeared before it finished"


def test_an_adopted_job_is_followed_not_created_again() -> None:
    """A restarted agent finds the Job it created (same name, same task uid)."""
    fresh = {"state": "Accepted", "jobName": NAME, "heartbeatTime": rfc3339(T0),
             "message": f"training Job deeprad-training/{NAME} created"}
    assert decide_task(CONFIG, _task(fresh), _job(), T0 + timedelta(seconds=5), EMPTY) == []


def test_a_running_job_reports_running_once_then_only_heartbeats() -> None:
    accepted = {"state": "Accepted", "jobName": NAME, "heartbeatTime": rfc3339(T0)}
    st = _only_report(decide_task(CONFIG, _task(accepted), _job(active=1, failed=1), T0,
                                  EMPTY))
    assert (st.state, st.message, st.attempts) == (TaskState.RUNNING, "training", 2)
    assert st.completion_time is None
    running = {**accepted, "state": "Running", "message": "training"}
    assert decide_task(CONFIG, _task(running), _job(active=1), T0 + timedelta(seconds=30),
                       EMPTY) == []
    later = T0 + timedelta(seconds=31)
    st = _only_report(decide_task(CONFIG, _task(running), _job(active=1), later, EMPTY))
    assert (st.state, st.message, st.heartbeat_time) == (TaskState.RUNNING, "training",
                                                         rfc3339(later))


def test_a_task_without_a_heartbeat_gets_one() -> None:
    st = _only_report(decide_task(CONFIG, _task({"jobName": NAME}), _job(), T0, EMPTY))
    assert (st.state, st.message, st.heartbeat_time) == (TaskState.ACCEPTED, "training",
                                                         rfc3339(T0))


def test_a_completed_job_reports_the_trainers_result() -> None:
    running = {"state": "Running", "jobName": NAME, "startTime": rfc3339(T0),
               "heartbeatTime": rfc3339(T0)}
    log = "epoch 1\n" + _result_line(num_samples=3) + "\nnot json\n" + _result_line() + "\n"
    job = _job(succeeded=1, outcome="Complete", log=log)
    assert needs_log(_task(running), job)
    done = T0 + timedelta(minutes=3)
    record, *reports = decide_task(CONFIG, _task(running), job, done, EMPTY)
    assert isinstance(record, RecordPrivacy) and record.entry.task == UID  # the site's ledger
    st = _only_report(reports)
    assert st.state == TaskState.SUCCEEDED
    assert st.message == "update uploaded (80 samples, 12s)"
    assert st.result is not None and (st.result.samples, st.result.update_digest) == (80, "4" * 64)
    assert st.result.epsilon is not None and st.result.epsilon > 0
    assert (st.attempts, st.start_time, st.completion_time) == (1, rfc3339(T0), rfc3339(done))


def test_a_completed_job_without_a_result_fails_with_its_last_line() -> None:
    log = "\n".join(f"line {i}" for i in range(30))
    st = _only_report(decide_task(CONFIG, _task({"state": "Running", "jobName": NAME}),
                                  _job(succeeded=1, outcome="Complete", log=log), T0,
                                  _reserved()))
    assert st.state == TaskState.FAILED and st.completion_time == rfc3339(T0)
    assert st.message == "the trainer finished but printed no result: line 29"


def test_a_failed_job_fails_the_task_with_its_reason_and_one_line_cause() -> None:
    job = _job(failed=3, outcome="Failed", failure="Job has reached the specified backoff limit",
               log="Traceback ...\nConfigError: no images under /data")
    st = _only_report(decide_task(CONFIG, _task({"state": "Running", "jobName": NAME}), job,
                                  T0, _reserved()))
    assert st.state == TaskState.FAILED and st.attempts == 3
    assert st.message == ("training Job failed (Job has reached the specified backoff limit): "
                          "ConfigError: no images under /data")
    assert "\n" not in st.message and "Traceback" not in st.message


def test_a_long_message_keeps_its_end() -> None:
    st = report(NAME, SiteTaskStatus(), TaskState.FAILED, "x" * 5000 + "the end", T0,
                terminal=True).status
    assert st.message is not None and len(st.message) == 4000
    assert st.message.endswith("the end")
    again = report(NAME, st, TaskState.FAILED, "later", T0 + timedelta(hours=1), terminal=True)
    assert again.status.completion_time == rfc3339(T0)  # the first completion time stays


def test_the_log_is_read_only_for_an_outcome_about_to_be_reported() -> None:
    running = _task({"state": "Running", "jobName": NAME})
    assert needs_log(running, _job(outcome="Failed"))
    assert not needs_log(running, _job(active=1))
    assert not needs_log(running, _job(outcome="Failed", task_uid="earlier"))
    assert not needs_log(_task({"state": "Succeeded"}), _job(outcome="Complete"))


def test_the_observed_task_is_not_changed_by_deciding() -> None:
    task = _task({"state": "Running", "jobName": NAME})
    decide_task(CONFIG, task, _job(succeeded=1, outcome="Complete", log=_result_line()), T0,
                EMPTY)
    assert task.status == SiteTaskStatus.model_validate({"state": "Running", "jobName": NAME})


# ---- withdrawn tasks --------------------------------------------------------------------------


def test_jobs_whose_task_is_gone_are_deleted() -> None:
    jobs = {NAME: _job(), "old-r1-a": _job(name="old-r1-a", task_uid="uid-gone"),
            "unlabelled": _job(name="unlabelled", task_uid=None)}
    assert orphan_jobs([_task()], jobs) == [DeleteJob("old-r1-a", "its task is gone"),
                                            DeleteJob("unlabelled", "its task is gone")]
    assert [d.name for d in orphan_jobs([], jobs)] == [NAME, "old-r1-a", "unlabelled"]


# ---- heartbeat --------------------------------------------------------------------------------


def test_the_heartbeat_is_due_every_heartbeat_seconds() -> None:
    config = AgentConfig(site="a", heartbeat_seconds=10)
    assert heartbeat_due(config, 10.0) and heartbeat_due(config, float("inf"))
    assert not heartbeat_due(config, 9.9)


def test_gpu_capacity_counts_ready_nodes_with_gpus() -> None:
    nodes = [NodeView(True, 4, 3, "NVIDIA-H100"), NodeView(True, 2, 2, "NVIDIA-A100"),
             NodeView(True, 2, 2, "NVIDIA-H100"), NodeView(False, 8, 8, "NVIDIA-B200"),
             NodeView(True, 0, 0, "NVIDIA-L4")]
    assert gpu_capacity("nvidia.com/gpu", nodes) == GpuCapacity(
        resource_name="nvidia.com/gpu", capacity=8, allocatable=7, nodes=3,
        product="NVIDIA-A100,NVIDIA-H100")
    none = gpu_capacity("nvidia.com/gpu", [])
    assert (none.capacity, none.nodes, none.product) == (0, 0, None)


def test_the_lease_is_renewed_with_version_and_gpus() -> None:
    lease = {"apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
             "metadata": {"name": "deeprad-agent", "namespace": "deeprad-site-a",
                          "resourceVersion": "41", "annotations": {"keep": "me"}},
             "spec": {"leaseTransitions": 2}}
    gpus = GpuCapacity(resource_name="nvidia.com/gpu", capacity=4, allocatable=4, nodes=1)
    config = AgentConfig(site="a", heartbeat_seconds=10)
    renewal = renew_lease(config, lease, gpus, T0.replace(microsecond=123456))
    assert renewal is not None
    body = renewal.lease
    assert body["metadata"]["resourceVersion"] == "41"  # an update, not a blind overwrite
    assert body["metadata"]["annotations"] == {
        "keep": "me", AGENT_VERSION_ANNOTATION: __version__,
        OBSERVED_GPUS_ANNOTATION: gpus.model_dump_json(exclude_none=True),
        POLICY_DIGEST_ANNOTATION: policy_digest(CONFIG.policy)}
    assert body["spec"] == {"leaseTransitions": 2, "holderIdentity": "a-agent",
                            "leaseDurationSeconds": 30,
                            "renewTime": "2030-07-08T09:00:00.123456Z"}
    assert lease["spec"] == {"leaseTransitions": 2}  # the observed Lease is not changed


def test_the_lease_without_a_gpu_report_or_yet_to_exist() -> None:
    bare = {"metadata": {"name": "deeprad-agent", "namespace": "deeprad-site-a"}}
    renewal = renew_lease(AgentConfig(site="a", heartbeat_seconds=0.1), bare, None, T0)
    assert renewal is not None
    assert renewal.lease["metadata"]["annotations"] == {
        AGENT_VERSION_ANNOTATION: __version__,
        POLICY_DIGEST_ANNOTATION: policy_digest(CONFIG.policy)}
    assert renewal.lease["spec"]["leaseDurationSeconds"] == 1
    assert renew_lease(CONFIG, None, None, T0) is None


# ---- from API objects to views ----------------------------------------------------------------


def test_jobs_and_nodes_as_the_api_returns_them() -> None:
    job = job_view({"metadata": {"name": NAME, "labels": {LABEL_TASK_UID: UID}},
                    "status": {"failed": 2, "conditions": [
                        {"type": "FailureTarget", "status": "True"},
                        {"type": "Failed", "status": "True", "reason": "BackoffLimitExceeded"}]}})
    assert job == JobView(NAME, UID, failed=2, outcome="Failed", failure="BackoffLimitExceeded",
                          ran=True)
    done = job_view({"metadata": {"name": NAME}, "status": {"succeeded": 1, "conditions": [
        {"type": "Complete", "status": "True"}, {"type": "Failed", "status": "False"}]}})
    assert (done.task_uid, done.outcome, done.succeeded) == (None, "Complete", 1)
    assert job_view({"metadata": {"name": NAME}}).outcome is None
    node = node_view({"metadata": {"labels": {"nvidia.com/gpu.product": "NVIDIA-H100"}},
                      "status": {"conditions": [{"type": "Ready", "status": "True"}],
                                 "capacity": {"nvidia.com/gpu": "4"},
                                 "allocatable": {"nvidia.com/gpu": "3"}}}, "nvidia.com/gpu")
    assert node == NodeView(True, 4, 3, "NVIDIA-H100")
    assert node_view({"metadata": {}, "status": {}}, "nvidia.com/gpu") == NodeView(False, 0, 0)


def test_an_unreadable_privacy_ledger_starts_no_task_and_says_why() -> None:
    problem = "ConfigMap deeprad-training/deeprad-privacy-ledger key research_brain: not JSON"
    (refusal,) = ledger_refusal(_task(), None, problem, T0)
    assert isinstance(refusal, ReportTask)
    assert refusal.status.state == TaskState.FAILED
    assert refusal.status.reason == "LedgerUnreadable" and problem in refusal.status.message
    # A running Job, or a finished task, is left alone until the admin restores the ledger.
    assert ledger_refusal(_task(), _job(active=1), problem, T0) == []
    assert ledger_refusal(_task({"state": "Succeeded"}), None, problem, T0) == []


# ---- queued: Kueue at the hospital, unschedulable pods ----------------------------------------

KUEUE_CONFIG = AgentConfig(site="a", store=STORE,
                           training=TrainingPlacement(local_queue="gpu-queue"))
QUOTA_MESSAGE = ("couldn't assign flavors to pod set main: insufficient unused quota for "
                 "nvidia.com/gpu in flavor gpu, 1 more needed")


def test_a_kueue_local_queue_creates_the_job_suspended_with_its_queue_label() -> None:
    create = next(a for a in decide_task(KUEUE_CONFIG, _task(), None, T0, EMPTY)
                  if isinstance(a, CreateJob))
    assert create.manifest["metadata"]["labels"][KUEUE_QUEUE_LABEL] == "gpu-queue"
    assert create.manifest["spec"]["suspend"] is True
    plain = next(a for a in decide_task(CONFIG, _task(), None, T0, EMPTY)
                 if isinstance(a, CreateJob))
    assert KUEUE_QUEUE_LABEL not in plain.manifest["metadata"]["labels"]
    assert "suspend" not in plain.manifest["spec"]


def test_a_job_held_by_kueue_is_queued_then_running_once_admitted() -> None:
    accepted = {"state": "Accepted", "jobName": NAME, "heartbeatTime": rfc3339(T0)}
    held = _job(suspended=True, queue="gpu-queue", queue_message=QUOTA_MESSAGE)
    st = _only_report(decide_task(KUEUE_CONFIG, _task(accepted), held, T0, EMPTY))
    assert (st.state, st.reason) == (TaskState.QUEUED, "QueuedByKueue")
    assert st.message == f"waiting in Kueue LocalQueue gpu-queue: {QUOTA_MESSAGE}"
    queued = st.model_dump(mode="json", by_alias=True, exclude_none=True)
    # Reported once; later passes only heartbeat it.
    assert decide_task(KUEUE_CONFIG, _task(queued), held, T0 + timedelta(seconds=5),
                       EMPTY) == []
    # Before Kueue made a Workload for it, the task names the queue.
    st = _only_report(decide_task(KUEUE_CONFIG, _task(accepted),
                                  _job(suspended=True, queue="gpu-queue"), T0, EMPTY))
    assert (st.state, st.message) == (TaskState.QUEUED, "waiting in Kueue LocalQueue gpu-queue")
    # Kueue admitted it (unsuspended, its pod runs): Running, and the queue's reason is gone.
    st = _only_report(decide_task(KUEUE_CONFIG, _task(queued), _job(active=1, ready=1),
                                  T0 + timedelta(seconds=10), EMPTY))
    assert (st.state, st.message, st.reason) == (TaskState.RUNNING, "training", None)
    # Done between two passes, never seen running: the queue's reason is gone all the same.
    done = _job(succeeded=1, outcome="Complete", log=_result_line())
    (report_,) = [a for a in decide_task(KUEUE_CONFIG, _task(queued), done, T0, EMPTY)
                  if isinstance(a, ReportTask)]
    assert (report_.status.state, report_.status.reason) == (TaskState.SUCCEEDED, None)


def test_redteam_a_dp_job_preempted_by_kueue_never_trains_twice() -> None:
    """Kueue preempts by suspending the Job; resumed, a fresh pod would train the same data
    again under one reservation (ε spent twice, recorded once). The agent deletes a suspended
    DP Job that started, fails the task and keeps the reservation; a plain Job just waits."""
    running = {"state": "Running", "jobName": NAME, "heartbeatTime": rfc3339(T0)}
    held = _job(suspended=True, queue="gpu-queue", queue_message=QUOTA_MESSAGE)
    ledger = _reserved()
    for task, job in ((_task(running), held),  # seen Running, now suspended
                      (_task({"state": "Queued", "jobName": NAME}),
                       dataclasses.replace(held, ran=True))):  # ran between two passes
        actions = decide_task(KUEUE_CONFIG, task, job, T0, ledger)
        deletes = [a for a in actions if isinstance(a, DeleteJob)]
        assert [d.name for d in deletes] == [NAME]
        (report_,) = [a for a in actions if isinstance(a, ReportTask)]
        assert (report_.status.state, report_.status.reason) == (TaskState.FAILED, "Preempted")
        assert "a second run would spend ε again" in report_.status.message
        assert not [a for a in actions if isinstance(a, RecordPrivacy)]  # reservation kept
        refused("a DP training Job preempted by the hospital's Kueue and resumed",
                "site agent (SiteTask Preempted)", report_.status.message)
    plain = _task(running, privacy={"secureAggregation": False})
    st = _only_report(decide_task(KUEUE_CONFIG, plain, held, T0, EMPTY))
    assert (st.state, st.reason) == (TaskState.QUEUED, "QueuedByKueue")


def test_a_workload_kueue_evicted_marks_its_job_as_having_run() -> None:
    owner = {"ownerReferences": [{"kind": "Job", "name": NAME}]}
    evicted = {"metadata": {"name": "w1", **owner}, "status": {"conditions": [
        {"type": "Evicted", "status": "False", "reason": "Preempted"}]}}
    requeued = {"metadata": {"name": "w2", "ownerReferences": [{"kind": "Job", "name": "b"}]},
                "status": {"requeueState": {"count": 1}}}
    fresh = {"metadata": {"name": "w3", "ownerReferences": [{"kind": "Job", "name": "c"}]},
             "status": {"conditions": [{"type": "QuotaReserved", "status": "False"}]}}
    assert evicted_jobs([evicted, requeued, fresh]) == {NAME, "b"}
    assert job_view({"metadata": {"name": NAME}, "spec": {"suspend": True},
                     "status": {"startTime": "2030-07-08T10:00:00Z"}}).ran
    assert not job_view({"metadata": {"name": NAME}, "spec": {"suspend": True},
                         "status": {}}).ran


def test_an_unschedulable_trainer_pod_is_queued_with_the_schedulers_reason() -> None:
    accepted = {"state": "Accepted", "jobName": NAME, "heartbeatTime": rfc3339(T0)}
    scheduler = "0/2 nodes are available: 2 Insufficient nvidia.com/gpu."
    st = _only_report(decide_task(CONFIG, _task(accepted),
                                  _job(active=1, unschedulable=scheduler), T0, EMPTY))
    assert (st.state, st.reason) == (TaskState.QUEUED, "Unschedulable")
    assert st.message == f"trainer pod unschedulable: {scheduler}"
    # A pod the scheduler has not answered for yet is not Running (it may never be).
    assert decide_task(CONFIG, _task(accepted), _job(active=1, unplaced=True), T0, EMPTY) == []
    # A pod on a node, not ready yet (no scheduler message), is Running.
    st = _only_report(decide_task(CONFIG, _task(accepted), _job(active=1), T0, EMPTY))
    assert st.state == TaskState.RUNNING


def test_a_job_still_queued_at_the_deadline_is_deleted_and_its_task_fails() -> None:
    deadline = datetime(2030, 7, 8, 10, 0, tzinfo=UTC)
    queued = {"state": "Queued", "reason": "QueuedByKueue", "jobName": NAME,
              "heartbeatTime": rfc3339(deadline), "message": "waiting in Kueue LocalQueue q"}
    held = _job(suspended=True, queue="q")
    ledger = _reserved()  # the run's reservation stays: nothing more to write
    before = deadline - timedelta(seconds=1)
    assert decide_task(KUEUE_CONFIG, _task(queued), held, before, ledger) == []
    delete, failed = decide_task(KUEUE_CONFIG, _task(queued), held, deadline, ledger)
    assert delete == DeleteJob(NAME, "its round's deadline passed")
    assert isinstance(failed, ReportTask)
    assert (failed.status.state, failed.status.reason) == (TaskState.FAILED, "DeadlineExceeded")
    assert failed.status.message == ("the round's deadline passed with the Job still queued "
                                     "(waiting in Kueue LocalQueue q); training Job deleted")
    # A Job Kueue started late may run past the deadline (suspended time does not count
    # against activeDeadlineSeconds): deleted once the grace has passed too.
    running = {**queued, "state": "Running", "message": "training"}
    late = deadline + timedelta(seconds=DEADLINE_GRACE_SECONDS)
    assert decide_task(KUEUE_CONFIG, _task(running), _job(active=1, ready=1),
                       late - timedelta(seconds=1), ledger) == []
    delete, failed = decide_task(KUEUE_CONFIG, _task(running), _job(active=1, ready=1), late,
                                 ledger)
    assert isinstance(delete, DeleteJob) and isinstance(failed, ReportTask)
    assert failed.status.message == ("the round's deadline passed with the Job still running; "
                                     "training Job deleted")


def test_queued_jobs_pending_pods_and_kueue_workloads_as_the_api_returns_them() -> None:
    job = job_view({"metadata": {"name": NAME, "labels": {KUEUE_QUEUE_LABEL: "q"}},
                    "spec": {"suspend": True},
                    "status": {"conditions": [{"type": "Suspended", "status": "True"}]}})
    assert (job.suspended, job.queue, job.starting) == (True, "q", False)
    starting = job_view({"metadata": {"name": NAME}, "status": {"active": 1, "ready": 0}})
    assert starting.starting and not job_view(
        {"metadata": {"name": NAME}, "status": {"active": 1, "ready": 1}}).starting
    pending = {"metadata": {"labels": {"batch.kubernetes.io/job-name": NAME}},
               "status": {"phase": "Pending", "conditions": [
                   {"type": "PodScheduled", "status": "False", "reason": "Unschedulable",
                    "message": "0/2 nodes are available: 1 Insufficient nvidia.com/gpu,\n"
                               "  1 node(s) didn't match Pod's node affinity/selector."}]}}
    placed = {"metadata": {"labels": {"batch.kubernetes.io/job-name": "other"}},
              "status": {"phase": "Pending", "conditions": [
                  {"type": "PodScheduled", "status": "True"}]}}
    assert unschedulable_pods([pending, placed]) == {
        NAME: "0/2 nodes are available: 1 Insufficient nvidia.com/gpu, 1 node(s) didn't "
              "match Pod's node affinity/selector."}
    workload = {"metadata": {"ownerReferences": [{"kind": "Job", "name": NAME}]},
                "status": {"conditions": [
                    {"type": "QuotaReserved", "status": "False", "reason": "Pending",
                     "message": QUOTA_MESSAGE}]}}
    admitted = {"metadata": {"ownerReferences": [{"kind": "Job", "name": "other"}]},
                "status": {"conditions": [{"type": "QuotaReserved", "status": "True"},
                                          {"type": "Admitted", "status": "True"}]}}
    assert admission_messages([workload, admitted]) == {NAME: QUOTA_MESSAGE}


def test_a_bad_kueue_local_queue_name_is_refused_naming_the_field() -> None:
    try:
        parse_agent_config({"site": "a", "training": {"localQueue": "GPU_Queue"}},
                           "site agent config agent.yaml")
    except ConfigError as exc:
        message = str(exc)
    else:
        raise AssertionError("a LocalQueue name that is no DNS label was accepted")
    assert message.startswith("site agent config agent.yaml: training.localQueue: ")
    assert "must name a Kueue LocalQueue in the training namespace" in message
    assert "got 'GPU_Queue'" in message and "\n" not in message

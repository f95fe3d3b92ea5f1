"""The site agent when an API server does not answer: the fault is told apart from errors that
waiting cannot heal, logged once per outage, and passes back off while it lasts. The agent runs
against loopback ports where nothing listens (connection refused), no mocked API."""

from __future__ import annotations

import logging
from datetime import UTC, datetime, timedelta

import kubernetes
import pytest
from kubernetes.client.exceptions import ApiException

from deeprad.core.identity import Identity
from deeprad.devenv.ports import free_port
from deeprad.operator.api.sitetask import SiteTaskSpec, SiteTaskStatus, TaskState
from deeprad.operator.site.agent import SiteAgent
from deeprad.operator.site.config import AgentConfig
from deeprad.operator.site.decide import TaskView
from deeprad.operator.site.outage import (
    BACKOFF_CAP_S,
    Outages,
    api_fault,
    reachable_report,
    unreachable_report,
)


def _client(port: int) -> kubernetes.client.ApiClient:
    cfg = kubernetes.client.Configuration()
    cfg.host = f"https://127.0.0.1:{port}"
    cfg.verify_ssl = False
    cfg.retries = 0
    return kubernetes.client.ApiClient(cfg)


def _fault_of(port: int) -> BaseException:
    api = kubernetes.client.CoreV1Api(_client(port))
    with pytest.raises(Exception) as info:
        api.list_namespaced_pod("default")
    return info.value


def test_api_faults_name_the_cause_and_the_server() -> None:
    port = free_port()
    assert api_fault(_fault_of(port)) == f"connection refused to 127.0.0.1:{port}"
    assert api_fault(ApiException(status=503, reason="Service Unavailable")) == \
        "HTTP 503 Service Unavailable"
    assert api_fault(ApiException(status=504, reason="Gateway Timeout")) == \
        "HTTP 504 Gateway Timeout"


@pytest.mark.parametrize("status", [400, 401, 403, 404, 409, 422])
def test_refusals_by_the_api_are_not_faults_to_wait_out(status: int) -> None:
    # 409 too: for the API server a conflict is an answer (re-read and retry next pass).
    assert api_fault(ApiException(status=status, reason="x")) is None


def test_an_api_fault_is_logged_once_and_backs_passes_off(caplog: pytest.LogCaptureFixture) -> None:
    now = [0.0]
    outages = Outages(poll_seconds=1.0, clock=lambda: now[0])
    caplog.set_level(logging.INFO, "deeprad.agent")
    waits = []
    for _ in range(8):
        outages.failed("hub", "connection refused to 127.0.0.1:6443")
        waits.append(outages.wait_seconds())
        now[0] += waits[-1]
    assert waits == [2.0, 4.0, 8.0, BACKOFF_CAP_S, BACKOFF_CAP_S, BACKOFF_CAP_S, BACKOFF_CAP_S,
                     BACKOFF_CAP_S]
    assert outages.answered("hub") and not outages.answered("hub")
    assert outages.wait_seconds() == 1.0
    lines = [r.getMessage() for r in caplog.records]
    assert lines == [
        "hub API unreachable (connection refused to 127.0.0.1:6443); retrying with backoff, "
        "nothing is reported failed for it",
        f"hub API reachable again after {sum(waits):.0f} s"]


def test_an_agent_whose_apis_are_unreachable_keeps_stepping_and_stays_healthy(
        caplog: pytest.LogCaptureFixture) -> None:
    hub_port, local_port = free_port(), free_port()
    agent = SiteAgent(AgentConfig(site="a", poll_seconds=1.0), _client(hub_port),
                      _client(local_port))
    caplog.set_level(logging.WARNING, "deeprad.agent")
    for _ in range(3):
        agent.step()
    assert agent.outages.down("hub") and agent.outages.down("cluster")
    # The heartbeat reads the cluster's nodes, the sync pass the hub's tasks: each outage is
    # logged once over three passes, naming its server.
    unreachable = sorted(r.getMessage() for r in caplog.records
                         if "unreachable" in r.getMessage())
    assert len(unreachable) == 2, unreachable
    assert unreachable[0].startswith(f"cluster API unreachable (connection refused to "
                                     f"127.0.0.1:{local_port})")
    assert unreachable[1].startswith(f"hub API unreachable (connection refused to "
                                     f"127.0.0.1:{hub_port})")
    assert not [r for r in caplog.records if r.exc_info]  # no traceback per pass
    assert agent.healthy()  # a restart would not bring the hub back
    assert agent.outages.wait_seconds() > agent.config.poll_seconds


# ---- what the tasks say while the site's own cluster cannot be reached ------------------------

T0 = datetime(2030, 7, 8, 9, 0, tzinfo=UTC)
DEADLINE = "2030-07-08T10:00:00Z"
CAUSE = "connection refused to 127.0.0.1:6443"


def _task(state: TaskState | None, message: str | None = None) -> TaskView:
    hub = Identity.generate("hub", "hub").public()
    spec = SiteTaskSpec.model_validate({
        "roundRef": {"namespace": "research", "name": "study-r2", "uid": "u-2"},
        "study": "study", "studyUid": "s-uid", "round": 2, "site": "a",
        "model": {"name": "tumor-cnn"}, "parentDigest": "1" * 64,
        "hub": {"name": "hub", "signingKey": hub.signing_key,
                "keyAgreementKey": hub.key_agreement_key},
        "objects": [{"key": "research/study/s-uid/rounds/2/updates/a.bin", "method": "PUT",
                     "url": "https://s3.example/u?sig=x"}], "deadline": DEADLINE})
    status = SiteTaskStatus(state=state, message=message, reason=None)
    return TaskView("study-r2-a", "uid", status, spec)


def test_an_unreachable_cluster_is_said_once_on_each_unfinished_task() -> None:
    said = unreachable_report(_task(TaskState.RUNNING, "training"), CAUSE, T0, 15)
    assert said is not None and said.status.state == TaskState.RUNNING
    assert said.status.message == f"the hospital cluster's API is unreachable: {CAUSE}"
    assert said.status.completion_time is None
    again = _task(TaskState.RUNNING, said.status.message)
    assert unreachable_report(again, CAUSE, T0 + timedelta(minutes=5), 15) is None
    pending = unreachable_report(_task(None), CAUSE, T0, 15)
    assert pending is not None and pending.status.state == TaskState.PENDING
    for done in (TaskState.SUCCEEDED, TaskState.FAILED):
        assert unreachable_report(_task(done, "x"), CAUSE, T0, 15) is None


def test_an_unreachable_cluster_fails_the_task_on_the_last_pass_before_its_deadline() -> None:
    # The next pass, 15 s on (backed off), would come 4 s before the deadline: too late.
    near = datetime(2030, 7, 8, 9, 59, 41, tzinfo=UTC)
    running = _task(TaskState.RUNNING, "training")
    earlier = unreachable_report(running, CAUSE, near - timedelta(seconds=2), 15)
    assert earlier is not None and earlier.status.state == TaskState.RUNNING
    failed = unreachable_report(running, CAUSE, near, 15)
    assert failed is not None and failed.status.state == TaskState.FAILED
    assert failed.status.reason == "ClusterUnreachable"
    assert failed.status.message == ("the hospital cluster's API is unreachable through the "
                                     f"round's deadline: {CAUSE}")
    assert failed.status.completion_time is not None


def test_a_cluster_that_answers_again_is_said_once() -> None:
    back = reachable_report(_task(TaskState.RUNNING, f"the hospital cluster's API is "
                                                    f"unreachable: {CAUSE}"), T0)
    assert back is not None and back.status.state == TaskState.RUNNING
    assert back.status.message == "the hospital cluster's API is reachable again"
    assert reachable_report(_task(TaskState.RUNNING, back.status.message), T0) is None
    assert reachable_report(_task(TaskState.RUNNING, "training"), T0) is None

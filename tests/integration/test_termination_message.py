"""A failed container's one-line cause reaches its Pod's status as kubelet reports it: the file
at terminationMessagePath (what `deeprad.core.jobargs.fail` writes), or with
FallbackToLogsOnError and nothing written, the log's tail. The hub quotes that line when a
prepare or aggregator Job fails (`RoundHub.failure_cause`)."""

from __future__ import annotations

import sys
import uuid
from typing import Any

import pytest

from deeprad.devenv.cluster import Cluster
from deeprad.devenv.kube_wait import pod_phase, wait_for_object
from deeprad.operator.decide import round as rules

pytestmark = pytest.mark.integration

CAUSE = "the store was unreachable for 60 s (connection refused, http://127.0.0.1:9)"


def _run(cluster: Cluster, script: str, policy: str) -> dict[str, Any]:
    ns = f"t-{uuid.uuid4().hex[:8]}"
    client = cluster.client()
    client.create("/api/v1/namespaces", {"apiVersion": "v1", "kind": "Namespace",
                                         "metadata": {"name": ns}})
    pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "job"},
           "spec": {"restartPolicy": "Never", "containers": [{
               "name": "aggregator", "image": "deeprad:test",
               "command": [sys.executable, "-c", script],
               "env": [{"name": "DEEPRAD_TERMINATION_LOG", "value": "/dev/termination-log"}],
               "terminationMessagePath": "/dev/termination-log",
               "terminationMessagePolicy": policy}]}}
    client.create(f"/api/v1/namespaces/{ns}/pods", pod)
    done = wait_for_object(client, f"/api/v1/namespaces/{ns}/pods/job",
                           lambda p: pod_phase(p) in ("Succeeded", "Failed"), timeout=120,
                           what="pod job finished")
    assert pod_phase(done) == "Failed", done
    (status,) = done["status"]["containerStatuses"]
    return dict(status["state"]["terminated"])


def test_the_cause_a_job_writes_is_its_pods_termination_message(hub_cluster: Cluster) -> None:
    script = ("import sys; from deeprad.core.jobargs import fail; "
              "print('a traceback would be here', file=sys.stderr); "
              f"sys.exit(fail('deeprad.aggregator', 75, {CAUSE!r}))")
    terminated = _run(hub_cluster, script, "FallbackToLogsOnError")
    assert terminated["exitCode"] == 75
    assert terminated["message"] == f"deeprad.aggregator: {CAUSE}\n"
    view = rules.JobView.failed("BackoffLimitExceeded", "", terminated["message"])
    assert view.message == f"deeprad.aggregator: {CAUSE} (BackoffLimitExceeded)"


def test_a_container_that_wrote_nothing_falls_back_to_its_logs_tail(hub_cluster: Cluster
                                                                     ) -> None:
    script = "import sys; print('line one'); print('killed: out of memory'); sys.exit(137)"
    terminated = _run(hub_cluster, script, "FallbackToLogsOnError")
    assert terminated["message"].splitlines()[-1] == "killed: out of memory"
    plain = _run(hub_cluster, script, "File")  # the default policy: no fallback
    assert "message" not in plain

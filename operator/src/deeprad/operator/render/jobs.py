"""The one place that builds Job manifests: the trainer (at a site) and the aggregator (in the
hub).

Both run the installed `deeprad` package (`python -m deeprad.trainer` /
`python -m deeprad.aggregator`) with the task as JSON in DEEPRAD_TASK, under the restricted
Pod Security profile: non-root, read-only root filesystem, no privilege escalation, no
capabilities, RuntimeDefault seccomp, no service-account token. The only writable path is an
emptyDir at /tmp. A Job gets only the credentials it needs: the identity Secret it signs with
and, when it talks to the store directly, the store's access keys; a trainer that works from
presigned URLs gets no store credentials at all.

The task is any pydantic model (the trainer's TrainingTask, the aggregator's AggregationTask):
this module does not depend on their fields.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from datetime import datetime, timedelta

from pydantic import BaseModel

from deeprad.core.jobargs import EXIT_BAD_INPUT, EXIT_TRANSIENT, TERMINATION_LOG_ENV
from deeprad.core.store.retry import RETRY_SECONDS_ENV
from deeprad.operator.decide.timeutil import parse_duration
from deeprad.operator.render.meta import (
    LABEL_ROUND,
    LABEL_SITE,
    LABEL_STUDY,
    Manifest,
    labels,
)
from deeprad.operator.site.config import TrainingPlacement

TRAINER_COMMAND = ["python", "-m", "deeprad.trainer"]
AGGREGATOR_COMMAND = ["python", "-m", "deeprad.aggregator"]
PREPARE_COMMAND = ["python", "-m", "deeprad.aggregator.prepare"]
# The hub operator and the site agent (the charts' Deployments and the operator image).
OPERATOR_COMMAND = ["python", "-m", "deeprad.operator"]
IDENTITY_DIR = "/var/run/deeprad/identity"
DATA_DIR = "/data"
TMP_DIR = "/tmp"
RUN_AS = 65532  # the distroless "nonroot" user; any non-zero uid works with the images
# The entrypoints exit EXIT_BAD_INPUT (2) on a task they refuse, where retrying cannot help
# (FailJob), and EXIT_TRANSIENT (75) when the store stayed unreachable, which counts against
# backoffLimit like any other failure: another pod may succeed (a DP trainer's Job has none).
TERMINATION_LOG = "/dev/termination-log"  # the one-line cause of a failure (deeprad.core.jobargs)
ACCESS_KEY = "access-key"  # keys of the store-credentials Secret
SECRET_KEY = "secret-key"
TTL_SECONDS = 24 * 3600
# The label by which Kueue takes a Job into a LocalQueue (training.localQueue of a site).
KUEUE_QUEUE_LABEL = "kueue.x-k8s.io/queue-name"


@dataclass(frozen=True)
class StoreAccess:
    """How a Job reaches the object store: its URL and, if it needs keys, the Secret holding
    them (keys `access-key` and `secret-key`)."""

    url: str
    credentials_secret: str | None = None


@dataclass(frozen=True)
class JobContext:
    """Names shared by a round's Jobs: where they run and what they belong to."""

    name: str
    namespace: str
    study: str
    round_name: str
    image: str
    image_pull_policy: str = "IfNotPresent"


def active_deadline_seconds(deadline: datetime, now: datetime,
                            cap: timedelta | None = None) -> int:
    """Seconds a Job may run: until the round's deadline, at most `cap`, at least 1 (a Job
    started after its deadline fails at once rather than running unbounded)."""
    left = (deadline - now).total_seconds()
    if cap is not None:
        left = min(left, cap.total_seconds())
    return max(1, math.floor(left))


def _security_context() -> Manifest:
    return {"allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True,
            "runAsNonRoot": True, "capabilities": {"drop": ["ALL"]},
            "seccompProfile": {"type": "RuntimeDefault"}}


def _pod_security_context() -> Manifest:
    return {"runAsNonRoot": True, "runAsUser": RUN_AS, "runAsGroup": RUN_AS, "fsGroup": RUN_AS,
            "seccompProfile": {"type": "RuntimeDefault"}}


def _env(task: BaseModel, store: StoreAccess | None, identity_secret: str | None
         ) -> list[Manifest]:
    env: list[Manifest] = [
        {"name": "DEEPRAD_TASK", "value": task.model_dump_json()},
        {"name": "HOME", "value": TMP_DIR},
        {"name": "PYTHONDONTWRITEBYTECODE", "value": "1"},
    ]
    if store is not None:
        env.append({"name": "DEEPRAD_STORE", "value": store.url})
        if store.credentials_secret:
            env += [{"name": var, "valueFrom": {"secretKeyRef": {
                "name": store.credentials_secret, "key": key}}}
                for var, key in (("DEEPRAD_S3_ACCESS_KEY", ACCESS_KEY),
                                 ("DEEPRAD_S3_SECRET_KEY", SECRET_KEY))]
    if identity_secret:
        env.append({"name": "DEEPRAD_IDENTITY_DIR", "value": IDENTITY_DIR})
    return env


def _volumes(identity_secret: str | None, data_claim: str | None
             ) -> tuple[list[Manifest], list[Manifest]]:
    volumes: list[Manifest] = [{"name": "tmp", "emptyDir": {}}]
    mounts: list[Manifest] = [{"name": "tmp", "mountPath": TMP_DIR}]
    if identity_secret:
        volumes.append({"name": "identity", "secret": {"secretName": identity_secret,
                                                       "defaultMode": 0o400}})
        mounts.append({"name": "identity", "mountPath": IDENTITY_DIR, "readOnly": True})
    if data_claim:
        volumes.append({"name": "data", "persistentVolumeClaim": {"claimName": data_claim,
                                                                  "readOnly": True}})
        mounts.append({"name": "data", "mountPath": DATA_DIR, "readOnly": True})
    return volumes, mounts


def _store_retry_seconds(deadline_seconds: int) -> int:
    """How long a Job's store calls may keep retrying an outage: until a little before its
    activeDeadlineSeconds, so it still ends on its own and says why (not DeadlineExceeded)."""
    return max(1, deadline_seconds - min(60, deadline_seconds // 5))


def _job(ctx: JobContext, component: str, command: list[str], extra_labels: dict[str, str],
         container: Manifest, pod: Manifest, deadline_seconds: int, backoff_limit: int
         ) -> Manifest:
    container = {**container, "env": [
        *container.get("env", ()),
        {"name": TERMINATION_LOG_ENV, "value": TERMINATION_LOG},
        {"name": RETRY_SECONDS_ENV, "value": str(_store_retry_seconds(deadline_seconds))}]}
    meta_labels = labels(component, **{LABEL_STUDY: ctx.study, LABEL_ROUND: ctx.round_name},
                         **extra_labels)
    return {
        "apiVersion": "batch/v1", "kind": "Job",
        "metadata": {"name": ctx.name, "namespace": ctx.namespace, "labels": meta_labels},
        "spec": {
            "activeDeadlineSeconds": deadline_seconds,
            "backoffLimit": backoff_limit,
            "ttlSecondsAfterFinished": TTL_SECONDS,
            "podFailurePolicy": {"rules": [
                {"action": "FailJob", "onExitCodes": {"containerName": component,
                                                      "operator": "In",
                                                      "values": [EXIT_BAD_INPUT]}},
                {"action": "Count", "onExitCodes": {"containerName": component,
                                                    "operator": "In",
                                                    "values": [EXIT_TRANSIENT]}},
                {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget"}]},
            ]},
            "template": {
                "metadata": {"labels": dict(meta_labels)},
                "spec": {
                    "restartPolicy": "Never",
                    "automountServiceAccountToken": False,
                    "enableServiceLinks": False,
                    "securityContext": _pod_security_context(),
                    **pod,
                    "containers": [{
                        "name": component, "image": ctx.image,
                        "imagePullPolicy": ctx.image_pull_policy, "command": command,
                        "securityContext": _security_context(),
                        "terminationMessagePath": TERMINATION_LOG,
                        "terminationMessagePolicy": "FallbackToLogsOnError", **container}],
                },
            },
        },
    }


def trainer_job(ctx: JobContext, site: str, placement: TrainingPlacement, task: BaseModel,
                deadline_seconds: int, store: StoreAccess | None = None,
                extra_env: dict[str, str] | None = None, backoff_limit: int = 1,
                retries: bool = True) -> Manifest:
    """A site's training Job: GPUs, placement, identity Secret and data volume as the site
    configured them, the round's deadline (capped by the site's maxTaskDuration), the data
    read-only at /data. `extra_env` carries the presigned URLs of a pull-mode task. With a
    Kueue LocalQueue configured, the Job carries its queue label and is created suspended.

    `retries=False` (a DP-SGD task): backoffLimit 0 and no rule that ignores an evicted pod.
    The site's privacy ledger holds one reservation per task, one run's worth of ε; a second
    pod would train the data again under the same reservation, spending ε nobody recorded.
    So a failed or evicted DP run fails its task, and its reservation stays spent."""
    gpu, resources = placement.gpu, placement.resources
    if placement.max_task_duration:
        cap = parse_duration(placement.max_task_duration,
                             f"site {site}: training.maxTaskDuration")
        deadline_seconds = min(deadline_seconds, max(1, math.floor(cap.total_seconds())))
    requests = {"cpu": resources.cpu, "memory": resources.memory}
    resource_limits = {"memory": resources.memory, gpu.resource_name: str(gpu.count)}
    volumes, mounts = _volumes(placement.identity_secret, placement.data_claim)
    pod: Manifest = {"volumes": volumes}
    if placement.service_account:
        pod["serviceAccountName"] = placement.service_account
    if gpu.node_selector:
        pod["nodeSelector"] = dict(gpu.node_selector)
    if gpu.tolerations:
        pod["tolerations"] = [t.model_dump(mode="json", exclude_none=True)
                              for t in gpu.tolerations]
    if gpu.runtime_class_name:
        pod["runtimeClassName"] = gpu.runtime_class_name
    env = _env(task, store, placement.identity_secret)
    env += [{"name": k, "value": v} for k, v in sorted((extra_env or {}).items())]
    container: Manifest = {
        "env": env,
        "resources": {"requests": requests, "limits": resource_limits},
        "volumeMounts": mounts,
    }
    ctx = replace(ctx, image=placement.image, image_pull_policy=placement.image_pull_policy)
    job = _job(ctx, "trainer", TRAINER_COMMAND, {LABEL_SITE: site}, container, pod,
               deadline_seconds, backoff_limit if retries else 0)
    if not retries:
        policy = job["spec"]["podFailurePolicy"]
        policy["rules"] = [r for r in policy["rules"] if r["action"] != "Ignore"]
    if placement.local_queue:
        # Created suspended: Kueue unsuspends it once the queue's ClusterQueue has quota, so
        # no Kueue webhook has to intercept the create. Suspended time does not count against
        # activeDeadlineSeconds (the Job's startTime is set on resume); the agent ends a Job
        # that outlives its round's deadline (`site.decide`).
        job["metadata"]["labels"][KUEUE_QUEUE_LABEL] = placement.local_queue
        job["spec"]["suspend"] = True
    return job


def aggregator_job(ctx: JobContext, task: BaseModel, deadline_seconds: int, store: StoreAccess,
                   identity_secret: str | None, cpu: str = "1", memory: str = "4Gi",
                   backoff_limit: int = 1) -> Manifest:
    """The hub's aggregation Job for one round: store access with keys, the hub's identity,
    no GPU (aggregation streams on CPU)."""
    return _hub_job(ctx, "aggregator", AGGREGATOR_COMMAND, task, deadline_seconds, store,
                    identity_secret, cpu, memory, backoff_limit)


def prepare_job(ctx: JobContext, task: BaseModel, deadline_seconds: int, store: StoreAccess,
                identity_secret: str | None, cpu: str = "1", memory: str = "4Gi",
                backoff_limit: int = 1) -> Manifest:
    """The hub Job that writes a round's input checkpoint (fresh or imported), signed with the
    hub's identity."""
    return _hub_job(ctx, "prepare", PREPARE_COMMAND, task, deadline_seconds, store,
                    identity_secret, cpu, memory, backoff_limit)


def _hub_job(ctx: JobContext, component: str, command: list[str], task: BaseModel,
             deadline_seconds: int, store: StoreAccess, identity_secret: str | None, cpu: str,
             memory: str, backoff_limit: int) -> Manifest:
    volumes, mounts = _volumes(identity_secret, None)
    container: Manifest = {
        "env": _env(task, store, identity_secret),
        "resources": {"requests": {"cpu": cpu, "memory": memory},
                      "limits": {"memory": memory}},
        "volumeMounts": mounts,
    }
    return _job(ctx, component, command, {}, container, {"volumes": volumes},
                deadline_seconds, backoff_limit)

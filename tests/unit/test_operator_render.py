"""Manifests the operator renders, against golden files in tests/unit/golden/.

Regenerate after an intended change with `DEEPRAD_UPDATE_GOLDEN=1 pytest
tests/unit/test_operator_render.py` and review the diff."""

from __future__ import annotations

import os
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import BaseModel

from deeprad.core.protocol import TrainingTask
from deeprad.operator.api import FederatedRoundSpec
from deeprad.operator.api.common import CheckpointRef
from deeprad.operator.api.federatedstudy import FederatedStudySpec
from deeprad.operator.api.hospitalsite import HospitalSiteSpec
from deeprad.operator.decide.study import CreateRound
from deeprad.operator.render import jobs, rounds, site
from deeprad.operator.site.config import TrainingPlacement, TrainingResources

ROOT = Path(__file__).resolve().parents[2]
GOLDEN = Path(__file__).parent / "golden"
UPDATE = os.environ.get("DEEPRAD_UPDATE_GOLDEN") == "1"


def _golden(name: str, docs: list[dict[str, Any]]) -> None:
    text = yaml.safe_dump_all(docs, sort_keys=False, width=100)
    path = GOLDEN / name
    if UPDATE:
        path.write_text(text)
    assert path.exists(), f"{path} is missing: run with DEEPRAD_UPDATE_GOLDEN=1"
    assert text == path.read_text(), (f"{name} differs from its golden file; if intended, "
                                      "regenerate with DEEPRAD_UPDATE_GOLDEN=1 and review")


def _example(name: str) -> dict[str, Any]:
    return dict(yaml.safe_load((ROOT / "examples" / name).read_text()))


def _st_marys() -> TrainingPlacement:
    """St Mary's trainer placement: its GPU settings and limits from the example site."""
    spec = HospitalSiteSpec.model_validate(_example("hospitalsite-st-marys.yaml")["spec"])
    return TrainingPlacement(
        namespace="deeprad", image="ghcr.io/deeprad/deeprad:0.1.0", gpu=spec.gpu,
        resources=TrainingResources(cpu=spec.limits.cpu or "1",
                                    memory=spec.limits.memory or "4Gi"),
        max_task_duration=spec.limits.max_task_duration,
        identity_secret="st-marys-identity", data_claim="st-marys-mri")


class _Task(BaseModel):
    """A stand-in task: jobs.py serialises any model, so the goldens do not follow
    TrainingTask's fields as they evolve."""

    study: str
    round: int
    site: str | None = None


def test_site_objects() -> None:
    objs = site.site_objects("st-marys", "uid-site")
    _golden("site-st-marys.yaml", objs)
    assert [o["kind"] for o in objs] == ["Namespace", "ServiceAccount", "Role", "RoleBinding",
                                         "Lease"]
    assert {o["metadata"].get("namespace") for o in objs[1:]} == {"deeprad-site-st-marys"}
    labels = objs[0]["metadata"]["labels"]
    assert labels["pod-security.kubernetes.io/enforce"] == "restricted"
    verbs = {(r["resources"][0], tuple(r["verbs"])) for r in objs[2]["rules"]}
    assert verbs == {("sitetasks", ("get", "list", "watch")), ("sitetasks/status", ("patch",)),
                     ("leases", ("get", "update"))}
    assert objs[2]["rules"][2]["resourceNames"] == [site.AGENT]
    with pytest.raises(ValueError, match=r"HospitalSite st-marys: metadata\.uid is empty"):
        site.namespace("st-marys", "")


def test_round_from_the_example_study() -> None:
    spec = FederatedStudySpec.model_validate(
        {**_example("federatedstudy-tumor-cnn.yaml")["spec"],
         "privacyBudget": {"epsilon": 8, "delta": 1e-5}})
    spec.round_template.privacy.differential_privacy = None
    ckpt = CheckpointRef(uri="s3://deeprad/research/tumor-detection/rounds/1/global.safetensors",
                         digest="ab" * 32, round=1)
    manifest = rounds.federated_round("tumor-detection", "research", "uid-study", spec,
                                      CreateRound(2, ckpt, ("charite", "st-marys"), None))
    _golden("round-tumor-detection-r2.yaml", [manifest])
    assert manifest["metadata"]["name"] == "tumor-detection-r2"
    assert manifest["metadata"]["ownerReferences"][0]["uid"] == "uid-study"
    parsed = FederatedRoundSpec.model_validate(manifest["spec"])
    assert parsed.round == 2 and parsed.input_checkpoint == ckpt
    assert parsed.strategy == spec.round_template.strategy


def test_round_takes_the_study_budgets_delta() -> None:
    spec = FederatedStudySpec.model_validate({
        "model": {"name": "tumor-cnn"}, "rounds": 3,
        "privacyBudget": {"epsilon": 8, "delta": 1e-6},
        "roundTemplate": {"privacy": {"differentialPrivacy": {"noiseMultiplier": 1.1,
                                                              "maxGradNorm": 1.0}}}})
    out = rounds.round_spec("s", spec, CreateRound(1, None, None))
    assert out.privacy.differential_privacy is not None
    assert out.privacy.differential_privacy.delta == 1e-6
    assert spec.round_template.privacy.differential_privacy is not None
    assert spec.round_template.privacy.differential_privacy.delta is None  # not mutated


def _ctx(name: str, namespace: str) -> jobs.JobContext:
    return jobs.JobContext(name=name, namespace=namespace, study="tumor-detection",
                           round_name="tumor-detection-r2", image="ghcr.io/deeprad/deeprad:0.1.0")


def test_trainer_job() -> None:
    job = jobs.trainer_job(_ctx("tumor-detection-r2-st-marys", "deeprad"), "st-marys",
                           _st_marys(), _Task(study="tumor-detection", round=2, site="st-marys"),
                           deadline_seconds=3 * 3600)
    _golden("job-trainer.yaml", [job])
    pod = job["spec"]["template"]["spec"]
    (c,) = pod["containers"]
    assert job["spec"]["activeDeadlineSeconds"] == 2 * 3600  # capped by maxTaskDuration 2h
    assert c["command"] == ["python", "-m", "deeprad.trainer"]
    assert c["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert pod["nodeSelector"] == {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"}
    assert not any(e["name"].startswith("DEEPRAD_S3") for e in c["env"])  # no store keys


def test_aggregator_job() -> None:
    job = jobs.aggregator_job(_ctx("tumor-detection-r2-aggregate", "research"),
                              _Task(study="tumor-detection", round=2), deadline_seconds=600,
                              store=jobs.StoreAccess("s3://deeprad?endpoint=minio:9000",
                                                     "deeprad-store"),
                              identity_secret="deeprad-hub-identity")
    _golden("job-aggregator.yaml", [job])
    (c,) = job["spec"]["template"]["spec"]["containers"]
    assert c["command"] == ["python", "-m", "deeprad.aggregator"]
    refs = [e["valueFrom"]["secretKeyRef"] for e in c["env"] if "valueFrom" in e]
    assert refs == [{"name": "deeprad-store", "key": "access-key"},
                    {"name": "deeprad-store", "key": "secret-key"}]


@pytest.mark.parametrize("render", ["trainer", "aggregator"])
def test_jobs_are_restricted(render: str) -> None:
    task = _Task(study="s", round=1)
    job = (jobs.trainer_job(_ctx("j", "ns"), "st-marys", _st_marys(), task, 60)
           if render == "trainer" else
           jobs.aggregator_job(_ctx("j", "ns"), task, 60, jobs.StoreAccess("file:///s"), None))
    pod = job["spec"]["template"]["spec"]
    (c,) = pod["containers"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    assert pod["automountServiceAccountToken"] is False
    sc = c["securityContext"]
    assert (sc["allowPrivilegeEscalation"], sc["readOnlyRootFilesystem"], sc["runAsNonRoot"],
            sc["capabilities"]) == (False, True, True, {"drop": ["ALL"]})
    assert {"name": "tmp", "mountPath": "/tmp"} in c["volumeMounts"]
    assert c["resources"]["requests"]["cpu"] and c["resources"]["requests"]["memory"]


def test_real_training_task_travels_as_json() -> None:
    task = TrainingTask(namespace="research", study="s", round=1, site="st-marys",
                        registry_json="{}")
    job = jobs.trainer_job(_ctx("j", "ns"), "st-marys", _st_marys(), task, 60)
    env = {e["name"]: e.get("value") for e in job["spec"]["template"]["spec"]["containers"][0]
           ["env"]}
    assert TrainingTask.model_validate_json(env["DEEPRAD_TASK"]) == task


def test_active_deadline_from_the_round_deadline() -> None:
    now = datetime(2030, 1, 1, tzinfo=UTC)
    assert jobs.active_deadline_seconds(now + timedelta(minutes=45), now) == 2700
    assert jobs.active_deadline_seconds(now + timedelta(hours=3), now, timedelta(hours=2)) == 7200
    assert jobs.active_deadline_seconds(now - timedelta(minutes=1), now) == 1

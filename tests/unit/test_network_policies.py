"""Every pod Deep-Rad runs matches a NetworkPolicy of its chart that lets nothing in and lets it
out only to DNS and the object store: the hub's prepare and aggregator Jobs (they hold the hub's
keys and store credentials) and every hospital's trainer Jobs (they read patient data).

The Jobs are the ones the operator and the site agent really render (`render/jobs.py`), placed
where the charts tell them to run, so a renamed label or a new kind of Job that no policy
selects fails here."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import BaseModel

from deeprad.operator.api.common import LabelSelector
from deeprad.operator.decide.sites import matches_selector
from deeprad.operator.render import jobs
from deeprad.operator.site.config import AgentConfig
from tests.unit.test_charts import HUB, SITE, SITE_EXAMPLE, by_kind, render

Obj = dict[str, Any]
DNS = {"ports": [{"port": 53, "protocol": "UDP"}, {"port": 53, "protocol": "TCP"}]}


class _Task(BaseModel):
    study: str = "tumor-detection"
    round: int = 2


def _policies_for(objs: list[Obj], job: Obj) -> list[Obj]:
    labels = job["spec"]["template"]["metadata"]["labels"]
    return [p for p in by_kind(objs, "NetworkPolicy")
            if p["metadata"]["namespace"] == job["metadata"]["namespace"]
            and matches_selector(labels, LabelSelector.model_validate(
                p["spec"]["podSelector"]))]


def _assert_store_and_dns_only(policy: Obj, store_port: int) -> None:
    spec = policy["spec"]
    assert spec["policyTypes"] == ["Ingress", "Egress"], policy["metadata"]["name"]
    assert not spec.get("ingress"), "nothing may connect to a Job's pod"
    dns, *rest = spec["egress"]
    assert dns == DNS
    ports = {(p["port"], p["protocol"]) for rule in rest for p in rule["ports"]}
    assert ports == {(store_port, "TCP")}, f"{policy['metadata']['name']} lets out {ports}"


@pytest.mark.parametrize("component", ["prepare", "aggregator"])
def test_every_hub_job_is_confined_to_the_store(component: str) -> None:
    objs = render(HUB, None, "store.endpoint=minio.store:9000", namespace="deeprad")
    (operator,) = by_kind(objs, "Deployment")
    args = operator["spec"]["template"]["spec"]["containers"][0]["args"]
    namespace = args[args.index("--jobs-namespace") + 1]
    ctx = jobs.JobContext(name=f"tumor-detection-r2-{component}", namespace=namespace,
                          study="tumor-detection", round_name="tumor-detection-r2",
                          image="ghcr.io/deeprad/deeprad:0.1.0")
    render_job = jobs.prepare_job if component == "prepare" else jobs.aggregator_job
    job = render_job(ctx, _Task(), 600, jobs.StoreAccess("s3://deeprad", "deeprad-store"),
                     "deeprad-hub-identity")
    policies = _policies_for(objs, job)
    assert policies, f"no NetworkPolicy in {namespace} selects the {component} Job's pods"
    for policy in policies:
        _assert_store_and_dns_only(policy, 9000)


@pytest.mark.parametrize("values", [None, SITE_EXAMPLE], ids=["site-defaults", "st-marys"])
def test_every_trainer_job_is_confined_to_the_store(values: Path | None) -> None:
    objs = render(SITE, values, "store.endpoint=https://minio.hub.example.org")
    (cm,) = [o for o in by_kind(objs, "ConfigMap") if "config.yaml" in o.get("data", {})]
    config = AgentConfig.model_validate(yaml.safe_load(cm["data"]["config.yaml"]))
    ctx = jobs.JobContext(name="tumor-detection-r2-st-marys",
                          namespace=config.training.namespace, study="tumor-detection",
                          round_name="tumor-detection-r2", image=config.training.image)
    job = jobs.trainer_job(ctx, config.site, config.training, _Task(), 600)
    policies = _policies_for(objs, job)
    assert policies, f"no NetworkPolicy in {config.training.namespace} selects trainer pods"
    store_port = 443  # networkPolicy.store.port, the same in both values files
    for policy in policies:
        _assert_store_and_dns_only(policy, store_port)

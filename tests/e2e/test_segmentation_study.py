"""The 3D segmentation study through the operator on real clusters: a hub and two hospital
clusters, each hospital holding the anatomy benchmark (SYNTHETIC lesions on real MNI152
anatomy, generated in the trainer pod), a small 3D UNet trained for 2 rounds of FedAvg, then
the final model scored by both hospitals on their held-out test patients.

A user checks: every round succeeded with both hospitals; each site's entry and the round's
aggregateMetrics carry Dice (pooled from the sites' statistics: the case counts add up); the
FederatedStudy's status holds the final model's pooled and per-site test scores, and which
round was best on validation. Tiny on purpose (24^3 volumes, 8 patients per site): it checks
the plumbing, not the model.
"""

from __future__ import annotations

import itertools
import json
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from federation import (
    JOBS_NAMESPACE,
    Federation,
    SitePlan,
    condition,
    items,
    start_federation,
)

from deeprad.core.data.anatomy import DEFAULT_SITES
from deeprad.core.layout import StudyLayout
from deeprad.core.protocol import AggregateReport, SiteResult
from deeprad.devenv.cluster import Cluster, start_clusters
from deeprad.devenv.s3_server import S3Server

pytestmark = pytest.mark.e2e

STUDY = "lesion-seg"
HOSPITALS = ("hospital-a", "hospital-b")
STUDY_TIMEOUT = 300.0
PATIENTS, TEST_PATIENTS = 8, 2
# Patient seeds whose 2-patient validation splits each hold a lesion scan (Dice is measured
# on those; a split without one has no Dice), as the checks below need.
SEEDS = (10, 12)
PATCH = 16  # training patches of the 24^3 volumes


def _anatomy_site(name: str, cluster: Cluster, index: int) -> SitePlan:
    """A hospital whose agent's data is the anatomy benchmark (kind anatomy, its own scanner
    profile and patients) and whose HospitalSite declares 3D volumes."""
    return SitePlan(
        name, cluster, index, namespace="seg-training",
        dataset={"kind": "anatomy", "options": {
            "profile": DEFAULT_SITES[index].as_dict(), "patients": PATIENTS,
            "test_patients": TEST_PATIENTS, "seed": SEEDS[index]}},
        data={"modality": "mri", "kind": "volumes", "sampleCount": PATIENTS,
              "description": "anatomy benchmark: SYNTHETIC lesions on real anatomy"})


@pytest.fixture(scope="module")
def fed(clusters: dict[str, Cluster], s3_server: S3Server, devenv_dir: Path,
        tmp_path_factory: pytest.TempPathFactory, owner_token: str) -> Iterator[Federation]:
    hub = Cluster("seg-hub", devenv_dir / "clusters", owner_token=owner_token)
    start_clusters([hub])
    plans = [_anatomy_site(HOSPITALS[0], clusters["site-1"], 0),
             _anatomy_site(HOSPITALS[1], clusters["site-2"], 1)]
    try:
        federation = start_federation(hub, plans, s3_server,
                                      tmp_path_factory.mktemp("seg-federation"), owner_token)
        try:
            yield federation
        finally:
            federation.stop()
    finally:
        hub.stop()


def _study() -> dict[str, Any]:
    return {"apiVersion": "deeprad.io/v1alpha1", "kind": "FederatedStudy",
            "metadata": {"name": STUDY},
            "spec": {
                "model": {"name": "unet3d", "task": "segmentation",
                          "kwargs": {"in_channels": 3, "channels": [4, 8, 16]}},
                "data": {"imageSize": 24, "valFraction": 0.25},
                "sites": list(HOSPITALS), "rounds": 2,
                # Secure aggregation is covered by test_operator_study; plain FedAvg keeps
                # this one short.
                "roundTemplate": {"minSites": 2, "deadline": "10m",
                                  "privacy": {"secureAggregation": False}, "training": {
                                      "localEpochs": 1, "batchSize": 2, "lr": 0.001,
                                      "patchSize": PATCH}}}}


def _report(fed: Federation, ns: str) -> str:
    lines = [f"{r['metadata']['name']}: {json.dumps(r.get('status'))[:1500]}"
             for r in items(fed, "federatedrounds", "-n", ns)]
    for site in fed.sites:
        lines += [f"task {t['metadata']['name']}: {json.dumps(t.get('status'))[:800]}"
                  for t in items(fed, "sitetasks", "-n", f"deeprad-site-{site}")]
    lines += [f"job {j['metadata']['name']}: {json.dumps(j.get('status'))[:400]}"
              for j in items(fed, "jobs", "-n", JOBS_NAMESPACE)]
    return "\n".join(lines)


def _done(fed: Federation, ns: str) -> dict[str, Any] | None:
    study = fed.get("federatedstudy", STUDY, "-n", ns) or {}
    state = (study.get("status") or {}).get("state")
    if state == "Failed":
        pytest.fail(f"study failed: {json.dumps(study['status'])[:3000]}\n{_report(fed, ns)}")
    return study if state == "Succeeded" else None


def _fraction(value: Any) -> bool:
    return isinstance(value, int | float) and 0.0 <= value <= 1.0


def test_segmentation_study_reports_dice_per_site_pooled_and_final(fed: Federation) -> None:
    ns = f"seg-{uuid.uuid4().hex[:6]}"
    fed.hub.kubectl("create", "namespace", ns)
    fed.hub.kubectl("apply", "-n", ns, "-f", "-", input=json.dumps(_study()))
    try:
        study = fed.wait("the segmentation study to succeed", lambda: _done(fed, ns),
                         STUDY_TIMEOUT)
    except pytest.fail.Exception as exc:
        pytest.fail(f"{exc}\n{_report(fed, ns)}")
    status = study["status"]
    assert status["completedRounds"] == 2, _report(fed, ns)
    assert condition(study, "Succeeded")["reason"] == "RoundsCompleted"
    every = sorted(items(fed, "federatedrounds", "-n", ns), key=lambda r: r["spec"]["round"])
    trained = [r for r in every if r["spec"]["mode"] == "train"]
    assert [r["spec"]["round"] for r in trained] == [1, 2] and len(every) == 3
    layout = StudyLayout(ns, STUDY, study["metadata"]["uid"])
    for r in trained:
        st = r["status"]
        assert st["state"] == "Succeeded", _report(fed, ns)
        assert {s["site"]: s["state"] for s in st["sites"]} == dict.fromkeys(HOSPITALS,
                                                                             "Reported")
        for entry in st["sites"]:  # the site's model after local training, on its validation
            assert entry["metrics"]["positives"] >= 1, entry  # SEEDS: a lesion scan in each
            assert _fraction(entry["metrics"]["dice"]), entry
        # The round's input model on the sites' validation data, POOLED by the aggregator:
        # its scans are the sites' scans, and its Dice the mean of theirs weighted by their
        # scans with a lesion (Dice is measured on those).
        pooled = st["inputMetrics"]
        results = [SiteResult.model_validate(fed.store_json(layout.result(r["spec"]["round"],
                                                                           site)))
                   for site in HOSPITALS]
        measured = [res.global_metrics for res in results if res.global_metrics is not None]
        assert len(measured) == 2 and pooled["n"] == sum(m.n for m in measured)
        assert pooled["dice"] == pytest.approx(
            sum((m.dice or 0.0) * m.positives for m in measured)
            / sum(m.positives for m in measured), abs=1e-6)
        assert _fraction(pooled["auroc"]) or pooled.get("auroc") is None
    # Round 1's output was measured by round 2's sites; round 2's by the final evaluation.
    for prev, nxt in itertools.pairwise(every):
        fresh = fed.get("federatedround", prev["metadata"]["name"], "-n", ns) or {}
        assert fresh["status"]["aggregateMetrics"] == nxt["status"]["inputMetrics"]
        assert _fraction(fresh["status"]["aggregateMetrics"]["dice"])
    best = status["bestMetric"]
    assert best["name"] == "dice" and best["round"] in (1, 2) and _fraction(best["value"])

    # The final model, scored on each hospital's held-out TEST patients.
    evaluation = every[-1]
    assert evaluation["spec"]["mode"] == "evaluate"
    assert evaluation["spec"]["inputCheckpoint"] == status["latestCheckpoint"]
    final, pooled = status["finalEvaluation"], status["finalMetrics"]
    assert (final["state"], final["metric"]) == ("Succeeded", "dice")
    assert _fraction(pooled["dice"]) and final["value"] == pooled["dice"]
    assert pooled["n"] == len(HOSPITALS) * TEST_PATIENTS  # every test scan, pooled
    assert {s["site"]: s["split"] for s in final["sites"]} == dict.fromkeys(HOSPITALS, "test")
    for site in final["sites"]:
        metrics = site["metrics"]
        assert metrics["n"] == TEST_PATIENTS and _fraction(metrics["dice"]), site
        assert all(_fraction(v) for v in (metrics.get("lesionSensitivity") or {}).values())
    report = AggregateReport.model_validate(fed.store_json(
        layout.aggregate(evaluation["spec"]["round"])))
    assert report.contributors == [] and report.test_metrics is not None
    # The evaluation uploaded nothing: no update at either hospital.
    assert not list(fed.s3.client().list_objects(
        "deeprad", prefix=layout.updates_prefix(evaluation["spec"]["round"]), recursive=True))
    # Every hospital's tasks carried the patch size: its trainer trained on 16^3 patches of
    # the 24^3 volumes and scored by 16^3 windows.
    for site in fed.sites:
        tasks = items(fed, "sitetasks", "-n", f"deeprad-site-{site}")
        assert tasks and all(t["spec"]["training"]["patchSize"] == PATCH for t in tasks)
    text = fed.operator.metrics()
    assert f'deeprad_global_dice{{namespace="{ns}",study="{STUDY}"}}' in text

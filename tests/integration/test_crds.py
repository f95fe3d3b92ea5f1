"""The CRDs in crds/ on a real kube-apiserver: they establish, the examples apply, `kubectl
explain` and `kubectl get` are useful, and bad input is refused with the field named."""

from __future__ import annotations

import copy
import json
import uuid
from pathlib import Path
from typing import Any

import pytest
import yaml
from redteam import refused

from deeprad.devenv.cluster import Cluster

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
CRDS = ROOT / "crds"
EXAMPLES = ROOT / "examples"
API = "deeprad.io/v1alpha1"
PLURALS = ("hospitalsites", "federatedstudies", "federatedrounds", "sitetasks")
# Valid public keys (base64 of 32 bytes), as `deeprad site register` writes them.
KEY_A = "Psy2mQcyA7EZmI3zzfHv9PHBlyb1GNO4M644weEL8yQ="
KEY_B = "W7OAMzybUo+M6JmOq0mD4nXn2J9bn3UDcx1ivMUULBI="
DELETE = object()


@pytest.fixture(scope="module")
def hub(hub_cluster: Cluster) -> Cluster:
    """The hub with the CRDs installed (server-side apply) and Established."""
    hub_cluster.kubectl("apply", "--server-side", "-f", str(CRDS))
    hub_cluster.kubectl("wait", "--for=condition=Established", "--timeout=60s",
                        *(f"crd/{p}.deeprad.io" for p in PLURALS))
    return hub_cluster


@pytest.fixture(scope="module")
def ns(hub: Cluster) -> str:
    """A fresh namespace for this module's objects."""
    name = f"crds-{uuid.uuid4().hex[:8]}"
    hub.kubectl("create", "namespace", name)
    return name


def _apply(hub: Cluster, obj: dict[str, Any], *args: str, check: bool = False
           ) -> tuple[int, str]:
    out = hub.kubectl("apply", *args, "-f", "-", input=json.dumps(obj), check=check)
    return out.returncode, out.stderr + out.stdout


def _edit(obj: dict[str, Any], changes: dict[str, Any]) -> dict[str, Any]:
    """A copy of obj with dotted paths set (or removed with DELETE)."""
    out = copy.deepcopy(obj)
    for path, value in changes.items():
        *parents, leaf = path.split(".")
        node = out
        for key in parents:
            node = node.setdefault(key, {})
        if value is DELETE:
            node.pop(leaf, None)
        else:
            node[leaf] = value
    return out


def _site(name: str = "bad-site") -> dict[str, Any]:
    return {"apiVersion": API, "kind": "HospitalSite", "metadata": {"name": name},
            "spec": {"identity": {"signingKey": KEY_A, "keyAgreementKey": KEY_B}}}


def _study(name: str = "bad-study") -> dict[str, Any]:
    return {"apiVersion": API, "kind": "FederatedStudy", "metadata": {"name": name},
            "spec": {"model": {"name": "tumor-cnn"}, "rounds": 3}}


def _round(name: str = "bad-round") -> dict[str, Any]:
    return {"apiVersion": API, "kind": "FederatedRound", "metadata": {"name": name},
            "spec": {"round": 1, "model": {"name": "tumor-cnn"},
                     "sites": ["st-marys", "charite"], "minSites": 2}}


def _task(name: str = "bad-task") -> dict[str, Any]:
    url = "https://s3.example.org/deeprad/ns/study/s-uid/rounds/1/"
    return {"apiVersion": API, "kind": "SiteTask", "metadata": {"name": name}, "spec": {
        "roundRef": {"namespace": "default", "name": "study-r1", "uid": "u-1"},
        "study": "study", "studyUid": "s-uid", "round": 1, "site": "st-marys",
        "model": {"name": "tumor-cnn"},
        "parentDigest": "0" * 64,
        "hub": {"name": "hub", "signingKey": KEY_A, "keyAgreementKey": KEY_B},
        "objects": [{"key": "ns/study/s-uid/rounds/0/global.json", "method": "GET",
                     "url": url + "../0/global.json"},
                    {"key": "ns/study/s-uid/rounds/1/updates/st-marys.bin", "method": "PUT",
                     "url": url + "updates/st-marys.bin"}],
        "deadline": "2030-01-01T00:00:00Z"}}


# (what is wrong, manifest, text the refusal must contain: the field path, and the reason)
BAD_INPUT: list[tuple[str, dict[str, Any], tuple[str, ...]]] = [
    ("push mode without a kubeconfig Secret",
     _edit(_site(), {"spec.connection": {"mode": "push"}}),
     ("spec.connection.kubeconfigSecretRef", "required when mode is push")),
    ("pull mode with a kubeconfig Secret",
     _edit(_site(), {"spec.connection": {"mode": "pull", "kubeconfigSecretRef": {
         "name": "kc", "namespace": "deeprad-system"}}}),
     ("spec.connection.kubeconfigSecretRef", "must be empty when mode is pull")),
    ("unknown connection mode", _edit(_site(), {"spec.connection.mode": "carrier-pigeon"}),
     ("spec.connection.mode", "Unsupported value")),
    ("signing key not base64 of 32 bytes", _edit(_site(), {"spec.identity.signingKey": "abc="}),
     ("spec.identity.signingKey",)),
    ("missing identity", _edit(_site(), {"spec.identity": DELETE}),
     ("spec.identity", "Required value")),
    ("missing key-agreement key", _edit(_site(), {"spec.identity.keyAgreementKey": DELETE}),
     ("spec.identity.keyAgreementKey", "Required value")),
    ("zero GPUs", _edit(_site(), {"spec.gpu.count": 0}),
     ("spec.gpu.count", "greater than or equal to 1")),
    ("GPU count of the wrong type", _edit(_site(), {"spec.gpu.count": "two"}),
     ("spec.gpu.count", "must be of type integer")),
    ("site name too long", _site("a-very-long-hospital-name-x"),
     ("metadata.name", "Too long", "24")),
    ("unknown modality", _edit(_site(), {"spec.data": {"modality": "xrays", "sampleCount": 5}}),
     ("spec.data.modality", "Unsupported value")),
    ("negative sample count", _edit(_site(), {"spec.data": {"modality": "ct", "sampleCount": -1}}),
     ("spec.data.sampleCount",)),
    ("memory not a quantity", _edit(_site(), {"spec.limits.memory": "lots"}),
     ("spec.limits.memory", "quantity")),
    ("maintenance window at 25:00", _edit(_site(), {"spec.maintenanceWindows": [
        {"days": ["Sun"], "start": "25:00", "duration": "2h"}]}),
     ("spec.maintenanceWindows[0].start",)),
    ("missing model", _edit(_study(), {"spec.model": DELETE}), ("spec.model", "Required value")),
    ("missing rounds", _edit(_study(), {"spec.rounds": DELETE}),
     ("spec.rounds", "Required value")),
    ("rounds of the wrong type", _edit(_study(), {"spec.rounds": "three"}),
     ("spec.rounds", "must be of type integer")),
    ("too many rounds", _edit(_study(), {"spec.rounds": 5000}),
     ("spec.rounds", "less than or equal to 1000")),
    ("unknown model", _edit(_study(), {"spec.model.name": "gpt"}), ("spec.model.name",)),
    ("a segmentation network in a classification study",
     _edit(_study(), {"spec.model.name": "unet3d"}),
     ("spec.model.task", "model.task is classification but unet3d is a segmentation network: "
                         "set model.task: segmentation")),
    ("a classification network in a segmentation round",
     _edit(_round(), {"spec.model.task": "segmentation"}),
     ("spec.model.task", "tumor-cnn is a classification network")),
    ("unknown round mode", _edit(_round(), {"spec.mode": "infer"}),
     ("spec.mode", "Unsupported value")),
    ("a Dice target above 1", _edit(_study(), {"spec.stopping": {"metric": "dice",
                                                                 "target": 1.5}}),
     ("spec.stopping.target", "between 0 and 1")),
    ("negative epochs", _edit(_study(), {"spec.roundTemplate.training.localEpochs": -1}),
     ("spec.roundTemplate.training.localEpochs", "greater than or equal to 1")),
    ("zero learning rate", _edit(_study(), {"spec.roundTemplate.training.lr": 0}),
     ("spec.roundTemplate.training.lr", "greater than 0")),
    ("negative FedProx mu", _edit(_study(), {"spec.roundTemplate.training.fedproxMu": -0.1}),
     ("spec.roundTemplate.training.fedproxMu",)),
    ("training patches in a classification study",
     _edit(_study(), {"spec.roundTemplate.training.patchSize": 32}),
     ("spec.roundTemplate.training.patchSize", "applies to a segmentation model only")),
    ("training patches in a classification round",
     _edit(_round(), {"spec.training": {"patchSize": 32}}),
     ("spec.training.patchSize", "applies to a segmentation model only")),
    ("a patch too small for a network", _edit(_study(), {
        "spec.model": {"name": "unet3d", "task": "segmentation"},
        "spec.roundTemplate.training.patchSize": 4}),
     ("spec.roundTemplate.training.patchSize", "greater than or equal to 8")),
    ("a patch larger than the volumes", _edit(_study(), {
        "spec.model": {"name": "unet3d", "task": "segmentation"},
        "spec.data": {"imageSize": 48}, "spec.roundTemplate.training.patchSize": 64}),
     ("spec.roundTemplate.training.patchSize", "at most data.imageSize")),
    ("a round's patch larger than its volumes", _edit(_round(), {
        "spec.model": {"name": "unet3d", "task": "segmentation"},
        "spec.data": {"imageSize": 24}, "spec.training": {"patchSize": 32}}),
     ("spec.training.patchSize", "at most data.imageSize")),
    ("a lesion share above 1", _edit(_study(), {
        "spec.model": {"name": "unet3d", "task": "segmentation"},
        "spec.roundTemplate.training.patchForeground": 1.5}),
     ("spec.roundTemplate.training.patchForeground", "less than or equal to 1")),
    ("unknown optimizer", _edit(_study(), {"spec.roundTemplate.training.optimizer": "adamw"}),
     ("spec.roundTemplate.training.optimizer", "Unsupported value")),
    ("training field at the wrong level", _edit(_study(), {"spec.roundTemplate.localEpochs": 3}),
     ("spec.roundTemplate.localEpochs", "unknown field")),
    ("unknown strategy", _edit(_study(), {"spec.roundTemplate.strategy.name": "fedsgd"}),
     ("spec.roundTemplate.strategy.name", "Unsupported value")),
    ("parameter the strategy does not take",
     _edit(_study(), {"spec.roundTemplate.strategy": {"name": "fedavg",
                                                      "params": {"beta": 0.1}}}),
     ("spec.roundTemplate.strategy.params", "fedavg: server_lr")),
    ("robust strategy with secure aggregation",
     _edit(_study(), {"spec.roundTemplate.strategy.name": "krum"}),
     ("spec.roundTemplate.strategy.name", "secureAggregation: false")),
    ("trimmed mean trimming 90% at each end",
     _edit(_study(), {"spec.roundTemplate.strategy": {"name": "trimmedmean",
                                                      "params": {"beta": 0.9}},
                      "spec.roundTemplate.privacy": {"secureAggregation": False}}),
     ("spec.roundTemplate.strategy.params[beta]",
      "strategy trimmedmean: beta must be in [0, 0.5)")),
    ("krum resisting -3 poisoned updates",
     _edit(_study(), {"spec.roundTemplate.strategy": {"name": "krum",
                                                      "params": {"byzantine": -3}},
                      "spec.roundTemplate.privacy": {"secureAggregation": False}}),
     ("spec.roundTemplate.strategy.params[byzantine]",
      "strategy krum: byzantine must be an integer >= 0")),
    ("krum selecting half an update",
     _edit(_round(), {"spec.strategy": {"name": "krum", "params": {"select": 1.5}},
                      "spec.privacy": {"secureAggregation": False}}),
     ("spec.strategy.params[select]", "strategy krum: select must be an integer >= 1")),
    ("negative server learning rate",
     _edit(_study(), {"spec.roundTemplate.strategy": {"name": "fedavg",
                                                      "params": {"server_lr": -1}}}),
     ("spec.roundTemplate.strategy.params[server_lr]",
      "strategy fedavg: server_lr must be > 0")),
    ("secure aggregation against an unknown threat model",
     _edit(_study(), {"spec.roundTemplate.privacy.secureAggregationThreatModel": "paranoid"}),
     ("spec.roundTemplate.privacy.secureAggregationThreatModel", "Unsupported value",
      "semi-honest", "malicious")),
    ("fedadagrad given a beta2 it has no use for",
     _edit(_round(), {"spec.strategy": {"name": "fedadagrad", "params": {"beta2": 0.9}},
                      "spec.privacy": {"secureAggregation": False}}),
     ("spec.strategy.params", "fedadagrad: server_lr, beta1, tau")),
    ("minSites above the number of sites",
     _edit(_study(), {"spec.sites": ["st-marys", "charite"], "spec.roundTemplate.minSites": 3}),
     ("spec.roundTemplate.minSites", "must not exceed the number of sites")),
    ("both sites and siteSelector",
     _edit(_study(), {"spec.sites": ["st-marys"], "spec.siteSelector": {"matchLabels": {}}}),
     ("spec.sites", "at most one of sites and siteSelector")),
    ("selector In without values", _edit(_study(), {"spec.siteSelector": {
        "matchExpressions": [{"key": "deeprad.io/region", "operator": "In"}]}}),
     ("spec.siteSelector.matchExpressions[0].values",)),
    ("deadline not a duration", _edit(_study(), {"spec.roundTemplate.deadline": "soon"}),
     ("spec.roundTemplate.deadline",)),
    ("deadline too short", _edit(_study(), {"spec.roundTemplate.deadline": "10s"}),
     ("spec.roundTemplate.deadline", "between 1m and 168h")),
    ("AUROC target above 1", _edit(_study(), {"spec.stopping.target": 1.5}),
     ("spec.stopping.target", "between 0 and 1")),
    ("epsilon of zero", _edit(_study(), {"spec.privacyBudget": {"epsilon": 0, "delta": 1e-5}}),
     ("spec.privacyBudget.epsilon", "greater than 0")),
    ("delta of 1.5", _edit(_study(), {"spec.privacyBudget": {"epsilon": 3, "delta": 1.5}}),
     ("spec.privacyBudget.delta", "less than 1")),
    ("DP-SGD without a privacy budget",
     _edit(_study(), {"spec.roundTemplate.privacy.differentialPrivacy": {
         "noiseMultiplier": 1.0, "maxGradNorm": 1.0}}),
     ("spec.privacyBudget", "Required value")),
    ("DP-SGD with a noise multiplier of 0 (no noise)",
     _edit(_study(), {"spec.privacyBudget": {"epsilon": 3, "delta": 1e-5},
                      "spec.roundTemplate.privacy.differentialPrivacy": {
                          "noiseMultiplier": 0, "maxGradNorm": 1.0}}),
     ("spec.roundTemplate.privacy.differentialPrivacy.noiseMultiplier", "greater than 0")),
    ("a round with DP-SGD but no noise multiplier",
     _edit(_round(), {"spec.privacy.differentialPrivacy": {"maxGradNorm": 1.0}}),
     ("spec.privacy.differentialPrivacy.noiseMultiplier", "required in a round")),
    ("study name too long", _study("s" * 33), ("metadata.name", "Too long", "32")),
    ("study name not a DNS label", _study("Tumor.Study"), ("metadata.name",)),
    ("round minSites above its sites", _edit(_round(), {"spec.minSites": 3}),
     ("spec.minSites", "must not exceed the number of sites")),
    ("round minSites 1 with secure aggregation", _edit(_round(), {"spec.minSites": 1}),
     ("spec.minSites", "at least 2")),
    ("negative round number", _edit(_round(), {"spec.round": -1}), ("spec.round",)),
    ("a site listed twice", _edit(_round(), {"spec.sites": ["charite", "charite"]}),
     ("spec.sites[1]", "Duplicate value")),
    ("round name too long", _round("r" * 39), ("metadata.name", "Too long", "38")),
    ("task without granted objects", _edit(_task(), {"spec.objects": DELETE}),
     ("spec.objects", "Required value")),
    ("task parent digest not sha256", _edit(_task(), {"spec.parentDigest": "abc"}),
     ("spec.parentDigest",)),
    ("task URL not http(s)", _edit(_task(), {"spec.objects": [
        {"key": "a/b", "method": "PUT", "url": "file:///etc"}]}), ("spec.objects[0].url",)),
    ("task object method not GET/PUT", _edit(_task(), {"spec.objects": [
        {"key": "a/b", "method": "DELETE", "url": "https://x/a/b"}]}),
     ("spec.objects[0].method", "Unsupported value")),
    ("task without the study's uid", _edit(_task(), {"spec.studyUid": DELETE}),
     ("spec.studyUid", "Required value")),
    ("site serving '*' and a namespace", _edit(_site(), {
        "spec.studyNamespaces": ["*", "research"]}),
     ("spec.studyNamespaces", "'*' already allows every namespace")),
    ("site namespace not a DNS label", _edit(_site(), {"spec.studyNamespaces": ["Research"]}),
     ("spec.studyNamespaces[0]",)),
    ("a study's round sharing checkpoints itself", _edit(_round(), {
        "spec.studyRef": {"name": "tumor"}, "spec.shareCheckpointsWith": ["friends"]}),
     ("spec.shareCheckpointsWith", "a study's rounds share what the FederatedStudy")),
    ("sharing checkpoints with every namespace", _edit(_study(), {
        "spec.shareCheckpointsWith": ["*"]}), ("spec.shareCheckpointsWith[0]",)),
]


def test_crds_establish_with_short_names_and_category(hub: Cluster) -> None:
    out = hub.kubectl("api-resources", "--api-group=deeprad.io", "-o", "wide").stdout
    for plural, short in zip(PLURALS, ("hsite", "fstudy", "fround", "stask"), strict=True):
        line = next(ln for ln in out.splitlines() if ln.startswith(plural))
        assert short in line and "deeprad" in line
    assert "false" in next(ln for ln in out.splitlines() if ln.startswith("hospitalsites"))


def test_examples_apply_and_are_defaulted(hub: Cluster, ns: str) -> None:
    hub.kubectl("apply", "--dry-run=server", "-n", ns, "-f", str(EXAMPLES))
    hub.kubectl("apply", "-n", ns, "-f", str(EXAMPLES))
    study = json.loads(hub.kubectl("get", "federatedstudy", "tumor-detection", "-n", ns,
                                   "-o", "json").stdout)
    template = study["spec"]["roundTemplate"]
    assert template["minSites"] == 2 and template["strategy"]["name"] == "fedavg"
    assert template["privacy"] == {"secureAggregation": True,  # secure by default
                                   "secureAggregationThreatModel": "semi-honest"}
    assert template["training"]["fedproxMu"] == 0 and study["spec"]["rounds"] == 3
    sites = hub.kubectl("get", "hospitalsites", "st-marys", "charite").stdout
    assert "pull" in sites and "push" in sites
    assert sites.splitlines()[0].split()[6] == "NAMESPACES" and '["research"]' in sites
    st_marys = json.loads(hub.kubectl("get", "hsite", "st-marys", "-o", "json").stdout)
    assert st_marys["spec"]["gpu"]["resourceName"] == "nvidia.com/gpu"


def test_site_register_output_is_accepted(hub: Cluster, tmp_path: Path) -> None:
    from deeprad.cli.keys import site_manifests
    from deeprad.core.identity import Identity

    _, site = site_manifests(Identity.generate("registered", "site"))
    hub.kubectl("apply", "--dry-run=server", "-f", "-", input=json.dumps(site))


def test_explain_documents_the_fields(hub: Cluster) -> None:
    out = hub.kubectl("explain", "federatedstudy.spec.roundTemplate").stdout
    for text in ("minSites", "Quorum", "deadline", "training", "strategy", "privacy"):
        assert text in out
    out = hub.kubectl("explain", "federatedstudy.spec.roundTemplate.training.fedproxMu").stdout
    assert "FedProx" in out
    out = hub.kubectl("explain", "hospitalsite.spec.identity.signingKey").stdout
    assert "Ed25519" in out
    out = hub.kubectl("explain", "federatedround.status.conditions.observedGeneration").stdout
    assert "generation" in out


def test_get_federatedrounds_shows_progress_columns(hub: Cluster, ns: str) -> None:
    rnd = _edit(_round("tumor-detection-r1"), {"spec.studyRef": {"name": "tumor-detection"}})
    _apply(hub, rnd, "-n", ns, check=True)
    status = {"status": {
        "startTime": "2030-01-01T10:00:00Z", "state": "Succeeded", "admittedSites": 2,
        "reportedSites": 2, "aggregateMetrics": {"auroc": 0.974, "dice": 0.81},
        "sites": [{"site": "st-marys", "state": "Reported", "samples": 1200},
                  {"site": "charite", "state": "Reported", "samples": 800}],
        "conditions": [{"type": "Succeeded", "status": "True", "reason": "Aggregated",
                        "message": "2 of 2 sites", "observedGeneration": 1,
                        "lastTransitionTime": "2030-01-01T10:20:00Z"}]}}
    hub.kubectl("patch", "federatedround", "tumor-detection-r1", "-n", ns,
                "--subresource=status", "--type=merge", "-p", json.dumps(status))
    lines = hub.kubectl("get", "federatedrounds", "-n", ns).stdout.splitlines()
    assert lines[0].split() == ["NAME", "STUDY", "ROUND", "REPORTED", "ADMITTED", "STATE",
                                "WAITING", "AUROC", "DICE", "AGE"]
    row = next(ln for ln in lines if ln.startswith("tumor-detection-r1")).split()
    # WAITING is empty for an admitted round.
    assert row[1:8] == ["tumor-detection", "1", "2", "2", "Succeeded", "0.974", "0.81"]
    selected = hub.kubectl("get", "fround", "-n", ns, "--field-selector",
                           "spec.studyRef.name=tumor-detection", "-o", "name").stdout
    assert selected.strip() == "federatedround.deeprad.io/tumor-detection-r1"


@pytest.mark.parametrize(("what", "manifest", "expected"), BAD_INPUT,
                         ids=[b[0] for b in BAD_INPUT])
def test_bad_input_is_refused_naming_the_field(hub: Cluster, ns: str, what: str,
                                               manifest: dict[str, Any],
                                               expected: tuple[str, ...]) -> None:
    code, out = _apply(hub, manifest, "-n", ns)
    if code == 0:  # it was created: clean up before failing so other cases stay independent
        hub.kubectl("delete", "-n", ns, "-f", "-", input=json.dumps(manifest), check=False)
    assert code != 0, f"{what}: accepted"
    for text in expected:
        assert text in out, f"{what}: {text!r} not in {out!r}"


MODEL_CODE_ATTACKS = {
    "subprocess-run": {"name": "subprocess:run", "kwargs": {"args": ["sh", "-c", "env"]}},
    "os-system": {"name": "os:system", "kwargs": {"command": "env"}},
    "builtins-exec": {"name": "builtins:exec", "kwargs": {"source": "print(1)"}},
    "image-module": {"name": "deeprad.cli:main", "kwargs": {"argv": ["keys", "generate"]}},
}


@pytest.mark.parametrize("kind", ["FederatedStudy", "FederatedRound", "SiteTask"])
@pytest.mark.parametrize("attack", list(MODEL_CODE_ATTACKS))
def test_redteam_model_code_is_refused_at_admission(hub: Cluster, ns: str, kind: str,
                                                    attack: str) -> None:
    """An import path as the model's name is code that would run at the hub and at every
    hospital: the API server refuses it before any object exists."""
    obj = {"FederatedStudy": _study, "FederatedRound": _round, "SiteTask": _task}[kind](
        f"redteam-{attack}")
    obj["spec"]["model"] = MODEL_CODE_ATTACKS[attack]
    code, out = _apply(hub, obj, "-n", ns)
    assert code != 0, f"{kind} with model {obj['spec']['model']['name']} was admitted"
    assert "spec.model.name" in out and "Unsupported value" in out and "tumor-cnn" in out, out
    gone = hub.kubectl("get", kind.lower(), obj["metadata"]["name"], "-n", ns, check=False)
    assert gone.returncode != 0 and "NotFound" in gone.stderr  # nothing was written
    refused(f"model name {obj['spec']['model']['name']} in a {kind}", "API server admission",
            next(ln for ln in out.splitlines() if "spec.model.name" in ln))


def test_strategy_settings_in_range_are_accepted(hub: Cluster, ns: str) -> None:
    clear = {"secureAggregation": False}
    for strategy, privacy in (
            ({"name": "fedavg", "params": {"server_lr": 0.5}}, {}),
            # every server optimizer runs on the secure-aggregation sum (on by default)
            *(({"name": name}, {"secureAggregationThreatModel": model}) for name, model in (
                ("fedavgm", "semi-honest"), ("fedadam", "malicious"), ("fedyogi", "semi-honest"),
                ("fedadagrad", "semi-honest"))),
            ({"name": "fedadam", "params": {"server_lr": 0.1, "beta1": 0, "beta2": 0.999,
                                            "tau": 1e-9}}, clear),
            ({"name": "trimmedmean", "params": {"beta": 0.0}}, clear),
            ({"name": "krum", "params": {"byzantine": 1, "select": 3}}, clear)):
        study = _edit(_study(f"ok-{strategy['name']}"), {
            "spec.roundTemplate.strategy": strategy, "spec.roundTemplate.privacy": privacy})
        hub.kubectl("apply", "--dry-run=server", "-n", ns, "-f", "-", input=json.dumps(study))


def test_at_least_fifteen_bad_inputs() -> None:
    assert len(BAD_INPUT) >= 15


def test_spec_of_a_started_round_is_immutable(hub: Cluster, ns: str) -> None:
    rnd = _round("edit-me")
    _apply(hub, rnd, "-n", ns, check=True)
    # Not started yet: the spec may still change.
    rnd = _edit(rnd, {"spec.sites": ["st-marys", "charite", "karolinska"]})
    _apply(hub, rnd, "-n", ns, check=True)
    hub.kubectl("patch", "federatedround", "edit-me", "-n", ns, "--subresource=status",
                "--type=merge", "-p", '{"status": {"startTime": "2030-01-01T10:00:00Z"}}')
    code, out = _apply(hub, _edit(rnd, {"spec.training": {"localEpochs": 5}}), "-n", ns)
    assert code != 0 and "spec: Forbidden: spec is immutable once the round has started" in out
    code, out = _apply(hub, _edit(rnd, {"spec.minSites": 3}), "-n", ns, "--server-side")
    assert code != 0 and "spec is immutable" in out
    # Labels are metadata, not spec; status keeps moving.
    hub.kubectl("label", "federatedround", "edit-me", "-n", ns, "team=radiology")
    hub.kubectl("patch", "federatedround", "edit-me", "-n", ns, "--subresource=status",
                "--type=merge", "-p", '{"status": {"state": "Training"}}')
    # Clearing startTime to unlock the spec is refused too.
    refused = hub.kubectl("patch", "federatedround", "edit-me", "-n", ns,
                          "--subresource=status", "--type=json",
                          "-p", '[{"op": "remove", "path": "/status/startTime"}]', check=False)
    assert refused.returncode != 0 and "status.startTime cannot change" in refused.stderr


def test_study_model_and_task_spec_are_immutable(hub: Cluster, ns: str) -> None:
    study = _study("immutable-model")
    _apply(hub, study, "-n", ns, check=True)
    _apply(hub, _edit(study, {"spec.rounds": 10}), "-n", ns, check=True)  # allowed
    code, out = _apply(hub, _edit(study, {"spec.model.name": "resnet18"}), "-n", ns)
    assert code != 0 and "spec.model" in out and "immutable" in out
    task = _task("immutable-task")
    _apply(hub, task, "-n", ns, check=True)
    code, out = _apply(hub, _edit(task, {"spec.training": {"localEpochs": 9}}), "-n", ns)
    assert code != 0 and "spec: Forbidden: spec is immutable" in out


def test_sitetask_status_written_by_the_agent(hub: Cluster, ns: str) -> None:
    _apply(hub, _task("agent-task"), "-n", ns, check=True)
    hub.kubectl("patch", "sitetask", "agent-task", "-n", ns, "--subresource=status",
                "--type=merge", "-p", json.dumps({"status": {
                    "state": "Succeeded", "heartbeatTime": "2030-01-01T10:05:00Z",
                    "result": {"samples": 1200, "updateDigest": "a" * 64,
                               "localMetrics": {"auroc": 0.91}}}}))
    row = hub.kubectl("get", "stask", "agent-task", "-n", ns).stdout.splitlines()[1].split()
    assert row[1:5] == ["st-marys", "study", "1", "Succeeded"]
    stored = yaml.safe_load(hub.kubectl("get", "stask", "agent-task", "-n", ns,
                                        "-o", "yaml").stdout)
    assert stored["status"]["result"]["localMetrics"]["auroc"] == 0.91  # not pruned

"""Tenant isolation on the hub, with plain data: a HospitalSite serves only the namespaces its
spec.studyNamespaces lists (none by default), another namespace's checkpoint needs its owner's
grant, and store keys carry the owning object's uid so a re-created study starts clean.

The same attacks against a real API server, S3 server and hub operator are in
tests/integration/test_tenant_isolation.py."""

from __future__ import annotations

import argparse
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import yaml
from redteam import refused

from deeprad.cli import keys as keys_cli
from deeprad.core.errors import ConfigError
from deeprad.core.identity import Identity
from deeprad.core.layout import StudyLayout
from deeprad.core.protocol import CheckpointManifest, ModelSpec
from deeprad.core.store.presigned import site_grants
from deeprad.operator.api.federatedround import (
    FederatedRoundSpec,
    FederatedRoundStatus,
    RoundState,
    SiteState,
)
from deeprad.operator.api.federatedstudy import FederatedStudySpec, FederatedStudyStatus
from deeprad.operator.api.hospitalsite import HospitalSiteSpec
from deeprad.operator.api.sitetask import GrantedObject, PublicKeys, RoundRef, SiteTaskSpec
from deeprad.operator.decide import round as rules
from deeprad.operator.decide import study
from deeprad.operator.decide.conditions import Desired, set_condition
from deeprad.operator.decide.sites import READY, SiteView
from deeprad.operator.decide.tenancy import (
    CheckpointOwner,
    checkpoint_refusal,
    namespace_allowed,
)
from deeprad.operator.hub.round_children import store_owner_uid
from deeprad.operator.render.tasks import site_task

T0 = datetime(2030, 7, 8, 9, 0, tzinfo=UTC)  # a Monday, no maintenance window
UID = "0b4c4a52-6d8e-4b55-9d3c-2f0e7d1c9a11"
PARENT = CheckpointManifest(study="s", round=0, producer="t", model=ModelSpec(),
                            payload_sha256="1" * 64, parent_sha256=None)
KEYS = Identity.generate("a").public()


def _site(name: str, namespaces: list[str] | None) -> SiteView:
    spec: dict[str, Any] = {"identity": {"signingKey": KEYS.signing_key,
                                         "keyAgreementKey": KEYS.key_agreement_key},
                            "data": {"modality": "mri", "sampleCount": 100}}
    if namespaces is not None:
        spec["studyNamespaces"] = namespaces
    return SiteView(name, HospitalSiteSpec.model_validate(spec),
                    tuple(set_condition(None, Desired.true(READY, "AgentReady"), 1, T0)))


def _round(**over: Any) -> FederatedRoundSpec:
    return FederatedRoundSpec.model_validate({
        "round": 1, "model": {"name": "tumor-cnn"}, "minSites": 1, "deadline": "1h",
        "privacy": {"secureAggregation": False}, **over})


def _decide(spec: FederatedRoundSpec, namespace: str, sites: list[SiteView]
            ) -> rules.RoundDecision:
    world = rules.RoundWorld(now=T0, created=T0, candidates=sites, namespace=namespace,
                             store=rules.StoreView(input_manifest=PARENT))
    return rules.decide_round("r1", 1, spec, FederatedRoundStatus(), world)


# ---- sites serve the namespaces they list -----------------------------------------------------


def test_a_site_serves_only_the_namespaces_it_lists_and_none_by_default() -> None:
    assert not namespace_allowed(None, "research") and not namespace_allowed([], "research")
    assert namespace_allowed(["research"], "research")
    assert not namespace_allowed(["research"], "research-2")
    assert namespace_allowed(["*"], "anything")
    spec = HospitalSiteSpec.model_validate({"identity": {
        "signingKey": KEYS.signing_key, "keyAgreementKey": KEYS.key_agreement_key}})
    assert spec.study_namespaces is None  # the API's default: nobody
    for bad in ("Research", "a_b", "*x", ""):
        with pytest.raises(ValueError, match="should match pattern"):
            HospitalSiteSpec.model_validate({"identity": {
                "signingKey": KEYS.signing_key, "keyAgreementKey": KEYS.key_agreement_key},
                "studyNamespaces": [bad]})


def test_redteam_round_from_a_namespace_the_site_does_not_allow_gets_no_task() -> None:
    """A round in namespace `intruder` lists sites that serve only `research` (and one that
    serves nobody yet): each is excluded with NamespaceNotAllowed naming the site, the
    namespace and the fix, and no SiteTask is created for any of them."""
    spec = _round(sites=["a", "b", "c"], minSites=1)
    sites = [_site("a", ["research"]), _site("b", None), _site("c", ["*"])]
    decision = _decide(spec, "intruder", sites)
    by_site = {s.site: s for s in decision.status.sites or ()}
    assert (by_site["a"].state, by_site["a"].reason) == (SiteState.EXCLUDED,
                                                         "NamespaceNotAllowed")
    assert by_site["a"].message == (
        "HospitalSite a does not allow namespace intruder (spec.studyNamespaces: research); "
        "add intruder to HospitalSite a spec.studyNamespaces")
    assert by_site["b"].reason == "NamespaceNotAllowed"
    assert by_site["b"].message == (
        "HospitalSite b allows no namespace yet (spec.studyNamespaces is empty), so not "
        "intruder; add intruder to HospitalSite b spec.studyNamespaces")
    assert (by_site["c"].state, by_site["c"].reason) == (SiteState.PENDING, "Admitted")
    # Tasks only for the site that serves every namespace.
    creates = [a for a in decision.actions if isinstance(a, rules.CreateTasks)]
    assert creates == [rules.CreateTasks(("c",), "1" * 64, ("c",))]
    refused("round from a namespace the site does not allow",
            "hub operator: round admission (no SiteTask)", by_site["a"].message or "")
    # With only refusing sites the round fails, and no task exists for anyone.
    alone = _decide(_round(sites=["a", "b"], minSites=1), "intruder", sites)
    assert alone.status.state == RoundState.FAILED
    assert not any(isinstance(a, rules.CreateTasks) for a in alone.actions)
    failed = next(c for c in alone.status.conditions or () if c.type == "Failed")
    assert failed.reason == "InsufficientSites"
    assert "a: NamespaceNotAllowed; b: NamespaceNotAllowed" in failed.message


def test_a_round_without_a_site_list_draws_only_from_sites_serving_its_namespace() -> None:
    sites = [_site("a", ["research"]), _site("b", ["other"]), _site("c", None)]
    decision = _decide(_round(), "research", sites)
    assert [(s.site, s.state) for s in decision.status.sites or ()] == [
        ("a", SiteState.PENDING)]  # the others are not candidates at all, nor named
    nobody = _decide(_round(), "elsewhere", sites)
    failed = next(c for c in nobody.status.conditions or () if c.type == "Failed")
    assert failed.reason == "InsufficientSites"
    assert "no HospitalSite allows namespace elsewhere in its spec.studyNamespaces" in \
        failed.message
    assert nobody.status.sites == [] and not nobody.actions


def _study(**spec: Any) -> FederatedStudySpec:
    return FederatedStudySpec.model_validate({"model": {"name": "tumor-cnn"}, "rounds": 3,
                                              "roundTemplate": {"minSites": 2}, **spec})


def _study_action(spec: FederatedStudySpec, candidates: list[study.Candidate]) -> study.Action:
    return study.decide_study("s", 1, spec, FederatedStudyStatus(), [], candidates, T0,
                              namespace="research").action


def test_a_study_selector_skips_sites_that_refuse_its_namespace_and_says_so() -> None:
    spec = _study(siteSelector={"matchLabels": {"region": "eu"}})
    mine = [study.Candidate("a", 100, ("research",)), study.Candidate("b", 100, ("*",))]
    theirs = [study.Candidate("c", 100, ("other",)), study.Candidate("d", 100, ())]
    ok = _study_action(spec, mine + theirs)
    assert isinstance(ok, study.CreateRound) and ok.sites == ("a", "b")
    blocked = _study_action(spec, mine[:1] + theirs)
    assert isinstance(blocked, study.Blocked) and blocked.reason == "NotEnoughSites"
    assert blocked.message == (
        "spec.siteSelector matches 1 HospitalSite(s) that allow namespace research (a), below "
        "roundTemplate.minSites 2; c, d match but do not allow namespace research: add it to "
        "their spec.studyNamespaces; label more sites or lower minSites")


def test_a_study_listing_sites_that_refuse_its_namespace_waits_with_the_fix() -> None:
    spec = _study(sites=["a", "c"])
    blocked = _study_action(spec, [study.Candidate("a", 100, ("research",)),
                                   study.Candidate("c", 100, ("other",))])
    assert isinstance(blocked, study.Blocked) and blocked.reason == "NamespaceNotAllowed"
    assert blocked.message == (
        "HospitalSite c does not allow namespace research (spec.studyNamespaces: other); add "
        "research to HospitalSite c spec.studyNamespaces; spec.sites leaves 1, below "
        "roundTemplate.minSites 2")
    ok = _study_action(spec, [study.Candidate("a", 100, ("research",)),
                              study.Candidate("c", 100, ("research", "other"))])
    assert isinstance(ok, study.CreateRound) and ok.sites == ("a", "c")


# ---- checkpoints of another namespace ---------------------------------------------------------


URI = f"s3://deeprad/lab/base/{UID}/rounds/3/global.safetensors"


def _source(uid: str | None = UID) -> StudyLayout:
    return StudyLayout("lab", "base", uid)


def test_a_checkpoint_of_the_rounds_own_namespace_needs_no_grant() -> None:
    assert checkpoint_refusal("lab", URI, _source(), []) is None
    assert checkpoint_refusal("lab", URI, _source(None), []) is None


def test_redteam_cross_namespace_checkpoint_without_a_grant_is_refused() -> None:
    owner = CheckpointOwner("FederatedStudy", "base", UID, ("friends",))
    problem = checkpoint_refusal("intruder", URI, _source(), [owner])
    assert problem == (
        f"{URI} is in namespace lab, not this round's namespace intruder, and FederatedStudy "
        "lab/base does not share its checkpoints with intruder; ask its owner to add intruder "
        "to FederatedStudy lab/base spec.shareCheckpointsWith")
    refused("cross-namespace spec.inputCheckpoint without a grant (decision)",
            "hub operator: round input check", problem)
    assert checkpoint_refusal("friends", URI, _source(), [owner]) is None


def test_a_grant_by_a_recreated_owner_does_not_cover_its_predecessors_checkpoints() -> None:
    successor = CheckpointOwner("FederatedStudy", "base", "1" * 8 + UID[8:], ("intruder",))
    problem = checkpoint_refusal("intruder", URI, _source(), [successor])
    assert problem is not None and f"belongs to an earlier object named base (uid {UID})" in \
        problem and "not to the current FederatedStudy lab/base" in problem
    gone = checkpoint_refusal("intruder", URI, _source(), [])
    assert gone is not None and "no FederatedStudy or FederatedRound lab/base exists" in gone
    legacy = checkpoint_refusal("intruder", "s3://deeprad/lab/base/rounds/3/global.safetensors",
                                _source(None), [successor])
    assert legacy is not None and "its key names no owner uid" in legacy
    # A hand-made round may own the keys too; the one whose uid matches decides.
    hand_made = CheckpointOwner("FederatedRound", "base", UID, ("intruder",))
    assert checkpoint_refusal("intruder", URI, _source(), [successor, hand_made]) is None


def test_share_checkpoints_with_is_for_studies_and_rounds_made_by_hand() -> None:
    spec = _study(sites=["a", "b"], shareCheckpointsWith=["friends"])
    assert spec.share_checkpoints_with == ["friends"]
    made = _round(shareCheckpointsWith=["friends"])
    assert made.share_checkpoints_with == ["friends"]
    with pytest.raises(ValueError):
        _round(shareCheckpointsWith=["*"])  # names only: a grant is explicit


# ---- store keys carry the owner's uid ---------------------------------------------------------


def test_keys_carry_the_owners_uid_and_parse_back() -> None:
    layout = StudyLayout("research", "tumor", UID)
    assert layout.global_weights(2) == f"research/tumor/{UID}/rounds/2/global.safetensors"
    assert layout.seen_nonces() == f"research/tumor/{UID}/nonces.json"
    assert StudyLayout.parse_global_weights(layout.global_weights(2)) == (layout, 2)
    local = StudyLayout("local", "simulated-study")  # deeprad simulate: no cluster, no uid
    assert local.global_weights(0) == "local/simulated-study/rounds/0/global.safetensors"
    assert StudyLayout.parse_global_weights(local.global_weights(0)) == (local, 0)
    # Another incarnation of the same study shares no key with this one.
    other = StudyLayout("research", "tumor", "9" + UID[1:])
    mine = set(site_grants(layout, 2, "a", secure_aggregation=True))
    assert not mine & set(site_grants(other, 2, "a", secure_aggregation=True))
    for key in ("research/tumor/x/y/rounds/2/global.safetensors",
                f"research/tumor/{UID}/rounds/2/global.json", "tumor/rounds/2/global.safetensors"):
        with pytest.raises(ConfigError, match="is not a global checkpoint key"):
            StudyLayout.parse_global_weights(key)
    with pytest.raises(ConfigError, match="uid name 'A/B'"):
        StudyLayout("research", "tumor", "A/B")


def test_a_rounds_keys_are_its_studys_or_for_a_round_made_by_hand_its_own() -> None:
    owned = _round(studyRef={"name": "tumor"})
    meta = {"ownerReferences": [{"kind": "FederatedStudy", "name": "tumor", "uid": UID}]}
    assert store_owner_uid("round-uid", owned, meta) == UID
    assert store_owner_uid("round-uid", _round(), {}) == "round-uid"
    # A round naming a study it does not belong to never gets that study's keys.
    assert store_owner_uid("round-uid", owned, {}) == "round-uid"
    stranger = {"ownerReferences": [{"kind": "FederatedStudy", "name": "other", "uid": UID}]}
    assert store_owner_uid("round-uid", owned, stranger) == "round-uid"


def test_the_site_task_names_the_uid_its_granted_keys_carry() -> None:
    layout = StudyLayout("research", "tumor", UID)
    grants = [GrantedObject(key=k, method=m, url=f"https://s3.example/{k}")
              for k, m in site_grants(layout, 1, "a", secure_aggregation=False).items()]
    hub = Identity.generate("hub", "hub").public()
    manifest = site_task(RoundRef(namespace="research", name="tumor-r1", uid="r-uid"), "tumor",
                         UID, _round(), "a", "1" * 64,
                         PublicKeys(name="hub", signing_key=hub.signing_key,
                                    key_agreement_key=hub.key_agreement_key),
                         grants, None, "2030-07-08T10:00:00Z")
    spec = SiteTaskSpec.model_validate(manifest["spec"])
    assert spec.study_uid == UID
    assert all(o.key.startswith(f"research/tumor/{UID}/") for o in spec.objects)


# ---- deeprad site register --------------------------------------------------------------------


def _register(tmp_path: Path, capsys: pytest.CaptureFixture[str], *extra: str) -> tuple[str, Any]:
    folder = tmp_path / "st-marys"
    if not folder.exists():
        Identity.generate("st-marys").save(folder)
    parser = argparse.ArgumentParser()
    keys_cli.register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["site", "register", "st-marys", "--keys", str(folder), *extra])
    assert args.func(args) == 0
    text = capsys.readouterr().out
    return text, list(yaml.safe_load_all(text))[1]


def test_site_register_says_a_new_site_serves_no_namespace(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    text, site = _register(tmp_path, capsys)
    assert "studyNamespaces" not in site["spec"]
    assert "spec.studyNamespaces is empty: NO hub namespace may use this site" in text
    text, site = _register(tmp_path, capsys, "--study-namespace", "research",
                           "--study-namespace", "oncology")
    assert site["spec"]["studyNamespaces"] == ["oncology", "research"]
    assert "serves the studies of hub namespace(s): oncology, research" in text
    HospitalSiteSpec.model_validate(site["spec"])
    with pytest.raises(ConfigError, match="'\\*' already allows every namespace"):
        _register(tmp_path, capsys, "--study-namespace", "*", "--study-namespace", "research")
    with pytest.raises(ConfigError, match="DNS-1123"):
        _register(tmp_path, capsys, "--study-namespace", "Research")

"""Signed audit records (deeprad.core.audit): a record verifies only against its signer's key,
only for its own study, round and site, and any changed field breaks its signature."""

from __future__ import annotations

import base64
from typing import Any

import pytest

from deeprad.core.audit import (
    AuditedSite,
    AuditError,
    HubRoundRecord,
    SiteTaskRecord,
    StudyRef,
    check_hub_record,
    check_site_record,
    vouched_key,
)
from deeprad.core.errors import ConfigError
from deeprad.core.identity import Identity
from deeprad.core.layout import StudyLayout
from deeprad.core.model_catalogue import model_digest
from deeprad.core.privacy import DPSteps
from deeprad.core.protocol import RoundEpsilon
from deeprad.core.signing import verify_message

SITE = Identity.generate("st-marys")
OTHER_SITE = Identity.generate("charite")
HUB = Identity.generate("hub", role="hub")
OTHER_HUB = Identity.generate("hub", role="hub")
STUDY = StudyRef(namespace="radiology", name="chest-ct", uid="0d9e6c1a")


def _site_record(**over: Any) -> SiteTaskRecord:
    fields: dict[str, Any] = {
        "study": STUDY, "round": 2, "site": "st-marys", "model": "tumor-cnn",
        "model_digest": model_digest("tumor-cnn", {}),
        "trainer_image": "registry.example/deeprad-trainer@sha256:" + "ab" * 32,
        "policy_digest": "sha256:" + "cd" * 32,
        "privacy": DPSteps(noise_multiplier=1.1, sample_rate=0.05, steps=60),
        "num_samples": 240, "parent_sha256": "1" * 64, "update_sha256": "2" * 64, **over}
    return SiteTaskRecord(**fields)


def _hub_record(**over: Any) -> HubRoundRecord:
    fields: dict[str, Any] = {
        "study": STUDY, "round": 2, "hub": "hub", "created_by": "alice",
        "model": "tumor-cnn", "model_digest": model_digest("tumor-cnn", {}),
        "parent_sha256": "1" * 64, "checkpoint_sha256": "3" * 64,
        "privacy": RoundEpsilon(epsilon_round=1.0, epsilon_spent=2.0, delta=1e-5),
        "sites": [AuditedSite(site="st-marys", signing_key=SITE.public().signing_key,
                              record_sha256="4" * 64, update_sha256="2" * 64)], **over}
    return HubRoundRecord(**fields)


def _check_site(record: SiteTaskRecord, key: Identity = SITE, **over: Any) -> None:
    expected: dict[str, Any] = {"study": STUDY, "round_no": 2, "site": "st-marys",
                                "parent_sha256": "1" * 64, "update_sha256": "2" * 64, **over}
    check_site_record(record, key.public(), **expected)


def test_a_signed_site_record_verifies_and_survives_the_store() -> None:
    record = _site_record().signed(SITE)
    _check_site(record)
    stored = SiteTaskRecord.model_validate_json(record.to_bytes())
    _check_site(stored)
    assert stored == record


@pytest.mark.parametrize("field, value", [
    ("trainer_image", "registry.example/other@sha256:" + "ee" * 32),
    ("policy_digest", None),
    ("model_digest", model_digest("tumor-cnn", {"width": 64})),
    ("privacy", DPSteps(noise_multiplier=5.0, sample_rate=0.05, steps=60)),
    ("num_samples", 1),
    ("created_at", "2020-01-01T00:00:00.000000Z"),
    ("max_grad_norm", 100.0),
])
def test_a_changed_field_breaks_the_site_signature(field: str, value: Any) -> None:
    record = _site_record().signed(SITE)
    tampered = record.model_copy(update={field: value})
    with pytest.raises(AuditError, match="signature does not verify against the site's"):
        _check_site(tampered)


def test_a_record_signed_before_the_clip_field_existed_still_verifies() -> None:
    """max_grad_norm joined the record later: left out of the signed bytes when empty, so a
    record from before verifies; once set, it is signed like every other field."""
    record = _site_record().signed(SITE)
    assert "max_grad_norm" not in record.signed_bytes().decode()
    _check_site(SiteTaskRecord.model_validate_json(record.to_bytes()))
    clipped = _site_record(max_grad_norm=1.5).signed(SITE)
    _check_site(clipped)
    with pytest.raises(AuditError, match="signature does not verify"):
        _check_site(clipped.model_copy(update={"max_grad_norm": None}))


def test_a_site_record_verifies_only_with_its_own_sites_key() -> None:
    record = _site_record().signed(SITE)
    with pytest.raises(AuditError, match="signature does not verify"):
        _check_site(record, key=OTHER_SITE)
    unsigned = _site_record()
    with pytest.raises(AuditError, match="signature does not verify"):
        _check_site(unsigned)


def test_a_record_is_refused_in_another_slot_round_study_or_lineage() -> None:
    record = _site_record().signed(SITE)
    with pytest.raises(AuditError, match="copied into another site's slot"):
        _check_site(record, site="charite")
    with pytest.raises(AuditError, match="is for study radiology/chest-ct round 2"):
        _check_site(record, round_no=3)
    with pytest.raises(AuditError, match="an earlier study of the same name"):
        _check_site(record, study=STUDY.model_copy(update={"uid": "77aa"}))
    with pytest.raises(AuditError, match="trained from parent 1111"):
        _check_site(record, parent_sha256="9" * 64)
    with pytest.raises(AuditError, match="the round aggregated 9999"):
        _check_site(record, update_sha256="9" * 64)


def test_only_the_named_signer_with_the_right_role_signs() -> None:
    with pytest.raises(ConfigError, match="signed by that site's key, not by site 'charite'"):
        _site_record().signed(OTHER_SITE)
    with pytest.raises(ConfigError, match="not by hub 'hub'"):
        _site_record(site="hub").signed(HUB)
    with pytest.raises(ConfigError, match="signed by that hub's key"):
        _hub_record(hub="st-marys").signed(SITE)


def test_signatures_are_domain_separated_by_kind() -> None:
    """A site's record signature is no hub-record signature over the same bytes."""
    record = _site_record().signed(SITE)
    assert record.signature is not None
    raw = base64.b64decode(record.signature)
    assert verify_message(SITE.public(), SiteTaskRecord.PURPOSE, record.signed_bytes(), raw)
    assert not verify_message(SITE.public(), HubRoundRecord.PURPOSE, record.signed_bytes(), raw)


def test_the_hub_record_verifies_only_against_the_pinned_hub() -> None:
    record = _hub_record().signed(HUB)
    check_hub_record(record, HUB.public(), study=STUDY, round_no=2)
    with pytest.raises(AuditError, match="does not verify against the pinned hub key"):
        check_hub_record(record, OTHER_HUB.public(), study=STUDY, round_no=2)
    forged = record.model_copy(update={"created_by": "mallory"})
    with pytest.raises(AuditError, match="does not verify against the pinned hub key"):
        check_hub_record(forged, HUB.public(), study=STUDY, round_no=2)
    with pytest.raises(AuditError, match="is for study radiology/chest-ct round 2"):
        check_hub_record(record, HUB.public(), study=STUDY, round_no=1)


def test_the_hub_vouches_for_the_site_key_it_names() -> None:
    entry = _hub_record().sites[0]
    assert vouched_key(entry).signing_key == SITE.public().signing_key
    with pytest.raises(AuditError, match="names no registered key"):
        vouched_key(entry.model_copy(update={"signing_key": None}))


def test_site_records_cannot_reach_the_hub_records_key() -> None:
    """A site named `hub` has its own slot, not the hub's."""
    layout = StudyLayout("radiology", "chest-ct")
    assert layout.site_audit(1, "hub") != layout.hub_audit(1)
    assert layout.site_audit(1, "hub").startswith(layout.site_audits_prefix(1))
    assert not layout.hub_audit(1).startswith(layout.site_audits_prefix(1))

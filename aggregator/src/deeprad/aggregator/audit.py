"""The hub's signed audit record of a round (`deeprad.core.audit.HubRoundRecord`).

Written after the new checkpoint and before aggregate.json, whose presence marks the round
done: a rerun after a crash writes it again. For every site the round expected, or that left
an update or a record, the hub names the signing key it registered for the site and the sha256
of the site's record, once that record verifies against the key and names this round's parent
and the update the round aggregated; a record that does not is listed with the problem, and
the round goes on (the record is evidence, not a gate). So one pinned hub key vouches for
every site key and site record of the study.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from deeprad.core.audit import (
    AuditedSite,
    AuditError,
    HubRoundRecord,
    SiteTaskRecord,
    StudyRef,
    check_site_record,
    read_record,
    recorded_sites,
    sha256_hex,
)
from deeprad.core.identity import Identity, KeyRegistry
from deeprad.core.layout import StudyLayout
from deeprad.core.model_catalogue import model_digest
from deeprad.core.protocol import AggregationTask, CheckpointManifest, Contribution
from deeprad.core.store import ObjectStore


def audited_site(store: ObjectStore, layout: StudyLayout, study: StudyRef, round_no: int,
                 site: str, registry: KeyRegistry, parent_sha256: str | None,
                 contribution: Contribution | None) -> AuditedSite:
    """What the hub can vouch for about `site`'s record."""
    public = registry.site(site)
    update = contribution.update_sha256 if contribution else None

    def entry(record_sha256: str | None = None, problem: str | None = None) -> AuditedSite:
        return AuditedSite(site=site, signing_key=public.signing_key if public else None,
                           record_sha256=record_sha256, update_sha256=update, problem=problem)

    if public is None:
        return entry(problem="site is not registered (no HospitalSite keys in the round)")
    try:
        found = read_record(store, layout.site_audit(round_no, site), SiteTaskRecord)
        if found is None:
            return entry(problem="the site left no audit record")
        record, data = found
        check_site_record(record, public, study=study, round_no=round_no, site=site,
                          parent_sha256=parent_sha256, update_sha256=update)
    except AuditError as exc:
        return entry(problem=str(exc))
    return entry(record_sha256=sha256_hex(data))


def write_hub_record(store: ObjectStore, layout: StudyLayout, task: AggregationTask,
                     hub: Identity, registry: KeyRegistry, parent: CheckpointManifest,
                     checkpoint: CheckpointManifest, contributors: Sequence[Contribution],
                     sites: Iterable[str]) -> HubRoundRecord:
    """Sign and store round `task.round`'s hub record; `sites` are those the round expected
    or that left an update (sites with a record in the store are added)."""
    study = StudyRef.of(layout)
    by_site = {c.site: c for c in contributors}
    named = sorted({*sites, *by_site, *recorded_sites(store, layout, task.round)})
    record = HubRoundRecord(
        study=study, round=task.round, hub=hub.name, created_by=task.created_by,
        model=checkpoint.model.name,
        model_digest=model_digest(checkpoint.model.name, checkpoint.model.kwargs),
        parent_sha256=parent.payload_sha256, checkpoint_sha256=checkpoint.payload_sha256,
        privacy=task.privacy,
        sites=[audited_site(store, layout, study, task.round, s, registry,
                            parent.payload_sha256, by_site.get(s)) for s in named],
    ).signed(hub)
    store.put_bytes(layout.hub_audit(task.round), record.to_bytes())
    return record

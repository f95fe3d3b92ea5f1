"""The study's privacy ledger as the operator reads it (`deeprad.core.privacy_ledger`).

The operator holds only the hub's public key: it verifies the entries the hub's Jobs signed,
adds the site records they have not indexed yet, and follows `spec.initialCheckpoint` to the
study whose ledger this one inherits (the prepare Job copies it; until then it is read in
place). Entries and records never change once written, so each is read once per operator.
"""

from __future__ import annotations

from deeprad.core.errors import ConfigError
from deeprad.core.identity import PublicIdentity
from deeprad.core.layout import StudyLayout
from deeprad.core.privacy_ledger import (
    LedgerEntry,
    LedgerError,
    SiteFact,
    read_entries,
    runs,
    site_records,
)
from deeprad.core.store import ObjectStore
from deeprad.operator.api.federatedstudy import FederatedStudySpec
from deeprad.operator.decide.study import LedgerFacts


class LedgerReader:
    """Reads studies' ledgers from the hub's store, remembering what it has verified."""

    def __init__(self, store: ObjectStore, hub: PublicIdentity) -> None:
        self.store = store
        self.hub = hub
        self._entries: dict[str, LedgerEntry] = {}
        self._facts: dict[str, SiteFact | None] = {}

    def facts(self, namespace: str, study: str, spec: FederatedStudySpec) -> LedgerFacts:
        """The runs of `namespace/study` (every incarnation of the name) and of the study its
        initial checkpoint comes from; `problem` set, naming the entry, when one does not
        verify. Store errors propagate (the pass is retried)."""
        sources = [(namespace, study)]
        source = self._checkpoint_study(spec)
        if source is not None and source not in sources:
            sources.append(source)
        found = []
        try:
            for ns, name in sources:
                entries = read_entries(self.store, ns, name, self.hub, self._entries)
                found.extend(runs(entries, site_records(self.store, ns, name, self._facts)))
        except LedgerError as exc:
            return LedgerFacts(problem=str(exc))
        distinct = {r.record_sha256: r for r in found}
        return LedgerFacts(runs=tuple(distinct.values()),
                           inherited_from=tuple(f"{ns}/{name}" for ns, name in sources[1:]))

    def _checkpoint_study(self, spec: FederatedStudySpec) -> tuple[str, str] | None:
        ref = spec.initial_checkpoint
        if ref is None:
            return None
        try:
            layout, _ = StudyLayout.parse_global_weights(self.store.key_of(ref.uri))
        except ConfigError:
            return None  # not a study's checkpoint in this store: no ledger to inherit
        return layout.namespace, layout.study


__all__ = ["LedgerReader"]

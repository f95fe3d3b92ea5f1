"""The study's privacy ledger as the operator reads it (`deeprad.core.privacy_ledger`).

The operator holds only the hub's public key: it verifies the entries the hub's Jobs signed,
adds the site records they have not indexed yet, and follows `spec.initialCheckpoint` to the
study whose ledger this one inherits (the prepare Job copies it; until then it is read in
place). Entries and records never change once written, so each is read once per operator.
"""

from __future__ import annotations

import time

from deeprad.core.audit import StudyRef
from deeprad.core.errors import ConfigError
from deeprad.core.identity import PublicIdentity
from deeprad.core.layout import StudyLayout
from deeprad.core.privacy_ledger import (
    LedgerBudget,
    LedgerEntry,
    LedgerError,
    Reservation,
    SiteFact,
    pin_budget,
    read_budget,
    read_entries,
    read_reservations,
    runs,
    site_records,
    write_reservation,
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
        self._last: dict[tuple[str, str], tuple[float, LedgerFacts]] = {}

    def facts(self, namespace: str, study: str, spec: FederatedStudySpec,
              max_age: float = 0.0) -> LedgerFacts:
        """The runs of `namespace/study` (every incarnation of the name) and of the study its
        initial checkpoint comes from; `problem` set, naming the entry, when one does not
        verify. Store errors propagate (the pass is retried). `max_age`: an answer read less
        than that many seconds ago will do (a finished study's timer need not list the store
        on every pass)."""
        cached = self._last.get((namespace, study))
        if cached is not None and time.monotonic() - cached[0] < max_age:
            return cached[1]
        facts = self._read(namespace, study, spec)
        self._last[(namespace, study)] = (time.monotonic(), facts)
        return facts

    def _read(self, namespace: str, study: str, spec: FederatedStudySpec) -> LedgerFacts:
        sources = [(namespace, study)]
        source = self._checkpoint_study(spec)
        if source is not None and source not in sources:
            sources.append(source)
        found = []
        pins = []
        held: list[Reservation] = []
        try:
            for ns, name in sources:
                entries = read_entries(self.store, ns, name, self.hub, self._entries)
                found.extend(runs(entries, site_records(self.store, ns, name, self._facts)))
                pin = read_budget(self.store, ns, name)
                if pin is not None:
                    pins.append(pin)
                held.extend(read_reservations(self.store, ns, name))
        except LedgerError as exc:
            return LedgerFacts(problem=str(exc))
        distinct = {r.record_sha256: r for r in found}
        return LedgerFacts(runs=tuple(distinct.values()),
                           inherited_from=tuple(f"{ns}/{name}" for ns, name in sources[1:]),
                           pins=tuple(pins), reservations=tuple(held))

    def reserve(self, reservations: list[Reservation]) -> None:
        """Store the rounds' planned steps (decide.study.reservations_to_store)."""
        for reservation in reservations:
            write_reservation(self.store, reservation)
            # the next pass reads it back rather than writing it again from a cached reading
            self._last.pop((reservation.ledger.namespace, reservation.ledger.name), None)

    def pin(self, namespace: str, study: str, uid: str, spec: FederatedStudySpec) -> None:
        """Pin the δ and accountant of the study name's ledger (before its first DP round is
        created; a pin that exists stays)."""
        budget = spec.privacy_budget
        if budget is None:
            return
        pin_budget(self.store, LedgerBudget(
            ledger=StudyRef(namespace=namespace, name=study), delta=budget.delta,
            accountant=budget.accountant, pinned_by=StudyRef(namespace=namespace, name=study,
                                                             uid=uid)))

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

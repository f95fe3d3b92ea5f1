"""The hub's ε ledger: every DP-SGD run that touched a study's sites, from the sites' own facts.

A study's spent ε must be a number nobody can lower. It is therefore never recomputed from what
exists in the API now (rounds can be deleted, a site's declared `sampleCount` edited, a study
re-created) but composed from what the store keeps, under the study's *name* (not its uid: a
deleted and re-created study inherits every run of its predecessors):

- **Site records.** After uploading its update, every trainer writes its signed
  `SiteTaskRecord` (`deeprad.core.audit`) with the DP-SGD steps, sampling rate, noise
  multiplier and clipping bound it actually used, at
  `<ns>/<study>/<uid>/rounds/<n>/audit/sites/<site>.json`.
- **Ledger entries.** Each aggregator Job, which holds the hub's key and the sites' keys,
  indexes every site record of the study's name (every round, every uid), at its start and at
  its end, into hub-signed `LedgerEntry` objects at `<ns>/<study>/privacy-ledger/<site>/<record
  sha256>.json`: one per record, so indexing twice writes nothing new.
- **Inheritance.** A round that starts from another study's checkpoint carries that study's
  ledger: the prepare Job copies its entries (re-signed, `source` naming where they came from),
  and the operator reads the source's ledger in place as well. A chain of imports composes.
- **Reservations** (`_reservations/<round uid>.json`, written by the operator): each DP round's
  planned steps at every site that may have trained, kept after the round is deleted, so a run
  that trained but never signed its record (its trainer killed, its round's exchange aborted)
  still counts at the plan; a site's record replaces its reservation.
- **The budget pin** (`budget.json`, written by the operator before the name's first DP round):
  the δ and accountant the ledger is accounted at. The same runs show a smaller ε at a larger δ,
  so a study re-created under the name, or started from its checkpoints, must keep them.

The operator (which holds only the hub's public key) verifies the entries and refuses to go on
when one does not verify (fail closed: an entry it cannot trust is never silently dropped),
adds the site records not indexed yet, the reservations of rounds that no longer exist, and the
planned steps of the rounds that do. ε per site is the composition of its runs; the study's ε is
the largest site's. Pins and reservations are unsigned: the threat they answer is a study
author, who cannot write the store; against a hub admin, who can, each hospital keeps its own
ledger (`deeprad.operator.site.ledger`), reserving every task before its Job starts.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable, MutableMapping
from dataclasses import dataclass
from typing import ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from deeprad.core.audit import AuditError, SignedRecord, SiteTaskRecord, StudyRef, sha256_hex
from deeprad.core.errors import ObjectNotFound
from deeprad.core.identity import Identity, KeyRegistry, PublicIdentity, Role
from deeprad.core.layout import check_name
from deeprad.core.privacy import AccountantName, DPSteps
from deeprad.core.store import ObjectStore

log = logging.getLogger("deeprad.privacy_ledger")

LEDGER_VERSION: Literal[1] = 1
LEDGER_FOLDER = "privacy-ledger"
# <ns>/<study>[/<uid>]/rounds/<n>/audit/sites/<site>.json, relative to <ns>/<study>/
_SITE_RECORD = re.compile(r"^(?:(?P<uid>[^/]+)/)?rounds/(?P<round>\d+)/audit/sites/"
                          r"(?P<site>[^/]+)\.json$")


class LedgerError(AuditError):
    """A ledger entry is malformed or does not verify against the hub's key."""


class LedgerEntry(SignedRecord):
    """One site's DP-SGD run in one round of one study, as the site signed it, vouched for by
    the hub."""

    PURPOSE: ClassVar[str] = "privacy/ledger-entry"
    SIGNER: ClassVar[Role] = "hub"

    schema_version: Literal[1] = LEDGER_VERSION
    kind: Literal["privacy-ledger-entry"] = "privacy-ledger-entry"
    ledger: StudyRef  # whose ledger this entry is in (namespace and study name; no uid)
    study: StudyRef  # the study (with uid) whose round took the steps
    round: int = Field(ge=1)
    site: str
    steps: DPSteps
    max_grad_norm: float | None = None  # the clipping bound the site's record names
    site_record_sha256: str  # the site's signed record the steps are copied from
    site_signature_verified: bool  # its signature verified against the site's registered key
    source: StudyRef | None = None  # inherited from this study's ledger (checkpoint import)
    hub: str

    def signer_name(self) -> str:
        return self.hub


class LedgerBudget(BaseModel):
    """The δ and accountant a ledger's ε is accounted at, pinned when the first DP round of the
    study's name is created: the same runs give a smaller ε at a larger δ, so a study
    re-created under the name (or started from its checkpoints) must keep them. The hub
    operator writes it (unsigned: the threat is a study author, who has no access to the
    store; a hub admin, who has, is what the hospitals' own ledgers are for)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    schema_version: Literal[1] = LEDGER_VERSION
    kind: Literal["privacy-ledger-budget"] = "privacy-ledger-budget"
    ledger: StudyRef
    delta: float = Field(gt=0, lt=1)
    accountant: AccountantName
    pinned_by: StudyRef  # the study (with its uid) whose first DP round pinned it


class Reservation(BaseModel):
    """The planned DP-SGD steps of one round at each site it drew, written by the operator when
    it creates the round, before any site is scheduled. It outlives the round: a site that
    trained and died before signing its record (or whose round was deleted) is accounted at
    the plan. Once the round ends the operator settles it to the sites that may have trained
    (`settled`); a site's signed record replaces its reservation. Unsigned, like the budget
    pin: study authors cannot write the store."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    schema_version: Literal[1] = LEDGER_VERSION
    kind: Literal["privacy-ledger-reservation"] = "privacy-ledger-reservation"
    ledger: StudyRef
    study: StudyRef  # with the uid of the study that created the round
    round: int = Field(ge=1)
    round_uid: str
    sites: dict[str, DPSteps]
    settled: bool = False


RESERVATIONS = "_reservations"  # no site name has an underscore


def reservation_key(namespace: str, study: str, round_uid: str) -> str:
    """A round's reservation, by the round's uid (a re-created round is a new reservation)."""
    return f"{ledger_prefix(namespace, study)}{RESERVATIONS}/{check_name('uid', round_uid)}.json"


def write_reservation(store: ObjectStore, reservation: Reservation) -> None:
    store.put_bytes(reservation_key(reservation.ledger.namespace, reservation.ledger.name,
                                    reservation.round_uid),
                    reservation.model_dump_json(indent=2).encode("utf-8"))


def read_reservations(store: ObjectStore, namespace: str, study: str) -> list[Reservation]:
    """The ledger's reservations; LedgerError naming a malformed one."""
    prefix = f"{ledger_prefix(namespace, study)}{RESERVATIONS}/"
    found = []
    for key in store.list(prefix):
        try:
            found.append(Reservation.model_validate_json(store.get_bytes(key)))
        except ObjectNotFound:
            continue
        except ValidationError as exc:
            raise LedgerError(f"privacy ledger reservation {key}: malformed "
                              f"({exc.errors()[0]['msg']}); restore it from a backup of the "
                              "store") from None
    return found


def ledger_prefix(namespace: str, study: str) -> str:
    """Where a study name's ledger lives (next to its uid folders)."""
    return f"{check_name('namespace', namespace)}/{check_name('study', study)}/{LEDGER_FOLDER}/"


def budget_key(namespace: str, study: str) -> str:
    """Where the ledger's pinned δ and accountant live (no site name has a dot)."""
    return f"{ledger_prefix(namespace, study)}budget.json"


def pin_budget(store: ObjectStore, pin: LedgerBudget) -> LedgerBudget:
    """The ledger's pinned budget: the one stored, or `pin` when there is none yet."""
    found = read_budget(store, pin.ledger.namespace, pin.ledger.name)
    if found is not None:
        return found
    store.put_bytes(budget_key(pin.ledger.namespace, pin.ledger.name),
                    pin.model_dump_json(indent=2).encode("utf-8"))
    return pin


def read_budget(store: ObjectStore, namespace: str, study: str) -> LedgerBudget | None:
    """The ledger's pinned budget (None: no DP round of the name was created since pins
    exist); LedgerError when it is malformed or another ledger's."""
    key = budget_key(namespace, study)
    try:
        data = store.get_bytes(key)
    except ObjectNotFound:
        return None
    try:
        budget = LedgerBudget.model_validate_json(data)
    except ValidationError as exc:
        raise LedgerError(f"privacy ledger budget {key}: malformed ({exc.errors()[0]['msg']}); "
                          "restore it from a backup of the store") from None
    if (budget.ledger.namespace, budget.ledger.name) != (namespace, study):
        raise LedgerError(f"privacy ledger budget {key}: it is ledger {budget.ledger}'s; "
                          "restore this ledger's from a backup of the store")
    return budget


def entry_key(namespace: str, study: str, site: str, record_sha256: str) -> str:
    """An entry's key: one per site record, so writing it twice changes nothing."""
    if not re.fullmatch(r"[0-9a-f]{64}", record_sha256):
        raise LedgerError(f"site record digest {record_sha256!r} is not a sha256 hex digest")
    return f"{ledger_prefix(namespace, study)}{check_name('site', site)}/{record_sha256}.json"


@dataclass(frozen=True)
class Run:
    """One site's DP-SGD run, from a ledger entry or a site record not indexed yet."""

    site: str
    study_uid: str | None
    round: int
    steps: DPSteps
    record_sha256: str


# ---- facts: the sites' records ----------------------------------------------------------------


@dataclass(frozen=True)
class SiteFact:
    """A site record found in the store, with its key and digest."""

    key: str
    record: SiteTaskRecord
    sha256: str


def site_records(store: ObjectStore, namespace: str, study: str,
                 cache: MutableMapping[str, SiteFact | None] | None = None) -> list[SiteFact]:
    """Every site record under the study's name, in every incarnation (uid) and round. A record
    that does not parse is skipped with a warning (it holds no steps anyone can account);
    `cache` (key → fact) saves re-reading immutable records on every pass."""
    base = f"{check_name('namespace', namespace)}/{check_name('study', study)}/"
    facts = []
    for key in store.list(base):
        if not _SITE_RECORD.match(key[len(base):]):
            continue
        if cache is not None and key in cache:
            fact = cache[key]
        else:
            fact = _read_fact(store, key)
            if cache is not None:
                cache[key] = fact
        if fact is not None:
            facts.append(fact)
    return facts


def _read_fact(store: ObjectStore, key: str) -> SiteFact | None:
    try:
        data = store.get_bytes(key)
    except ObjectNotFound:
        return None
    try:
        record = SiteTaskRecord.model_validate_json(data)
    except ValidationError:
        log.warning("%s is not a site audit record; it is not accounted", key)
        return None
    return SiteFact(key, record, sha256_hex(data))


def _run_of_fact(fact: SiteFact) -> Run | None:
    r = fact.record
    if r.privacy is None or r.privacy.steps == 0:
        return None
    return Run(r.site, r.study.uid, r.round, r.privacy, fact.sha256)


# ---- the ledger -------------------------------------------------------------------------------


def read_entries(store: ObjectStore, namespace: str, study: str, hub: PublicIdentity,
                 cache: MutableMapping[str, LedgerEntry] | None = None) -> list[LedgerEntry]:
    """The study name's ledger entries, each verified against the hub's key; LedgerError naming
    the key of the first entry that is malformed, unsigned, altered, or filed under another
    study or site."""
    prefix = ledger_prefix(namespace, study)
    entries = []
    for key in store.list(prefix):
        rest = key[len(prefix):]
        if "/" not in rest or rest.startswith(f"{RESERVATIONS}/"):
            continue  # budget.json and reservations have readers of their own
        if cache is not None and key in cache:
            entries.append(cache[key])
            continue
        try:
            data = store.get_bytes(key)
        except ObjectNotFound:
            continue
        entry = parse_entry(data, key)
        check_entry(entry, hub, key, namespace=namespace, study=study)
        if cache is not None:
            cache[key] = entry
        entries.append(entry)
    return entries


def parse_entry(data: bytes, key: str) -> LedgerEntry:
    try:
        return LedgerEntry.model_validate_json(data)
    except ValidationError as exc:
        err = exc.errors()[0]
        raise LedgerError(f"privacy ledger entry {key}: not a ledger entry ({err['msg']} at "
                          f"{'.'.join(str(p) for p in err['loc']) or 'top level'})") from None


def check_entry(entry: LedgerEntry, hub: PublicIdentity, key: str, *, namespace: str,
                study: str) -> None:
    """LedgerError unless the hub signed `entry` and it sits under its own ledger and site."""
    if entry.hub != hub.name or not entry.signature_valid(hub):
        raise LedgerError(f"privacy ledger entry {key}: its signature does not verify against "
                          f"the hub key ({hub.name}): altered, unsigned or written by another "
                          "hub; restore it from a backup of the store")
    expected = entry_key(namespace, study, entry.site, entry.site_record_sha256)
    if (entry.ledger.namespace, entry.ledger.name) != (namespace, study) or key != expected:
        raise LedgerError(f"privacy ledger entry {key}: it belongs at {expected} of ledger "
                          f"{entry.ledger}; an entry is never moved between ledgers")


def runs(entries: Iterable[LedgerEntry], facts: Iterable[SiteFact] = ()) -> list[Run]:
    """The distinct runs in `entries` and in site records not indexed yet (one per site
    record: an entry and the record it copies count once)."""
    seen: dict[str, Run] = {}
    for e in entries:
        seen.setdefault(e.site_record_sha256,
                        Run(e.site, e.study.uid, e.round, e.steps, e.site_record_sha256))
    for f in facts:
        run = _run_of_fact(f)
        if run is not None:
            seen.setdefault(run.record_sha256, run)
    return sorted(seen.values(), key=lambda r: (r.site, r.study_uid or "", r.round,
                                                 r.record_sha256))


def by_site(all_runs: Iterable[Run]) -> dict[str, list[DPSteps]]:
    """The runs' steps per site, for the accountant."""
    out: dict[str, list[DPSteps]] = {}
    for r in all_runs:
        out.setdefault(r.site, []).append(r.steps)
    return out


# ---- writing (Jobs that hold the hub's key) ---------------------------------------------------


def index_site_records(store: ObjectStore, namespace: str, study: str, hub: Identity,
                       registry: KeyRegistry) -> int:
    """Add an entry for every site record under the study's name that has none; returns how
    many were added. A record whose signature does not verify (or whose site is not
    registered) is still accounted — its steps can only raise ε — and marked unverified."""
    added = 0
    for fact in site_records(store, namespace, study):
        r = fact.record
        if r.privacy is None or r.privacy.steps == 0 or r.site != _site_of(fact.key):
            continue
        key = entry_key(namespace, study, r.site, fact.sha256)
        if store.exists(key):
            continue
        public = registry.site(r.site)
        verified = public is not None and r.signature_valid(public)
        entry = LedgerEntry(ledger=StudyRef(namespace=namespace, name=study), study=r.study,
                            round=r.round, site=r.site, steps=r.privacy,
                            max_grad_norm=r.max_grad_norm, site_record_sha256=fact.sha256,
                            site_signature_verified=verified,
                            hub=hub.name).signed(hub)
        store.put_bytes(key, entry.to_bytes())
        added += 1
    if added:
        log.info("privacy ledger %s/%s: indexed %d site record(s)", namespace, study, added)
    return added


def inherit(store: ObjectStore, namespace: str, study: str, source_namespace: str,
            source_study: str, hub: Identity) -> int:
    """Copy the source study's ledger (and its site records not indexed yet) into this study's,
    re-signed with `source` set: a model trained from another study's checkpoint carries the ε
    its training spent. Returns how many entries were added."""
    if (source_namespace, source_study) == (namespace, study):
        return 0
    source = StudyRef(namespace=source_namespace, name=source_study)
    added = 0
    entries = read_entries(store, source_namespace, source_study, hub.public())
    facts = site_records(store, source_namespace, source_study)
    for run in runs(entries, facts):
        key = entry_key(namespace, study, run.site, run.record_sha256)
        if store.exists(key):
            continue
        origin = next((e for e in entries if e.site_record_sha256 == run.record_sha256), None)
        entry = LedgerEntry(
            ledger=StudyRef(namespace=namespace, name=study),
            study=origin.study if origin else StudyRef(namespace=source_namespace,
                                                      name=source_study, uid=run.study_uid),
            round=run.round, site=run.site, steps=run.steps,
            max_grad_norm=origin.max_grad_norm if origin else None,
            site_record_sha256=run.record_sha256,
            site_signature_verified=origin.site_signature_verified if origin else False,
            source=origin.source or source if origin else source, hub=hub.name).signed(hub)
        store.put_bytes(key, entry.to_bytes())
        added += 1
    if added:
        log.info("privacy ledger %s/%s: inherited %d entr(ies) from %s", namespace, study,
                 added, source)
    return added


def _site_of(key: str) -> str:
    return key.rsplit("/", 1)[-1][: -len(".json")]


__all__ = [
    "LEDGER_FOLDER",
    "LedgerBudget",
    "LedgerEntry",
    "LedgerError",
    "Reservation",
    "Run",
    "SiteFact",
    "budget_key",
    "by_site",
    "check_entry",
    "entry_key",
    "index_site_records",
    "inherit",
    "ledger_prefix",
    "parse_entry",
    "pin_budget",
    "read_budget",
    "read_entries",
    "read_reservations",
    "reservation_key",
    "runs",
    "site_records",
    "write_reservation",
]

"""`deeprad audit STUDY`: print a study's audit trail and verify every signature in it.

The trail is checked from one pinned key: the hub's. Each round's hub record must verify
against it and name the round's hub-signed checkpoint; the site keys in that record (the
HospitalSites' registered keys, as the hub used them) then verify the sites' own records, whose
sha256 the hub record also names. Anything that does not check out is a ✗ row, and the command
exits 2 with a one-line summary naming the first failing object.
"""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from deeprad.core.errors import ConfigError

if TYPE_CHECKING:
    from deeprad.core.audit import HubRoundRecord, SiteTaskRecord
    from deeprad.core.identity import PublicIdentity
    from deeprad.core.layout import StudyLayout
    from deeprad.core.store import ObjectStore

HELP_EPILOG = """\
Each row is one training task: round, site, who created the study (the deeprad.io/created-by
annotation the hub's admission policy sets), the model digest, the trainer image the hospital
configured, the digest of the hospital's site policy, the task's ε at the round's δ, and ✓ when
every signature and digest checks out. Rounds not aggregated yet are listed, not failed.

exit status: 0 every record verifies; 2 a record is missing, altered or signed by another key
(the first one is named), or bad options.

example:
  deeprad audit chest-ct -n radiology --store 's3://deeprad?endpoint=s3.hub:9000' \\
      --hub-key hub-public-keys/
"""


@dataclass(frozen=True)
class Row:
    """One line of the trail: a site's task, or a round-level finding (site '(hub)')."""

    round: int
    site: str
    ok: bool
    key: str  # the store object the row is about
    creator: str = "-"
    model_digest: str = "-"
    image: str = "-"
    policy_digest: str = "-"
    epsilon: str = "-"
    problem: str | None = None


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add `audit` to the `deeprad` command."""
    parser = subparsers.add_parser(
        "audit", help="print a study's signed audit trail and verify its signatures",
        description="Walk a study's rounds in the object store and print one line per "
                    "training task (round, site, creator, model digest, image, policy digest, "
                    "ε, ✓/✗), verifying the hub's signed round records against the pinned hub "
                    "key and each site's signed task record against the site key the hub's "
                    "record names.",
        epilog=HELP_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("study", help="the FederatedStudy's name (or a lone FederatedRound's)")
    parser.add_argument("-n", "--namespace", required=True, help="the study's hub namespace")
    parser.add_argument("--uid", help="the study's uid, when the store holds several studies "
                                      "of this name (kubectl get federatedstudy STUDY -n NS "
                                      "-o jsonpath='{.metadata.uid}'); default: the only one")
    parser.add_argument("--store", default=os.environ.get("DEEPRAD_STORE"), metavar="URL",
                        help="object store: a folder, file:///path or s3://BUCKET?endpoint="
                             "HOST:PORT[&secure=false]; keys from DEEPRAD_S3_ACCESS_KEY / "
                             "DEEPRAD_S3_SECRET_KEY (env DEEPRAD_STORE)")
    parser.add_argument("--hub-key", type=Path, metavar="DIR|FILE",
                        help="the hub's public key folder (or its signing.pub) that must have "
                             "signed the trail (default for a local store: the keys/hub folder "
                             "`deeprad simulate` leaves beside it)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Print the trail; AuditError (exit 2) when any check fails."""
    from deeprad.core.audit import AuditError
    from deeprad.core.layout import StudyLayout
    from deeprad.core.store import open_store

    if not args.store:
        raise ConfigError("no store: pass --store URL (or set DEEPRAD_STORE), the store the "
                          "hub's operator writes to")
    store = open_store(args.store)
    hub = pinned_hub(store, args.hub_key)
    layout = StudyLayout(args.namespace, args.study, args.uid or _only_uid(
        store, StudyLayout(args.namespace, args.study)))
    rounds = _round_numbers(store, layout)
    if not rounds:
        raise ConfigError(f"study {args.namespace}/{args.study}: no rounds in {store.url}; "
                          "check --namespace, --uid and --store")
    rows: list[Row] = []
    pending: list[int] = []
    last: HubRoundRecord | None = None
    for number in rounds:
        if _evaluation_round(store, layout, number):
            continue  # it scored the previous checkpoint: no update, checkpoint or record
        found, hub_rows = _round_rows(store, layout, number, hub)
        rows += hub_rows
        if found is None and not hub_rows:
            pending.append(number)
        if found is not None:
            rows += _chain_rows(layout, found, last, pending)
        last = found or last
    _print(rows, pending, last)
    failed = [r for r in rows if not r.ok]
    if failed:
        first = failed[0]
        raise AuditError(f"{len(failed)} of {len(rows)} audit check(s) failed; first: "
                         f"{store.uri(first.key)}: {first.problem}")
    return 0


def pinned_hub(store: ObjectStore, hub_key: Path | None) -> PublicIdentity:
    """The hub key the trail must be signed with (`deeprad export`'s rule)."""
    from deeprad.core.store.local import LocalStore
    from deeprad.inference.hub_key import RUN_HUB_KEYS, find_run_hub_key, load_hub_key

    if hub_key is not None:
        return load_hub_key(hub_key).identity
    found = find_run_hub_key(store.root / "x") if isinstance(store, LocalStore) else None
    if found is None:
        raise ConfigError(f"no hub key to verify the trail against (none given, no "
                          f"{RUN_HUB_KEYS}/ beside the store); pass --hub-key with the public "
                          "key folder (or signing.pub) the hub's admins published")
    return load_hub_key(found, "hub key folder (found beside the store)").identity


def _only_uid(store: ObjectStore, bare: StudyLayout) -> str | None:
    """The uid segment of the study's keys when the store holds exactly one study of the name
    (None: keys without a uid, as `deeprad simulate` writes them)."""
    prefix = f"{bare.root}/"
    owners: set[str | None] = set()
    for key in store.list(prefix):
        parts = key[len(prefix):].split("/")
        if parts[0] == "rounds":
            owners.add(None)
        elif len(parts) > 1 and parts[1] == "rounds":
            owners.add(parts[0])
    if len(owners) > 1:
        uids = ", ".join(sorted(o or "(none)" for o in owners))
        raise ConfigError(f"study {bare.namespace}/{bare.study}: the store holds {len(owners)} "
                          f"studies of that name (uids {uids}), one per re-creation; pass --uid")
    return next(iter(owners), None)


def _evaluation_round(store: ObjectStore, layout: StudyLayout, number: int) -> bool:
    """Whether round `number` is a study's final evaluation (its report pools the sites'
    scores of an existing checkpoint and aggregates nothing)."""
    from deeprad.core.errors import ObjectNotFound
    from deeprad.core.protocol import AggregateReport
    try:
        report = AggregateReport.model_validate_json(store.get_bytes(layout.aggregate(number)))
    except (ObjectNotFound, ValueError):
        return False
    return bool(report.evaluated_sites) and not report.contributors


def _round_numbers(store: ObjectStore, layout: StudyLayout) -> list[int]:
    prefix = f"{layout.root}/rounds/"
    numbers = {key[len(prefix):].split("/", 1)[0] for key in store.list(prefix)}
    return sorted(int(n) for n in numbers if n.isdigit() and int(n) >= 1)


def _round_rows(store: ObjectStore, layout: StudyLayout, number: int, hub: PublicIdentity
                ) -> tuple[HubRoundRecord | None, list[Row]]:
    """Round `number`'s verified hub record (None when absent or failing) and its rows."""
    from deeprad.core.audit import (
        AuditError,
        HubRoundRecord,
        StudyRef,
        check_hub_record,
        read_record,
        recorded_sites,
    )
    from deeprad.core.errors import CheckpointError
    from deeprad.core.manifests import read_manifest, verify_checkpoint_manifest

    key = layout.hub_audit(number)
    try:
        found = read_record(store, key, HubRoundRecord)
        if found is None:
            if store.exists(layout.aggregate(number)):
                raise AuditError("the round was aggregated but the hub left no audit record")
            return None, []  # not aggregated yet
        record, _ = found
        check_hub_record(record, hub, study=StudyRef.of(layout), round_no=number)
        checkpoint = read_manifest(store, layout, number)
        verify_checkpoint_manifest(checkpoint, hub, layout, number)
        if checkpoint.payload_sha256 != record.checkpoint_sha256:
            raise AuditError(f"the hub record names checkpoint {record.checkpoint_sha256[:16]}…"
                             f", the round's hub-signed checkpoint is "
                             f"{checkpoint.payload_sha256[:16]}…")
    except (AuditError, CheckpointError) as exc:
        return None, [Row(number, "(hub)", ok=False, key=key, problem=str(exc))]
    rows = [_site_row(store, layout, record, entry.site) for entry in record.sites]
    listed = {entry.site for entry in record.sites}
    rows += [Row(number, site, ok=False, key=layout.site_audit(number, site),
                 creator=record.created_by or "-",
                 problem="a site record the hub's round record does not name")
             for site in recorded_sites(store, layout, number) if site not in listed]
    return record, rows


def _chain_rows(layout: StudyLayout, record: HubRoundRecord, previous: HubRoundRecord | None,
                pending: list[int]) -> list[Row]:
    """A failing row when an aggregated round does not continue the one before it: an earlier
    round without a hub record (its records were removed), or a parent that is not the previous
    round's checkpoint (a round removed or replaced in between)."""
    key = layout.hub_audit(record.round)
    gaps = [n for n in pending if n < record.round]
    if gaps:
        return [Row(record.round, "(hub)", ok=False, key=key,
                    problem=f"round(s) {', '.join(map(str, gaps))} before this aggregated round "
                            "have no hub record: the trail has a hole")]
    if previous is not None and record.parent_sha256 != previous.checkpoint_sha256:
        return [Row(record.round, "(hub)", ok=False, key=key,
                    problem=f"its parent {str(record.parent_sha256)[:16]}… is not round "
                            f"{previous.round}'s checkpoint {previous.checkpoint_sha256[:16]}…:"
                            " the chain of rounds is broken")]
    return []


def _site_row(store: ObjectStore, layout: StudyLayout, hub_record: HubRoundRecord,
              site: str) -> Row:
    from deeprad.core.audit import (
        AuditError,
        SiteTaskRecord,
        StudyRef,
        check_site_record,
        read_record,
        sha256_hex,
        vouched_key,
    )

    number = hub_record.round
    key = layout.site_audit(number, site)
    entry = next(e for e in hub_record.sites if e.site == site)
    base = Row(number, site, ok=False, key=key, creator=hub_record.created_by or "-")
    record: SiteTaskRecord | None = None
    try:
        found = read_record(store, key, SiteTaskRecord)
        record = found[0] if found else None
        if entry.problem:
            raise AuditError(f"the hub could not vouch for it: {entry.problem}")
        if found is None:
            raise AuditError("the site's record is gone")
        if sha256_hex(found[1]) != entry.record_sha256:
            raise AuditError("the record changed after the hub vouched for it (its sha256 "
                             "differs from the hub record's)")
        check_site_record(found[0], vouched_key(entry), study=StudyRef.of(layout),
                          round_no=number, site=site, parent_sha256=hub_record.parent_sha256,
                          update_sha256=entry.update_sha256)
    except AuditError as exc:
        return _with_record(base, record, hub_record, problem=str(exc))
    return _with_record(base, record, hub_record, problem=None)


def _with_record(row: Row, record: SiteTaskRecord | None, hub_record: HubRoundRecord,
                 problem: str | None) -> Row:
    if record is None:
        return Row(**{**row.__dict__, "problem": problem})
    return Row(**{**row.__dict__, "ok": problem is None, "problem": problem,
                  "model_digest": _short(record.model_digest),
                  "image": record.trainer_image or "-",
                  "policy_digest": _short(record.policy_digest),
                  "epsilon": _epsilon(record, hub_record)})


def _short(digest: str | None) -> str:
    if not digest:
        return "-"
    algo, _, hexpart = digest.rpartition(":")
    return f"{algo or 'sha256'}:{hexpart[:12]}"


def _epsilon(record: SiteTaskRecord, hub_record: HubRoundRecord) -> str:
    """The task's own ε at the round's δ ('-' without DP-SGD)."""
    from deeprad.core.privacy import epsilon_of

    if record.privacy is None:
        return "-"
    if hub_record.privacy is None:
        return f"z={record.privacy.noise_multiplier:g}"  # DP without a study budget: no δ
    eps = epsilon_of([record.privacy], hub_record.privacy.delta, hub_record.privacy.accountant)
    return f"{eps:.3g}"


def _print(rows: list[Row], pending: list[int], last: HubRoundRecord | None) -> None:
    header = ("ROUND", "SITE", "CREATED-BY", "MODEL", "IMAGE", "POLICY", "ε", "OK")
    table = [header, *((str(r.round), r.site, r.creator, r.model_digest, r.image,
                        r.policy_digest, r.epsilon, "✓" if r.ok else "✗") for r in rows)]
    widths = [max(len(line[i]) for line in table) for i in range(len(header))]
    for i, line in enumerate(table):
        print("  ".join(cell.ljust(w) for cell, w in zip(line, widths, strict=True)).rstrip())
        if i and not rows[i - 1].ok:
            print(f"      ✗ {rows[i - 1].key}: {rows[i - 1].problem}")
    ok = sum(r.ok for r in rows)
    summary = f"{ok} of {len(rows)} records verified"
    if pending:
        summary += f"; round(s) {', '.join(map(str, pending))} not aggregated yet"
    if last is not None and last.privacy is not None:
        summary += (f"; study ε spent {last.privacy.epsilon_spent:.3g} after round {last.round}"
                    f" (δ={last.privacy.delta:g})")
    print(summary, file=sys.stdout)

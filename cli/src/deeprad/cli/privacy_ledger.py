"""`deeprad privacy ledger --site`: what a hospital's own privacy ledger holds.

The site agent keeps the ledger in the ConfigMap `deeprad-privacy-ledger` of its training
namespace (`deeprad.operator.site.ledger`): every DP-SGD run on the hospital's data, reserved
(its planned upper bound, before and — if the run failed — after it ran) or reported (what the
trainer did). This prints ε at δ per dataset (every study and hub together: what
`policy.maxEpsilonPerDataset` caps) and per study on it (`policy.maxEpsilonPerStudy`), with the
counts of reserved and reported runs. The command has one mode per ledger: `--site` reads the
hospital's ConfigMap; the hub's signed ledger of a study is a second mode of the same command.
"""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from deeprad.core.errors import ConfigError

if TYPE_CHECKING:
    from deeprad.core.site_policy import LedgerEntry
    from deeprad.operator.site.ledger import Ledger

UNNAMED = "(unnamed)"  # runs recorded before the site named its datasets


def register(privacy_commands: argparse._SubParsersAction) -> None:
    """Add `ledger` under `deeprad privacy`."""
    from deeprad.core.site_policy import DEFAULT_DELTA

    ledger = privacy_commands.add_parser(
        "ledger", help="print a privacy ledger: a site's own (--site) or a study's (--study)",
        description="Print the ε spent from a privacy ledger. --site reads the hospital's own "
                    "ledger, the ConfigMap deeprad-privacy-ledger that its site agent keeps in "
                    "the training namespace of the hospital's cluster: ε per dataset and per "
                    "study. --study STUDY -n NS reads the hub's signed ledger of a study in "
                    "the object store, verifies every entry against the pinned hub key (exit 2 "
                    "naming the first that does not verify), and prints ε per site.",
        epilog="examples:\n"
               "  deeprad privacy ledger --site -n deeprad-training --kubeconfig hospital.yaml\n"
               "  deeprad privacy ledger --study brain-mri -n radiology \\\n"
               "      --store 's3://deeprad?endpoint=s3.hub:9000' --hub-key hub-public-keys/",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    mode = ledger.add_mutually_exclusive_group(required=True)
    mode.add_argument("--site", action="store_true",
                      help="the hospital's own ledger (on the hospital's cluster)")
    mode.add_argument("--study", metavar="STUDY",
                      help="the hub's ledger of FederatedStudy STUDY (every study of that name "
                           "in namespace -n, and what it inherited)")
    ledger.add_argument("-n", "--namespace",
                        help="--site: the site agent's training namespace (the site chart's "
                             "training.namespace; default deeprad-training); --study: the "
                             "study's hub namespace (required)")
    where = ledger.add_argument_group("--site: the hospital's cluster")
    where.add_argument("--kubeconfig", help="kubeconfig of the hospital's cluster (default: "
                                            "$KUBECONFIG or ~/.kube/config)")
    where.add_argument("--context", help="kubeconfig context (default: the current one)")
    hub = ledger.add_argument_group("--study: the hub's object store")
    hub.add_argument("--store", default=os.environ.get("DEEPRAD_STORE"), metavar="URL",
                     help="object store: a folder, file:///path or s3://BUCKET?endpoint="
                          "HOST:PORT[&secure=false]; keys from DEEPRAD_S3_ACCESS_KEY / "
                          "DEEPRAD_S3_SECRET_KEY (env DEEPRAD_STORE)")
    hub.add_argument("--hub-key", type=Path, metavar="DIR|FILE",
                     help="the hub's public key folder (or its signing.pub) that must have "
                          "signed the ledger")
    hub.add_argument("--accountant", choices=("rdp", "pld"), default="rdp",
                     help="the study's privacyBudget.accountant (default rdp)")
    ledger.add_argument("--delta", type=float, default=DEFAULT_DELTA, metavar="D",
                        help="δ at which ε is shown: the site policy's delta, or the study's "
                             f"privacyBudget.delta (default {DEFAULT_DELTA:g})")
    ledger.add_argument("--json", action="store_true", help="print one JSON object")
    ledger.set_defaults(func=cmd_ledger)


def cmd_ledger(args: argparse.Namespace) -> int:
    """Print the ledger the mode names."""
    if not 0 < args.delta < 1:
        raise ConfigError(f"--delta must be in (0, 1), got {args.delta:g}; use the site "
                          "policy's delta (policy.delta) or the study's privacyBudget.delta")
    if args.study is not None:
        report = study_report(args)
        print(json.dumps(report) if args.json else "\n".join(format_study_report(report)))
        return 0
    args.namespace = args.namespace or "deeprad-training"
    report = site_report(args)
    print(json.dumps(report) if args.json else "\n".join(format_report(report)))
    return 0


def study_report(args: argparse.Namespace) -> dict[str, Any]:
    """The hub's ledger of a study: every entry verified against the pinned hub key, plus the
    site records not indexed yet (shown apart: they carry only the site's signature)."""
    from deeprad.cli.audit import pinned_hub
    from deeprad.core.privacy import epsilon_of
    from deeprad.core.privacy_ledger import read_entries, runs, site_records
    from deeprad.core.store import open_store

    if not args.namespace:
        raise ConfigError("--study needs -n NAMESPACE: the study's hub namespace")
    if not args.store:
        raise ConfigError("no store: pass --store URL (or set DEEPRAD_STORE), the store the "
                          "hub's operator writes to")
    store = open_store(args.store)
    hub = pinned_hub(store, args.hub_key)
    entries = read_entries(store, args.namespace, args.study, hub)  # LedgerError: exit 2
    indexed = {e.site_record_sha256 for e in entries}
    pending = [r for r in runs((), site_records(store, args.namespace, args.study))
               if r.record_sha256 not in indexed]
    sites: list[dict[str, Any]] = []
    for site in sorted({e.site for e in entries} | {r.site for r in pending}):
        mine = [e for e in entries if e.site == site]
        extra = [r for r in pending if r.site == site]
        steps = [e.steps for e in mine] + [r.steps for r in extra]
        sites.append({
            "site": site, "epsilon": epsilon_of(steps, args.delta, args.accountant),
            "entries": len(mine), "not_indexed": len(extra),
            "unverified_site_signatures": sum(1 for e in mine if not e.site_signature_verified),
            "inherited_from": sorted({str(e.source) for e in mine if e.source is not None})})
    return {"ledger": f"{args.namespace}/{args.study}", "store": store.url,
            "hub": hub.name, "delta": args.delta, "accountant": args.accountant,
            "epsilon": max((s["epsilon"] for s in sites), default=0.0), "sites": sites}


def format_study_report(report: dict[str, Any]) -> list[str]:
    """The study's ledger as text: one line per site, then the study's ε."""
    lines = [f"privacy ledger of study {report['ledger']} in {report['store']} (ε at "
             f"δ={report['delta']:g}, {report['accountant']}; every entry verified against "
             f"hub key {report['hub']})"]
    if not report["sites"]:
        return [*lines, "no DP run recorded"]
    width = max(len(s["site"]) for s in report["sites"])
    for s in report["sites"]:
        notes = []
        if s["not_indexed"]:
            notes.append(f"{s['not_indexed']} site record(s) not indexed yet")
        if s["unverified_site_signatures"]:
            notes.append(f"{s['unverified_site_signatures']} with a site signature the hub "
                         "could not verify")
        if s["inherited_from"]:
            notes.append(f"inherited from {', '.join(s['inherited_from'])}")
        tail = f"  ({'; '.join(notes)})" if notes else ""
        lines.append(f"  {s['site']:<{width}}  ε={s['epsilon']:.4g}  {s['entries']} "
                     f"entr(ies){tail}")
    lines.append(f"study ε (the largest site's): {report['epsilon']:.4g}")
    return lines


def site_report(args: argparse.Namespace) -> dict[str, Any]:
    """The hospital's ledger, read from its ConfigMap, summarised."""
    from deeprad.operator.site.ledger import LEDGER_CONFIGMAP, read_ledger

    where = f"ConfigMap {args.namespace}/{LEDGER_CONFIGMAP}"
    return summarise(read_ledger(_read_configmap(args, LEDGER_CONFIGMAP), where), args.delta,
                     where)


def _read_configmap(args: argparse.Namespace, name: str) -> dict[str, Any]:
    import kubernetes
    from kubernetes.client.exceptions import ApiException
    from urllib3.exceptions import HTTPError

    where = f"ConfigMap {args.namespace}/{name}"
    try:
        api = kubernetes.config.new_client_from_config(config_file=args.kubeconfig,
                                                       context=args.context)
        found = kubernetes.client.CoreV1Api(api).read_namespaced_config_map(name, args.namespace)
    except kubernetes.config.ConfigException as exc:
        raise ConfigError(f"cannot load the kubeconfig ({exc}); pass --kubeconfig of the "
                          "hospital's cluster") from None
    except ApiException as exc:
        if exc.status == 404:
            raise ConfigError(f"{where} does not exist: no DP run was recorded there yet, or "
                              "--namespace is not the site agent's training namespace "
                              "(training.namespace in the site chart)") from None
        if exc.status in (401, 403):
            raise ConfigError(f"{where}: the cluster refused to show it ({exc.status} "
                              f"{exc.reason}); use a kubeconfig allowed to get ConfigMaps in "
                              f"namespace {args.namespace}") from None
        raise ConfigError(f"{where}: the API server answered {exc.status} {exc.reason}; "
                          "retry, or check the cluster") from None
    except HTTPError as exc:
        raise ConfigError(f"{where}: cannot reach the cluster's API server ({exc}); check "
                          "--kubeconfig and --context") from None
    data: dict[str, Any] = kubernetes.client.ApiClient().sanitize_for_serialization(found)
    return data


def summarise(ledger: Ledger, delta: float, where: str) -> dict[str, Any]:
    """ε at `delta` per dataset (every study and hub on it) and per study on each dataset,
    with the counts of reserved and reported runs; runs recorded before datasets were named
    count against every dataset, as the agent counts them."""
    by_study: list[tuple[str, LedgerEntry]] = [
        (key.replace("_", "/", 1), entry)
        for key, entries in sorted(ledger.studies.items()) for entry in entries]
    named = sorted({e.dataset for _, e in by_study if e.dataset is not None})
    datasets = []
    for dataset in named or [UNNAMED]:
        on_it = [(study, e) for study, e in by_study if e.dataset in (None, dataset)]
        studies = []
        for study in sorted({s for s, _ in on_it}):
            runs = [e for s, e in on_it if s == study]
            studies.append({"study": study, **_counts(runs, delta)})
        datasets.append({"dataset": dataset, **_counts([e for _, e in on_it], delta),
                         "studies": studies})
    return {"ledger": where, "delta": delta, "datasets": datasets}


def _counts(runs: Sequence[LedgerEntry], delta: float) -> dict[str, Any]:
    from deeprad.core.privacy import epsilon_of

    total = sum(e.runs for e in runs)  # a compacted entry stands for several reported runs
    reserved = sum(e.runs for e in runs if e.reserved)
    return {"epsilon": epsilon_of([e.steps for e in runs], delta), "runs": total,
            "reserved": reserved, "reported": total - reserved}


def format_report(report: dict[str, Any]) -> list[str]:
    """The summary as text lines: one per dataset, one per study under it."""
    lines = [f"{report['ledger']} (ε at δ={report['delta']:g})"]
    if not any(d["runs"] for d in report["datasets"]):
        return [*lines, "no DP run recorded"]
    for d in report["datasets"]:
        lines.append(f"dataset {d['dataset']}: ε={d['epsilon']:.4g} over {_runs(d)}")
        width = max(len(s["study"]) for s in d["studies"])
        lines += [f"  {s['study']:<{width}}  ε={s['epsilon']:.4g}  {_runs(s)}"
                  for s in d["studies"]]
    return lines


def _runs(counts: dict[str, Any]) -> str:
    return (f"{counts['runs']} run(s): {counts['reported']} reported, {counts['reserved']} "
            "reserved")

"""`deeprad operator --mode hub`: run the hub operator with kopf.

`register(subparsers)` adds the command to `deeprad`; `python -m deeprad.operator.cli` runs it
stand-alone. The operator serves a liveness probe (kopf's) and Prometheus metrics.
"""

from __future__ import annotations

import argparse
import logging
import sys

import kopf

from deeprad.operator import metrics
from deeprad.operator.hub import build_registry, make_memo
from deeprad.operator.settings import HubOptions, operator_settings

MODES = ("hub",)  # "site" (the site agent) comes next


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The operator's flags."""
    parser.add_argument("--mode", choices=MODES, required=True,
                        help="hub: reconcile HospitalSites and FederatedStudies in the hub")
    parser.add_argument("--kubeconfig", help="kubeconfig file (default: in-cluster, else "
                                             "$KUBECONFIG or ~/.kube/config)")
    parser.add_argument("--context", help="kubeconfig context (default: the current one)")
    parser.add_argument("-n", "--namespace", action="append", dest="namespaces", default=[],
                        metavar="NS", help="watch studies and rounds only in this namespace "
                                           "(repeatable; glob patterns allowed); default: all")
    parser.add_argument("--liveness", default="http://0.0.0.0:8080/healthz", metavar="URL",
                        help="liveness endpoint; empty to disable (default: %(default)s)")
    parser.add_argument("--metrics-port", type=int, default=9090,
                        help="Prometheus /metrics port; 0 disables (default: %(default)s)")
    parser.add_argument("--metrics-address", default="0.0.0.0",
                        help="address /metrics listens on (default: %(default)s)")
    parser.add_argument("--peering", metavar="NAME",
                        help="KopfPeering name for several replicas (default: run alone)")
    parser.add_argument("--site-interval", type=float, default=HubOptions.site_interval,
                        metavar="S", help="seconds between heartbeat checks of a site")
    parser.add_argument("--study-interval", type=float, default=HubOptions.study_interval,
                        metavar="S", help="seconds between passes over a study")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add `operator` to the `deeprad` command."""
    parser = subparsers.add_parser(
        "operator", help="run the Kubernetes operator",
        description="Run the Deep-Rad operator. --mode hub reserves each HospitalSite's hub "
                    "namespace and RBAC, tracks site heartbeats and drives FederatedStudies "
                    "round after round.")
    add_arguments(parser)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Run the operator until SIGINT/SIGTERM."""
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s %(message)s")
    options = HubOptions(site_interval=args.site_interval, study_interval=args.study_interval)
    memo = make_memo(options, args.kubeconfig, args.context)
    if args.metrics_port:
        metrics.serve(args.metrics_port, args.metrics_address)
    kopf.run(registry=build_registry(options), settings=operator_settings(peering=args.peering),
             memo=memo, clusterwide=not args.namespaces, namespaces=args.namespaces,
             liveness_endpoint=args.liveness or None, standalone=args.peering is None)
    return 0


def main(argv: list[str] | None = None) -> int:
    """Stand-alone entry point: `python -m deeprad.operator.cli --mode hub ...`."""
    parser = argparse.ArgumentParser(prog="deeprad operator", description=__doc__)
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())

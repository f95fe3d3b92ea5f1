"""`deeprad operator --mode hub|site`: the hub operator (kopf) or a hospital's site agent.

`register(subparsers)` adds the command to `deeprad`; `python -m deeprad.operator` runs it
stand-alone (the image and the charts do). Both serve a liveness probe and Prometheus metrics.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
from concurrent.futures import Executor
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from deeprad.operator import leader
from deeprad.operator.options import HubOptions

MODES = ("hub", "site")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The operator's flags."""
    parser.add_argument("--mode", choices=MODES, required=True,
                        help="hub: reconcile HospitalSites, FederatedStudies and "
                             "FederatedRounds in the hub; site: a hospital's agent")
    parser.add_argument("--kubeconfig", help="kubeconfig of the cluster the process runs in "
                                             "(default: in-cluster, else $KUBECONFIG or "
                                             "~/.kube/config)")
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
    add_leader_election_arguments(parser)
    parser.add_argument("--site-interval", type=float, default=HubOptions.site_interval,
                        metavar="S", help="seconds between heartbeat checks of a site")
    parser.add_argument("--study-interval", type=float, default=HubOptions.study_interval,
                        metavar="S", help="seconds between passes over a study")
    parser.add_argument("--round-interval", type=float, default=HubOptions.round_interval,
                        metavar="S", help="seconds between passes over a running round")
    parser.add_argument("--task-history", type=float, default=HubOptions.task_history,
                        metavar="S", help="seconds an ended round keeps its SiteTasks")
    parser.add_argument("--sweep-interval", type=float, default=HubOptions.sweep_interval,
                        metavar="S", help="seconds between sweeps for orphaned SiteTasks and "
                                          "hub Jobs")
    hub = parser.add_argument_group("hub mode: running rounds")
    hub.add_argument("--store", default=os.environ.get("DEEPRAD_STORE"), metavar="URL",
                     help="object store, s3://BUCKET?endpoint=HOST:PORT[&secure=false]; keys "
                          "from DEEPRAD_S3_ACCESS_KEY / DEEPRAD_S3_SECRET_KEY (env DEEPRAD_STORE)")
    hub.add_argument("--public-store-endpoint", metavar="HOST:PORT",
                     help="the store's address as the sites reach it, for presigned URLs "
                          "(default: the --store endpoint)")
    hub.add_argument("--jobs-namespace", default=os.environ.get("POD_NAMESPACE")
                     or HubOptions.jobs_namespace, metavar="NS",
                     help="namespace of prepare and aggregator Jobs and of the Secrets below "
                          "(default: $POD_NAMESPACE, else %(default)s)")
    hub.add_argument("--job-image", default=HubOptions.job_image, metavar="IMAGE",
                     type=image_reference,
                     help="image of the hub's Jobs, [registry/]path[:tag][@sha256:<digest>] "
                          "(default: %(default)s)")
    hub.add_argument("--image-pull-policy", default=HubOptions.image_pull_policy,
                     choices=("Always", "IfNotPresent", "Never"))
    hub.add_argument("--store-credentials-secret", metavar="NAME",
                     help="Secret with keys access-key and secret-key, for the hub's Jobs")
    hub.add_argument("--hub-identity-secret", metavar="NAME",
                     help="Secret holding the hub's private key folder (deeprad keys generate "
                          "--role hub), mounted into the hub's Jobs only")
    hub.add_argument("--hub-keys", metavar="DIR",
                     help="folder with the hub's public key files (signing.pub, "
                          "key-agreement.pub, name, role)")
    hub.add_argument("--aggregator-cpu", default=HubOptions.aggregator_cpu)
    hub.add_argument("--aggregator-memory", default=HubOptions.aggregator_memory)
    hub.add_argument("--aggregation-timeout", type=float,
                     default=HubOptions.aggregation_timeout, metavar="S",
                     help="seconds an aggregator Job may run (default: %(default)s)")
    hub.add_argument("--record-study-creator", action="store_true",
                     help="name each study's creator (annotation deeprad.io/created-by) in the "
                          "hub's audit records; only with the deeprad-study-creator admission "
                          "policies installed (the hub chart's admissionPolicies.studyCreator), "
                          "which set it and make it unforgeable")
    site = parser.add_argument_group("site mode")
    site.add_argument("--config", metavar="FILE", help="the agent's configuration (YAML)")
    site.add_argument("--hub-kubeconfig", metavar="FILE",
                      help="kubeconfig for this site's namespace on the hub")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")


def add_leader_election_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of the Lease-based leader election that lets several replicas run (leader.py)."""
    group = parser.add_argument_group(
        "leader election (several replicas: one acts, the others stand by)")
    group.add_argument("--leader-election", action=argparse.BooleanOptionalAction,
                       default=False,
                       help="act only while holding a coordination.k8s.io Lease; a standby "
                            "waits, answering --liveness, and takes over when the leader's "
                            "lease runs out (default: off, one process acts alone)")
    group.add_argument("--leader-election-namespace", metavar="NS",
                       default=os.environ.get("POD_NAMESPACE"),
                       help="namespace of the Lease (default: $POD_NAMESPACE, else the hub's "
                            "--jobs-namespace or the site's training namespace)")
    group.add_argument("--leader-election-lease-name", metavar="NAME",
                       help="name of the Lease (default: deeprad-operator in hub mode, "
                            "deeprad-site-agent in site mode)")
    group.add_argument("--leader-election-lease-duration", type=float, metavar="S",
                       default=leader.LEASE_DURATION,
                       help="seconds a standby waits after the leader's last renewal before "
                            "taking over (default: %(default)s)")
    group.add_argument("--leader-election-renew-deadline", type=float, metavar="S",
                       default=leader.RENEW_DEADLINE,
                       help="seconds the leader goes on without a successful renewal before "
                            "it exits; shorter than the lease (default: %(default)s)")
    group.add_argument("--leader-election-retry-period", type=float, metavar="S",
                       default=leader.RETRY_PERIOD,
                       help="seconds between renewals and between a standby's attempts "
                            "(default: %(default)s)")


def image_reference(value: str) -> str:
    """argparse type: an image reference, by the rule of deeprad.operator.api.images."""
    # Imported here: the API types load pydantic, and `deeprad --help` stays fast.
    from deeprad.operator.api.images import image_reference_problem

    problem = image_reference_problem(value)
    if problem:
        raise argparse.ArgumentTypeError(problem)
    return value


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add `operator` to the `deeprad` command."""
    parser = subparsers.add_parser(
        "operator", help="run the Kubernetes operator",
        description="Run the Deep-Rad operator. --mode hub reserves each HospitalSite's hub "
                    "namespace and RBAC, tracks site heartbeats, drives FederatedStudies round "
                    "after round and runs each FederatedRound (work items, aggregation). "
                    "--mode site runs a hospital's agent: it pulls its work items from the hub "
                    "and runs training Jobs on the hospital's cluster.")
    add_arguments(parser)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Run the operator until SIGINT/SIGTERM."""
    # kopf and the API client load here, not at import: `deeprad --help` stays fast.
    import kopf
    import kubernetes

    from deeprad.operator import metrics
    from deeprad.operator.api.names import SITE_NAMESPACE_PREFIX
    from deeprad.operator.hub import build_registry, make_memo
    from deeprad.operator.settings import operator_settings

    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s %(message)s")
    if not args.verbose:
        # kopf logs every timer and handler run at INFO: one line per object per second.
        for noisy in ("kopf.objects", "aiohttp.access"):
            logging.getLogger(noisy).setLevel(logging.WARNING)
    if args.mode == "site":
        return run_site(args)
    options = HubOptions(
        site_interval=args.site_interval, study_interval=args.study_interval,
        round_interval=args.round_interval, task_history=args.task_history,
        sweep_interval=args.sweep_interval, store_url=args.store,
        public_store_endpoint=args.public_store_endpoint, jobs_namespace=args.jobs_namespace,
        job_image=args.job_image, image_pull_policy=args.image_pull_policy,
        store_credentials_secret=args.store_credentials_secret,
        hub_identity_secret=args.hub_identity_secret, hub_keys_dir=args.hub_keys,
        aggregator_cpu=args.aggregator_cpu, aggregator_memory=args.aggregator_memory,
        aggregation_timeout=args.aggregation_timeout,
        record_study_creator=args.record_study_creator)
    missing = options.missing_for_rounds()
    if missing:
        logging.getLogger("deeprad.operator").warning(
            "running without %s: sites and studies are reconciled, rounds are not",
            ", ".join(missing))
    memo = make_memo(options, args.kubeconfig, args.context)
    if args.metrics_port:
        metrics.serve(args.metrics_port, args.metrics_address)
    # SiteTasks live in the sites' hub namespaces: watch them too when namespaces are limited.
    # kopf watches cluster-scoped kinds (HospitalSite) only while some watched namespace
    # exists, so the operator's own namespace, which always does, is in the list.
    namespaces = [*args.namespaces, f"{SITE_NAMESPACE_PREFIX}*", args.jobs_namespace] \
        if args.namespaces else []
    registry = build_registry(options)
    elector = None
    if args.leader_election:
        from deeprad.operator.client import load_configuration

        api = kubernetes.client.ApiClient(load_configuration(args.kubeconfig, args.context))
        elector = _elector(args, api, "deeprad-operator", args.jobs_namespace)
        if elector is None:
            return 2
        if not _stand_by(elector, args.liveness):
            return 0
    settings = operator_settings()
    try:
        # standalone: kopf's peering pauses only for peers of higher priority, so it elects no
        # leader; with several replicas the Lease above decides which one runs.
        kopf.run(registry=registry, settings=settings, memo=memo,
                 clusterwide=not namespaces, namespaces=namespaces,
                 liveness_endpoint=args.liveness or None, standalone=True)
    finally:
        if elector is not None:
            _stop_leading(settings.execution.executor, elector)
    return 0


def _stop_leading(executor: Executor, elector: leader.LeaderElector) -> None:
    """Release the Lease once no handler of this replica can act any more.

    kopf returns after its cancellation timeout even while a sync handler still runs in its
    executor (a thread cannot be cancelled). Releasing then would let a standby lead beside
    that thread, so wait for the executor first, still renewing: a handler that never ends
    keeps this replica the only leader until the kubelet kills the pod, and the Lease then
    expires on its own.
    """
    executor.shutdown(wait=True, cancel_futures=True)  # queued, not yet started: dropped
    elector.release()


def _elector(args: argparse.Namespace, api: Any, lease_name: str, namespace: str
             ) -> leader.LeaderElector | None:
    """The candidate the flags describe; None (after saying why) when their durations cannot
    guarantee one leader."""
    timing = leader.Timing(args.leader_election_lease_duration,
                           args.leader_election_renew_deadline,
                           args.leader_election_retry_period)
    problem = timing.problem()
    if problem:
        print(f"deeprad operator --mode {args.mode}: {problem}", file=sys.stderr)
        return None
    return leader.LeaderElector(api, args.leader_election_namespace or namespace,
                                args.leader_election_lease_name or lease_name, timing=timing)


def _stand_by(elector: leader.LeaderElector, liveness: str,
              stop: threading.Event | None = None) -> bool:
    """Block as a standby until `elector` leads (True) or SIGINT/SIGTERM arrives (False)."""
    stop = stop or threading.Event()
    previous = {sig: signal.signal(sig, lambda *_: stop.set())
                for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        return leader.stand_by(elector, liveness, stop)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def run_site(args: argparse.Namespace) -> int:
    """The site agent: two API clients, one loop, a health endpoint, metrics."""
    import kubernetes

    from deeprad.core.errors import ConfigError
    from deeprad.operator import metrics
    from deeprad.operator.api.names import SITE_NAMESPACE_PREFIX
    from deeprad.operator.client import load_configuration, token_expiry
    from deeprad.operator.site.agent import SiteAgent, serve_health
    from deeprad.operator.site.config import load_agent_config

    if not args.config or not args.hub_kubeconfig:
        print("deeprad operator --mode site: --config and --hub-kubeconfig are required",
              file=sys.stderr)
        return 2
    try:
        config = load_agent_config(Path(args.config))
    except ConfigError as exc:
        print(f"deeprad operator --mode site: {exc}", file=sys.stderr)
        return 2
    hub_config = load_configuration(args.hub_kubeconfig)
    _report_token_expiry(token_expiry(hub_config))
    hub = kubernetes.client.ApiClient(hub_config)
    local = kubernetes.client.ApiClient(load_configuration(args.kubeconfig, args.context))
    if args.metrics_port:
        metrics.serve(args.metrics_port, args.metrics_address)
    stop = threading.Event()
    elector = None
    if args.leader_election:  # the Lease lives on the hospital's cluster, beside the agent
        elector = _elector(args, local, "deeprad-site-agent", config.training.namespace)
        if elector is None:
            return 2
        if not _stand_by(elector, args.liveness, stop):
            return 0
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    agent = SiteAgent(config, hub, local)
    if args.liveness:
        url = urlparse(args.liveness)
        serve_health(agent, url.hostname or "0.0.0.0", url.port or 8080)
    logging.getLogger("deeprad.agent").info(
        "site agent for %s: hub namespace %s%s, training namespace %s", config.site,
        SITE_NAMESPACE_PREFIX, config.site, config.training.namespace)
    try:
        agent.run(stop)
    finally:
        if elector is not None:
            elector.release()
    return 0


TOKEN_WARNING = timedelta(days=7)


def _report_token_expiry(expires: datetime | None) -> None:
    """Say when the agent's hub token expires; warn when it is a week away or past (rotate it:
    `deeprad site token SITE --revoke-others` on the hub, then `helm upgrade --set-file
    hub.kubeconfig=FILE`)."""
    log = logging.getLogger("deeprad.agent")
    if expires is None:
        return
    left = expires - datetime.now(UTC)
    if left < TOKEN_WARNING:
        log.warning("the hub token expires %s (in %.1f days): ask the hub admin for a new one "
                    "(deeprad site token) and helm upgrade --set-file hub.kubeconfig=FILE",
                    expires.isoformat(), left.total_seconds() / 86400)
    else:
        log.info("the hub token expires %s (in %.0f days)", expires.isoformat(),
                 left.total_seconds() / 86400)


def main(argv: list[str] | None = None) -> int:
    """Stand-alone entry point: `python -m deeprad.operator --mode hub|site ...`."""
    parser = argparse.ArgumentParser(prog="deeprad operator", description=__doc__)
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())

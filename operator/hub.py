"""The hub operator's *act* layer: thin kopf handlers that read the world, call `decide`,
render manifests and apply them.

- HospitalSite: on create/resume/update the site's hub namespace, agent ServiceAccount, Role,
  RoleBinding and heartbeat Lease are applied (server-side apply, field manager
  `deeprad-operator`); a timer re-reads the Lease and sets Reachable and Ready.
- FederatedStudy: on create/resume/update and on a timer, the study is re-derived from the
  FederatedRounds it owns (`decide.study`), and the next round is created when due
  (deterministic name, create-or-get, so a restart never duplicates one).

Nothing lives only in memory: the indices below are caches of the API that kopf rebuilds at
start, and every write is idempotent. API errors become kopf.TemporaryError (retried, counted
in deeprad_reconcile_errors_total); what a user must fix becomes a condition.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

import kopf
import kubernetes
from kubernetes.client.exceptions import ApiException
from kubernetes.dynamic import DynamicClient
from pydantic import BaseModel

from deeprad.operator import metrics
from deeprad.operator.api import GROUP, VERSION
from deeprad.operator.api.common import Metrics
from deeprad.operator.api.federatedround import FederatedRoundSpec, FederatedRoundStatus
from deeprad.operator.api.federatedstudy import FederatedStudySpec, FederatedStudyStatus
from deeprad.operator.api.hospitalsite import HospitalSiteSpec, HospitalSiteStatus
from deeprad.operator.api.names import round_name, site_namespace
from deeprad.operator.decide import conditions as cond
from deeprad.operator.decide import sites as site_rules
from deeprad.operator.decide import study as study_rules
from deeprad.operator.render import rounds as round_render
from deeprad.operator.render import site as site_render
from deeprad.operator.render.meta import FIELD_MANAGER, Manifest
from deeprad.operator.settings import HubOptions

HOSPITAL_SITES = (GROUP, VERSION, "hospitalsites")
FEDERATED_STUDIES = (GROUP, VERSION, "federatedstudies")
FEDERATED_ROUNDS = (GROUP, VERSION, "federatedrounds")
_SA_TOKEN = Path("/var/run/secrets/kubernetes.io/serviceaccount/token")
M = TypeVar("M", bound=BaseModel)


# ---- the API client ---------------------------------------------------------------------------


def load_configuration(kubeconfig: str | None = None, context: str | None = None
                       ) -> kubernetes.client.Configuration:
    """Client configuration: the given kubeconfig/context, else in-cluster when running in a
    pod, else $KUBECONFIG or ~/.kube/config."""
    cfg = kubernetes.client.Configuration()
    in_cluster = bool(os.environ.get("KUBERNETES_SERVICE_HOST")) and _SA_TOKEN.exists()
    if kubeconfig or context or not in_cluster:
        kubernetes.config.load_kube_config(config_file=kubeconfig, context=context,
                                           client_configuration=cfg, persist_config=False)
    else:
        kubernetes.config.load_incluster_config(client_configuration=cfg)
    return cfg


def connection_info(cfg: kubernetes.client.Configuration) -> kopf.ConnectionInfo:
    """kopf's credentials from a loaded client configuration (as kopf's own client login
    does, but for the configuration we chose rather than the process default)."""
    header = cfg.get_api_key_with_prefix("BearerToken") or \
        cfg.get_api_key_with_prefix("authorization")
    parts = header.split(" ", 1) if header else []
    scheme, token = (None, None) if not parts else \
        (None, parts[0]) if len(parts) == 1 else (parts[0], parts[1])
    return kopf.ConnectionInfo(
        server=cfg.host, ca_path=cfg.ssl_ca_cert, insecure=not cfg.verify_ssl,
        username=cfg.username or None, password=cfg.password or None, scheme=scheme,
        token=token, certificate_path=cfg.cert_file, private_key_path=cfg.key_file)


class Kube:
    """The few API calls the hub makes, on the kubernetes client's dynamic client."""

    def __init__(self, cfg: kubernetes.client.Configuration) -> None:
        self._dyn = DynamicClient(kubernetes.client.ApiClient(cfg))

    def _resource(self, manifest: Manifest) -> Any:
        return self._dyn.resources.get(api_version=manifest["apiVersion"],
                                       kind=manifest["kind"])

    def apply(self, manifest: Manifest) -> dict[str, Any]:
        """Server-side apply as `deeprad-operator`, taking over fields others set."""
        meta = manifest["metadata"]
        out = self._dyn.server_side_apply(self._resource(manifest), body=manifest,
                                          name=meta["name"], namespace=meta.get("namespace"),
                                          field_manager=FIELD_MANAGER, force_conflicts=True)
        return dict(out.to_dict())

    def get(self, api_version: str, kind: str, name: str, namespace: str | None = None
            ) -> dict[str, Any] | None:
        """The object, or None when it does not exist."""
        res = self._dyn.resources.get(api_version=api_version, kind=kind)
        try:
            return dict(self._dyn.get(res, name=name, namespace=namespace).to_dict())
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise

    def create_or_get(self, manifest: Manifest) -> tuple[dict[str, Any], bool]:
        """Create the object; if the name is taken, the existing one. True when created."""
        meta = manifest["metadata"]
        try:
            out = self._dyn.create(self._resource(manifest), body=manifest,
                                   namespace=meta.get("namespace"),
                                   field_manager=FIELD_MANAGER)
            return dict(out.to_dict()), True
        except ApiException as exc:
            if exc.status != 409:
                raise
        existing = self.get(manifest["apiVersion"], manifest["kind"], meta["name"],
                            meta.get("namespace"))
        if existing is None:  # deleted between the two calls: the next pass creates it
            raise kopf.TemporaryError(f"{manifest['kind']} {meta['name']} was deleted while "
                                      "being created; retrying", delay=1)
        return existing, False


@dataclass
class HubMemo:
    """What every handler shares: the options and the API client (kopf's `memo`)."""

    options: HubOptions
    configuration: kubernetes.client.Configuration
    kube: Kube


@contextlib.contextmanager
def reconciling(kind: str, name: str) -> Iterator[None]:
    """Count errors of one reconcile pass; API errors become a TemporaryError naming the
    object, the call and the server's answer."""
    try:
        yield
    except ApiException as exc:
        metrics.RECONCILE_ERRORS.labels(kind=kind).inc()
        raise kopf.TemporaryError(f"{kind} {name}: API call failed ({exc.status} {exc.reason}):"
                                  f" {(exc.body or '')[:500]}", delay=5) from exc
    except Exception:
        metrics.RECONCILE_ERRORS.labels(kind=kind).inc()
        raise


def parse(model: type[M], data: Any) -> M:
    """A spec or status dict as its typed model; unknown status keys (other writers) are
    dropped, since the schema prunes them anyway."""
    raw = dict(data or {})
    keys = {f.alias or n for n, f in model.model_fields.items()} | set(model.model_fields)
    return model.model_validate({k: v for k, v in raw.items() if k in keys})


def now() -> datetime:
    return datetime.now(UTC)


# ---- HospitalSite -----------------------------------------------------------------------------


@dataclass(frozen=True)
class SiteFacts:
    """Index entry of one HospitalSite: what studies select and account by."""

    name: str
    labels: dict[str, str]
    sample_count: int | None


def reserve_site(kube: Kube, name: str, uid: str) -> None:
    """Apply the site's namespace, ServiceAccount, Role, RoleBinding and Lease."""
    for manifest in site_render.site_objects(name, uid):
        kube.apply(manifest)


def site_status(kube: Kube, name: str, generation: int | None, spec: HospitalSiteSpec,
                status: HospitalSiteStatus) -> HospitalSiteStatus:
    """The site's status from its Lease: heartbeat, agent report, Reachable and Ready."""
    lease = kube.get("coordination.k8s.io/v1", "Lease", site_render.AGENT, site_namespace(name))
    report = site_rules.read_lease(name, lease)
    observed = site_rules.observed_status(status, report)
    t = now()
    desired = site_rules.site_conditions(name, spec, observed, report, t)
    observed.conditions = cond.merge(status.conditions, desired, generation, t)
    observed.observed_generation = generation
    for d, gauge in zip(desired, (metrics.SITE_REACHABLE, metrics.SITE_READY), strict=True):
        gauge.labels(site=name).set(1 if d.status == "True" else 0)
    return observed


def _patch_status(patch: kopf.Patch, status: BaseModel) -> None:
    for key, value in status.model_dump(mode="json", exclude_none=True).items():
        patch.status[key] = value


# ---- FederatedStudy ---------------------------------------------------------------------------


@dataclass(frozen=True)
class OwnedRound:
    """Index entry of one FederatedRound that belongs to a study."""

    owner_uid: str | None
    view: study_rules.RoundView


def round_view(spec: FederatedRoundSpec, status: FederatedRoundStatus) -> study_rules.RoundView:
    """What decide.study needs from a round."""
    failed = cond.find(status.conditions, study_rules.FAILED)
    return study_rules.RoundView(
        number=spec.round, state=status.state, output_checkpoint=status.output_checkpoint,
        metrics=status.aggregate_metrics, epsilon=status.epsilon,
        failure=failed.message if failed and failed.status == "True" else None,
        sites={s.site: s.state for s in status.sites or ()},
        training=spec.training, data=spec.data, dp=spec.privacy.differential_privacy)


def candidates(spec: FederatedStudySpec, sites: list[SiteFacts]) -> list[study_rules.Candidate]:
    """The HospitalSites the study draws from."""
    if spec.sites:
        chosen = [s for s in sites if s.name in set(spec.sites)]
    else:
        chosen = [s for s in sites if site_rules.matches_selector(s.labels, spec.site_selector)]
    return [study_rules.Candidate(s.name, s.sample_count) for s in sorted(chosen,
                                                                           key=lambda s: s.name)]


def export_study(namespace: str, name: str, spec: FederatedStudySpec,
                 status: FederatedStudyStatus, latest: Metrics | None) -> None:
    """Study progress gauges."""
    labels = {"namespace": namespace, "study": name}
    metrics.STUDY_ROUNDS_COMPLETED.labels(**labels).set(status.completed_rounds or 0)
    metrics.STUDY_ROUNDS_PLANNED.labels(**labels).set(spec.rounds)
    if status.epsilon_spent is not None:
        metrics.STUDY_EPSILON_SPENT.labels(**labels).set(status.epsilon_spent)
    if latest is not None and latest.auroc is not None:
        metrics.GLOBAL_AUROC.labels(**labels).set(latest.auroc)
    if latest is not None and latest.loss is not None:
        metrics.GLOBAL_LOSS.labels(**labels).set(latest.loss)


def reconcile_study(kube: Kube, namespace: str, name: str, uid: str, generation: int | None,
                    spec: FederatedStudySpec, status: FederatedStudyStatus,
                    rounds: list[study_rules.RoundView], sites: list[SiteFacts],
                    body: kopf.Body) -> FederatedStudyStatus:
    """One pass over a study: decide, create the next round if due, return the status."""
    t = now()
    decision = study_rules.decide_study(name, generation, spec, status, rounds,
                                        candidates(spec, sites), t)
    action = decision.action
    new = decision.status
    if isinstance(action, study_rules.CreateRound):
        manifest = round_render.federated_round(name, namespace, uid, spec, action)
        obj, created = kube.create_or_get(manifest)
        owners = [o.get("uid") for o in obj.get("metadata", {}).get("ownerReferences") or ()]
        rn = round_name(name, action.number)
        if uid not in owners:
            new.conditions = cond.merge(new.conditions, [cond.Desired.false(
                study_rules.PROGRESSING, "RoundNameTaken",
                f"FederatedRound {namespace}/{rn} exists but does not belong to this study; "
                "delete or rename it so the study can create its round")], generation, t)
        elif created:
            metrics.ROUNDS_CREATED.labels(namespace=namespace, study=name).inc()
            kopf.event(body, type="Normal", reason="RoundCreated",
                      message=f"created FederatedRound {rn}"
                              + (f" from checkpoint {action.input_checkpoint.uri}"
                                 if action.input_checkpoint else " from a fresh model"))
    elif isinstance(action, study_rules.Stop) and status.completion_time is None:
        kind = "Normal" if action.outcome == study_rules.SUCCEEDED else "Warning"
        kopf.event(body, type=kind, reason=action.reason, message=action.message)
    succeeded = [r for r in sorted(rounds, key=lambda r: r.number)
                 if r.state == "Succeeded"]
    export_study(namespace, name, spec, new, succeeded[-1].metrics if succeeded else None)
    return new


# ---- registration -----------------------------------------------------------------------------


def build_registry(options: HubOptions) -> kopf.OperatorRegistry:
    """A registry with every hub handler; `kopf.run(registry=...)` runs them."""
    registry = kopf.OperatorRegistry()

    @kopf.on.login(registry=registry)
    def login(memo: Any, **_: Any) -> kopf.ConnectionInfo:
        return connection_info(memo.configuration)

    @kopf.index(*HOSPITAL_SITES, id="site_facts", registry=registry)
    def site_facts(name: str, labels: kopf.Labels, spec: kopf.Spec, **_: Any
                   ) -> dict[None, SiteFacts]:
        count = (spec.get("data") or {}).get("sampleCount")
        return {None: SiteFacts(name, dict(labels), count)}

    @kopf.index(*FEDERATED_ROUNDS, id="study_rounds", registry=registry)
    def study_rounds(namespace: str | None, spec: kopf.Spec, status: kopf.Status, meta: kopf.Meta,
                     **_: Any) -> dict[tuple[str, str], OwnedRound]:
        study = (spec.get("studyRef") or {}).get("name")
        if not study or namespace is None:
            return {}
        owner = next((o.get("uid") for o in meta.get("ownerReferences") or ()
                      if o.get("kind") == "FederatedStudy" and o.get("name") == study), None)
        view = round_view(parse(FederatedRoundSpec, spec), parse(FederatedRoundStatus, status))
        return {(namespace, study): OwnedRound(owner, view)}

    @kopf.on.resume(*HOSPITAL_SITES, id="site-reserve", registry=registry)
    @kopf.on.create(*HOSPITAL_SITES, id="site-reserve", registry=registry)
    @kopf.on.update(*HOSPITAL_SITES, id="site-reserve", registry=registry)
    def site_reserve(name: str, uid: str, meta: kopf.Meta, spec: kopf.Spec,
                     status: kopf.Status, patch: kopf.Patch, memo: Any, **_: Any) -> None:
        with reconciling("HospitalSite", name):
            reserve_site(memo.kube, name, uid)
            _patch_status(patch, site_status(memo.kube, name, meta.get("generation"),
                                             parse(HospitalSiteSpec, spec),
                                             parse(HospitalSiteStatus, status)))

    @kopf.timer(*HOSPITAL_SITES, id="site-heartbeat", interval=options.site_interval,
                registry=registry)
    def site_heartbeat(name: str, meta: kopf.Meta, spec: kopf.Spec, status: kopf.Status,
                       patch: kopf.Patch, memo: Any, **_: Any) -> None:
        with reconciling("HospitalSite", name):
            _patch_status(patch, site_status(memo.kube, name, meta.get("generation"),
                                             parse(HospitalSiteSpec, spec),
                                             parse(HospitalSiteStatus, status)))

    def study_pass(name: str, namespace: str, uid: str, meta: kopf.Meta, spec: kopf.Spec,
                   status: kopf.Status, patch: kopf.Patch, body: kopf.Body, memo: Any,
                   site_facts: kopf.Index[None, SiteFacts],
                   study_rounds: kopf.Index[tuple[str, str], OwnedRound]) -> None:
        with reconciling("FederatedStudy", f"{namespace}/{name}"):
            owned = [r.view for r in study_rounds.get((namespace, name), ())
                     if r.owner_uid == uid]
            new = reconcile_study(memo.kube, namespace, name, uid, meta.get("generation"),
                                  parse(FederatedStudySpec, spec),
                                  parse(FederatedStudyStatus, status), owned,
                                  list(site_facts.get(None, ())), body)
            _patch_status(patch, new)

    @kopf.on.resume(*FEDERATED_STUDIES, id="study", registry=registry)
    @kopf.on.create(*FEDERATED_STUDIES, id="study", registry=registry)
    @kopf.on.update(*FEDERATED_STUDIES, id="study", registry=registry)
    def study_changed(**kwargs: Any) -> None:
        study_pass(**_study_kwargs(kwargs))

    @kopf.timer(*FEDERATED_STUDIES, id="study-timer", interval=options.study_interval,
                registry=registry)
    def study_timer(**kwargs: Any) -> None:
        study_pass(**_study_kwargs(kwargs))

    return registry


_STUDY_KWARGS = ("name", "namespace", "uid", "meta", "spec", "status", "patch", "body", "memo",
                 "site_facts", "study_rounds")


def _study_kwargs(kwargs: dict[str, Any]) -> dict[str, Any]:
    return {k: kwargs[k] for k in _STUDY_KWARGS}


def make_memo(options: HubOptions, kubeconfig: str | None, context: str | None) -> HubMemo:
    """The shared memo: options, the chosen client configuration, its API client."""
    cfg = load_configuration(kubeconfig, context)
    return HubMemo(options=options, configuration=cfg, kube=Kube(cfg))


__all__ = ["HubMemo", "Kube", "build_registry", "make_memo"]

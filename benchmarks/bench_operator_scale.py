"""The hub operator at scale: N HospitalSites (default 1000) and one round over all of them.

A real control plane with kwok nodes and a real S3 server; the hub operator runs as in
production. The hospitals are faked by this script: it renews each site's heartbeat Lease once
(as an agent would) and later marks every work item Succeeded (as the agents would report).

Printed:
- time to reserve N sites (namespace, RBAC, Lease each) and for all N to become Ready;
- time from the round's creation to all N work items created (the issue's headline number);
- API requests per site for the round: the apiserver's request counters for SiteTasks,
  FederatedRounds and Jobs (reads and writes, not this script's LIST polling or watches), from
  the round's creation until all N work items exist, / N; and, for context, the background
  request rate of all clients just before the round, with its largest sources;
- time from the last report to the aggregator Job being created;
- while idle, the Lease reads per heartbeat interval (the heartbeat watches the Leases: O(1),
  not O(sites)) and the HospitalSite status writes per second;
- the operator's peak RSS (VmHWM), against the issue's goal of 250 MiB at 1000 sites.

The operator runs with the hub chart's glibc malloc settings (GLIBC_MALLOC): two arenas, and
blocks of 128 KiB and more mapped and returned at once. Without them, the large short-lived
buffers of watch events and LISTs (JSON bodies, parsed objects) stay in the heap as
fragmentation, and the peak RSS is mostly that.

Run: python benchmarks/bench_operator_scale.py [--sites N] [--glibc-default]
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import re
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from deeprad.core.checkpoint import write_checkpoint
from deeprad.core.identity import Identity
from deeprad.core.layout import StudyLayout
from deeprad.core.models import build_model, model_weights
from deeprad.core.protocol import ModelSpec
from deeprad.core.store.s3 import S3Store
from deeprad.devenv.binaries import missing_tools
from deeprad.devenv.cluster import Cluster, python_env, start_clusters
from deeprad.devenv.kube_rest import KubeClient
from deeprad.devenv.kwok_controller import KwokController, fake_gpu_node
from deeprad.devenv.ports import free_port
from deeprad.devenv.processes import ManagedProcess, new_owner_token, sweep_token
from deeprad.devenv.s3_server import S3Server

ROOT = Path(__file__).resolve().parents[1]
API = "/apis/deeprad.io/v1alpha1"
NS = "scale"
ROUND = "all-sites"
_COUNTER = re.compile(r"^apiserver_request_total\{([^}]*)\} ([0-9.e+]+)$", re.MULTILINE)
ROUND_RESOURCES = ("sitetasks", "federatedrounds", "jobs")
SITE_INTERVAL = 30.0  # the operator's --site-interval here
RSS_GOAL_MIB = 250  # issue #14: peak RSS at 1000 sites
# As helm/deeprad/templates/deployment.yaml sets them for the operator.
GLIBC_MALLOC = {"MALLOC_ARENA_MAX": "2", "MALLOC_MMAP_THRESHOLD_": "131072",
                "MALLOC_TRIM_THRESHOLD_": "131072"}


def _wait(what: str, check: Any, timeout: float, interval: float = 0.5) -> float:
    """Seconds until `check()` is truthy."""
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        if check():
            return time.monotonic() - start
        time.sleep(interval)
    raise SystemExit(f"timed out after {timeout:.0f}s waiting for {what}")


def _requests(hub: Cluster) -> dict[tuple[str, str], float]:
    """apiserver_request_total summed by (resource, verb)."""
    text = hub.kubectl("get", "--raw", "/metrics", timeout=60).stdout
    out: dict[tuple[str, str], float] = {}
    for labels, value in _COUNTER.findall(text):
        tags = dict(re.findall(r'(\w+)="([^"]*)"', labels))
        key = (tags.get("resource", ""), tags.get("verb", ""))
        out[key] = out.get(key, 0.0) + float(value)
    return out


def _delta(after: dict[tuple[str, str], float], before: dict[tuple[str, str], float]
           ) -> dict[tuple[str, str], float]:
    return {k: v - before.get(k, 0.0) for k, v in after.items() if v - before.get(k, 0.0) > 0}


def _peak_rss(pid: int, field: str = "VmHWM") -> int:
    """The process's peak (VmHWM) or current (VmRSS) resident set, in bytes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) * 1024
    return 0


def _site(name: str, keys: Identity) -> dict[str, Any]:
    pub = keys.public()
    return {"apiVersion": "deeprad.io/v1alpha1", "kind": "HospitalSite",
            "metadata": {"name": name, "labels": {"deeprad.io/bench": "scale"}},
            "spec": {"identity": {"signingKey": pub.signing_key,
                                  "keyAgreementKey": pub.key_agreement_key},
                     "connection": {"heartbeatTimeout": "30m"},
                     "data": {"modality": "mri", "sampleCount": 100},
                     "studyNamespaces": [NS]}}


def _renew(client: KubeClient, site: str) -> None:
    """What an agent does on its first heartbeat (update of its own Lease)."""
    path = f"/apis/coordination.k8s.io/v1/namespaces/deeprad-site-{site}/leases/deeprad-agent"
    lease = client.get(path)
    lease.setdefault("metadata", {})["annotations"] = {
        "deeprad.io/agent-version": "bench",
        "deeprad.io/observed-gpus": json.dumps({"resourceName": "nvidia.com/gpu",
                                                "capacity": 8, "allocatable": 8, "nodes": 1})}
    lease["spec"] = {"holderIdentity": f"{site}-agent", "leaseDurationSeconds": 1800,
                     "renewTime": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")}
    client.request("PUT", path, lease)


def _report(client: KubeClient, task: dict[str, Any]) -> None:
    meta = task["metadata"]
    path = f"{API}/namespaces/{meta['namespace']}/sitetasks/{meta['name']}/status"
    now = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    client.merge_patch(path, {"status": {"state": "Succeeded", "completionTime": now,
                                         "result": {"samples": 80, "durationSeconds": 1.0,
                                                    "updateDigest": "0" * 64}}})


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--sites", type=int, default=1000, help="HospitalSites (default 1000)")
    parser.add_argument("--workers", type=int, default=8, help="fake-agent threads")
    parser.add_argument("--glibc-default", action="store_true",
                        help="run the operator with glibc's default malloc settings instead "
                             "of the hub chart's")
    args = parser.parse_args()
    missing = missing_tools(("kube-apiserver", "etcd", "kubectl", "kwok", "versitygw"))
    if missing:
        print(f"tools missing ({', '.join(missing)}): run `make tools`", file=sys.stderr)
        return 2
    n = args.sites
    token = new_owner_token()
    work = Path(tempfile.mkdtemp(prefix="deeprad-bench-scale-"))
    hub = Cluster("scale-hub", work / "clusters", nodes=[], owner_token=token)
    s3 = S3Server(work / "s3", owner_token=token)
    operator: ManagedProcess | None = None
    try:
        start_clusters([hub])
        s3.start()
        s3.create_bucket("deeprad")
        client = hub.client()
        kwok = KwokController(hub).start()
        for i in range(4):
            client.create("/api/v1/nodes", fake_gpu_node(f"kwok-gpu-{i}"))
        hub.kubectl("apply", "--server-side", "-f", str(ROOT / "crds"))
        hub.kubectl("wait", "--for=condition=Established", "--timeout=60s",
                    "crd/hospitalsites.deeprad.io", "crd/federatedrounds.deeprad.io",
                    "crd/sitetasks.deeprad.io")
        hub.kubectl("create", "namespace", NS)
        hub.kubectl("create", "namespace", "deeprad-system")
        hub_id = Identity.generate("hub", "hub")
        keys = work / "hub-keys"
        hub_id.save(keys)
        store = S3Store("deeprad", "", s3.endpoint, s3.root.access_key, s3.root.secret_key,
                        secure=False)
        initial = model_weights(build_model(ModelSpec()))

        argv = [sys.executable, "-m", "deeprad.operator.cli", "--mode", "hub",
                "--kubeconfig", str(hub.kubeconfig), "--liveness", "",
                "--metrics-port", str(free_port()), "--metrics-address", "127.0.0.1",
                "--site-interval", str(SITE_INTERVAL), "--study-interval", "30",
                "--round-interval", "2",
                "--store", f"s3://deeprad?endpoint={s3.endpoint}&secure=false",
                "--jobs-namespace", "deeprad-system", "--hub-identity-secret", "hub-identity",
                "--store-credentials-secret", "store", "--hub-keys", str(keys)]
        env = {**python_env(), "DEEPRAD_S3_ACCESS_KEY": s3.root.access_key,
               "DEEPRAD_S3_SECRET_KEY": s3.root.secret_key}
        if not args.glibc_default:
            env.update(GLIBC_MALLOC)
        operator = ManagedProcess("bench-operator", argv, work / "operator.log", token,
                                  env=env, cwd=work).start()

        site_ids = [Identity.generate(f"s{i:04d}") for i in range(min(n, 16))]
        names = [f"s{i:04d}" for i in range(n)]
        t = time.monotonic()
        with concurrent.futures.ThreadPoolExecutor(args.workers) as pool:
            list(pool.map(lambda i: client.create(
                f"{API}/hospitalsites", _site(names[i], site_ids[i % len(site_ids)])),
                range(n)))
        created_s = time.monotonic() - t

        def leases() -> int:
            out = client.get("/apis/coordination.k8s.io/v1/leases",
                             labelSelector="app.kubernetes.io/component=site-agent")
            return len(out["items"])

        reserve_s = _wait(f"{n} site namespaces reserved", lambda: leases() >= n, 1800)
        phases = {"reserved": _peak_rss(operator.pid, "VmRSS")}
        with concurrent.futures.ThreadPoolExecutor(args.workers) as pool:
            list(pool.map(lambda s: _renew(client, s), names))

        def ready() -> int:
            return sum(1 for s in client.get(f"{API}/hospitalsites")["items"]
                       if any(c["type"] == "Ready" and c["status"] == "True"
                              for c in (s.get("status") or {}).get("conditions") or ()))

        ready_s = _wait(f"{n} sites Ready", lambda: ready() >= n, 1800, interval=2)
        phases["ready"] = _peak_rss(operator.pid, "VmRSS")

        # What the operator costs when nothing happens (heartbeat passes over every site).
        time.sleep(5)
        before, t_idle = _requests(hub), time.monotonic()
        time.sleep(20)
        idle = _delta(_requests(hub), before)
        idle_s = time.monotonic() - t_idle
        phases["idle"] = _peak_rss(operator.pid, "VmRSS")
        idle_rate = sum(idle.values()) / idle_s
        idle_top = sorted(idle.items(), key=lambda kv: -kv[1])[:4]
        lease_reads = sum(v for (res, verb), v in idle.items()
                          if res == "leases" and verb in ("GET", "LIST")) * SITE_INTERVAL / idle_s
        site_writes = sum(v for (res, verb), v in idle.items()
                          if res == "hospitalsites" and verb == "PATCH") / idle_s
        round_manifest = {"apiVersion": "deeprad.io/v1alpha1", "kind": "FederatedRound",
                          "metadata": {"name": ROUND, "namespace": NS},
                          "spec": {"round": 1, "model": {"name": "tumor-cnn"}, "minSites": 1,
                                   "deadline": "2h",
                                   "privacy": {"secureAggregation": False}}}
        before = _requests(hub)
        rnd = client.create(f"{API}/namespaces/{NS}/federatedrounds", round_manifest)
        uid = rnd["metadata"]["uid"]
        # The round's input, signed by the hub (what its prepare Job would write), under the
        # keys of this round's uid (a hand-made round owns its store keys).
        write_checkpoint(store, StudyLayout(NS, ROUND, uid), {
            "study": ROUND, "round": 0, "model": ModelSpec(), "producer": "bench",
            "parent_sha256": None}, initial, hub=hub_id)

        def tasks() -> list[dict[str, Any]]:
            return list(client.get(f"{API}/sitetasks",
                                   labelSelector=f"deeprad.io/round-uid={uid}")["items"])

        tasks_s = _wait(f"{n} work items", lambda: len(tasks()) >= n, 1800, interval=0.5)
        phases["fanned-out"] = _peak_rss(operator.pid, "VmRSS")
        spent = _delta(_requests(hub), before)
        round_requests = sum(v for (res, verb), v in spent.items()
                             if res in ROUND_RESOURCES and verb not in ("LIST", "WATCH"))
        # The sites report; the round moves on to aggregation.
        t1 = time.monotonic()
        with concurrent.futures.ThreadPoolExecutor(args.workers) as pool:
            list(pool.map(lambda task: _report(client, task), tasks()))
        report_s = time.monotonic() - t1

        def aggregating() -> bool:
            jobs = client.get("/apis/batch/v1/namespaces/deeprad-system/jobs")["items"]
            return any(j["metadata"]["name"].endswith("-aggregate") for j in jobs)

        aggregate_s = _wait("the aggregator Job", aggregating, 1800)

        def round_status() -> dict[str, Any]:
            return dict(client.get(f"{API}/namespaces/{NS}/federatedrounds/{ROUND}")["status"])

        _wait("the round's status to count every report",
              lambda: round_status().get("reportedSites") == n, 120)
        status = round_status()
        rss = _peak_rss(operator.pid)
        phases["aggregating"] = _peak_rss(operator.pid, "VmRSS")
        kwok.stop()
    finally:
        if operator is not None:
            operator.stop()
        s3.stop()
        hub.stop()
        sweep_token(token)

    print(f"\nOperator scale, {n} HospitalSites, one round over all of them")
    print(f"  {n} HospitalSites created by the script:          {created_s:8.1f} s")
    print(f"  all reserved (namespace, RBAC, Lease each):        {reserve_s:8.1f} s")
    print(f"  all Ready after one heartbeat each:                 {ready_s:8.1f} s")
    print(f"  fan-out: round created -> {n} work items created: {tasks_s:8.1f} s")
    print(f"  API requests for the round in that window, per site: {round_requests / n:7.2f}"
          "  (SiteTasks, FederatedRounds, Jobs)")
    print(f"  background API requests before the round (all clients): {idle_rate:.1f}/s; largest: "
          + ", ".join(f"{verb} {res} {v / idle_s:.1f}/s" for (res, verb), v in idle_top))
    print(f"  {n} reports by the fake sites:                     {report_s:8.1f} s")
    print(f"  last report -> aggregator Job created:              {aggregate_s:8.1f} s")
    print(f"  round status: admitted {status.get('admittedSites')}, "
          f"reported {status.get('reportedSites')}, state {status.get('state')}")
    print(f"  idle: Lease reads per heartbeat interval ({SITE_INTERVAL:.0f} s):  "
          f"{lease_reads:8.1f}  (the heartbeat watches the Leases)")
    print(f"  idle: HospitalSite status writes:                   {site_writes:8.1f} /s")
    malloc = "glibc default" if args.glibc_default else "chart's malloc settings"
    print(f"  operator peak RSS ({malloc}):      {rss / 2**20:8.0f} MiB"
          f"  (goal at 1000 sites: <= {RSS_GOAL_MIB} MiB)")
    print("  operator RSS after each phase: " + ", ".join(
        f"{phase} {value / 2**20:.0f} MiB" for phase, value in phases.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())

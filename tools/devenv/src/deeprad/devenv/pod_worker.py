"""Runs one Pod bound to a node-agent node, from Pending to its final phase and its deletion.

What kubelet would do, minus containers: prepare volumes and env, run init containers in order,
run the containers as local process groups, restart them per restartPolicy (backoff 1 s doubling
to 60 s, shorter than kubelet's 10 s to 5 min so tests stay fast), enforce activeDeadlineSeconds,
report status, and on deletion stop the processes within the grace period and remove the Pod.
Each container gets an empty file at its terminationMessagePath (a host file, like every
mount); what the process wrote there becomes its terminated state's message, or with
FallbackToLogsOnError and a failed exit the log's tail, as kubelet does.
Probes and resource limits are not enforced.
"""

from __future__ import annotations

import logging
import os
import shutil
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from deeprad.devenv.container_process import ContainerProcess, now_rfc3339
from deeprad.devenv.kube_rest import ApiError, KubeClient
from deeprad.devenv.kubeconfig import write_kubeconfig
from deeprad.devenv.pod_env import EnvResolver, command_line, field_value
from deeprad.devenv.pod_volumes import TOKEN_REFRESH_SECONDS, PathMap, PodSetupError, VolumeBuilder
from deeprad.devenv.processes import OWNER_ENV

if TYPE_CHECKING:
    from deeprad.devenv.node_agent import NodeAgent

JSON = dict[str, Any]
log = logging.getLogger(__name__)

SA_MOUNT = "/var/run/secrets/kubernetes.io/serviceaccount"
TERMINATION_MESSAGE_PATH = "/dev/termination-log"  # the container's default
TERMINATION_MESSAGE_BYTES = 4096  # kubelet's limit on a message
FALLBACK_LOG_LINES, FALLBACK_LOG_BYTES = 80, 2048  # what FallbackToLogsOnError takes
_PASSTHROUGH_ENV = ("PATH", "HOME", "LANG", "LC_ALL", "TZ", "PYTHONPATH", "VIRTUAL_ENV",
                    "SSL_CERT_FILE", "DEEPRAD_TOOLS_DIR")
_TICK = 0.2


@dataclass
class ContainerState:
    """Status bookkeeping of one container across its restarts."""

    spec: JSON
    init: bool = False
    process: ContainerProcess | None = None
    restart_count: int = 0
    state: JSON = field(default_factory=lambda: {"waiting": {"reason": "ContainerCreating"}})
    last_state: JSON = field(default_factory=dict)
    restart_at: float | None = None
    done: bool = False  # terminated and will not be restarted
    gpu_ids: list[int] = field(default_factory=list)

    @property
    def name(self) -> str:
        return str(self.spec["name"])

    def status(self, pod_uid: str) -> JSON:
        running = "running" in self.state
        out: JSON = {
            "name": self.name,
            "image": self.spec.get("image", ""),
            "imageID": f"devenv://{self.spec.get('image', '')}",
            "ready": running,
            "started": running,
            "restartCount": self.restart_count,
            "state": self.state,
            "lastState": self.last_state,
        }
        if self.process is not None:
            out["containerID"] = f"devenv://{pod_uid}/{self.name}/{self.restart_count}"
        return out


class PodWorker(threading.Thread):
    """One thread per Pod; fed with the latest Pod object by the agent's watch."""

    def __init__(self, agent: NodeAgent, pod: JSON) -> None:
        meta = pod["metadata"]
        super().__init__(name=f"pod-{meta['namespace']}/{meta['name']}", daemon=True)
        self.agent = agent
        self.client: KubeClient = agent.client
        self.pod = pod
        self.uid: str = meta["uid"]
        self.ns: str = meta["namespace"]
        self.pod_name: str = meta["name"]
        self.node: str = pod["spec"]["nodeName"]
        self.dir = agent.pods_dir / f"{self.ns}_{self.pod_name}_{self.uid}"
        self._wake = threading.Event()
        self._gone = False
        spec = pod["spec"]
        self.init_containers = [ContainerState(c, init=True)
                                for c in spec.get("initContainers", [])]
        self.containers = [ContainerState(c) for c in spec.get("containers", [])]
        self.phase = "Pending"
        self.reason: str | None = None
        self.message: str | None = None
        self.start_time = now_rfc3339()
        self._started_monotonic = time.monotonic()
        self._conditions: dict[str, tuple[str, str]] = {}
        self._last_status: JSON | None = None
        self._volumes: VolumeBuilder | None = None

    # -- fed by the agent ----------------------------------------------------------------------

    def update(self, pod: JSON | None) -> None:
        """The latest Pod object, or None when it is gone from the API."""
        if pod is None:
            self._gone = True
        else:
            self.pod = pod
        self._wake.set()

    def container(self, name: str) -> ContainerState | None:
        """A container (or init container) by name, for the log server."""
        return next((c for c in self.init_containers + self.containers if c.name == name), None)

    def log_path(self, name: str, previous: bool = False) -> Path | None:
        """The log file of a container's current (or previous) run."""
        c = self.container(name)
        if c is None:
            return None
        run = c.restart_count - (1 if previous else 0)
        if run < 0:
            return None
        return self.dir / "logs" / name / f"{run}.log"

    def running(self, name: str) -> bool:
        """Whether a container is running now (log followers stop when it is not)."""
        c = self.container(name)
        return c is not None and c.process is not None and c.process.finished_at is None

    # -- lifecycle -----------------------------------------------------------------------------

    @property
    def _deleting(self) -> bool:
        return self._gone or bool(self.pod["metadata"].get("deletionTimestamp"))

    def run(self) -> None:
        try:
            if self._prepare() and self._run_init_containers():
                self._run_containers()
        except Exception as exc:
            log.exception("pod %s/%s failed in the agent", self.ns, self.pod_name)
            self._finish("Failed", "DevenvAgentError", str(exc))
        self._stop_all(grace=self._grace())
        self._await_deletion()
        self._release_gpus()
        self.agent.forget(self.uid)
        shutil.rmtree(self.dir / "volumes", ignore_errors=True)

    def _prepare(self) -> bool:
        """Volumes and the pod folder; waits (status ContainerCreating) while refs are missing."""
        if self._deleting:
            return False  # deleted before it ever ran: only confirm the deletion
        self.dir.mkdir(parents=True, exist_ok=True)
        (self.dir / "tmp").mkdir(exist_ok=True)
        self._push_status()
        while not self._deleting:
            try:
                self._volumes = VolumeBuilder(self.client, self.pod, self.dir,
                                              lambda p: field_value(self.pod, p))
                self._volumes.build_all()
                return True
            except PodSetupError as exc:
                for c in self.init_containers + self.containers:
                    c.state = {"waiting": {"reason": "ContainerCreating", "message": str(exc)}}
                self._push_status()
                self._wake.wait(2.0)
                self._wake.clear()
        return False

    def _run_init_containers(self) -> bool:
        policy = self.pod["spec"].get("restartPolicy", "Always")
        for c in self.init_containers:
            while True:
                if not self._start(c):
                    return False
                code = self._wait_exit(c)
                if code is None:
                    return False  # deleted or deadline
                if code == 0:
                    break
                if policy == "Never":
                    self._finish("Failed", None, f"init container {c.name} exited {code}")
                    return False
                if not self._sleep_backoff(c):
                    return False
        return True

    def _run_containers(self) -> None:
        for c in self.containers:
            if not self._start(c):
                return
        policy = self.pod["spec"].get("restartPolicy", "Always")
        last_token_refresh = time.monotonic()
        while True:
            if self._deleting or self._deadline_exceeded():
                return
            now = time.monotonic()
            for c in self.containers:
                if c.restart_at is not None and now >= c.restart_at:
                    c.restart_at = None
                    if not self._start(c):
                        return
                    continue
                if c.process is None or c.done or c.restart_at is not None:
                    continue
                code = c.process.poll()
                if code is None:
                    continue
                self._record_exit(c, code)
                if policy == "Always" or (policy == "OnFailure" and code != 0):
                    self._schedule_restart(c)
                else:
                    c.done = True
            if all(c.done for c in self.containers):
                failed = any(c.state["terminated"]["exitCode"] != 0 for c in self.containers)
                self._finish("Failed" if failed else "Succeeded", None, None)
                return
            if self._volumes and now - last_token_refresh > TOKEN_REFRESH_SECONDS:
                last_token_refresh = now
                self._volumes.refresh_tokens()
            self._push_status()
            self._wake.wait(_TICK)
            self._wake.clear()

    # -- containers ----------------------------------------------------------------------------

    def _start(self, c: ContainerState) -> bool:
        """Start one run of c; on a config error report it and keep retrying."""
        while not self._deleting:
            try:
                argv, env, cwd = self._exec_plan(c)
                log_path = self.dir / "logs" / c.name / f"{c.restart_count}.log"
                c.process = ContainerProcess(argv, env, cwd, log_path)
                c.state = {"running": {"startedAt": c.process.started_at}}
                if self.phase == "Pending" and not c.init:
                    self.phase = "Running"
                self._push_status()
                return True
            except (PodSetupError, OSError) as exc:
                reason = ("CreateContainerConfigError" if isinstance(exc, PodSetupError)
                          else "RunContainerError")
                c.state = {"waiting": {"reason": reason, "message": str(exc)}}
                self._push_status()
                self._wake.wait(2.0)
                self._wake.clear()
        return False

    def _exec_plan(self, c: ContainerState) -> tuple[list[str], dict[str, str], Path]:
        assert self._volumes is not None
        paths = self._volumes.path_map(c.spec)
        message_file = self._termination_file(c)
        message_file.parent.mkdir(parents=True, exist_ok=True)
        message_file.write_bytes(b"")
        paths.add(c.spec.get("terminationMessagePath") or TERMINATION_MESSAGE_PATH, message_file)
        base = self._base_env(c, paths)
        env = EnvResolver(self.client, self.pod).resolve(c.spec, base)
        # Only the pod's own values name paths inside the pod; the agent's (KUBECONFIG, TMPDIR,
        # the passthrough PATH...) are host paths already, even when they lie under a mount
        # path such as /tmp.
        env = {k: v if base.get(k) == v else paths.rewrite(v) for k, v in env.items()}
        env[OWNER_ENV] = self.agent.config.owner_token  # swept at teardown, whatever happens
        argv = command_line(c.spec, env, paths.rewrite)
        return argv, env, self._working_dir(c, paths)

    def _base_env(self, c: ContainerState, paths: PathMap) -> dict[str, str]:
        config = self.agent.config
        env = {k: os.environ[k] for k in _PASSTHROUGH_ENV if k in os.environ}
        port = str(config.api_port)
        env |= {
            "HOSTNAME": self.pod["spec"].get("hostname") or self.pod_name,
            "TMPDIR": str(self.dir / "tmp"),
            "KUBERNETES_SERVICE_HOST": config.api_host,
            "KUBERNETES_SERVICE_PORT": port,
            "KUBERNETES_SERVICE_PORT_HTTPS": port,
            "KUBERNETES_PORT": f"tcp://{config.api_host}:{port}",
            "DEEPRAD_DEVENV_POD": f"{self.ns}/{self.pod_name}",
            "DEEPRAD_DEVENV_POD_DIR": str(self.dir),
        }
        sa_dir = paths.host_path(SA_MOUNT)
        if sa_dir is not None:
            # In-cluster config reads a fixed path that cannot be rewritten inside a library;
            # a kubeconfig with the pod's token file gives the same identity to any client.
            kubeconfig = {
                "apiVersion": "v1", "kind": "Config", "current-context": "pod",
                "clusters": [{"name": "pod", "cluster": {
                    "server": f"https://{config.api_host}:{port}",
                    "certificate-authority": str(sa_dir / "ca.crt")}}],
                "users": [{"name": "pod", "user": {"tokenFile": str(sa_dir / "token")}}],
                "contexts": [{"name": "pod", "context": {"cluster": "pod", "user": "pod",
                                                          "namespace": self.ns}}],
            }
            env["KUBECONFIG"] = str(write_kubeconfig(self.dir / "kubeconfig", kubeconfig))
        gpus = self._gpu_request(c.spec)
        if gpus and not c.gpu_ids:
            c.gpu_ids = self.agent.allocate_gpus(self.node, gpus)
        if c.gpu_ids:
            env["NVIDIA_VISIBLE_DEVICES"] = ",".join(f"GPU-{self.node}-{i}" for i in c.gpu_ids)
            env["DEEPRAD_DEVENV_GPU_IDS"] = ",".join(str(i) for i in c.gpu_ids)
        return env

    @staticmethod
    def _gpu_request(spec: JSON) -> int:
        resources = spec.get("resources") or {}
        value = (resources.get("limits") or {}).get("nvidia.com/gpu") or \
            (resources.get("requests") or {}).get("nvidia.com/gpu") or 0
        return int(value)

    def _working_dir(self, c: ContainerState, paths: PathMap) -> Path:
        wd = c.spec.get("workingDir")
        if not wd:
            folder = self.dir / "work"
        elif (mapped := paths.host_path(wd)) is not None:
            folder = mapped
        elif Path(wd).is_dir():
            folder = Path(wd)
        else:
            folder = self.dir / "rootfs" / wd.lstrip("/")
        folder.mkdir(parents=True, exist_ok=True)
        return folder

    def _wait_exit(self, c: ContainerState) -> int | None:
        assert c.process is not None
        while not self._deleting and not self._deadline_exceeded():
            code = c.process.poll()
            if code is not None:
                self._record_exit(c, code)
                return code
            self._wake.wait(_TICK)
            self._wake.clear()
        return None

    def _termination_file(self, c: ContainerState) -> Path:
        return self.dir / "termination" / c.name / str(c.restart_count)

    def _termination_message(self, c: ContainerState, code: int) -> str:
        """What the run wrote to its terminationMessagePath; with FallbackToLogsOnError and a
        failed exit, the log's last lines when it wrote nothing."""
        try:
            with self._termination_file(c).open("rb") as f:
                text = f.read(TERMINATION_MESSAGE_BYTES).decode("utf-8", "replace")
        except OSError:
            text = ""
        if text.strip() or code == 0 or \
                c.spec.get("terminationMessagePolicy") != "FallbackToLogsOnError":
            return text
        assert c.process is not None
        try:
            lines = c.process.log_path.read_bytes().splitlines()[-FALLBACK_LOG_LINES:]
        except OSError:
            return ""
        # CRI log lines: `<time> <stream> <tag> <text>`; the message is the text alone.
        texts = [line.split(b" ", 3)[3] if line.count(b" ") >= 3 else b"" for line in lines]
        return b"\n".join(texts)[-FALLBACK_LOG_BYTES:].decode("utf-8", "replace")

    def _record_exit(self, c: ContainerState, code: int) -> None:
        assert c.process is not None
        c.state = {"terminated": {
            "exitCode": code,
            "reason": "Completed" if code == 0 else "Error",
            "startedAt": c.process.started_at,
            "finishedAt": c.process.finished_at or now_rfc3339(),
            "containerID": f"devenv://{self.uid}/{c.name}/{c.restart_count}",
        }}
        message = self._termination_message(c, code)
        if message:
            c.state["terminated"]["message"] = message
        self._push_status()

    def _schedule_restart(self, c: ContainerState) -> None:
        delay = min(60.0, 2.0 ** min(c.restart_count, 6))
        c.last_state = c.state
        c.restart_count += 1
        c.state = {"waiting": {"reason": "CrashLoopBackOff",
                               "message": f"back-off {delay:.0f}s restarting container"}}
        c.restart_at = time.monotonic() + delay
        self._push_status()

    def _sleep_backoff(self, c: ContainerState) -> bool:
        self._schedule_restart(c)
        assert c.restart_at is not None
        while time.monotonic() < c.restart_at:
            if self._deleting or self._deadline_exceeded():
                return False
            self._wake.wait(_TICK)
            self._wake.clear()
        c.restart_at = None
        return True

    def _deadline_exceeded(self) -> bool:
        deadline = self.pod["spec"].get("activeDeadlineSeconds")
        if deadline is None or self.phase in ("Succeeded", "Failed"):
            return False
        if time.monotonic() - self._started_monotonic < float(deadline):
            return False
        self._stop_all(grace=0)
        self._finish("Failed", "DeadlineExceeded",
                     f"Pod was active on the node longer than the specified deadline "
                     f"({deadline}s)")
        return True

    def stop_processes(self, grace: float) -> None:
        """Stop every running container of this pod (agent shutdown)."""
        self._stop_all(grace)

    def _stop_all(self, grace: float) -> None:
        for c in self.init_containers + self.containers:
            if c.process is not None and c.process.finished_at is None:
                c.process.terminate(grace)
                code = c.process.poll()
                if code is not None and "terminated" not in c.state:
                    self._record_exit(c, code)

    def _grace(self) -> float:
        meta, spec = self.pod["metadata"], self.pod["spec"]
        value = meta.get("deletionGracePeriodSeconds", spec.get("terminationGracePeriodSeconds"))
        return float(30 if value is None else value)

    def _release_gpus(self) -> None:
        for c in self.init_containers + self.containers:
            if c.gpu_ids:
                self.agent.release_gpus(self.node, c.gpu_ids)
                c.gpu_ids = []

    # -- status and deletion -------------------------------------------------------------------

    def _finish(self, phase: str, reason: str | None, message: str | None) -> None:
        if self.phase in ("Succeeded", "Failed"):
            return
        self.phase, self.reason, self.message = phase, reason, message
        self._push_status()

    def _await_deletion(self) -> None:
        """A finished Pod stays until deleted; then confirm deletion as kubelet does."""
        while not self._deleting:
            self._wake.wait(5.0)
            self._wake.clear()
        if self._gone:
            return
        self._release_gpus()
        try:
            self.client.delete(
                f"/api/v1/namespaces/{self.ns}/pods/{self.pod_name}",
                {"apiVersion": "v1", "kind": "DeleteOptions", "gracePeriodSeconds": 0,
                 "preconditions": {"uid": self.uid}},
            )
        except ApiError as exc:
            if exc.status not in (404, 409):
                log.warning("deleting pod %s/%s: %s", self.ns, self.pod_name, exc)

    def _condition(self, kind: str, status: bool, reason: str | None = None) -> JSON:
        value = "True" if status else "False"
        previous = self._conditions.get(kind)
        if previous is None or previous[0] != value:
            self._conditions[kind] = (value, now_rfc3339())
        cond: JSON = {"type": kind, "status": value,
                      "lastTransitionTime": self._conditions[kind][1]}
        if reason and not status:
            cond["reason"] = reason
        return cond

    def _push_status(self) -> None:
        finished = self.phase in ("Succeeded", "Failed")
        init_done = all("terminated" in c.state and c.state["terminated"]["exitCode"] == 0
                        for c in self.init_containers)
        ready = not finished and all("running" in c.state for c in self.containers)
        not_ready_reason = "PodCompleted" if finished else "ContainersNotReady"
        status: JSON = {
            "phase": self.phase,
            "hostIP": "127.0.0.1", "hostIPs": [{"ip": "127.0.0.1"}],
            "podIP": "127.0.0.1", "podIPs": [{"ip": "127.0.0.1"}],
            "startTime": self.start_time,
            "qosClass": self.pod.get("status", {}).get("qosClass"),
            "conditions": [
                self._condition("PodReadyToStartContainers", self._volumes is not None),
                self._condition("Initialized", init_done or finished,
                                "ContainersNotInitialized"),
                self._condition("Ready", ready, not_ready_reason),
                self._condition("ContainersReady", ready, not_ready_reason),
                self._condition("PodScheduled", True),
            ],
            "containerStatuses": [c.status(self.uid) for c in self.containers],
            "reason": self.reason,
            "message": self.message,
        }
        if self.init_containers:
            status["initContainerStatuses"] = [c.status(self.uid) for c in self.init_containers]
        if status == self._last_status or self._gone:
            return
        try:
            self.client.merge_patch(
                f"/api/v1/namespaces/{self.ns}/pods/{self.pod_name}/status",
                {"metadata": {"uid": self.uid}, "status": status},
            )
            self._last_status = status
        except ApiError as exc:
            if exc.status == 404:
                self._gone = True
            else:
                log.warning("status of pod %s/%s: %s", self.ns, self.pod_name, exc)
        except OSError as exc:
            log.warning("status of pod %s/%s: %s", self.ns, self.pod_name, exc)

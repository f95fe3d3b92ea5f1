"""A tiny provisioner: every claim of the devenv StorageClass gets a folder-backed volume.

The agent creates a default StorageClass whose provisioner is this loop. For each pending claim
of that class it creates a hostPath PersistentVolume pre-bound to the claim (the real PV
controller in kube-controller-manager then binds the pair); released volumes and their folders
are removed. A pod using the claim gets the folder (see pod_volumes).
"""

from __future__ import annotations

import logging
import shutil
import threading
from pathlib import Path
from typing import Any

from deeprad.devenv.kube_rest import ApiError, KubeClient

JSON = dict[str, Any]
log = logging.getLogger(__name__)

PROVISIONER = "devenv.deeprad.io/hostpath"


def ensure_storage_class(client: KubeClient, name: str) -> None:
    """Create the default StorageClass served by this provisioner, if missing."""
    body = {
        "apiVersion": "storage.k8s.io/v1", "kind": "StorageClass",
        "metadata": {"name": name, "annotations": {
            "storageclass.kubernetes.io/is-default-class": "true"}},
        "provisioner": PROVISIONER,
        "reclaimPolicy": "Delete",
        "volumeBindingMode": "Immediate",
    }
    try:
        client.create("/apis/storage.k8s.io/v1/storageclasses", body)
    except ApiError as exc:
        if exc.status != 409:
            raise


class PvcProvisioner(threading.Thread):
    """Polls claims and volumes every few seconds (few objects; simpler than two watches)."""

    def __init__(self, client: KubeClient, storage_class: str, root: Path,
                 stop: threading.Event) -> None:
        super().__init__(name="pvc-provisioner", daemon=True)
        self.client = client
        self.storage_class = storage_class
        self.root = root
        self.stop = stop

    def run(self) -> None:
        while not self.stop.wait(1.0):
            try:
                self.sync()
            except (ApiError, OSError) as exc:
                log.warning("provisioner: %s", exc)

    def sync(self) -> None:
        """One pass: provision pending claims, delete released volumes."""
        claims = self.client.get("/api/v1/persistentvolumeclaims")["items"]
        for claim in claims:
            spec = claim["spec"]
            if spec.get("volumeName") or spec.get("storageClassName") != self.storage_class:
                continue
            self._provision(claim)
        for pv in self.client.get("/api/v1/persistentvolumes")["items"]:
            annotations = pv["metadata"].get("annotations") or {}
            if (annotations.get("pv.kubernetes.io/provisioned-by") == PROVISIONER
                    and pv.get("status", {}).get("phase") in ("Released", "Failed")):
                self.client.delete(f"/api/v1/persistentvolumes/{pv['metadata']['name']}")
                shutil.rmtree(pv["spec"]["hostPath"]["path"], ignore_errors=True)

    def _provision(self, claim: JSON) -> None:
        meta, spec = claim["metadata"], claim["spec"]
        name = f"pvc-{meta['uid']}"
        folder = self.root / name
        folder.mkdir(parents=True, exist_ok=True)
        size = spec.get("resources", {}).get("requests", {}).get("storage", "1Gi")
        body = {
            "apiVersion": "v1", "kind": "PersistentVolume",
            "metadata": {"name": name, "annotations": {
                "pv.kubernetes.io/provisioned-by": PROVISIONER}},
            "spec": {
                "capacity": {"storage": size},
                "accessModes": spec.get("accessModes", ["ReadWriteOnce"]),
                "persistentVolumeReclaimPolicy": "Retain",  # this loop deletes, not the PV ctrl
                "storageClassName": self.storage_class,
                "volumeMode": spec.get("volumeMode", "Filesystem"),
                "hostPath": {"path": str(folder), "type": "DirectoryOrCreate"},
                "claimRef": {"apiVersion": "v1", "kind": "PersistentVolumeClaim",
                             "namespace": meta["namespace"], "name": meta["name"],
                             "uid": meta["uid"]},
            },
        }
        try:
            self.client.create("/api/v1/persistentvolumes", body)
        except ApiError as exc:
            if exc.status != 409:
                raise

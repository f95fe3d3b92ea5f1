"""A real S3 server for tests and `deeprad dev`: the Versity S3 gateway (Apache-2.0) over a local
folder, spoken to through the `minio` client exactly as production speaks to MinIO.

The gateway runs with a root account, an internal IAM store (so extra accounts can be created)
and its admin API on a second loopback port.
"""

from __future__ import annotations

import secrets
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from minio import Minio

from deeprad.devenv import binaries
from deeprad.devenv.ports import free_port, port_open
from deeprad.devenv.processes import ManagedProcess, new_owner_token, wait_until


@dataclass(frozen=True)
class S3Credentials:
    """An access key pair."""

    access_key: str
    secret_key: str


class S3Server:
    """start() → endpoint ready; create_bucket / create_user; stop() removes the process."""

    def __init__(self, state_dir: Path, owner_token: str | None = None,
                 region: str = "us-east-1") -> None:
        self.dir = state_dir
        self.port = free_port()
        self.admin_port = free_port()
        self.region = region
        self.root = S3Credentials("devenv-root", secrets.token_hex(16))
        self.owner_token = owner_token or new_owner_token()
        self.process: ManagedProcess | None = None

    @property
    def endpoint(self) -> str:
        """host:port, as the minio client wants it (plain HTTP on loopback)."""
        return f"127.0.0.1:{self.port}"

    @property
    def url(self) -> str:
        """http://host:port, for S3 clients that take a URL."""
        return f"http://{self.endpoint}"

    def start(self, timeout: float = 30.0) -> S3Server:
        """Start the gateway and wait until it accepts connections."""
        data, meta, iam = self.dir / "data", self.dir / "meta", self.dir / "iam"
        for folder in (data, meta, iam):
            folder.mkdir(parents=True, exist_ok=True)
        argv = [
            binaries.tool("versitygw"),
            "--access", self.root.access_key, "--secret", self.root.secret_key,
            "--region", self.region,
            "--port", f"127.0.0.1:{self.port}",
            "--admin-port", f"127.0.0.1:{self.admin_port}",
            "--iam-dir", str(iam),
            "posix", "--sidecar", str(meta), str(data),
        ]
        self.process = ManagedProcess("versitygw", argv, self.dir / "versitygw.log",
                                      self.owner_token).start()
        proc = self.process

        def up() -> bool:
            if not proc.alive():
                raise RuntimeError(f"versitygw exited:\n{proc.log_tail()}")
            return port_open(self.port) and port_open(self.admin_port)

        wait_until(up, timeout, "S3 gateway port")
        return self

    def stop(self) -> None:
        """Stop the gateway (data stays in the state folder)."""
        if self.process is not None:
            self.process.stop()
            self.process = None

    def client(self, credentials: S3Credentials | None = None) -> Minio:
        """A minio client for this server (root account unless credentials are given)."""
        creds = credentials or self.root
        return Minio(self.endpoint, access_key=creds.access_key, secret_key=creds.secret_key,
                     secure=False, region=self.region)

    def create_bucket(self, name: str, owner: S3Credentials | None = None) -> None:
        """Create a bucket (idempotent); hand it to owner if given."""
        client = self.client()
        if not client.bucket_exists(name):
            client.make_bucket(name)
        if owner is not None:
            self._admin("change-bucket-owner", "--bucket", name, "--owner", owner.access_key)

    def create_user(self, access_key: str, secret_key: str | None = None,
                    role: str = "user") -> S3Credentials:
        """Create an account (role user, userplus or admin); returns its credentials."""
        creds = S3Credentials(access_key, secret_key or secrets.token_hex(16))
        self._admin("create-user", "--access", creds.access_key, "--secret", creds.secret_key,
                    "--role", role)
        return creds

    def _admin(self, *args: str) -> None:
        cmd = [
            binaries.tool("versitygw"), "admin",
            "--access", self.root.access_key, "--secret", self.root.secret_key,
            "--region", self.region,
            "--endpoint-url", f"http://127.0.0.1:{self.admin_port}", *args,
        ]
        result = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
        if result.returncode != 0:
            raise RuntimeError(f"versitygw admin {args[0]} failed: {result.stderr}{result.stdout}")

    def info(self) -> dict[str, Any]:
        """A JSON-ready summary (root credentials included: test data only)."""
        return {
            "endpoint": self.url,
            "admin_endpoint": f"http://127.0.0.1:{self.admin_port}",
            "region": self.region,
            "access_key": self.root.access_key,
            "secret_key": self.root.secret_key,
            "pid": self.process.pid if self.process else None,
        }

"""A real S3-compatible server process for tests: ``moto_server`` (the moto package's S3
emulator, from PyPI) on a free loopback port. It is an emulator, not AWS: it speaks the S3
HTTP API (SigV4, presigned URLs, Range), which is what the ``s3`` bundle store relies on;
AWS-only behaviour (IAM policies, bucket encryption, real latency) is not exercised here."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path
from types import TracebackType
from typing import Any

import httpx

from tests.broker import free_port
from tests.waiting import stop_process, wait_for

ACCESS_KEY = "testing-access-key"
SECRET_KEY = "testing-secret-key"
REGION = "us-east-1"


class MotoS3:
    """``moto_server -p PORT`` as a subprocess; ``client()`` is a boto3 client for it."""

    def __init__(self, log_dir: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log_dir / "moto_server.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> MotoS3:
        exe = shutil.which("moto_server", path=str(Path(sys.executable).parent))
        assert exe is not None, "moto_server not installed: pip install 'moto[server]' (dev extra)"
        self.log.parent.mkdir(parents=True, exist_ok=True)
        with self.log.open("wb") as out:
            self.proc = subprocess.Popen(
                [exe, "-H", "127.0.0.1", "-p", str(self.port)], stdout=out, stderr=out
            )

        def up() -> bool:
            assert self.proc is not None and self.proc.poll() is None, self.log.read_text()
            try:
                return httpx.get(f"{self.url}/moto-api/", timeout=1).status_code < 500
            except httpx.HTTPError:
                return False

        wait_for(up, timeout=30, what="moto_server to listen")
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self.proc is not None:
            stop_process(self.proc, timeout=10)

    def client(self, endpoint_url: str | None = None) -> Any:
        import boto3

        return boto3.client(
            "s3",
            endpoint_url=endpoint_url or self.url,
            region_name=REGION,
            aws_access_key_id=ACCESS_KEY,
            aws_secret_access_key=SECRET_KEY,
        )

    def config_toml(self, bucket: str, *, endpoint_url: str | None = None) -> str:
        """A ``[models.s3]`` table for this server."""
        return (
            f'[models.s3]\nbucket = "{bucket}"\nendpoint_url = "{endpoint_url or self.url}"\n'
            f'region = "{REGION}"\naddressing_style = "path"\n'
            f'access_key_id = "{ACCESS_KEY}"\nsecret_access_key = "{SECRET_KEY}"\n'
        )

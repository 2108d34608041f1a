"""The ``s3`` bundle store: objects in an S3-compatible bucket (boto3, the ``s3`` extra).

Objects are ``{prefix}sha256/{ab}/{sha256}.efb``. Devices do not download through the
controller: the download endpoint answers 307 with a presigned GET URL valid for
``models.s3.presign_expiry_s``; the agent follows it (http(s) only) and sends its ``Range``
there, so an interrupted download resumes against the bucket. Each retry asks the controller
again and gets a fresh URL.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from controller.artifacts.base import READ_BLOCK, StorageError

if TYPE_CHECKING:
    from sqlalchemy import Connection

    from controller.config import S3StorageConfig


class S3BundleStore:
    """Bundles in one bucket under one prefix."""

    kind: Literal["s3"] = "s3"
    transactional = False

    def __init__(self, client: Any, *, bucket: str, prefix: str, presign_expiry_s: int) -> None:
        self.client = client
        self.bucket = bucket
        self.prefix = prefix
        self.presign_expiry_s = presign_expiry_s

    @classmethod
    def from_config(cls, cfg: S3StorageConfig) -> S3BundleStore:
        try:
            import boto3
            from botocore.config import Config
        except ImportError as err:
            raise StorageError(
                "models.storage = s3 needs boto3: pip install 'edgefleet[s3]'"
            ) from err
        if not cfg.bucket:
            raise StorageError("models.storage = s3 needs models.s3.bucket")
        if (cfg.access_key_id is None) != (cfg.secret_access_key is None):
            raise StorageError(
                "models.s3.access_key_id and secret_access_key go together: set both (the "
                "secret preferably in EDGEFLEET_S3_SECRET_ACCESS_KEY) or neither to use boto3's "
                "credential chain (AWS_ACCESS_KEY_ID, ~/.aws/credentials, an IAM role)"
            )
        client = boto3.client(
            "s3",
            endpoint_url=cfg.endpoint_url,
            region_name=cfg.region,
            aws_access_key_id=cfg.access_key_id,
            aws_secret_access_key=cfg.secret_access_key,
            config=Config(
                signature_version="s3v4",
                s3={"addressing_style": cfg.addressing_style},
                retries={"max_attempts": 5, "mode": "standard"},
            ),
        )
        return cls(
            client, bucket=cfg.bucket, prefix=cfg.prefix, presign_expiry_s=cfg.presign_expiry_s
        )

    def key(self, sha256: str) -> str:
        return f"{self.prefix}sha256/{sha256[:2]}/{sha256}.efb"

    def describe(self) -> str:
        return f"s3://{self.bucket}/{self.prefix}"

    def stored_size(self, sha256: str) -> int | None:
        from botocore.exceptions import ClientError

        try:
            head = self.client.head_object(Bucket=self.bucket, Key=self.key(sha256))
        except ClientError as err:
            if _status(err) == 404:
                return None
            raise self._error("look up", sha256, err) from err
        return int(head["ContentLength"])

    def put(self, src: Path, sha256: str, size: int, conn: Connection | None = None) -> None:
        from boto3.exceptions import Boto3Error
        from botocore.exceptions import BotoCoreError, ClientError

        if self.stored_size(sha256) == size:
            return
        try:
            self.client.upload_file(
                str(src),
                self.bucket,
                self.key(sha256),
                ExtraArgs={"ContentType": "application/x-tar", "Metadata": {"sha256": sha256}},
            )
        except (BotoCoreError, ClientError, Boto3Error) as err:
            raise self._error("upload", sha256, err) from err

    def read(self, sha256: str, start: int, length: int) -> Iterator[bytes]:
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            got = self.client.get_object(
                Bucket=self.bucket,
                Key=self.key(sha256),
                Range=f"bytes={start}-{start + length - 1}",
            )
        except (BotoCoreError, ClientError) as err:
            raise self._error("read", sha256, err) from err
        body = got["Body"]
        return _body_blocks(body)

    def cached(self, sha256: str) -> bytes | None:
        return None  # devices download from the bucket

    def redirect_url(self, sha256: str) -> str | None:
        from botocore.exceptions import BotoCoreError

        try:
            url: str = self.client.generate_presigned_url(
                "get_object",
                Params={"Bucket": self.bucket, "Key": self.key(sha256)},
                ExpiresIn=self.presign_expiry_s,
            )
        except BotoCoreError as err:  # no credentials found
            raise self._error("sign a download URL for", sha256, err) from err
        return url

    def delete(self, sha256: str) -> None:
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            self.client.delete_object(Bucket=self.bucket, Key=self.key(sha256))
        except (BotoCoreError, ClientError) as err:
            raise self._error("delete", sha256, err) from err

    def _error(self, what: str, sha256: str, err: Exception) -> StorageError:
        return StorageError(
            f"cannot {what} bundle {sha256} in {self.describe()}: {err}; check models.s3 "
            "(bucket, endpoint_url, region) and the credentials"
        )


def _body_blocks(body: Any) -> Iterator[bytes]:
    try:
        yield from body.iter_chunks(READ_BLOCK)
    finally:
        body.close()


def _status(err: Any) -> int | None:
    meta = err.response.get("ResponseMetadata", {})
    code = meta.get("HTTPStatusCode")
    return int(code) if code is not None else None

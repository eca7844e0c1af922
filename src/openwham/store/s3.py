"""The ``ArtifactStore`` in an S3-compatible bucket (``WHAM_ARTIFACT_STORE=s3``).

For deployments whose database should not hold sessions: the same blobs as the database
store (zlib, ``WHAM_ARTIFACT_MAX_MB`` before compression, bounded inflate), one object per
artifact at ``<prefix><turn id>/<name>``, through the MinIO client (any S3-compatible
service: AWS S3, MinIO, SeaweedFS, Ceph RGW, …). Tested against a real SeaweedFS server
(``tests/test_artifacts.py``). A bucket is not transactional with the database: deleting a
task deletes its objects after the rows (the delete command); the objects a crash or an
unreachable bucket left in between are deleted by the orphan sweep
(``engine.storage.OrphanSweeper``: at every node's start and every few hours), which lists
the turn ids under the prefix and deletes those without a turn.
"""

from __future__ import annotations

import io
from collections.abc import Iterable, Iterator
from urllib.parse import urlsplit

import urllib3
from minio import Minio
from minio.credentials.providers import EnvAWSProvider
from minio.deleteobjects import DeleteObject
from minio.error import MinioException, S3Error

from .artifacts import ZLIB, ArtifactError, deflate, inflate

_MISSING = frozenset({"NoSuchKey", "NoSuchObject", "NotFound"})


class S3ArtifactStore:
    """Artifacts as objects of one bucket (which must exist: checked by :meth:`check`)."""

    def __init__(
        self,
        *,
        endpoint: str,
        bucket: str,
        prefix: str,
        region: str,
        access_key: str | None,
        secret_key: str | None,
        max_bytes: int,
        level: int = 6,
    ) -> None:
        url = urlsplit(endpoint)
        if url.scheme not in ("http", "https") or not url.netloc or url.path not in ("", "/"):
            raise ArtifactError(
                f"WHAM_ARTIFACT_S3_ENDPOINT must be http(s)://host[:port], not {endpoint!r}"
            )
        http = urllib3.PoolManager(
            timeout=urllib3.Timeout(connect=10, read=120),
            retries=urllib3.Retry(
                total=3, backoff_factor=0.2, status_forcelist=[500, 502, 503, 504]
            ),
        )
        self.client = Minio(
            url.netloc,
            access_key=access_key,
            secret_key=secret_key,
            secure=url.scheme == "https",
            region=region,
            http_client=http,
            # no keys in the settings: the AWS variables (AWS_ACCESS_KEY_ID, …)
            credentials=None if access_key else EnvAWSProvider(),
        )
        self.bucket, self.prefix = bucket, prefix
        self.max_bytes, self.level = max_bytes, level

    def check(self) -> None:
        """Raise :class:`ArtifactError` unless the bucket is there and readable with these
        credentials (at start, rather than at a follow-up's)."""
        try:
            exists = self.client.bucket_exists(self.bucket)
        except (MinioException, urllib3.exceptions.HTTPError) as exc:
            raise ArtifactError(f"The artifact bucket {self.bucket!r}: {exc}") from exc
        if not exists:
            raise ArtifactError(
                f"The artifact bucket {self.bucket!r} does not exist (WHAM_ARTIFACT_S3_BUCKET)"
            )

    def _key(self, turn_id: str, name: str = "") -> str:
        for part in (turn_id, name):
            if "/" in part or part in (".", "..") or "\0" in part:
                raise ArtifactError(f"Not an artifact key part: {part!r}")
        return f"{self.prefix}{turn_id}/{name}"

    def put(self, turn_id: str, name: str, data: bytes) -> None:
        packed = deflate(name, data, self.max_bytes, self.level)
        try:
            self.client.put_object(
                self.bucket,
                self._key(turn_id, name),
                io.BytesIO(packed),
                len(packed),
                content_type="application/octet-stream",
                metadata={"codec": ZLIB, "size": str(len(data))},
            )
        except (MinioException, urllib3.exceptions.HTTPError) as exc:
            raise ArtifactError(f"Could not store the artifact {name!r}: {exc}") from exc

    def get(self, turn_id: str, name: str) -> bytes | None:
        # zlib never grows data by more than ~0.03 % and a few bytes: more is not ours
        limit = self.max_bytes + self.max_bytes // 500 + 1024
        try:
            response = self.client.get_object(self.bucket, self._key(turn_id, name))
        except S3Error as exc:
            if exc.code in _MISSING:
                return None
            raise ArtifactError(f"Could not read the artifact {name!r}: {exc}") from exc
        except (MinioException, urllib3.exceptions.HTTPError) as exc:
            raise ArtifactError(f"Could not read the artifact {name!r}: {exc}") from exc
        try:
            codec = response.headers.get("x-amz-meta-codec") or ""
            packed = response.read(limit + 1)
        finally:
            response.close()
            response.release_conn()
        if len(packed) > limit:
            raise ArtifactError(f"The artifact {name!r} is larger than any this store writes")
        return inflate(name, codec, packed, self.max_bytes)

    def present(self, turn_ids: Iterable[str], name: str) -> set[str]:
        found: set[str] = set()
        for turn_id in dict.fromkeys(turn_ids):
            try:
                self.client.stat_object(self.bucket, self._key(turn_id, name))
            except S3Error as exc:
                if exc.code in _MISSING:
                    continue
                raise ArtifactError(f"Could not look up the artifact {name!r}: {exc}") from exc
            found.add(turn_id)
        return found

    def delete(self, turn_ids: Iterable[str]) -> None:
        try:
            keys = [
                DeleteObject(obj.object_name)
                for turn_id in dict.fromkeys(turn_ids)
                for obj in self.client.list_objects(
                    self.bucket, prefix=self._key(turn_id), recursive=True
                )
                if obj.object_name is not None
            ]
            for start in range(0, len(keys), 1000):
                errors = list(self.client.remove_objects(self.bucket, keys[start : start + 1000]))
                if errors:
                    raise ArtifactError(f"Could not delete artifacts: {errors[0]}")
        except (MinioException, urllib3.exceptions.HTTPError) as exc:
            raise ArtifactError(f"Could not delete artifacts: {exc}") from exc

    def turns(self) -> Iterator[str]:
        # every object, not the "directories": some servers (SeaweedFS) keep listing a
        # prefix whose objects are gone
        last = ""
        try:
            for obj in self.client.list_objects(self.bucket, prefix=self.prefix, recursive=True):
                turn_id, slash, _ = (obj.object_name or "")[len(self.prefix) :].partition("/")
                if slash and turn_id and turn_id != last:
                    last = turn_id
                    yield turn_id
        except (MinioException, urllib3.exceptions.HTTPError) as exc:
            raise ArtifactError(f"Could not list artifacts: {exc}") from exc

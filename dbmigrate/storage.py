"""Where backups live: a local directory or an S3 bucket (a prefect-aws S3Bucket block).

Both stores take a stream and never hold a whole backup in memory or on a
temporary disk. A failed upload leaves nothing behind: the partial file is
removed, the multipart upload aborted. Every key is checked before use, so
nothing outside the storage is ever read, written or deleted, and every
failure of the storage itself is a one-line StorageFailed.
"""

from __future__ import annotations

import os
import shutil
import time
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import BinaryIO, Iterator, Protocol

from dbmigrate.errors import ConfigError, StorageFailed, first_line, needs_prefect

CHUNK = 1 << 20
S3_PREFIX = "s3-bucket/"


class Storage(Protocol):
    def location(self, key: str) -> str: ...
    def local_path(self, key: str) -> Path | None: ...
    def upload(self, key: str, stream: BinaryIO) -> None: ...
    @contextmanager
    def open(self, key: str) -> Iterator[BinaryIO]: ...
    def write_text(self, key: str, text: str) -> None: ...
    def read_text(self, key: str) -> str: ...
    def sizes(self, prefix: str) -> dict[str, int]: ...
    def keys(self, prefix: str) -> list[str]: ...
    def delete(self, key: str) -> None: ...


def checked_key(key: str, prefix: bool = False) -> str:
    """A key names a place inside the storage: relative, with no empty, '.' or '..' segment
    (keys come from manifests and names, which may be damaged or hostile). A ``prefix``
    may also be '' (everything) or end with '/'."""
    if prefix and key == "":
        return key
    parts = (key.removesuffix("/") if prefix else key).split("/")
    if key.startswith("/") or "\0" in key or any(part in ("", ".", "..") for part in parts):
        _refuse(key)
    return key


def _refuse(key: str):
    raise ConfigError(f"refusing storage key {key!r}: not a relative path inside the storage")


@contextmanager
def _failing_as_storage(doing: str, kinds: type[BaseException] | tuple[type[BaseException], ...]) -> Iterator[None]:
    """Errors of ``kinds`` become one-line StorageFailed errors saying what was being done."""
    try:
        yield
    except kinds as exc:
        raise StorageFailed(f"storage: {doing} failed: {_reason(exc)}") from None


class _Reader:
    """A stored object being read: a read that fails is a StorageFailed."""

    def __init__(self, body, doing: str, kinds):
        self.body, self.doing, self.kinds = body, doing, kinds

    def read(self, size: int = -1) -> bytes:
        with _failing_as_storage(self.doing, self.kinds):
            return self.body.read(size)

    def readable(self) -> bool:
        return True


class LocalStorage:
    def __init__(self, root: Path):
        self.root = root

    def __repr__(self) -> str:
        return f"local directory {self.root}"

    def _path(self, key: str, prefix: bool = False) -> Path:
        path = self.root / checked_key(key, prefix)
        # A symlink inside the storage must not lead out of it either.
        if not path.resolve().is_relative_to(self.root.resolve()):
            _refuse(key)
        return path

    def location(self, key: str) -> str:
        return str(self._path(key).absolute())  # a report read elsewhere must not depend on the worker's cwd

    def local_path(self, key: str) -> Path | None:
        return self._path(key)

    def upload(self, key: str, stream: BinaryIO) -> None:
        path = self._path(key)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            out = open(path, "xb")  # never overwrite a backup
        except OSError as exc:
            raise StorageFailed(f"storage: cannot create {path}: {_reason(exc)}") from None
        try:
            with out:
                try:
                    shutil.copyfileobj(stream, out, CHUNK)
                    out.flush()
                    os.fsync(out.fileno())
                except OSError as exc:
                    raise StorageFailed(f"storage: writing {path} failed: {_reason(exc)}") from None
        except BaseException:
            path.unlink(missing_ok=True)
            raise

    def directory(self, key: str) -> Path:
        """A directory for pg_dump's directory format (only local storage has one)."""
        path = self._path(key)
        with _failing_as_storage(f"creating {path.parent}", OSError):
            path.parent.mkdir(parents=True, exist_ok=True)
        return path

    @contextmanager
    def open(self, key: str) -> Iterator[BinaryIO]:
        path = self._path(key)
        with _failing_as_storage(f"reading {path}", OSError):
            f = open(path, "rb")
        with f:
            yield _Reader(f, f"reading {path}", OSError)

    def write_text(self, key: str, text: str) -> None:
        path = self._path(key)
        tmp = path.with_name(path.name + ".tmp")
        try:
            with _failing_as_storage(f"writing {path}", OSError):
                with open(tmp, "w") as f:
                    f.write(text)
                    f.flush()
                    os.fsync(f.fileno())
                tmp.replace(path)  # readers never see half a manifest
        except BaseException:
            with suppress(OSError):  # there may be no tmp to remove; the first error is the one to tell
                tmp.unlink(missing_ok=True)  # a full disk must not keep half a manifest either
            raise

    def read_text(self, key: str) -> str:
        path = self._path(key)
        with _failing_as_storage(f"reading {path}", OSError):
            return path.read_text()

    def sizes(self, prefix: str) -> dict[str, int]:
        """Every file under ``prefix`` and its size in bytes."""
        base = self._path(prefix, prefix=True)
        with _failing_as_storage(f"listing {base}", OSError):
            if not base.is_dir():
                return {}
            return {str(p.relative_to(self.root)): p.stat().st_size for p in base.rglob("*") if p.is_file()}

    def keys(self, prefix: str) -> list[str]:
        return sorted(self.sizes(prefix))

    def delete(self, key: str) -> None:
        path = self._path(key)
        with _failing_as_storage(f"deleting {path}", OSError):
            if path.is_dir():
                shutil.rmtree(path)
            else:
                path.unlink(missing_ok=True)


def _s3_errors() -> tuple[type[BaseException], ...]:
    from botocore.exceptions import BotoCoreError, ClientError  # imported only where S3 is used

    return BotoCoreError, ClientError


class S3Storage:
    """An S3 bucket (any S3-compatible endpoint) under an optional folder."""

    PART_SIZE = 16 << 20  # 10,000 parts at most: objects up to 160 GiB
    CONCURRENCY = 4  # parts uploading at once; memory is bounded by PART_SIZE x CONCURRENCY

    def __init__(self, client, bucket: str, folder: str = ""):
        self.client, self.bucket, self.folder = client, bucket, folder.strip("/")

    def __repr__(self) -> str:
        return f"S3 bucket {self.bucket}" + (f"/{self.folder}" if self.folder else "")

    @classmethod
    def from_block(cls, block) -> S3Storage:
        return cls(block.credentials.get_s3_client(), block.bucket_name, block.bucket_folder or "")

    def _key(self, key: str, prefix: bool = False) -> str:
        checked_key(key, prefix)
        return f"{self.folder}/{key}" if self.folder else key

    def location(self, key: str) -> str:
        return f"s3://{self.bucket}/{self._key(key)}"

    def local_path(self, key: str) -> Path | None:
        return None

    def upload(self, key: str, stream: BinaryIO) -> None:
        from boto3.s3.transfer import TransferConfig

        config = TransferConfig(
            multipart_threshold=self.PART_SIZE, multipart_chunksize=self.PART_SIZE, max_concurrency=self.CONCURRENCY
        )
        # Parts read from a pipe wait in memory; s3transfer's default would let ten queue up.
        config.max_in_memory_upload_chunks = self.CONCURRENCY
        try:
            # s3transfer reads the stream part by part and aborts the multipart upload on failure.
            self.client.upload_fileobj(stream, self.bucket, self._key(key), Config=config)
        except (*_s3_errors(), OSError) as exc:
            self._abort_leftovers(key)
            raise StorageFailed(f"storage: upload to {self.location(key)} failed: {first_line(exc)}") from None

    def _abort_leftovers(self, key: str, attempts: int = 3) -> None:
        """Abort any multipart upload of this key that s3transfer could not abort itself
        (the endpoint may be coming back after an outage: retry for a few seconds)."""
        from botocore.exceptions import ClientError

        for attempt in range(attempts):
            try:
                listing = self.client.list_multipart_uploads(Bucket=self.bucket, Prefix=self._key(key))
                for upload in listing.get("Uploads", []):
                    self.client.abort_multipart_upload(
                        Bucket=self.bucket, Key=upload["Key"], UploadId=upload["UploadId"]
                    )
                return
            except ClientError:  # the endpoint answered (no such bucket, access denied): nothing to retry
                return
            except Exception:  # unreachable: it may be coming back
                time.sleep(1 + attempt)
        # Still unreachable: the bucket's AbortIncompleteMultipartUpload lifecycle rule has to clean up.

    @contextmanager
    def open(self, key: str) -> Iterator[BinaryIO]:
        doing = f"reading {self.location(key)}"
        with _failing_as_storage(doing, _s3_errors()):
            body = self.client.get_object(Bucket=self.bucket, Key=self._key(key))["Body"]
        try:
            yield _Reader(body, doing, _s3_errors())
        finally:
            body.close()

    def write_text(self, key: str, text: str) -> None:
        with _failing_as_storage(f"writing {self.location(key)}", _s3_errors()):
            self.client.put_object(Bucket=self.bucket, Key=self._key(key), Body=text.encode())

    def read_text(self, key: str) -> str:
        with self.open(key) as body:
            return body.read().decode()

    def sizes(self, prefix: str) -> dict[str, int]:
        """Every object under ``prefix`` and its size in bytes."""
        listed = self._key(prefix, prefix=True)
        strip = len(self.folder) + 1 if self.folder else 0
        found = {}
        with _failing_as_storage(f"listing s3://{self.bucket}/{listed}", _s3_errors()):
            for page in self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=listed):
                found.update((obj["Key"][strip:], obj["Size"]) for obj in page.get("Contents", []))
        return found

    def keys(self, prefix: str) -> list[str]:
        return sorted(self.sizes(prefix))

    def delete(self, key: str) -> None:
        with _failing_as_storage(f"deleting {self.location(key)}", _s3_errors()):
            self.client.delete_object(Bucket=self.bucket, Key=self._key(key))



def _reason(exc: BaseException) -> str:
    return exc.strerror if isinstance(exc, OSError) and exc.strerror else first_line(exc)


def local_directory(spec: str | None, home: Path) -> Path | None:
    """The directory a storage spec writes to; None for S3."""
    if spec and spec.startswith((S3_PREFIX, "s3://")):
        return None
    return Path(spec) if spec else home / "backups"


def open_storage(spec: str | None, home: Path) -> Storage:
    """``None`` -> <home>/backups; ``s3-bucket/NAME`` -> the S3Bucket block NAME;
    ``s3://BUCKET[/FOLDER]`` -> boto3's own credentials (AWS_* variables, AWS_ENDPOINT_URL,
    instance profile), without Prefect; anything else is a directory."""
    if spec and spec.startswith("s3://"):
        import boto3

        bucket, _, folder = spec[len("s3://"):].partition("/")
        if not bucket:
            raise ConfigError(f"no bucket in '{spec}': use s3://BUCKET[/FOLDER]")
        try:
            client = boto3.client("s3")
        except (*_s3_errors(), ValueError) as exc:  # a bad AWS_ENDPOINT_URL, an unknown AWS_PROFILE
            raise ConfigError(f"cannot set up an S3 client for '{spec}': {first_line(exc)}") from None
        return S3Storage(client, bucket, folder)
    if spec and spec.startswith(S3_PREFIX):
        name = spec[len(S3_PREFIX):]
        with needs_prefect(f"the storage {spec}"):
            from prefect_aws import S3Bucket  # slow import: only for S3 storage

        try:
            block = S3Bucket.load(name)
        except ValueError:
            raise ConfigError(
                f"no S3Bucket block named '{name}': create it (`dbmigrate blocks sync --env ENV --from-env` with "
                f"BACKUP_BUCKET set, or a prefect-aws S3Bucket block saved as '{name}' in the Prefect UI), or give "
                "another backup storage (see docs/BACKUPS.md#storage)") from None
        except Exception as exc:
            raise ConfigError(f"cannot load S3Bucket block '{name}' from the Prefect API: {first_line(exc)}") from None
        return S3Storage.from_block(block)
    return LocalStorage(local_directory(spec, home))

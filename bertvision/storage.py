"""Storage through fsspec URLs: local paths, memory:// in tests, az:// (adlfs) for Azure.

Everything BERTVision reads or writes goes through these few helpers, so no stage assumes a local
disk. Writes of small files (JSON records) are atomic: a reader sees the old content or the new,
never a part. On local disks that is a rename; on blob storage an upload is only visible once it
is complete, so a plain write already is. Large files (shards) go through `StagedWrite`.

Failures on Azure come out as one line: `StorageError` (a ValueError) when retrying cannot help
(authentication, a missing container), `StorageUnavailable` (a ConnectionError) when transient
failures outlasted the retries that bertvision.azure does inside every request.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import tempfile
import uuid
from collections.abc import Iterator
from typing import Any

import fsspec
from fsspec.implementations.local import LocalFileSystem

from bertvision.finite import strict_json

AZURE_PROTOCOLS = ("az", "abfs", "abfss")


class StorageError(ValueError):
    """A storage failure that retrying cannot fix; the message is one line naming the URL."""


class StorageUnavailable(ConnectionError):
    """Storage stayed unreachable (or kept failing) through all retries; a later try may work."""


def is_azure_url(url: str) -> bool:
    return url.split("://", 1)[0] in AZURE_PROTOCOLS if "://" in url else False


def is_blob(fs: fsspec.AbstractFileSystem) -> bool:
    """True for Azure Blob Storage, where an upload becomes visible only once complete."""
    protocols = (fs.protocol,) if isinstance(fs.protocol, str) else fs.protocol
    return any(p in AZURE_PROTOCOLS for p in protocols)


@contextlib.contextmanager
def translate_errors(url: str) -> Iterator[None]:
    """Turn an Azure SDK failure at `url` into a one-line StorageError or StorageUnavailable."""
    try:
        yield
    except (StorageError, StorageUnavailable):
        raise
    except Exception as exc:
        if is_azure_url(url):
            from bertvision.azure import describe_error

            better = describe_error(exc, url)
            if better is not None:
                raise better from exc
        raise


def _translated(function):
    """Decorator: `translate_errors` around a helper whose first argument is the URL."""

    @functools.wraps(function)
    def wrapper(url: str, *args, **kwargs):
        with translate_errors(url):
            return function(url, *args, **kwargs)

    return wrapper


@_translated
def url_to_fs(url: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """The filesystem and the path within it for `url` (a plain path means the local disk)."""
    if is_azure_url(url):
        from bertvision.azure import filesystem

        fs = filesystem()
        return fs, fs._strip_protocol(url)
    return fsspec.core.url_to_fs(url, **storage_options(url))


def storage_options(url: str) -> dict[str, Any]:
    """Credentials come from the environment only, never from parameters (see README, Azure)."""
    if is_azure_url(url):
        from bertvision.azure import azure_storage_options

        return azure_storage_options()
    return {}


def join(url: str, *parts: str) -> str:
    return "/".join([url.rstrip("/"), *[p.strip("/") for p in parts]])


def is_local(fs: fsspec.AbstractFileSystem) -> bool:
    return isinstance(fs, LocalFileSystem)


@_translated
def exists(url: str) -> bool:
    fs, path = url_to_fs(url)
    return fs.exists(path)


@_translated
def read_text(url: str) -> str:
    fs, path = url_to_fs(url)
    with fs.open(path, "r", encoding="utf-8") as f:
        return f.read()


@_translated
def write_bytes_atomic(url: str, data: bytes) -> None:
    fs, path = url_to_fs(url)
    parent = path.rsplit("/", 1)[0] if "/" in path else ""
    if parent and not is_blob(fs):  # blob storage has no folders to make
        fs.makedirs(parent, exist_ok=True)
    if is_local(fs):
        tmp = f"{path}.{uuid.uuid4().hex}.tmp"
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    else:
        fs.pipe_file(path, data)


def write_text_atomic(url: str, text: str) -> None:
    write_bytes_atomic(url, text.encode("utf-8"))


def read_json(url: str) -> Any:
    return json.loads(read_text(url))


def write_json(url: str, data: Any) -> None:
    """Write `data` as strict JSON: a NaN or infinity in it is a ValueError, nothing written."""
    write_text_atomic(url, strict_json(data, url, indent=2, sort_keys=True) + "\n")


def sha256_file(fs: fsspec.AbstractFileSystem, path: str, block_size: int = 8 << 20) -> str:
    """The file's sha256; on blob storage the one `StagedWrite` stored with it, if any, so that
    checking a committed shard costs one request instead of a download."""
    if is_blob(fs):
        stored = (fs.info(path).get("metadata") or {}).get("sha256")
        if stored:
            return stored
    digest = hashlib.sha256()
    with fs.open(path, "rb") as f:
        while chunk := f.read(block_size):
            digest.update(chunk)
    return digest.hexdigest()


class StagedWrite:
    """A file that appears at `url` complete, on `commit()`, or not at all.

        staged = StagedWrite(url, staging_url)
        staged.file.write(...)
        staged.commit()        # or staged.discard()

    Local disks and memory://: written at `staging_url`, then renamed to `url`. Blob storage:
    spooled to a local temporary file, then uploaded to `url` as concurrent blocks. A block blob
    becomes visible only when its block list is committed, after every block is in, so readers
    never see part of it; and there is no rename to do, which on blob storage would be a
    server-side copy of the whole shard plus a delete. A crash mid-upload leaves only uncommitted
    blocks, which no listing shows and Azure discards after a week.
    """

    def __init__(self, url: str, staging_url: str) -> None:
        self.url = url
        with translate_errors(url):
            self.fs, self.path = url_to_fs(url)
            if is_blob(self.fs):
                self.fs.makedirs(self.path, exist_ok=True)  # fail now if the container is missing
                handle, self._staging = tempfile.mkstemp(prefix="bertvision-", suffix=".staged")
                self.file = os.fdopen(handle, "wb")
            else:
                self._staging = url_to_fs(staging_url)[1]
                self.fs.makedirs(self._staging.rsplit("/", 1)[0], exist_ok=True)
                self.file = self.fs.open(self._staging, "wb")

    def commit(self, sha256: str | None = None) -> None:
        """Publish the file at `url`; `sha256` (of its bytes) is kept with it on blob storage."""
        self.file.close()
        with translate_errors(self.url):
            if is_blob(self.fs):
                self.fs.upload_file(self._staging, self.path, {"sha256": sha256} if sha256 else {})
                os.remove(self._staging)
            else:
                self.fs.mv(self._staging, self.path)

    def discard(self) -> None:
        """Forget the file; nothing appears at `url`."""
        self.file.close()
        if is_blob(self.fs):
            with contextlib.suppress(FileNotFoundError):
                os.remove(self._staging)
        elif self.fs.exists(self._staging):
            self.fs.rm_file(self._staging)


def ensure_writable(url: str) -> None:
    """Fail now, with the URL in the message, if `url` cannot be written; leaves nothing behind.

    On blob storage a missing container is an error: containers are never made implicitly.
    """
    try:
        with translate_errors(url):
            fs, path = url_to_fs(url)
            existed = fs.exists(path)
            probe = f"{path.rstrip('/')}/.bertvision-write-probe-{uuid.uuid4().hex}"
            fs.makedirs(path, exist_ok=True)
            fs.pipe_file(probe, b"")
            fs.rm_file(probe)
            if not existed and is_local(fs):
                fs.rmdir(path)
    except (StorageError, StorageUnavailable):
        raise
    except Exception as exc:  # any other failure here means "cannot write there"
        raise PermissionError(f"output {url} is not writable: {exc}") from exc


@_translated
def list_names(url: str) -> list[str]:
    """Base names of the entries directly under `url` (empty if it does not exist)."""
    fs, path = url_to_fs(url)
    if not fs.exists(path):
        return []
    return sorted(p.rstrip("/").rsplit("/", 1)[-1] for p in fs.ls(path, detail=False))

"""Storage through fsspec URLs: local paths, memory:// in tests, az:// (adlfs) for Azure.

Everything BERTVision reads or writes goes through these few helpers, so no stage assumes a local
disk. Writes of small files (JSON records) are atomic: a reader sees the old content or the new,
never a part. On local disks that is a rename; on blob storage an upload is only visible once it
is complete, so a plain write already is.
"""

from __future__ import annotations

import hashlib
import json
import os
import uuid
from typing import Any

import fsspec
from fsspec.implementations.local import LocalFileSystem


def url_to_fs(url: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """The filesystem and the path within it for `url` (a plain path means the local disk)."""
    fs, path = fsspec.core.url_to_fs(url, **storage_options(url))
    return fs, path


def storage_options(url: str) -> dict[str, Any]:
    """Credentials come from the environment only, never from parameters (see README, Azure)."""
    if url.startswith(("az://", "abfs://", "abfss://")):
        from bertvision.azure import azure_storage_options

        return azure_storage_options()
    return {}


def join(url: str, *parts: str) -> str:
    return "/".join([url.rstrip("/"), *[p.strip("/") for p in parts]])


def is_local(fs: fsspec.AbstractFileSystem) -> bool:
    return isinstance(fs, LocalFileSystem)


def exists(url: str) -> bool:
    fs, path = url_to_fs(url)
    return fs.exists(path)


def read_text(url: str) -> str:
    fs, path = url_to_fs(url)
    with fs.open(path, "r", encoding="utf-8") as f:
        return f.read()


def write_bytes_atomic(url: str, data: bytes) -> None:
    fs, path = url_to_fs(url)
    parent = path.rsplit("/", 1)[0] if "/" in path else ""
    if parent:
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
    write_text_atomic(url, json.dumps(data, indent=2, sort_keys=True) + "\n")


def sha256_file(fs: fsspec.AbstractFileSystem, path: str, block_size: int = 8 << 20) -> str:
    digest = hashlib.sha256()
    with fs.open(path, "rb") as f:
        while chunk := f.read(block_size):
            digest.update(chunk)
    return digest.hexdigest()


def ensure_writable(url: str) -> None:
    """Fail now, with the URL in the message, if `url` cannot be written; leaves nothing behind."""
    fs, path = url_to_fs(url)
    existed = fs.exists(path)
    probe = f"{path.rstrip('/')}/.bertvision-write-probe-{uuid.uuid4().hex}"
    try:
        fs.makedirs(path, exist_ok=True)
        fs.pipe_file(probe, b"")
        fs.rm_file(probe)
        if not existed and is_local(fs):
            fs.rmdir(path)
    except Exception as exc:  # any failure here means "cannot write there"
        raise PermissionError(f"output {url} is not writable: {exc}") from exc


def list_names(url: str) -> list[str]:
    """Base names of the entries directly under `url` (empty if it does not exist)."""
    fs, path = url_to_fs(url)
    if not fs.exists(path):
        return []
    return sorted(p.rstrip("/").rsplit("/", 1)[-1] for p in fs.ls(path, detail=False))

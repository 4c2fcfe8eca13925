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
import errno
import functools
import hashlib
import json
import os
import socket
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import fsspec
from fsspec.implementations.local import LocalFileSystem

from bertvision.finite import strict_json, strict_loads

AZURE_PROTOCOLS = ("az", "abfs", "abfss")


class StorageError(ValueError):
    """A storage failure that retrying cannot fix; the message is one line naming the URL."""


class StorageUnavailable(ConnectionError):
    """Storage stayed unreachable (or kept failing) through all retries; a later try may work."""


class OutOfSpace(OSError):
    """Storage (or the local spool of blob uploads) is full: every further write would fail too."""

    def __init__(self, message: str) -> None:
        super().__init__(errno.ENOSPC, message)

    def __str__(self) -> str:
        return self.strerror


# errno values that mean "no room to write": full disk, exceeded quota, file too large.
NO_SPACE_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


def out_of_space(exc: BaseException | None) -> bool:
    """Whether `exc`, or an exception it was raised from or while handling, reports no space."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError) and exc.errno in NO_SPACE_ERRNOS:
            return True
        exc = exc.__cause__ or exc.__context__
    return False


# Staging files (shards under _incomplete/, `.tmp` records, blob-upload spool files) name their
# writer: `<name>~<host>~<pid>~<random>`, so that a cleanup can tell a live writer's file from one
# a killed process left. A file of another host's writer counts as stale only after this long
# (that writer cannot be asked whether it still runs); a shard task times out after an hour.
STALE_AFTER_SECONDS = 24 * 3600


def staging_name(name: str) -> str:
    """`name~<host>~<pid>~<random>`: a unique staging name that names this process as writer."""
    return f"{name}~{socket.gethostname()}~{os.getpid()}~{uuid.uuid4().hex[:12]}"


def _writer_alive(name: str) -> bool | None:
    """Whether the writer named in a staging file's base name still runs; None when that cannot
    be told here (a name without a writer, or one on another host)."""
    parts = name.split("~")
    if len(parts) < 4 or parts[1] != socket.gethostname() or not parts[2].isdigit():
        return None
    try:
        os.kill(int(parts[2]), 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it runs, as another user
        return True
    return True


def is_stale(name: str, modified: float | None) -> bool:
    """Whether a staging file named `name` (base name), last modified at `modified` (epoch
    seconds, None if unknown), was left by a writer that is gone. A live writer's file never is."""
    alive = _writer_alive(name)
    if alive is not None:
        return not alive
    return modified is not None and time.time() - modified > STALE_AFTER_SECONDS


def remove_stale(
    fs: fsspec.AbstractFileSystem, folder: str, select: Callable[[str], bool] = lambda name: True
) -> list[str]:
    """Remove the stale staging files directly under `folder` (see `is_stale`) whose base name
    `select` accepts. Returns the base names removed."""
    removed = []
    if not fs.exists(folder):
        return removed
    for info in fs.ls(folder, detail=True):
        name = info["name"].rstrip("/").rsplit("/", 1)[-1]
        if info["type"] == "file" and select(name) and is_stale(name, _modified(fs, info["name"])):
            with contextlib.suppress(FileNotFoundError):  # its writer's own cleanup came first
                fs.rm_file(info["name"])
            removed.append(name)
    return removed


def is_write_staging(name: str) -> bool:
    """Whether `name` (a base name) is the staging file of a small write (write_bytes_atomic:
    `<target>~<host>~<pid>~<random>.tmp`), not another tool's file."""
    return name.endswith(TMP_SUFFIX) and len(name.removesuffix(TMP_SUFFIX).split("~")) == 4


def _is_staging_of(name: str, staged: str) -> bool:
    """Whether `staged` is a staging file of a small write to `name` (write_bytes_atomic)."""
    return staged.startswith(f"{name}~") and is_write_staging(staged)


def _modified(fs: fsspec.AbstractFileSystem, path: str) -> float | None:
    try:
        return fs.modified(path).timestamp()
    except (NotImplementedError, FileNotFoundError):
        return None


SPOOL_PREFIX = "bertvision-spool"  # blob uploads spool to tempfile.gettempdir()/SPOOL_PREFIX~...
TMP_SUFFIX = ".tmp"  # of a small file being written on a local disk, beside its final name


def remove_stale_spool() -> list[str]:
    """Remove the blob-upload spool files of writers on this machine that are gone."""
    return remove_stale(
        fsspec.filesystem("file"),
        tempfile.gettempdir(),
        lambda name: name.startswith(f"{SPOOL_PREFIX}~"),
    )


class FileFormatError(ValueError):
    """A stored file is garbled (not UTF-8, not JSON, not the record expected); the message is
    one line naming the file."""


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


KNOWN_STORAGE = "a local path, memory://, az://, abfs:// or abfss://"


def check_protocol(url: str) -> None:
    """StorageError naming `url` when no filesystem here serves its protocol: an unknown one
    (a typo: `bar://`), or one whose fsspec package is not installed (`s3://` without s3fs)."""
    if "::" in url:  # fsspec's chained URLs (simplecache::az://...): fsspec checks each link
        return
    protocol = fsspec.core.split_protocol(url)[0]
    if protocol is None or protocol in AZURE_PROTOCOLS:
        return
    try:
        fsspec.get_filesystem_class(protocol)
    except ValueError:
        raise StorageError(
            f"{url}: unknown storage protocol {protocol!r} ({KNOWN_STORAGE})"
        ) from None
    except ImportError as exc:
        raise StorageError(
            f"{url}: storage protocol {protocol!r} needs a package not installed here ({exc})"
        ) from None


@_translated
def url_to_fs(url: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """The filesystem and the path within it for `url` (a plain path means the local disk);
    StorageError naming `url` when it is empty or its protocol is served by none here."""
    if not url:
        raise StorageError("an empty URL names no file or folder")
    check_protocol(url)
    if is_azure_url(url):
        from bertvision.azure import filesystem

        try:
            fs = filesystem()
        except StorageError as exc:  # the environment's settings or credentials
            raise StorageError(f"{url}: {exc}") from None
        return fs, fs._strip_protocol(url)
    return fsspec.core.url_to_fs(url, **storage_options(url))


def storage_options(url: str) -> dict[str, Any]:
    """Credentials come from the environment only, never from parameters (see README, Azure)."""
    if is_azure_url(url):
        from bertvision.azure import azure_storage_options

        return azure_storage_options()
    return {}


def join(url: str, *parts: str) -> str:
    """`url` and `parts` joined by "/"; StorageError for an empty `url`, which would make the
    result a path at the filesystem root ("" + "/wnli")."""
    if not url:
        raise StorageError(f"no URL to put {'/'.join(parts)} under: the URL given is empty")
    return "/".join([url.rstrip("/"), *[p.strip("/") for p in parts]])


def is_local(fs: fsspec.AbstractFileSystem) -> bool:
    return isinstance(fs, LocalFileSystem)


@_translated
def exists(url: str) -> bool:
    fs, path = url_to_fs(url)
    return fs.exists(path)


@_translated
def read_bytes(url: str) -> bytes:
    """The whole file; a FileNotFoundError naming `url` if there is none."""
    fs, path = url_to_fs(url)
    try:
        return fs.cat_file(path)
    except FileNotFoundError:
        raise FileNotFoundError(f"{url} does not exist") from None


def read_text(url: str) -> str:
    """The file as UTF-8 text; a FileFormatError naming `url` (and the line) if it is not."""
    data = read_bytes(url)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise FileFormatError(
            f"{url} line {line}: not UTF-8 text (byte {data[exc.start]:#04x})"
        ) from None


@_translated
def write_bytes_atomic(url: str, data: bytes, metadata: dict[str, str] | None = None) -> None:
    """Write `data` to `url` whole or not at all; a failed write leaves no temporary file.

    `metadata` (ASCII names and values) is kept with the file on blob storage, in the same
    request, where a listing returns it (`list_entries`); local files keep none."""
    fs, path = url_to_fs(url)
    parent = path.rsplit("/", 1)[0] if "/" in path else ""
    if parent and not is_blob(fs):  # blob storage has no folders to make
        fs.makedirs(parent, exist_ok=True)
    if is_local(fs):
        tmp = f"{staging_name(path)}{TMP_SUFFIX}"
        try:
            with open(tmp, "wb") as f:
                f.write(data)
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.remove(tmp)
            raise
    elif metadata and is_blob(fs):
        fs.upload_bytes(data, path, metadata)
    else:
        fs.pipe_file(path, data)


def write_text_atomic(url: str, text: str, metadata: dict[str, str] | None = None) -> None:
    write_bytes_atomic(url, text.encode("utf-8"), metadata)


def write_together(files: dict[str, bytes]) -> None:
    """Write small files that belong together (URL -> bytes) so that a failure leaves each as
    it was: never a new one beside an old one.

    Where renames are cheap (local disks, memory://) every file is first written whole under a
    staging name beside its target, then all are renamed into place; on blob storage, which
    has no renames, each is written in turn. Should one fail to go into place, those before it
    get their old content back (or are removed where they were new). The staging files of
    these targets that writers killed midway left are removed first."""
    for url in files:
        fs, path = url_to_fs(url)
        if is_local(fs) and "/" in path:
            folder, name = path.rsplit("/", 1)
            remove_stale(fs, folder, lambda staged, name=name: _is_staging_of(name, staged))
    before = {url: read_bytes(url) if exists(url) else None for url in files}
    staged: dict[str, str] = {}  # url -> its staging URL, until renamed into place
    placed: list[str] = []
    try:
        for url, data in files.items():
            fs, _ = url_to_fs(url)
            if not is_blob(fs):
                folder, name = url.rstrip("/").rsplit("/", 1) if "/" in url else (".", url)
                staged[url] = join(folder, staging_name(name) + TMP_SUFFIX)
                write_bytes_atomic(staged[url], data)
        for url, data in files.items():
            if url in staged:
                fs, path = url_to_fs(url)
                fs.mv(url_to_fs(staged[url])[1], path)
                del staged[url]
            else:
                write_bytes_atomic(url, data)
            placed.append(url)
    except BaseException:
        for url in placed:
            with contextlib.suppress(Exception):  # the first failure is the one to report
                if before[url] is None:
                    fs, path = url_to_fs(url)
                    fs.rm_file(path)
                else:
                    write_bytes_atomic(url, before[url])
        raise
    finally:
        for staging in staged.values():
            fs, path = url_to_fs(staging)
            with contextlib.suppress(FileNotFoundError):
                fs.rm_file(path)


def read_json(url: str, keys: tuple[str, ...] | None = None) -> Any:
    """The JSON value stored at `url`; with `keys`, an object that has at least those keys.

    Raises FileFormatError naming `url` when the file is not UTF-8, not JSON or lacks a key, and
    FileNotFoundError naming it when it does not exist.
    """
    try:
        value = strict_loads(read_text(url))
    except json.JSONDecodeError as exc:
        raise FileFormatError(
            f"{url} is not valid JSON: {exc.msg} (line {exc.lineno}, column {exc.colno})"
        ) from None
    if keys is not None:
        if not isinstance(value, dict):
            raise FileFormatError(f"{url} holds a JSON {type(value).__name__}, not an object")
        missing = [k for k in keys if k not in value]
        if missing:
            raise FileFormatError(f"{url} lacks the key(s) {', '.join(missing)}")
    return value


def write_json(url: str, data: Any, indent: int | None = 2) -> None:
    """Write `data` as strict JSON (`indent` spaces a level; None: one line): a NaN or infinity
    in it is a ValueError, nothing written."""
    write_bytes_atomic(url, json_bytes(data, url, indent))


def json_bytes(data: Any, name: str, indent: int | None = 2) -> bytes:
    """The bytes `write_json` writes for `data`, for writes made together (`write_together`);
    ValueError naming `name` for a NaN or infinity in it."""
    return (strict_json(data, name, indent=indent, sort_keys=True) + "\n").encode()


def sha256_file(fs: fsspec.AbstractFileSystem, path: str, block_size: int = 8 << 20) -> str:
    """The sha256 of the file's bytes as read now (a download on blob storage)."""
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
                handle, self._staging = tempfile.mkstemp(prefix=staging_name(SPOOL_PREFIX))
                self.file = os.fdopen(handle, "wb")
            else:
                self._staging = url_to_fs(staging_url)[1]
                self.file = self._open_staging()

    def _open_staging(self):
        """The staging file, opened for writing in its folder (made if absent). A finished
        extraction removes its empty staging folder (shards.remove_empty_staging): one removed
        between making it and opening the file here is made again."""
        folder = self._staging.rsplit("/", 1)[0]
        for attempt in range(3):
            self.fs.makedirs(folder, exist_ok=True)
            try:
                return self.fs.open(self._staging, "wb")
            except FileNotFoundError:
                if attempt == 2:
                    raise

    def commit(self, sha256: str | None = None) -> None:
        """Publish the file at `url`; `sha256` (of its bytes) is kept with it on blob storage.

        Whether it succeeds or fails, no staging or spool file is left behind."""
        try:
            self.file.close()
            with translate_errors(self.url):
                if is_blob(self.fs):
                    metadata = {"sha256": sha256} if sha256 else {}
                    self.fs.upload_file(self._staging, self.path, metadata)
                else:
                    self.fs.mv(self._staging, self.path)
        finally:
            self._remove_staging()

    def discard(self) -> None:
        """Forget the file; nothing appears at `url` and no staging or spool file is left."""
        try:
            self.file.close()  # may fail to flush (a full disk): the file goes all the same
        finally:
            self._remove_staging()

    def _remove_staging(self) -> None:
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
            path = path.rstrip("/")
            made = []  # local folders this probe creates, innermost first
            if is_local(fs):
                folder = path
                while folder and not fs.exists(folder):
                    made.append(folder)
                    folder = folder.rsplit("/", 1)[0]
            probe = f"{path}/.bertvision-write-probe-{uuid.uuid4().hex}"
            fs.makedirs(path, exist_ok=True)
            fs.pipe_file(probe, b"")
            fs.rm_file(probe)
        for folder in made:
            try:
                fs.rmdir(folder)
            except OSError:  # another writer put something there meanwhile: it stays
                break
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


@_translated
def listing_version(url: str) -> str:
    """16 hex digits hashing the listing of the files under `url` (names, sizes, modification
    times or etags), which changes when any of them is rewritten; of a single file, its own.
    What in-process caches of what is read at a URL key on, beside the URL. Cheap: one listing,
    no file read."""
    fs, path = url_to_fs(url)
    if fs.isdir(path):
        listing = fs.find(path, detail=True)
    else:
        listing = {path: fs.info(path)} if fs.exists(path) else {}
    changed = ("mtime", "etag", "last_modified", "created", "LastModified")
    rows = sorted(
        (name, info.get("size"), *(str(info.get(k)) for k in changed))
        for name, info in listing.items()
    )
    return hashlib.sha256(repr(rows).encode()).hexdigest()[:16]


@_translated
def list_entries(url: str) -> dict[str, dict]:
    """The entries directly under `url` by base name, with fsspec's details (`type`, `size`; on
    blob storage also `metadata`); empty if `url` does not exist. On blob storage one listing
    request per 5,000 entries."""
    fs, path = url_to_fs(url)
    if not fs.exists(path):
        return {}
    return {info["name"].rstrip("/").rsplit("/", 1)[-1]: info for info in fs.ls(path, detail=True)}

"""Run folders committed whole, and one writer per folder.

Fine-tuning runs, adapter runs (sweep trials too) and ensembles are folders of several files.
Each is written like a shard: staged elsewhere, then published, with a commit record written last:

    with StagedRun(out) as run:          # files go to OUT/_staging/<id>/
        write_everything(run.url)        # any writer that takes a folder URL
        run.commit(RunRecord(kind, key, settings, inputs, timings),
                   last=("config.json", "metrics.json"))

    OUT/_commit.json    the run record (bertvision.records): kind, key, settings, inputs, code,
                        timings, and the "files" committed, "worker", "committed_at"

`key` is the content identity of the run's inputs and settings (what `finished` compares; a
commit record written before run records holds only it, the files, worker and time, and still
counts). The commit record is the commit point: until `commit` starts, the old run stays whole
and finished; from its first step the old run no longer counts as finished, its files are
removed, the new ones moved in (the names in `last` last), and the record written last. A kill
at any point leaves either the old finished run or no finished run at all, never files of two
runs counted as one; the next commit also removes what an interrupted one left (their names are
kept in OUT/_publishing.json meanwhile).

`Lease` keeps a second process from writing into a folder another one is writing into.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
import uuid
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import replace
from datetime import UTC, datetime
from typing import Any, TypeVar

from bertvision import records, storage
from bertvision.finite import strict_loads
from bertvision.records import RunRecord, now
from bertvision.shards import worker_name

T = TypeVar("T")

COMMIT_RECORD = "_commit.json"
PUBLISHING = "_publishing.json"
STAGING = "_staging"
LEASE = "_lease.json"
SCRATCH = "_checkpoint"  # a run's state kept between attempts (train's last epoch), until commit


class FolderBusy(RuntimeError):
    """Another process holds the folder's lease; the message names the folder and the holder."""


def commit_record(out: str) -> dict[str, Any] | None:
    """OUT/_commit.json, or None when no run is committed at `out`."""
    url = storage.join(out, COMMIT_RECORD)
    return storage.read_json(url, keys=("key",)) if storage.exists(url) else None


def missing_files(out: str, record: dict[str, Any]) -> list[str]:
    """The names in the commit `record`'s "files" that are not stored under `out` now, in the
    record's order: one listing of `out` (on blob storage one request per 5,000 files); no file
    is read."""
    fs, root = storage.url_to_fs(out)
    root = root.rstrip("/")
    with storage.translate_errors(out):
        stored = {path[len(root) + 1 :] for path in fs.find(root)}
    return [name for name in record.get("files", []) if name not in stored]


def not_whole(out: str) -> str | None:
    """Why the run folder `out` is not a whole run, judged by metadata alone: a commit under way
    or killed (OUT/_publishing.json without a commit record), or files its commit record lists
    gone; None otherwise (a folder without a commit record, as runs written before records,
    counts as whole). A commit record beside _publishing.json is the old run's, whole until the
    commit's next step removes the record, or the new one's, written after all its files: a
    commit killed just after it leaves the run finished (`tidy` removes what is left)."""
    record = commit_record(out)
    if record is None and storage.exists(storage.join(out, PUBLISHING)):
        return f"a commit is under way there, or was killed ({PUBLISHING})"
    missing = missing_files(out, record) if record is not None else []
    if missing:
        return f"it lacks {len(missing)} of its files ({', '.join(missing[:3])})"
    return None


def stored_record(out: str) -> dict[str, Any] | None:
    """OUT/_commit.json while the run it commits is stored whole (every file it lists is there,
    `missing_files`); None when no run is committed at `out` or some of its files are gone."""
    record = commit_record(out)
    return record if record is not None and not missing_files(out, record) else None


def finished(
    out: str,
    key: str,
    overwrite: bool,
    what: str = "run",
    settings: dict[str, Any] | None = None,
) -> dict[str, Any] | None:
    """The commit record of a run finished at `out` with content key `key`, else None.

    Finished means committed with `key` and stored whole: a run whose committed files are gone
    (`missing_files`) is not finished, and a warning names what it lacks; the caller redoes it.
    A finished run with another key is an error (ValueError naming `out`, and those of the
    `settings` that the key covers which differ from the stored run's) unless `overwrite`, when
    it is None too: the caller redoes the run, and its commit replaces the old one.
    """
    record = commit_record(out)
    if record is None:
        return None
    if record["key"] == key:
        missing = missing_files(out, record)
        if not missing:
            return record
        warnings.warn(
            f"{out}: the {what} committed there lacks {len(missing)} of its files "
            f"({', '.join(missing[:3])}{', ...' if len(missing) > 3 else ''}); doing it again",
            stacklevel=1,  # shown as BERTVision's own warning (console.quiet_libraries)
        )
        return None
    if overwrite:
        return None
    raise ValueError(
        f"{out} holds a finished {what} {_other(record.get('settings'), settings)}; "
        "use another --out, or --overwrite to replace it"
    )


def _other(stored: Any, asked: dict[str, Any] | None) -> str:
    """How the stored run differs from the one asked for: the settings that differ, or, all
    the same, its inputs (an encoder, data or embeddings of other content)."""
    if not isinstance(stored, dict) or asked is None:
        return "with other settings or inputs"
    differ = [k for k in asked if k in stored and stored[k] != asked[k]]
    if not differ:
        return "of the same settings on other inputs (compared by content)"
    shown = "; ".join(f"{k} {stored[k]!r} there, {asked[k]!r} here" for k in differ[:4])
    return f"with other settings ({shown}{'; ...' if len(differ) > 4 else ''})"


class StagedRun:
    """A run folder that appears at `out` whole, on `commit()`, or not at all (see the module)."""

    def __init__(self, out: str) -> None:
        self.out = out.rstrip("/")
        self.url = storage.join(self.out, STAGING, uuid.uuid4().hex)

    def __enter__(self) -> StagedRun:
        return self

    def __exit__(self, kind, error, traceback) -> None:
        """An error before `commit` leaves the run at `out` as it was, and nothing staged."""
        fs, staged = storage.url_to_fs(self.url)
        if kind is not None and fs.exists(staged):
            fs.rm(staged, recursive=True)
            parent = staged.rsplit("/", 1)[0]
            if storage.is_local(fs) and not fs.ls(parent):
                fs.rmdir(parent)

    def commit(self, record: RunRecord, last: tuple[str, ...] = ()) -> RunRecord:
        """Replace the run at `out` by the staged files; returns `record` as written, with the
        files committed, the worker and the time."""
        fs, staged = storage.url_to_fs(self.url)
        _, root = storage.url_to_fs(self.out)
        root = root.rstrip("/")
        files = sorted(p[len(staged) + 1 :] for p in fs.find(staged))
        files.sort(key=lambda name: last.index(name) + 1 if name in last else 0)
        old = set((commit_record(self.out) or {}).get("files", []))
        publishing = storage.join(self.out, PUBLISHING)
        if storage.exists(publishing):  # an interrupted commit: its files are leftovers too
            old |= set(storage.read_json(publishing, keys=("files",))["files"])
        storage.write_json(publishing, {"files": sorted(old | set(files))})
        _remove(fs, f"{root}/{COMMIT_RECORD}")  # from here on, no run is finished at `out`
        for name in sorted((old - set(files)) | set(last)):  # `last` first out, last in
            _remove(fs, f"{root}/{name}")
        for name in files:
            target = f"{root}/{name}"
            _remove(fs, target)
            fs.makedirs(target.rsplit("/", 1)[0], exist_ok=True)
            fs.mv(f"{staged}/{name}", target)
        record = replace(record, files=files, worker=worker_name(), committed_at=now())
        records.write_record(storage.join(self.out, COMMIT_RECORD), record)
        for name in (PUBLISHING, STAGING, SCRATCH):  # STAGING: with what killed writers staged
            _remove(fs, f"{root}/{name}")
        return record


def tidy(out: str) -> list[str]:
    """Remove what writers killed after a commit's record left beside the finished run at `out`
    (_publishing.json, _staging/, `.tmp` files of killed writes); returns their names. Not
    _checkpoint/: that may be the resumable state of another run under way (its owner,
    bertvision.train, removes its own). One listing when there is nothing to remove; otherwise
    done as the folder's writer (under its lease), and nothing while another process holds it
    or the folder cannot be written (read-only storage)."""
    fs, root = storage.url_to_fs(out)
    root = root.rstrip("/")
    with storage.translate_errors(out):
        names = {path.rstrip("/").rsplit("/", 1)[-1] for path in fs.ls(root, detail=False)}
    left = [name for name in (PUBLISHING, STAGING) if name in names]
    if not left and not any(storage.is_write_staging(name) for name in names):
        return []
    try:
        with lease(out) as held:  # taking it removes the stale `.tmp` files
            if commit_record(out) is None:  # a commit began since: its files are its own
                return held.removed
            for name in left:
                _remove(fs, f"{root}/{name}")
    except (FolderBusy, OSError, storage.StorageError):  # busy, or not writable here
        return []
    return sorted(left + held.removed)


def _remove(fs, path: str) -> None:
    if fs.exists(path):
        fs.rm(path, recursive=fs.isdir(path))


class Lease:
    """Exclusive, expiring hold of a folder: OUT/_lease.json, created only if absent.

    Local disks create it with O_EXCL, Azure with `If-None-Match: *` (adlfs mode "xb"), so of two
    processes starting at once exactly one gets it. The holder renews it every `ttl_s / 3`
    seconds from a background thread; a lease whose holder died is taken over once it expired
    (at once when the holder was a process on this host that no longer runs). Taking it, the
    new writer removes the `.tmp` files that killed writes left directly under the folder.
    """

    def __init__(self, out: str, ttl_s: float = 600.0) -> None:
        self.out = out
        self.url = storage.join(out, LEASE)
        self.ttl_s = ttl_s
        self.owner = f"{worker_name()}:{uuid.uuid4().hex[:8]}"
        self._stop = threading.Event()
        self._renewer: threading.Thread | None = None
        self._made_folder = False  # a local folder made for the lease, removed if left empty
        self.removed: list[str] = []  # stale `.tmp` files removed on taking the lease

    def acquire(self) -> None:
        """Take the lease, or raise FolderBusy naming its holder."""
        if not self._create():
            held = self._read()
            if held is not None and not _expired(held):
                raise FolderBusy(
                    f"{self.out} is being written by {held['owner']} (lease until "
                    f"{datetime.fromtimestamp(held['expires'], UTC).isoformat(timespec='seconds')}"
                    "); wait for it to finish, or use another --out"
                )
            fs, path = storage.url_to_fs(self.url)
            _remove(fs, path)  # its holder is gone
            if not self._create():
                raise FolderBusy(f"{self.out} was just taken by another process; use another --out")
        try:
            self._renewer = threading.Thread(target=self._renew, daemon=True)
            self._renewer.start()
            self.removed = self._remove_stale_tmp()
        except BaseException:  # Ctrl-C or SIGTERM (console.Terminated) too: not left held
            self.release()
            raise

    def _remove_stale_tmp(self) -> list[str]:
        """As the folder's writer now: remove the `.tmp` files of small writes killed midway
        (storage.write_bytes_atomic, local disks only) directly under it; their names."""
        fs, path = storage.url_to_fs(self.url)
        if not storage.is_local(fs):
            return []
        return storage.remove_stale(fs, path.rsplit("/", 1)[0], storage.is_write_staging)

    def release(self) -> None:
        self._stop.set()
        if self._renewer is not None:
            self._renewer.join()
        held = self._read()
        fs, path = storage.url_to_fs(self.url)
        if held is not None and held["owner"] == self.owner:
            _remove(fs, path)
        folder = path.rsplit("/", 1)[0]
        if self._made_folder and storage.is_local(fs) and not fs.ls(folder):
            fs.rmdir(folder)  # bad input found under the lease leaves no trace

    def _record(self) -> bytes:
        expires = time.time() + self.ttl_s
        return json.dumps({"owner": self.owner, "pid": os.getpid(), "expires": expires}).encode()

    def _create(self) -> bool:
        fs, path = storage.url_to_fs(self.url)
        folder = path.rsplit("/", 1)[0]
        if not storage.is_blob(fs) and not fs.exists(folder):
            fs.makedirs(folder, exist_ok=True)
            self._made_folder = True
        try:
            with storage.translate_errors(self.url), fs.open(path, "xb") as f:
                f.write(self._record())
        except FileExistsError:
            return False
        except Exception as exc:  # Azure: the conditional create failed (ResourceExistsError)
            if storage.is_blob(fs) and fs.exists(path):
                return False
            raise exc
        return True

    def _read(self) -> dict[str, Any] | None:
        """The lease as its holder wrote it (`_record`); None when it is gone, being written, or
        not a lease (another tool's file): such a lease holds nothing and is taken over."""
        try:
            held = strict_loads(storage.read_text(self.url))
        except (FileNotFoundError, json.JSONDecodeError):
            return None  # gone meanwhile, or being written
        if (
            not isinstance(held, dict)
            or not isinstance(held.get("owner"), str)
            or not isinstance(held.get("expires"), int | float)
        ):
            return None
        return held

    def _renew(self) -> None:
        while not self._stop.wait(self.ttl_s / 3):
            held = self._read()
            if held is None or held["owner"] != self.owner:
                return  # taken over: the holder seemed dead; nothing to renew
            storage.write_bytes_atomic(self.url, self._record())


def _expired(held: dict[str, Any]) -> bool:
    if held["expires"] < time.time():
        return True
    host = held["owner"].split(":", 1)[0]
    if host == socket.gethostname() and held.get("pid") != os.getpid():
        try:
            os.kill(held["pid"], 0)
        except ProcessLookupError:
            return True  # a process of this host that no longer runs
        except PermissionError:
            return False
    return False


@contextmanager
def lease(out: str, ttl_s: float = 600.0) -> Iterator[Lease]:
    """`with lease(out):` writes into `out` as its only writer, or raises FolderBusy."""
    held = Lease(out, ttl_s)
    held.acquire()
    try:
        yield held
    finally:
        held.release()


def once(out: str, finished: Callable[[], T | None], work: Callable[[], T]) -> T:
    """The result `finished()` finds at `out`, else `work()` run as the only writer of `out`.

    `finished` is asked again once the lease is held: another process may have finished the
    same run meanwhile. Errors: FolderBusy while another process writes `out`; PermissionError
    if `out` cannot be written.
    """
    if (done := finished()) is not None:
        tidy(out)
        return done
    storage.ensure_writable(out)
    with lease(out):
        if (done := finished()) is not None:
            return done
        return work()

"""Writing and reading shards with the commit protocol of schema.py.

A shard is written under _incomplete/, moved to its final name when complete, and committed by
writing its record to _manifest/ last. Readers trust only shards with a record, so a crash at
any point leaves either a committed shard or nothing that counts. On blob storage the shard is
instead uploaded straight to its final name, where it appears only once complete (see
storage.StagedWrite); the record stays the commit point.
"""

from __future__ import annotations

import hashlib
import io
import os
import queue
import socket
import threading
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import TypeVar

import numpy as np
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq

from bertvision import storage
from bertvision.config import VerifyConfig, require
from bertvision.quantise import dequantise
from bertvision.records import now
from bertvision.schema import (
    ID_COLUMNS,
    INCOMPLETE_DIR,
    MANIFEST_DIR,
    PLAN_FILE,
    QUANTISED_FORMAT_VERSIONS,
    READABLE_FORMATS,
    ROW_NAMES,
    ExtractionPlan,
    ShardFailure,
    ShardMeta,
    ShardRecord,
    hidden_dtype,
    plan_schema,
    shard_failure_name,
    shard_file_name,
    shard_record_name,
)

T = TypeVar("T", ExtractionPlan, ShardRecord, ShardFailure)
# On blob storage a commit record also travels as its blob's metadata, written in the same
# request, and listings return it: deciding what is done costs a listing of the manifest, not a
# request per record (~3.3 ms of Azure SDK CPU each, 33 s for 10,000). Where a record has the
# copy, every reader goes by the copy (`_stored_record`); `verify_split` checks that the content
# still says the same (another tool may change either alone).
RECORD_METADATA = "shard_record"
_RECORD_KINDS = {
    ExtractionPlan: "extraction plan",
    ShardRecord: "commit record",
    ShardFailure: "failure record",
}

# Hidden states are near-random float16: a dictionary or statistics over them cost write time
# and buy nothing, while splitting the bytes of each value into streams lets zstd save ~10%.
# Measured on 200 MiniLM-sized rows: 0.8 s and 60 MB to write, against 3.8 s and 67 MB with
# pyarrow's defaults and zstd.
# Page checksums (CRC32, cheap) let every reader detect flipped bytes in the data it decodes.
PARQUET_OPTIONS = dict(
    compression="zstd",
    use_dictionary=False,
    use_byte_stream_split=["hidden.list.element", "hidden_scale.list.element"],
    write_page_checksum=True,
)


def parquet_options(plan: ExtractionPlan) -> dict:
    """PARQUET_OPTIONS, with statistics on the row id and length columns of `plan`'s schema."""
    return PARQUET_OPTIONS | {"write_statistics": [ID_COLUMNS[plan.schema], "length"]}


class ShardError(ValueError):
    """Stored shards are missing, incomplete or inconsistent with what was asked."""


class ManifestError(ShardError, storage.FileFormatError):
    """A manifest file (plan, commit record, failure record) is garbled; the message names it."""


def read_manifest(url: str, record: type[T]) -> T:
    """The manifest file at `url` parsed as `record` (ExtractionPlan, ShardRecord or
    ShardFailure); ManifestError naming `url` if it is not valid UTF-8 JSON of that record."""
    try:
        return record.from_json(storage.read_text(url))
    except (storage.StorageError, storage.StorageUnavailable, FileNotFoundError):
        raise
    except (ValueError, TypeError) as exc:  # not JSON, not an object, missing or unknown fields
        reason = str(exc).removeprefix(f"{url} ")
        raise ManifestError(f"{url} is not a valid {_RECORD_KINDS[record]}: {reason}") from exc


def split_url(out: str, task: str, split: str) -> str:
    return storage.join(out, task, split)


def worker_name() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


class _HashingFile(io.RawIOBase):
    """Passes writes through to `sink` while hashing and counting them."""

    def __init__(self, sink) -> None:
        self._sink = sink
        self.digest = hashlib.sha256()
        self.size = 0

    def writable(self) -> bool:
        return True

    def write(self, data) -> int:
        view = memoryview(data)
        self._sink.write(view)
        self.digest.update(view)
        self.size += view.nbytes
        return view.nbytes

    def tell(self) -> int:
        return self.size

    def flush(self) -> None:
        self._sink.flush()


class ShardWriter:
    """Writes one shard; only `commit()` makes it count.

        with ShardWriter(folder, plan, index) as writer:
            for batch in batches:
                writer.write(batch)
            record = writer.commit()

    Leaving the block without commit deletes the partial file.
    """

    def __init__(self, folder: str, plan: ExtractionPlan, index: int) -> None:
        self.folder = folder
        self.plan = plan
        self.index = index
        self.schema = plan_schema(plan).with_metadata(plan.shard_meta().to_metadata())
        self._started = 0.0
        self._rows = 0
        self._committed = False

    def __enter__(self) -> ShardWriter:
        self._started = time.perf_counter()
        name = shard_file_name(self.index)
        self._staged = storage.StagedWrite(
            storage.join(self.folder, name),
            storage.join(self.folder, INCOMPLETE_DIR, storage.staging_name(name)),
        )
        self._file = _HashingFile(self._staged.file)
        try:  # the writer writes Parquet's magic bytes at once: it may find the disk full
            self._writer = pq.ParquetWriter(self._file, self.schema, **parquet_options(self.plan))
        except BaseException:
            self._staged.discard()
            raise
        return self

    def write(self, batch: pa.RecordBatch | pa.Table) -> None:
        table = pa.Table.from_batches([batch]) if isinstance(batch, pa.RecordBatch) else batch
        self._writer.write_table(table.cast(self.schema))  # type drift fails here, not in a reader
        self._rows += table.num_rows

    def commit(self) -> ShardRecord:
        start, stop = self.plan.shard_range(self.index)
        if self._rows != stop - start:
            raise ShardError(f"shard {self.index} got {self._rows} rows, expected {stop - start}")
        self._writer.close()
        self._staged.commit(sha256=self._file.digest.hexdigest())
        record = ShardRecord(
            index=self.index,
            file=shard_file_name(self.index),
            start=start,
            stop=stop,
            rows=self._rows,
            bytes=self._file.size,
            sha256=self._file.digest.hexdigest(),
            key=self.plan.shard_key(self.index),
            seconds=round(time.perf_counter() - self._started, 3),
            worker=worker_name(),
            committed_at=now(),
        )
        storage.write_text_atomic(
            manifest_url(self.folder, shard_record_name(self.index)),
            record.to_json(),
            metadata={RECORD_METADATA: record.to_json(indent=None)},
        )
        self._committed = True
        return record

    def __exit__(self, *exc_info) -> None:
        if self._committed:
            return
        try:
            self._writer.close()
        finally:
            self._staged.discard()


class BackgroundWriter:
    """Hands record batches to a ShardWriter on a thread of its own, so that the caller makes
    the next batch (the encoder's forward) while earlier ones are encoded and written.

        with ShardWriter(folder, plan, index) as writer:
            with BackgroundWriter(writer) as background:
                for batch in batches:
                    background.write(batch)
            record = writer.commit()  # every batch written: leaving the block waited for them

    At most `depth` batches wait, so memory stays flat whatever the shard's size. An error of
    the writer (a full disk, a lost connection) is raised in the caller, by the next `write` or
    on leaving the block, with a note naming the shard; what is still queued is then dropped, and
    the ShardWriter's own exit discards the partial file. An error of the caller's stops the
    writer, which drops what is queued.
    """

    def __init__(self, writer: ShardWriter, depth: int = 2) -> None:
        self._writer = writer
        self._queue: queue.Queue[pa.RecordBatch | pa.Table | None] = queue.Queue(maxsize=depth)
        self._error: BaseException | None = None
        self._stop = False
        self._thread = threading.Thread(
            target=self._run, name=f"shard-writer-{writer.index}", daemon=True
        )

    def __enter__(self) -> BackgroundWriter:
        self._thread.start()
        return self

    def write(self, batch: pa.RecordBatch | pa.Table) -> None:
        """Queue `batch` (waits while `depth` batches are queued); raises the writer's error."""
        self._raise_error()
        self._queue.put(batch)

    def __exit__(self, exc_type, *exc_info) -> None:
        self._stop = exc_type is not None
        self._queue.put(None)
        self._thread.join()
        if exc_type is None:
            self._raise_error()

    def _run(self) -> None:
        while (batch := self._queue.get()) is not None:  # drains on errors: `write` never hangs
            if self._error is None and not self._stop:
                try:
                    self._writer.write(batch)
                except BaseException as exc:
                    self._error = exc

    def _raise_error(self) -> None:
        if self._error is None:
            return
        error, self._error = self._error, None
        self._stop = True
        error.add_note(
            f"(raised writing shard {self._writer.index} of {self._writer.folder} in the "
            "background)"
        )
        raise error


def manifest_url(folder: str, name: str) -> str:
    return storage.join(folder, MANIFEST_DIR, name)


def load_plan(folder: str) -> ExtractionPlan | None:
    url = manifest_url(folder, PLAN_FILE)
    return read_manifest(url, ExtractionPlan) if storage.exists(url) else None


def write_plan(folder: str, plan: ExtractionPlan) -> None:
    storage.write_text_atomic(manifest_url(folder, PLAN_FILE), plan.to_json())


def _parse_record(url: str) -> ShardRecord | None:
    """The commit record at `url`; None if it is garbled (a torn or damaged write): such a shard
    does not count as committed, and the next extraction redoes it."""
    try:
        return read_manifest(url, ShardRecord)
    except ManifestError:
        return None


def _is_record_name(name: str) -> bool:
    return name.startswith("shard-") and name.endswith(".json") and ".failed" not in name


def _record_of_plan(name: str, record: ShardRecord | None, plan: ExtractionPlan) -> bool:
    return (
        record is not None
        and 0 <= record.index < plan.num_shards
        and name == shard_record_name(record.index)
        and record.file == shard_file_name(record.index)
        and record.key == plan.shard_key(record.index)
    )


def read_manifests(folder: str, names: list[str], record: type[T]) -> dict[str, T | None]:
    """The manifest files `names` of `folder` parsed as `record`, fetched in one call: on blob
    storage concurrent requests (fsspec's `cat` of a list), not a round trip per file. Name ->
    the record, or None for a garbled one (`read_manifest` would raise ManifestError); a file
    removed since it was listed is left out. Storage failures are raised.

    `bertvision status` on 10,000 shards on Azurite took 190 s reading their commit records
    this way, against over 600 s one by one (benchmarks/RESULTS.md); it now reads none of them
    (RECORD_METADATA)."""
    if not names:
        return {}
    url = storage.join(folder, MANIFEST_DIR)
    with storage.translate_errors(url):
        fs, root = storage.url_to_fs(url)
        paths = {name: fs._strip_protocol(f"{root}/{name}") for name in names}
        contents = fs.cat(list(paths.values()), on_error="return")
        parsed = {}
        for name, path in paths.items():
            data = contents[path]
            if isinstance(data, FileNotFoundError):
                continue
            if isinstance(data, BaseException):
                raise data
            try:
                parsed[name] = record.from_json(data.decode("utf-8"))
            except (ValueError, TypeError):  # not UTF-8 JSON of `record`
                parsed[name] = None
    return parsed


def _metadata(info: dict, name: str) -> str | None:
    """The blob metadata value `name` in fsspec's details `info`, its name in any case (copying
    tools may capitalise metadata names); None when absent (local files have none)."""
    found = {key.lower(): value for key, value in (info.get("metadata") or {}).items()}
    return found.get(name)


def _listed_record(info: dict) -> ShardRecord | None:
    """The copy of a commit record that its blob's details (a listing's, or `fs.info`'s) carry
    (RECORD_METADATA, `_metadata`); None when there is none (local files, records written by
    older versions) or it does not parse."""
    copy = _metadata(info, RECORD_METADATA)
    if copy is None:
        return None
    try:
        return ShardRecord.from_json(copy)
    except (ValueError, TypeError):
        return None


def _stored_record(url: str) -> ShardRecord | None:
    """The commit record at `url` as every reader takes it: the copy its blob carries
    (`_listed_record`), else its content; None when it is absent or garbled."""
    fs, path = storage.url_to_fs(url)
    try:
        info = fs.info(path)
    except FileNotFoundError:
        return None
    return _listed_record(info) or _parse_record(url)


def _plan_records(
    folder: str, manifest: dict[str, dict], plan: ExtractionPlan
) -> tuple[dict[int, ShardRecord], list[str]]:
    """The commit records of `plan` in `manifest` (the listing of the folder's manifest, name ->
    details), by shard index; and the names of records that do not count (garbled, or of another
    extraction). A record whose listing carries its copy (blob storage) is taken from there; the
    others are read in one call (`read_manifests`)."""
    names = [name for name in manifest if _is_record_name(name)]
    listed = {name: _listed_record(manifest[name]) for name in names}
    read = read_manifests(folder, [name for name in names if listed[name] is None], ShardRecord)
    records, others = {}, []
    for name, record in {**read, **{n: r for n, r in listed.items() if r is not None}}.items():
        if _record_of_plan(name, record, plan):
            records[record.index] = record
        else:
            others.append(name)
    return records, others


def load_records(folder: str, plan: ExtractionPlan) -> dict[int, ShardRecord]:
    """Commit records that belong to `plan` (a garbled record, or one of another extraction, does
    not count): one listing of the manifest, with the records it does not carry (local files,
    blobs written by older versions) read in one call (`_plan_records`)."""
    return _plan_records(folder, storage.list_entries(storage.join(folder, MANIFEST_DIR)), plan)[0]


def load_record(folder: str, plan: ExtractionPlan, index: int) -> ShardRecord | None:
    """The commit record of shard `index`, if there is a readable one of `plan`: a single read."""
    name = shard_record_name(index)
    record = _stored_record(manifest_url(folder, name))
    return record if _record_of_plan(name, record, plan) else None


def load_failures(folder: str, manifest: Iterable[str] | None = None) -> dict[int, ShardFailure]:
    """The failure records of the split in `folder` by shard index, read in one call; a garbled
    one still says its shard failed. `manifest`: the names in its manifest (a listing's keys), if
    listed already."""
    if manifest is None:
        manifest = storage.list_names(storage.join(folder, MANIFEST_DIR))
    names = [name for name in manifest if _is_failure(name)]
    failures = {}
    for name, failure in read_manifests(folder, names, ShardFailure).items():
        if failure is None:  # torn or damaged
            index = int(name.removeprefix("shard-").removesuffix(".failed.json"))
            error = f"its failure record {manifest_url(folder, name)} is unreadable"
            failure = ShardFailure(index, error, worker="", failed_at="")
        failures[failure.index] = failure
    return failures


def _is_failure(name: str) -> bool:
    return name.startswith("shard-") and name.endswith(".failed.json")


def record_failure(folder: str, index: int, error: BaseException) -> None:
    failure = ShardFailure(index, f"{type(error).__name__}: {error}", worker_name(), now())
    storage.write_text_atomic(manifest_url(folder, shard_failure_name(index)), failure.to_json())


def clear_failure(folder: str, index: int) -> None:
    fs, path = storage.url_to_fs(manifest_url(folder, shard_failure_name(index)))
    if fs.exists(path):
        fs.rm_file(path)


def stored_mismatch(info: dict | None, record: ShardRecord) -> str | None:
    """Why the stored file `info` (fsspec's details of it, None when it is not there) is not the
    shard `record` committed, judged by metadata alone; None when it matches.

    Compared: the size; on blob storage also the sha256 that the upload stored in the blob's
    metadata (`storage.StagedWrite.commit`) against the record's, which tells another upload of
    the same size apart. A blob without that metadata (copied in by another tool) is judged by
    its size. Every byte is compared only by `verify_split`."""
    if info is None or info.get("type") != "file":
        return "missing"
    if info["size"] != record.bytes:
        return f"{info['size']} bytes, its record says {record.bytes}"
    stored = _metadata(info, "sha256")
    if stored is not None and stored != record.sha256:
        return f"its blob's stored sha256 {stored} is not its record's {record.sha256}"
    return None


def is_committed(folder: str, record: ShardRecord | None) -> bool:
    """True if the shard file of `record` is stored as committed (`stored_mismatch`: its size,
    and its sha256 where blob metadata keeps one). Its content is checked where it is read
    (`read_shard`) and by `verify_split`, never here: deciding what is done reads no shard."""
    if record is None:
        return False
    fs, root = storage.url_to_fs(folder)
    try:
        info = fs.info(f"{root}/{record.file}")
    except FileNotFoundError:
        return False
    return stored_mismatch(info, record) is None


def committed_records(folder: str, plan: ExtractionPlan) -> dict[int, ShardRecord]:
    """Records of `plan`'s committed shards: a readable record of the plan, and the file listed
    as committed (`stored_mismatch`). One listing of the folder and the small records; no shard
    is read."""
    listing = storage.list_entries(folder)
    return {
        i: r
        for i, r in load_records(folder, plan).items()
        if stored_mismatch(listing.get(r.file), r) is None
    }


def missing_from_storage(
    folder: str, plan: ExtractionPlan, indices: Iterable[int] | None = None
) -> list[str]:
    """What a listing of `folder` now lacks of the extraction `plan`: its plan file, and for each
    shard of `indices` (default: all) the commit record and the file as committed
    (`stored_mismatch`). Each item is a URL and why; empty when everything is stored. Reads no
    shard."""
    missing = []
    plan_url = manifest_url(folder, PLAN_FILE)
    try:
        stored = load_plan(folder)
    except (ValueError, TypeError) as exc:
        missing.append(f"{plan_url} (unreadable: {exc})")
    else:
        if stored is None:
            missing.append(f"{plan_url} (missing)")
        elif stored.key != plan.key:
            missing.append(f"{plan_url} (holds another extraction, key {stored.key})")
    records, listing = load_records(folder, plan), storage.list_entries(folder)
    for i in range(plan.num_shards) if indices is None else indices:
        if i not in records:
            missing.append(f"{manifest_url(folder, shard_record_name(i))} (commit record missing)")
            continue
        problem = stored_mismatch(listing.get(records[i].file), records[i])
        if problem is not None:
            missing.append(f"{storage.join(folder, records[i].file)} ({problem})")
    return missing


def _is_leftover(sub: str, name: str) -> bool:
    """Staging files: anything under _incomplete/, `.tmp` files beside the manifest's records."""
    return sub == INCOMPLETE_DIR or (sub == MANIFEST_DIR and name.endswith(storage.TMP_SUFFIX))


def remove_stale_leftovers(folder: str) -> list[str]:
    """Remove the staging files that writers now gone left in a split folder (shards under
    _incomplete/, `.tmp` records); a live writer's are kept. Returns the URLs removed."""
    removed = []
    for sub in (INCOMPLETE_DIR, MANIFEST_DIR):
        url = storage.join(folder, sub)
        with storage.translate_errors(url):
            fs, path = storage.url_to_fs(url)
            names = storage.remove_stale(fs, path, lambda name, sub=sub: _is_leftover(sub, name))
        removed += [storage.join(url, name) for name in names]
    return removed


def remove_empty_staging(folder: str) -> bool:
    """Remove the split's staging folder _incomplete/ if it is empty (a complete extraction's
    last commit leaves it so); whether it was removed. Only an empty folder goes: a file another
    writer is staging there keeps it (the removal is one rmdir, which fails on a folder that is
    not empty). Blob storage has no folders: nothing to do there."""
    fs, path = storage.url_to_fs(storage.join(folder, INCOMPLETE_DIR))
    if not storage.is_local(fs):
        return False
    try:
        fs.rmdir(path)
    except OSError:  # absent, or not empty: a writer is staging a shard
        return False
    return True


def split_status(folder: str) -> dict:
    """Rows (examples, or a span extraction's windows: `rows` says which), the stored dtype and
    shard format, and shard counts of one task/split: total, done, failed, missing (and which
    failed and which are missing); and the files
    that are not part of it: `strays` (in the split folder, or a garbled record: what a plain
    `pyarrow.dataset` of the folder might read, or what a rerun replaces) and `leftovers`
    (staging files of writers, live or gone). Reads no shard."""
    plan = load_plan(folder)
    if plan is None:
        raise ShardError(f"{folder} holds no extraction (no {MANIFEST_DIR}/{PLAN_FILE})")
    listing = storage.list_entries(folder)
    manifest = storage.list_entries(storage.join(folder, MANIFEST_DIR))
    records, others = _plan_records(folder, manifest, plan)
    strays = [f"{MANIFEST_DIR}/{name}" for name in sorted(others)]
    done = {i for i, r in records.items() if stored_mismatch(listing.get(r.file), r) is None}
    committed_files = {records[i].file for i in done}
    strays += [
        name
        for name in sorted(listing)
        if not name.startswith(("_", ".")) and name not in committed_files
    ]
    leftovers = [f"{MANIFEST_DIR}/{name}" for name in manifest if _is_leftover(MANIFEST_DIR, name)]
    leftovers += [
        f"{INCOMPLETE_DIR}/{name}"
        for name in storage.list_entries(storage.join(folder, INCOMPLETE_DIR))
    ]
    failed = set(load_failures(folder, manifest)) - done
    return {
        "task": plan.task,
        "split": plan.split,
        "model": plan.model,
        "key": plan.key,
        "dtype": plan.dtype,
        "format_version": plan.format_version,
        "examples": plan.num_examples,  # rows: windows in span extractions
        "examples_done": sum(records[i].rows for i in done),
        "rows": ROW_NAMES[plan.schema],  # what they are: "examples" or "windows"
        "shards": plan.num_shards,
        "done": len(done),
        "failed": len(failed),
        "missing": plan.num_shards - len(done) - len(failed),
        "failed_shards": sorted(failed),
        "missing_shards": sorted(set(range(plan.num_shards)) - done - failed),
        "strays": strays,
        "leftovers": sorted(leftovers),
    }


def status(out: str) -> dict[str, dict]:
    """split_status of every task/split extracted under `out`, keyed "task/split"."""
    result = {}
    for task in storage.list_names(out):
        for split in storage.list_names(storage.join(out, task)):
            folder = split_url(out, task, split)
            if storage.exists(manifest_url(folder, PLAN_FILE)):
                result[f"{task}/{split}"] = split_status(folder)
    return result


def pipeline_hint(out: str) -> str:
    """ "; ...": where the embeddings are when `out` is a pipeline's output (`bertvision run
    --out`), whose extraction lives in OUT/embeddings; else ""."""
    embeddings = storage.join(out, "embeddings")
    return f"; a pipeline's embeddings are in {embeddings}" if storage.exists(embeddings) else ""


def committed_shards(out: str, task: str, split: str) -> tuple[ExtractionPlan, list[str]]:
    """The plan and the URLs of all shards of a complete extraction, in shard order: exactly the
    committed shards, whatever else the folder holds."""
    folder = split_url(out, task, split)
    plan = load_plan(folder)
    if plan is None:
        hint = pipeline_hint(out) or "; run extract first"
        raise ShardError(f"no embeddings for {task}/{split} under {out}{hint}")
    records = committed_records(folder, plan)
    missing = [i for i in range(plan.num_shards) if i not in records]
    if missing:
        raise ShardError(
            f"embeddings of {task}/{split} under {out} are incomplete: "
            f"{len(missing)} of {plan.num_shards} shards not committed; rerun extract"
        )
    return plan, [storage.join(folder, records[i].file) for i in range(plan.num_shards)]


# Reading verifies Parquet's page checksums (shards written before they were stored have none,
# and read as before).
_READ_OPTIONS = dict(page_checksum_verification=True)


def split_dataset(out: str, task: str, split: str) -> ds.Dataset:
    """The committed shards of a complete extraction as one `pyarrow.dataset.Dataset`: stray or
    duplicate files in the folder, and shards without a commit record, are not part of it.

    Decoding verifies each data page's checksum (an OSError names a corrupt page); `read_shard`
    verifies whole shards against their records."""
    _, urls = committed_shards(out, task, split)
    fs, _ = storage.url_to_fs(urls[0])
    scan = ds.ParquetFragmentScanOptions(**_READ_OPTIONS)
    return ds.dataset(
        [storage.url_to_fs(url)[1] for url in urls],
        format=ds.ParquetFileFormat(default_fragment_scan_options=scan),
        filesystem=fs,
    )


def read_shard(url: str, columns: list[str] | None = None) -> tuple[ShardMeta, pa.Table]:
    """A committed shard's metadata and table (only `columns`, if given), as committed.

    The whole file (`columns=None`) is checked against its record's size and sha256; a partial
    read against the page checksums, the record's row count and extraction key (and on any doubt
    against the sha256). A shard that differs from what was committed loses its commit record,
    so that the next extraction redoes it, and raises ShardError naming it. Errors: ShardError
    also when `url` is not a committed shard."""
    folder, name = url.rsplit("/", 1)
    record = _record_of_file(folder, name)
    fs, path = storage.url_to_fs(url)
    if columns is None:
        with storage.translate_errors(url):
            data = fs.cat_file(path)
        if len(data) != record.bytes or hashlib.sha256(data).hexdigest() != record.sha256:
            raise _corrupt(folder, record, "its bytes differ from the committed ones (sha256)")
        table = pq.read_table(pa.BufferReader(data), **_READ_OPTIONS)
        return _readable(url, ShardMeta.from_metadata(table.schema.metadata)), table
    error = None
    try:
        with storage.translate_errors(url), fs.open(path, "rb") as f:
            table = pq.read_table(f, columns=columns, **_READ_OPTIONS)
        meta = ShardMeta.from_metadata(table.schema.metadata)
        consistent = table.num_rows == record.rows and record.key.startswith(
            f"{meta.extraction_key}:"
        )
    except (storage.StorageError, ConnectionError, TimeoutError):  # storage, not the shard
        raise
    except (OSError, ValueError) as exc:  # pyarrow: a failed page checksum, an unreadable footer
        consistent, error = False, exc
    if not consistent:
        with storage.translate_errors(url):
            intact = storage.sha256_file(fs, path) == record.sha256
        if not intact:
            raise _corrupt(
                folder, record, f"it differs from the committed one ({error or 'footer'})"
            )
    if error is not None:
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ShardError(f"shard {url} cannot be read: {reason}") from error
    return _readable(url, meta), table


def iter_row_groups(url: str, columns: list[str] | None = None) -> Iterator[pa.Table]:
    """A committed shard one row group (one batch of the extraction) at a time, in row order:
    memory holds one row group, not the shard.

    Every page read is checked against its Parquet page checksum; a shard that fails it (or whose
    pages cannot be decoded) and no longer matches its record's sha256 is marked for redo and
    raises ShardError naming it, as in `read_shard`."""
    folder, name = url.rsplit("/", 1)
    record = _record_of_file(folder, name)
    fs, path = storage.url_to_fs(url)
    try:
        with storage.translate_errors(url), fs.open(path, "rb") as f:
            file = pq.ParquetFile(f, **_READ_OPTIONS)
            _readable(url, ShardMeta.from_metadata(file.schema_arrow.metadata))
            for index in range(file.num_row_groups):
                yield file.read_row_group(index, columns=columns)
    except (storage.StorageError, ConnectionError, TimeoutError, ShardError):
        raise
    except (OSError, ValueError) as exc:  # pyarrow: a failed page checksum, an unreadable footer
        with storage.translate_errors(url):
            intact = storage.sha256_file(fs, path) == record.sha256
        if not intact:
            raise _corrupt(folder, record, f"it differs from the committed one ({exc})") from exc
        raise


def _readable(url: str, meta: ShardMeta) -> ShardMeta:
    if meta.schema not in READABLE_FORMATS:
        raise ShardError(
            f"shard {url} has schema {meta.schema!r}; this version of BERTVision reads "
            f"{', '.join(READABLE_FORMATS)}"
        )
    if meta.format_version not in READABLE_FORMATS[meta.schema]:
        raise ShardError(
            f"shard {url} has format_version {meta.format_version}; this version of BERTVision "
            f"reads {', '.join(map(str, READABLE_FORMATS[meta.schema]))}"
            + (f" ({meta.schema} shards)" if meta.schema != "glue" else "")
        )
    try:
        quantised = hidden_dtype(meta.dtype).quantised
    except ValueError as exc:
        raise ShardError(f"shard {url} stores hidden states as {exc}") from None
    if quantised != (meta.format_version == QUANTISED_FORMAT_VERSIONS[meta.schema]):
        raise ShardError(
            f"shard {url} claims format_version {meta.format_version} for {meta.dtype} hidden "
            "states, which are never stored so; it was not written by BERTVision"
        )
    return meta


def _record_of_file(folder: str, name: str) -> ShardRecord:
    """The readable commit record that names shard file `name` in `folder`."""
    record = None
    if name.startswith("shard-") and name.endswith(".parquet"):
        record = _stored_record(manifest_url(folder, name.removesuffix(".parquet") + ".json"))
    if record is None or record.file != name:
        raise ShardError(
            f"{storage.join(folder, name)} is not a committed shard (no readable commit record "
            f"in {MANIFEST_DIR}/); rerun extract"
        )
    return record


def uncommit(folder: str, record: ShardRecord, why: str) -> None:
    """Mark the shard of `record` for redo: a failure record saying `why`, then its commit record
    removed if it is still this one (a rerun may have committed a new one meanwhile). The next
    `extract` redoes exactly this shard; the shard file stays until then."""
    record_failure(folder, record.index, ShardError(why))
    record_url = manifest_url(folder, shard_record_name(record.index))
    if _stored_record(record_url) == record:
        fs, path = storage.url_to_fs(record_url)
        fs.rm_file(path)


def _corrupt(folder: str, record: ShardRecord, why: str) -> ShardError:
    """Mark shard `record` for redo (`uncommit`) and return the error to raise."""
    url = storage.join(folder, record.file)
    problem = f"shard {url} is corrupt: {why}"
    try:
        uncommit(folder, record, f"{problem}; found on read")
    except Exception as exc:  # a read-only reader: the user can do what we could not
        return ShardError(
            f"{problem}; could not mark it for redo ({exc}): delete "
            f"{manifest_url(folder, shard_record_name(record.index))}, then rerun extract"
        )
    return ShardError(f"{problem}; it no longer counts as committed: rerun extract to redo it")


def iter_split(
    out: str, task: str, split: str, columns: list[str] | None = None
) -> Iterator[pa.Table]:
    """The tables of a complete extraction's shards, in shard order."""
    _, urls = committed_shards(out, task, split)
    for url in urls:
        yield read_shard(url, columns)[1]


def hidden_arrays(table: pa.Table, meta: ShardMeta | ExtractionPlan) -> list[np.ndarray]:
    """Each row's hidden states as a float array of shape (L, T, H): float16 and float32 as
    stored, without copying; int8 dequantised to float32 (`bertvision.quantise`).

    Reads every format: `hidden` as raw bytes (formats 6, 7), as a large_list (formats 2, 3:
    int64 offsets) or a list (format 1: int32 offsets), chunk by chunk, so no chunk's offsets
    ever have to hold a whole shard's values; int8 (formats 4, 5) as `quantised_arrays`.
    """
    stored = hidden_dtype(meta.dtype)
    if stored.quantised:
        return [dequantise(values, scales) for values, scales in quantised_arrays(table, meta)]
    lengths = table.column("length").to_numpy()
    shapes = [(meta.layers, t, meta.hidden_size) for t in lengths]
    column = table.column("hidden")
    if pa.types.is_large_binary(column.type):
        return _binary_rows(column, stored.numpy, shapes)
    return _list_rows(column, shapes)


def quantised_arrays(
    table: pa.Table, meta: ShardMeta | ExtractionPlan
) -> list[tuple[np.ndarray, np.ndarray]]:
    """Each row's int8 values (L, T, H) and float16 scales (L, T) as an int8 shard stores them
    (`hidden`'s bytes and `hidden_scale`), without copying; `quantise.dequantise` makes them
    states."""
    lengths = table.column("length").to_numpy()
    scales = _list_rows(table.column("hidden_scale"), [(meta.layers, t) for t in lengths])
    shapes = [(meta.layers, t, meta.hidden_size) for t in lengths]
    values = _binary_rows(table.column("hidden"), np.dtype(np.int8), shapes)
    return list(zip(values, scales, strict=True))


def _binary_rows(
    column: pa.ChunkedArray, dtype: np.dtype, shapes: list[tuple[int, ...]]
) -> list[np.ndarray]:
    """Each row of a large_binary column read as `dtype` values (little-endian) of its shape,
    without copying."""
    rows = []
    for chunk in column.chunks:
        if not len(chunk):
            continue
        _, offsets, data = chunk.buffers()
        bounds = np.frombuffer(offsets, np.int64)[chunk.offset : chunk.offset + len(chunk) + 1]
        flat = np.frombuffer(data, np.uint8)
        for i in range(len(chunk)):
            row = flat[bounds[i] : bounds[i + 1]].view(dtype)
            rows.append(row.reshape(shapes[len(rows)]))
    return rows


def _list_rows(column: pa.ChunkedArray, shapes: list[tuple[int, ...]]) -> list[np.ndarray]:
    """Each row of a list column (list or large_list) reshaped to its shape, without copying."""
    rows = []
    for chunk in column.chunks:
        values = chunk.values.to_numpy(zero_copy_only=False)  # zero-copy: no nulls
        offsets = chunk.offsets.to_numpy().astype(np.int64)  # into `values`, also when sliced
        for i in range(len(chunk)):
            rows.append(values[offsets[i] : offsets[i + 1]].reshape(shapes[len(rows)]))
    return rows


# -- the full audit (`bertvision verify`) ------------------------------------------------------


@dataclass
class SplitCheck:
    """What `verify_split` found in one task/split.

    `shards`: planned; `checked`: with a commit record of the plan, each read in full; `pending`:
    without one (not done yet, nothing to check); `bad`: shard index -> why it is not what was
    committed; `redone`: the bad shards uncommitted (with `redo`); `bytes_read`: bytes of the
    shards read; `seconds`: wall-clock time of the check."""

    task: str
    split: str
    shards: int
    checked: int = 0
    pending: int = 0
    bad: dict[int, str] = field(default_factory=dict)
    redone: list[int] = field(default_factory=list)
    bytes_read: int = 0
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return not self.bad


def check_shard(folder: str, plan: ExtractionPlan, record: ShardRecord) -> tuple[list[str], int]:
    """Every byte of the committed shard `record` checked: the problems found (empty when it is
    what was committed) and the bytes read.

    Checked: the file is there with the recorded size and its sha256 is the record's; it opens as
    a shard of a format this version reads, written by the plan's extraction (its
    `bertvision.extraction_key`), with the record's row count; every data page decodes and
    passes its page checksum (shards written before checksums have none); its row ids are
    exactly the record's range. Memory: the shard's bytes and one row group decoded.
    Storage failures (StorageError, StorageUnavailable) are raised, not reported."""
    url = storage.join(folder, record.file)
    fs, path = storage.url_to_fs(url)
    try:
        with storage.translate_errors(url):
            data = fs.cat_file(path)
    except FileNotFoundError:
        return ["missing"], 0
    problems = []
    if len(data) != record.bytes:
        problems.append(f"{len(data)} bytes, its record says {record.bytes}")
    if hashlib.sha256(data).hexdigest() != record.sha256:
        problems.append("its sha256 is not the one recorded at commit")
    try:
        file = pq.ParquetFile(pa.BufferReader(data), **_READ_OPTIONS)
        meta = _readable(url, ShardMeta.from_metadata(file.schema_arrow.metadata))
        if meta.extraction_key != plan.key:
            problems.append(f"written by extraction {meta.extraction_key}, the plan is {plan.key}")
        if file.metadata.num_rows != record.rows:
            problems.append(f"{file.metadata.num_rows} rows, its record says {record.rows}")
        # Every page of every column decoded. One thread: Arrow's thread pool, once started in
        # a process that also loaded torch, can abort the interpreter's exit (apache/arrow#34314;
        # `bertvision verify` exited 134 in 5 of 6 runs); hashing bounds the time here anyway.
        ids = [
            file.read_row_group(i, use_threads=False).column(ID_COLUMNS[plan.schema]).to_numpy()
            for i in range(file.num_row_groups)
        ]
        found = np.sort(np.concatenate(ids)) if ids else np.empty(0, np.int64)
        if not np.array_equal(found, np.arange(record.start, record.stop)):
            problems.append(f"its row ids are not exactly {record.start}..{record.stop - 1}")
    except (OSError, ValueError, KeyError) as exc:  # a failed page checksum, a garbled footer
        problems.append(f"unreadable: {_first_line(exc)}")
    return problems, len(data)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def verify_split(folder: str, redo: bool = False) -> SplitCheck:
    """Read every committed shard of the extraction in `folder` in full (`check_shard`), and
    every commit record's content: where deciding went by the record's copy in its blob's
    metadata, the content must say the same.

    With `redo`, each bad shard is uncommitted (`uncommit`), so the next `extract` redoes exactly
    those; good shards are not touched. Shards without a commit record are pending, not read.
    ShardError if `folder` holds no extraction."""
    started = time.perf_counter()
    plan = load_plan(folder)
    if plan is None:
        raise ShardError(f"{folder} holds no extraction (no {MANIFEST_DIR}/{PLAN_FILE})")
    manifest = storage.list_entries(storage.join(folder, MANIFEST_DIR))
    records = _plan_records(folder, manifest, plan)[0]
    names = {index: shard_record_name(index) for index in records}
    copies = [name for name in names.values() if _listed_record(manifest[name]) is not None]
    contents = read_manifests(folder, copies, ShardRecord)  # records read from copies only
    check = SplitCheck(plan.task, plan.split, plan.num_shards, pending=plan.num_shards)
    for index in sorted(records):
        problems, size = check_shard(folder, plan, records[index])
        if names[index] in contents and contents[names[index]] != records[index]:
            problems.append("its commit record's content differs from the copy in its metadata")
        check.checked += 1
        check.pending -= 1
        check.bytes_read += size
        if problems:
            check.bad[index] = "; ".join(problems)
            if redo:
                url = storage.join(folder, records[index].file)
                why = f"shard {url} is bad: {check.bad[index]}; found by verify"
                uncommit(folder, records[index], why)
                check.redone.append(index)
    check.seconds = time.perf_counter() - started
    return check


def extraction_folders(out: str, task: str = "", split: str = "") -> dict[str, str]:
    """The split folders holding an extraction under `out`, keyed "task/split" (only `task` and
    `split` when given). ShardError naming `out` when there is none."""
    if not storage.exists(out):
        raise ShardError(f"{out} does not exist")
    folders = {}
    for name in storage.list_names(out):
        for part in storage.list_names(storage.join(out, name)):
            folder = split_url(out, name, part)
            if storage.exists(manifest_url(folder, PLAN_FILE)):
                folders[f"{name}/{part}"] = folder
    if not folders:
        raise ShardError(
            f"{out} holds no extraction (no TASK/SPLIT/_manifest/plan.json under it)"
            + pipeline_hint(out)
        )
    chosen = {
        name: folder
        for name, folder in folders.items()
        if (not task or name.split("/")[0] == task) and (not split or name.split("/")[1] == split)
    }
    if not chosen:
        wanted = "/".join([task or "*", split or "*"])
        raise ShardError(f"{out} holds no extraction of {wanted}; it holds {', '.join(folders)}")
    return chosen


def verify(cfg: VerifyConfig) -> dict[str, SplitCheck]:
    """`verify_split` of every task/split extracted under `cfg.out` (or only `cfg.task`,
    `cfg.split`), keyed "task/split". ShardError if there is none."""
    require(cfg)
    return {
        name: verify_split(folder, cfg.redo)
        for name, folder in extraction_folders(cfg.out, cfg.task, cfg.split).items()
    }

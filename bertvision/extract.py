"""Extraction of the hidden states of ALL encoder layers for every example, into shards.

    plans = prepare_extraction(cfg)          # validate everything, write one plan per split
    for plan in plans:
        for index in pending_shards(cfg, plan):
            extract_shard(cfg, plan, index)  # one unit of work: resumable, retryable
        finish_split(cfg, plan, done)        # final listing; complete: the run record

`extract_hidden_states(cfg)` does all of that. Inside a shard, examples are sorted by token
length and batched so that padding stays small; each batch becomes one record batch of the
shard, written as it comes.

Two kinds of rows, by task (`is_span_task`): a GLUE task stores one row per example
(schema.shard_schema); SQuAD 2.0 (`squad2`) one row per window of a question's context, the
windows of `squad.build_features` with the config's max_seq_length, doc_stride and
max_question_length (schema.span_schema), and its shards are ranges of windows.
A shard holds at most `shard_size` rows, fewer when `shard_bytes` would be passed by rows of
max_seq_length tokens (`rows_per_shard`).

An encoder fine-tuned by BERTVision (its folder holds the fine-tuning's run record, describing
an encoder of the same fingerprint: `finetuned_encoder`) is named in each split's run record
with what it was fine-tuned on (finetune.FinetunedEncoder), which adapter training checks its
held-out slice against. Its train split must then be read from the data it was fine-tuned on
(the same first examples), or which train examples it saw could not be told: refused.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime, timedelta
from functools import cache, lru_cache, partial
from typing import TypeVar

import numpy as np
import pyarrow as pa
import torch

from bertvision import encoder as enc
from bertvision import glue, records, runs, squad, storage
from bertvision.config import ConfigError, ExtractConfig, require
from bertvision.finetune import FinetunedEncoder
from bertvision.finite import NonFiniteError
from bertvision.quantise import INT8_MAX, quantise
from bertvision.schema import (
    LIST_FORMATS,
    RUN_FILE,
    ExtractionPlan,
    HiddenDtype,
    ShardRecord,
    format_version,
    hidden_dtype,
    plan_schema,
)
from bertvision.shards import (
    BackgroundWriter,
    ShardError,
    ShardWriter,
    clear_failure,
    committed_records,
    is_committed,
    load_plan,
    load_record,
    manifest_url,
    missing_from_storage,
    record_failure,
    remove_empty_staging,
    remove_stale_leftovers,
    split_url,
    worker_name,
    write_plan,
)


@dataclass
class ExtractSummary:
    out: str
    committed: dict[str, list[int]]  # "task/split" -> shards written by this call
    skipped: dict[str, list[int]]  # already committed before
    failed: dict[str, dict[int, str]]  # shard -> error
    # "task/split" -> what a final listing lacks of what counted as committed ("URL (why)")
    missing: dict[str, list[str]] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not any(self.failed.values()) and not any(self.missing.values())


def data_version(data_dir: str | None) -> str:
    """What the in-process caches of the data read from `data_dir` key on beside its URL
    (storage.listing_version: rewritten files are read again); "" for the hub's data."""
    return "" if data_dir is None else storage.listing_version(data_dir)


def _load_examples(
    task: str, split: str, data_dir: str | None, max_train_examples: int | None = None
) -> tuple[list[glue.Example], str]:
    """The examples of `split` and their fingerprint; of "train", the first
    `max_train_examples` (None: all), the ones fine-tuning with the same setting reads. Read and
    hashed once per process while the data folder's files stay as they are (`data_version`),
    not once per shard (MNLI train has 393k examples)."""
    return _examples(task, split, data_dir, max_train_examples, data_version(data_dir))


@lru_cache(maxsize=4)
def _examples(
    task: str, split: str, data_dir: str | None, max_train_examples: int | None, version: str
) -> tuple[list[glue.Example], str]:
    examples = glue.load_split(task, split, data_dir)
    examples = examples[:max_train_examples] if split == "train" else examples
    return examples, glue.data_fingerprint(examples)


def is_span_task(task: str) -> bool:
    """True for a task stored one row per window (SQuAD 2.0), False for GLUE's one per example.
    The one place extraction tells the two apart."""
    from bertvision.families import get_task

    return get_task(task).family.schema == "span"


def rows_per_shard(cfg: ExtractConfig, encoder: enc.Encoder) -> int:
    """Rows (examples or windows) per shard: `cfg.shard_size`, or fewer so that rows of
    `max_seq_length` tokens of every layer stay within `cfg.shard_bytes` of hidden states;
    at least 1. Only real tokens are stored, so shards of shorter rows are smaller.

    bert-large (25 layers x 1024) stores 19.7 MB a 384-token window in float16: 54 windows a
    GiB."""
    token_bytes = hidden_dtype(cfg.dtype).token_bytes(encoder.layers, encoder.hidden_size)
    row_bytes = cfg.max_seq_length * token_bytes
    return max(1, min(cfg.shard_size, cfg.shard_bytes // row_bytes))


def prepare_extraction(cfg: ExtractConfig) -> list[ExtractionPlan]:
    """Check task, data, model, length and output, then write one plan per split.

    Every check runs before anything is written, so bad input leaves no trace; an extraction
    already complete with the same plans is read, never written (not even a write probe).
    """
    require(cfg)
    span = is_span_task(cfg.task)
    if span:
        splits = planned_splits(cfg.task, cfg.splits)
        for split in splits:
            _load_questions(split, cfg.data_dir, cfg.max_train_examples)  # before the model's
        regression = False
    else:
        task = glue.get_task(cfg.task)
        splits = planned_splits(cfg.task, cfg.splits)
        for split in splits:
            _load_examples(task.name, split, cfg.data_dir, cfg.max_train_examples)
        regression = task.regression
    config = enc.check_encoder(cfg.model)
    enc.check_max_seq_length(cfg.model, config, cfg.max_seq_length)
    rows, fingerprints = {}, {}
    for split in splits:
        if span:
            windows = _load_windows(cfg, split)  # the lengths' errors before anything is written
            rows[split], fingerprints[split] = len(windows.features), windows.fingerprint
        else:
            where = (cfg.task, split, cfg.data_dir, cfg.max_train_examples)
            examples, fingerprints[split] = _load_examples(*where)
            rows[split] = len(examples)
    folders = {split: split_url(cfg.out, cfg.task, split) for split in splits}
    existing = _stored_plans(cfg.out, folders)  # each read once
    complete = all(_is_complete(folders[s], existing[s]) for s in splits)
    if not complete:  # before the model loads; a finished extraction is checked, not written
        storage.ensure_writable(cfg.out)
    encoder = enc.load_encoder(cfg.model, cfg.device)
    finetuned = finetuned_encoder(cfg.model, encoder.fingerprint)  # weights changed: refused
    if "train" in splits:
        _check_finetuned_data(cfg, finetuned)
    code = records.code_info()
    schema = "span" if span else "glue"
    plans = [
        ExtractionPlan(
            task=cfg.task,
            split=split,
            model=cfg.model,
            model_fingerprint=encoder.fingerprint,
            data_fingerprint=fingerprints[split],
            num_examples=rows[split],
            shard_size=rows_per_shard(cfg, encoder),
            max_seq_length=cfg.max_seq_length,
            dtype=cfg.dtype,
            layers=encoder.layers,
            hidden_size=encoder.hidden_size,
            regression=regression,
            format_version=format_version(schema, cfg.dtype),
            code_version=code["version"],
            git_commit=code["git_commit"],
            schema=schema,
            doc_stride=cfg.doc_stride if span else 0,
            max_question_length=cfg.max_question_length if span else 0,
            shard_bytes=cfg.shard_bytes,
        )
        for split in splits
    ]
    plans = [_in_planned_format(cfg, plan, existing[plan.split]) for plan in plans]
    for plan in plans:
        _check_no_other_extraction(cfg, plan, existing[plan.split])
    if complete and any(plan.key != existing[plan.split].key for plan in plans):
        storage.ensure_writable(cfg.out)  # another extraction replaces it (cfg.overwrite)
    for plan in plans:
        folder, stored = folders[plan.split], existing[plan.split]
        if stored is not None and stored.key != plan.key:  # only with cfg.overwrite
            fs, path = storage.url_to_fs(folder)
            fs.rm(path, recursive=True)
        if stored is None or stored.key != plan.key:
            write_plan(folder, plan)
        remove_stale_leftovers(folder)  # of killed writers; a live writer's stay
    storage.remove_stale_spool()
    return plans


def finetuned_encoder(model: str, fingerprint: str) -> FinetunedEncoder | None:
    """What the encoder at `model` (its fingerprint `fingerprint`) was fine-tuned on, when a
    BERTVision fine-tuning made it: the description in the fine-tuning's run record in its
    folder. None for any other model: a hub name, a folder without such a record, or with one
    written before the descriptions were kept. FileFormatError naming the record when it is
    garbled, or when it describes another encoder than the folder holds now: weights changed
    (or damaged) since the fine-tuning committed them."""
    if enc.is_hub_name(model):
        return None
    url = storage.join(model, runs.COMMIT_RECORD)
    record = records.read_record(url)
    if record is None or record.kind != "finetune":
        return None
    finetuned = FinetunedEncoder.from_record(record, url)
    if finetuned is not None and finetuned.fingerprint != fingerprint:
        raise storage.FileFormatError(
            f"{model} holds other weights than its fine-tuning committed ({url} records the "
            f"encoder {finetuned.fingerprint}, the folder's is {fingerprint}): changed or damaged "
            "since; remove it and fine-tune again, or extract from a copy of the weights "
            f"without its {runs.COMMIT_RECORD}"
        )
    return finetuned


def _check_finetuned_data(cfg: ExtractConfig, finetuned: FinetunedEncoder | None) -> None:
    """ConfigError naming --data-dir when `finetuned`, the encoder, was fine-tuned on this
    task's TRAIN but the data read here does not begin with the examples it read (their
    fingerprints differ): which train examples it trained on could not be told, nor so whether an
    adapter's held-out slice holds some."""
    from bertvision.families import get_task

    if finetuned is None or finetuned.task != get_task(cfg.task).name:
        return
    count = finetuned.train_examples
    if is_span_task(cfg.task):
        fingerprint = squad.data_fingerprint(_load_questions("train", cfg.data_dir, count))
    else:
        _, fingerprint = _load_examples(finetuned.task, "train", cfg.data_dir, count)
    if fingerprint != finetuned.data_fingerprint:
        source = cfg.data_dir or "the hub's data"
        raise ConfigError(
            "data_dir",
            f"{source}: model {cfg.model} was fine-tuned on {finetuned.task} train data whose "
            f"first {count} examples are others (fingerprint {finetuned.data_fingerprint}, "
            f"here {fingerprint}); which train examples it learnt could not be told, nor an "
            "adapter's held-out slice checked against them: extract from the data it was "
            "fine-tuned on",
        )


def _stored_plans(out: str, folders: dict[str, str]) -> dict[str, ExtractionPlan | None]:
    """The plan stored in each split's folder (None where there is none yet), each read once.
    Storage refusing OUT (a missing container, wrong credentials) is reported as the write check
    reports it: one line naming OUT."""
    try:
        return {split: load_plan(folder) for split, folder in folders.items()}
    except storage.StorageError:
        storage.ensure_writable(out)  # raises the one line naming OUT
        raise


def _is_complete(folder: str, plan: ExtractionPlan | None) -> bool:
    """Whether `folder` holds a complete extraction of `plan` (its run record, written once
    every shard is committed, has the plan's key)."""
    if plan is None:
        return False
    stored = records.read_record(manifest_url(folder, RUN_FILE))
    return stored is not None and stored.key == plan.key


def _in_planned_format(
    cfg: ExtractConfig, plan: ExtractionPlan, existing: ExtractionPlan | None
) -> ExtractionPlan:
    """`plan` in the list format (schema.LIST_FORMATS) of the same extraction already planned in
    its folder (`existing`, the plan stored there): one begun before the raw-bytes formats
    finishes in its own format, its key and committed shards unchanged. With `cfg.overwrite`,
    or nothing planned there, `plan` itself."""
    if cfg.overwrite or existing is None or existing.format_version not in LIST_FORMATS:
        return plan
    planned = replace(plan, format_version=existing.format_version)
    return planned if planned.key == existing.key else plan


def _check_no_other_extraction(
    cfg: ExtractConfig, plan: ExtractionPlan, existing: ExtractionPlan | None
) -> None:
    """A ShardError when the folder of `plan` holds `existing`, another extraction, unless
    `cfg.overwrite`."""
    folder = split_url(cfg.out, plan.task, plan.split)
    if existing is None or existing.key == plan.key or cfg.overwrite:
        return
    changed = [
        k
        for k in (
            "model_fingerprint",
            "data_fingerprint",
            "shard_size",
            "max_seq_length",
            "doc_stride",
            "max_question_length",
            "dtype",
            "format_version",
        )
        if getattr(existing, k) != getattr(plan, k)
    ]
    raise ShardError(
        f"{folder} holds another extraction (different {', '.join(changed)}); "
        "use another --out, or --overwrite to replace it"
    )


def pending_shards(cfg: ExtractConfig, plan: ExtractionPlan) -> list[int]:
    """Shards of `plan` without a readable commit record of the plan and a file of the recorded
    size. Reads no shard: corruption is caught where shards are read (`shards.read_shard`), which
    takes the record away, so the shard is pending again."""
    folder = split_url(cfg.out, plan.task, plan.split)
    records = committed_records(folder, plan)
    return [i for i in range(plan.num_shards) if i not in records]


def extract_shard(
    cfg: ExtractConfig, plan: ExtractionPlan, index: int, progress: bool = False
) -> ShardRecord:
    """Compute and commit shard `index` of `plan`; a committed one is returned as it is.
    `progress`: a bar of the shard's examples (where no caller draws one over the split's)."""
    from tqdm.auto import tqdm

    folder = split_url(cfg.out, plan.task, plan.split)
    record = load_record(folder, plan, index)
    if is_committed(folder, record):
        return record
    try:
        start, stop = plan.shard_range(index)
        if plan.schema == "span":
            windows = _load_windows(cfg, plan.split)
            fingerprint = windows.fingerprint
        else:
            where = (plan.task, plan.split, cfg.data_dir, cfg.max_train_examples)
            examples, fingerprint = _load_examples(*where)
        if fingerprint != plan.data_fingerprint:
            raise ShardError(
                f"the data of {plan.task}/{plan.split} changed since the plan was "
                "written; rerun with --overwrite"
            )
        encoder = enc.load_encoder(cfg.model, cfg.device)
        if encoder.fingerprint != plan.model_fingerprint:
            raise ShardError(f"model {cfg.model} is not the one planned for {folder}")
        if plan.schema == "span":
            batches = window_batches(encoder, windows, start, stop, plan, cfg.batch_size)
        else:
            batches = hidden_state_batches(encoder, examples[start:stop], plan, cfg.batch_size)
        name = f"extract {plan.task}/{plan.split} shard {index + 1}/{plan.num_shards}"
        unit = _row_unit(plan)
        # cleared when the shard commits: thousands of shards leave no line each
        bar = tqdm(total=stop - start, desc=name, unit=unit, disable=not progress, leave=False)
        with ShardWriter(folder, plan, index) as writer, bar:
            with BackgroundWriter(writer) as background:  # the next forward while this is written
                for batch in batches:
                    background.write(batch)
                    bar.update(batch.num_rows)
            record = writer.commit()
    except Exception as exc:
        try:
            record_failure(folder, index, exc)
        except Exception as unrecorded:  # a full disk, say: the shard's own error matters more
            exc.add_note(f"(the failure could not be recorded: {unrecorded})")
        raise
    clear_failure(folder, index)
    return record


def hidden_state_batches(
    encoder: enc.Encoder, examples: list[glue.Example], plan: ExtractionPlan, batch_size: int
) -> Iterator[pa.RecordBatch]:
    """Record batches of shard rows, batched by token length (shortest first). Each batch is
    yielded once the encoder's next one is under way (see `encode`)."""
    tokenizer = encoder.tokenizer
    texts = [ex.texts for ex in examples]
    firsts = [t[0] for t in texts]
    seconds = [t[1] for t in texts] if len(texts[0]) > 1 else None
    tokens = tokenizer(firsts, seconds, truncation=True, max_length=plan.max_seq_length)
    order = sorted(range(len(examples)), key=lambda i: (len(tokens["input_ids"][i]), i))
    schema = plan_schema(plan)
    dtype = hidden_dtype(plan.dtype)
    as_list = plan.format_version in LIST_FORMATS

    def encoded() -> Iterator[tuple[list[int], HostStates]]:
        for begin in range(0, len(order), batch_size):
            rows = order[begin : begin + batch_size]
            features = tokenizer.pad(
                [{k: v[i] for k, v in tokens.items()} for i in rows], return_tensors="pt"
            )
            yield rows, encode(encoder, features, dtype)

    for rows, states in _one_ahead(encoded()):
        yield pa.RecordBatch.from_arrays(
            [
                pa.array([examples[i].example_id for i in rows], pa.int64()),
                pa.array([examples[i].label for i in rows], schema.field("label").type),
                pa.array(states.lengths, pa.int32()),
                *states.hidden_columns(dtype, as_list),
            ],
            schema=schema,
        )


# -- span tasks (SQuAD 2.0): one row per window ---------------------------------------------------


@dataclass(frozen=True)
class SplitWindows:
    """The questions of a SQuAD split, its windows (rows of the extraction, in this order) and
    their fingerprint."""

    examples: list[squad.Example]
    features: squad.Features
    fingerprint: str


def planned_splits(task: str, splits: list[str]) -> list[str]:
    """The splits `splits` names for `task` ("dev" and "test" are all of a GLUE task's, two for
    MNLI); ConfigError or ValueError naming an unknown one."""
    if is_span_task(task):
        return _span_splits(splits)
    return glue.expand_splits(glue.get_task(task), splits)


def _span_splits(splits: list[str]) -> list[str]:
    unknown = [s for s in splits if s not in squad.SPLIT_FILES]
    if unknown or not splits:
        raise ConfigError(
            "splits", f"{unknown or splits} of squad2: expected {', '.join(squad.SPLIT_FILES)}"
        )
    return list(dict.fromkeys(splits))


def _load_windows(cfg: ExtractConfig, split: str) -> SplitWindows:
    return _windows(
        split,
        cfg.data_dir,
        cfg.max_train_examples,
        cfg.model,
        cfg.max_seq_length,
        cfg.doc_stride,
        cfg.max_question_length,
        (data_version(cfg.data_dir), enc.model_version(cfg.model)),
    )


def _load_questions(
    split: str, data_dir: str | None, max_train_examples: int | None = None
) -> list[squad.Example]:
    """The questions of `split`; of "train", the first `max_train_examples` (None: all), the
    ones fine-tuning with the same setting reads. Read once per process while the data folder's
    files stay as they are (`data_version`)."""
    return _questions(split, data_dir, max_train_examples, data_version(data_dir))


@lru_cache(maxsize=4)
def _questions(
    split: str, data_dir: str | None, max_train_examples: int | None, version: str
) -> list[squad.Example]:
    questions = squad.load_split(split, data_dir)
    return questions[:max_train_examples] if split == "train" else questions


@lru_cache(maxsize=4)
def _windows(
    split: str,
    data_dir: str | None,
    max_train_examples: int | None,
    model: str,
    max_seq_length: int,
    doc_stride: int,
    max_question_length: int,
    versions: tuple[str, str],
) -> SplitWindows:
    """Built once per process while the data and the tokenizer's files stay as they are
    (`versions`: data_version, encoder.model_version), not once per shard. ConfigError when the
    lengths leave no room for the context; the data's DataError (squad.build_features) naming
    the file."""
    examples = _load_questions(split, data_dir, max_train_examples)
    tokenizer = enc.load_tokenizer(model)
    try:
        features = squad.build_features(
            examples, tokenizer, max_seq_length, doc_stride, max_question_length
        )
    except glue.DataError as exc:
        raise glue.DataError(f"data file {squad.split_source(split, data_dir)}: {exc}") from None
    except ValueError as exc:
        raise ConfigError("max_seq_length", f"{max_seq_length}: {exc}") from None
    return SplitWindows(examples, features, windows_fingerprint(examples, features))


def windows_fingerprint(examples: list[squad.Example], features: squad.Features) -> str:
    """16 hex digits of sha256 over the questions (ids, texts, answers) and their windows (token
    ids, question of each, offsets, answer positions): other data, another windowing (max
    length, doc stride, question tokens) or another way of windowing give another fingerprint,
    so another extraction key, and shard ranges over windows never mix two windowings."""
    digest = hashlib.sha256()
    for ex in examples:
        answers = [(a.text, a.answer_start) for a in ex.answers]
        digest.update(json.dumps([ex.question_id, ex.context, ex.question, answers]).encode())
    for array in (
        features.input_ids,
        features.attention_mask,
        features.offsets,
        features.start_positions,
        features.end_positions,
        features.example_index,
        features.window_index,
    ):
        digest.update(np.ascontiguousarray(array).tobytes())
    return digest.hexdigest()[:16]


def window_batches(
    encoder: enc.Encoder,
    windows: SplitWindows,
    start: int,
    stop: int,
    plan: ExtractionPlan,
    batch_size: int,
) -> Iterator[pa.RecordBatch]:
    """Record batches of the span rows of windows [start, stop), batched by token length
    (shortest first), each batch cut to its longest window (right padding)."""
    features = windows.features
    lengths = features.attention_mask.sum(axis=1)  # (W,) real tokens: first on the right-padded row
    order = sorted(range(start, stop), key=lambda w: (int(lengths[w]), w))
    schema = plan_schema(plan)
    dtype = hidden_dtype(plan.dtype)
    as_list = plan.format_version in LIST_FORMATS

    def encoded(begin: int) -> tuple[np.ndarray, HostStates]:
        rows = np.asarray(order[begin : begin + batch_size])
        width = int(lengths[rows].max())
        inputs = {
            "input_ids": torch.from_numpy(features.input_ids[rows, :width]),
            "attention_mask": torch.from_numpy(features.attention_mask[rows, :width]),
        }
        if features.token_type_ids is not None:
            inputs["token_type_ids"] = torch.from_numpy(features.token_type_ids[rows, :width])
        return rows, encode(encoder, inputs, dtype)

    for rows, states in _one_ahead(map(encoded, range(0, len(order), batch_size))):
        real = states.lengths
        tokens = np.arange(features.offsets.shape[1]) < real[:, None]  # (B, T) right padding
        offsets = features.offsets[rows][tokens].ravel()  # (sum T * 2,) start, end of each token
        questions = [windows.examples[i] for i in features.example_index[rows]]
        yield pa.RecordBatch.from_arrays(
            [
                pa.array(rows, pa.int64()),
                pa.array([q.question_id for q in questions], pa.string()),
                pa.array(features.example_index[rows], pa.int64()),
                pa.array(features.window_index[rows], pa.int32()),
                pa.array([q.is_impossible for q in questions], pa.bool_()),
                pa.array(features.start_positions[rows], pa.int32()),
                pa.array(features.end_positions[rows], pa.int32()),
                pa.array(real, pa.int32()),
                flat_list_array(offsets, 2 * real, pa.list_(pa.int32())),
                *states.hidden_columns(dtype, as_list),
            ],
            schema=schema,
        )


T = TypeVar("T")


def _one_ahead(items: Iterator[T]) -> Iterator[T]:
    """`items`, each yielded only once the next one is made: while the caller handles batch k
    (waits for its copy to the host, hands it to the writer), the device runs batch k + 1."""
    previous: list[T] = []
    for item in items:
        yield from previous
        previous = [item]
    yield from previous


def flat_list_array(values: np.ndarray, sizes: np.ndarray, type: pa.DataType) -> pa.Array:
    """A list column of `type` (list or large_list) over one flat buffer: row i holds the next
    `sizes[i]` of `values` (1-D, rows one after the other). The values are not copied.

    ValueError when `sizes` do not add up to the values, or when they pass a list's int32
    offsets (2**31 - 1 values in one array: a large_list holds more); cast, such offsets would
    wrap around and cut the rows elsewhere without a word."""
    large = pa.types.is_large_list(type)
    offsets = _offsets(sizes, len(values), None if large else np.iinfo(np.int32).max)
    flat = pa.array(values)
    if large:
        return pa.LargeListArray.from_arrays(pa.array(offsets, pa.int64()), flat)
    return pa.ListArray.from_arrays(pa.array(offsets.astype(np.int32), pa.int32()), flat)


def _offsets(sizes: np.ndarray, total: int, limit: int | None = None) -> np.ndarray:
    """(len(sizes) + 1,) int64 offsets of rows of `sizes`, counted in int64 whatever their
    dtype. ValueError when they pass `limit` (a list's int32 offsets: use a large_list) or do
    not add up to `total`."""
    offsets = np.zeros(len(sizes) + 1, np.int64)
    np.cumsum(np.asarray(sizes, dtype=np.int64), out=offsets[1:])
    if limit is not None and offsets[-1] > limit:
        raise ValueError(
            f"{offsets[-1]} values in one list array pass its int32 offsets (at most {limit}); "
            "use a large_list"
        )
    if offsets[-1] != total:
        raise ValueError(f"rows of {offsets[-1]} values in all, over {total} values")
    return offsets


def flat_binary_array(values: np.ndarray, sizes: np.ndarray) -> pa.LargeBinaryArray:
    """A large_binary column over the bytes of `values` (C order, native byte order: little-endian
    on every machine torch supports): row i holds the next `sizes[i]` bytes. Not copied when
    `values` is contiguous. ValueError when `sizes` do not add up to the bytes of `values`."""
    data = pa.py_buffer(np.ascontiguousarray(values).reshape(-1).view(np.uint8))
    offsets = _offsets(sizes, data.size)
    return pa.LargeBinaryArray.from_buffers(
        pa.large_binary(), len(sizes), [None, pa.py_buffer(offsets), data]
    )


@dataclass
class HostStates:
    """One batch's hidden states of real tokens, on the host or being copied there.

    `values`: (sum over rows of L * T, H), row by row, then layer by layer, then token by token:
    the `hidden` column's values as they are stored. `lengths`: (B,) real tokens T of each row.
    `ready`: on CUDA, the event after which the (pinned) `values` hold the copy; None on CPU.
    """

    values: torch.Tensor
    lengths: np.ndarray
    layers: int
    ready: torch.cuda.Event | None = None

    @classmethod
    def of_examples(cls, states: list[np.ndarray]) -> HostStates:
        """The host states of examples given one by one, each (L, T_i, H) (a copy)."""
        layers, _, hidden_size = states[0].shape
        flat = np.concatenate([s.reshape(-1, hidden_size) for s in states])
        return cls(torch.from_numpy(flat), np.array([s.shape[1] for s in states]), layers)

    def hidden_columns(self, dtype: HiddenDtype, as_list: bool = False) -> list[pa.Array]:
        """The `hidden` column as `dtype` stores it, once the copy is complete (waits for it):
        row i the (L, T_i, H) values' bytes (large_binary; over `values`' memory unless
        quantised) or, `as_list` (schema.LIST_FORMATS), a large_list of the values. For int8
        also `hidden_scale`: every (layer, token) vector quantised (bertvision.quantise),
        `hidden` its int8 values and `hidden_scale` its (L * T_i) float16 scales.
        NonFiniteError when states overflow int8's float16 scales."""
        if self.ready is not None:
            self.ready.synchronize()
        values = self.values.numpy()  # (sum of L * T_i, H)
        vectors = self.lengths * self.layers  # (layer, token) vectors of each row
        scales = None
        if dtype.quantised:
            values, scales = _quantised(values)
        sizes = vectors * values.shape[-1]  # values of each row
        if as_list:
            column = pa.large_list(pa.from_numpy_dtype(values.dtype))
            hidden = flat_list_array(values.reshape(-1), sizes, column)
        else:
            hidden = flat_binary_array(values, sizes * values.itemsize)
        if scales is None:
            return [hidden]
        return [hidden, flat_list_array(scales, vectors, pa.large_list(pa.float16()))]


def _quantised(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    quantised, scales = quantise(values)
    if not np.isfinite(scales).all():
        raise NonFiniteError(
            f"hidden states reach {float(np.abs(values).max()):.4g}, beyond int8's range "
            f"(float16 scales: at most {INT8_MAX} x 65504); extract with --dtype float32"
        )
    return quantised, scales


def encode(
    encoder: enc.Encoder, features: dict[str, torch.Tensor], dtype: HiddenDtype
) -> HostStates:
    """Hidden states (L, T, H) of each example's real tokens, flat in one buffer, on their way
    to the host: the forward and the selection of real tokens run on the device, and only those
    are copied, into pinned memory without waiting on CUDA (`HostStates.ready`).

    Raises NonFiniteError when a real token's hidden state is NaN or infinite once stored as
    `dtype` (see `check_storable`).
    """
    inputs = {k: v.to(encoder.device, non_blocking=True) for k, v in features.items()}
    with torch.inference_mode():
        with enc.autocast(encoder.device):
            output = encoder.model(**inputs, output_hidden_states=True)
        mask = inputs["attention_mask"].bool()  # (B, T); padding may sit on either side
        # int8 is quantised on the host from float32 (HostStates.hidden_columns)
        stored_as = torch.float32 if dtype.quantised else dtype.torch()
        layer_states = output.hidden_states  # L of (B, T, H): cast each, then stack the smaller
        stored = torch.stack([state.to(stored_as) for state in layer_states], dim=1)  # (B, L, T, H)
        batch, layers = stored.shape[:2]
        values = stored[mask[:, None, :].expand(batch, layers, -1)]  # (B * L * T real, H) in order
        if not all_finite(values):
            check_storable(torch.stack(layer_states, dim=1), stored, mask)
        lengths = features["attention_mask"].bool().sum(dim=1).numpy()
        if values.device.type != "cuda":
            return HostStates(values, lengths, layers)
        host = torch.empty(values.shape, dtype=values.dtype, pin_memory=True)
        copying = _copy_stream(values.device)
        copying.wait_stream(torch.cuda.current_stream(values.device))
        with torch.cuda.stream(copying):
            host.copy_(values, non_blocking=True)
            values.record_stream(copying)  # not reused by the next batch before it is copied
            ready = torch.cuda.Event()
            ready.record(copying)
    return HostStates(host, lengths, layers, ready)


@cache
def _copy_stream(device: torch.device) -> torch.cuda.Stream:
    """The stream copies to the host run on, beside the encoder's next forward."""
    return torch.cuda.Stream(device)


def all_finite(values: torch.Tensor) -> bool:
    """Whether no value of `values` (float16 or float32, contiguous) is NaN or infinite. Read off
    the exponent bits (all ones: NaN or infinity): on a CPU ~5x faster than torch.isfinite for
    float16, which extraction checks on every batch."""
    if values.dtype == torch.float16:
        exponents = values.view(torch.int16) & 0x7C00
        return not bool((exponents == 0x7C00).any())
    if values.dtype == torch.float32:
        exponents = values.view(torch.int32) & 0x7F800000
        return not bool((exponents == 0x7F800000).any())
    return bool(torch.isfinite(values).all())


def check_storable(hidden: torch.Tensor, stored: torch.Tensor, mask: torch.Tensor) -> None:
    """Raise NonFiniteError naming the layers, the dtype and the remedy if a real token's hidden
    state is NaN or infinite as `stored`: the encoder's own values (hidden, (B, L, T, H)) were
    not finite, or they overflow the stored dtype (float16 holds magnitudes up to 65504)."""
    real = mask[:, None, :, None]  # (B, 1, T, 1); padded positions are never stored
    bad = (~torch.isfinite(stored) & real).any(dim=(0, 2, 3))  # (L,)
    if not bad.any():
        return
    layers = torch.nonzero(bad).flatten().tolist()
    broken = (~torch.isfinite(hidden) & real).any(dim=(0, 2, 3))
    if broken.any():
        raise NonFiniteError(
            f"the encoder's hidden states of layer(s) {torch.nonzero(broken).flatten().tolist()} "
            "(0 = embeddings) are NaN or infinite: the model itself is broken; no --dtype helps"
        )
    name = str(stored.dtype).removeprefix("torch.")
    largest = float(hidden.float().abs().masked_fill(~real, 0.0).amax())
    raise NonFiniteError(
        f"hidden states of layer(s) {layers} (0 = embeddings) reach {largest:.4g}, beyond "
        f"{name}'s range (at most {torch.finfo(stored.dtype).max:g}); extract with --dtype "
        "float32 (and --overwrite where a float16 extraction was planned)"
    )


def extract_shards(
    cfg: ExtractConfig,
    plan: ExtractionPlan,
    indices: list[int],
    progress: bool = False,
    on_commit: Callable[[ShardRecord, float], None] | None = None,
) -> tuple[list[ShardRecord], dict[int, Exception]]:
    """`extract_shard` for each of `indices`, in order: the records committed, and each failed
    shard's error (recorded in the manifest too). A failing shard does not stop the others, but
    no space left on storage stops at once (OutOfSpace naming the shard): every later shard
    would fail the same way. `on_commit(record, seconds)` follows each commit."""
    records, failures = [], {}
    for index in indices:
        started = time.perf_counter()
        try:
            record = extract_shard(cfg, plan, index, progress)
        except Exception as exc:
            if storage.out_of_space(exc):
                raise no_space_error(cfg, plan, index, exc) from exc
            failures[index] = exc
            continue
        records.append(record)
        if on_commit is not None:
            on_commit(record, time.perf_counter() - started)
    return records, failures


def _row_unit(plan: ExtractionPlan) -> str:
    """What a progress bar of `plan`'s rows counts."""
    return "window" if plan.schema == "span" else "ex"


def _shown(bar, record: ShardRecord, seconds: float) -> None:
    """A shard committed, on the split's progress bar."""
    bar.update(record.rows)
    bar.set_postfix(shard=record.index, s=round(seconds, 1))


def extract_hidden_states(cfg: ExtractConfig, progress: bool = True) -> ExtractSummary:
    """Extract every pending shard of every split; a failed shard does not stop the others, but
    no space left stops everything at once (OutOfSpace). Ends with a listing of each split: what
    counted as committed but is not stored (lost writes) is in `missing`, and the summary not ok.
    """
    from tqdm.auto import tqdm

    plans = prepare_extraction(cfg)
    summary = ExtractSummary(cfg.out, {}, {}, {})
    for plan in plans:
        name = f"{plan.task}/{plan.split}"
        pending = pending_shards(cfg, plan)
        summary.skipped[name] = [i for i in range(plan.num_shards) if i not in pending]
        summary.committed[name], summary.failed[name] = [], {}
        stored = sum(stop - start for start, stop in map(plan.shard_range, summary.skipped[name]))
        bar = tqdm(  # what is already stored counts as done, not in the rate
            total=plan.num_examples,
            initial=stored,
            desc=f"extract {name}",
            unit=_row_unit(plan),
            disable=not progress,
        )
        with bar:
            records, failures = extract_shards(cfg, plan, pending, on_commit=partial(_shown, bar))
        summary.committed[name] = [record.index for record in records]
        summary.failed[name] = {i: f"{type(exc).__name__}: {exc}" for i, exc in failures.items()}
        done = [i for i in range(plan.num_shards) if i not in summary.failed[name]]
        summary.missing[name] = finish_split(cfg, plan, done)
    return summary


def finish_split(cfg: ExtractConfig, plan: ExtractionPlan, done: list[int]) -> list[str]:
    """The final listing of one task/split: what storage lacks of its plan and of the shards
    `done` ("URL (why)" each, as shards.missing_from_storage). When that is nothing and `done`
    is every shard, the extraction is complete: its run record _manifest/run.json is written
    (once per extraction key; see `record_extraction`) and the split's staging folder
    _incomplete/ removed if nothing is staged in it (`shards.remove_empty_staging`)."""
    folder = split_url(cfg.out, plan.task, plan.split)
    missing = missing_from_storage(folder, plan, done)
    if not missing and set(done) >= set(range(plan.num_shards)):
        record_extraction(cfg, plan)
        remove_empty_staging(folder)
    return missing


def record_extraction(cfg: ExtractConfig, plan: ExtractionPlan) -> records.RunRecord:
    """Write the run record of the complete extraction `plan` (every shard committed), unless
    one of its key is there; returns the record stored.

    Inputs: "model" (its URL and fingerprint) and "data/<split>" (the data folder and the data
    fingerprint); of a span extraction also "questions/<split>" (the data folder and
    squad.data_fingerprint of the questions alone: what span training checks the data it reads
    again against, without rebuilding the windows). Timings: from the first shard's start to
    the last shard's commit, with `shard_seconds` (all shards' seconds together). For an encoder
    fine-tuned by BERTVision, `finetuned_encoder`: what it was fine-tuned on (see
    `finetuned_encoder`; not part of the key, which the encoder's fingerprint already
    determines). A ShardError when a shard is not committed, or when the data changed since the
    plan was written.
    """
    folder = split_url(cfg.out, plan.task, plan.split)
    url = manifest_url(folder, RUN_FILE)
    stored = records.read_record(url)
    if stored is not None and stored.key == plan.key:
        return stored
    shard_records = committed_records(folder, plan)
    if len(shard_records) < plan.num_shards:
        raise ShardError(
            f"{folder}: {plan.num_shards - len(shard_records)} of {plan.num_shards} shards are "
            "not committed; the extraction is not complete"
        )
    starts = [
        datetime.fromisoformat(r.committed_at) - timedelta(seconds=r.seconds)
        for r in shard_records.values()
    ]
    started = min(starts).isoformat(timespec="seconds")
    finished = max(r.committed_at for r in shard_records.values())
    source = cfg.data_dir or (squad.HUB_URL if plan.schema == "span" else glue.HUB_URL)
    inputs = {
        "model": records.input_of(cfg.model, plan.model_fingerprint),
        f"data/{plan.split}": records.input_of(source, plan.data_fingerprint),
    }
    if plan.schema == "span":
        windows = _load_windows(cfg, plan.split)
        if windows.fingerprint != plan.data_fingerprint:
            raise ShardError(
                f"the data of {plan.task}/{plan.split} changed since the plan was written; "
                "rerun with --overwrite"
            )
        questions = squad.data_fingerprint(windows.examples)
        inputs[f"questions/{plan.split}"] = records.input_of(source, questions)
    finetuned = finetuned_encoder(cfg.model, plan.model_fingerprint)
    record = records.RunRecord(
        kind="extract",
        key=plan.key,
        settings=asdict(cfg),
        inputs=inputs,
        timings=records.make_timings(
            started,
            finished,
            (datetime.fromisoformat(finished) - datetime.fromisoformat(started)).total_seconds(),
            shard_seconds=sum(r.seconds for r in shard_records.values()),
        ),
        files=[shard_records[i].file for i in range(plan.num_shards)],
        worker=worker_name(),
        committed_at=records.now(),
        finetuned_encoder=asdict(finetuned) if finetuned is not None else {},
    )
    records.write_record(url, record)
    return record


def no_space_error(
    cfg: ExtractConfig, plan: ExtractionPlan, index: int, exc: BaseException
) -> storage.OutOfSpace:
    """The one error that stops an extraction whose storage is full."""
    return storage.OutOfSpace(
        f"no space left writing shard {index} of {plan.task}/{plan.split} to {cfg.out} "
        f"({exc}); extraction stopped, committed shards are kept: free space, then rerun extract"
    )

"""The embeddings reader: a task's stored hidden states, checked, then held or streamed in batches.

    data = load_embeddings("rte", "emb")  # check every split; hold those that fit in memory
    train = data.splits["train"]
    keep = np.ones(train.num_examples, dtype=bool)  # which examples, in storage order
    shuffle = np.random.default_rng(0)
    for packed, rows, storage_rows in epoch_batches(train, keep, 32, shuffle, "cuda"):
        batch = packed.batch(rows, "cuda")  # TokenBatch: real tokens (N, L, H) float32
        labels = train.labels[storage_rows]  # (B,)

What it reads: the committed shards of an extraction (docs/shard-format.md; bertvision.schema),
`<embeddings>/<task>/<split>/shard-NNNNN.parquet` listed by their commit records, never by the
folder's listing. Each row holds one example's states of the embedding output and every encoder
layer for its real tokens: (L, T, H) flattened, L = encoder layers + 1, T its token count,
H the hidden size, stored as float16, float32 or int8 with a float16 scale per layer and token
(the plan's `dtype`). Decoding is `shards.hidden_arrays` (every format: raw bytes or lists) and
`shards.quantised_arrays` (int8, formats 4 and 5).

Checks, before any state is held: every split asked for is complete, of this task, labelled
(train and dev; test splits may be unlabelled) with finite labels, holds exactly the plan's
examples, and shares the encoder and settings of the others (SHARED_SETTINGS). What the encoder
was fine-tuned on, when BERTVision fine-tuned it, is read from the train split's run record
(`finetuned`): adapter training checks its held-out slice against it. Every state read
is checked finite. Each failed check raises ShardError naming the split or shard; a shard that
differs from what was committed is marked for re-extraction (shards.read_shard) and raises
ShardError too; storage failures raise storage's errors (StorageError, StorageUnavailable).

Memory: a split whose states take at most `max_resident_gb` (tokens x L x H x bytes of its
dtype, plus tokens x L scales for int8) is read once and held on the device as a `Packed`, in
the stored dtype, one row per token: (sum of T, L, H), int8 with its scales (sum of T, L).
A larger split is streamed: each pass reads a group of shards into a `Packed`, uses it, and
drops it; while it trains on one group, the next `read_ahead` groups are read on a reading
thread (`SplitData.read_groups`), so it holds at most 1 + read_ahead groups. A group's shards
are decoded on up to READ_THREADS threads at once (pyarrow and numpy's copies release the GIL),
each holding, besides the result, one row group (one encoder batch) of its shard. Groups come
in their order whatever the timing, so training reads the same batches with or without reading
ahead. Batches hold their examples' real tokens only, never padding (bertvision.batch), cast to
float32 (int8 dequantised) only on the way to the model, so at most one batch is held as float32.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial

import numpy as np
import torch

from bertvision import encoder as enc
from bertvision import glue, records, storage
from bertvision.batch import TokenBatch, layout
from bertvision.finetune import FinetunedEncoder
from bertvision.schema import ID_COLUMNS, RUN_FILE, ExtractionPlan, hidden_dtype
from bertvision.shards import (
    ShardError,
    committed_shards,
    hidden_arrays,
    iter_row_groups,
    load_plan,
    manifest_url,
    pipeline_hint,
    quantised_arrays,
    read_shard,
    split_url,
)

# Shards of one group decoded at once (read_packed).
READ_THREADS = 4

# Settings every split of one extraction must share.
SHARED_SETTINGS = (
    "model_fingerprint",
    "layers",
    "hidden_size",
    "max_seq_length",
    "dtype",
)  # not format_version: a split of an older format (an extraction finishes in its own) reads alike


@dataclass
class Packed:
    """Hidden states of a set of examples, token-major: one row per token of every example."""

    example_ids: np.ndarray  # (N,) int64 (window ids for span shards)
    lengths: np.ndarray  # (N,) int64, tokens T of each example
    starts: torch.Tensor  # (N,) int64: first row of each example in `tokens`
    tokens: torch.Tensor  # (sum of T, L, H), the stored dtype
    # int8: the float16 scale of each token's values in each layer, (sum of T, L); else None
    scales: torch.Tensor | None = None

    def batch(self, rows: np.ndarray, device: str) -> TokenBatch:
        """The real tokens of the examples at `rows`, in that order, float32 on `device` (int8
        dequantised): one gather of their rows of `tokens` and one cast, nothing padded."""
        lengths = self.lengths[rows]
        at = self.tokens.device
        on_device = torch.from_numpy(lengths).to(at)
        starts, example, position = layout(on_device, int(lengths.sum()))
        index = self.starts[torch.from_numpy(rows).to(at)][example] + position  # (N,)
        tokens = self.tokens[index].to(device=device, dtype=torch.float32)  # (N, L, H)
        if self.scales is not None:  # int8: dequantise (bertvision.quantise)
            tokens.mul_(self.scales[index].to(device=device, dtype=torch.float32)[..., None])
        moved = (t.to(device) for t in (on_device, starts, example, position))
        return TokenBatch(tokens, *moved, int(lengths.max()))


@dataclass
class SplitData:
    """One split of one extraction: its plan, shards and labels; hidden states if resident."""

    name: str
    plan: ExtractionPlan
    shard_urls: list[str]
    shard_rows: list[int]  # examples in each shard, in shard order
    example_ids: np.ndarray  # (N,) int64 in storage order (shard by shard)
    labels: np.ndarray | None  # (N,) in storage order; None for unlabelled test splits
    num_tokens: int  # stored tokens of all examples together, the sum of their T
    resident: Packed | None = None  # all hidden states, when they fit in memory

    @property
    def num_examples(self) -> int:
        return len(self.example_ids)

    def fits(self, max_resident_gb: float) -> bool:
        """Whether its hidden states take at most `max_resident_gb` GiB, so that a loader given
        that limit holds them (`resident`) rather than streaming them."""
        plan = self.plan
        token_bytes = hidden_dtype(plan.dtype).token_bytes(plan.layers, plan.hidden_size)
        return self.num_tokens * token_bytes <= max_resident_gb * 2**30

    def held_out_ids(self, val_fraction: float, val_seed: int) -> np.ndarray:
        """The example ids (sorted) of the held-out slice of this TRAIN split: the slice
        fine-tuning left out (glue.held_out_ids). ShardError if it has fewer than 2 examples."""
        if self.num_examples < 2:
            raise ShardError("the train split needs at least 2 examples to hold one out")
        return glue.held_out_ids(self.example_ids, val_fraction, val_seed)

    def packs(
        self, device: str, rng: np.random.Generator | None = None, shuffle_shards: int = 1
    ) -> Iterator[tuple[Packed, np.ndarray]]:
        """(Packed, storage rows of its examples): the resident whole, or groups of shards read
        one group at a time (in a random order when `rng` is given), the next read ahead."""
        yield from self.read_groups(self.shard_groups(rng, shuffle_shards), device)

    def read_groups(
        self, groups: Iterable[np.ndarray], device: str, read_ahead: int = 1
    ) -> Iterator[tuple[Packed, np.ndarray]]:
        """`read_group` of each of `groups`, in their order, the next `read_ahead` groups read
        on a reading thread while the caller uses the current one (0: each read when asked).
        A failed read raises its error when its group's turn comes; leaving early cancels the
        reads not started and waits for the one running."""
        if self.resident is not None or read_ahead == 0:
            for group in groups:
                yield self.read_group(group, device)
            return
        pending: deque[Future] = deque()
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="read-ahead") as reader:
            try:
                for group in groups:
                    pending.append(reader.submit(self.read_group, group, device))
                    if len(pending) > read_ahead:
                        yield pending.popleft().result()
                while pending:
                    yield pending.popleft().result()
            finally:
                for future in pending:
                    future.cancel()

    def shard_groups(
        self, rng: np.random.Generator | None = None, shuffle_shards: int = 1
    ) -> list[np.ndarray]:
        """The shard indexes `packs` reads together, group by group, in the order it reads them:
        one group of every shard when resident (nothing drawn from `rng`), else groups of
        `shuffle_shards` shards in an order drawn from `rng` (one shard a group, in storage
        order, without `rng`)."""
        order = np.arange(len(self.shard_urls))
        if self.resident is not None:
            return [order]
        group = 1
        if rng is not None:
            order, group = rng.permutation(order), shuffle_shards
        return [np.sort(order[begin : begin + group]) for begin in range(0, len(order), group)]

    def read_group(self, shards: np.ndarray, device: str) -> tuple[Packed, np.ndarray]:
        """(Packed, storage rows of its examples) of the shards `shards` (indexes, sorted): the
        resident whole when resident, else those shards read now."""
        if self.resident is not None:
            return self.resident, np.arange(self.num_examples)
        offsets = np.concatenate([[0], np.cumsum(self.shard_rows)])
        packed = read_packed([self.shard_urls[i] for i in shards], self.plan, device)
        rows = np.concatenate([np.arange(offsets[i], offsets[i + 1]) for i in shards])
        return packed, rows


@dataclass
class EmbeddingData:
    """The checked embeddings of one task: what `train_adapter` reads, shareable by many runs."""

    task: glue.GlueTask
    embeddings: str
    device: str
    splits: dict[str, SplitData] = field(default_factory=dict)
    # what the encoder was fine-tuned on, when BERTVision fine-tuned it (`finetuning`)
    finetuned: FinetunedEncoder | None = None

    @property
    def plan(self) -> ExtractionPlan:
        return self.splits["train"].plan

    def extraction_keys(self) -> dict[str, str]:
        return {name: split.plan.key for name, split in self.splits.items()}


def load_embeddings(
    task: str | glue.GlueTask,
    embeddings: str,
    splits: list[str] | None = None,
    device: str = "",
    max_resident_gb: float = 8.0,
) -> EmbeddingData:
    """Check the extraction of `task` under `embeddings` and hold each split that fits.

    `splits` defaults to train, the task's dev split(s) and its test split(s) where extracted.
    Every named split must be complete, of this task, and made with the same encoder and
    settings as the others; otherwise a ShardError says what is wrong. A split whose hidden
    states take at most `max_resident_gb` is loaded onto `device` once; a larger one is streamed
    from its shards each epoch.
    """
    task = glue.get_task(task) if isinstance(task, str) else task
    device = device or enc.default_device()
    embeddings = embeddings.rstrip("/")
    if not storage.exists(storage.join(embeddings, task.name)):
        present = [name for name in storage.list_names(embeddings) if name in glue.TASKS]
        held = f"; it holds embeddings of {', '.join(present)}" if present else ""
        raise ShardError(
            f"no embeddings of {task.name} under {embeddings}"
            f"{held or pipeline_hint(embeddings) or '; run extract first'}"
        )
    if splits is None:
        optional = [s for s in task.test_splits if load_plan(split_url(embeddings, task.name, s))]
        names = ["train", *task.dev_splits, *optional]
    else:
        names = glue.expand_splits(task, splits)
    data = EmbeddingData(task, embeddings, device)
    for name in names:
        data.splits[name] = _check_split(task, embeddings, name)
    _check_same_settings(data)
    if "train" in data.splits:
        data.finetuned = finetuning(embeddings, task.name, data.plan)
    for split in data.splits.values():
        if split.fits(max_resident_gb):
            split.resident = read_packed(split.shard_urls, split.plan, device)
    return data


def finetuning(embeddings: str, task: str, plan: ExtractionPlan) -> FinetunedEncoder | None:
    """What the encoder of the extraction `plan` (of `task`'s train split under `embeddings`)
    was fine-tuned on, as the split's run record names it (extract.finetuned_encoder); None when
    it names nothing (an encoder BERTVision did not fine-tune, a record written before this was
    kept) or the split has no record of this extraction. FileFormatError naming the record
    when it is garbled."""
    url = manifest_url(split_url(embeddings, task, "train"), RUN_FILE)
    record = records.read_record(url)
    if record is None or record.key != plan.key:
        return None
    return FinetunedEncoder.from_record(record, url)


def _check_split(task: glue.GlueTask, embeddings: str, name: str) -> SplitData:
    plan, urls = committed_shards(embeddings, task.name, name)
    folder = split_url(embeddings, task.name, name)
    if (plan.task, plan.split) != (task.name, name):
        raise ShardError(f"{folder} holds embeddings of {plan.task}/{plan.split}, not {task.name}")
    if plan.regression != task.regression:
        raise ShardError(f"{folder}: labels are not those of {task.name}")
    ids, labels, rows, num_tokens = [], [], [], 0
    for url in urls:
        meta, table = read_shard(url, columns=["example_id", "label", "length"])
        if meta.extraction_key != plan.key or (meta.task, meta.split) != (task.name, name):
            raise ShardError(
                f"shard {url} belongs to another extraction ({meta.task}/{meta.split}, "
                f"key {meta.extraction_key}, expected {plan.key}): shards with mixed settings"
            )
        ids.append(table.column("example_id").to_numpy())
        labels.append(table.column("label").to_pylist())
        rows.append(table.num_rows)
        num_tokens += int(np.asarray(table.column("length").to_numpy(), dtype=np.int64).sum())
    example_ids = np.concatenate(ids).astype(np.int64)
    if len(example_ids) != plan.num_examples or len(np.unique(example_ids)) != len(example_ids):
        raise ShardError(
            f"{folder}: shards hold {len(example_ids)} rows ({len(np.unique(example_ids))} "
            f"distinct examples), plan says {plan.num_examples}"
        )
    flat = [label for part in labels for label in part]
    if task.is_test(name):
        return SplitData(name, plan, urls, rows, example_ids, None, num_tokens)
    if any(label is None for label in flat):
        raise ShardError(f"{folder}: {name} examples without labels; train and dev need them")
    label_array = np.asarray(flat, dtype=np.float32 if task.regression else np.int64)
    if not np.isfinite(label_array).all():
        raise ShardError(f"{folder}: {name} labels are NaN or infinite; re-extract from sound data")
    return SplitData(name, plan, urls, rows, example_ids, label_array, num_tokens)


def _check_same_settings(data: EmbeddingData) -> None:
    first = next(iter(data.splits.values()))
    for split in data.splits.values():
        for setting in SHARED_SETTINGS:
            ours, theirs = getattr(first.plan, setting), getattr(split.plan, setting)
            if ours != theirs:
                raise ShardError(
                    f"embeddings of {data.task.name} under {data.embeddings} mix settings: "
                    f"{first.name} has {setting} {ours}, {split.name} has {theirs}; "
                    "extract all splits with the same encoder and settings"
                )


def read_packed(
    urls: list[str], plan: ExtractionPlan, device: str, threads: int = READ_THREADS
) -> Packed:
    """The shards at `urls`, in order, as one Packed on `device`.

    Up to `threads` shards are read and decoded at once, each into its own rows of the result,
    one row group at a time: besides the result, memory holds one row group per thread. Reads
    every shard format (see shards.hidden_arrays): span shards' rows are windows, so
    `example_ids` are then window ids; int8 shards are held as int8 values and their scales.
    Errors as `read_shard` raises them, or ShardError for non-finite states; of several failing
    shards, the first in `urls` order is raised.
    """
    ids = ID_COLUMNS[plan.schema]
    with ThreadPoolExecutor(max_workers=max(1, min(threads, len(urls)))) as pool:
        heads = list(pool.map(lambda url: read_shard(url, columns=[ids, "length"])[1], urls))
        packed = _allocate(heads, ids, plan)
        first_rows = np.concatenate([[0], np.cumsum([t.num_rows for t in heads])]).astype(int)
        list(pool.map(partial(_fill, packed, plan), urls, first_rows[:-1]))
    return Packed(
        packed.example_ids,
        packed.lengths,
        packed.starts.to(device),
        packed.tokens.to(device),
        None if packed.scales is None else packed.scales.to(device),
    )


def _allocate(heads: list, ids: str, plan: ExtractionPlan) -> Packed:
    """An empty host Packed for the shards whose id and length columns are `heads`."""
    lengths = np.concatenate([t.column("length").to_numpy() for t in heads]).astype(np.int64)
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)
    stored = hidden_dtype(plan.dtype)
    total = int(lengths.sum())
    tokens = torch.empty((total, plan.layers, plan.hidden_size), dtype=stored.torch())
    scales = None
    if stored.quantised:
        scales = torch.empty((total, plan.layers), dtype=torch.float16)
    example_ids = np.concatenate([t.column(ids).to_numpy() for t in heads]).astype(np.int64)
    return Packed(example_ids, lengths, torch.from_numpy(starts), tokens, scales)


def _fill(packed: Packed, plan: ExtractionPlan, url: str, row: int) -> None:
    """Decode the shard at `url` into the host `packed`'s tokens (and scales) of its examples,
    the first of them at example `row`, one row group at a time."""
    host = packed.tokens.numpy()  # the same memory
    host_scales = None if packed.scales is None else packed.scales.numpy()
    starts = packed.starts.numpy()
    columns = ["length", "hidden"] + (["hidden_scale"] if host_scales is not None else [])
    for group in iter_row_groups(url, columns=columns):
        if host_scales is not None:
            rows = quantised_arrays(group, plan)  # (L, T, H) int8, (L, T) float16
        else:
            rows = [(values, None) for values in hidden_arrays(group, plan)]  # (L, T, H)
        for values, scale in rows:
            checked = values if scale is None else scale
            if not np.isfinite(checked).all():
                raise _non_finite_hidden(url, checked, plan)
            at = slice(starts[row], starts[row] + values.shape[1])
            np.copyto(host[at], values.transpose(1, 0, 2))
            if scale is not None:
                np.copyto(host_scales[at], scale.T)
            row += 1


def _non_finite_hidden(url: str, stored: np.ndarray, plan: ExtractionPlan) -> ShardError:
    """The error for an example's stored states `stored` (L, T, H), or int8 scales (L, T),
    holding NaN or infinity."""
    layers = np.flatnonzero(~np.isfinite(stored.reshape(plan.layers, -1)).all(axis=1)).tolist()
    return ShardError(
        f"shard {url} holds NaN or infinite hidden states in layer(s) {layers} (0 = embeddings); "
        f"re-extract with --dtype float32 --overwrite (it holds {plan.dtype})"
    )


def epoch_batches(
    split: SplitData,
    keep: np.ndarray,
    batch_size: int,
    rng: np.random.Generator,
    device: str,
    shuffle_shards: int = 4,
    shard_rng: np.random.Generator | None = None,
    read_ahead: int = 1,
) -> Iterator[tuple[Packed, np.ndarray, np.ndarray]]:
    """One epoch of shuffled batches over the storage rows where `keep` is True:
    (Packed, its rows in the batch, their storage rows). When streamed, the order of the shard
    groups is drawn from `shard_rng` (default: `rng`, before any batch is drawn), and the next
    `read_ahead` groups are read while one is used (SplitData.read_groups)."""
    groups = split.shard_groups(rng if shard_rng is None else shard_rng, shuffle_shards)
    for packed, rows in split.read_groups(groups, device, read_ahead):
        for chosen in pack_batches(rows, keep, batch_size, rng):
            yield packed, chosen, rows[chosen]


def pack_batches(
    rows: np.ndarray, keep: np.ndarray, batch_size: int, rng: np.random.Generator
) -> list[np.ndarray]:
    """The batches of one pack whose examples sit at storage rows `rows`: its kept examples
    (`keep`, storage order) shuffled by `rng`, cut into batches of `batch_size`, as positions
    in the pack. Every run served the pack draws its own order from its own `rng`."""
    local = np.flatnonzero(keep[rows])
    local = local[rng.permutation(len(local))]
    return [local[begin : begin + batch_size] for begin in range(0, len(local), batch_size)]


def check_given(cfg, task: str, embeddings: str, train: SplitData) -> None:
    """That embeddings loaded beforehand (of `task`, from URL `embeddings`, `train` their train
    split) are the ones `cfg` (a TrainConfig) asks for: its task, its URL, if it names one its
    encoder, and the train split held or streamed as `cfg.max_resident_gb` would have it (the
    batches differ: held, it is shuffled whole; streamed, in groups of shards). ValueError or
    ShardError saying which differs."""
    if task != cfg.task:
        raise ValueError(f"the embeddings given are of {task}, not {cfg.task}")
    if embeddings != cfg.embeddings.rstrip("/"):
        raise ValueError(f"the embeddings given come from {embeddings}, not {cfg.embeddings}")
    plan = train.plan
    fingerprint = plan.model_fingerprint
    if cfg.model_fingerprint and cfg.model_fingerprint != fingerprint:
        raise ShardError(
            f"embeddings under {embeddings} come from encoder {plan.model} "
            f"(fingerprint {fingerprint}), not the one asked for ({cfg.model_fingerprint})"
        )
    held = train.resident is not None
    if held != train.fits(cfg.max_resident_gb):
        raise ValueError(
            f"the embeddings given hold the train split {'in memory' if held else 'streamed'}; "
            f"max_resident_gb {cfg.max_resident_gb:g} {'streams' if held else 'holds'} it, "
            "and the batches would differ from the run's own: load them with the run's limit"
        )

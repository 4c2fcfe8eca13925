"""The reader of span extractions (SQuAD 2.0): a split's windows, checked, with their hidden
states held or streamed in batches; the sibling of bertvision.embeddings (GLUE).

    split = load_span_split("emb", "dev")          # check every shard; hold it if it fits
    keep = np.ones(split.num_windows, dtype=bool)   # which windows, in storage order
    for batch in span_batches(split, keep, 32, np.random.default_rng(0), "cuda"):
        batch.tokens                    # TokenBatch: the real tokens (N, L, H) float32
        batch.offsets                   # (B, T, 2) int64 context characters, -1 off the context
        batch.start_positions, batch.end_positions   # (B,) int64, 0 (CLS) for no answer
        batch.window_ids                # (B,) int64: rows of split.windows

    meta, shard = read_span_shard(url)  # one committed shard whole, checked against its sha256

What it reads: the committed shards of a span extraction (docs/shard-format.md, schema
"span": format 7, older 3, int8 5) under `<embeddings>/<task>/<split>/`, listed by their commit
records. Each row is one window: its identity (window_id, question_id, example_index,
window_index), whether its question is impossible, its answer positions, the context offsets
of its T real tokens and their hidden states (L, T, H). Windows are numbered as
`squad.build_features` numbers them, so `windows.offsets` and `windows.example_index` are what
`squad.best_spans` needs (with the questions of `squad.load_split`), row for row by window id.

Checks: the split is complete, of the task, a span extraction, and its shards hold every window
of the plan exactly once, each shard of the plan's key; every hidden state read is finite
(embeddings.read_packed). A failed check raises ShardError naming the split or shard; a shard
that differs from what was committed (page checksums, sha256) is marked for re-extraction
(shards.read_shard) and raises ShardError too.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import torch

from bertvision import encoder as enc
from bertvision.batch import TokenBatch
from bertvision.embeddings import SplitData, epoch_batches, read_packed
from bertvision.schema import ExtractionPlan, ShardMeta
from bertvision.shards import ShardError, committed_shards, hidden_arrays, read_shard, split_url

# The columns of every window besides its hidden states.
WINDOW_COLUMNS = [
    "window_id",
    "question_id",
    "example_index",
    "window_index",
    "is_impossible",
    "start_position",
    "end_position",
    "length",
    "offsets",
]


@dataclass
class Windows:
    """What identifies and labels N windows, in one order (rows of these arrays)."""

    window_ids: np.ndarray  # (N,) int64, the window's row in its split (build_features' order)
    question_ids: list[str]  # N
    example_index: np.ndarray  # (N,) int64, its question's index in the split file
    window_index: np.ndarray  # (N,) int64, its place among its question's windows
    is_impossible: np.ndarray  # (N,) bool
    start_positions: np.ndarray  # (N,) int64 token positions; 0 (CLS) for no answer here
    end_positions: np.ndarray  # (N,) int64
    lengths: np.ndarray  # (N,) int64, real tokens T
    offsets: np.ndarray  # (N, max_seq_length, 2) int32 context characters; -1 elsewhere

    def __len__(self) -> int:
        return len(self.window_ids)

    def by_window_id(self) -> Windows:
        """The same windows ordered by window id: build_features' order."""
        return self.take(np.argsort(self.window_ids, kind="stable"))

    def take(self, rows: np.ndarray) -> Windows:
        """The windows at `rows` (indices into these arrays), in that order."""
        return Windows(
            self.window_ids[rows],
            [self.question_ids[i] for i in rows],
            self.example_index[rows],
            self.window_index[rows],
            self.is_impossible[rows],
            self.start_positions[rows],
            self.end_positions[rows],
            self.lengths[rows],
            self.offsets[rows],
        )


@dataclass
class SpanShard:
    """One span shard read whole: its windows (row order) and their hidden states."""

    windows: Windows
    hidden: list[np.ndarray]  # N arrays (L, T, H): the stored float dtype, int8 as float32


@dataclass
class SpanSplit:
    """One split of a span extraction: its windows in storage order (shard by shard) and its
    hidden states, resident or streamed (`data`, the GLUE reader's SplitData of these rows)."""

    data: SplitData
    windows: Windows

    @property
    def plan(self) -> ExtractionPlan:
        return self.data.plan

    @property
    def num_windows(self) -> int:
        return len(self.windows)


@dataclass
class SpanBatch:
    """A batch of windows: their real tokens packed, the rest padded to the longest window T."""

    tokens: TokenBatch  # the real tokens, (N, L, H) float32; its mask (B, T)
    offsets: torch.Tensor  # (B, T, 2) int64, -1 off the context and at padding
    start_positions: torch.Tensor  # (B,) int64
    end_positions: torch.Tensor  # (B,) int64
    window_ids: np.ndarray  # (B,) int64
    storage_rows: np.ndarray  # (B,) rows of SpanSplit.windows


def windows_of(table: pa.Table, max_seq_length: int) -> Windows:
    """The Windows of a table holding WINDOW_COLUMNS; offsets padded to max_seq_length."""
    lengths = table.column("length").to_numpy().astype(np.int64)
    offsets = np.full((table.num_rows, max_seq_length, 2), -1, dtype=np.int32)
    row = 0
    for chunk in table.column("offsets").chunks:
        values = chunk.values.to_numpy(zero_copy_only=False)
        bounds = chunk.offsets.to_numpy()
        for i in range(len(chunk)):
            offsets[row, : lengths[row]] = values[bounds[i] : bounds[i + 1]].reshape(-1, 2)
            row += 1
    column = {name: table.column(name).to_numpy() for name in WINDOW_COLUMNS[2:8]}
    return Windows(
        window_ids=table.column("window_id").to_numpy().astype(np.int64),
        question_ids=table.column("question_id").to_pylist(),
        example_index=column["example_index"].astype(np.int64),
        window_index=column["window_index"].astype(np.int64),
        is_impossible=column["is_impossible"].astype(bool),
        start_positions=column["start_position"].astype(np.int64),
        end_positions=column["end_position"].astype(np.int64),
        lengths=lengths,
        offsets=offsets,
    )


def read_span_shard(url: str) -> tuple[ShardMeta, SpanShard]:
    """A committed span shard whole: checked against its record's size and sha256
    (shards.read_shard); ShardError for a shard of another schema."""
    meta, table = read_shard(url)
    if meta.schema != "span":
        raise ShardError(f"shard {url} holds {meta.schema} rows, not span windows")
    return meta, SpanShard(windows_of(table, meta.max_seq_length), hidden_arrays(table, meta))


def load_span_split(
    embeddings: str,
    split: str,
    task: str = "squad2",
    device: str = "",
    max_resident_gb: float = 8.0,
) -> SpanSplit:
    """Check the span extraction of `task`/`split` under `embeddings`; hold its hidden states on
    `device` when they take at most `max_resident_gb`, else stream them shard by shard."""
    device = device or enc.default_device()
    plan, urls = committed_shards(embeddings.rstrip("/"), task, split)
    folder = split_url(embeddings, task, split)
    if plan.schema != "span":
        raise ShardError(f"{folder} holds a {plan.schema} extraction, not span windows")
    tables, num_tokens = [], 0
    for url in urls:
        meta, table = read_shard(url, columns=WINDOW_COLUMNS)
        if meta.extraction_key != plan.key or (meta.task, meta.split) != (task, split):
            raise ShardError(
                f"shard {url} belongs to another extraction ({meta.task}/{meta.split}, "
                f"key {meta.extraction_key}, expected {plan.key}): shards with mixed settings"
            )
        tables.append(table)
        num_tokens += int(table.column("length").to_numpy().astype(np.int64).sum())
    windows = windows_of(pa.concat_tables(tables), plan.max_seq_length)
    distinct = len(np.unique(windows.window_ids))
    if len(windows) != plan.num_examples or distinct != len(windows):
        raise ShardError(
            f"{folder}: shards hold {len(windows)} rows ({distinct} distinct windows), "
            f"plan says {plan.num_examples}"
        )
    rows = [t.num_rows for t in tables]
    data = SplitData(split, plan, urls, rows, windows.window_ids, None, num_tokens)
    if data.fits(max_resident_gb):
        data.resident = read_packed(urls, plan, device)
    return SpanSplit(data, windows)


def span_batches(
    split: SpanSplit,
    keep: np.ndarray,
    batch_size: int,
    rng: np.random.Generator,
    device: str,
    shuffle_shards: int = 4,
    read_ahead: int = 1,
) -> Iterator[SpanBatch]:
    """One epoch of shuffled batches over the windows where `keep` (storage order) is True;
    when streamed, the next `read_ahead` shard groups read while one is used."""
    for packed, rows, storage_rows in epoch_batches(
        split.data, keep, batch_size, rng, device, shuffle_shards, read_ahead=read_ahead
    ):
        tokens = packed.batch(rows, device)
        width = tokens.width
        w = split.windows
        yield SpanBatch(
            tokens=tokens,
            offsets=torch.from_numpy(w.offsets[storage_rows, :width].astype(np.int64)).to(device),
            start_positions=torch.from_numpy(w.start_positions[storage_rows]).to(device),
            end_positions=torch.from_numpy(w.end_positions[storage_rows]).to(device),
            window_ids=w.window_ids[storage_rows],
            storage_rows=storage_rows,
        )

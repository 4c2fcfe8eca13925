"""The embeddings reader: checks of an extraction, resident and streamed splits, padded batches,
memory counted in the stored dtype, and the shard formats it reads."""

from __future__ import annotations

from functools import partial

import numpy as np
import pyarrow as pa
import pytest
import torch

from bertvision import glue
from bertvision.embeddings import epoch_batches, load_embeddings, read_packed
from bertvision.extract import HostStates
from bertvision.schema import HIDDEN_DTYPES, LIST_FORMATS, ExtractionPlan, shard_schema
from bertvision.schema import format_version as format_of
from bertvision.shards import (
    ShardError,
    ShardWriter,
    committed_shards,
    hidden_arrays,
    read_shard,
    split_url,
    write_plan,
)

LAYERS, HIDDEN = 3, 8


# ----------------------------------------------------------------------------------------------
# Synthetic embeddings: written with the real ShardWriter; layer 2 carries the label.


def write_split(
    out: str,
    task: str,
    split: str,
    n: int,
    *,
    seed: int = 0,
    shard_size: int = 16,
    fingerprint: str = "a" * 16,
    hidden_size: int = HIDDEN,
    labels: np.ndarray | None = None,
    format_version: int | None = None,  # the one extraction writes for `dtype`
    dtype: str = "float16",
) -> ExtractionPlan:
    spec = glue.get_task(task)
    rng = np.random.default_rng(seed)
    truth = rng.uniform(0, 5, n) if spec.regression else rng.integers(0, spec.num_labels, n)
    if spec.is_test(split):
        labels = None
    elif labels is None:
        labels = truth  # the hidden states carry the truth; `labels` overrides what is stored
    lengths = rng.integers(2, 13, n)
    hidden = []
    for i in range(n):
        h = rng.normal(size=(LAYERS, lengths[i], hidden_size)).astype(np.float16)
        if spec.regression:
            h[2, :, 0] += np.float16(truth[i] - 2.5)
        else:
            h[2, :, int(truth[i])] += np.float16(2.0)
        hidden.append(h.astype(np.float32 if HIDDEN_DTYPES[dtype].quantised else dtype))
    plan = ExtractionPlan(
        task=spec.name,
        split=split,
        model="synthetic",
        model_fingerprint=fingerprint,
        data_fingerprint=f"data-{seed}",
        num_examples=n,
        shard_size=shard_size,
        max_seq_length=16,
        dtype=dtype,
        layers=LAYERS,
        hidden_size=hidden_size,
        regression=spec.regression,
        format_version=format_version or format_of("glue", dtype),
    )
    folder = split_url(out, spec.name, split)
    write_plan(folder, plan)
    schema = shard_schema(regression=spec.regression, dtype=dtype)
    stored = HIDDEN_DTYPES[dtype]
    values = stored.arrow
    for index in range(plan.num_shards):
        start, stop = plan.shard_range(index)
        rows = range(start, stop)
        table = pa.table(
            {
                "example_id": pa.array(list(rows), pa.int64()),
                "label": pa.array(
                    [None if labels is None else labels[i].item() for i in rows],
                    schema.field("label").type,
                ),
                "length": pa.array([int(lengths[i]) for i in rows], pa.int32()),
            }
        )
        as_list = plan.format_version in (1, *LIST_FORMATS)  # as extraction stores it
        states = HostStates.of_examples([hidden[i] for i in rows])
        columns = states.hidden_columns(stored, as_list)  # hidden (and int8's hidden_scale)
        for name, column in zip(("hidden", "hidden_scale"), columns, strict=False):
            table = table.append_column(name, column)
        writer = ShardWriter(folder, plan, index)
        if format_version == 1:  # as written before format 2: int32 offsets
            field = pa.field("hidden", pa.list_(values), nullable=False)
            writer.schema = writer.schema.set(writer.schema.get_field_index("hidden"), field)
        with writer:
            writer.write(table)
            writer.commit()
    return plan


def synthetic(out: str, task: str = "rte", n_train: int = 80, n_dev: int = 30, **kw) -> str:
    spec = glue.get_task(task)
    write_split(out, task, "train", n_train, seed=1, **kw)
    for k, split in enumerate(spec.dev_splits):
        write_split(out, task, split, n_dev, seed=2 + k, **kw)
    return out


@pytest.fixture
def rte_embeddings(tmp_path) -> str:
    return synthetic(str(tmp_path / "emb"))


# ----------------------------------------------------------------------------------------------
# Batches: the stored states, padded; resident or streamed


def stored_states(urls: list[str]) -> dict[int, np.ndarray]:
    """Each example's stored states (L, T, H), by example id, as the shards hold them."""
    states = {}
    for url in urls:
        meta, table = read_shard(url)
        ids = table.column("example_id").to_pylist()
        states |= dict(zip(ids, hidden_arrays(table, meta), strict=True))
    return states


def test_a_batch_holds_the_stored_states_of_its_real_tokens_only_in_row_order(rte_embeddings):
    dev = load_embeddings("rte", rte_embeddings, device="cpu").splits["dev"]
    packed = dev.resident
    order = np.argsort(packed.lengths, kind="stable")
    rows = order[[-1, 0, len(order) // 2]]  # longest, shortest, middle: not sorted
    lengths = packed.lengths[rows]
    assert lengths[1] < lengths[2] < lengths[0]

    batch = packed.batch(rows, "cpu")
    total = int(lengths.sum())
    assert batch.tokens.shape == (total, LAYERS, HIDDEN) and batch.tokens.dtype == torch.float32
    assert batch.lengths.tolist() == lengths.tolist() and batch.width == lengths.max()
    assert batch.starts.tolist() == [0, lengths[0], lengths[0] + lengths[1]]
    assert batch.example.tolist() == [b for b, n in enumerate(lengths) for _ in range(n)]
    assert batch.position.tolist() == [t for n in lengths for t in range(n)]
    stored = stored_states(dev.shard_urls)
    expected = [stored[int(packed.example_ids[row])].astype(np.float32) for row in rows]
    np.testing.assert_array_equal(  # each example's (L, T, H) as (T, L, H), one after another
        batch.tokens.numpy(), np.concatenate([states.transpose(1, 0, 2) for states in expected])
    )
    hidden, mask = batch.padded()  # the padded view: (B, L, T, H) zero at padding, (B, T)
    assert mask.tolist() == [[t < n for t in range(batch.width)] for n in lengths]
    for b, n in enumerate(lengths):
        np.testing.assert_array_equal(hidden[b, :, :n].numpy(), expected[b])
        assert not hidden[b, :, n:].any()


def test_streamed_splits_see_every_training_example_once_per_epoch(rte_embeddings):
    data = load_embeddings("rte", rte_embeddings, device="cpu", max_resident_gb=0)
    train = data.splits["train"]
    assert train.resident is None and len(train.shard_urls) == 5
    keep = ~np.isin(train.example_ids, train.held_out_ids(0.1, val_seed=0))
    seen = []
    for packed, rows, storage_rows in epoch_batches(
        train, keep, 8, np.random.default_rng(0), "cpu", shuffle_shards=2
    ):
        assert len(rows) <= 8
        np.testing.assert_array_equal(packed.example_ids[rows], train.example_ids[storage_rows])
        seen.extend(packed.example_ids[rows].tolist())
    assert sorted(seen) == sorted(train.example_ids[keep].tolist())


def test_reading_ahead_gives_the_same_batches_in_the_same_order(rte_embeddings):
    """Shard groups read on a thread while training on one (read_ahead 0, 1, 3): the same packs
    in the same order, hence the same batches, as reading each group when its turn comes."""
    train = load_embeddings("rte", rte_embeddings, device="cpu", max_resident_gb=0).splits["train"]
    keep = np.ones(train.num_examples, dtype=bool)

    def epoch(read_ahead: int) -> list[tuple[list[int], torch.Tensor]]:
        batches = epoch_batches(
            train, keep, 8, np.random.default_rng(5), "cpu", 2, read_ahead=read_ahead
        )
        return [(packed.example_ids[rows].tolist(), packed.batch(rows, "cpu").tokens)
                for packed, rows, _ in batches]  # fmt: skip

    in_turn = epoch(0)
    for read_ahead in (1, 3):
        ahead = epoch(read_ahead)
        assert [ids for ids, _ in ahead] == [ids for ids, _ in in_turn]
        for (_, ours), (_, theirs) in zip(ahead, in_turn, strict=True):
            torch.testing.assert_close(ours, theirs, rtol=0, atol=0)


def test_shards_decoded_on_threads_fill_the_same_packed_as_one_by_one(rte_embeddings):
    train = load_embeddings("rte", rte_embeddings, device="cpu", max_resident_gb=0).splits["train"]
    one, four = (read_packed(train.shard_urls, train.plan, "cpu", threads=n) for n in (1, 4))
    np.testing.assert_array_equal(four.example_ids, train.example_ids)
    np.testing.assert_array_equal(four.example_ids, one.example_ids)
    np.testing.assert_array_equal(four.lengths, one.lengths)
    assert torch.equal(four.starts, one.starts) and torch.equal(four.tokens, one.tokens)


def test_a_failed_read_ahead_raises_when_its_group_s_turn_comes(rte_embeddings, monkeypatch):
    train = load_embeddings("rte", rte_embeddings, device="cpu", max_resident_gb=0).splits["train"]
    real = train.read_group

    def read_group(shards, device):
        if shards.tolist() == [2]:
            raise ShardError("shard 2 is gone")
        return real(shards, device)

    monkeypatch.setattr(train, "read_group", read_group)
    groups = train.shard_groups()  # one shard a group, in storage order
    read = []
    with pytest.raises(ShardError, match="shard 2 is gone"):
        for packed, _ in train.read_groups(groups, "cpu", read_ahead=3):
            read.append(packed.example_ids[0])
    assert len(read) == 2  # groups 0 and 1 came first, though group 2 was read ahead


@pytest.mark.parametrize("dtype", sorted(HIDDEN_DTYPES))
def test_a_split_is_held_exactly_when_its_states_fit_counted_in_their_stored_dtype(tmp_path, dtype):
    out = str(tmp_path / "emb")
    write_split(out, "rte", "dev", 20, seed=2, dtype=dtype)
    stored = HIDDEN_DTYPES[dtype]
    dev = load_embeddings("rte", out, ["dev"], device="cpu").splits["dev"]
    size = dev.num_tokens * (LAYERS * HIDDEN * stored.itemsize + LAYERS * 2 * stored.quantised)
    assert dev.resident.tokens.dtype == stored.torch()
    scales = dev.resident.scales
    held = dev.resident.tokens.numel() * stored.itemsize
    assert held + (0 if scales is None else scales.numel() * scales.itemsize) == size
    held = load_embeddings("rte", out, ["dev"], device="cpu", max_resident_gb=size / 2**30)
    streamed = load_embeddings(
        "rte", out, ["dev"], device="cpu", max_resident_gb=(size - 1) / 2**30
    )
    assert held.splits["dev"].resident is not None
    assert streamed.splits["dev"].resident is None


@pytest.mark.parametrize("name", sorted(HIDDEN_DTYPES))
def test_each_stored_dtype_is_one_type_in_arrow_numpy_and_torch(name):
    dtype = HIDDEN_DTYPES[name]
    assert dtype.name == name and str(dtype.numpy) == name
    assert dtype.arrow.to_pandas_dtype() == dtype.numpy.type
    assert dtype.arrow.bit_width // 8 == dtype.itemsize == dtype.torch().itemsize
    assert torch.zeros(1, dtype=dtype.torch()).numpy().dtype == dtype.numpy


# ----------------------------------------------------------------------------------------------
# Shard formats: raw bytes (format 6) and int64 offsets (format 2); shards of format 1 still read


@pytest.mark.slow  # writes and reads 2**31 values: about half a minute a format
@pytest.mark.parametrize("version, dtype", [(6, "float16"), (2, "float16"), (4, "int8")])
def test_a_shard_of_more_than_2_31_values_reads_back_for_training(tmp_path, version, dtype):
    """bert-large-sized rows (25 x 1024 values a token) past 2**31 values in one shard, written
    by the real ShardWriter one row group per batch as extraction does, read by the embeddings
    reader, as raw bytes, as a large_list, and as int8 bytes with their scales. Zeros cost no
    memory until read; markers sit at each row's ends and past 2**31 (int8: restored to within
    its float16 scale's rounding)."""
    layers, hidden_size, length, rows_per_group, groups = 25, 1024, 328, 4, 64
    per_row = layers * length * hidden_size
    num_rows = rows_per_group * groups
    assert num_rows * per_row > 2**31
    plan = ExtractionPlan(
        task="rte",
        split="dev",
        model="synthetic",
        model_fingerprint="a" * 16,
        data_fingerprint="large",
        num_examples=num_rows,
        shard_size=num_rows,
        max_seq_length=512,
        dtype=dtype,
        layers=layers,
        hidden_size=hidden_size,
        regression=False,
        format_version=version,
    )
    folder = split_url(str(tmp_path), "rte", "dev")
    write_plan(folder, plan)
    far_row, far_index = divmod(2**31 + 7, per_row)  # a value beyond any int32 offset
    lengths = np.full(rows_per_group, length)
    with ShardWriter(folder, plan, 0) as writer:
        for group in range(groups):
            rows = range(group * rows_per_group, (group + 1) * rows_per_group)
            values = np.zeros(rows_per_group * per_row, np.float16)
            for k, row in enumerate(rows):
                values[k * per_row] = row + 1  # layer 0, token 0, unit 0
                values[(k + 1) * per_row - 1] = -(row + 1)  # last layer, token and unit
                if row == far_row:
                    values[k * per_row + far_index] = 0.5
            states = HostStates(torch.from_numpy(values.reshape(-1, hidden_size)), lengths, layers)
            hidden = states.hidden_columns(HIDDEN_DTYPES[dtype], as_list=version == 2)
            columns = {
                "example_id": pa.array(rows, pa.int64()),
                "label": pa.array([0] * rows_per_group, pa.int64()),
                "length": pa.array([length] * rows_per_group, pa.int32()),
                **dict(zip(("hidden", "hidden_scale"), hidden, strict=False)),
            }
            writer.write(pa.table(columns))
            del values, hidden, columns
        writer.commit()

    _, urls = committed_shards(str(tmp_path), "rte", "dev")
    packed = read_packed(urls, plan, "cpu")
    assert packed.tokens.shape == (num_rows * length, layers, hidden_size)
    assert packed.example_ids.tolist() == list(range(num_rows))
    assert packed.starts.tolist() == [row * length for row in range(num_rows)]

    def stored(token: int, layer: int, unit: int) -> float:
        """One value as training reads it (int8: times its float16 scale, as `batch` does)."""
        value = packed.tokens[token, layer, unit].item()
        return value if packed.scales is None else value * packed.scales[token, layer].item()

    close = partial(pytest.approx, rel=2**-10 if dtype == "int8" else 0)
    for row in (0, 1, far_row, num_rows - 1):
        start = row * length
        assert stored(start, 0, 0) == close(row + 1)
        assert stored(start + length - 1, layers - 1, hidden_size - 1) == close(-(row + 1))
        assert stored(start + 1, 0, 0) == 0 and stored(start, 1, 0) == 0
    layer, rest = divmod(far_index, length * hidden_size)
    token, unit = divmod(rest, hidden_size)
    assert stored(far_row * length + token, layer, unit) == close(0.5)


def test_a_format_1_shard_still_reads(tmp_path):
    """Shards written before format 2 (`hidden` list<float16>, int32 offsets) read as before:
    the same hidden states as format 2, by the shard reader and the embeddings reader."""
    old, new = str(tmp_path / "old"), str(tmp_path / "new")
    for out, version in [(old, 1), (new, 2)]:
        write_split(out, "rte", "train", 40, format_version=version)
        write_split(out, "rte", "dev", 20, seed=2, format_version=version)
    _, urls = committed_shards(old, "rte", "train")
    meta, table = read_shard(urls[0])
    assert meta.format_version == 1 and table.schema.field("hidden").type == pa.list_(pa.float16())

    data = {out: load_embeddings("rte", out, device="cpu") for out in (old, new)}
    for name in ("train", "dev"):
        ours, theirs = data[old].splits[name].resident, data[new].splits[name].resident
        assert torch.equal(ours.tokens, theirs.tokens)
        assert ours.example_ids.tolist() == theirs.example_ids.tolist()
        old_urls = committed_shards(old, "rte", name)[1]
        new_urls = committed_shards(new, "rte", name)[1]
        for old_url, new_url in zip(old_urls, new_urls, strict=True):
            (old_meta, old_table), (new_meta, new_table) = read_shard(old_url), read_shard(new_url)
            stored, expected = (
                hidden_arrays(old_table, old_meta),
                hidden_arrays(new_table, new_meta),
            )
            for a, b in zip(stored, expected, strict=True):
                np.testing.assert_array_equal(a, b)


def test_a_shard_of_an_unknown_format_is_refused(tmp_path):
    write_split(str(tmp_path), "rte", "train", 40, format_version=3)
    write_split(str(tmp_path), "rte", "dev", 20, format_version=3)
    with pytest.raises(ShardError, match="format_version 3; this version of BERTVision reads 1, 2"):
        load_embeddings("rte", str(tmp_path), device="cpu")

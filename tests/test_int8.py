"""int8 hidden states (`--dtype int8`): the quantisation's error bound, the shard format it is
stored in, its own extraction key, and readers that give back float32 states to training, for
GLUE examples and SQuAD windows alike."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from typer.testing import CliRunner

from bertvision import shards, squad
from bertvision.cli import app
from bertvision.config import ExtractConfig
from bertvision.embeddings import load_embeddings
from bertvision.extract import HostStates, extract_hidden_states
from bertvision.finite import NonFiniteError
from bertvision.quantise import dequantise, quantise
from bertvision.schema import HIDDEN_DTYPES, ExtractionPlan, ShardMeta, format_version
from bertvision.span_embeddings import load_span_split, read_span_shard, span_batches

# ----------------------------------------------------------------------------------------------
# The quantisation: symmetric absmax, one float16 scale per (layer, token)


def restored_within_half_a_step(states: np.ndarray) -> np.ndarray:
    """Asserts the documented bound and returns each element's error in steps (error / scale)."""
    values, scales = quantise(states)
    assert values.dtype == np.int8 and scales.dtype == np.float16
    assert values.shape == states.shape and scales.shape == states.shape[:-1]
    assert np.abs(values).max() <= 127
    error = np.abs(dequantise(values, scales) - states)
    step = scales.astype(np.float32)[..., None]
    assert (error <= step / 2 * (1 + 1e-6)).all()
    return error / step


def test_random_states_restore_within_half_a_step_of_their_token_and_layer():
    rng = np.random.default_rng(0)
    states = rng.normal(size=(7, 50, 384)).astype(np.float32) * rng.uniform(0.1, 5, (7, 50, 1))
    restored_within_half_a_step(states)
    values, scales = quantise(states)
    absmax = np.abs(states).max(axis=-1)
    np.testing.assert_allclose(scales, absmax / 127, rtol=2**-10)  # float16's rounding up
    assert (scales.astype(np.float32) >= absmax / 127).all()
    assert (np.abs(values).max(axis=-1) == 127).all()  # every vector uses the whole range


@pytest.mark.parametrize("magnitude", [1e-3, 1e-5, 1e-7, 1e-9])
def test_tiny_tokens_keep_their_values_below_float16s_normal_range(magnitude):
    """A scale under float16's smallest normal (2**-14) is rounded up, never to zero: each
    element within absmax / 254 plus half float16's smallest step, no value clipped, and a
    token well above that step restored, not zeroed."""
    states = np.random.default_rng(3).normal(size=(2, 30, 64)).astype(np.float32) * magnitude
    values, scales = quantise(states)
    restored = dequantise(values, scales)
    absmax = np.abs(states).max(axis=-1, keepdims=True)
    assert (np.abs(states - restored) <= absmax / 254 * (1 + 2**-10) + 2**-25).all()
    restored_within_half_a_step(states)
    if magnitude >= 1e-7:
        assert (scales > 0).all() and np.abs(restored).max(axis=-1).min() > 0


def test_outlier_channels_cost_only_their_own_tokens_precision():
    """BERT-like outlier dimensions (two channels 15-60x the rest in some tokens): each token's
    error stays within 1/254 of its own largest value, and tokens without outliers keep
    their fine steps."""
    rng = np.random.default_rng(1)
    states = rng.normal(size=(3, 40, 64)).astype(np.float32)
    states[:, :20, 7], states[:, :20, 42] = 60.0, -45.0  # outliers in the first 20 tokens
    restored_within_half_a_step(states)
    _, scales = quantise(states)
    calm = np.abs(states[:, 20:]).max(axis=-1) / 127
    np.testing.assert_allclose(scales[:, 20:], calm, rtol=2**-10)
    assert (scales[:, :20] > 10 * scales[:, 20:].max()).all()


def test_zero_tokens_restore_to_zeros_and_negation_is_exact():
    states = np.zeros((2, 3, 8), dtype=np.float32)
    states[1, 1] = np.linspace(-3, 3, 8)
    values, scales = quantise(states)
    assert scales[0].tolist() == [0, 0, 0] and not dequantise(values, scales)[0].any()
    negated, same = quantise(-states)
    assert (negated == -values).all() and (same == scales).all()


def test_non_finite_states_give_non_finite_scales():
    states = np.ones((1, 2, 4), dtype=np.float32)
    states[0, 1, 2] = np.nan
    _, scales = quantise(states)
    assert np.isfinite(scales[0, 0]) and not np.isfinite(scales[0, 1])
    _, huge = quantise(np.full((1, 1, 2), 127 * 70000, dtype=np.float32))
    assert np.isinf(huge).all()
    # float16's largest scale still holds; a step rounded up past it is infinite, not clipped
    largest, scale = quantise(np.full((1, 1, 2), 127 * 65504, dtype=np.float32))
    assert scale.item() == 65504 and (largest == 127).all()
    _, beyond = quantise(np.full((1, 1, 2), 127 * 65510, dtype=np.float32))
    assert np.isinf(beyond).all()


def test_extraction_refuses_states_beyond_the_float16_scales_naming_the_remedy():
    int8 = HIDDEN_DTYPES["int8"]

    def one_example(value: float) -> HostStates:  # 2 layers x 3 tokens x 4 channels
        return HostStates(torch.full((6, 4), value), np.array([3]), layers=2)

    fine = one_example(127 * 60000).hidden_columns(int8)
    assert fine[1].type == pa.large_list(pa.float16())
    assert len(fine[1][0]) == 6  # a scale per (layer, token)
    with pytest.raises(NonFiniteError, match="reach 8.89e\\+06, beyond int8's range.*float32"):
        one_example(127 * 70000).hidden_columns(int8)


# ----------------------------------------------------------------------------------------------
# GLUE: extracted with --dtype int8 from the CLI, stored as format 4, trained on from the CLI


@pytest.fixture(scope="module")
def rte_slice(tmp_path_factory, glue_dir) -> str:
    """Real RTE slices: 40 train, 16 dev examples."""
    data_dir = tmp_path_factory.mktemp("rte-slice")
    (data_dir / "RTE").mkdir()
    for split, rows in (("train", 40), ("dev", 16)):
        lines = (Path(glue_dir) / "RTE" / f"{split}.tsv").read_text().splitlines()[: rows + 1]
        (data_dir / "RTE" / f"{split}.tsv").write_text("\n".join(lines) + "\n")
    return str(data_dir)


def extract_args(out, model: str, data_dir: str, dtype: str) -> list[str]:
    return (
        ["extract", "--task", "rte", "--data-dir", data_dir, "--splits", "train,dev"]
        + ["--model", model, "--max-seq-length", "64", "--shard-size", "16", "--device", "cpu"]
        + ["--dtype", dtype, "--out", str(out)]
    )


@pytest.fixture(scope="module")
def rte_int8(tmp_path_factory, tiny_model, rte_slice) -> str:
    out = tmp_path_factory.mktemp("rte-int8")
    result = CliRunner().invoke(app, extract_args(out, tiny_model, rte_slice, "int8"))
    assert result.exit_code == 0, result.output
    return str(out)


@pytest.fixture(scope="module")
def rte_float32(tmp_path_factory, tiny_model, rte_slice) -> str:
    out = tmp_path_factory.mktemp("rte-float32")
    cfg = ExtractConfig(
        task="rte",
        out=str(out),
        model=tiny_model,
        data_dir=rte_slice,
        splits=["train", "dev"],
        max_seq_length=64,
        shard_size=16,
        dtype="float32",
        device="cpu",
    )
    assert extract_hidden_states(cfg, progress=False).ok
    return str(out)


def states_by_id(out: str, task: str, split: str) -> dict[int, np.ndarray]:
    states = {}
    for table in shards.iter_split(out, task, split):
        meta = ShardMeta.from_metadata(table.schema.metadata)
        ids = table.column(shards.ID_COLUMNS[meta.schema]).to_pylist()
        states |= dict(zip(ids, shards.hidden_arrays(table, meta), strict=True))
    return states


def test_int8_shards_hold_int8_bytes_and_a_float16_scale_per_layer_and_token(rte_int8):
    path = Path(rte_int8) / "rte/dev/shard-00000.parquet"
    table = pq.read_table(path)
    meta = ShardMeta.from_metadata(table.schema.metadata)
    assert (meta.dtype, meta.format_version) == ("int8", 4)
    assert table.schema.field("hidden").type == pa.large_binary()
    assert table.schema.field("hidden_scale").type == pa.large_list(pa.float16())
    for row in table.to_pylist():  # the tiny BERT: 3 layers (embeddings first) x 32
        assert len(row["hidden"]) == 3 * row["length"] * 32
        assert len(row["hidden_scale"]) == 3 * row["length"]
    plan = json.loads((Path(rte_int8) / "rte/dev/_manifest/plan.json").read_text())
    assert (plan["dtype"], plan["format_version"]) == ("int8", 4)


def test_readers_give_back_the_encoders_states_within_half_a_step(rte_int8, rte_float32):
    exact = states_by_id(rte_float32, "rte", "dev")
    restored = states_by_id(rte_int8, "rte", "dev")
    assert sorted(restored) == sorted(exact) == list(range(16))
    for i, states in exact.items():
        assert restored[i].dtype == np.float32 and restored[i].shape == states.shape
        step = np.abs(states).max(axis=-1, keepdims=True) / 127  # (L, T, 1)
        assert (np.abs(restored[i] - states) <= step / 2 * (1 + 2**-10)).all()

    dev = load_embeddings("rte", rte_int8, ["dev"], device="cpu").splits["dev"]
    packed = dev.resident
    assert str(packed.tokens.dtype) == "torch.int8" and str(packed.scales.dtype) == "torch.float16"
    rows = np.arange(dev.num_examples)
    hidden, mask = packed.batch(rows, "cpu").padded()  # (B, L, T, H) float32, (B, T)
    for b, row in enumerate(rows):
        n = int(packed.lengths[row])
        np.testing.assert_array_equal(hidden[b, :, :n].numpy(), restored[int(dev.example_ids[row])])
        assert not hidden[b, :, n:].any() and mask[b].sum() == n


def test_an_adapter_trains_on_int8_embeddings_from_the_cli(tmp_path, rte_int8):
    run = tmp_path / "run"
    result = CliRunner().invoke(
        app,
        ["train", "--task", "rte", "--embeddings", rte_int8, "--out", str(run)]
        + ["--epochs", "2", "--adapter-dim", "8", "--device", "cpu"],
    )
    assert result.exit_code == 0, result.output
    metrics = json.loads((run / "metrics.json").read_text())
    assert 0 <= metrics["dev"]["accuracy"] <= 1


def test_int8_and_float16_are_different_extractions_that_never_mix(tmp_path, tiny_model, rte_slice):
    glue_plan = dict(
        task="rte",
        split="dev",
        model="m",
        model_fingerprint="f" * 16,
        data_fingerprint="d" * 16,
        num_examples=16,
        shard_size=16,
        max_seq_length=64,
        layers=3,
        hidden_size=32,
        regression=False,
    )
    float16 = ExtractionPlan(
        dtype="float16", format_version=format_version("glue", "float16"), **glue_plan
    )
    int8 = ExtractionPlan(dtype="int8", format_version=format_version("glue", "int8"), **glue_plan)
    assert float16.key != int8.key

    first = CliRunner().invoke(app, extract_args(tmp_path, tiny_model, rte_slice, "float16"))
    assert first.exit_code == 0, first.output
    mixed = CliRunner().invoke(app, extract_args(tmp_path, tiny_model, rte_slice, "int8"))
    assert mixed.exit_code == 2
    assert "holds another extraction (different dtype, format_version)" in mixed.output


def test_each_schema_and_dtype_has_its_format():
    assert format_version("glue", "float16") == format_version("glue", "float32") == 6
    assert format_version("span", "float16") == format_version("span", "float32") == 7
    assert (format_version("glue", "int8"), format_version("span", "int8")) == (4, 5)


def rewrite_meta(path: Path, **changes: str) -> None:
    """The shard at `path` with some of its metadata changed (a partial read checks its rows and
    extraction key, which still hold, then its format)."""
    table = pq.read_table(path)
    metadata = dict(table.schema.metadata) | {
        f"bertvision.{k}".encode(): v.encode() for k, v in changes.items()
    }
    pq.write_table(table.replace_schema_metadata(metadata), path)


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"format_version": "8"}, "has format_version 8; this version of BERTVision reads 1, 2, 4"),
        ({"format_version": "6"}, "claims format_version 6 for int8 hidden states"),
        ({"dtype": "int4"}, "stores hidden states as unknown hidden dtype 'int4'"),
        ({"dtype": "float16"}, "claims format_version 4 for float16 hidden states"),
    ],
)
def test_readers_refuse_shards_of_unknown_formats_naming_them(tmp_path, rte_int8, changes, message):
    out = tmp_path / "copy"
    shutil.copytree(rte_int8, out)
    path = out / "rte/dev/shard-00000.parquet"
    rewrite_meta(path, **changes)
    with pytest.raises(shards.ShardError, match=message):
        shards.read_shard(str(path), columns=["example_id", "length"])


# ----------------------------------------------------------------------------------------------
# SQuAD windows (format 5)


def test_squad_windows_extracted_as_int8_read_back_as_float32(tmp_path, tiny_model, squad_dir):
    data_dir = squad.write_slice(squad_dir, str(tmp_path / "squad"), train=(1, 1), dev=(2, 1))
    outs = {}
    for dtype in ("float32", "int8"):
        outs[dtype] = str(tmp_path / dtype)
        cfg = ExtractConfig(
            task="squad2",
            out=outs[dtype],
            model=tiny_model,
            data_dir=data_dir,
            splits=["dev"],
            max_seq_length=96,
            doc_stride=32,
            max_question_length=24,
            dtype=dtype,
            device="cpu",
        )
        assert extract_hidden_states(cfg, progress=False).ok
    exact = states_by_id(outs["float32"], "squad2", "dev")
    plan, urls = shards.committed_shards(outs["int8"], "squad2", "dev")
    assert (plan.schema, plan.dtype, plan.format_version) == ("span", "int8", 5)

    meta, shard = read_span_shard(urls[0])
    for window, states in zip(shard.windows.window_ids, shard.hidden, strict=True):
        step = np.abs(exact[window]).max(axis=-1, keepdims=True) / 127
        assert states.dtype == np.float32
        assert (np.abs(states - exact[window]) <= step / 2 * (1 + 2**-10)).all()

    split = load_span_split(outs["int8"], "dev", device="cpu")
    keep = np.ones(split.num_windows, dtype=bool)
    seen = 0
    for batch in span_batches(split, keep, 8, np.random.default_rng(0), "cpu"):
        for b, window in enumerate(batch.window_ids):
            n = int(batch.tokens.lengths[b])
            start = int(batch.tokens.starts[b])
            restored = batch.tokens.tokens[start : start + n].transpose(0, 1).numpy()  # (L, T, H)
            step = np.abs(exact[window]).max(axis=-1, keepdims=True) / 127
            assert (np.abs(restored - exact[window]) <= step / 2 * (1 + 2**-10)).all()
            seen += 1
    assert seen == split.num_windows

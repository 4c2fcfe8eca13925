"""Extraction of SQuAD 2.0 windows: one row per window with its identity, offsets and labels,
hidden states as a direct forward pass gives them, shards bounded in bytes, the span reader,
resumption, and the Prefect flow."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch
from typer.testing import CliRunner

from bertvision import encoder as enc
from bertvision import extract, shards, squad
from bertvision.cli import app
from bertvision.config import ConfigError, ExtractConfig
from bertvision.extract import extract_hidden_states, prepare_extraction
from bertvision.schema import ExtractionPlan
from bertvision.shards import ShardError
from bertvision.span_embeddings import load_span_split, read_span_shard, span_batches

WINDOWING = dict(max_seq_length=96, doc_stride=32, max_question_length=24)
TINY_WINDOW_BYTES = 96 * 3 * 32 * 2  # max_seq_length x layers x hidden x float16


@pytest.fixture(scope="module")
def squad_slice(tmp_path_factory, squad_dir) -> str:
    """A SQuAD data folder of a few real articles (their first paragraphs): dev from the split's
    dev file, train from its train file."""
    folder = str(tmp_path_factory.mktemp("squad-slice"))
    return squad.write_slice(squad_dir, folder, train=(1, 2), dev=(2, 2))


def _config(out, model, data_dir, **overrides) -> ExtractConfig:
    settings = dict(
        task="squad2",
        out=str(out),
        model=model,
        data_dir=data_dir,
        splits=["dev"],
        batch_size=8,
        shard_bytes=12 * TINY_WINDOW_BYTES,
        device="cpu",
        **WINDOWING,
    )
    return ExtractConfig(**(settings | overrides))


def _features(data_dir, model, split="dev") -> tuple[list[squad.Example], squad.Features]:
    examples = squad.load_split(split, data_dir)
    return examples, squad.build_features(examples, enc.load_tokenizer(model), **_lengths())


def _lengths() -> dict:
    return dict(
        max_length=WINDOWING["max_seq_length"],
        doc_stride=WINDOWING["doc_stride"],
        max_question_length=WINDOWING["max_question_length"],
    )


@pytest.fixture(scope="module")
def extracted(tmp_path_factory, tiny_model, squad_slice) -> str:
    out = tmp_path_factory.mktemp("squad-emb")
    summary = extract_hidden_states(_config(out, tiny_model, squad_slice), progress=False)
    assert summary.ok
    return str(out)


def test_every_window_is_stored_once_with_the_identity_offsets_and_labels_of_build_features(
    extracted, tiny_model, squad_slice
):
    examples, features = _features(squad_slice, tiny_model)
    split = load_span_split(extracted, "dev", device="cpu")
    stored = split.windows.by_window_id()

    assert split.plan.num_examples == len(features) == split.num_windows
    assert stored.window_ids.tolist() == list(range(len(features)))
    assert stored.question_ids == features.question_ids
    assert stored.example_index.tolist() == features.example_index.tolist()
    assert stored.window_index.tolist() == features.window_index.tolist()
    assert stored.start_positions.tolist() == features.start_positions.tolist()
    assert stored.end_positions.tolist() == features.end_positions.tolist()
    assert stored.lengths.tolist() == features.attention_mask.sum(axis=1).tolist()
    np.testing.assert_array_equal(stored.offsets, features.offsets)  # -1 beyond T, as there
    impossible = [examples[i].is_impossible for i in features.example_index]
    assert stored.is_impossible.tolist() == impossible
    assert any(impossible) and not all(impossible)


def test_a_context_longer_than_one_window_gives_several_windows_per_question(
    extracted, tiny_model, squad_slice
):
    examples, _ = _features(squad_slice, tiny_model)
    tokenizer = enc.load_tokenizer(tiny_model)
    stored = load_span_split(extracted, "dev", device="cpu").windows.by_window_id()
    question_windows = stored.window_index[stored.example_index == 0]
    # [CLS] question [SEP] context [SEP]: the room left for context tokens, and each next
    # window starts doc_stride tokens before the previous one ends.
    question = squad._truncated_questions(examples[:1], tokenizer, 24)[0]
    room = 96 - len(tokenizer(question, add_special_tokens=False)["input_ids"]) - 3
    context = len(tokenizer(examples[0].context, add_special_tokens=False)["input_ids"])
    assert context > room
    expected = 1 + -(-(context - room) // (room - 32))
    assert question_windows.tolist() == list(range(expected))
    assert expected > 1
    first, second = (stored.offsets[stored.example_index == 0][w] for w in (0, 1))
    shared = set(map(tuple, first[first[:, 0] >= 0])) & set(map(tuple, second[second[:, 0] >= 0]))
    assert len(shared) == 32  # doc_stride context tokens in both windows


def test_hidden_states_equal_a_direct_forward_pass(extracted, tiny_model, squad_slice):
    _, features = _features(squad_slice, tiny_model)
    plan, urls = shards.committed_shards(extracted, "squad2", "dev")
    model = enc.load_encoder(tiny_model, "cpu").model
    for url in (urls[0], urls[-1]):
        _, shard = read_span_shard(url)
        for row in range(0, len(shard.windows), 5):
            w, length = int(shard.windows.window_ids[row]), int(shard.windows.lengths[row])
            inputs = {
                "input_ids": torch.from_numpy(features.input_ids[w : w + 1, :length]),
                "attention_mask": torch.from_numpy(features.attention_mask[w : w + 1, :length]),
                "token_type_ids": torch.from_numpy(features.token_type_ids[w : w + 1, :length]),
            }
            with torch.inference_mode():
                direct = torch.stack(model(**inputs, output_hidden_states=True).hidden_states)
            stored = shard.hidden[row]  # (L, T, H) float16
            assert stored.shape == (plan.layers, length, plan.hidden_size)
            np.testing.assert_allclose(
                stored.astype(np.float32), direct[:, 0].numpy(), rtol=1e-3, atol=2e-3
            )


def test_shards_stay_within_their_byte_target(extracted, tiny_model, squad_slice):
    _, features = _features(squad_slice, tiny_model)
    plan, _ = shards.committed_shards(extracted, "squad2", "dev")
    assert (plan.schema, plan.format_version, plan.shard_bytes) == ("span", 7, 12 * 18432)
    assert plan.shard_size == 12  # windows of 96 tokens x 3 layers x 32 float16 in the target
    assert plan.num_shards == -(-len(features) // 12) > 1
    records = shards.committed_records(shards.split_url(extracted, "squad2", "dev"), plan)
    assert sorted(records) == list(range(plan.num_shards))
    for record in records.values():
        assert record.bytes <= plan.shard_bytes + TINY_WINDOW_BYTES
    full = [r for r in records.values() if r.rows == 12]
    assert all(r.bytes > plan.shard_bytes / 2 for r in full)  # near it, not far below


def test_the_shard_size_in_windows_stays_the_upper_bound(tmp_path, tiny_model, squad_slice):
    cfg = _config(tmp_path, tiny_model, squad_slice, shard_size=5)
    [plan] = prepare_extraction(cfg)
    assert plan.shard_size == 5
    huge = _config(tmp_path / "one", tiny_model, squad_slice, shard_bytes=1)
    assert prepare_extraction(huge)[0].shard_size == 1  # never 0


def test_the_reader_reads_a_shard_back_whole_and_refuses_a_changed_one(tmp_path, extracted):
    import shutil

    out = tmp_path / "emb"
    shutil.copytree(extracted, out)
    plan, urls = shards.committed_shards(str(out), "squad2", "dev")
    meta, shard = read_span_shard(urls[1])
    assert (meta.schema, meta.doc_stride, meta.max_question_length) == ("span", 32, 24)
    assert len(shard.windows) == len(shard.hidden) == 12
    assert sorted(shard.windows.window_ids.tolist()) == list(range(12, 24))

    path = Path(urls[1])
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(ShardError, match=r"shard-00001.parquet is corrupt"):
        read_span_shard(urls[1])
    assert extract.pending_shards(_config(out, "", None), plan) == [1]


def test_batches_give_hidden_states_offsets_and_labels_of_every_window(extracted):
    split = load_span_split(extracted, "dev", device="cpu")
    keep = np.ones(split.num_windows, dtype=bool)
    seen = []
    for batch in span_batches(split, keep, 16, np.random.default_rng(0), "cpu"):
        b, width, mask = len(batch.window_ids), batch.tokens.width, batch.tokens.mask
        assert batch.tokens.tokens.shape[1:] == (3, 32) and mask.shape == (b, width)
        assert batch.offsets.shape == (b, width, 2)
        rows = batch.storage_rows
        assert batch.tokens.lengths.tolist() == split.windows.lengths[rows].tolist()
        assert batch.start_positions.tolist() == split.windows.start_positions[rows].tolist()
        assert batch.end_positions.tolist() == split.windows.end_positions[rows].tolist()
        assert (batch.offsets[~mask] == -1).all()
        seen += batch.window_ids.tolist()
    assert sorted(seen) == list(range(split.num_windows))


def test_a_rerun_commits_only_the_shards_that_failed(
    tmp_path, tiny_model, squad_slice, monkeypatch
):
    real = extract.window_batches

    def failing_on_shard_2(encoder, windows, start, stop, plan, batch_size):
        if start == 24:
            raise RuntimeError("injected: the worker died")
        return real(encoder, windows, start, stop, plan, batch_size)

    monkeypatch.setattr(extract, "window_batches", failing_on_shard_2)
    cfg = _config(tmp_path, tiny_model, squad_slice)
    first = extract_hidden_states(cfg, progress=False)
    assert list(first.failed["squad2/dev"]) == [2]
    folder = shards.split_url(str(tmp_path), "squad2", "dev")
    before = {p.name: p.stat().st_mtime_ns for p in Path(folder).glob("shard-*.parquet")}

    monkeypatch.setattr(extract, "window_batches", real)
    second = extract_hidden_states(cfg, progress=False)
    assert second.ok and second.committed == {"squad2/dev": [2]}
    assert 2 not in second.skipped["squad2/dev"] and len(second.skipped["squad2/dev"]) > 1
    after = {p.name: p.stat().st_mtime_ns for p in Path(folder).glob("shard-*.parquet")}
    assert {k: v for k, v in after.items() if k != "shard-00002.parquet"} == before
    stored = load_span_split(str(tmp_path), "dev", device="cpu").windows
    assert sorted(stored.window_ids.tolist()) == list(range(len(stored)))


def test_another_windowing_is_another_extraction(tmp_path, tiny_model, squad_slice):
    [plan] = prepare_extraction(_config(tmp_path, tiny_model, squad_slice))
    other = _config(tmp_path, tiny_model, squad_slice, doc_stride=16)
    with pytest.raises(ShardError, match=r"different data_fingerprint, doc_stride\)"):
        prepare_extraction(other)
    [replaced] = prepare_extraction(
        _config(tmp_path, tiny_model, squad_slice, doc_stride=16, overwrite=True)
    )
    assert replaced.key != plan.key and replaced.data_fingerprint != plan.data_fingerprint


def test_glue_plans_keep_their_keys():
    """The key of a GLUE plan, as computed before span plans existed: GLUE extractions made
    then resume, never count as another extraction."""
    plan = ExtractionPlan(
        task="rte",
        split="dev",
        model="m",
        model_fingerprint="0123456789abcdef",
        data_fingerprint="fedcba9876543210",
        num_examples=277,
        shard_size=100,
        max_seq_length=128,
        dtype="float16",
        layers=7,
        hidden_size=384,
        regression=False,
        shard_bytes=2**30,
        format_version=2,  # as then
    )
    assert (plan.key, plan.schema) == ("fbad1426210bbc8f", "glue")


def test_the_command_extracts_train_and_dev(tmp_path, tiny_model, squad_slice):
    args = ["extract", "--task", "squad2", "--data-dir", squad_slice, "--splits", "train,dev"]
    args += ["--model", tiny_model, "--out", str(tmp_path), "--device", "cpu"]
    args += ["--max-seq-length", "96", "--doc-stride", "32", "--max-question-length", "24"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    status = shards.status(str(tmp_path))
    assert sorted(status) == ["squad2/dev", "squad2/train"]
    assert all(s["done"] == s["shards"] and s["failed"] == 0 for s in status.values())
    run = json.loads((tmp_path / "squad2/dev/_manifest/run.json").read_text())
    assert run["settings"]["doc_stride"] == 32 and run["inputs"]["data/dev"]["url"] == squad_slice


def test_max_train_examples_caps_the_train_questions_as_fine_tuning_does(
    tmp_path, tiny_model, squad_slice
):
    from bertvision.span_train import load_span_data

    cfg = _config(tmp_path, tiny_model, squad_slice, splits=["train", "dev"], max_train_examples=4)
    assert extract_hidden_states(cfg, progress=False).ok
    first_four = [q.question_id for q in squad.load_split("train", squad_slice)[:4]]
    windows = load_span_split(str(tmp_path), "train", device="cpu").windows
    assert sorted(set(windows.question_ids)) == sorted(first_four)
    data = load_span_data("squad2", str(tmp_path), device="cpu")  # the same four questions
    assert [q.question_id for q in data.questions["train"]] == first_four
    assert len(data.questions["dev"]) == len(squad.load_split("dev", squad_slice))  # not capped


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--splits", "test"], r"error: --splits \['test'\] of squad2: expected train, dev"),
        (
            ["--max-seq-length", "40"],
            r"error: --max-seq-length 40: max_length 40 leaves -27 ",
        ),
    ],
)
def test_bad_windowing_or_splits_are_named_and_nothing_is_written(
    tmp_path, tiny_model, squad_slice, extra, message
):
    args = ["extract", "--task", "squad2", "--data-dir", squad_slice, "--model", tiny_model]
    args += ["--out", str(tmp_path / "emb"), "--device", "cpu", *extra]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2
    assert result.output.count("\n") == 1
    assert re.search(message, result.output), result.output
    assert not (tmp_path / "emb").exists()


def write_odd_answer(folder: Path, answer: str, splits=("train", "dev")) -> str:
    """A SQuAD data folder whose files hold one question each: answered by `answer` in the
    context f" {answer} " (so its answer_start is 1)."""
    qa = {"id": "q-odd", "question": "What?", "is_impossible": False,
          "answers": [{"text": answer, "answer_start": 1}]}  # fmt: skip
    paragraph = {"context": f" {answer} ", "qas": [qa]}
    document = {"version": "v2.0", "data": [{"title": "Odd", "paragraphs": [paragraph]}]}
    folder.mkdir()
    for split in splits:
        (folder / squad.SPLIT_FILES[split]).write_text(json.dumps(document))
    return str(folder)


ODD_ANSWERS = {
    # blank: refused as the file is read
    "invisible": ("\u200b", r"malformed data file {file}: .*\(id q-odd\) answers\[0\]: "
                             r"the answer text '\\u200b' is blank"),
    # not blank, but BERT's tokenizers drop it: refused as the windows are built
    "dropped-by-the-tokenizer": ("\ufffd", r"data file {file}: question q-odd: its context "
                                           r"tokenizes to nothing"),
}  # fmt: skip


@pytest.mark.parametrize(("answer", "message"), ODD_ANSWERS.values(), ids=ODD_ANSWERS.keys())
def test_an_answer_in_a_context_of_no_token_is_one_error_line_naming_file_and_question(
    tmp_path, tiny_model, answer, message
):
    data = write_odd_answer(tmp_path / "data", answer)
    args = ["extract", "--task", "squad2", "--data-dir", data, "--splits", "dev"]
    args += ["--model", tiny_model, "--out", str(tmp_path / "emb"), "--device", "cpu"]
    result = CliRunner().invoke(app, [*args, "--max-seq-length", "128", "--doc-stride", "32"])
    assert result.exit_code == 2, result.output
    assert result.output.count("\n") == 1
    file = re.escape(f"{data}/dev-v2.0.json")
    assert re.match(f"error: {message.format(file=file)}", result.output), result.output
    assert not (tmp_path / "emb").exists()


def test_squad2_is_a_task_of_the_extract_config():
    assert ExtractConfig(task="SQuAD2", out="x").task == "squad2"
    with pytest.raises(ConfigError, match=r"'squad3' is unknown; expected one of .*squad2"):
        ExtractConfig(task="squad3", out="x")


def test_extract_squad_flow_commits_every_shard(prefect_harness, tmp_path, tiny_model, squad_slice):
    from bertvision_flows.extract_glue import extract_squad

    cfg = _config(tmp_path, tiny_model, squad_slice, shard_bytes=40 * TINY_WINDOW_BYTES)
    state = extract_squad(cfg, return_state=True)
    assert state.is_completed()
    plan, _ = shards.committed_shards(str(tmp_path), "squad2", "dev")
    assert state.result() == {"squad2/dev": plan.num_shards} and plan.num_shards > 1
    windows = load_span_split(str(tmp_path), "dev", device="cpu").windows
    assert sorted(windows.window_ids.tolist()) == list(range(plan.num_examples))


def test_a_committed_shard_has_the_bytes_of_the_plain_sequential_writer(
    tmp_path, tiny_model, squad_slice
):
    """Windows sorted by (length, index), one forward per batch cut to its longest window, each
    window's real tokens sliced out on the host as a Python list of their bytes and written one
    batch after the other: exactly the bytes the overlapped extraction commits."""
    cfg = _config(tmp_path / "out", tiny_model, squad_slice)
    [plan] = prepare_extraction(cfg)
    record = extract.extract_shard(cfg, plan, 1)

    windows = extract._load_windows(cfg, "dev")
    f = windows.features
    lengths = f.attention_mask.sum(axis=1)
    start, stop = plan.shard_range(1)
    order = sorted(range(start, stop), key=lambda w: (int(lengths[w]), w))
    model = enc.load_encoder(tiny_model, "cpu").model
    schema = shards.plan_schema(plan)
    with shards.ShardWriter(str(tmp_path / "plain"), plan, 1) as writer:
        for begin in range(0, len(order), cfg.batch_size):
            rows = np.asarray(order[begin : begin + cfg.batch_size])
            real, width = lengths[rows], int(lengths[rows].max())
            names = ("input_ids", "attention_mask", "token_type_ids")
            inputs = {k: torch.from_numpy(getattr(f, k)[rows, :width]) for k in names}
            with torch.inference_mode():
                output = model(**inputs, output_hidden_states=True)
            hidden = torch.stack(output.hidden_states, dim=1).to(torch.float16).numpy()
            questions = [windows.examples[i] for i in f.example_index[rows]]
            columns = [
                pa.array(rows, pa.int64()),
                pa.array([q.question_id for q in questions], pa.string()),
                pa.array(f.example_index[rows], pa.int64()),
                pa.array(f.window_index[rows], pa.int32()),
                pa.array([q.is_impossible for q in questions], pa.bool_()),
                pa.array(f.start_positions[rows], pa.int32()),
                pa.array(f.end_positions[rows], pa.int32()),
                pa.array(real, pa.int32()),
                pa.array(
                    [f.offsets[w, :t].ravel() for w, t in zip(rows, real, strict=True)],
                    schema.field("offsets").type,
                ),
                pa.array(
                    [hidden[b][:, :t].tobytes() for b, t in enumerate(real)],
                    schema.field("hidden").type,
                ),
            ]
            writer.write(pa.RecordBatch.from_arrays(columns, schema=schema))
        plain = writer.commit()
    assert (record.rows, record.bytes, record.sha256) == (plain.rows, plain.bytes, plain.sha256)

"""Partial fine-tuning on SQuAD 2.0: windows, a span head, the no-answer threshold chosen on
held-out articles of TRAIN, the official metrics and prediction format, a checkpoint that
from_pretrained loads; one task-family seam shared with GLUE."""

from __future__ import annotations

import json
import re
import shutil
from dataclasses import replace
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from bertvision import families, squad
from bertvision.cli import app
from bertvision.config import ConfigError, FinetuneConfig, TrainConfig
from bertvision.console import quiet_libraries
from bertvision.finetune import finetune_encoder

TRAIN_ARTICLES, DEV_ARTICLES = ("Normans", "Sky_(United_Kingdom)"), ("Rhine",)


@pytest.fixture(scope="module")
def small_squad(squad_dir, tmp_path_factory) -> str:
    """2 articles of the split's train (5 paragraphs each), 1 of its dev (3 paragraphs)."""
    folder = str(tmp_path_factory.mktemp("squad-small"))
    return squad.write_slice(squad_dir, folder, train=(TRAIN_ARTICLES, 5), dev=(DEV_ARTICLES, 3))


def _config(data_dir: str, model: str, out: Path, **changes) -> FinetuneConfig:
    settings = dict(
        task="squad2",
        data_dir=data_dir,
        model=model,
        out=str(out),
        epochs=0.5,
        batch_size=8,
        max_seq_length=128,
        doc_stride=32,
        device="cpu",
        val_fraction=0.3,
    )
    return FinetuneConfig(**(settings | changes))


@pytest.fixture(scope="module")
def finished(small_squad, tiny_model, tmp_path_factory) -> tuple[FinetuneConfig, dict]:
    cfg = _config(small_squad, tiny_model, tmp_path_factory.mktemp("run") / "ckpt")
    return cfg, finetune_encoder(cfg, progress=False)


# -- the family seam ---------------------------------------------------------------------------


def test_tasks_of_both_families_are_looked_up_by_name():
    assert families.get_task("squad2").family.name == "squad"
    assert families.get_task("SST-2") == families.Task("sst2", families.get_task("rte").family)
    assert families.task_names()[-1] == "squad2" and "rte" in families.task_names()
    with pytest.raises(ValueError, match="expected one of cola, .*, wnli, squad2"):
        families.get_task("squad3")


def test_the_window_length_defaults_to_the_task_family_s():
    assert FinetuneConfig(task="squad2").max_seq_length == 384
    assert FinetuneConfig(task="rte").max_seq_length == 128
    assert FinetuneConfig(task="squad2", max_seq_length=256).max_seq_length == 256


def test_an_unknown_task_lists_every_family_s_tasks():
    with pytest.raises(ConfigError, match="'nope' is unknown; expected one of cola.*squad2"):
        FinetuneConfig(task="nope")


def test_adapter_training_takes_squad_with_the_span_adapter_only():
    assert TrainConfig(task="squad2").adapter == "span"  # the family's default
    with pytest.raises(ConfigError, match="'pooler' does not fit squad2.* per window .*use span"):
        TrainConfig(task="squad2", adapter="pooler")


# -- the held-out slice ------------------------------------------------------------------------


def test_the_held_out_slice_holds_whole_articles(squad_dir):
    examples = squad.load_split("train", squad_dir)
    titles = squad.held_out_titles(examples, 0.1, seed=0)
    assert len(titles) == 3  # 10 % of 28 articles
    assert titles == squad.held_out_titles(examples, 0.1, seed=0)
    assert titles != squad.held_out_titles(examples, 0.1, seed=1)
    train, val = families.get_task("squad2").family.held_out(examples, 0.1, 0)
    assert {ex.title for ex in val} == set(titles)
    assert not {ex.title for ex in train} & set(titles)
    assert len(train) + len(val) == len(examples)


def test_a_held_out_article_far_above_the_fraction_is_warned_of(capsys):
    questions = [
        squad.Example(f"q{i}", title, "context", "question?", (), True)
        for i, title in enumerate(["A", "A", "B", "B", "C", "C"])
    ]
    with pytest.warns(
        UserWarning, match=r"holds out 1 of 3 articles: 2 of 6 train questions \(33%\)"
    ):
        squad.held_out_titles(questions, 0.1)
    with quiet_libraries():  # what the commands run under: other libraries' warnings hidden
        squad.held_out_titles(questions, 0.1)
    assert capsys.readouterr().err.startswith("warning: --val-fraction 0.1 holds out 1 of 3")


def test_a_single_article_cannot_be_split():
    example = squad.Example("q", "A", "context", "question?", (), True)
    with pytest.raises(ValueError, match="span 1 article"):
        squad.held_out_titles([example, example], 0.1)


# -- the run -----------------------------------------------------------------------------------


def test_a_fraction_of_an_epoch_writes_a_checkpoint_that_from_pretrained_loads(finished):
    from transformers import AutoModel, AutoModelForQuestionAnswering

    cfg, _ = finished
    assert AutoModelForQuestionAnswering.from_pretrained(cfg.out).config.hidden_size == 32
    assert AutoModel.from_pretrained(cfg.out).config.model_type == "bert"


def test_metrics_have_the_official_keys_and_held_out_articles_as_val(finished, small_squad):
    cfg, metrics = finished
    official = {"exact", "f1", "total", "HasAns_exact", "HasAns_f1", "HasAns_total"}
    assert official <= set(metrics["val"]) and official <= set(metrics["dev"])
    train = squad.load_split("train", small_squad)
    titles = squad.held_out_titles(train, 0.3, seed=0)
    assert titles in (["Normans"], ["Sky_(United_Kingdom)"])
    assert metrics["val"]["total"] == sum(ex.title in titles for ex in train)
    assert metrics["dev"]["total"] == len(squad.load_split("dev", small_squad))
    assert isinstance(metrics["no_answer_threshold"], float)
    assert json.loads((Path(cfg.out) / "metrics.json").read_text()) == metrics


def test_every_dev_question_has_a_prediction_the_official_evaluation_scores(finished, small_squad):
    cfg, metrics = finished
    dev_file = str(Path(small_squad) / "dev-v2.0.json")
    predictions = str(Path(cfg.out) / "dev_predictions.json")
    assert squad.evaluate_files(dev_file, predictions) == metrics["dev"]


def test_per_window_logits_are_stored_for_ensembles(finished, small_squad, tiny_model):
    from bertvision.encoder import load_tokenizer

    cfg, _ = finished
    table = pq.read_table(Path(cfg.out) / "outputs" / "dev.parquet")
    dev = squad.load_split("dev", small_squad)
    features = squad.build_features(dev, load_tokenizer(tiny_model), 128, 32)
    assert table.column("question_id").to_pylist() == features.question_ids
    assert table.column("window_index").to_pylist() == features.window_index.tolist()
    lengths = features.attention_mask.sum(axis=1).tolist()
    assert [len(x) for x in table.column("start_logits").to_pylist()] == lengths
    assert [len(x) for x in table.column("end_logits").to_pylist()] == lengths


def test_a_rerun_returns_the_stored_run(finished):
    cfg, metrics = finished
    assert finetune_encoder(cfg, progress=False) == metrics


def test_a_question_answering_checkpoint_loads_to_the_same_encoder_every_time(finished):
    """It holds no pooler weights: those are initialised, the same way on every load, so a
    rerun of the extraction finds its own key."""
    from bertvision import encoder as enc

    cfg, _ = finished
    fingerprints = set()
    for _ in range(2):
        enc._load_encoder.cache_clear()  # as a new process would load it
        fingerprints.add(enc.load_encoder(cfg.out, "cpu").fingerprint)
    assert len(fingerprints) == 1


def test_max_train_examples_caps_the_questions(small_squad, tiny_model, tmp_path):
    cfg = _config(small_squad, tiny_model, tmp_path / "ckpt", max_train_examples=40)
    # The first 40 questions: Normans' 31 (of its first 5 paragraphs) and 9 of Sky's.
    metrics = finetune_encoder(cfg, progress=False)
    assert metrics["val"]["total"] in (31, 9)


def test_a_squad_1_1_file_is_one_error_line_and_nothing_written(small_squad, tiny_model, tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    document = json.loads((Path(small_squad) / "train-v2.0.json").read_text())
    for article in document["data"]:
        for paragraph in article["paragraphs"]:
            for qa in paragraph["qas"]:
                del qa["is_impossible"]
    (data / "train-v2.0.json").write_text(json.dumps(document))
    (data / "dev-v2.0.json").write_bytes((Path(small_squad) / "dev-v2.0.json").read_bytes())
    out = tmp_path / "ckpt"
    args = ["finetune", "--task", "squad2", "--data-dir", str(data), "--model", tiny_model]
    result = CliRunner().invoke(app, [*args, "--out", str(out), "--device", "cpu"])
    assert result.exit_code == 2
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: malformed data file")
    assert "train-v2.0.json" in lines[0] and "SQuAD 1.1, not SQuAD 2.0" in lines[0]
    assert not out.exists()


@pytest.mark.slow
def test_minilm_on_a_fraction_of_an_epoch_prints_em_and_f1(squad_dir, minilm, tmp_path):
    """MiniLM on 2 articles' first 3 paragraphs (55 questions) for one epoch of 128-token
    windows, scored on 2 paragraphs of a dev article; EM/F1 printed (run with -s). The
    figures of longer runs: benchmarks/bench_squad_finetune.py."""
    data = squad.write_slice(
        squad_dir, str(tmp_path / "data"), train=(TRAIN_ARTICLES, 3), dev=(DEV_ARTICLES, 2)
    )
    cfg = _config(data, minilm, tmp_path / "ckpt", epochs=1.0, batch_size=16)
    metrics = finetune_encoder(cfg, progress=False)
    print(
        f"\nMiniLM SQuAD 2.0: {metrics['train']['examples']} windows in "
        f"{metrics['train']['seconds']} s ({metrics['train']['examples_per_second']} windows/s); "
        f"dev EM {metrics['dev']['exact']:.1f} F1 {metrics['dev']['f1']:.1f} "
        f"of {metrics['dev']['total']} questions"
    )
    assert metrics["dev"]["total"] == len(squad.load_split("dev", data))


def test_a_run_whose_window_logits_are_gone_is_fine_tuned_again(finished, tmp_path):
    """outputs/dev.parquet (what ensembles read) is among the committed files: with it gone
    the SQuAD run is not finished and is fine-tuned again, whole."""
    cfg, metrics = finished
    copy = replace(cfg, out=str(tmp_path / "ckpt"))
    shutil.copytree(cfg.out, copy.out)
    (tmp_path / "ckpt" / "outputs" / "dev.parquet").unlink()
    with pytest.warns(UserWarning, match=r"lacks 1 of its files \(outputs/dev.parquet\)"):
        again = finetune_encoder(copy, progress=False)
    assert again["dev"] == metrics["dev"] and again["val"] == metrics["val"]
    assert (tmp_path / "ckpt" / "outputs" / "dev.parquet").exists()


@pytest.mark.parametrize(
    ("split", "answer", "message"),
    [
        ("train", "\u200b", r"malformed data file {file}: .*\(id q-odd\) answers\[0\]: "
                            r"the answer text '\\u200b' is blank"),
        # not blank, but BERT's tokenizers drop it: refused as the dev windows are built, which
        # is after training (the progress bars before the error line); nothing is written
        ("dev", "\ufffd", r"data file {file}: question q-odd: its context tokenizes to nothing"),
    ],
)  # fmt: skip
def test_an_answer_in_a_context_of_no_token_is_one_error_line_naming_file_and_question(
    small_squad, tiny_model, tmp_path, split, answer, message
):
    from test_squad_extract import write_odd_answer

    data = write_odd_answer(tmp_path / "data", answer, splits=(split,))
    other = "dev" if split == "train" else "train"
    shutil.copy(Path(small_squad) / squad.SPLIT_FILES[other], Path(data))
    out = tmp_path / "ckpt"
    args = ["finetune", "--task", "squad2", "--data-dir", data, "--model", tiny_model]
    args += ["--out", str(out), "--device", "cpu", "--epochs", "0.1", "--val-fraction", "0.5"]
    result = CliRunner().invoke(app, [*args, "--max-seq-length", "128", "--doc-stride", "32"])
    assert result.exit_code == 2, result.output
    errors = [line for line in result.output.splitlines() if line.startswith("error: ")]
    file = re.escape(f"{data}/{squad.SPLIT_FILES[split]}")
    assert len(errors) == 1 and re.match(f"error: {message.format(file=file)}", errors[0]), errors
    assert result.output.strip().endswith(errors[0])
    assert not out.exists()

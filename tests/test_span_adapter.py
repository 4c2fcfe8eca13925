"""The span adapter on SQuAD 2.0 windows: per-token start/end logits with the padding masked,
trained on stored windows with the held-out articles of TRAIN for selection and the no-answer
threshold, official metrics and predictions, per-window logits for ensembles, resumable."""

from __future__ import annotations

import json
import re
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from test_adapters import among_padded_batch_mates
from typer.testing import CliRunner

from bertvision import adapters, runs, span_train, squad
from bertvision import encoder as enc
from bertvision import train as training
from bertvision.batch import TokenBatch
from bertvision.cli import app
from bertvision.config import ConfigError, ExtractConfig, SweepConfig, TrainConfig
from bertvision.extract import extract_hidden_states
from bertvision.shards import ShardError
from bertvision.train import train_adapter

TRAIN_ARTICLES, DEV_ARTICLES = ("Normans", "Sky_(United_Kingdom)"), ("Rhine",)
WINDOWING = dict(max_seq_length=128, doc_stride=32, max_question_length=32)


def _squad_folder(squad_dir: str, folder: Path, train: int, dev: int) -> str:
    """The first `train` (`dev`) paragraphs of the train (dev) articles of the tests."""
    return squad.write_slice(
        squad_dir, str(folder), train=(TRAIN_ARTICLES, train), dev=(DEV_ARTICLES, dev)
    )


def _extract(model: str, data_dir: str, out: Path, **changes) -> str:
    cfg = ExtractConfig(
        task="squad2",
        model=model,
        data_dir=data_dir,
        out=str(out),
        splits=["train", "dev"],
        batch_size=16,
        device="cpu",
        **(WINDOWING | changes),
    )
    assert extract_hidden_states(cfg, progress=False).ok
    return str(out)


def _config(embeddings: str, out: Path, **changes) -> TrainConfig:
    settings = dict(
        task="squad2",
        adapter="span",
        embeddings=embeddings,
        out=str(out),
        adapter_dim=16,
        epochs=4,
        patience=0,
        batch_size=16,
        lr=3e-3,
        val_fraction=0.5,  # one of the two train articles
        device="cpu",
    )
    return TrainConfig(**(settings | changes))


@pytest.fixture(scope="module")
def small_squad(squad_dir, tmp_path_factory) -> str:
    """2 articles of the split's train (4 paragraphs each), 1 of its dev (2 paragraphs)."""
    return _squad_folder(squad_dir, tmp_path_factory.mktemp("squad") / "data", 4, 2)


@pytest.fixture(scope="module")
def embeddings(small_squad, tiny_model, tmp_path_factory) -> str:
    return _extract(tiny_model, small_squad, tmp_path_factory.mktemp("emb"))


@pytest.fixture(scope="module")
def finished(embeddings, tmp_path_factory) -> tuple[TrainConfig, dict]:
    cfg = _config(embeddings, tmp_path_factory.mktemp("runs") / "span")
    return cfg, train_adapter(cfg, progress=False)


# -- the adapter -------------------------------------------------------------------------------

SHAPE = {"layers": 3, "hidden_size": 8}


def _span_adapter(**options) -> torch.nn.Module:
    torch.manual_seed(0)
    config = adapters.make_config("span", **SHAPE, adapter_dim=4, **options)
    return adapters.build_adapter(config).eval()


def test_the_span_adapter_gives_a_start_and_an_end_logit_per_token_and_minus_inf_at_padding():
    model = _span_adapter()
    mask = torch.tensor([[True] * 7, [True] * 4 + [False] * 3])
    start, end = model(TokenBatch.from_padded(torch.randn(2, 3, 7, 8), mask))
    assert start.shape == end.shape == (2, 7)
    assert torch.isfinite(start[mask]).all() and torch.isfinite(end[mask]).all()
    assert (start[~mask] == -torch.inf).all() and (end[~mask] == -torch.inf).all()


def test_padding_never_changes_the_logits_of_real_tokens():
    model = _span_adapter()
    torch.manual_seed(1)
    window = torch.randn(3, 4, 8)  # (L, T, H): 4 real tokens
    alone = model(TokenBatch.from_padded(window[None], torch.ones(1, 4, dtype=torch.bool)))
    batch, mask = among_padded_batch_mates(window)
    in_batch = model(TokenBatch.from_padded(batch, mask))
    for got, expected in zip(in_batch, alone, strict=True):
        torch.testing.assert_close(got[0, :4], expected[0], rtol=1e-5, atol=1e-5)
        assert torch.isfinite(got[mask]).all()


def test_the_span_adapter_is_saved_and_loaded_as_itself():
    model = _span_adapter()
    save_url = "memory://span-adapter/adapter"
    adapters.save_adapter(model, save_url)
    loaded = adapters.load_adapter(save_url)
    assert type(loaded) is adapters.SpanAdapter and loaded.config == model.config
    hidden, mask = torch.randn(2, 3, 5, 8), torch.ones(2, 5, dtype=torch.bool)
    for a, b in zip(
        loaded(TokenBatch.from_padded(hidden, mask)),
        model(TokenBatch.from_padded(hidden, mask)),
        strict=True,
    ):
        torch.testing.assert_close(a, b)


def test_the_span_adapter_shares_the_pooler_s_body_and_the_pooler_keeps_its_weight_names():
    span = _span_adapter()
    pooler = adapters.build_adapter(adapters.make_config("pooler", **SHAPE, num_labels=2))
    body = {"down.weight", "down.bias", "up.weight", "up.bias", "layer_logits"}
    assert set(pooler.state_dict()) == body | {"head.weight", "head.bias"}
    assert set(span.state_dict()) == body | {"head.weight", "head.bias"}
    assert span.head.out_features == 2


def test_a_span_config_has_two_outputs_only():
    with pytest.raises(ValueError, match="num_labels must be 2"):
        adapters.make_config("span", **SHAPE, num_labels=3)


# -- configuration -----------------------------------------------------------------------------


def test_squad2_trains_the_span_adapter_and_refuses_the_others():
    assert TrainConfig(task="squad2", adapter="span").adapter_config(7, 384).num_labels == 2
    for name in ("pooler", "scalarmix", "cls"):
        with pytest.raises(ConfigError, match=f"'{name}' does not fit squad2.*use span") as caught:
            TrainConfig(task="squad2", adapter=name)
        assert caught.value.field == "adapter"


def test_a_glue_task_refuses_the_span_adapter_in_training_and_sweeps():
    with pytest.raises(ConfigError, match="'span' does not fit rte.*use cls or pooler or scalar"):
        TrainConfig(task="rte", adapter="span")
    with pytest.raises(ConfigError, match="'span' does not fit rte"):
        SweepConfig(task="rte", adapter="span")


def test_a_glue_adapter_on_span_shards_is_one_error_line_and_nothing_written(embeddings, tmp_path):
    out = tmp_path / "run"
    args = ["train", "--task", "squad2", "--adapter", "pooler", "--embeddings", embeddings]
    result = CliRunner().invoke(app, [*args, "--out", str(out)])
    assert result.exit_code == 2
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: --adapter 'pooler' does not fit")
    assert not out.exists()


# -- training ----------------------------------------------------------------------------------


def test_metrics_have_the_official_keys_and_the_threshold_chosen_on_val(finished, small_squad):
    _, metrics = finished
    assert set(metrics) == {"val", "dev", "no_answer_threshold"}
    for name in ("val", "dev"):
        assert list(metrics[name])[:3] == ["exact", "f1", "total"]
        assert {"HasAns_exact", "NoAns_f1"} <= set(metrics[name])
    assert metrics["dev"]["total"] == len(squad.load_split("dev", small_squad))
    assert isinstance(metrics["no_answer_threshold"], float)


def test_every_dev_question_has_a_prediction_the_official_evaluation_scores(finished, small_squad):
    cfg, metrics = finished
    scored = squad.evaluate_files(
        str(Path(small_squad) / "dev-v2.0.json"), str(Path(cfg.out) / "dev_predictions.json")
    )
    assert scored == metrics["dev"]


def test_the_held_out_questions_are_whole_articles_of_train(finished, small_squad):
    cfg, metrics = finished
    questions = squad.load_split("train", small_squad)
    held = squad.held_out_titles(questions, cfg.val_fraction, cfg.val_seed)
    assert len(held) == 1
    val = json.loads((Path(cfg.out) / "val_predictions.json").read_text())
    assert set(val) == {q.question_id for q in questions if q.title in held}
    assert metrics["val"]["total"] == len(val)
    curve = json.loads((Path(cfg.out) / "curve.json").read_text())
    windows = span_train.load_span_data("squad2", cfg.embeddings, "cpu").splits["train"]
    titles = np.asarray([questions[i].title for i in windows.windows.example_index])
    assert curve["val_windows"] == int(np.isin(titles, held).sum())
    assert curve["train_windows"] == int((~np.isin(titles, held)).sum()) > 0


def test_per_window_logits_give_back_the_threshold_and_the_dev_predictions(
    finished, small_squad, tiny_model
):
    """outputs/<split>.parquet hold every window's logits over its real tokens, in the
    fine-tuned model's format: post-processing them again gives the stored threshold (chosen
    on val) and the stored dev predictions."""
    cfg, metrics = finished
    tokenizer = enc.load_tokenizer(tiny_model)
    questions = squad.load_split("train", small_squad)
    held = squad.held_out_titles(questions, cfg.val_fraction, cfg.val_seed)
    splits = {
        "val": [q for q in questions if q.title in held],
        "dev": squad.load_split("dev", small_squad),
    }
    spans = {}
    for name, examples in splits.items():
        features = squad.build_features(
            examples,
            tokenizer,
            WINDOWING["max_seq_length"],
            WINDOWING["doc_stride"],
            WINDOWING["max_question_length"],
        )
        table = pq.read_table(Path(cfg.out) / "outputs" / f"{name}.parquet")
        assert table.column_names == ["question_id", "window_index", "start_logits", "end_logits"]
        assert table.column("question_id").to_pylist() == features.question_ids
        assert table.column("window_index").to_pylist() == features.window_index.tolist()
        logits = {}
        for column in ("start_logits", "end_logits"):
            padded = np.full(features.input_ids.shape, -np.inf)
            for w, row in enumerate(table.column(column).to_pylist()):
                assert len(row) == features.attention_mask[w].sum()
                padded[w, : len(row)] = row
            logits[column] = padded
        spans[name] = squad.best_spans(
            examples, features, logits["start_logits"], logits["end_logits"]
        )
    threshold, val_f1 = squad.best_threshold(spans["val"], splits["val"])
    assert threshold == pytest.approx(metrics["no_answer_threshold"], abs=1e-5)
    assert val_f1 == pytest.approx(metrics["val"]["f1"])
    stored = json.loads((Path(cfg.out) / "dev_predictions.json").read_text())
    assert squad.predictions(spans["dev"], metrics["no_answer_threshold"]) == stored


def test_a_rerun_returns_the_stored_run(finished):
    cfg, metrics = finished
    record = runs.commit_record(cfg.out)
    assert train_adapter(cfg, progress=False) == metrics
    assert runs.commit_record(cfg.out) == record
    assert training.content_key(cfg) == record["key"]  # the Prefect task's cache key
    assert record["kind"] == "train" and set(record["inputs"]) == {
        "embeddings/train",
        "embeddings/dev",
    }


def test_an_interrupted_run_resumes_to_the_uninterrupted_result(
    finished, embeddings, tmp_path, monkeypatch
):
    cfg, metrics = finished
    real_epoch = training._train_epoch
    epochs = []

    def interrupted(*args):
        if len(epochs) == 2:
            raise KeyboardInterrupt
        epochs.append(args[-1])
        return real_epoch(*args)

    monkeypatch.setattr(training, "_train_epoch", interrupted)
    cut = _config(embeddings, tmp_path / "cut")
    with pytest.raises(KeyboardInterrupt):
        train_adapter(cut, progress=False)
    assert (tmp_path / "cut" / "_checkpoint" / "last.pt").exists()
    assert runs.commit_record(cut.out) is None
    monkeypatch.setattr(training, "_train_epoch", real_epoch)

    assert train_adapter(cut, progress=False) == metrics
    whole = adapters.load_adapter(str(Path(cfg.out) / "adapter")).state_dict()
    resumed = adapters.load_adapter(str(tmp_path / "cut" / "adapter")).state_dict()
    for name, value in whole.items():
        torch.testing.assert_close(resumed[name], value, rtol=0, atol=0)


def test_a_streamed_run_equals_a_resident_one(finished, embeddings, tmp_path):
    _, metrics = finished
    streamed = _config(embeddings, tmp_path / "streamed", max_resident_gb=0, shuffle_shards=100)
    got = train_adapter(streamed, progress=False)
    assert got["dev"] == pytest.approx(metrics["dev"], abs=1e-4)


@pytest.mark.slow
def test_minilm_fine_tuned_briefly_then_its_span_adapter_prints_em_and_f1(
    squad_dir, minilm, tmp_path
):
    """MiniLM fine-tuned for half an epoch on 2 articles' first 3 paragraphs (128-token
    windows), its windows extracted, a span adapter trained on them; EM/F1 on 2 paragraphs of
    a dev article printed (run with -s). Figures of the adapter's speed:
    benchmarks/bench_span_adapter.py."""
    from bertvision.config import FinetuneConfig
    from bertvision.finetune import finetune_encoder

    data = _squad_folder(squad_dir, tmp_path / "data", 3, 2)
    finetune = FinetuneConfig(
        task="squad2",
        data_dir=data,
        model=minilm,
        out=str(tmp_path / "ckpt"),
        epochs=0.5,
        batch_size=16,
        val_fraction=0.5,
        device="cpu",
        **WINDOWING,
    )
    tuned = finetune_encoder(finetune, progress=False)
    embeddings = _extract(finetune.out, data, tmp_path / "emb")
    cfg = _config(embeddings, tmp_path / "span", adapter_dim=32, epochs=10, batch_size=32)
    metrics = train_adapter(cfg, progress=False)
    curve = json.loads((tmp_path / "span" / "curve.json").read_text())
    print(
        f"\nMiniLM SQuAD 2.0 ({tuned['train']['examples']} windows fine-tuned): fine-tuned dev "
        f"EM {tuned['dev']['exact']:.1f} F1 {tuned['dev']['f1']:.1f}; span adapter "
        f"({curve['train_windows']} windows x {curve['epochs_run']} epochs, "
        f"{curve['train_windows_per_second']} windows/s) dev EM {metrics['dev']['exact']:.1f} "
        f"F1 {metrics['dev']['f1']:.1f} of {metrics['dev']['total']} questions"
    )
    assert metrics["dev"]["total"] == len(squad.load_split("dev", data))


def test_a_train_fraction_keeps_each_question_s_windows_together(embeddings, tmp_path):
    from bertvision.span_train import SpanObjective, load_span_data

    data = load_span_data("squad2", embeddings, "cpu", 8.0)
    windows = data.splits["train"].windows
    half = SpanObjective(_config(embeddings, tmp_path / "half", train_fraction=0.5), data)
    whole = SpanObjective(_config(embeddings, tmp_path / "whole"), data)
    trained = np.unique(windows.example_index[half.is_trained])
    candidates = np.unique(windows.example_index[~whole.is_val])
    assert len(trained) == round(0.5 * len(candidates))
    assert set(trained) <= set(candidates)
    # every window of a chosen question is trained on, none of the others'
    assert (half.is_trained == np.isin(windows.example_index, trained)).all()


# -- the stored run and the data it was extracted from ------------------------------------------


def _train_args(cfg: TrainConfig) -> list[str]:
    return [
        "train", "--task", "squad2", "--adapter", "span", "--embeddings", cfg.embeddings,
        "--out", cfg.out, "--adapter-dim", str(cfg.adapter_dim), "--epochs", str(cfg.epochs),
        "--patience", str(cfg.patience), "--batch-size", str(cfg.batch_size),
        "--lr", str(cfg.lr), "--val-fraction", str(cfg.val_fraction), "--device", "cpu",
    ]  # fmt: skip


def test_a_run_whose_adapter_is_gone_is_trained_again_not_returned_as_stored(finished, tmp_path):
    """`rm -r RUN/adapter; bertvision train ...`: the commit record lists the adapter's files,
    so the run is not finished; it is trained again (a warning says why) and committed whole."""
    cfg, metrics = finished
    run = tmp_path / "run"
    shutil.copytree(cfg.out, run)
    shutil.rmtree(run / "adapter")
    copy = replace(cfg, out=str(run))

    result = CliRunner().invoke(app, _train_args(copy))
    assert result.exit_code == 0, result.output
    assert "warning: " in result.output and "lacks 2 of its files (adapter/" in result.output
    assert "returned as stored" not in result.output
    assert json.loads((run / "metrics.json").read_text()) == metrics
    assert runs.stored_record(str(run)) is not None

    again = CliRunner().invoke(app, _train_args(copy))  # now finished: returned as stored
    assert again.exit_code == 0 and "returned as stored" in again.output


def _make_unanswerable(data_dir: str, split: str) -> None:
    """Rewrite the split's file with the same questions (ids, texts), none answerable."""
    path = Path(data_dir) / squad.SPLIT_FILES[split]
    document = json.loads(path.read_text())
    for article in document["data"]:
        for paragraph in article["paragraphs"]:
            for qa in paragraph["qas"]:
                qa.update(is_impossible=True, answers=[])
    path.write_text(json.dumps(document))


def test_span_data_changed_since_extraction_is_refused_naming_the_file(
    squad_dir, tiny_model, tmp_path
):
    """Span runs are keyed on the extraction; the questions and answers they read again must
    be those it read. Changed since (same ids, no answers left), training into the finished
    run's folder or a new one, and a span ensemble, refuse in one line naming the file."""
    from bertvision.span_ensemble import span_ensemble
    from bertvision.span_train import load_span_data

    data = _squad_folder(squad_dir, tmp_path / "data", 2, 1)
    embeddings = _extract(tiny_model, data, tmp_path / "emb")
    record = json.loads((tmp_path / "emb/squad2/dev/_manifest/run.json").read_text())
    dev = squad.load_split("dev", data)
    assert record["inputs"]["questions/dev"] == {"url": data, "key": squad.data_fingerprint(dev)}
    cfg = _config(embeddings, tmp_path / "run1", epochs=1)
    train_adapter(cfg, progress=False)
    original = (Path(data) / "dev-v2.0.json").read_bytes()

    _make_unanswerable(data, "dev")
    changed = rf"{data}/dev-v2.0.json changed since the extraction in {embeddings}/squad2/dev"
    for out in ("run1", "run2"):
        result = CliRunner().invoke(app, _train_args(replace(cfg, out=str(tmp_path / out))))
        assert result.exit_code == 2, result.output
        assert result.output.count("\n") == 1 and re.match(f"error: {changed}", result.output)
    assert not (tmp_path / "run2").exists()
    with pytest.raises(ShardError, match=changed):
        span_ensemble("squad2", [cfg.out], embeddings, 0.5, 0, str(tmp_path / "ens"))

    # An extraction recorded before the questions' fingerprint was: its windows rebuilt from the
    # data read now tell the same.
    url = tmp_path / "emb/squad2/dev/_manifest/run.json"
    del record["inputs"]["questions/dev"]
    url.write_text(json.dumps(record))
    with pytest.raises(ShardError, match=changed):
        load_span_data("squad2", embeddings, "cpu")
    (Path(data) / "dev-v2.0.json").write_bytes(original)
    restored = load_span_data("squad2", embeddings, "cpu")
    assert [q.question_id for q in restored.questions["dev"]] == [q.question_id for q in dev]


# -- a fine-tuned encoder's windows: never selected on an article it trained on ---------------


@pytest.fixture(scope="module")
def finetuned(small_squad, tiny_model, tmp_path_factory) -> tuple[str, str]:
    """The tiny BERT fine-tuned on both train articles holding out one (val_fraction 0.5,
    val_seed 0: "Normans"), and its train and dev windows: (checkpoint, embeddings)."""
    from bertvision.config import FinetuneConfig
    from bertvision.finetune import finetune_encoder

    root = tmp_path_factory.mktemp("finetuned")
    cfg = FinetuneConfig(
        task="squad2", data_dir=small_squad, model=tiny_model, out=str(root / "ckpt"),
        epochs=0.5, batch_size=8, val_fraction=0.5, val_seed=0, device="cpu", **WINDOWING,
    )  # fmt: skip
    finetune_encoder(cfg, progress=False)
    return cfg.out, _extract(cfg.out, small_squad, root / "emb")


def test_the_articles_the_seeds_hold_out(small_squad):
    """val_seed 0 holds out the first article, 3 the second: the tests below rely on it."""
    questions = squad.load_split("train", small_squad)
    assert squad.held_out_titles(questions, 0.5, 0) == ["Normans"]
    assert squad.held_out_titles(questions, 0.5, 3) == ["Sky_(United_Kingdom)"]


def test_span_training_holding_out_an_article_its_encoder_trained_on_is_refused(
    finetuned, tmp_path
):
    _, embeddings = finetuned
    cfg = _config(embeddings, tmp_path / "run", val_seed=3)
    with pytest.raises(
        ShardError,
        match=rf"{embeddings}/squad2/train: its held-out slice \(--val-fraction 0.5 --val-seed 3"
        r" of the \d+ train questions extracted\) holds 1 article, 1 of which its encoder was "
        r"fine-tuned on \('Sky_\(United_Kingdom\)'\): .* Select with --val-fraction 0.5 "
        r"--val-seed 0, as the fine-tuning did$",
    ):
        train_adapter(cfg, progress=False)
    assert not (tmp_path / "run").exists()


def test_span_training_with_the_fine_tunings_settings_selects_on_the_article_it_held_out(
    finetuned, small_squad, tmp_path
):
    _, embeddings = finetuned
    metrics = train_adapter(_config(embeddings, tmp_path / "run", epochs=1), progress=False)
    val = json.loads((tmp_path / "run" / "val_predictions.json").read_text())
    questions = squad.load_split("train", small_squad)
    assert set(val) == {q.question_id for q in questions if q.title == "Normans"}
    assert metrics["val"]["total"] == len(val)


def test_windows_of_fewer_questions_holding_out_the_same_article_are_accepted(
    finetuned, small_squad, tmp_path
):
    """The check is by article: the first Normans questions and some of Sky's hold out
    Normans, as the fine-tuning on all of them did."""
    checkpoint, _ = finetuned
    questions = squad.load_split("train", small_squad)
    fewer = sum(q.title == "Normans" for q in questions) + 3
    embeddings = _extract(checkpoint, small_squad, tmp_path / "emb", max_train_examples=fewer)
    metrics = train_adapter(_config(embeddings, tmp_path / "run", epochs=1), progress=False)
    assert metrics["val"]["total"] == fewer - 3


def test_a_span_sweep_holding_out_an_article_its_encoder_trained_on_is_refused(finetuned, tmp_path):
    from bertvision.sweep import run_sweep

    _, embeddings = finetuned
    out = tmp_path / "sweep"
    cfg = SweepConfig(
        task="squad2", adapter="span", embeddings=embeddings, out=str(out), trials=1,
        space={"epochs": 1}, val_fraction=0.5, val_seed=3, device="cpu",
    )  # fmt: skip
    with pytest.raises(ShardError, match=r"fine-tuned on \('Sky_\(United_Kingdom\)'\)"):
        run_sweep(cfg, progress=False)
    assert not out.exists()

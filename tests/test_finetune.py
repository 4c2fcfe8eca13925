"""Partial fine-tuning: a fraction of an epoch, a checkpoint that extraction accepts."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch
from conftest import tokenizer_variant
from typer.testing import CliRunner

from bertvision import shards
from bertvision.cli import app
from bertvision.finetune import FinetuneConfig, load_metrics
from bertvision.glue import get_task, held_out_ids
from bertvision.metrics import compute_metrics
from bertvision.predictions import read_outputs, read_submission


def test_fraction_of_an_epoch_writes_a_checkpoint_that_extract_accepts(
    tmp_path, tiny_model, glue_dir
):
    """Must show 5: finetune --epochs 0.2 on RTE, then extract from its checkpoint."""
    checkpoint = tmp_path / "ckpt"
    result = CliRunner().invoke(
        app,
        [
            "finetune",
            "--task",
            "rte",
            "--data-dir",
            glue_dir,
            "--model",
            tiny_model,
            "--epochs",
            "0.2",
            "--batch-size",
            "32",
            "--out",
            str(checkpoint),
            "--device",
            "cpu",
        ],
    )
    assert result.exit_code == 0, result.output
    metrics = json.loads((checkpoint / "metrics.json").read_text())
    # 2490 - 249 held out = 2241 examples: ceil(2241 / 32) = 71 steps an epoch; 0.2 -> 14
    assert metrics["train"]["steps"] == 14
    assert 0.0 <= metrics["dev"]["accuracy"] <= 1.0 and 0.0 <= metrics["val"]["accuracy"] <= 1.0

    val_ids = read_outputs(str(checkpoint), "val")[0]
    assert list(val_ids) == list(held_out_ids(range(2490), 0.1, seed=0))

    ids, labels, outputs = read_outputs(str(checkpoint), "dev")
    assert list(ids) == list(range(277)) and outputs.shape == (277, 2)
    predicted = read_submission(str(checkpoint / "dev_predictions.tsv"), get_task("rte"))
    assert compute_metrics("rte", [predicted[i] for i in ids], labels) == metrics["dev"]
    assert len(read_submission(str(checkpoint / "test_predictions.tsv"), get_task("rte"))) == 3000

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
            str(checkpoint),
            "--max-seq-length",
            "64",
            "--out",
            str(tmp_path / "emb"),
            "--device",
            "cpu",
        ],
    )
    assert result.exit_code == 0, result.output
    plan, urls = shards.committed_shards(str(tmp_path / "emb"), "rte", "dev")
    assert plan.model == str(checkpoint) and plan.num_examples == 277


def test_regression_task_trains_with_mse_and_can_skip_test_predictions(
    tmp_path, tiny_model, glue_dir
):
    from bertvision.finetune import finetune_encoder

    cfg = FinetuneConfig(
        task="stsb",
        out=str(tmp_path),
        model=tiny_model,
        data_dir=glue_dir,
        epochs=0.05,
        device="cpu",
        max_train_examples=64,
        predict_test=False,
    )
    metrics = finetune_encoder(cfg, progress=False)
    assert set(metrics["dev"]) == {"pearson", "spearman"}
    assert read_outputs(str(tmp_path), "dev")[2].shape == (1500, 1)
    assert not (tmp_path / "test_predictions.tsv").exists()


@pytest.mark.parametrize("epochs", ["0", "-1"])
def test_epochs_must_be_positive(tmp_path, epochs):
    result = CliRunner().invoke(
        app, ["finetune", "--task", "rte", "--epochs", epochs, "--out", str(tmp_path / "x")]
    )
    assert result.exit_code == 2 and "--epochs must be > 0" in result.output
    assert not (tmp_path / "x").exists()


def test_a_left_padding_tokenizer_trains_and_predicts_as_the_original(
    tmp_path, tiny_model, glue_dir
):
    """Training batches and predictions never depend on how long the batch-mates are: a copy
    whose tokenizer pads on the left fine-tunes to the same predictions as the original."""
    from bertvision.finetune import finetune_encoder

    left = tokenizer_variant(tiny_model, tmp_path / "left", padding_side="left")
    outputs = {}
    for name, model in [("left", left), ("right", tiny_model)]:
        cfg = FinetuneConfig(
            task="wnli",
            out=str(tmp_path / name / "ckpt"),
            model=model,
            data_dir=glue_dir,
            epochs=1,
            batch_size=8,
            device="cpu",
            max_train_examples=48,
            predict_test=False,
        )
        finetune_encoder(cfg, progress=False)
        outputs[name] = read_outputs(cfg.out, "dev")[2]
    np.testing.assert_allclose(outputs["left"], outputs["right"], atol=1e-5)


def test_predictions_do_not_depend_on_the_batch_size(tmp_path, tiny_model, glue_dir):
    from transformers import AutoModelForSequenceClassification

    from bertvision.encoder import load_tokenizer
    from bertvision.finetune import _predict
    from bertvision.glue import load_split

    left = tokenizer_variant(tiny_model, tmp_path / "left", padding_side="left")
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(left, num_labels=2).eval()
    examples = load_split("wnli", "dev", glue_dir)[:20]
    outputs = [
        _predict(
            model,
            load_tokenizer(left),
            examples,
            FinetuneConfig(task="wnli", out="", model=left, batch_size=size, device="cpu"),
        )
        for size in (1, 4)
    ]
    np.testing.assert_allclose(outputs[1], outputs[0], atol=1e-5)


def quick(tmp_path, model, glue_dir, **settings) -> FinetuneConfig:
    """RTE, 64 training examples, one epoch (4 steps), no test predictions: seconds on a CPU."""
    base = dict(epochs=1.0, batch_size=16, max_train_examples=64, predict_test=False)
    return FinetuneConfig(
        task="rte", out=str(tmp_path / "ckpt"), model=model, data_dir=glue_dir, device="cpu",
        **{**base, **settings},
    )  # fmt: skip


def files(folder) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def test_a_finished_run_is_returned_other_settings_are_refused_and_a_kill_keeps_it(
    tmp_path, tiny_model, glue_dir, monkeypatch
):
    """finetune --seed 1 over a finished seed-0 run: refused without --overwrite; killed just
    after writing its weights, the seed-0 run is still there whole and still finished."""
    from bertvision import finetune as core
    from bertvision import predictions

    seed0 = quick(tmp_path, tiny_model, glue_dir)
    metrics = core.finetune_encoder(seed0, progress=False)
    stored = files(tmp_path / "ckpt")
    real_finetune = core._finetune
    monkeypatch.setattr(core, "_finetune", lambda *a: pytest.fail("trained again"))
    assert core.finetune_encoder(seed0, progress=False) == metrics  # resumes like train/extract

    seed1 = quick(tmp_path, tiny_model, glue_dir, seed=1)
    with pytest.raises(
        ValueError, match=r"fine-tuning with other settings \(seed 0 there, 1 here\)"
    ):
        core.finetune_encoder(seed1, progress=False)
    assert files(tmp_path / "ckpt") == stored

    def killed(*args, **kwargs):
        raise KeyboardInterrupt  # after model.safetensors went into the staged checkpoint

    monkeypatch.setattr(core, "_finetune", real_finetune)
    monkeypatch.setattr(predictions, "write_predictions", killed)
    overwrite1 = quick(tmp_path, tiny_model, glue_dir, seed=1, overwrite=True)
    with pytest.raises(KeyboardInterrupt):
        core.finetune_encoder(overwrite1, progress=False)
    assert files(tmp_path / "ckpt") == stored
    monkeypatch.undo()
    monkeypatch.setattr(core, "_finetune", lambda *a: pytest.fail("trained again"))
    assert core.finetune_encoder(seed0, progress=False) == metrics  # still the finished run

    monkeypatch.setattr(core, "_finetune", real_finetune)
    replaced = core.finetune_encoder(overwrite1, progress=False)
    assert replaced["config"]["seed"] == 1 and load_metrics(str(tmp_path / "ckpt")) == replaced
    after = files(tmp_path / "ckpt")
    assert after["model.safetensors"] != stored["model.safetensors"]
    assert set(after) == set(stored)  # the same files, all of the new run


def test_a_model_replaced_at_the_same_path_is_another_input(tmp_path, tiny_model, glue_dir):
    """Identity by content: the finished run was made from other weights than the folder holds
    now, so it is not returned as done (refused; --overwrite redoes it)."""
    import shutil

    from transformers import BertConfig, BertModel

    from bertvision.finetune import content_key, finetune_encoder

    encoder = tmp_path / "encoder"
    shutil.copytree(tiny_model, encoder)
    cfg = quick(tmp_path, str(encoder), glue_dir)
    finetune_encoder(cfg, progress=False)
    key = content_key(cfg)

    torch.manual_seed(1)
    other = BertConfig.from_pretrained(encoder)
    BertModel(other).save_pretrained(encoder)  # another encoder, same path
    assert content_key(cfg) != key
    with pytest.raises(ValueError, match="fine-tuning of the same settings on other inputs"):
        finetune_encoder(cfg, progress=False)
    redone = finetune_encoder(dataclasses.replace(cfg, overwrite=True), progress=False)
    assert redone["key"] == content_key(cfg)


@pytest.mark.parametrize("verbose", [False, True])
def test_the_weight_loading_report_is_shown_only_with_verbose(
    tmp_path, tiny_model, glue_dir, verbose
):
    """transformers reports the new classifier's weights as MISSING on every fine-tuning; the
    command keeps that (and the libraries' warnings) out of the way unless `--verbose`."""
    import logging

    seen: list[str] = []
    handler = logging.Handler(level=0)
    handler.emit = lambda record: seen.append(record.getMessage())
    logging.getLogger("transformers").addHandler(handler)
    args = ["finetune", "--task", "wnli", "--data-dir", glue_dir, "--model", tiny_model]
    args += ["--epochs", "0.05", "--max-train-examples", "40", "--max-seq-length", "32"]
    args += ["--no-predict-test", "--device", "cpu", "--out", str(tmp_path / "ckpt")]
    try:
        result = CliRunner().invoke(app, ["--verbose", *args] if verbose else args)
    finally:
        logging.getLogger("transformers").removeHandler(handler)
    assert result.exit_code == 0, result.output
    assert any("LOAD REPORT" in message for message in seen) == verbose


def test_a_run_whose_checkpoint_is_gone_is_fine_tuned_again_not_returned_as_stored(
    tmp_path, tiny_model, glue_dir
):
    """model.safetensors is among the files the commit record lists: with it gone the run is
    not finished; fine-tuning warns, runs again and commits the same run whole."""
    from bertvision import finetune as core
    from bertvision import runs

    cfg = quick(tmp_path, tiny_model, glue_dir)
    metrics = core.finetune_encoder(cfg, progress=False)
    stored = files(tmp_path / "ckpt")
    (tmp_path / "ckpt" / "model.safetensors").unlink()
    with pytest.warns(UserWarning, match=r"fine-tuning committed there lacks 1 of its files"):
        again = core.finetune_encoder(cfg, progress=False)
    assert {k: v for k, v in again.items() if k != "train"} == {
        k: v for k, v in metrics.items() if k != "train"
    }
    assert set(files(tmp_path / "ckpt")) == set(stored)
    assert runs.stored_record(cfg.out) is not None


# ----------------------------------------------------------------------------------------------
# What the checkpoint was fine-tuned on, recorded by content


def finetuned_on_rte(out, model: str, glue_dir: str, task: str = "rte") -> str:
    """`model` fine-tuned briefly on the first 40 train examples of `task` (RTE by default),
    holding out val_fraction 0.1 with val_seed 0 (4 examples): its checkpoint folder `out`."""
    from bertvision.finetune import finetune_encoder

    cfg = FinetuneConfig(
        task=task, out=str(out), model=model, data_dir=glue_dir, epochs=1.0, batch_size=8,
        max_train_examples=40, max_seq_length=64, predict_test=False, device="cpu",
    )  # fmt: skip
    finetune_encoder(cfg, progress=False)
    return cfg.out


def test_the_run_record_describes_the_encoder_it_made_and_what_it_trained_on(
    tmp_path, tiny_model, glue_dir
):
    """The fingerprint is the one extraction computes when it loads the checkpoint; the data
    fingerprint is that of the train examples read, the first 40."""
    from bertvision import glue, records
    from bertvision.encoder import load_encoder
    from bertvision.finetune import content_key

    checkpoint = finetuned_on_rte(tmp_path / "ckpt", tiny_model, glue_dir)
    record = records.read_record(f"{checkpoint}/_commit.json")
    read = glue.load_split("rte", "train", glue_dir)[:40]
    assert record.finetuned_encoder == {
        "fingerprint": load_encoder(checkpoint, "cpu").fingerprint,
        "run_key": record.key,
        "task": "rte",
        "max_train_examples": 40,
        "train_examples": 40,
        "val_fraction": 0.1,
        "val_seed": 0,
        "data_fingerprint": glue.data_fingerprint(read),
    }
    assert record.key == content_key(FinetuneConfig(**record.settings))
    assert record.inputs["data/train"]["key"] == glue.data_fingerprint(read)


def test_prediction_after_training_shows_a_progress_bar_per_split(
    tmp_path, tiny_model, glue_dir, capsys
):
    """Predicting dev and test after the last step took minutes with nothing on screen."""
    from bertvision.finetune import finetune_encoder

    cfg = FinetuneConfig(
        task="rte", out=str(tmp_path / "ckpt"), model=tiny_model, data_dir=glue_dir, epochs=0.1,
        batch_size=8, max_train_examples=40, max_seq_length=64, device="cpu",
    )  # fmt: skip
    finetune_encoder(cfg, progress=True)
    shown = capsys.readouterr().err
    assert all(f"predict rte {split}" in shown for split in ("val", "dev", "test"))
    finetune_encoder(dataclasses.replace(cfg, out=str(tmp_path / "quiet")), progress=False)
    assert "predict rte" not in capsys.readouterr().err

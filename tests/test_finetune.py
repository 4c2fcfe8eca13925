"""Partial fine-tuning: a fraction of an epoch, a checkpoint that extraction accepts."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from bertvision import shards
from bertvision.cli import app
from bertvision.finetune import FinetuneConfig
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

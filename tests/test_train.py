"""Training adapters on stored embeddings: outputs, exact metrics, selection on TRAIN only,
padding invariance, resume, shared and streamed embeddings, bad input."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import random
import shutil
import signal
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from conftest import outside_handler_fails, tree_state
from test_embeddings import HIDDEN, LAYERS, synthetic, write_split
from typer.testing import CliRunner

from bertvision import adapters, glue, runs, storage
from bertvision import train as training
from bertvision.cli import app
from bertvision.embeddings import load_embeddings
from bertvision.metrics import compute_metrics
from bertvision.predictions import read_submission
from bertvision.schema import ShardRecord, shard_record_name
from bertvision.shards import ShardError, manifest_url, split_url
from bertvision.storage import FileFormatError
from bertvision.train import TrainConfig, train_adapter


def config(tmp_path: Path, embeddings: str, run: str = "run", **overrides) -> TrainConfig:
    settings = {"epochs": 4, "batch_size": 16, "adapter_dim": 4, "device": "cpu", **overrides}
    task = settings.pop("task", "rte")
    return TrainConfig(task=task, embeddings=embeddings, out=str(tmp_path / run), **settings)


def without_timings(curve: dict) -> list[dict]:
    return [{k: v for k, v in e.items() if "seconds" not in k} for e in curve["epochs"]]


def read_json(path: Path) -> dict:
    return json.loads(path.read_text())


@pytest.fixture
def rte_embeddings(tmp_path) -> str:
    return synthetic(str(tmp_path / "emb"))


# ----------------------------------------------------------------------------------------------
# The first proof: train on extracted RTE embeddings through the CLI.


@pytest.fixture(scope="module")
def rte_extracted(tmp_path_factory, glue_dir, tiny_model) -> tuple[str, str]:
    """Real RTE slices (48 train, 24 dev, 20 test) extracted with the tiny BERT."""
    from bertvision.extract import ExtractConfig, extract_hidden_states

    root = tmp_path_factory.mktemp("rte-slice")
    data_dir = root / "glue"
    (data_dir / "RTE").mkdir(parents=True)
    for split, rows in (("train", 48), ("dev", 24), ("test", 20)):
        lines = (Path(glue_dir) / "RTE" / f"{split}.tsv").read_text().splitlines()[: rows + 1]
        (data_dir / "RTE" / f"{split}.tsv").write_text("\n".join(lines) + "\n")
    out = str(root / "emb")
    cfg = ExtractConfig(
        task="rte",
        out=out,
        model=tiny_model,
        data_dir=str(data_dir),
        splits=["train", "dev", "test"],
        shard_size=16,
        max_seq_length=64,
        device="cpu",
    )
    assert extract_hidden_states(cfg, progress=False).ok
    return out, str(data_dir)


def test_train_command_writes_every_output_and_exact_dev_metrics(tmp_path, rte_extracted):
    embeddings, data_dir = rte_extracted
    run = tmp_path / "run"
    args = ["train", "--task", "rte", "--embeddings", embeddings, "--out", str(run)]
    args += ["--epochs", "3", "--adapter-dim", "8", "--device", "cpu", "--seed", "3"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    for name in (
        "config.json",
        "metrics.json",
        "adapter/adapter_config.json",
        "adapter/adapter.safetensors",
        "dev_predictions.tsv",
        "test_predictions.tsv",
        "curve.json",
        "curve.png",
        "outputs/dev.parquet",
        "outputs/test.parquet",
        "outputs/val.parquet",
    ):
        assert (run / name).is_file(), name
    assert not (run / "_checkpoint").exists()

    task = glue.get_task("rte")
    metrics = read_json(run / "metrics.json")
    assert set(metrics) == {"val", "dev"} and set(metrics["dev"]) == {"accuracy"}
    dev = glue.load_split(task, "dev", data_dir)
    submitted = read_submission(str(run / "dev_predictions.tsv"), task)
    assert sorted(submitted) == [ex.example_id for ex in dev]
    recomputed = compute_metrics(
        task, [submitted[ex.example_id] for ex in dev], [ex.label for ex in dev]
    )
    assert metrics["dev"] == recomputed

    lines = (run / "test_predictions.tsv").read_text().splitlines()
    assert lines[0] == "index\tprediction" and len(lines) == 21
    assert {line.split("\t")[1] for line in lines[1:]} <= set(task.labels)

    table = pq.read_table(run / "outputs" / "dev.parquet")
    assert table.schema.field("example_id").type == pa.int64()
    assert table.schema.field("output").type == pa.list_(pa.float32())
    probabilities = np.stack(table.column("output").to_numpy(zero_copy_only=False))
    assert probabilities.shape == (24, 2)
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, rtol=1e-5)
    assert table.column("label").to_pylist() == [ex.label for ex in dev]

    curve = read_json(run / "curve.json")
    assert [e["epoch"] for e in curve["epochs"]] == [1, 2, 3]
    # each epoch's training pass in wall-clock and in CPU seconds
    assert all(e["seconds"] > 0 and e["cpu_seconds"] > 0 for e in curve["epochs"])
    assert curve["train_examples"] + curve["val_examples"] == 48 and curve["val_examples"] == 5
    assert (run / "curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    provenance = read_json(run / "config.json")
    plan = json.loads((Path(embeddings) / "rte/train/_manifest/plan.json").read_text())
    assert provenance["model_fingerprint"] == plan["model_fingerprint"]
    assert provenance["embeddings"] == embeddings
    assert provenance["train"]["seed"] == 3 and provenance["adapter"]["adapter"] == "pooler"
    assert isinstance(adapters.load_adapter(str(run / "adapter")), adapters.AdapterPooler)

    rerun = CliRunner().invoke(app, args)
    assert rerun.exit_code == 0 and rerun.stdout == result.stdout
    assert "finished before with the same settings and inputs; returned as stored" in rerun.stderr
    assert "returned as stored" not in result.stderr


# ----------------------------------------------------------------------------------------------
# Metrics, regression and MNLI


def test_regression_dev_metrics_equal_those_recomputed_from_the_submission(tmp_path):
    embeddings = synthetic(str(tmp_path / "emb"), task="stsb")
    metrics = train_adapter(config(tmp_path, embeddings, task="stsb"), progress=False)
    run = tmp_path / "run"
    task = glue.get_task("stsb")
    submitted = read_submission(str(run / "dev_predictions.tsv"), task)
    labels = pq.read_table(run / "outputs" / "dev.parquet").column("label").to_pylist()
    assert metrics["dev"] == compute_metrics(task, [submitted[i] for i in range(30)], labels)
    assert set(metrics["dev"]) == {"pearson", "spearman"}
    outputs = pq.read_table(run / "outputs" / "dev.parquet").column("output").to_pylist()
    assert all(len(o) == 1 for o in outputs)  # [score]


def test_mnli_reports_matched_as_dev_and_mismatched_beside_it(tmp_path):
    embeddings = synthetic(str(tmp_path / "emb"), task="mnli")
    metrics = train_adapter(config(tmp_path, embeddings, task="mnli"), progress=False)
    assert set(metrics) == {"val", "dev", "dev_mismatched"}
    run = tmp_path / "run"
    for split in ("dev_matched", "dev_mismatched"):
        assert (run / f"{split}_predictions.tsv").is_file()
        assert (run / "outputs" / f"{split}.parquet").is_file()


@pytest.mark.parametrize("adapter", ["pooler", "scalarmix", "cls"])
def test_each_adapter_learns_the_synthetic_signal(tmp_path, rte_embeddings, adapter):
    cfg = config(tmp_path, rte_embeddings, adapter=adapter, epochs=8, lr=1e-2)
    metrics = train_adapter(cfg, progress=False)
    assert metrics["dev"]["accuracy"] > 0.7  # chance is 0.5


# ----------------------------------------------------------------------------------------------
# Selection never reads dev


def test_changing_dev_labels_changes_no_chosen_epoch_or_weight(tmp_path):
    original = synthetic(str(tmp_path / "emb"))
    flipped = str(tmp_path / "emb-flipped")
    shutil.copytree(original, flipped)
    shutil.rmtree(Path(flipped) / "rte" / "dev")
    # Same hidden states, opposite labels: only what is reported on dev may change.
    truth = np.random.default_rng(2).integers(0, 2, 30)  # what synthetic() drew for dev
    write_split(flipped, "rte", "dev", 30, seed=2, labels=1 - truth)

    runs = {}
    for name, embeddings in (("original", original), ("flipped", flipped)):
        cfg = config(tmp_path, embeddings, run=name, epochs=6, patience=0)
        runs[name] = train_adapter(cfg, progress=False)
    first, second = tmp_path / "original", tmp_path / "flipped"
    curve_a, curve_b = read_json(first / "curve.json"), read_json(second / "curve.json")
    assert curve_a["best_epoch"] == curve_b["best_epoch"]
    assert without_timings(curve_a) == without_timings(curve_b)
    weights = "adapter/adapter.safetensors"
    assert (first / weights).read_bytes() == (second / weights).read_bytes()
    assert runs["original"]["val"] == runs["flipped"]["val"]
    stored = pq.read_table(second / "outputs" / "dev.parquet").column("label").to_pylist()
    assert stored == (1 - truth).tolist()  # the flipped labels were read and reported
    accuracies = runs["original"]["dev"]["accuracy"], runs["flipped"]["dev"]["accuracy"]
    assert accuracies[0] != accuracies[1] and sum(accuracies) == pytest.approx(1.0)


# ----------------------------------------------------------------------------------------------
# Padding: the same example with short or long batch-mates gets the same prediction


@pytest.mark.parametrize("adapter", ["pooler", "scalarmix", "cls"])
def test_an_example_gets_the_same_prediction_with_short_or_long_batch_mates(
    rte_embeddings, adapter
):
    data = load_embeddings("rte", rte_embeddings, device="cpu")
    packed = data.splits["dev"].resident
    order = np.argsort(packed.lengths)
    shortest, short_mates, long_mates = order[0], order[1:4], order[-3:]
    assert packed.lengths[long_mates].min() > packed.lengths[short_mates].max()
    torch.manual_seed(0)
    model = adapters.build_adapter(
        adapters.make_config(adapter, layers=LAYERS, hidden_size=HIDDEN, num_labels=2)
    ).eval()
    predictions = []
    for mates in (short_mates, long_mates):
        batch = packed.batch(np.array([shortest, *mates]), "cpu")
        assert batch.width == packed.lengths[[shortest, *mates]].max()  # its longest example
        predictions.append(model(batch)[0])
    torch.testing.assert_close(predictions[0], predictions[1], rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------------------------
# Resume and finished runs


def test_an_interrupted_run_resumes_from_its_last_epoch(tmp_path, rte_embeddings, monkeypatch):
    whole = config(tmp_path, rte_embeddings, run="whole", epochs=5, patience=0)
    train_adapter(whole, progress=False)

    real_epoch = training._train_epoch
    epochs_trained = []

    def interrupted(*args):
        if len(epochs_trained) == 3:
            raise KeyboardInterrupt
        epochs_trained.append(args[-1])
        return real_epoch(*args)

    monkeypatch.setattr(training, "_train_epoch", interrupted)
    cut = config(tmp_path, rte_embeddings, run="cut", epochs=5, patience=0)
    with pytest.raises(KeyboardInterrupt):
        train_adapter(cut, progress=False)
    run = tmp_path / "cut"
    assert (run / "_checkpoint" / "last.pt").is_file() and not (run / "metrics.json").exists()

    epochs_trained.clear()
    monkeypatch.setattr(
        training, "_train_epoch", lambda *a: epochs_trained.append(a[-1]) or real_epoch(*a)
    )
    resumed = train_adapter(cut, progress=False)
    assert epochs_trained == [4, 5]
    assert resumed == read_json(tmp_path / "whole" / "metrics.json")
    assert without_timings(read_json(run / "curve.json")) == without_timings(
        read_json(tmp_path / "whole" / "curve.json")
    )
    weights = "adapter/adapter.safetensors"
    assert (run / weights).read_bytes() == (tmp_path / "whole" / weights).read_bytes()


def test_a_checkpoint_whose_bytes_changed_is_refused_not_resumed_from(
    tmp_path, rte_embeddings, monkeypatch
):
    """torch.load reads flipped bytes in the saved tensors as other weights; the zip's CRC32s
    tell, and the run stops naming the checkpoint before anything is written."""
    real_epoch = training._train_epoch

    def cut_after_one_epoch(*args):
        if args[-1] == 2:
            raise KeyboardInterrupt
        return real_epoch(*args)

    monkeypatch.setattr(training, "_train_epoch", cut_after_one_epoch)
    cut = config(tmp_path, rte_embeddings, run="cut", epochs=3, patience=0)
    with pytest.raises(KeyboardInterrupt):
        train_adapter(cut, progress=False)
    monkeypatch.undo()
    checkpoint = tmp_path / "cut" / "_checkpoint" / "last.pt"
    data = bytearray(checkpoint.read_bytes())
    at = len(data) // 2  # inside the saved tensors
    data[at : at + 4] = bytes(b ^ 0xFF for b in data[at : at + 4])
    checkpoint.write_bytes(bytes(data))
    before = tree_state(tmp_path / "cut")

    with pytest.raises(FileFormatError, match=rf"{checkpoint} is not the checkpoint training wro"):
        train_adapter(cut, progress=False)
    assert tree_state(tmp_path / "cut") == before


def test_a_finished_run_is_returned_as_stored_and_never_mixed(
    tmp_path, rte_embeddings, monkeypatch
):
    cfg = config(tmp_path, rte_embeddings)
    metrics = train_adapter(cfg, progress=False)
    monkeypatch.setattr(training, "_train_epoch", lambda *a: pytest.fail("trained again"))
    assert train_adapter(cfg, progress=False) == metrics

    before = {p: p.read_bytes() for p in (tmp_path / "run").rglob("*") if p.is_file()}
    with pytest.raises(
        ValueError, match=r"finished run with other settings \(lr .* there, 0.5 here\)"
    ):
        train_adapter(dataclasses.replace(cfg, lr=0.5), progress=False)
    # streamed, the train split is shuffled in groups of shards, not whole: another run
    with pytest.raises(ValueError, match=r"other settings \(max_resident_gb .* there, 0 here\)"):
        train_adapter(dataclasses.replace(cfg, max_resident_gb=0), progress=False)
    # only what the key covers is named: how fast it reads is not why it is refused
    with pytest.raises(ValueError, match=r"other settings \(seed 0 there, 1 here\);"):
        train_adapter(dataclasses.replace(cfg, seed=1, read_ahead=4), progress=False)
    after = {p: p.read_bytes() for p in (tmp_path / "run").rglob("*") if p.is_file()}
    assert after == before


def test_what_a_kill_after_the_commit_left_goes_when_the_run_is_asked_for_again(
    tmp_path, rte_embeddings, monkeypatch
):
    """A kill between a run's commit record and its clean-up leaves _publishing.json, staging and
    its checkpoint; the next train of the same run returns it as stored and removes them. A
    checkpoint of another key is an --overwrite run's under way: kept to resume from."""
    cfg = config(tmp_path, rte_embeddings, epochs=2, patience=0)
    metrics = train_adapter(cfg, progress=False)
    run = tmp_path / "run"

    def cut_after_one_epoch(*args):
        if args[-1] == 2:
            raise KeyboardInterrupt
        return real_epoch(*args)

    real_epoch = training._train_epoch
    monkeypatch.setattr(training, "_train_epoch", cut_after_one_epoch)
    other = dataclasses.replace(cfg, lr=0.5, overwrite=True)
    with pytest.raises(KeyboardInterrupt):
        train_adapter(other, progress=False)  # the old run stays finished meanwhile
    monkeypatch.undo()
    theirs = (run / "_checkpoint" / "last.pt").read_bytes()
    assert train_adapter(cfg, progress=False) == metrics
    assert (run / "_checkpoint" / "last.pt").read_bytes() == theirs

    shutil.rmtree(run / "_checkpoint")
    cut = dataclasses.replace(cfg, out=str(tmp_path / "cut"))
    monkeypatch.setattr(training, "_train_epoch", cut_after_one_epoch)
    with pytest.raises(KeyboardInterrupt):
        train_adapter(cut, progress=False)
    monkeypatch.undo()
    (run / "_checkpoint").mkdir()
    shutil.copy(tmp_path / "cut" / "_checkpoint" / "last.pt", run / "_checkpoint")  # its own key
    (run / "_publishing.json").write_text('{"files": []}')
    (run / "_staging" / "dead").mkdir(parents=True)
    assert train_adapter(cfg, progress=False) == metrics
    assert sorted(p.name for p in run.iterdir() if p.name.startswith("_")) == ["_commit.json"]


def test_a_run_whose_adapter_is_gone_is_trained_again_not_returned_as_stored(
    tmp_path, rte_embeddings
):
    """The commit record lists adapter/; with it gone the run is not finished: train warns,
    trains again and commits the same run whole."""
    cfg = config(tmp_path, rte_embeddings)
    metrics = train_adapter(cfg, progress=False)
    weights = (tmp_path / "run" / "adapter" / "adapter.safetensors").read_bytes()
    shutil.rmtree(tmp_path / "run" / "adapter")
    with pytest.warns(UserWarning, match=r"lacks 2 of its files \(adapter/"):
        assert train_adapter(cfg, progress=False) == metrics
    assert (tmp_path / "run" / "adapter" / "adapter.safetensors").read_bytes() == weights
    assert runs.stored_record(cfg.out) is not None


def test_a_kill_while_replacing_a_finished_run_leaves_it_whole_and_finished(
    tmp_path, rte_embeddings, monkeypatch
):
    """Killed after the new run's predictions are written (adapter weights next): the old run's
    files are all still there, unmixed, and it is still returned as finished."""
    cfg = config(tmp_path, rte_embeddings)
    metrics = train_adapter(cfg, progress=False)
    run = tmp_path / "run"

    def run_files() -> dict:
        return {
            str(p.relative_to(run)): p.read_bytes()
            for p in run.rglob("*")
            if p.is_file() and not str(p.relative_to(run)).startswith("_checkpoint")
        }

    before = run_files()
    other = dataclasses.replace(cfg, lr=0.5, overwrite=True)

    def killed(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(adapters, "save_adapter", killed)
    with pytest.raises(KeyboardInterrupt):
        train_adapter(other, progress=False)
    assert run_files() == before
    monkeypatch.undo()
    monkeypatch.setattr(training, "_train_epoch", lambda *a: pytest.fail("trained again"))
    assert train_adapter(cfg, progress=False) == metrics
    monkeypatch.undo()

    replaced = train_adapter(other, progress=False)
    assert read_json(run / "config.json")["train"]["lr"] == 0.5
    assert read_json(run / "metrics.json") == replaced
    assert set(run_files()) == set(before)


def test_early_stopping_keeps_the_best_val_epoch(tmp_path, rte_embeddings):
    cfg = config(tmp_path, rte_embeddings, adapter="scalarmix", epochs=30, patience=2, lr=0.1)
    train_adapter(cfg, progress=False)
    curve = read_json(tmp_path / "run" / "curve.json")
    scores = [e["val"]["accuracy"] for e in curve["epochs"]]
    assert curve["stopped_early"] and len(scores) < 30
    assert curve["best_epoch"] == len(scores) - 2  # two epochs without improvement, then stop
    assert scores[curve["best_epoch"] - 1] == max(scores)


def test_a_train_fraction_trains_on_a_nested_seeded_subset_outside_the_held_out_slice(
    tmp_path, rte_embeddings
):
    data = load_embeddings("rte", rte_embeddings, device="cpu")
    objectives = {
        fraction: training.GlueObjective(
            config(tmp_path, rte_embeddings, train_fraction=fraction), data
        )
        for fraction in (0.25, 0.5, 1.0)
    }
    everything = objectives[1.0]
    assert everything.num_train == len(everything.is_val) - everything.num_val
    for fraction in (0.25, 0.5):
        part = objectives[fraction]
        assert part.num_train == round(fraction * everything.num_train)
        assert not (part.is_trained & part.is_val).any()
        assert (part.is_val == everything.is_val).all()  # selection is on the same slice
    assert (objectives[0.5].is_trained >= objectives[0.25].is_trained).all()

    train_adapter(config(tmp_path, rte_embeddings, train_fraction=0.5), progress=False)
    assert read_json(tmp_path / "run" / "curve.json")["train_examples"] == objectives[0.5].num_train
    with pytest.raises(ValueError, match=r"^train_fraction must be in \(0, 1\], got 0$"):
        config(tmp_path, rte_embeddings, train_fraction=0)


# ----------------------------------------------------------------------------------------------
# Shared and streamed embeddings


def test_shared_embeddings_give_the_same_run_as_loading_them(tmp_path, rte_embeddings):
    data = load_embeddings("rte", rte_embeddings, device="cpu")
    assert all(split.resident is not None for split in data.splits.values())
    alone = train_adapter(config(tmp_path, rte_embeddings, run="alone"), progress=False)
    shared = train_adapter(
        config(tmp_path, rte_embeddings, run="shared"), data=data, progress=False
    )
    assert shared == alone
    with pytest.raises(ValueError, match="embeddings given are of rte, not mrpc"):
        train_adapter(config(tmp_path, rte_embeddings, task="mrpc"), data=data, progress=False)


def test_embeddings_given_held_otherwise_than_the_run_would_hold_them_are_refused(
    tmp_path, rte_embeddings
):
    """Held, the train split is shuffled whole; streamed, in groups of shards: given data held
    otherwise than the run's max_resident_gb would hold it gives other batches under its key."""
    streamed = load_embeddings("rte", rte_embeddings, device="cpu", max_resident_gb=0)
    held = load_embeddings("rte", rte_embeddings, device="cpu")
    with pytest.raises(ValueError, match="hold the train split streamed; max_resident_gb 8 hol"):
        train_adapter(config(tmp_path, rte_embeddings), data=streamed, progress=False)
    with pytest.raises(ValueError, match="hold the train split in memory; max_resident_gb 0 str"):
        train_adapter(config(tmp_path, rte_embeddings, max_resident_gb=0), data=held)
    assert not (tmp_path / "run").exists()
    own = train_adapter(config(tmp_path, rte_embeddings, run="own", max_resident_gb=0))
    given = train_adapter(
        config(tmp_path, rte_embeddings, run="given", max_resident_gb=0), data=streamed
    )
    assert given == own


def test_streamed_and_resident_splits_give_the_same_predictions(rte_embeddings):
    resident = load_embeddings("rte", rte_embeddings, device="cpu").splits["dev"]
    streamed = load_embeddings("rte", rte_embeddings, device="cpu", max_resident_gb=0).splits["dev"]
    torch.manual_seed(0)
    model = adapters.build_adapter(
        adapters.make_config("pooler", layers=LAYERS, hidden_size=HIDDEN, num_labels=2)
    ).eval()
    keep = np.ones(30, dtype=bool)
    ids_a, logits_a = training.predict(model, resident, keep, 7, "cpu")
    ids_b, logits_b = training.predict(model, streamed, keep, 7, "cpu")
    np.testing.assert_array_equal(ids_a, np.arange(30))
    np.testing.assert_array_equal(ids_a, ids_b)
    np.testing.assert_allclose(logits_a, logits_b, rtol=1e-5, atol=1e-6)


def test_a_streamed_run_completes(tmp_path, rte_embeddings):
    cfg = config(tmp_path, rte_embeddings, max_resident_gb=0, shuffle_shards=2)
    metrics = train_adapter(cfg, progress=False)
    assert set(metrics) == {"val", "dev"}


# ----------------------------------------------------------------------------------------------
# Bad input: a clear error, nothing written in RUN


def refuse(tmp_path: Path, embeddings: str, match: str, error=ShardError, **overrides) -> None:
    cfg = config(tmp_path, embeddings, **overrides)
    with pytest.raises(error, match=match):
        train_adapter(cfg, progress=False)
    assert not (tmp_path / "run").exists()


def test_embeddings_of_another_task_are_refused(tmp_path, rte_embeddings):
    refuse(
        tmp_path,
        rte_embeddings,
        "no embeddings of mrpc under .*; it holds embeddings of rte",
        task="mrpc",
    )


def test_a_missing_split_is_refused(tmp_path):
    embeddings = str(tmp_path / "embeddings")
    write_split(embeddings, "rte", "train", 40)
    refuse(tmp_path, embeddings, "no embeddings for rte/dev under")
    # a pipeline's output folder, given for its embeddings folder
    refuse(tmp_path, str(tmp_path), "no embeddings .* a pipeline's embeddings are in .*/embeddings")


def test_an_incomplete_split_is_refused(tmp_path, rte_embeddings):
    (Path(rte_embeddings) / "rte" / "dev" / "_manifest" / shard_record_name(1)).unlink()
    refuse(tmp_path, rte_embeddings, "incomplete: 1 of 2 shards not committed")


def test_splits_of_another_encoder_are_refused(tmp_path):
    embeddings = str(tmp_path / "emb")
    write_split(embeddings, "rte", "train", 40)
    write_split(embeddings, "rte", "dev", 20, fingerprint="b" * 16)
    refuse(tmp_path, embeddings, "mix settings: train has model_fingerprint a+, dev has b+")


def test_splits_of_another_hidden_size_are_refused(tmp_path):
    embeddings = str(tmp_path / "emb")
    write_split(embeddings, "rte", "train", 40)
    write_split(embeddings, "rte", "dev", 20, hidden_size=4)
    refuse(tmp_path, embeddings, "mix settings: train has hidden_size 8, dev has 4")


def test_a_shard_of_another_extraction_inside_a_split_is_refused(tmp_path, rte_embeddings):
    other = str(tmp_path / "other")
    write_split(other, "rte", "dev", 30, seed=2, fingerprint="c" * 16)
    ours = split_url(rte_embeddings, "rte", "dev")
    source = Path(split_url(other, "rte", "dev")) / "shard-00001.parquet"
    shutil.copy(source, Path(ours) / "shard-00001.parquet")
    record_url = manifest_url(ours, shard_record_name(1))
    record = ShardRecord.from_json(storage.read_text(record_url))
    content = source.read_bytes()
    committed = dataclasses.replace(
        record, bytes=len(content), sha256=hashlib.sha256(content).hexdigest()
    )
    storage.write_text_atomic(record_url, committed.to_json())
    refuse(tmp_path, rte_embeddings, "belongs to another extraction .*: shards with mixed settings")


@pytest.mark.parametrize("resident_gb", [4.0, 0.0], ids=["resident", "streamed"])
def test_flipped_bytes_in_a_shard_stop_training_naming_it_and_extract_redoes_it(
    tmp_path, rte_extracted, tiny_model, resident_gb
):
    from bertvision.extract import ExtractConfig, extract_hidden_states

    original, data_dir = rte_extracted
    embeddings = tmp_path / "emb"
    shutil.copytree(original, embeddings)
    shard = embeddings / "rte/train/shard-00001.parquet"
    data = bytearray(shard.read_bytes())
    middle = len(data) // 2
    data[middle : middle + 16] = bytes(b ^ 0xFF for b in data[middle : middle + 16])
    shard.write_bytes(bytes(data))

    refuse(
        tmp_path,
        str(embeddings),
        f"shard {shard} is corrupt.*rerun extract",
        max_resident_gb=resident_gb,
    )
    cfg = ExtractConfig(
        task="rte",
        out=str(embeddings),
        model=tiny_model,
        data_dir=data_dir,
        splits=["train", "dev", "test"],
        shard_size=16,
        max_seq_length=64,
        device="cpu",
    )
    assert extract_hidden_states(cfg, progress=False).committed["rte/train"] == [1]
    assert shard.read_bytes() == (Path(original) / "rte/train/shard-00001.parquet").read_bytes()
    assert "accuracy" in train_adapter(config(tmp_path, str(embeddings)), progress=False)["dev"]


def test_embeddings_of_another_encoder_than_asked_are_refused(tmp_path, rte_embeddings):
    refuse(tmp_path, rte_embeddings, "not the one asked for", model_fingerprint="f" * 16)


def test_bad_settings_are_refused_before_anything_runs(tmp_path, rte_embeddings):
    with pytest.raises(ValueError, match="^adapter_dim must be >= 1, got 0$"):
        config(tmp_path, rte_embeddings, adapter_dim=0)
    with pytest.raises(ValueError, match="adapter 'lstm' is unknown"):
        config(tmp_path, rte_embeddings, adapter="lstm")
    with pytest.raises(ValueError, match="val_fraction must be in"):
        config(tmp_path, rte_embeddings, val_fraction=1.0)
    result = CliRunner().invoke(
        app,
        ["train", "--task", "rte", "--embeddings", rte_embeddings, "--out", str(tmp_path / "run")]
        + ["--adapter-dim", "0"],
    )
    assert result.exit_code == 2
    assert "error: --adapter-dim must be >= 1, got 0" in result.output
    assert not (tmp_path / "run").exists()


def test_cli_reports_bad_embeddings_in_one_line(tmp_path, rte_embeddings):
    result = CliRunner().invoke(
        app,
        ["train", "--task", "cola", "--embeddings", rte_embeddings, "--out", str(tmp_path / "run")],
    )
    assert result.exit_code == 2
    assert result.output.strip().startswith("error: no embeddings of cola under")
    assert not (tmp_path / "run").exists()


def test_training_before_any_extraction_says_run_extract_first(tmp_path):
    args = ["train", "--task", "rte", "--embeddings", str(tmp_path / "emb")]
    result = CliRunner().invoke(app, [*args, "--out", str(tmp_path / "run")])
    assert result.exit_code == 2
    assert (
        result.stderr
        == f"error: no embeddings of rte under {tmp_path / 'emb'}; run extract first\n"
    )


# ----------------------------------------------------------------------------------------------
# The experiment script, at the smallest scale


EXPERIMENT = Path(__file__).resolve().parents[1] / "scripts" / "experiment.py"
# The experiment at its smallest: 40 RTE examples (4 held out), fine-tuning for half an epoch and
# one with an lr grid of two, adapters on the pretrained encoder and the half-epoch checkpoint, a
# sweep of 2 one-epoch trials on the latter.
EXPERIMENT_ARGS = [
    *("--tasks", "rte", "--seeds", "1", "--max-train-examples", "40", "--device", "cpu"),
    *("--finetune-epochs", "0.5,1", "--finetune-lrs", "5e-5,1e-3", "--extract-from", "0,0.5"),
    *("--adapter-epochs", "1", "--trials", "2", "--top-k", "2", "--space", '{"epochs": 1}'),
    *("--reference", "finetune-1"),
]


@pytest.fixture(scope="module")
def experiment(tmp_path_factory, glue_dir, tiny_model) -> tuple[Path, list[str]]:
    """The experiment run once in a fresh interpreter (it must not import prefect): its output
    folder and its arguments."""
    import subprocess
    import sys

    out = tmp_path_factory.mktemp("experiment") / "exp"
    argv = ["--data-dir", glue_dir, "--model", tiny_model, "--out", str(out), *EXPERIMENT_ARGS]
    run = (
        "import runpy, sys; "
        f"sys.argv = {[str(EXPERIMENT), *argv]!r}; "
        f"runpy.run_path({str(EXPERIMENT)!r}, run_name='__main__'); "
        "assert 'prefect' not in sys.modules, 'the experiment imported prefect'"
    )
    subprocess.run([sys.executable, "-c", run], check=True, capture_output=True)
    return out, argv, run


def test_experiment_script_measures_every_method_resumes_and_needs_no_prefect(experiment):
    import subprocess
    import sys

    out, argv, run = experiment
    results = read_json(out / "results.json")

    assert [row["method"] for row in results["summary"]] == [
        "finetune-0.5",
        "finetune-1",
        "pooler@0",
        "scalarmix@0",
        "cls@0",
        "pooler@0.5",
        "scalarmix@0.5",
        "cls@0.5",
        "pooler@chosen",
        "sweep-best@0.5",
        "ensemble@0.5",
        "ensemble+ft@0.5",
        "method@0.5",
        "curve-10%@0.5",
        "curve-25%@0.5",
        "curve-50%@0.5",
        "curve-100%@0.5",
        "extract@0",
        "extract@0.5",
        "load@0",
        "load@0.5",
    ]
    from bertvision.records import code_info

    assert results["code"] == code_info()  # the commit, where run from a git checkout
    if results["code"]["git_commit"]:
        head = f"code {results['code_version']} at {results['code']['git_commit'][:7]}"
        assert head in (out / "results.md").read_text()
    records = {r["method"]: r for r in results["records"]}
    # every fine-tuning of the grid ran; each method is the run best on held-out TRAIN
    assert {m for m in records if m.startswith("finetune-") and "-lr" in m} == {
        "finetune-0.5-lr5e-05",
        "finetune-0.5-lr0.001",
        "finetune-1-lr5e-05",
        "finetune-1-lr0.001",
    }
    for epochs in ("0.5", "1"):
        grid = [records[f"finetune-{epochs}-lr{lr}"] for lr in ("5e-05", "0.001")]
        chosen = records[f"finetune-{epochs}"]
        assert chosen["val"]["accuracy"] == max(r["val"]["accuracy"] for r in grid)
        assert chosen["pipeline_s"] == pytest.approx(sum(r["stage_s"] for r in grid))
        assert chosen["pipeline_cpu_s"] == pytest.approx(sum(r["stage_cpu_s"] for r in grid))
        assert results["choices"][0]["finetune_lr"][epochs] == chosen["lr"]
    for row in results["summary"][:16]:
        assert set(row["dev"]) == {"accuracy"} and 0.0 <= row["dev"]["accuracy"]["mean"] <= 1.0
        assert row["pipeline_s"]["mean"] >= row["amortised_s"]["mean"] >= row["stage_s"]["mean"]
        assert row["paired"]["per_seed"] == [
            records[row["method"]]["dev"]["accuracy"] - records["finetune-1"]["dev"]["accuracy"]
        ]
    # charged: the chosen checkpoint's whole grid + its extraction + loading (+ the sweep)
    shared = sum(records[m]["stage_s"] for m in ("finetune-0.5", "extract@0.5", "load@0.5"))
    shared = records["finetune-0.5"]["pipeline_s"] + shared - records["finetune-0.5"]["stage_s"]
    assert records["pooler@0.5"]["pipeline_s"] == pytest.approx(
        shared + records["pooler@0.5"]["stage_s"], abs=0.01
    )
    # the CPU clock is charged the same way
    shared_cpu = sum(records[m]["stage_cpu_s"] for m in ("extract@0.5", "load@0.5"))
    shared_cpu += records["finetune-0.5"]["pipeline_cpu_s"]
    assert records["pooler@0.5"]["pipeline_cpu_s"] == pytest.approx(
        shared_cpu + records["pooler@0.5"]["stage_cpu_s"], abs=0.01
    )
    assert all(r["stage_cpu_s"] > 0 for r in records.values())
    # one extraction served 3 single adapters, 2 trials and 4 curve points
    assert records["pooler@0.5"]["amortised_s"] == pytest.approx(
        shared / 9 + records["pooler@0.5"]["stage_s"], abs=0.01
    )
    assert records["ensemble+ft@0.5"]["members"] == [
        *records["ensemble@0.5"]["members"],
        "finetuned",
    ]
    # the method's result: the ensemble better on held-out TRAIN (a tie: with the fine-tuned model)
    candidates = [records[m] for m in ("ensemble+ft@0.5", "ensemble@0.5")]
    chosen = max(candidates, key=lambda r: r["val"]["accuracy"])
    method = records["method@0.5"]
    assert method["chose"] == chosen["method"] == results["choices"][0]["method"]
    assert results["choices"][0]["method_held_out"] == {
        r["method"]: r["val"]["accuracy"] for r in candidates
    }
    assert (method["val"], method["dev"]) == (chosen["val"], chosen["dev"])
    assert method["pipeline_s"] == pytest.approx(
        records["ensemble+ft@0.5"]["pipeline_s"] + records["ensemble@0.5"]["stage_s"], abs=0.01
    )
    assert [records[f"curve-{p}%@0.5"]["train_fraction"] for p in (10, 25, 50, 100)] == [
        0.1,
        0.25,
        0.5,
        1.0,
    ]
    assert "| ensemble+ft@0.5 | " in (out / "results.md").read_text()
    assert (out / "results.png").read_bytes().startswith(b"\x89PNG")
    [keyed] = [folder for folder in out.iterdir() if (folder / "records").is_dir()]
    assert keyed.name == results["keys"]["rte"]  # records keyed on settings, encoder, data
    seed_runs = keyed / "runs" / "rte" / "seed-0"
    assert not list(seed_runs.glob("embeddings*"))
    # of the fine-tuned checkpoints, only the one extracted from is kept (the others are ~90 MB
    # each and never read again)
    [choices] = results["choices"]
    kept = sorted(folder.name for folder in seed_runs.glob("finetune-*"))
    assert kept == [f"finetune-0.5-lr{choices['finetune_lr']['0.5']:g}"]

    again = subprocess.run([sys.executable, "-c", run], check=True, capture_output=True, text=True)
    assert read_json(out / "results.json")["records"] == results["records"]  # nothing reran
    taken = len(list(keyed.glob("records/rte/seed-0/*.json")))  # a record per stage
    assert again.stderr.splitlines()[-1] == f"0 stages run, {taken} taken from the records in {out}"


POSITIVE = ["good", "great", "nice", "happy", "love", "best"]
NEGATIVE = ["bad", "awful", "poor", "sad", "hate", "worst"]
FILLER = "the a film movie story plot actor scene music time day night city road house water"


def keyword_sst2(folder: Path, flip_dev: bool = False) -> None:
    """An SST-2 folder a tiny random BERT learns in seconds, with candidates that differ: a
    sentence's label is that of its one sentiment word (6 a side), 10 % of TRAIN mislabelled;
    320 train, 120 dev, 10 test rows. `flip_dev`: every dev label the other class."""
    rng = random.Random(0)
    folder.mkdir(parents=True)

    def rows(count: int, noise: float) -> list[tuple[str, int]]:
        drawn = []
        for _ in range(count):
            label = rng.randint(0, 1)
            words = rng.sample(FILLER.split(), 6)
            words.insert(rng.randint(0, 6), rng.choice(POSITIVE if label else NEGATIVE))
            drawn.append((" ".join(words), label if rng.random() >= noise else 1 - label))
        return drawn

    train, dev = rows(320, 0.1), rows(120, 0.0)
    dev = [(text, 1 - label) for text, label in dev] if flip_dev else dev
    for split, labelled in (("train", train), ("dev", dev)):
        lines = "".join(f"{text}\t{label}\n" for text, label in labelled)
        (folder / f"{split}.tsv").write_text(f"sentence\tlabel\n{lines}")
    lines = "".join(f"{i}\t{text}\n" for i, (text, _) in enumerate(train[:10]))
    (folder / "test.tsv").write_text(f"index\tsentence\n{lines}")


FLIP_ARGS = [
    *("--tasks", "sst2", "--seeds", "1", "--device", "cpu", "--val-fraction", "0.25"),
    *("--finetune-epochs", "2,4", "--finetune-lrs", "5e-5,3e-3", "--extract-from", "0,2"),
    *("--adapter-epochs", "10", "--trials", "3", "--top-k", "2", "--reference", "finetune-4"),
]


@pytest.mark.parametrize("method_from", ["2", "chosen"])
def test_experiment_chooses_the_same_with_dev_labels_flipped(tmp_path, tiny_model, method_from):
    """Every choice (fine-tuning lr, checkpoint, sweep trial and its epochs, ensemble members,
    the method's ensemble) and every held-out number is the same when each dev label is the
    other class; only the dev scores change. Each choice is one that dev labels could change:
    its candidates score differently on dev, so a choice made on dev would differ in one of
    the two runs (the best on dev is the worst on flipped dev)."""
    import runpy

    main = runpy.run_path(str(EXPERIMENT))["main"]
    runs = {}
    for name, flip in (("original", False), ("flipped", True)):
        keyword_sst2(tmp_path / name / "SST-2", flip_dev=flip)
        options = ["--data-dir", str(tmp_path / name), "--model", tiny_model]
        options += ["--out", str(tmp_path / f"exp-{name}"), "--method-from", method_from]
        runs[name] = main([*options, *FLIP_ARGS])
    original, flipped = runs["original"], runs["flipped"]

    assert flipped["choices"] == original["choices"]
    assert len(flipped["records"]) == len(original["records"])
    for mine, theirs in zip(flipped["records"], original["records"], strict=True):
        assert mine["method"] == theirs["method"]
        assert mine.get("val") == theirs.get("val")
        assert mine.get("params") == theirs.get("params")
        if "dev" in mine:
            assert mine["dev"]["accuracy"] == pytest.approx(1 - theirs["dev"]["accuracy"])

    dev = {r["method"]: r["dev"]["accuracy"] for r in original["records"] if "dev" in r}
    [choices] = original["choices"]
    tag = choices["checkpoint"].split("@")[1] if method_from == "chosen" else method_from
    [trials] = (tmp_path / "exp-original").glob(f"*/runs/sst2/seed-0/sweep@{tag}/trials.jsonl")
    trial_dev = [json.loads(line)["dev"]["accuracy"] for line in trials.read_text().splitlines()]
    could_change = {
        "fine-tuning lr": [dev["finetune-4-lr5e-05"], dev["finetune-4-lr0.003"]],
        "checkpoint": [dev["pooler@0"], dev["pooler@2"]],
        "sweep trial and ensemble members": trial_dev,
    }
    if tag != "0":  # on the pretrained encoder the method has one ensemble, no fine-tuned model
        could_change["the method's ensemble"] = [dev[f"ensemble+ft@{tag}"], dev[f"ensemble@{tag}"]]
    for choice, candidates in could_change.items():
        assert len(set(candidates)) > 1, f"{choice}: its candidates tie on dev {candidates}"


def test_experiment_table_names_rows_averaged_over_fewer_seeds(experiment):
    """A method missing on some seeds (ensemble+ft@chosen where the pretrained encoder was
    chosen) says over how many seeds its row is averaged; the others need not."""
    import runpy

    out, _, _ = experiment
    results = read_json(out / "results.json")
    results["settings"]["seeds"] = 2
    for row in results["summary"]:
        row["seeds"] = 1 if row["method"] == "ensemble@0.5" else 2

    rows = runpy.run_path(str(EXPERIMENT))["markdown"](results).splitlines()

    assert [r for r in rows if "seeds)" in r] == [
        next(r for r in rows if r.startswith("| ensemble@0.5 (1 of 2 seeds) | "))
    ]


def test_experiment_extracts_again_embeddings_a_later_stage_needs_once_removed(
    experiment, tmp_path
):
    """A seed's embeddings are removed once its stages are done. A stage run later on a
    recorded extraction (its record removed, say, to run it again) extracts them again and
    gets the same result."""
    import runpy

    out, argv, _ = experiment
    original = {r["method"]: r for r in read_json(out / "results.json")["records"]}
    copy = tmp_path / "exp"
    shutil.copytree(out, copy)
    [records] = copy.glob("*/records/rte/seed-0")
    (records / "sweep-best@0.5.json").unlink()
    argv = [*argv[: argv.index("--out")], "--out", str(copy), *EXPERIMENT_ARGS]

    again = {r["method"]: r for r in runpy.run_path(str(EXPERIMENT))["main"](argv)["records"]}

    assert again["sweep-best@0.5"]["val"] == original["sweep-best@0.5"]["val"]
    assert again["sweep-best@0.5"]["stage_s"] != original["sweep-best@0.5"]["stage_s"]
    assert not list(records.parent.parent.parent.glob("runs/rte/seed-0/embeddings*"))


def test_experiment_continues_elsewhere_from_its_results_json(experiment, tmp_path, capsys):
    """Records are keyed on the encoder's weights and the data's examples, not their paths: a
    copy of both elsewhere (another machine, a reinstall) with --records-from the first run's
    results.json takes its stages and runs none; records of other data are refused."""
    import runpy

    out, argv, _ = experiment
    model, data = Path(argv[argv.index("--model") + 1]), Path(argv[argv.index("--data-dir") + 1])
    shutil.copytree(model, tmp_path / "model")
    shutil.copytree(data / "RTE", tmp_path / "glue" / "RTE")
    elsewhere = ["--model", str(tmp_path / "model"), "--data-dir", str(tmp_path / "glue")]
    elsewhere += ["--records-from", str(out / "results.json"), *EXPERIMENT_ARGS]
    main = runpy.run_path(str(EXPERIMENT))["main"]
    original = read_json(out / "results.json")

    continued = main([*elsewhere, "--out", str(tmp_path / "continued")])

    assert continued["keys"] == original["keys"]
    assert continued["records"] == original["records"]  # the same seconds: nothing ran again
    assert not (tmp_path / "continued" / original["keys"]["rte"] / "runs").exists()

    with pytest.raises(SystemExit) as refused:
        main([*elsewhere, "--top-k", "1", "--out", str(tmp_path / "other-settings")])
    assert refused.value.code == 2
    assert (
        "made with other settings (--top-k 2 there, 1 here): not taken" in capsys.readouterr().err
    )
    assert not (tmp_path / "other-settings").exists()  # refused before anything is written

    train = tmp_path / "glue" / "RTE" / "train.tsv"
    header, first, *rest = train.read_text().splitlines(keepends=True)
    train.write_text("".join([header, *rest, first]))  # the same examples, another order
    with pytest.raises(SystemExit):
        main([*elsewhere, "--out", str(tmp_path / "other-data")])
    assert "made with another encoder or other examples: not taken" in capsys.readouterr().err
    assert not (tmp_path / "other-data").exists()


def test_experiment_stopped_by_its_time_limit_reports_the_seeds_it_finished(experiment, tmp_path):
    """--stop-after: no stage starts after it; the results hold the seeds finished (here seed 0,
    taken from the first run's records) and say where the run stopped."""
    import runpy

    out, argv, _ = experiment
    original = read_json(out / "results.json")
    more_seeds = [*argv, "--seeds", "2", "--stop-after", "0"]
    more_seeds[more_seeds.index("--out") + 1] = str(tmp_path / "stopped")

    main = runpy.run_path(str(EXPERIMENT))["main"]
    results = main([*more_seeds, "--records-from", str(out / "results.json")])

    assert results["stopped"] == "rte seed 1, before its stage finetune-0.5-lr5e-05"
    assert results["records"] == original["records"]
    assert results["unfinished"] == []
    assert {row["seeds"] for row in results["summary"]} == {1}
    report = (tmp_path / "stopped" / "results.md").read_text()
    assert "Stopped by --stop-after 0 s, at rte seed 1" in report

    # stopped inside a seed: its finished stages are reported ("unfinished")...
    grid = [r for r in original["records"] if r["method"].startswith("finetune-0.5-lr")]
    (tmp_path / "grid.json").write_text(json.dumps({**original, "records": grid}))
    more_seeds[more_seeds.index("--out") + 1] = str(tmp_path / "inside")
    results = main([*more_seeds, "--records-from", str(tmp_path / "grid.json")])
    assert results["stopped"] == "rte seed 0, before its stage finetune-1-lr5e-05"
    assert results["records"] == []
    assert sorted(map(json.dumps, results["unfinished"])) == sorted(map(json.dumps, grid))
    report = (tmp_path / "inside" / "results.md").read_text()
    assert "## Stages of rte seed 0 finished before the stop" in report
    assert "| finetune-0.5-lr5e-05 | accuracy " in report

    # ...but not taken elsewhere: the checkpoints later stages read stayed where they ran
    more_seeds[more_seeds.index("--out") + 1] = str(tmp_path / "elsewhere")
    results = main([*more_seeds, "--records-from", str(tmp_path / "inside" / "results.json")])
    assert results["stopped"] == "rte seed 0, before its stage finetune-0.5-lr5e-05"


def test_experiment_runs_seed_by_seed_and_reports_every_seed_finished(experiment, tmp_path):
    """Seed 0 of every task runs before seed 1 of any, so a run stopped early has seeds of every
    task; after the stop, a seed whose stages are all recorded still counts."""
    import runpy

    out, argv, _ = experiment
    main = runpy.run_path(str(EXPERIMENT))["main"]
    original = read_json(out / "results.json")
    options = [*argv, "--seeds", "2", "--stop-after", "0"]

    def run(tasks: str, records: list[dict]) -> dict:
        results_json = tmp_path / f"{tasks}.json"
        results_json.write_text(json.dumps({**original, "records": records}))
        options[options.index("--out") + 1] = str(tmp_path / tasks)
        return main([*options, "--tasks", tasks, "--records-from", str(results_json)])

    # rte's seed 0 is recorded, its seed 1 is not: wnli's seed 0 comes first
    results = run("rte,wnli", original["records"])
    assert results["stopped"] == "wnli seed 0, before its stage finetune-0.5-lr5e-05"
    assert [(c["task"], c["seed"]) for c in results["choices"]] == [("rte", 0)]

    # stopped at wnli's seed 0, rte's seeds 0 and 1 (recorded) after it still count
    as_seed_1 = [{**record, "seed": 1} for record in original["records"]]
    results = run("wnli,rte", original["records"] + as_seed_1)
    assert results["stopped"] == "wnli seed 0, before its stage finetune-0.5-lr5e-05"
    assert [(c["task"], c["seed"]) for c in results["choices"]] == [("rte", 0), ("rte", 1)]
    assert {(row["task"], row["seeds"]) for row in results["summary"]} == {("rte", 2)}


def test_experiment_killed_between_seeds_leaves_the_results_of_those_finished(experiment, tmp_path):
    """results.json is written after every finished seed: a run killed later (a device lent for
    minutes) leaves its finished seeds, which a later run takes with --records-from. (Seeds 0
    and 1 are taken from records here; the kill comes in seed 2.)"""
    import runpy

    out, argv, _ = experiment
    original = read_json(out / "results.json")
    as_seed_1 = [{**record, "seed": 1} for record in original["records"]]
    (tmp_path / "two.json").write_text(
        json.dumps({**original, "records": original["records"] + as_seed_1})
    )
    options = [*argv, "--seeds", "3", "--records-from", str(tmp_path / "two.json")]
    options[options.index("--out") + 1] = str(tmp_path / "killed")
    main = runpy.run_path(str(EXPERIMENT))["main"]
    run_seed = main.__globals__["run_seed"]

    def killed_in_seed_2(args, task, seed, *rest):
        if seed == 2:
            raise KeyboardInterrupt  # as the device's deadline would, mid-stage
        return run_seed(args, task, seed, *rest)

    main.__globals__["run_seed"] = killed_in_seed_2
    try:
        with pytest.raises(KeyboardInterrupt):
            main(options)
    finally:
        main.__globals__["run_seed"] = run_seed

    results = read_json(tmp_path / "killed" / "results.json")
    assert results["running"] == "rte seed 1" and results["stopped"] is None
    assert [(c["task"], c["seed"]) for c in results["choices"]] == [("rte", 0), ("rte", 1)]
    assert {row["seeds"] for row in results["summary"]} == {2}
    report = (tmp_path / "killed" / "results.md").read_text()
    assert "Written while the run went on, after rte seed 1" in report
    assert "## rte (2 of 3 seeds finished)" in report

    options = [*argv, "--seeds", "2", "--records-from", str(tmp_path / "killed" / "results.json")]
    options[options.index("--out") + 1] = str(tmp_path / "continued")
    continued = main(options)
    assert continued["records"] == results["records"]  # taken, not run again
    assert continued["running"] is None


@pytest.mark.parametrize(
    ("options", "says"),
    [
        (["--reference", "ft-0.5"], "--reference ft-0.5 is none of the methods"),
        (["--space", "{epochs: 1}"], "--space must be a JSON object or a JSON file"),
        (["--space", "[1]"], "--space must be a JSON object, got '[1]'"),
        (["--records-from", "missing.json"], "--records-from: missing.json does not exist"),
        (["--max-train-examples", "10"], "--max-train-examples needs --data-dir"),
        (["--tasks", ","], "--tasks names no task"),
        (["--method-from", "1"], "--method-from 1 is not in --extract-from"),
        (["--method-from", "best"], "--method-from must be a number of epochs or chosen"),
        (
            ["--method-from", "chosen", "--extract-from", "0.5"],
            "--method-from chosen needs two or more checkpoints in --extract-from",
        ),
        (
            ["--extract-from", "0.75"],
            "--extract-from 0.75: not among --finetune-epochs 0.25,0.5,1,3 (or 0, the pretrained",
        ),
        (  # the default --extract-from 0,0.25,0.5 needs 0.25
            ["--finetune-epochs", "0.5,1"],
            "--extract-from 0.25: not among --finetune-epochs 0.5,1 (or 0, the pretrained",
        ),
        (["--extract-from", "0,0.5,0.5"], "--extract-from names 0.5 twice"),
        # one stage name and one folder for both: the second would read the first's run
        (["--finetune-lrs", "1e-4,1.0000001e-4"], "--finetune-lrs names 0.0001 twice"),
        (["--train-sample", "random"], "--train-sample random needs --max-train-examples"),
        (["--finetune-epochs", "0,1"], "--finetune-epochs must be positive numbers"),
        # NaN and infinity: a time limit of NaN never stops; neither can be written as results
        (["--stop-after", "nan"], "argument --stop-after: must be a finite number, got 'nan'"),
        (["--stop-after", "inf"], "argument --stop-after: must be a finite number, got 'inf'"),
        (["--val-fraction", "inf"], "argument --val-fraction: must be a finite number"),
        (["--adapter-lr", "nan"], "argument --adapter-lr: must be a finite number"),
        (["--finetune-lrs", "1e-4,inf"], "--finetune-lrs must be finite numbers, got '1e-4,inf'"),
        (["--extract-from", "0,nan"], "--extract-from must be finite numbers"),
        (["--space", '{"epochs": NaN}'], "NaN is not a JSON number"),
        # what a stage's config refuses, refused before the stages before it run
        (["--val-fraction", "1.5"], "--val-fraction must be in (0, 1), got 1.5"),
        (["--adapter-epochs", "0"], "--adapter-epochs must be >= 1, got 0"),
        (["--finetune-batch-size", "0"], "--finetune-batch-size must be >= 1, got 0"),
        (["--sweep-adapter", "bogus"], "--sweep-adapter 'bogus' is unknown"),
        (["--space", '{"bogus": 1}'], "--space search space entries ['bogus'] are not training"),
        (["--top-k", "0"], "--top-k must be >= 1, got 0"),
        (["--max-train-examples", "-5"], "--max-train-examples must be >= 1, got -5"),
        (["--tasks", "rte,wnil"], "--tasks: unknown task 'wnil'"),
        # the trials, not the top-k that the default asks of them
        (["--trials", "0"], "--trials must be >= 1, got 0"),
        # Path("") is the current folder: the whole experiment would land there
        (["--out", ""], "argument --out: must name a folder, got ''"),
        (["--out", "\t"], "argument --out: must name a folder, got '\\t'"),
        (["--seeds", "two"], "argument --seeds: invalid int value: 'two'"),
    ],
)
def test_experiment_refuses_bad_options_in_one_line(options, says, capsys, monkeypatch, tmp_path):
    """One line on stderr, `experiment.py: error: ...`, exit status 2: no usage above it."""
    import runpy

    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as refused:
        runpy.run_path(str(EXPERIMENT))["parse_args"](options)
    assert refused.value.code == 2
    [line] = capsys.readouterr().err.splitlines()
    assert line.startswith("experiment.py: error: ")
    assert says in line


@pytest.mark.parametrize("out", ["a-file", "a-file/exp"], ids=["a-file", "under-a-file"])
def test_experiment_refuses_an_out_it_cannot_make_in_one_line(
    out, capsys, glue_dir, tmp_path, tiny_model
):
    import runpy

    (tmp_path / "a-file").write_text("mine")
    main = runpy.run_path(str(EXPERIMENT))["main"]
    options = ["--data-dir", glue_dir, "--model", tiny_model, "--out", str(tmp_path / out)]
    with pytest.raises(SystemExit) as refused:
        main([*options, "--tasks", "wnli", "--device", "cpu", "--max-train-examples", "10"])
    assert refused.value.code == 2
    [line] = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
    assert line.startswith(f"experiment.py: error: --out {tmp_path / out}: cannot make the folder")
    assert (tmp_path / "a-file").read_text() == "mine"


@pytest.mark.parametrize(
    ("stop", "code", "how"),
    [("ctrl-c", 130, "interrupted"), ("sigterm", 143, "terminated")],
)
def test_an_interrupted_experiment_ends_in_one_line_and_lets_go_of_its_out(
    capsys, glue_dir, tmp_path, tiny_model, monkeypatch, stop, code, how
):
    """Ctrl-C (exit status 130) or SIGTERM (143): one line saying the finished stages are kept,
    and the lease on OUT released (a rerun resumes at once, on any host)."""
    import runpy

    script = runpy.run_path(str(EXPERIMENT))

    def stopped(*args, **kwargs):
        assert (out / "_lease.json").exists()  # held while it runs
        if stop == "ctrl-c":
            raise KeyboardInterrupt
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(30)  # not reached: the handler raises as os.kill returns
        raise AssertionError("SIGTERM did not stop the experiment")

    script["run_seeds"].__globals__["run_seeds"] = stopped
    out = tmp_path / "exp"
    argv = ["--data-dir", glue_dir, "--model", tiny_model, "--out", str(out)]
    monkeypatch.setattr(sys, "argv", ["experiment.py", *argv, "--tasks", "wnli", "--device", "cpu"])
    with pytest.raises(SystemExit) as stopped_with, outside_handler_fails():
        script["run_as_command"](script["main"])
    assert stopped_with.value.code == code
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"{how}: the stages finished are kept; the same command resumes"
    )
    assert not (out / "_lease.json").exists()


@pytest.mark.parametrize("sliced", [False, True], ids=["whole", "max-train-examples"])
def test_experiment_refuses_data_it_cannot_read_in_one_line(capsys, tmp_path, tiny_model, sliced):
    """A --data-dir without the task's files is refused in one line before anything is written
    (so is the hub offline, with the same error), whole or sliced to --max-train-examples."""
    import runpy

    main = runpy.run_path(str(EXPERIMENT))["main"]
    out = tmp_path / "exp"
    options = ["--data-dir", str(tmp_path / "glue"), "--model", tiny_model, "--out", str(out)]
    options += ["--max-train-examples", "10"] if sliced else []
    with pytest.raises(SystemExit) as refused:
        main([*options, "--tasks", "wnli", "--device", "cpu"])
    assert refused.value.code == 2
    [line] = capsys.readouterr().err.strip().splitlines()
    missing = tmp_path / "glue" / "WNLI" / "train.tsv"
    assert line == (
        f"experiment.py: error: missing data file {missing} (wnli train); --data-dir names a "
        "folder of GLUE's task folders (WNLI/train.tsv ...), or leave it out to read the hub"
    )
    assert not out.exists()


def test_a_second_experiment_into_the_same_out_stops_in_one_line(
    capsys, glue_dir, tmp_path, tiny_model
):
    """Two experiments into one folder would write one results.json over the other's: the
    first holds the folder (runs.lease) while it runs."""
    import runpy

    main = runpy.run_path(str(EXPERIMENT))["main"]
    out = tmp_path / "exp"
    options = ["--data-dir", glue_dir, "--model", tiny_model, "--out", str(out)]
    with runs.lease(str(out)), pytest.raises(SystemExit) as refused:
        main([*options, "--tasks", "wnli", "--device", "cpu", "--max-train-examples", "10"])
    assert refused.value.code == 2
    [line] = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
    assert line.startswith(f"experiment.py: error: {out} is being written by ")
    assert not out.exists()  # nothing written: the holder, leaving it empty, removed it


def test_experiment_refuses_an_encoder_it_cannot_load_in_one_line(
    capsys, glue_dir, tmp_path, tiny_model
):
    """A --model without weights (its tokenizer alone) is refused in one line naming it, before
    anything is written."""
    import runpy

    model = tmp_path / "tokenizer-only"
    model.mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(Path(tiny_model) / name, model / name)
    out = tmp_path / "exp"
    options = ["--data-dir", glue_dir, "--model", str(model), "--out", str(out), "--tasks", "wnli"]
    with pytest.raises(SystemExit) as refused:
        runpy.run_path(str(EXPERIMENT))["main"]([*options, "--device", "cpu"])
    assert refused.value.code == 2
    [line] = capsys.readouterr().err.strip().splitlines()
    assert line.startswith(f"experiment.py: error: model {model} ")
    assert not out.exists()


def test_experiment_names_the_users_data_file_not_its_slice(capsys, glue_dir, tmp_path, tiny_model):
    """--max-train-examples slices the data in a staging folder; a malformed file is named as
    the user gave it, at its line there."""
    import runpy

    data = tmp_path / "glue" / "WNLI"
    shutil.copytree(Path(glue_dir) / "WNLI", data)
    header, first, *rest = (data / "train.tsv").read_bytes().splitlines(keepends=True)
    (data / "train.tsv").write_bytes(b"".join([header, b"\xff" + first, *rest]))
    out = tmp_path / "exp"
    options = ["--data-dir", str(tmp_path / "glue"), "--model", tiny_model, "--out", str(out)]
    options += ["--tasks", "wnli", "--max-train-examples", "10", "--device", "cpu"]
    with pytest.raises(SystemExit) as refused:
        runpy.run_path(str(EXPERIMENT))["main"](options)
    assert refused.value.code == 2
    [line] = capsys.readouterr().err.strip().splitlines()
    assert line.startswith(f"experiment.py: error: malformed data file {data / 'train.tsv'} line 2")
    assert not out.exists()


@pytest.mark.parametrize(
    ("records", "says"),
    [
        ("abc", "records: must be a JSON list, got str"),
        ([{}], "records[0]: task must be a string, got None"),
        (["abc"], "records[0]: must be a JSON object, got str"),
        ([{"task": "rte"}], "records[0]: seed must be an integer >= 0, got None"),
        ([{"task": "rte", "seed": True}], "records[0]: seed must be an integer >= 0, got True"),
        (
            [{"task": "rte", "seed": 0, "method": "../../../../escaped"}],
            "records[0]: method must be a stage's name (letters, digits and .@%+_-), "
            "got '../../../../escaped'",
        ),
        (
            [{"task": "rte", "seed": 0, "method": "finetune-1", "stage_s": 1.0}],
            "records[0]: stage_cpu_s must be a number, got None",
        ),
        (
            [{"task": "rte", "seed": 0, "method": "finetune-1", "stage_s": 1, "stage_cpu_s": 1}]
            + [{"task": "rte", "seed": 0, "method": "load@0", "stage_s": 1, "stage_cpu_s": 1}]
            + [{"task": "rte", "seed": 0, "method": "x", "stage_s": 1, "stage_cpu_s": 1, "dev": 3}],
            "records[2]: dev must be an object of metrics (numbers or null), got 3",
        ),
    ],
)
def test_experiment_refuses_records_it_cannot_take_in_one_line(
    records, says, capsys, experiment, tmp_path
):
    """--records-from: each record must be a stage's (task, seed, a method that names a file of
    the records folder, seconds, metrics), or the file is refused in one line naming it and the
    record, before anything is written."""
    import runpy

    out, argv, _ = experiment
    earlier = read_json(out / "results.json")
    path = tmp_path / "results.json"
    path.write_text(json.dumps({**earlier, "records": records}))
    argv = [*argv[: argv.index("--out")], "--out", str(tmp_path / "exp"), *EXPERIMENT_ARGS]

    with pytest.raises(SystemExit) as refused:
        runpy.run_path(str(EXPERIMENT))["main"]([*argv, "--records-from", str(path)])
    assert refused.value.code == 2
    [line] = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
    assert line.endswith(f"error: --records-from: {path} {says}")
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["results.json"]


@pytest.mark.parametrize(
    ("garbled", "says"),
    [
        ('{"task": "rte", "se', "is not valid JSON: Unterminated string"),
        ('{"task": "rte", "seed": 0}', "is no stage record: method must be a stage's name"),
    ],
)
def test_experiment_refuses_a_garbled_stage_record_naming_it(
    garbled, says, capsys, experiment, tmp_path
):
    """A stage record cut short (a full disk) or edited is refused in one line naming its file
    and saying how to run that stage again, not read as a result."""
    import runpy

    out, argv, _ = experiment
    copy = tmp_path / "exp"
    shutil.copytree(out, copy)
    [record] = copy.glob("*/records/rte/seed-0/sweep-best@0.5.json")
    record.write_text(garbled)
    argv = [*argv[: argv.index("--out")], "--out", str(copy), *EXPERIMENT_ARGS]

    with pytest.raises(SystemExit) as refused:
        runpy.run_path(str(EXPERIMENT))["main"](argv)
    assert refused.value.code == 2
    [line] = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
    assert line.startswith(f"experiment.py: error: {record} {says}")
    assert line.endswith("; delete it to run that stage again")


def test_experiment_adapters_on_the_pretrained_encoder_are_charged_no_fine_tuning(
    experiment, tiny_model
):
    """--extract-from 0: the single adapters on the pretrained encoder's own states, charged
    their extraction, loading and training only; the method needs a fine-tuned checkpoint."""
    out, _, _ = experiment
    records = {r["method"]: r for r in read_json(out / "results.json")["records"]}

    assert records["extract@0"]["checkpoint"] == Path(tiny_model).name
    assert records["extract@0.5"]["checkpoint"].startswith("finetune-0.5-lr")
    for adapter in ("pooler", "scalarmix", "cls"):
        charged = records["extract@0"]["stage_s"] + records["load@0"]["stage_s"]
        charged += records[f"{adapter}@0"]["stage_s"]
        assert records[f"{adapter}@0"]["pipeline_s"] == pytest.approx(charged, abs=0.01)
    grid = records["finetune-0.5"]["pipeline_s"]
    assert records["pooler@0.5"]["pipeline_s"] > grid  # the 0.5 checkpoint's are charged its grid
    assert "| pooler@0 | " in (out / "results.md").read_text()


def test_experiment_chooses_the_pooler_checkpoint_on_held_out_train_charged_every_candidate(
    experiment,
):
    """pooler@chosen: the pooler on the checkpoint where it scores best on held-out TRAIN (a
    tie: the earliest), charged for every candidate's fine-tuning grid, extraction, loading and
    pooler."""
    out, _, _ = experiment
    results = read_json(out / "results.json")
    records = {r["method"]: r for r in results["records"]}
    candidates = [records["pooler@0"], records["pooler@0.5"]]

    chosen = records["pooler@chosen"]
    best = max(candidates, key=lambda r: r["val"]["accuracy"])  # max keeps the first of ties
    assert chosen["chose"] == best["method"] == results["choices"][0]["checkpoint"]
    assert (chosen["val"], chosen["dev"]) == (best["val"], best["dev"])
    assert results["choices"][0]["checkpoint_held_out"] == {
        r["method"]: r["val"]["accuracy"] for r in candidates
    }
    for cost in ("pipeline_s", "pipeline_cpu_s", "amortised_s"):
        assert chosen[cost] == pytest.approx(sum(r[cost] for r in candidates), abs=0.01)
    assert "| pooler@chosen | " in (out / "results.md").read_text()


def test_experiment_method_from_chosen_sweeps_where_held_out_train_prefers(
    glue_dir, tiny_model, tmp_path
):
    """--method-from chosen: the sweep, ensembles and curve run on the checkpoint pooler@chosen
    picked (no sweep elsewhere), reported as `<name>@chosen`, charged also for the choice: every
    candidate's pooler, the other candidates' grids, extractions and loading. On the pretrained
    encoder there is no fine-tuned model to ensemble with."""
    import runpy

    main = runpy.run_path(str(EXPERIMENT))["main"]
    options = ["--data-dir", glue_dir, "--model", tiny_model, "--out", str(tmp_path / "exp")]
    results = main([*options, *EXPERIMENT_ARGS, "--method-from", "chosen"])

    records = {r["method"]: r for r in results["records"]}
    [choices] = results["choices"]
    tag = choices["checkpoint"].split("@")[1]
    other = {"0": "0.5", "0.5": "0"}[tag]
    assert f"sweep-best@{tag}" in records and f"sweep-best@{other}" not in records
    assert (f"ensemble+ft@{tag}" in records) == (tag != "0")
    assert choices["method"] == records[f"method@{tag}"]["chose"]
    choice = records[f"pooler@{other}"]["pipeline_s"] + records[f"pooler@{tag}"]["stage_s"]
    for name in ("sweep-best", "ensemble", "method", "curve-50%"):
        chosen, there = records[f"{name}@chosen"], records[f"{name}@{tag}"]
        assert (chosen["val"], chosen["dev"]) == (there["val"], there["dev"])
        assert chosen["pipeline_s"] == pytest.approx(there["pipeline_s"] + choice, abs=0.01)
    assert records["method@chosen"]["pipeline_s"] > records["pooler@chosen"]["pipeline_s"]
    rows = [row["method"] for row in results["summary"]]
    assert "method@chosen" in rows and "sweep-best@0.5" not in rows
    assert (
        "on the checkpoint where the single pooler is best on held-out TRAIN"
        in (tmp_path / "exp" / "results.md").read_text()
    )


def test_experiment_train_sample_random_draws_across_the_file(glue_dir, tmp_path):
    """--train-sample random: N training rows drawn with a fixed seed, in file order, the same
    on every call; the first N of STS-B are all one genre, the drawn N are not. Dev is whole."""
    import runpy

    experiment = runpy.run_path(str(EXPERIMENT))
    parse_args, sliced_data = experiment["parse_args"], experiment["sliced_data"]
    options = ["--data-dir", glue_dir, "--max-train-examples", "300", "--device", "cpu"]
    source = (Path(glue_dir) / "STS-B" / "train.tsv").read_text().splitlines(keepends=True)

    def train_rows(sample: str, out: Path) -> list[str]:
        args = parse_args([*options, "--train-sample", sample])
        folder = Path(sliced_data(args, "stsb", out)) / "STS-B"
        assert (folder / "dev.tsv").read_bytes() == (Path(glue_dir) / "STS-B/dev.tsv").read_bytes()
        header, *rows = (folder / "train.tsv").read_text().splitlines(keepends=True)
        assert header == source[0]
        return rows

    first = train_rows("first", tmp_path / "first")
    drawn = train_rows("random", tmp_path / "random")
    assert first == source[1:301]
    assert len(drawn) == 300 and drawn != first
    assert drawn == [row for row in source[1:] if row in set(drawn)]  # file order
    assert drawn == train_rows("random", tmp_path / "again")
    genres = {row.split("\t")[1] for row in drawn}
    assert {row.split("\t")[1] for row in first} == {"main-captions"} and len(genres) > 1


def test_experiment_space_is_json_inline_or_in_a_file(tmp_path):
    import runpy

    parse_args = runpy.run_path(str(EXPERIMENT))["parse_args"]
    (tmp_path / "space.json").write_text('{"epochs": 2}')
    assert parse_args(["--space", str(tmp_path / "space.json")]).space == {"epochs": 2}
    assert parse_args(["--space", '{"epochs": 3}']).space == {"epochs": 3}


def test_splits_of_older_and_current_formats_train_together(tmp_path):
    """A split extracted in format 2 (large_list) beside one added later in format 6 (raw bytes):
    the same states, so they train together as splits of one format do."""
    embeddings = str(tmp_path / "emb")
    write_split(embeddings, "rte", "train", 40, format_version=2)
    write_split(embeddings, "rte", "dev", 20, seed=2)
    cfg = TrainConfig(task="rte", embeddings=embeddings, out=str(tmp_path / "run"), epochs=1)
    assert set(train_adapter(cfg, progress=False)) == {"val", "dev"}


def test_training_reads_format_1_embeddings(tmp_path):
    """Shards written before format 2 (`hidden` list<float16>, int32 offsets): see
    test_embeddings for the states they read as."""
    embeddings = str(tmp_path / "emb")
    write_split(embeddings, "rte", "train", 40, format_version=1)
    write_split(embeddings, "rte", "dev", 20, seed=2, format_version=1)
    cfg = TrainConfig(task="rte", embeddings=embeddings, out=str(tmp_path / "run"), epochs=1)
    assert set(train_adapter(cfg, progress=False)) == {"val", "dev"}


# ----------------------------------------------------------------------------------------------
# A fine-tuned encoder's embeddings: never selected on examples the encoder trained on


def extract_finetuned(checkpoint: str, glue_dir: str, out: Path, cap: int) -> str:
    """The RTE train (its first `cap` examples) and dev embeddings of `checkpoint`."""
    from bertvision.extract import ExtractConfig, extract_hidden_states

    cfg = ExtractConfig(
        task="rte", out=str(out), model=checkpoint, data_dir=glue_dir, splits=["train", "dev"],
        max_train_examples=cap, max_seq_length=64, device="cpu",
    )  # fmt: skip
    assert extract_hidden_states(cfg, progress=False).ok
    return cfg.out


@pytest.fixture(scope="module")
def finetuned(tmp_path_factory, glue_dir, tiny_model) -> dict[int, str]:
    """The tiny BERT fine-tuned on the first 40 RTE train examples (val_fraction 0.1, val_seed
    0), and its embeddings of the first 40 and of the first 60: {cap: embeddings}."""
    from test_finetune import finetuned_on_rte

    root = tmp_path_factory.mktemp("finetuned")
    checkpoint = finetuned_on_rte(root / "ckpt", tiny_model, glue_dir)
    return {
        cap: extract_finetuned(checkpoint, glue_dir, root / f"emb{cap}", cap) for cap in (40, 60)
    }


def seen_ids(read: int, val_seed: int) -> list[int]:
    """The ids of the held-out slice (val_fraction 0.1, `val_seed`) of the first `read` RTE
    train examples that the fine-tuning of the first 40 (val_seed 0) trained on."""
    fine_tuned_on = set(range(40)) - set(glue.held_out_ids(range(40), 0.1, 0).tolist())
    return sorted(set(glue.held_out_ids(range(read), 0.1, val_seed).tolist()) & fine_tuned_on)


def test_training_on_embeddings_of_other_train_examples_than_the_fine_tunings_is_refused(
    tmp_path, finetuned
):
    """Extracted from the first 60, not 40: their held-out slice is another one, and holds
    examples the encoder trained on."""
    seen = seen_ids(60, 0)
    assert seen  # 4 of the 6 held-out examples
    refuse(
        tmp_path,
        finetuned[60],
        rf"{finetuned[60]}/rte/train: its held-out slice \(--val-fraction 0.1 --val-seed 0 of "
        rf"the 60 train examples extracted\) holds 6 examples, {len(seen)} of which its encoder "
        rf"was fine-tuned on \({', '.join(f'id {i}' for i in seen)}\): fine-tuning run \w+ read "
        r"the first 40 \(--max-train-examples 40\) and held out --val-fraction 0.1 --val-seed 0;"
        r".* Extract with --max-train-examples 40, as the fine-tuning did$",
    )


def test_training_with_another_val_seed_than_the_fine_tunings_is_refused(tmp_path, finetuned):
    seen = seen_ids(40, 1)
    assert len(seen) == 4  # every held-out example
    refuse(
        tmp_path,
        finetuned[40],
        rf"holds 4 examples, 4 of which its encoder was fine-tuned on \(id {seen[0]}, .*"
        r"Select with --val-fraction 0.1 --val-seed 0, as the fine-tuning did$",
        val_seed=1,
    )
    refuse(
        tmp_path,
        finetuned[60],
        "Extract with --max-train-examples 40 and select with --val-fraction 0.1 --val-seed 0,",
        val_seed=1,
    )


def test_training_with_the_fine_tunings_settings_selects_on_what_it_held_out(tmp_path, finetuned):
    """The pipeline's case: the same 40 examples, val_fraction and val_seed."""
    cfg = config(tmp_path, finetuned[40], epochs=1)
    metrics = train_adapter(cfg, progress=False)
    assert set(metrics) == {"val", "dev"}
    selected_on = pq.read_table(tmp_path / "run/outputs/val.parquet").column("example_id")
    assert selected_on.to_pylist() == glue.held_out_ids(range(40), 0.1, 0).tolist()
    assert not set(selected_on.to_pylist()) & set(glue.finetuned_ids(40, 0.1, 0).tolist())


def test_the_cli_refuses_a_held_out_slice_the_encoder_trained_on_in_one_line(tmp_path, finetuned):
    out = tmp_path / "run"
    args = ["train", "--task", "rte", "--embeddings", finetuned[40], "--out", str(out)]
    result = CliRunner().invoke(app, [*args, "--val-seed", "1", "--device", "cpu"])
    assert result.exit_code == 2
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {finetuned[40]}/rte/train: its held")
    assert not out.exists()


def test_an_encoder_fine_tuned_on_another_task_is_not_checked(tmp_path, glue_dir, tiny_model):
    """Fine-tuned on WNLI, the encoder never saw an RTE example."""
    from test_finetune import finetuned_on_rte

    checkpoint = finetuned_on_rte(tmp_path / "ckpt", tiny_model, glue_dir, task="wnli")
    embeddings = extract_finetuned(checkpoint, glue_dir, tmp_path / "emb", 60)
    record = json.loads((Path(embeddings) / "rte/train/_manifest/run.json").read_text())
    assert record["finetuned_encoder"]["task"] == "wnli"
    metrics = train_adapter(config(tmp_path, embeddings, epochs=1, val_seed=1), progress=False)
    assert set(metrics) == {"val", "dev"}


def test_extractions_recorded_before_fine_tunings_were_described_train_unchecked(
    tmp_path, finetuned
):
    embeddings = tmp_path / "emb"
    shutil.copytree(finetuned[60], embeddings)
    url = embeddings / "rte/train/_manifest/run.json"
    record = json.loads(url.read_text())
    del record["finetuned_encoder"]
    url.write_text(json.dumps(record))
    metrics = train_adapter(config(tmp_path, str(embeddings), epochs=1), progress=False)
    assert set(metrics) == {"val", "dev"}


def test_a_garbled_description_in_the_extraction_record_is_refused_naming_it(tmp_path, finetuned):
    from bertvision.storage import FileFormatError

    embeddings = tmp_path / "emb"
    shutil.copytree(finetuned[40], embeddings)
    url = embeddings / "rte/train/_manifest/run.json"
    record = json.loads(url.read_text())
    record["finetuned_encoder"]["train_examples"] = "forty"
    url.write_text(json.dumps(record))
    refuse(
        tmp_path,
        str(embeddings),
        rf"{url}: 'finetuned_encoder' is not the description of a fine-tuned encoder "
        r"\(fields train_examples\)",
        error=FileFormatError,
    )


def test_a_full_disk_while_the_experiment_writes_its_results_leaves_them_as_they_were(
    experiment, tmp_path, monkeypatch
):
    """results.md, results.png and results.json are written together, the record last: a write
    that fails midway (a full disk) leaves all three as they were. Before, results.md was cut off
    where the disk filled, the old table lost."""
    import runpy

    from conftest import disk_fills_writing

    out, argv, _ = experiment
    copy = tmp_path / "exp"
    shutil.copytree(out, copy)
    names = ("results.md", "results.png", "results.json")
    before = {name: (copy / name).read_bytes() for name in names}
    argv = [*argv[: argv.index("--out")], "--out", str(copy), *argv[argv.index("--out") + 2 :]]
    main = runpy.run_path(str(EXPERIMENT))["main"]

    disk_fills_writing(monkeypatch, "results.md")
    with pytest.raises(OSError, match="No space left"):
        main(argv)
    monkeypatch.undo()
    assert {name: (copy / name).read_bytes() for name in names} == before
    assert sorted(p.name for p in copy.iterdir() if p.name.startswith("results")) == sorted(names)

"""Training adapters on stored embeddings: outputs, exact metrics, selection on TRAIN only,
padding invariance, resume, shared and streamed embeddings, bad input."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from typer.testing import CliRunner

from bertvision import adapters, glue, storage
from bertvision import train as training
from bertvision.cli import app
from bertvision.metrics import compute_metrics
from bertvision.predictions import read_submission
from bertvision.schema import (
    FORMAT_VERSION,
    ExtractionPlan,
    ShardRecord,
    shard_record_name,
    shard_schema,
)
from bertvision.shards import (
    ShardError,
    ShardWriter,
    committed_shards,
    hidden_arrays,
    manifest_url,
    read_shard,
    split_url,
    write_plan,
)
from bertvision.train import TrainConfig, load_embeddings, train_adapter

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
    format_version: int = FORMAT_VERSION,
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
        hidden.append(h)
    plan = ExtractionPlan(
        task=spec.name,
        split=split,
        model="synthetic",
        model_fingerprint=fingerprint,
        data_fingerprint=f"data-{seed}",
        num_examples=n,
        shard_size=shard_size,
        max_seq_length=16,
        dtype="float16",
        layers=LAYERS,
        hidden_size=hidden_size,
        regression=spec.regression,
        format_version=format_version,
    )
    folder = split_url(out, spec.name, split)
    write_plan(folder, plan)
    schema = shard_schema(regression=spec.regression)
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
                "hidden": pa.array([hidden[i].ravel() for i in rows], pa.list_(pa.float16())),
            }
        )
        writer = ShardWriter(folder, plan, index)
        if format_version == 1:  # as written before format 2: int32 offsets
            field = pa.field("hidden", pa.list_(pa.float16()), nullable=False)
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
    result = CliRunner().invoke(
        app,
        ["train", "--task", "rte", "--embeddings", embeddings, "--out", str(run)]
        + ["--epochs", "3", "--adapter-dim", "8", "--device", "cpu", "--seed", "3"],
    )
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
    assert curve["train_examples"] + curve["val_examples"] == 48 and curve["val_examples"] == 5
    assert (run / "curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    provenance = read_json(run / "config.json")
    plan = json.loads((Path(embeddings) / "rte/train/_manifest/plan.json").read_text())
    assert provenance["model_fingerprint"] == plan["model_fingerprint"]
    assert provenance["embeddings"] == embeddings
    assert provenance["train"]["seed"] == 3 and provenance["adapter"]["adapter"] == "pooler"
    assert isinstance(adapters.load_adapter(str(run / "adapter")), adapters.AdapterPooler)


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
        hidden, mask = packed.batch(np.array([shortest, *mates]), "cpu")
        assert hidden.shape[2] == packed.lengths[[shortest, *mates]].max()  # padded to longest
        predictions.append(model(hidden, mask)[0])
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


def test_a_finished_run_is_returned_as_stored_and_never_mixed(
    tmp_path, rte_embeddings, monkeypatch
):
    cfg = config(tmp_path, rte_embeddings)
    metrics = train_adapter(cfg, progress=False)
    monkeypatch.setattr(training, "_train_epoch", lambda *a: pytest.fail("trained again"))
    assert train_adapter(cfg, progress=False) == metrics

    before = {p: p.read_bytes() for p in (tmp_path / "run").rglob("*") if p.is_file()}
    with pytest.raises(ValueError, match="holds a finished run with other settings"):
        train_adapter(dataclasses.replace(cfg, lr=0.5), progress=False)
    after = {p: p.read_bytes() for p in (tmp_path / "run").rglob("*") if p.is_file()}
    assert after == before


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


def test_streamed_splits_see_every_training_example_once_per_epoch(rte_embeddings):
    data = load_embeddings("rte", rte_embeddings, device="cpu", max_resident_gb=0)
    train = data.splits["train"]
    assert train.resident is None and len(train.shard_urls) == 5
    keep = ~np.isin(train.example_ids, training.held_out_ids(train, 0.1, val_seed=0))
    seen = []
    for packed, rows, storage_rows in training.epoch_batches(
        train, keep, 8, np.random.default_rng(0), "cpu", shuffle_shards=2
    ):
        assert len(rows) <= 8
        np.testing.assert_array_equal(packed.example_ids[rows], train.example_ids[storage_rows])
        seen.extend(packed.example_ids[rows].tolist())
    assert sorted(seen) == sorted(train.example_ids[keep].tolist())


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
    embeddings = str(tmp_path / "emb")
    write_split(embeddings, "rte", "train", 40)
    refuse(tmp_path, embeddings, "no embeddings for rte/dev under")


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


# ----------------------------------------------------------------------------------------------
# The experiment script, at the smallest scale


def test_experiment_script_measures_every_method_resumes_and_needs_no_prefect(
    tmp_path, glue_dir, tiny_model
):
    import subprocess
    import sys

    script = Path(__file__).resolve().parents[1] / "scripts" / "experiment.py"
    out = tmp_path / "exp"
    argv = ["--data-dir", glue_dir, "--model", tiny_model, "--tasks", "rte", "--seeds", "1"]
    argv += ["--out", str(out), "--max-train-examples", "20", "--adapter-epochs", "1"]
    argv += ["--device", "cpu"]
    run = (
        "import runpy, sys; "
        f"sys.argv = {[str(script), *argv]!r}; "
        f"runpy.run_path({str(script)!r}, run_name='__main__'); "
        "assert 'prefect' not in sys.modules, 'the experiment imported prefect'"
    )
    subprocess.run([sys.executable, "-c", run], check=True, capture_output=True)
    results = read_json(out / "results.json")

    methods = [row["method"] for row in results["summary"]]
    assert methods == ["finetune-1", "finetune-3", "pooler", "scalarmix", "cls", "extract"]
    for row in results["summary"][:5]:
        assert set(row["dev"]) == {"accuracy"} and 0.0 <= row["dev"]["accuracy"]["mean"] <= 1.0
        assert row["pipeline_s"]["mean"] >= row["stage_s"]["mean"] > 0
    assert "| pooler | " in (out / "results.md").read_text()
    assert not (out / "runs" / "rte" / "seed-0" / "embeddings").exists()

    subprocess.run([sys.executable, "-c", run], check=True, capture_output=True)
    assert read_json(out / "results.json")["records"] == results["records"]  # nothing reran


# ----------------------------------------------------------------------------------------------
# Shard formats: int64 offsets (format 2); shards of format 1 still read


@pytest.mark.slow  # writes and reads 2**31 values: about half a minute
def test_a_shard_of_more_than_2_31_values_reads_back_for_training(tmp_path):
    """bert-large-sized rows (25 x 1024 values a token) past 2**31 values in one shard, written
    by the real ShardWriter one row group per batch as extraction does, read by the training
    reader. Zeros cost no memory until read; markers sit at each row's ends and past 2**31."""
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
        dtype="float16",
        layers=layers,
        hidden_size=hidden_size,
        regression=False,
    )
    folder = split_url(str(tmp_path), "rte", "dev")
    write_plan(folder, plan)
    far_row, far_index = divmod(2**31 + 7, per_row)  # a value beyond any int32 offset
    with ShardWriter(folder, plan, 0) as writer:
        for group in range(groups):
            rows = range(group * rows_per_group, (group + 1) * rows_per_group)
            values = np.zeros(rows_per_group * per_row, np.float16)
            for k, row in enumerate(rows):
                values[k * per_row] = row + 1  # layer 0, token 0, unit 0
                values[(k + 1) * per_row - 1] = -(row + 1)  # last layer, token and unit
                if row == far_row:
                    values[k * per_row + far_index] = 0.5
            offsets = pa.array(np.arange(rows_per_group + 1, dtype=np.int64) * per_row)
            hidden = pa.LargeListArray.from_arrays(offsets, pa.array(values))
            writer.write(
                pa.table(
                    {
                        "example_id": pa.array(rows, pa.int64()),
                        "label": pa.array([0] * rows_per_group, pa.int64()),
                        "length": pa.array([length] * rows_per_group, pa.int32()),
                        "hidden": hidden,
                    }
                )
            )
            del values, hidden
        writer.commit()

    _, urls = committed_shards(str(tmp_path), "rte", "dev")
    packed = training._read_packed(urls, plan, "cpu")
    assert packed.tokens.shape == (num_rows * length, layers, hidden_size)
    assert packed.example_ids.tolist() == list(range(num_rows))
    assert packed.starts.tolist() == [row * length for row in range(num_rows)]
    tokens = packed.tokens
    for row in (0, 1, far_row, num_rows - 1):
        start = row * length
        assert tokens[start, 0, 0].item() == row + 1
        assert tokens[start + length - 1, layers - 1, hidden_size - 1].item() == -(row + 1)
        assert tokens[start + 1, 0, 0].item() == 0 and tokens[start, 1, 0].item() == 0
    layer, rest = divmod(far_index, length * hidden_size)
    token, unit = divmod(rest, hidden_size)
    assert tokens[far_row * length + token, layer, unit].item() == 0.5


def test_a_format_1_shard_still_reads(tmp_path):
    """Shards written before format 2 (`hidden` list<float16>, int32 offsets) read as before:
    the same hidden states as format 2, by the shard reader and the training reader."""
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
    cfg = TrainConfig(task="rte", embeddings=old, out=str(tmp_path / "run"), epochs=1)
    assert set(train_adapter(cfg, progress=False)) == {"val", "dev"}


def test_a_shard_of_an_unknown_format_is_refused(tmp_path):
    write_split(str(tmp_path), "rte", "train", 40, format_version=3)
    write_split(str(tmp_path), "rte", "dev", 20, format_version=3)
    with pytest.raises(ShardError, match="format_version 3; this version of BERTVision reads 1, 2"):
        load_embeddings("rte", str(tmp_path), device="cpu")

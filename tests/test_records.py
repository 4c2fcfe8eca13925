"""Run records: every stage records its run in one shape (kind, key, settings, inputs, code,
timings); shards and plans carry the code version, which no content key includes."""

from __future__ import annotations

import dataclasses
import shutil
import subprocess
from datetime import datetime
from importlib import metadata
from pathlib import Path

import pyarrow as pa
import pytest

import bertvision
from bertvision import ensemble, finetune, records, shards, train
from bertvision import sweep as sweeping
from bertvision.extract import ExtractConfig, extract_hidden_states, finish_split
from bertvision.schema import RUN_FILE, ExtractionPlan, ShardMeta, shard_schema
from bertvision.shards import ShardWriter, load_plan, manifest_url, read_shard, split_url

INSTALLED = metadata.version("bertvision")
ANOTHER_COMMIT = ("9.9.9", "f" * 40, True)  # what records._code gives in another checkout


@pytest.fixture(scope="module")
def stages(tmp_path_factory, tiny_model, glue_dir) -> dict[str, tuple[Path, object, str]]:
    """Every stage run once on WNLI with the tiny BERT: kind -> (its run record's path, the
    config it ran with, the content key it must be keyed on)."""
    root = tmp_path_factory.mktemp("stages")
    extract_cfg = ExtractConfig(
        task="wnli",
        out=str(root / "emb"),
        model=tiny_model,
        data_dir=glue_dir,
        max_seq_length=64,
        shard_size=300,
        device="cpu",
    )
    assert extract_hidden_states(extract_cfg, progress=False).ok
    finetune_cfg = finetune.FinetuneConfig(
        task="wnli",
        out=str(root / "finetune"),
        model=tiny_model,
        data_dir=glue_dir,
        epochs=1,
        batch_size=8,
        max_train_examples=48,
        predict_test=False,
        device="cpu",
    )
    finetune.finetune_encoder(finetune_cfg, progress=False)
    train_cfg = train.TrainConfig(
        task="wnli", embeddings=extract_cfg.out, out=str(root / "run"), epochs=1, device="cpu"
    )
    train.train_adapter(train_cfg, progress=False)
    sweep_cfg = sweeping.SweepConfig(
        task="wnli",
        embeddings=extract_cfg.out,
        out=str(root / "sweep"),
        trials=2,
        startup_trials=1,
        space={"lr": {"loguniform": [1e-3, 1e-2]}, "epochs": 1},
        device="cpu",
    )
    sweeping.run_sweep(sweep_cfg, progress=False)
    trial = sweeping.load_trials(sweep_cfg.out)[0]
    spec = sweeping.TrialSpec(trial.trial, trial.params, trial.hyperopt_vals)
    trial_cfg = sweeping.trial_train_config(sweep_cfg, spec)
    ensemble_cfg = ensemble.EnsembleConfig(
        task="wnli", runs=sweep_cfg.out, out=str(root / "ens"), top_k=2
    )
    ensemble.build_ensemble(ensemble_cfg)
    extraction = Path(split_url(extract_cfg.out, "wnli", "train"))
    return {
        "finetune": (
            root / "finetune/_commit.json",
            finetune_cfg,
            finetune.content_key(finetune_cfg),
        ),
        "extract": (
            extraction / "_manifest" / RUN_FILE,
            extract_cfg,
            load_plan(str(extraction)).key,
        ),
        "train": (root / "run/_commit.json", train_cfg, train.content_key(train_cfg)),
        "trial": (Path(trial_cfg.out) / "_commit.json", trial_cfg, train.content_key(trial_cfg)),
        "sweep": (root / "sweep/_commit.json", sweep_cfg, sweeping.content_key(sweep_cfg)),
        "ensemble": (root / "ens/_commit.json", ensemble_cfg, ensemble.content_key(ensemble_cfg)),
    }


INPUTS = {
    "finetune": {"model", "data/train", "data/dev"},
    "extract": {"model", "data/train"},
    "train": {"embeddings/train", "embeddings/dev"},
    "trial": {"embeddings/train", "embeddings/dev", "sweep"},
    "sweep": {"embeddings/train", "embeddings/dev"},
    "ensemble": {"sweep", "trial-0000", "trial-0001"},
}


@pytest.mark.parametrize("kind", records.KINDS)
def test_every_stage_records_its_run_in_one_shape(stages, kind):
    path, cfg, key = stages[kind]
    record = records.read_record(str(path))
    assert record.kind == kind
    assert record.key == key  # the run's own content key: what a rerun compares
    assert record.settings == dataclasses.asdict(cfg)
    assert set(record.inputs) == INPUTS[kind]
    for read in record.inputs.values():
        assert set(read) == {"url", "key"} and read["url"] and len(read["key"]) == 16
    assert record.code == records.code_info()
    assert record.code["version"] == INSTALLED == bertvision.__version__
    started, finished = (
        datetime.fromisoformat(record.timings[t]) for t in ("started_at", "finished_at")
    )
    assert started <= finished and record.timings["seconds"] >= 0
    assert record.files and record.worker and record.committed_at


def test_records_name_their_inputs_by_content(stages):
    """A trial names its sweep, an ensemble its member trials, training the extraction."""
    extraction = records.read_record(str(stages["extract"][0]))
    trained = records.read_record(str(stages["train"][0]))
    trial = records.read_record(str(stages["trial"][0]))
    sweep = records.read_record(str(stages["sweep"][0]))
    ens = records.read_record(str(stages["ensemble"][0]))
    assert trained.inputs["embeddings/train"]["key"] == extraction.key
    assert trial.inputs["sweep"] == {"url": stages["sweep"][1].out, "key": sweep.key}
    member = records.read_record(str(Path(ens.inputs["trial-0001"]["url"]) / "_commit.json"))
    assert (member.kind, ens.inputs["trial-0001"]["key"]) == ("trial", member.key)
    tuned = records.read_record(str(stages["finetune"][0]))
    assert tuned.inputs["data/dev"]["key"] != tuned.inputs["data/train"]["key"]
    assert extraction.inputs["model"]["key"] == tuned.inputs["model"]["key"]  # the same encoder
    assert extraction.timings["shard_seconds"] > 0 and trained.timings["train_seconds"] > 0


def test_shards_and_plans_carry_the_code_version(stages):
    folder = split_url(stages["extract"][1].out, "wnli", "dev")
    meta, _ = read_shard(f"{folder}/shard-00000.parquet")
    code = records.code_info()
    assert (meta.code_version, meta.git_commit) == (INSTALLED, code["git_commit"])
    plan = load_plan(folder)
    assert (plan.code_version, plan.git_commit) == (INSTALLED, code["git_commit"])


def test_the_code_version_enters_no_extraction_key(stages, monkeypatch):
    """An extraction planned by other code has the same key: another commit resumes it."""
    plan = load_plan(split_url(stages["extract"][1].out, "wnli", "dev"))
    other = dataclasses.replace(plan, code_version="9.9.9", git_commit="f" * 40)
    assert (other.key, other.shard_key(0)) == (plan.key, plan.shard_key(0)) and other == plan

    monkeypatch.setattr(records, "_code", lambda: ANOTHER_COMMIT)
    summary = extract_hidden_states(stages["extract"][1], progress=False)
    assert summary.ok and summary.committed == {"wnli/train": [], "wnli/dev": []}
    assert load_plan(split_url(stages["extract"][1].out, "wnli", "dev")).code_version == INSTALLED


def test_an_older_shard_without_code_metadata_still_reads(tmp_path, monkeypatch):
    plan = ExtractionPlan(
        "rte", "dev", "m", "f" * 16, "d" * 16, 2, 2, 8, "float16", 1, 2, False, format_version=2
    )
    folder = str(tmp_path / "rte" / "dev")
    shards.write_plan(folder, plan)
    written = ShardMeta.to_metadata
    older = {f"bertvision.{name}".encode() for name in ("code_version", "git_commit")}
    monkeypatch.setattr(
        ShardMeta,
        "to_metadata",
        lambda meta: {k: v for k, v in written(meta).items() if k not in older},
    )
    table = pa.table(
        {
            "example_id": pa.array([0, 1], pa.int64()),
            "label": pa.array([0, 1], pa.int64()),
            "length": pa.array([1, 1], pa.int32()),
            "hidden": pa.array([[0.5, 1.5], [2.0, 3.0]], pa.large_list(pa.float16())),
        },
        schema=shard_schema(regression=False, format_version=2),
    )
    with ShardWriter(folder, plan, 0) as writer:
        writer.write(table)
        writer.commit()
    monkeypatch.undo()
    meta, read = read_shard(f"{folder}/shard-00000.parquet")
    assert (meta.code_version, meta.git_commit, meta.extraction_key) == ("", "", plan.key)
    assert read.column("example_id").to_pylist() == [0, 1]


def test_an_incomplete_split_gets_no_run_record(stages, tmp_path):
    cfg = dataclasses.replace(stages["extract"][1], out=str(tmp_path / "emb"))
    shutil.copytree(Path(stages["extract"][1].out) / "wnli", tmp_path / "emb" / "wnli")
    folder = split_url(cfg.out, "wnli", "train")
    Path(manifest_url(folder, RUN_FILE)).unlink()
    Path(manifest_url(folder, "shard-00001.json")).unlink()
    plan = load_plan(folder)
    assert finish_split(cfg, plan, list(range(plan.num_shards))) == [
        f"{manifest_url(folder, 'shard-00001.json')} (commit record missing)"
    ]
    assert not Path(manifest_url(folder, RUN_FILE)).exists()


def test_code_info_names_the_checkout_and_never_fails(monkeypatch):
    source = Path(bertvision.__file__).resolve().parent.parent
    head = subprocess.run(
        ["git", "-C", str(source), "rev-parse", "HEAD"], capture_output=True, text=True
    )
    if head.returncode != 0:
        pytest.skip("bertvision is not imported from a git checkout")
    code = records.code_info()
    assert code["version"] == INSTALLED and code["git_commit"] == head.stdout.strip()

    def no_git(*args, **kwargs):
        raise FileNotFoundError("git")

    records._code.cache_clear()
    monkeypatch.setattr(subprocess, "run", no_git)
    try:
        assert records.code_info() == {"version": INSTALLED, "git_commit": "", "dirty": False}
    finally:
        records._code.cache_clear()

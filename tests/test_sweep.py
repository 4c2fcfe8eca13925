"""Sweeps: search spaces, TPE suggestions from stored trials, resume after an interruption or a
kill -9, parallel batches, and selection that never reads a dev label."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from conftest import tree_state
from typer.testing import CliRunner

from bertvision import glue, storage
from bertvision import sweep as sweeping
from bertvision.cli import app
from bertvision.ensemble import EnsembleConfig, build_ensemble
from bertvision.metrics import compute_metrics
from bertvision.predictions import read_outputs, read_submission
from bertvision.schema import ExtractionPlan, shard_schema
from bertvision.shards import ShardError, ShardWriter, split_url, write_plan
from bertvision.sweep import SweepConfig, TrialRecord, load_trials, run_sweep, suggest_trials

LAYERS, HIDDEN = 3, 8
# Small and quick: one or two epochs on ~100 examples; lr wide enough for trials to differ.
QUICK_SPACE = {
    "lr": {"loguniform": [1e-3, 3e-2]},
    "adapter_dim": {"choice": [2, 4]},
    "batch_size": {"choice": [16, 32]},
    "epochs": {"choice": [1, 2]},
}


def write_split(out: str, split: str, n: int, seed: int, labels: np.ndarray | None = None) -> None:
    """Synthetic RTE embeddings of `split` via the real ShardWriter: layer 1 carries the label.
    `labels` replaces the stored labels while the hidden states stay those of the truth."""
    task = glue.get_task("rte")
    rng = np.random.default_rng(seed)
    truth = rng.integers(0, 2, n)
    stored = None if task.is_test(split) else (truth if labels is None else labels)
    lengths = rng.integers(2, 9, n)
    hidden = []
    for i in range(n):
        h = rng.normal(size=(LAYERS, lengths[i], HIDDEN)).astype(np.float16)
        h[1, :, truth[i]] += np.float16(0.7)  # a weak signal: trials reach different metrics
        hidden.append(h.ravel())
    plan = ExtractionPlan(
        task="rte",
        split=split,
        model="synthetic",
        model_fingerprint="f" * 16,
        data_fingerprint=hashlib.sha256(repr((split, seed, stored)).encode()).hexdigest()[:16],
        num_examples=n,
        shard_size=40,
        max_seq_length=8,
        dtype="float16",
        layers=LAYERS,
        hidden_size=HIDDEN,
        regression=False,
    )
    folder = split_url(out, "rte", split)
    write_plan(folder, plan)
    label_type = shard_schema(regression=False).field("label").type
    for index in range(plan.num_shards):
        rows = range(*plan.shard_range(index))
        table = pa.table(
            {
                "example_id": pa.array(list(rows), pa.int64()),
                "label": pa.array(
                    [None if stored is None else int(stored[i]) for i in rows], label_type
                ),
                "length": pa.array([int(lengths[i]) for i in rows], pa.int32()),
                "hidden": pa.array([hidden[i].tobytes() for i in rows], pa.large_binary()),
            }
        )
        with ShardWriter(folder, plan, index) as writer:
            writer.write(table)
            writer.commit()


def synthetic_embeddings(out: str, dev_labels: np.ndarray | None = None) -> str:
    write_split(out, "train", 120, seed=1)
    write_split(out, "dev", 40, seed=2, labels=dev_labels)
    write_split(out, "test", 24, seed=3)
    return out


@pytest.fixture(scope="module")
def embeddings(tmp_path_factory) -> str:
    return synthetic_embeddings(str(tmp_path_factory.mktemp("emb")))


def quick(embeddings: str, out: str | Path, **overrides) -> SweepConfig:
    settings = {
        "trials": 6,
        "startup_trials": 3,
        "space": QUICK_SPACE,
        "device": "cpu",
        **overrides,
    }
    return SweepConfig(task="rte", embeddings=embeddings, out=str(out), **settings)


def lines(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "trials.jsonl").read_text().splitlines()]


# ----------------------------------------------------------------------------------------------
# Search spaces and suggestions (no training)


def test_space_file_overrides_the_adapters_default_space(tmp_path):
    yaml_file = tmp_path / "space.yaml"
    yaml_file.write_text("epochs: 3\nlr:\n  loguniform: [0.001, 0.01]\n")
    json_file = tmp_path / "space.json"
    json_file.write_text(json.dumps({"dropout": {"uniform": [0.0, 0.2]}}))

    space = SweepConfig(
        task="rte", embeddings="e", out="o", space=sweeping.load_space(str(yaml_file))
    ).resolved_space()
    assert space["epochs"] == 3 and space["lr"] == {"loguniform": [0.001, 0.01]}
    assert space["adapter_dim"] == sweeping.ADAPTER_SPACES["pooler"]["adapter_dim"]
    assert sweeping.load_space(str(json_file)) == {"dropout": {"uniform": [0.0, 0.2]}}
    assert (
        "adapter_dim"
        not in SweepConfig(task="rte", embeddings="e", out="o", adapter="cls").resolved_space()
    )


@pytest.mark.parametrize(
    "entry, message",
    [
        ({"lr": {"lognormal": [0, 1]}}, "must be a constant or one of"),
        ({"learning_rate": 0.1}, "not training options"),
        ({"out": "elsewhere"}, "sweep's own settings"),
        ({"max_resident_gb": 0}, "sweep's own settings"),
        ({"lr": {"loguniform": [0.0, 1e-2]}}, "low > 0"),
        ({"dropout": {"uniform": [0.5, 0.1]}}, "low < high"),
        ({"epochs": {"quniform": [1, 5]}}, "needs 3 numbers"),
        ({"batch_size": {"choice": []}}, "needs a list"),
        ({"lr": -1}, "entry lr: -1: must be > 0"),
        ({"dropout": {"uniform": [0.1, 2.0]}}, "entry dropout: 2.0: "),
        ({"token_pool": {"choice": ["cls", "max"]}}, "entry token_pool: 'max': "),
    ],
)
def test_bad_space_entries_are_refused(entry, message):
    with pytest.raises(ValueError, match=message):
        SweepConfig(task="rte", embeddings="e", out="o", space=entry)


def test_decoding_turns_hyperopt_values_into_parameters():
    space = {
        "batch_size": {"choice": [16, 32]},
        "epochs": {"quniform": [1, 9, 2]},
        "seed": {"randint": [0, 10]},
        "lr": {"loguniform": [1e-4, 1e-2]},
        "dropout": 0.1,
    }
    vals = {"batch_size": 1, "epochs": 5.0, "seed": 7, "lr": 0.001}
    assert sweeping.decode(space, vals) == {
        "batch_size": 32,
        "epochs": 5,
        "seed": 7,
        "lr": 0.001,
        "dropout": 0.1,
    }


def fake_finish(cfg: SweepConfig, specs: list[sweeping.TrialSpec]) -> None:
    """Commit trial records as if trained: the objective peaks at lr = 1e-3."""
    for spec in specs:
        accuracy = 1.0 - abs(math.log10(spec.params["lr"]) + 3.0)
        record = TrialRecord(
            trial=spec.trial,
            params=spec.params,
            val={"accuracy": accuracy},
            dev={"accuracy": 0.5},
            status="ok",
            run=f"trials/{spec.trial:04d}",
            seconds=0.0,
            hyperopt_vals=spec.hyperopt_vals,
            finished_at="now",
        )
        url = storage.join(sweeping.trial_url(cfg.out, spec.trial), sweeping.TRIAL_RECORD)
        storage.write_text_atomic(url, record.to_json())


def test_suggestions_come_in_batches_from_the_trials_before_and_are_reproducible():
    cfg = SweepConfig(
        task="rte", embeddings="e", out="memory://sweep-suggest", trials=9, parallel=3
    )
    first = suggest_trials(cfg)
    assert [s.trial for s in first] == [0, 1, 2]
    assert suggest_trials(cfg) == first  # same history, same draws
    assert len({s.params["lr"] for s in first}) == 3  # one batch: three different points

    fake_finish(cfg, first[:2])  # trial 2 was interrupted: the same point again, alone
    assert suggest_trials(cfg) == first[2:]
    fake_finish(cfg, first[2:])
    assert [s.trial for s in suggest_trials(cfg)] == [3, 4, 5]
    while batch := suggest_trials(cfg):
        fake_finish(cfg, batch)
    assert [r.trial for r in load_trials(cfg.out)] == list(range(9))
    assert suggest_trials(cfg) == []  # finished: nothing left to suggest

    for spec in first:
        assert 1e-4 <= spec.params["lr"] <= 1e-2
        assert spec.params["adapter_dim"] in (8, 16, 32, 64)
        assert isinstance(spec.params["seed"], int)


def _suggested_points(cfg: SweepConfig, interrupt_after: int | None = None) -> list[dict]:
    """Every trial's parameters as a sweep suggests them, each batch finished whole, or the
    batch holding trial `interrupt_after` killed once just after that trial was recorded."""
    while batch := suggest_trials(cfg):
        if interrupt_after in (spec.trial for spec in batch[:-1]):
            batch = [spec for spec in batch if spec.trial <= interrupt_after]
            interrupt_after = None
        fake_finish(cfg, batch)
    return [record.params for record in load_trials(cfg.out)]


@pytest.mark.parametrize("parallel", [2, 3])
def test_a_sweep_killed_within_a_batch_suggests_what_the_uninterrupted_sweep_did(parallel):
    """Threads and trials trained together finish (and record) a batch one trial at a time;
    before, the rest of the batch was suggested again from the longer history."""
    settings = {"task": "rte", "embeddings": "e", "trials": 8, "startup_trials": 2}
    straight = SweepConfig(**settings, out=f"memory://straight-{parallel}", parallel=parallel)
    killed = SweepConfig(**settings, out=f"memory://killed-{parallel}", parallel=parallel)
    assert _suggested_points(killed, interrupt_after=parallel) == _suggested_points(straight)


def test_parallel_decides_the_batches_so_it_is_part_of_the_sweep():
    one, two = (
        SweepConfig(task="rte", embeddings="e", out="o", parallel=k).key({"train": "x"})
        for k in (1, 2)
    )
    assert one != two


# ----------------------------------------------------------------------------------------------
# Sweeps that train


def test_sweep_trains_every_trial_and_lists_it(embeddings, tmp_path):
    out = tmp_path / "sweep"
    summary = run_sweep(quick(embeddings, out, parallel=2), progress=False)

    assert (summary.done_before, summary.ran, summary.failed) == (0, 6, 0)
    listed = lines(out)
    assert [t["trial"] for t in listed] == list(range(6))
    for trial in listed:
        assert {"trial", "params", "val", "dev"} <= set(trial)
        assert set(trial["val"]) == set(trial["dev"]) == {"accuracy"}
        assert trial["params"]["adapter_dim"] in (2, 4) and trial["params"]["epochs"] in (1, 2)
        run = out / "trials" / f"{trial['trial']:04d}"
        metrics = json.loads((run / "metrics.json").read_text())
        assert metrics["val"] == trial["val"] and metrics["dev"] == trial["dev"]
        trained = json.loads((run / "config.json").read_text())["train"]
        assert trained["lr"] == trial["params"]["lr"] and trained["seed"] == trial["params"]["seed"]
        assert trained["val_seed"] == 0  # one held-out slice for every trial
    assert summary.best.val["accuracy"] == max(t["val"]["accuracy"] for t in listed)
    plan = json.loads((out / "sweep.json").read_text())
    assert plan["metric"] == "accuracy" and plan["space"]["epochs"] == {"choice": [1, 2]}


def test_resume_runs_only_the_remaining_trials_and_matches_an_uninterrupted_sweep(
    embeddings, tmp_path, monkeypatch
):
    from bertvision import train

    trained = []
    original = train.train_adapter

    def counting(cfg, **options):
        trained.append(cfg.out)
        return original(cfg, **options)

    monkeypatch.setattr(train, "train_adapter", counting)
    resumed = tmp_path / "resumed"
    run_sweep(quick(embeddings, resumed, trials=3), progress=False)
    before = lines(resumed)
    assert len(trained) == 3

    summary = run_sweep(quick(embeddings, resumed, trials=6), progress=False)
    assert (summary.done_before, summary.ran) == (3, 3)
    assert [Path(url).name for url in trained[3:]] == ["0003", "0004", "0005"]
    assert lines(resumed)[:3] == before  # finished trials are kept as they were

    assert run_sweep(quick(embeddings, resumed, trials=6), progress=False).ran == 0
    assert len(trained) == 6  # a finished sweep is not rerun

    straight = tmp_path / "straight"
    run_sweep(quick(embeddings, straight, trials=6), progress=False)
    strip = lambda ts: [(t["trial"], t["params"], t["val"], t["dev"]) for t in ts]  # noqa: E731
    assert strip(lines(resumed)) == strip(lines(straight))


def test_a_finished_sweep_run_again_writes_nothing(embeddings, tmp_path):
    out = tmp_path / "sweep"
    cfg = quick(embeddings, out, trials=2)
    first = run_sweep(cfg, progress=False)
    before = tree_state(out)
    time.sleep(0.01)  # a write now would show in a modification time

    again = run_sweep(cfg, progress=False)
    assert (again.done_before, again.ran, again.failed) == (2, 0, first.failed)
    assert again.best == first.best
    assert tree_state(out) == before  # no trials.jsonl, no run record, no lease

    args = ["sweep", "--task", "rte", "--embeddings", embeddings, "--out", str(out)]
    args += ["--trials", "2", "--startup-trials", "3", "--space", json.dumps(QUICK_SPACE)]
    result = CliRunner().invoke(app, [*args, "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert "2 of 2 trials finished (0 now, 2 before, " in result.stdout
    assert tree_state(out) == before

    # settings outside the sweep's key (fewer trials wanted, trained together or not) change
    # nothing; another --parallel is another search (its batches are other points): refused
    assert run_sweep(quick(embeddings, out, trials=1, together=False), progress=False).ran == 0
    assert tree_state(out) == before
    files = {name: (out / name).read_bytes() for name in ("sweep.json", "trials.jsonl")}
    with pytest.raises(ValueError, match=r"holds another sweep \(task rte, adapter pooler, para"):
        run_sweep(quick(embeddings, out, trials=2, parallel=2), progress=False)
    assert {name: (out / name).read_bytes() for name in files} == files


def test_a_finished_trial_whose_run_lost_files_is_trained_again_with_its_parameters(
    embeddings, tmp_path
):
    out = tmp_path / "sweep"
    cfg = quick(embeddings, out, trials=4, parallel=2)
    run_sweep(cfg, progress=False)
    before = lines(out)
    weights = out / "trials" / "0002" / "adapter" / "adapter.safetensors"
    stored = weights.read_bytes()
    weights.unlink()

    assert sweeping.finished_sweep(cfg) is None  # no longer reported finished by reading
    with pytest.warns(UserWarning, match=r"trial 2's run lacks 1 of its files \(adapter/adapt"):
        summary = run_sweep(cfg, progress=False)
    assert (summary.done_before, summary.ran) == (3, 1)
    assert weights.read_bytes() == stored  # the same point, trained the same way
    after = lines(out)
    assert [t["params"] for t in after] == [t["params"] for t in before]
    assert [t["val"] for t in after] == [t["val"] for t in before]


def test_a_sweep_trains_on_the_embeddings_stored_now_not_on_an_earlier_copy_at_that_url(
    tmp_path,
):
    """One process keeps the sweep's embeddings loaded for its trials: re-extracted at the same
    URL, they are loaded again (a fresh process's trials are the reference)."""
    emb = str(tmp_path / "emb")
    write_split(emb, "train", 120, seed=1)
    write_split(emb, "dev", 40, seed=2)
    run_sweep(quick(emb, tmp_path / "first", trials=2), progress=False)
    shutil.rmtree(emb)
    write_split(emb, "train", 120, seed=10)
    write_split(emb, "dev", 40, seed=11)
    again = quick(emb, tmp_path / "again", trials=2)
    run_sweep(again, progress=False)

    sweeping._embeddings.cache_clear()  # as a fresh process starts
    fresh = quick(emb, tmp_path / "fresh", trials=2)
    run_sweep(fresh, progress=False)
    assert [(t["val"], t["dev"]) for t in lines(tmp_path / "again")] == [
        (t["val"], t["dev"]) for t in lines(tmp_path / "fresh")
    ]


def test_a_rerun_writes_the_sweeps_records_again_where_they_lag_its_trials(embeddings, tmp_path):
    """A kill after a trial's commit and before the sweep recorded it leaves trials.jsonl and
    the run record behind the trials: the next run writes them, and only them."""
    out = tmp_path / "sweep"
    cfg = quick(embeddings, out, trials=2)
    run_sweep(cfg, progress=False)
    listed = (out / "trials.jsonl").read_text()
    record = json.loads((out / "_commit.json").read_text())
    (out / "trials.jsonl").write_text(listed.splitlines(keepends=True)[0])  # trial 1 unlisted
    (out / "_commit.json").unlink()

    assert run_sweep(cfg, progress=False).ran == 0
    assert (out / "trials.jsonl").read_text() == listed
    rewritten = json.loads((out / "_commit.json").read_text())
    same = ("kind", "key", "settings", "inputs", "timings", "files")
    assert {k: rewritten[k] for k in same} == {k: record[k] for k in same}


def test_a_folder_holding_another_sweep_is_refused(embeddings, tmp_path):
    out = tmp_path / "sweep"
    run_sweep(quick(embeddings, out, trials=1), progress=False)
    with pytest.raises(ValueError, match="holds another sweep"):
        run_sweep(quick(embeddings, out, trials=2, adapter="cls"), progress=False)
    with pytest.raises(ValueError, match="holds another sweep"):
        run_sweep(quick(embeddings, out, trials=2, seed=1), progress=False)
    relabelled = synthetic_embeddings(str(tmp_path / "emb2"), dev_labels=np.zeros(40, int))
    with pytest.raises(ValueError, match="holds another sweep"):
        run_sweep(quick(relabelled, out, trials=2), progress=False)
    assert len(lines(out)) == 1


def test_missing_embeddings_fail_before_anything_is_written(tmp_path):
    out = tmp_path / "sweep"
    with pytest.raises(ValueError, match="run extract first"):
        run_sweep(quick(str(tmp_path / "nowhere"), out), progress=False)
    assert not out.exists()


def test_only_tasks_with_complete_train_and_dev_embeddings_are_swept(embeddings, tmp_path):
    assert sweeping.extracted_tasks(embeddings) == ["rte"]
    partial = str(tmp_path / "partial")
    write_split(partial, "train", 20, seed=1)  # dev not extracted (yet)
    assert sweeping.extracted_tasks(partial) == []
    assert sweeping.extracted_tasks(str(tmp_path / "nowhere")) == []


def test_kill_9_mid_sweep_then_rerun_runs_only_the_rest(embeddings, tmp_path):
    out = tmp_path / "sweep"
    space = tmp_path / "space.json"
    space.write_text(json.dumps({**QUICK_SPACE, "epochs": 2}))
    command = [
        sys.executable, "-m", "bertvision.cli", "sweep", "--task", "rte",
        "--embeddings", embeddings, "--out", str(out), "--trials", "6",
        "--space", str(space), "--startup-trials", "3", "--device", "cpu",
    ]  # fmt: skip
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    process = subprocess.Popen(command, env=env, start_new_session=True,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    record = out / "trials" / "0002" / "trial.json"
    deadline = time.monotonic() + 240
    while not record.exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    killed = {r.trial: r for r in load_trials(str(out))}
    assert 3 <= len(killed) < 6, "the sweep must be killed part-way"

    rerun = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stderr
    assert f"({6 - len(killed)} now, {len(killed)} before, 0 failed)" in rerun.stdout
    after = {r.trial: r for r in load_trials(str(out))}
    assert sorted(after) == list(range(6))
    assert all(after[n] == killed[n] for n in killed)  # never rerun: same record, same time
    assert [t["trial"] for t in lines(out)] == list(range(6))
    leftovers = [p for p in (out / "trials").iterdir() if not (p / "trial.json").exists()]
    assert leftovers == []


def test_sigterm_stops_a_sweep_mid_trial_and_lets_go_of_its_folder(
    embeddings, tmp_path, monkeypatch
):
    """One trial at a time runs in the command's own thread, so SIGTERM (console.Terminated)
    stops it where it is, not after it finishes (a thread cannot be interrupted), and the lease
    is let go."""
    from bertvision.console import Terminated, terminated_as_exit

    went_on = []

    def stopped_trial(cfg, spec, data=None):
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.5)
        went_on.append(spec.trial)

    monkeypatch.setattr(sweeping, "run_trial", stopped_trial)
    cfg = quick(embeddings, tmp_path / "sweep", parallel=1)
    with pytest.raises(Terminated), terminated_as_exit():
        run_sweep(cfg, progress=False)
    time.sleep(1)  # a trial on another thread would have gone on meanwhile
    assert went_on == []
    assert not (tmp_path / "sweep" / "_lease.json").exists()


def test_selection_never_reads_dev_labels(tmp_path):
    """Flip every dev label: the same trials, parameters and val metrics, the same ensemble
    members; only the dev metrics change."""
    flipped = 1 - np.random.default_rng(2).integers(0, 2, 40)  # the truth of write_split(seed=2)
    honest = synthetic_embeddings(str(tmp_path / "emb-honest"))
    lying = synthetic_embeddings(str(tmp_path / "emb-flipped"), dev_labels=flipped)
    results = {}
    for name, emb in (("honest", honest), ("flipped", lying)):
        out = tmp_path / f"sweep-{name}"
        run_sweep(quick(emb, out), progress=False)
        ens = build_ensemble(
            EnsembleConfig(task="rte", runs=str(out), out=str(tmp_path / f"ens-{name}"), top_k=3)
        )
        results[name] = (lines(out), ens)

    (honest_trials, honest_ens), (flipped_trials, flipped_ens) = (
        results["honest"],
        results["flipped"],
    )
    assert [(t["params"], t["val"]) for t in honest_trials] == [
        (t["params"], t["val"]) for t in flipped_trials
    ]
    assert [m["trial"] for m in honest_ens["members"]] == [
        m["trial"] for m in flipped_ens["members"]
    ]
    for a, b in zip(honest_trials, flipped_trials, strict=True):  # dev really was different
        assert a["dev"]["accuracy"] == pytest.approx(1.0 - b["dev"]["accuracy"])
    assert honest_ens["ensemble"]["accuracy"] == pytest.approx(
        1.0 - flipped_ens["ensemble"]["accuracy"]
    )


def test_ensemble_of_a_sweep_is_recomputable_from_its_prediction_files(embeddings, tmp_path):
    out = tmp_path / "sweep"
    run_sweep(quick(embeddings, out, trials=4), progress=False)
    ens = tmp_path / "ens"
    result = build_ensemble(EnsembleConfig(task="rte", runs=str(out), out=str(ens), top_k=3))

    ids, labels, _ = read_outputs(str(ens), "dev")
    submitted = read_submission(str(ens / "dev_predictions.tsv"), glue.get_task("rte"))
    assert sorted(submitted) == ids.tolist()
    recomputed = compute_metrics("rte", [submitted[i] for i in ids], labels)
    assert recomputed == result["ensemble"]
    test_rows = (ens / "test_predictions.tsv").read_text().splitlines()
    assert test_rows[0] == "index\tprediction" and len(test_rows) == 1 + 24


# ----------------------------------------------------------------------------------------------
# The Prefect flows


def test_sweep_flow_runs_trials_two_at_a_time_on_a_process_pool_then_ensembles(
    prefect_harness, embeddings, tmp_path
):
    from bertvision_flows.ensemble import ensemble
    from bertvision_flows.sweep import sweep

    from bertvision.config import EnsembleConfig

    out = tmp_path / "runs"
    settings = dict(
        embeddings=embeddings, out=str(out), trials=4, parallel=2, space=QUICK_SPACE, together=False
    )
    cfg = SweepConfig(**settings, startup_trials=2, device="cpu")
    result = sweep(cfg, all_tasks=True)

    assert list(result) == ["rte"]  # found by its embeddings
    assert (result["rte"]["finished"], result["rte"]["ran"]) == (4, 4)
    records = load_trials(str(out / "rte" / "sweep"))
    workers = {r.worker for r in records}
    assert len(workers) == 2, workers  # two pool processes, neither of them this one
    assert not any(w.endswith(f":{os.getpid()}") for w in workers)
    best = max(records, key=lambda r: (r.val["accuracy"], -r.trial))
    assert result["rte"]["best"]["trial"] == best.trial

    one = SweepConfig(**(settings | {"out": str(out / "rte" / "sweep")}), task="rte", device="cpu")
    stored = tree_state(one.out)
    assert sweep(dataclasses.replace(one, startup_trials=2))["rte"]["ran"] == 0  # finished
    assert tree_state(one.out) == stored  # and only read: nothing written

    ensembled = ensemble(
        EnsembleConfig(task="rte", runs=one.out, out=str(out / "rte" / "ensemble"), top_k=3)
    )
    assert len(ensembled["members"]) == 3
    assert (out / "rte" / "ensemble" / "dev_predictions.tsv").exists()


def test_the_sweep_flow_trains_each_batch_together_in_one_task_run_as_the_core_sweep_does(
    prefect_harness, embeddings, tmp_path
):
    from bertvision_flows.sweep import sweep
    from bertvision_tasks.names import where
    from prefect.client.orchestration import get_client

    core, flow = (quick(embeddings, tmp_path / name, trials=4, parallel=2) for name in "cf")
    run_sweep(core, progress=False)
    result = sweep(flow)

    assert (result["rte"]["finished"], result["rte"]["ran"]) == (4, 4)
    strip = lambda r: (r.trial, r.params, r.val, r.dev, r.status, r.key)  # noqa: E731
    assert [strip(r) for r in load_trials(flow.out)] == [strip(r) for r in load_trials(core.out)]
    assert len({r.worker for r in load_trials(flow.out)[:2]}) == 1  # a batch: one task run

    with get_client(sync_client=True) as client:
        names = {run.name for run in client.read_task_runs()}
    batches = {f"rte-pooler-trials-{b:04d}-{b + 1:04d}@{where(flow.out)}" for b in (0, 2)}
    assert batches <= names
    assert not any("-trial-" in name and name.endswith(where(flow.out)) for name in names)


def test_two_sweeps_on_one_folder_at_once_exclude_each_other(embeddings, tmp_path, monkeypatch):
    """The second stops at once with a clear error; the first finishes, and every trial's
    record agrees with its own run folder."""
    from bertvision import train
    from bertvision.runs import FolderBusy

    out = tmp_path / "sweep"
    started, go_on = threading.Event(), threading.Event()
    original = train.train_adapter

    def held(cfg, **options):
        started.set()
        go_on.wait(timeout=120)
        return original(cfg, **options)

    monkeypatch.setattr(train, "train_adapter", held)
    first = {}
    thread = threading.Thread(
        target=lambda: first.update(summary=run_sweep(
            quick(embeddings, out, trials=2, parallel=2, together=False),  # held in train_adapter
            progress=False))
    )  # fmt: skip
    thread.start()
    assert started.wait(timeout=120)
    with pytest.raises(FolderBusy, match=r"sweep is being written by .*; wait for it to finish"):
        run_sweep(quick(embeddings, out, trials=2, parallel=2), progress=False)
    go_on.set()
    thread.join()
    assert first["summary"].ran == 2
    for record in load_trials(str(out)):
        metrics = json.loads((out / record.run / "metrics.json").read_text())
        assert (metrics["val"], metrics["dev"]) == (record.val, record.dev)


def test_a_trial_of_other_embeddings_is_refused_unless_overwrite(embeddings, tmp_path):
    out = tmp_path / "sweep"
    cfg = quick(embeddings, out, trials=1)
    run_sweep(cfg, progress=False)
    [spec] = [sweeping.TrialSpec(r.trial, r.params, r.hyperopt_vals) for r in load_trials(str(out))]
    other = synthetic_embeddings(str(tmp_path / "emb2"), dev_labels=np.zeros(40, int))
    moved = quick(other, out, trials=1)
    with pytest.raises(ValueError, match="trial 0 in .* ran on other settings or embeddings"):
        sweeping.run_trial(moved, spec)
    redone = sweeping.run_trial(quick(other, out, trials=1, overwrite=True), spec)
    assert redone.key == sweeping.content_key(moved) != sweeping.content_key(cfg)
    metrics = json.loads((out / redone.run / "metrics.json").read_text())
    assert (metrics["val"], metrics["dev"]) == (redone.val, redone.dev)


def test_a_pipeline_output_given_as_the_embeddings_points_to_them(tmp_path):
    (tmp_path / "embeddings").mkdir()
    cfg = SweepConfig(task="rte", embeddings=str(tmp_path), out=str(tmp_path / "sweep"))
    with pytest.raises(ShardError, match="a pipeline's embeddings are in .*/embeddings"):
        sweeping.content_key(cfg)


def test_a_sweep_on_a_held_out_slice_its_encoder_was_fine_tuned_on_is_refused_writing_nothing(
    prefect_harness, tmp_path, tiny_model, glue_dir
):
    """The encoder was fine-tuned on the first 40 RTE examples holding out val_seed 0's slice:
    a sweep selecting on val_seed 1's is refused before any trial, by the core and the flow
    (whose lease is the only trace it leaves); with the fine-tuning's, it runs."""
    from bertvision_flows.sweep import sweep
    from test_finetune import finetuned_on_rte
    from test_train import extract_finetuned

    checkpoint = finetuned_on_rte(tmp_path / "ckpt", tiny_model, glue_dir)
    embeddings = extract_finetuned(checkpoint, glue_dir, tmp_path / "emb", 40)
    out = tmp_path / "sweep"
    cfg = quick(embeddings, out, trials=2, startup_trials=1, space={"epochs": 1}, val_seed=1)
    refused = r"rte/train: its held-out slice .* Select with --val-fraction 0.1 --val-seed 0,"
    with pytest.raises(ShardError, match=refused):
        run_sweep(cfg, progress=False)
    assert not out.exists()
    with pytest.raises(ShardError, match=refused):
        sweep(cfg)
    assert not (out / sweeping.SWEEP_FILE).exists() and not (out / sweeping.TRIALS_DIR).exists()

    summary = run_sweep(dataclasses.replace(cfg, val_seed=0), progress=False)
    assert summary.to_dict()["finished"] == 2


def test_trials_another_sweep_left_behind_are_refused_or_replaced_never_counted(
    embeddings, tmp_path
):
    """Trials of another key under a new sweep.json (what an overwrite killed midway left with
    earlier code): the sweep refuses them, naming the trial; --overwrite replaces them."""
    out = tmp_path / "sweep"
    run_sweep(quick(embeddings, out, trials=2), progress=False)
    for name in (sweeping.SWEEP_FILE, sweeping.TRIALS_FILE, "_commit.json"):
        (out / name).unlink()  # only the old trials/ left
    other = quick(embeddings, out, trials=2, seed=1)

    with pytest.raises(ValueError, match="trial 0 .* ran on other settings or embeddings"):
        run_sweep(other, progress=False)
    summary = run_sweep(dataclasses.replace(other, overwrite=True), progress=False)

    key = sweeping.content_key(other)
    assert summary.ran == 2
    assert [(t.trial, t.key) for t in load_trials(str(out))] == [(0, key), (1, key)]


def test_an_overwrite_killed_before_removing_the_old_trials_never_adopts_them(
    embeddings, tmp_path, monkeypatch
):
    out = tmp_path / "sweep"
    run_sweep(quick(embeddings, out, trials=2), progress=False)
    replacing = quick(embeddings, out, trials=2, seed=1, overwrite=True)
    real_rm = type(storage.url_to_fs(str(out))[0]).rm

    def killed_at_the_trials(self, path, *args, **kwargs):
        if str(path).rstrip("/").endswith(f"/{sweeping.TRIALS_DIR}"):
            raise KeyboardInterrupt  # the overwrite killed before the old trials are gone
        return real_rm(self, path, *args, **kwargs)

    with monkeypatch.context() as patched:
        patched.setattr(type(storage.url_to_fs(str(out))[0]), "rm", killed_at_the_trials)
        with pytest.raises(KeyboardInterrupt):
            run_sweep(replacing, progress=False)

    summary = run_sweep(replacing, progress=False)  # the same command, run again

    key = sweeping.content_key(replacing)
    assert summary.ran == 2
    assert [(t.trial, t.key) for t in load_trials(str(out))] == [(0, key), (1, key)]
    assert [t["key"] for t in lines(out)] == [key, key]

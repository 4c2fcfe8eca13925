"""Same seed, same result: a run's weights and metrics depend on its parameters and seed only,
not on what runs beside it on other threads, nor on torch's global random generator."""

from __future__ import annotations

import dataclasses
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from test_embeddings import synthetic
from test_train import config

from bertvision import sweep as sweeping
from bertvision.embeddings import load_embeddings
from bertvision.finetune import FinetuneConfig, finetune_encoder
from bertvision.sweep import SweepConfig, load_trials, run_sweep
from bertvision.train import train_adapter

WEIGHTS = "adapter/adapter.safetensors"
# Dropout high enough that a shared generator would change the weights; trial points random
# (startup_trials >= trials), so a batch of two and two batches of one get the same points.
SPACE = {
    "lr": {"loguniform": [1e-3, 3e-2]},
    "dropout": {"uniform": [0.3, 0.5]},
    "seed": {"randint": [0, 100]},
    "epochs": 2,
    "adapter_dim": 4,
    "batch_size": 16,
}


@pytest.fixture(scope="module")
def embeddings(tmp_path_factory) -> str:
    return synthetic(str(tmp_path_factory.mktemp("emb")), n_train=80)


def sweep_config(embeddings: str, out: Path, parallel: int) -> SweepConfig:
    return SweepConfig(
        task="rte", embeddings=embeddings, out=str(out), trials=4, parallel=parallel,
        space=SPACE, startup_trials=4, device="cpu",
    )  # fmt: skip


def test_parallel_trials_give_what_each_trial_gives_alone(embeddings, tmp_path):
    two = sweep_config(embeddings, tmp_path / "two", parallel=2)
    run_sweep(two, progress=False)
    one = sweep_config(embeddings, tmp_path / "one", parallel=1)
    run_sweep(one, progress=False)

    by_two, by_one = load_trials(two.out), load_trials(one.out)
    assert [(r.params, r.val, r.dev) for r in by_two] == [(r.params, r.val, r.dev) for r in by_one]
    for record in by_two:
        spec = sweeping.TrialSpec(record.trial, record.params, record.hyperopt_vals)
        alone = dataclasses.replace(
            sweeping.trial_train_config(two, spec), out=str(tmp_path / f"alone-{record.trial}")
        )
        metrics = train_adapter(alone, progress=False)
        assert (metrics["val"], metrics["dev"]) == (record.val, record.dev)
        for sweep in (two, one):
            trained = Path(sweep.out) / record.run / WEIGHTS
            assert trained.read_bytes() == (Path(alone.out) / WEIGHTS).read_bytes()


def test_two_runs_on_threads_at_once_equal_the_same_runs_alone(embeddings, tmp_path):
    data = load_embeddings("rte", embeddings, device="cpu")
    settings = dict(adapter="pooler", dropout=0.5, epochs=4, patience=0, adapter_dim=4)
    runs = [
        config(tmp_path, embeddings, run=f"{how}-{seed}", seed=seed, **settings)
        for how in ("alone", "together")
        for seed in (1, 2)
    ]
    alone = [train_adapter(cfg, data=data, progress=False) for cfg in runs[:2]]
    with ThreadPoolExecutor(max_workers=2) as pool:
        together = list(
            pool.map(lambda cfg: train_adapter(cfg, data=data, progress=False), runs[2:])
        )
    assert together == alone
    for seed in (1, 2):
        a = (tmp_path / f"alone-{seed}" / WEIGHTS).read_bytes()
        b = (tmp_path / f"together-{seed}" / WEIGHTS).read_bytes()
        assert a == b
    assert (tmp_path / "alone-1" / WEIGHTS).read_bytes() != (
        tmp_path / "alone-2" / WEIGHTS
    ).read_bytes()


def test_training_neither_reads_nor_moves_torchs_global_generator(embeddings, tmp_path):
    torch.manual_seed(123)
    first = train_adapter(config(tmp_path, embeddings, run="a", dropout=0.5), progress=False)
    after_first = torch.get_rng_state()
    torch.manual_seed(456)  # another global state: the same run
    second = train_adapter(config(tmp_path, embeddings, run="b", dropout=0.5), progress=False)
    assert second == first
    assert (tmp_path / "a" / WEIGHTS).read_bytes() == (tmp_path / "b" / WEIGHTS).read_bytes()
    torch.manual_seed(123)
    assert torch.equal(torch.get_rng_state(), after_first)  # left where the caller had it


def test_fine_tunings_on_threads_equal_the_same_fine_tunings_alone(tmp_path, tiny_model, glue_dir):
    def run(name: str, seed: int) -> dict:
        cfg = FinetuneConfig(
            task="wnli", out=str(tmp_path / name), model=tiny_model, data_dir=glue_dir,
            batch_size=8, max_train_examples=24, max_seq_length=32, device="cpu", seed=seed,
            predict_test=False,
        )  # fmt: skip
        metrics = finetune_encoder(cfg, progress=False)
        return {k: metrics[k] for k in ("val", "dev")}

    alone = [run(f"alone-{seed}", seed) for seed in (1, 2)]
    with ThreadPoolExecutor(max_workers=2) as pool:
        together = list(pool.map(run, ["together-1", "together-2"], [1, 2]))
    assert together == alone
    for seed in (1, 2):
        weights = [
            tmp_path / f"{how}-{seed}" / "model.safetensors" for how in ("alone", "together")
        ]
        assert weights[0].read_bytes() == weights[1].read_bytes()

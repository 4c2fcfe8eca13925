"""Runs trained together over shared reads (bertvision.together) give, byte for byte, what each
gives trained alone with the same settings and seed, and read the embeddings once for all."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import pytest
from test_embeddings import synthetic
from test_span_adapter import _config as span_run_config
from test_span_adapter import _extract, _squad_folder
from test_train import config as train_config
from test_train import without_timings

from bertvision import embeddings as embeddings_module
from bertvision import sweep as sweeping
from bertvision.embeddings import load_embeddings
from bertvision.finite import NonFiniteError
from bertvision.span_train import load_span_data
from bertvision.sweep import SweepConfig, load_trials, run_sweep
from bertvision.together import train_together
from bertvision.train import TrainConfig, train_adapter

FILES = ("adapter/adapter.safetensors", "dev_predictions.tsv", "val_predictions.tsv")
SPAN_FILES = (
    "adapter/adapter.safetensors",
    "dev_predictions.json",
    "val_predictions.json",
    "outputs/dev.parquet",
    "outputs/val.parquet",
)


@pytest.fixture(scope="module")
def embeddings(tmp_path_factory) -> str:
    return synthetic(str(tmp_path_factory.mktemp("emb")), n_train=80)  # 5 train shards


def streamed(embeddings: str):
    return load_embeddings("rte", embeddings, device="cpu", max_resident_gb=0)


def config(tmp_path: Path, embeddings: str, run: str, **overrides) -> TrainConfig:
    """A run that streams its train split (max_resident_gb 0), as `streamed` holds it."""
    return train_config(tmp_path, embeddings, run, max_resident_gb=0, **overrides)


def span_config(embeddings: str, out: Path, **overrides) -> TrainConfig:
    """A span run that streams its train windows, as the tests here load them."""
    return span_run_config(embeddings, out, max_resident_gb=0, **overrides)


def runs(tmp_path: Path, embeddings: str, how: str) -> list:
    """Four runs unlike in everything but their shard order: three share shuffle_seed 7 and
    shuffle_shards 2, the fourth reads in its own order (its own pass)."""
    shared = {"shuffle_seed": 7, "shuffle_shards": 2, "patience": 0}
    return [
        config(tmp_path, embeddings, f"{how}-0", adapter="pooler", seed=1, dropout=0.5,
               lr=3e-3, epochs=3, batch_size=16, **shared),
        config(tmp_path, embeddings, f"{how}-1", adapter="scalarmix", seed=2, dropout=0.2,
               lr=1e-2, epochs=2, batch_size=8, **shared),
        config(tmp_path, embeddings, f"{how}-2", adapter="cls", seed=3, lr=1e-3, epochs=3,
               batch_size=32, **shared),
        config(tmp_path, embeddings, f"{how}-3", adapter="pooler", seed=4, epochs=2,
               shuffle_shards=3, patience=0),
    ]  # fmt: skip


def assert_same_run(ours: Path, theirs: Path, files: tuple[str, ...] = FILES) -> None:
    for name in files:
        assert (ours / name).read_bytes() == (theirs / name).read_bytes(), name
    curves = [json.loads((p / "curve.json").read_text()) for p in (ours, theirs)]
    assert without_timings(curves[0]) == without_timings(curves[1])


def test_runs_trained_together_equal_the_same_runs_trained_alone(embeddings, tmp_path):
    data = streamed(embeddings)
    alone = [
        train_adapter(cfg, data=data, progress=False) for cfg in runs(tmp_path, embeddings, "a")
    ]
    together_cfgs = runs(tmp_path, embeddings, "t")
    together = train_together(together_cfgs, data)
    assert together == alone
    for cfg in together_cfgs:
        assert_same_run(Path(cfg.out), Path(cfg.out.replace("/t-", "/a-")))
    # A second call finds them finished and returns them as stored.
    assert train_together(together_cfgs, data) == alone


def test_of_runs_trained_together_the_one_whose_adapter_is_gone_is_trained_again(
    embeddings, tmp_path
):
    """Together as alone: a run whose committed adapter is gone is not finished; it alone is
    trained again (a warning says why), the finished one is returned as stored."""
    data = streamed(embeddings)
    cfgs = runs(tmp_path, embeddings, "t")[:2]
    first = train_together(cfgs, data)
    weights = Path(cfgs[0].out, "adapter", "adapter.safetensors")
    stored, kept = weights.read_bytes(), Path(cfgs[1].out, "_commit.json").read_text()
    shutil.rmtree(weights.parent)
    with pytest.warns(UserWarning, match=r"lacks 2 of its files \(adapter/"):
        assert train_together(cfgs, data) == first
    assert weights.read_bytes() == stored
    assert Path(cfgs[1].out, "_commit.json").read_text() == kept


def count_reads(monkeypatch) -> list[int]:
    """Shards read from storage, counted as they are read (one entry per read_packed call)."""
    reads: list[int] = []
    real = embeddings_module.read_packed

    def counting(urls, plan, device):
        reads.append(len(urls))
        return real(urls, plan, device)

    monkeypatch.setattr(embeddings_module, "read_packed", counting)
    return reads


def test_runs_sharing_their_shard_order_read_the_embeddings_once_for_all(
    embeddings, tmp_path, monkeypatch
):
    data = streamed(embeddings)
    cfgs = [
        config(tmp_path, embeddings, f"run-{seed}", seed=seed, epochs=2, patience=0,
               shuffle_seed=0, shuffle_shards=2)
        for seed in range(4)
    ]  # fmt: skip
    reads = count_reads(monkeypatch)
    train_adapter(dataclasses.replace(cfgs[0], out=str(tmp_path / "alone")), data, progress=False)
    one_run = sum(reads)
    reads.clear()
    train_together(cfgs, data)
    # 2 epochs x (5 shards to train + 5 to validate) + train, dev to predict: 30 shard reads,
    # for one run alone as for four together
    assert one_run == 2 * (5 + 5) + 5 + 2
    assert sum(reads) == one_run


def test_a_run_that_diverges_fails_alone_and_the_others_finish(embeddings, tmp_path):
    data = streamed(embeddings)
    cfgs = runs(tmp_path, embeddings, "t")[:2]
    diverging = dataclasses.replace(cfgs[0], out=str(tmp_path / "diverging"), lr=1e30)
    with pytest.raises(NonFiniteError):
        train_adapter(dataclasses.replace(diverging, out=str(tmp_path / "d-alone")), data, False)

    results = train_together([diverging, *cfgs], data)

    assert isinstance(results[0], NonFiniteError)
    assert not (tmp_path / "diverging" / "metrics.json").exists()
    assert results[1:] == [train_adapter(c, data=data, progress=False) for c in cfgs]


def test_a_sweep_batch_trained_together_equals_its_trials_on_threads(embeddings, tmp_path):
    space = {
        "lr": {"loguniform": [1e-3, 3e-2]},
        "dropout": {"uniform": [0.3, 0.5]},
        "batch_size": {"choice": [8, 16]},
        "epochs": {"choice": [1, 2]},
        "adapter_dim": 4,
        "shuffle_shards": 2,
    }
    data = streamed(embeddings)
    settings = dict(task="rte", embeddings=embeddings, trials=4, parallel=4, space=space,
                    startup_trials=4, device="cpu", max_resident_gb=0)  # fmt: skip
    together = SweepConfig(out=str(tmp_path / "together"), **settings)
    threads = SweepConfig(out=str(tmp_path / "threads"), together=False, **settings)
    run_sweep(together, data=data, progress=False)
    run_sweep(threads, data=data, progress=False)

    trials = load_trials(together.out)
    assert [(r.params, r.val, r.dev, r.status) for r in trials] == [
        (r.params, r.val, r.dev, r.status) for r in load_trials(threads.out)
    ]
    assert len({r.params["lr"] for r in trials}) == 4  # four points, one read of each batch
    for record in trials:
        spec = sweeping.TrialSpec(record.trial, record.params, record.hyperopt_vals)
        assert sweeping.trial_train_config(together, spec).shuffle_seed == together.seed
        assert_same_run(Path(together.out) / record.run, Path(threads.out) / record.run)


# -- span runs (SQuAD 2.0's windows, the span adapter) -------------------------------------------


@pytest.fixture(scope="module")
def span_embeddings(squad_dir, tiny_model, tmp_path_factory) -> str:
    """Two train articles (4 paragraphs each), one dev article (2): 142 train windows, 30 a
    shard."""
    data = _squad_folder(squad_dir, tmp_path_factory.mktemp("squad") / "data", 4, 2)
    return _extract(tiny_model, data, tmp_path_factory.mktemp("span-emb"), shard_size=30)


def span_runs(tmp_path: Path, embeddings: str, how: str) -> list:
    """Three span runs unlike in everything but their shard order, as `runs`."""
    shared = {"shuffle_seed": 7, "shuffle_shards": 2}
    return [
        span_config(embeddings, tmp_path / f"{how}-0", seed=1, epochs=3, **shared),
        span_config(embeddings, tmp_path / f"{how}-1", seed=2, lr=1e-2, epochs=2, batch_size=8,
                    dropout=0.3, adapter_dim=8, **shared),
        span_config(embeddings, tmp_path / f"{how}-2", seed=3, epochs=2, shuffle_shards=3),
    ]  # fmt: skip


def test_span_runs_trained_together_equal_the_same_runs_trained_alone(span_embeddings, tmp_path):
    data = load_span_data("squad2", span_embeddings, "cpu", max_resident_gb=0)  # streamed
    assert len(data.splits["train"].data.shard_urls) == 5
    alone = [
        train_adapter(cfg, data=data, progress=False)
        for cfg in span_runs(tmp_path, span_embeddings, "a")
    ]
    together_cfgs = span_runs(tmp_path, span_embeddings, "t")
    together = train_together(together_cfgs, data)
    assert together == alone
    assert {"f1", "exact", "HasAns_f1"} <= set(together[0]["dev"])
    for cfg in together_cfgs:
        assert_same_run(Path(cfg.out), Path(cfg.out.replace("/t-", "/a-")), SPAN_FILES)


def test_span_runs_sharing_their_shard_order_read_the_windows_once_for_all(
    span_embeddings, tmp_path, monkeypatch
):
    data = load_span_data("squad2", span_embeddings, "cpu", max_resident_gb=0)
    cfgs = [
        span_config(span_embeddings, tmp_path / f"run-{seed}", seed=seed, epochs=2,
                    shuffle_seed=0, shuffle_shards=2)
        for seed in range(3)
    ]  # fmt: skip
    reads = count_reads(monkeypatch)
    train_adapter(dataclasses.replace(cfgs[0], out=str(tmp_path / "alone")), data, progress=False)
    one_run = sum(reads)
    reads.clear()
    train_together(cfgs, data)
    shards = len(data.splits["train"].data.shard_urls) + len(data.splits["dev"].data.shard_urls)
    assert one_run == 2 * 2 * len(data.splits["train"].data.shard_urls) + shards
    assert sum(reads) == one_run

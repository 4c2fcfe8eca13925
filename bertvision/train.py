"""Training adapter models on stored all-layer embeddings, with model selection on TRAIN only.

    data = load_embeddings("rte", "emb")              # bertvision.embeddings: check, hold or stream
    metrics = train_adapter(TrainConfig(task="rte", embeddings="emb", out="run"), data=data)

A seeded slice of the training split (`val_fraction`, `val_seed`; the slice that fine-tuning left
out too) is held out; early stopping and the choice of the epoch whose weights are kept use only
that slice, never the dev set that is reported. Each
epoch ends with a checkpoint in RUN/_checkpoint/, so an interrupted run resumes from its last
finished epoch; a finished run is returned as stored.

Outputs under RUN (any fsspec URL), written when training has finished and committed whole
(bertvision.runs: staged, then moved into place, metrics.json, then the commit record
_commit.json last, keyed on `run_key`, which hashes the settings and the extraction keys; it is
the run record of bertvision.records, kind "train", or "trial" for a sweep's trial):

    config.json                  this TrainConfig, the adapter config, the embeddings URL, the
                                 encoder's name and fingerprint, extraction keys, code version
    metrics.json                 {"val": {...}, "dev": {...}} (MNLI: "dev" is matched, plus
                                 "dev_mismatched"), metric names as in bertvision.metrics
    adapter/                     adapter_config.json + adapter.safetensors (adapters.load_adapter)
    <split>_predictions.tsv      GLUE submission format, `index<TAB>prediction`, for every dev
                                 and test split (test only when its embeddings were extracted)
    outputs/<split>.parquet      example_id int64, label (int64, or float32 for regression; null
                                 for test), output list<float32>: class probabilities, or [score]
                                 for regression; one row per example, sorted by example_id.
                                 Splits: every dev/test split by its GLUE name, and "val" (the
                                 held-out slice of train). Ensembles average these outputs.
    curve.json / curve.png       per epoch: train loss, val loss, val metrics, seconds

The dev metrics are computed from the dev predictions as written to the TSV file, so they equal
the metrics anyone recomputes from that file and the dev labels.
"""

from __future__ import annotations

import copy
import io
import math
import pickle
import time
from collections.abc import Callable
from dataclasses import asdict
from functools import partial

import numpy as np
import torch
from torch import nn

from bertvision import __version__, adapters, glue, records, rng, runs, storage
from bertvision.config import TrainConfig, require
from bertvision.embeddings import EmbeddingData, SplitData, epoch_batches, load_embeddings
from bertvision.finite import NonFiniteError
from bertvision.metrics import compute_metrics
from bertvision.shards import ShardError, load_plan, split_url

CHECKPOINT = "_checkpoint/last.pt"
VAL_SPLIT = "val"


def content_key(cfg: TrainConfig) -> str:
    """`cfg.run_key` of the embeddings stored now, from their plans alone (a few small reads):
    what `train_adapter` would key the run on, without reading a shard. Embeddings replaced by
    another extraction change it; missing ones leave their split out (training then refuses)."""
    task = glue.get_task(cfg.task)
    embeddings = cfg.embeddings.rstrip("/")
    keys = {}
    for name in ("train", *task.dev_splits, *task.test_splits):
        plan = load_plan(split_url(embeddings, task.name, name))
        if plan is not None:
            keys[name] = plan.key
    return cfg.run_key(keys)


@torch.inference_mode()
def predict(
    model: nn.Module, split: SplitData, keep: np.ndarray, batch_size: int, device: str
) -> tuple[np.ndarray, np.ndarray]:
    """Example ids (sorted) and (N, C) float32 logits of the storage rows where `keep` is True."""
    ids, logits = [], []
    for packed, rows in split.packs(device):
        local = np.flatnonzero(keep[rows])
        local = local[np.argsort(packed.lengths[local], kind="stable")]  # little padding
        for begin in range(0, len(local), batch_size):
            chosen = local[begin : begin + batch_size]
            hidden, mask = packed.batch(chosen, device)
            logits.append(model(hidden, mask).float().cpu().numpy())
            ids.append(packed.example_ids[chosen])
    example_ids = np.concatenate(ids)
    if not all(np.isfinite(part).all() for part in logits):
        raise NonFiniteError(
            f"the adapter's outputs on {split.name} are NaN or infinite: training diverged; "
            "try a lower lr"
        )
    order = np.argsort(example_ids)
    return example_ids[order], np.concatenate(logits)[order]


def task_loss(task: glue.GlueTask, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    if task.regression:
        return nn.functional.mse_loss(logits[:, 0], labels.float())
    return nn.functional.cross_entropy(logits, labels.long())


def task_outputs(task: glue.GlueTask, logits: np.ndarray) -> np.ndarray:
    """Class probabilities, or the score itself for regression: (N, C) float32."""
    if task.regression:
        return logits.astype(np.float32)
    return torch.softmax(torch.from_numpy(logits), dim=-1).numpy().astype(np.float32)


def _labels_of(split: SplitData, example_ids: np.ndarray) -> np.ndarray:
    order = np.argsort(split.example_ids)
    return split.labels[order[np.searchsorted(split.example_ids[order], example_ids)]]


def _evaluate(task, model, split, keep, batch_size, device) -> tuple[dict, float, np.ndarray]:
    """Metrics, loss and logits of the kept rows of a labelled split."""
    ids, logits = predict(model, split, keep, batch_size, device)
    labels = _labels_of(split, ids)
    loss = task_loss(task, torch.from_numpy(logits), torch.from_numpy(labels)).item()
    predicted = logits[:, 0] if task.regression else logits.argmax(-1)
    return compute_metrics(task, predicted, labels), loss, logits


def _train_epoch(task, model, optimizer, split, keep, cfg: TrainConfig, epoch: int) -> float:
    """One pass over the kept rows; the mean training loss. Seeded by (seed, epoch), so an
    epoch after a resume draws what it would have drawn without the interruption."""
    order = np.random.default_rng([cfg.seed, epoch])
    dropout = torch.Generator(device=cfg.device).manual_seed(cfg.seed * 1_000_003 + epoch)
    adapters.use_generator(model, dropout)  # never torch's global generator: see bertvision.rng
    model.train()
    total, count = 0.0, 0
    for packed, rows, storage_rows in epoch_batches(
        split, keep, cfg.batch_size, order, cfg.device, cfg.shuffle_shards
    ):
        hidden, mask = packed.batch(rows, cfg.device)
        labels = torch.from_numpy(split.labels[storage_rows]).to(cfg.device)
        loss = task_loss(task, model(hidden, mask), labels)
        value = loss.item()
        if not math.isfinite(value):
            raise NonFiniteError(
                f"training diverged in epoch {epoch}: the loss is {value}; "
                f"try a lower lr (now {cfg.lr})"
            )
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        total += value * len(rows)
        count += len(rows)
    return total / count


def train_adapter(
    cfg: TrainConfig,
    data: EmbeddingData | None = None,
    progress: bool = True,
    trial_of: dict[str, str] | None = None,
) -> dict:
    """Train, select on the held-out slice of TRAIN, evaluate and write RUN; returns metrics.json.

    Every check runs before anything is written: bad input leaves RUN as it was. While it
    trains, RUN is leased (runs.Lease): a second writer gets FolderBusy. `trial_of` is the sweep
    (records.input_of its URL and key) whose trial this run is: its run record then has kind
    "trial" and the sweep among its inputs.
    """
    require(cfg)
    stopwatch = records.Stopwatch()
    task = glue.get_task(cfg.task)
    if data is None:
        data = load_embeddings(
            task, cfg.embeddings, device=cfg.device, max_resident_gb=cfg.max_resident_gb
        )
    _check_data(cfg, data)
    key = cfg.run_key(data.extraction_keys())
    if (finished := _finished(cfg, key)) is not None:
        return finished
    checkpoint = _load_checkpoint(cfg, key)
    inputs = run_inputs(data) | ({"sweep": trial_of} if trial_of else {})
    record = partial(records.RunRecord, "trial" if trial_of else "train", key, asdict(cfg), inputs)
    return runs.once(
        cfg.out,
        lambda: _finished(cfg, key),
        lambda: _fit(cfg, key, data, checkpoint, progress, stopwatch, record),
    )


def run_inputs(data: EmbeddingData) -> dict[str, dict[str, str]]:
    """The run's inputs (records.RunRecord.inputs): "embeddings/<split>" for each split read,
    its folder and extraction key."""
    return {
        f"embeddings/{name}": records.input_of(
            split_url(data.embeddings, data.task.name, name), split.plan.key
        )
        for name, split in data.splits.items()
    }


def _fit(
    cfg: TrainConfig,
    key: str,
    data: EmbeddingData,
    checkpoint,
    progress: bool,
    stopwatch: records.Stopwatch,
    record: Callable[[dict], records.RunRecord],
) -> dict:
    """Train from `checkpoint` (or from scratch), then write and commit RUN; `record` makes its
    run record from the timings."""
    from tqdm.auto import tqdm

    task = data.task
    train = data.splits["train"]
    val_ids = train.held_out_ids(cfg.val_fraction, cfg.val_seed)
    is_val = np.isin(train.example_ids, val_ids)
    with rng.seeded(cfg.seed):
        model = adapters.build_adapter(cfg.adapter_config(data.plan.layers, data.plan.hidden_size))
    model = model.to(cfg.device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    state = {"epoch": 0, "curve": [], "best": None, "bad_epochs": 0}
    if checkpoint is not None:
        model.load_state_dict(checkpoint["model"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        state = checkpoint["state"]

    eval_batch = 2 * cfg.batch_size
    with tqdm(
        total=cfg.epochs,
        initial=state["epoch"],
        desc=f"train {task.name} {cfg.adapter}",
        unit="epoch",
        disable=not progress,
    ) as bar:  # closed on an error too, before the error is reported
        for epoch in range(state["epoch"] + 1, cfg.epochs + 1):
            if cfg.patience and state["bad_epochs"] >= cfg.patience:
                break  # stopped early before the interruption
            started = time.perf_counter()
            train_loss = _train_epoch(task, model, optimizer, train, ~is_val, cfg, epoch)
            seconds = time.perf_counter() - started
            model.eval()
            val_metrics, val_loss, _ = _evaluate(task, model, train, is_val, eval_batch, cfg.device)
            state["curve"].append(
                {
                    "epoch": epoch,
                    "train_loss": train_loss,
                    "val_loss": val_loss,
                    "val": val_metrics,
                    "seconds": round(seconds, 3),
                    "eval_seconds": round(time.perf_counter() - started - seconds, 3),
                }
            )
            best = state["best"]
            score = (val_metrics[task.primary_metric], -val_loss)  # ties: the lower loss
            if best is None or score > (best["metric"], -best["loss"]):
                state["best"] = {
                    "epoch": epoch,
                    "metric": score[0],
                    "loss": val_loss,
                    "weights": copy.deepcopy(model.state_dict()),
                }
                state["bad_epochs"] = 0
            else:
                state["bad_epochs"] += 1
            state["epoch"] = epoch
            _save_checkpoint(cfg, key, model, optimizer, state)
            bar.update(1)
            bar.set_postfix(
                loss=round(train_loss, 4), val=round(val_metrics[task.primary_metric], 4)
            )

    model.load_state_dict(state["best"]["weights"])
    model.eval()
    train_seconds = sum(e["seconds"] for e in state["curve"])
    run = record(stopwatch.timings(train_seconds=train_seconds))
    with runs.StagedRun(cfg.out) as staged:
        return _write_run(cfg, run, data, model, is_val, state, staged)


def _check_data(cfg: TrainConfig, data: EmbeddingData) -> None:
    task = glue.get_task(cfg.task)
    if data.task.name != task.name:
        raise ValueError(f"the embeddings given are of {data.task.name}, not {task.name}")
    if data.embeddings != cfg.embeddings.rstrip("/"):
        raise ValueError(f"the embeddings given come from {data.embeddings}, not {cfg.embeddings}")
    missing = [s for s in ("train", *task.dev_splits) if s not in data.splits]
    if missing:
        raise ShardError(f"embeddings of {task.name} lack the {', '.join(missing)} split(s)")
    fingerprint = data.plan.model_fingerprint
    if cfg.model_fingerprint and cfg.model_fingerprint != fingerprint:
        raise ShardError(
            f"embeddings under {data.embeddings} come from encoder {data.plan.model} "
            f"(fingerprint {fingerprint}), not the one asked for ({cfg.model_fingerprint})"
        )


def _finished(cfg: TrainConfig, key: str) -> dict | None:
    """The metrics of a run committed with this key; an error for one with another key
    (other settings or other embeddings) unless `cfg.overwrite`."""
    if runs.finished(cfg.out, key, cfg.overwrite) is None:
        return None
    return storage.read_json(storage.join(cfg.out, "metrics.json"), keys=("val", "dev"))


def _load_checkpoint(cfg: TrainConfig, key: str) -> dict | None:
    url = storage.join(cfg.out, CHECKPOINT)
    if not storage.exists(url):
        return None
    try:
        checkpoint = torch.load(io.BytesIO(storage.read_bytes(url)), map_location=cfg.device)
        run_key = checkpoint["run_key"]
    except (pickle.UnpicklingError, RuntimeError, EOFError, KeyError, TypeError) as exc:
        raise storage.FileFormatError(
            f"{url} is not a training checkpoint ({type(exc).__name__}); "
            "delete it to start the run afresh"
        ) from None
    if run_key == key:
        return checkpoint
    if cfg.overwrite:
        return None
    raise ValueError(
        f"{cfg.out} holds an unfinished run with other settings; "
        "use another --out, or --overwrite to replace it"
    )


def _save_checkpoint(cfg: TrainConfig, key: str, model, optimizer, state: dict) -> None:
    buffer = io.BytesIO()
    torch.save(
        {
            "run_key": key,
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "state": state,
        },
        buffer,
    )
    storage.write_bytes_atomic(storage.join(cfg.out, CHECKPOINT), buffer.getvalue())


def _write_run(
    cfg, run: records.RunRecord, data: EmbeddingData, model, is_val, state, staged: runs.StagedRun
) -> dict:
    """Evaluate the chosen weights, write every output staged and commit them whole."""
    from bertvision.plots import plot_curve
    from bertvision.predictions import read_submission, submission_name, write_predictions

    task = data.task
    train = data.splits["train"]
    eval_batch = 2 * cfg.batch_size
    out = staged.url
    # Every prediction before any write: outputs that are not finite stop the run here.
    val_metrics, _, val_logits = _evaluate(task, model, train, is_val, eval_batch, cfg.device)
    predicted = {
        name: predict(model, split, np.ones(split.num_examples, dtype=bool), eval_batch, cfg.device)
        for name, split in data.splits.items()
        if name != "train"
    }

    val_ids = np.sort(train.example_ids[is_val])
    val_labels = _labels_of(train, val_ids).tolist()
    write_predictions(out, task, VAL_SPLIT, val_ids, val_labels, task_outputs(task, val_logits))
    metrics = {"val": val_metrics}
    for name, (ids, logits) in predicted.items():
        split = data.splits[name]
        labels = [None] * len(ids) if split.labels is None else _labels_of(split, ids).tolist()
        write_predictions(out, task, name, ids, labels, task_outputs(task, logits))
        if name in task.dev_splits:
            submitted = read_submission(storage.join(out, submission_name(name)), task)
            report = "dev" if name == task.dev_splits[0] else name
            metrics[report] = compute_metrics(task, [submitted[i] for i in ids], labels)

    adapters.save_adapter(model, storage.join(out, "adapter"))
    epochs = state["curve"]
    train_seconds = sum(e["seconds"] for e in epochs)
    seen = int((~is_val).sum()) * len(epochs)
    curve = {
        "primary_metric": task.primary_metric,
        "best_epoch": state["best"]["epoch"],
        "epochs_run": len(epochs),
        "stopped_early": len(epochs) < cfg.epochs,
        "train_examples": int((~is_val).sum()),
        "val_examples": int(is_val.sum()),
        "train_seconds": round(train_seconds, 3),
        "train_examples_per_second": round(seen / max(train_seconds, 1e-9), 1),
        "epochs": epochs,
    }
    storage.write_json(storage.join(out, "curve.json"), curve)
    storage.write_bytes_atomic(
        storage.join(out, "curve.png"),
        plot_curve(curve, f"{task.name} {cfg.adapter} seed {cfg.seed}"),
    )
    storage.write_json(
        storage.join(out, "config.json"),
        {
            "train": asdict(cfg),
            "adapter": model.config.to_dict(),
            "embeddings": data.embeddings,
            "model": data.plan.model,
            "model_fingerprint": data.plan.model_fingerprint,
            "extraction_keys": data.extraction_keys(),
            "run_key": run.key,
            "code_version": __version__,
        },
    )
    storage.write_json(storage.join(out, "metrics.json"), metrics)
    staged.commit(run, last=("config.json", "metrics.json"))
    fs, root = storage.url_to_fs(cfg.out)
    fs.rm(f"{root.rstrip('/')}/{CHECKPOINT.split('/')[0]}", recursive=True)
    return metrics

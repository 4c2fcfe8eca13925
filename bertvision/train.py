"""Training adapter models on stored all-layer embeddings, with model selection on TRAIN only.

    data = load_embeddings("rte", "emb")              # bertvision.embeddings: check, hold or stream
    metrics = train_adapter(TrainConfig(task="rte", embeddings="emb", out="run"), data=data)

A seeded slice of the training split (`val_fraction`, `val_seed`; the slice that fine-tuning left
out too) is held out; early stopping and the choice of the epoch whose weights are kept use only
that slice, never the dev set that is reported. The slice is the fine-tuning's only when both
read the same train examples with the same `val_fraction` and `val_seed`: on the embeddings of
an encoder fine-tuned by BERTVision (their extraction's run record says what it was fine-tuned
on, finetune.FinetunedEncoder), a run whose slice holds examples that encoder trained on is
refused before anything is written (`refuse_seen`), naming the settings that would make it
the fine-tuning's. Each
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
    curve.json / curve.png       per epoch: train loss, val loss, val metrics, seconds of the
                                 training pass (wall clock; cpu_seconds: the process's CPU
                                 time, all threads) and of the validation (eval_seconds)

The dev metrics are computed from the dev predictions as written to the TSV file, so they equal
the metrics anyone recomputes from that file and the dev labels.

The loop (epochs, early stopping on the held-out slice, checkpoints, the staged commit) is one
for every task family; what differs (the data, the loss, the validation, the outputs) is an
`Objective`: `GlueObjective` here, `span_train.SpanObjective` for span tasks (SQuAD 2.0, the
span adapter), whose outputs that module describes.
"""

from __future__ import annotations

import contextlib
import copy
import io
import math
import pickle
import time
import zipfile
from collections.abc import Callable
from dataclasses import asdict
from functools import partial
from typing import Protocol

import numpy as np
import torch
from torch import nn

from bertvision import __version__, adapters, glue, records, rng, runs, storage
from bertvision.config import SweepConfig, TrainConfig, require
from bertvision.embeddings import (
    EmbeddingData,
    SplitData,
    check_given,
    finetuning,
    load_embeddings,
    pack_batches,
)
from bertvision.finetune import FinetunedEncoder
from bertvision.finite import NonFiniteError, held_out_result
from bertvision.metrics import compute_metrics
from bertvision.rng import nested_subset
from bertvision.schema import ExtractionPlan
from bertvision.shards import ShardError, load_plan, split_url

CHECKPOINT = f"{runs.SCRATCH}/last.pt"
VAL_SPLIT = "val"


def content_key(cfg: TrainConfig) -> str:
    """`cfg.run_key` of the embeddings stored now, from their plans alone (a few small reads):
    what `train_adapter` would key the run on, without reading a shard. Embeddings replaced by
    another extraction change it; missing ones leave their split out (training then refuses)."""
    from bertvision import span_train

    if span_train.is_span_run(cfg):
        names: tuple[str, ...] = span_train.SPLITS
    else:
        task = glue.get_task(cfg.task)
        names = ("train", *task.dev_splits, *task.test_splits)
    embeddings = cfg.embeddings.rstrip("/")
    keys = {}
    for name in names:
        plan = load_plan(split_url(embeddings, cfg.task, name))
        if plan is not None:
            keys[name] = plan.key
    return cfg.run_key(keys)


@torch.inference_mode()
def predict_many(
    runs_: list[tuple[nn.Module, np.ndarray, int]], split: SplitData, device: str
) -> list[tuple[np.ndarray, np.ndarray] | NonFiniteError]:
    """For each (model, keep, batch_size): example ids (sorted) and (N, C) float32 logits of
    the storage rows where `keep` is True, or the NonFiniteError of a model whose outputs are
    not finite. The split is read once for all of them (shard by shard when streamed); each
    model sees the batches it would see alone."""
    ids: list[list[np.ndarray]] = [[] for _ in runs_]
    logits: list[list[np.ndarray]] = [[] for _ in runs_]
    for packed, rows in split.packs(device):
        for index, (model, keep, batch_size) in enumerate(runs_):
            local = np.flatnonzero(keep[rows])
            local = local[np.argsort(packed.lengths[local], kind="stable")]  # little padding
            for begin in range(0, len(local), batch_size):
                chosen = local[begin : begin + batch_size]
                batch = packed.batch(chosen, device)
                logits[index].append(model(batch).float().cpu().numpy())
                ids[index].append(packed.example_ids[chosen])
    results: list[tuple[np.ndarray, np.ndarray] | NonFiniteError] = []
    for parts, id_parts in zip(logits, ids, strict=True):
        if not all(np.isfinite(part).all() for part in parts):
            results.append(
                NonFiniteError(
                    f"the adapter's outputs on {split.name} are NaN or infinite: training "
                    "diverged; try a lower lr"
                )
            )
            continue
        example_ids = np.concatenate(id_parts)
        order = np.argsort(example_ids)
        results.append((example_ids[order], np.concatenate(parts)[order]))
    return results


def predict(
    model: nn.Module, split: SplitData, keep: np.ndarray, batch_size: int, device: str
) -> tuple[np.ndarray, np.ndarray]:
    """Example ids (sorted) and (N, C) float32 logits of the storage rows where `keep` is True;
    NonFiniteError when an output is NaN or infinite."""
    (result,) = predict_many([(model, keep, batch_size)], split, device)
    if isinstance(result, NonFiniteError):
        raise result
    return result


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


def scored(
    task, split: SplitData, ids: np.ndarray, logits: np.ndarray
) -> tuple[dict, float, np.ndarray]:
    """Metrics, loss and logits of predictions (`predict`'s ids and logits) on a labelled split."""
    labels = _labels_of(split, ids)
    loss = task_loss(task, torch.from_numpy(logits), torch.from_numpy(labels)).item()
    predicted = logits[:, 0] if task.regression else logits.argmax(-1)
    return compute_metrics(task, predicted, labels), loss, logits


def start_epoch(model: nn.Module, cfg: TrainConfig, epoch: int) -> np.random.Generator:
    """Put `model` in training mode with its dropout seeded by (seed, epoch), and return the
    generator of the epoch's batch order: an epoch after a resume draws what it would have
    drawn without the interruption."""
    order = np.random.default_rng([cfg.seed, epoch])
    dropout = torch.Generator(device=cfg.device).manual_seed(cfg.seed * 1_000_003 + epoch)
    adapters.use_generator(model, dropout)  # never torch's global generator: see bertvision.rng
    model.train()
    return order


def shard_order(cfg: TrainConfig, epoch: int, order: np.random.Generator) -> np.random.Generator:
    """The generator of the order in which a streamed epoch reads its shard groups: (shuffle_seed,
    epoch) when the run sets `shuffle_seed`, else `order` itself (`start_epoch`'s)."""
    if cfg.shuffle_seed is None:
        return order
    return np.random.default_rng([cfg.shuffle_seed, epoch])


def check_loss(value: float, cfg: TrainConfig, epoch: int) -> None:
    """NonFiniteError when a training step's loss is NaN or infinite."""
    if not math.isfinite(value):
        raise NonFiniteError(
            f"training diverged in epoch {epoch}: the loss is {value}; "
            f"try a lower lr (now {cfg.lr})"
        )


def step(model: nn.Module, optimizer, loss: torch.Tensor) -> None:
    """One AdamW step on `loss`, gradients clipped to norm 1."""
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()


def _train_epoch(objective: Objective, model, optimizer, cfg: TrainConfig, epoch: int) -> float:
    """One pass over the objective's training rows, shard group by shard group (in the order
    `shard_order` draws); the mean training loss (see `start_epoch`)."""
    order = start_epoch(model, cfg, epoch)
    split = objective.train_split
    total, count = 0.0, 0
    groups = split.shard_groups(shard_order(cfg, epoch, order), cfg.shuffle_shards)
    for packed, rows in split.read_groups(groups, cfg.device, cfg.read_ahead):
        total, count = train_pack(
            objective, model, optimizer, packed, rows, order, cfg, epoch, total, count
        )
    return total / count


def train_pack(
    objective: Objective, model, optimizer, packed, rows, order, cfg: TrainConfig, epoch: int,
    total: float, count: int,
) -> tuple[float, int]:  # fmt: skip
    """Train on the objective's training rows in one pack (`SplitData.read_group`'s packed and
    storage rows), in batches drawn from `order`; returns `total` and `count` plus this pack's
    summed loss and rows. NonFiniteError (before the step) when a loss is not finite."""
    for chosen in pack_batches(rows, objective.is_trained, cfg.batch_size, order):
        loss = objective.batch_loss(model, packed, rows, chosen, cfg.device)
        value = loss.item()
        check_loss(value, cfg, epoch)
        step(model, optimizer, loss)
        total += value * len(chosen)
        count += len(chosen)
    return total, count


def alone(result):
    """The one result of a `*_together` call made for one run; its NonFiniteError raised."""
    if isinstance(result, NonFiniteError):
        raise result
    return result


class Objective(Protocol):
    """One task family's side of adapter training, on embeddings checked and loaded: what the
    loop (`_fit`) trains on, selects on and writes. `rows` names its rows ("examples",
    "windows"); `plan` is the train split's extraction plan (layers, hidden size, encoder).

    The `*_together` methods take (objective, model, cfg) for one run or many runs of one
    family on the same loaded data, read each split once for all of them (bertvision.together
    trains a sweep's batch so), and give each run what it gives alone, or its NonFiniteError
    when an output is NaN or infinite.
    """

    task: str
    primary_metric: str  # in the validation metrics; higher is better
    rows: str
    embeddings: str
    plan: ExtractionPlan
    train_split: SplitData  # the rows training reads
    is_trained: np.ndarray  # (rows of train_split,) bool, storage order
    num_train: int  # rows trained on
    num_val: int  # rows of the held-out slice

    def extraction_keys(self) -> dict[str, str]: ...

    def inputs(self) -> dict[str, dict[str, str]]:
        """records.RunRecord.inputs: each split read, its folder and extraction key."""
        ...

    def batch_loss(
        self, model: nn.Module, packed, rows: np.ndarray, chosen: np.ndarray, device: str
    ) -> torch.Tensor:
        """The training loss of a batch: the rows `chosen` (positions) of a pack whose rows are
        the storage `rows` of `train_split`."""
        ...

    @staticmethod
    def validate_together(runs: list) -> list[tuple[dict, float] | NonFiniteError]:
        """Each run's metrics and loss on its held-out slice, its model in eval mode."""
        ...

    @staticmethod
    def predict_together(runs: list) -> list:
        """Each run's predictions of every split it writes (`write_predicted`'s input)."""
        ...

    def write_predicted(self, predicted, out: str) -> dict:
        """Write the predictions and outputs (`predict_together`'s) under `out` (staged);
        returns metrics.json's content."""
        ...


class GlueObjective:
    """GLUE's rows: one per example, the task's loss and metrics, the seeded held-out slice."""

    rows = "examples"

    def __init__(self, cfg: TrainConfig, data: EmbeddingData) -> None:
        _check_data(cfg, data)
        self.data = data
        self.task = data.task.name
        self.primary_metric = data.task.primary_metric
        self.embeddings = data.embeddings
        self.plan = data.plan
        train = self.train_split = data.splits["train"]
        held_out = train.held_out_ids(cfg.val_fraction, cfg.val_seed)
        check_held_out_examples(
            data.finetuned, data.task.name, data.embeddings, held_out, train.num_examples, cfg
        )
        self.is_val = np.isin(train.example_ids, held_out)
        trained = nested_subset(train.example_ids[~self.is_val], cfg.train_fraction, cfg.seed)
        self.is_trained = np.isin(train.example_ids, trained)
        self.num_val = int(self.is_val.sum())
        self.num_train = int(self.is_trained.sum())

    def extraction_keys(self) -> dict[str, str]:
        return self.data.extraction_keys()

    def inputs(self) -> dict[str, dict[str, str]]:
        return run_inputs(self.data)

    def batch_loss(self, model, packed, rows, chosen, device: str) -> torch.Tensor:
        batch = packed.batch(chosen, device)
        labels = torch.from_numpy(self.train_split.labels[rows[chosen]]).to(device)
        return task_loss(self.data.task, model(batch), labels)

    @staticmethod
    def validate_together(runs_: list) -> list[tuple[dict, float] | NonFiniteError]:
        data = runs_[0][0].data
        train = data.splits["train"]
        asked = [(model, ours.is_val, 2 * cfg.batch_size) for ours, model, cfg in runs_]
        return [
            p
            if isinstance(p, NonFiniteError)
            else held_out_result(*scored(data.task, train, *p)[:2])
            for p in predict_many(asked, train, runs_[0][2].device)
        ]

    @staticmethod
    def predict_together(runs_: list) -> list[dict | NonFiniteError]:
        asked = [(model, ours.is_val, 2 * cfg.batch_size) for ours, model, cfg in runs_]
        return glue_predictions(runs_[0][0].data, asked, runs_[0][2].device)

    def write_predicted(self, predicted: dict, out: str) -> dict:
        return write_glue_outputs(self.data, predicted, self.is_val, out)


def refuse_seen(
    finetuned: FinetunedEncoder,
    train: str,
    read: tuple[int, str],
    held_out: tuple[int, str],
    seen: list[str],
    cfg: TrainConfig | SweepConfig,
) -> None:
    """ShardError when `seen`, what of a run's held-out slice the encoder was fine-tuned on (its
    first few named), is not empty: selecting on them would rate the adapter on what its encoder
    learnt. `train`: the train split's folder; `read`: how many train rows it holds and what
    they are ("examples", "questions"); `held_out`: how many the slice holds and what (a plural:
    "examples", "articles"); `cfg`: the run's val_fraction and val_seed (a TrainConfig or
    SweepConfig). The remedy names the settings that hold out what the fine-tuning held out: the
    same train examples, val_fraction and val_seed."""
    if not seen:
        return
    remedies = []
    if read[0] != finetuned.train_examples:
        remedies.append(f"extract with {finetuned.subset_flag()}")
    if (cfg.val_fraction, cfg.val_seed) != (finetuned.val_fraction, finetuned.val_seed):
        remedies.append(f"select with {finetuned.held_out_flags()}")
    shown = ", ".join(seen[:5]) + (", ..." if len(seen) > 5 else "")
    remedy = " and ".join(remedies)
    held = f"{held_out[0]} {held_out[1] if held_out[0] != 1 else held_out[1][:-1]}"
    raise ShardError(
        f"{train}: its held-out slice (--val-fraction {cfg.val_fraction:g} --val-seed "
        f"{cfg.val_seed} of the {read[0]} train {read[1]} extracted) holds {held}, "
        f"{len(seen)} of which its encoder was fine-tuned on ({shown}): "
        f"fine-tuning run {finetuned.run_key} read the first {finetuned.train_examples} "
        f"({finetuned.subset_flag()}) and held out {finetuned.held_out_flags()}; an adapter "
        f"selected on what its encoder learnt is overrated. {remedy[:1].upper()}{remedy[1:]}, "
        "as the fine-tuning did"
    )


def check_held_out_examples(
    finetuned: FinetunedEncoder | None,
    task: str,
    embeddings: str,
    held_out: np.ndarray,
    read: int,
    cfg: TrainConfig | SweepConfig,
) -> None:
    """`refuse_seen` for a GLUE run whose held-out slice is the example ids `held_out`, of `read`
    train examples, when the encoder was fine-tuned on `task` (`finetuned`): ids are row
    indexes, so the ones it trained on are glue.finetuned_ids."""
    if finetuned is None or finetuned.task != task:
        return
    trained = glue.finetuned_ids(
        finetuned.train_examples, finetuned.val_fraction, finetuned.val_seed
    )
    seen = np.intersect1d(held_out, trained)
    refuse_seen(
        finetuned,
        split_url(embeddings, task, "train"),
        (read, "examples"),
        (len(held_out), "examples"),
        [f"id {i}" for i in seen.tolist()],
        cfg,
    )


def check_held_out_unseen(cfg: SweepConfig) -> None:
    """`refuse_seen` for the held-out slice of `cfg` (a checked SweepConfig: its task,
    embeddings, val_fraction and val_seed) from what is stored alone, before the embeddings are
    loaded: the train split's plan and run record (span tasks: and, for a fine-tuned encoder,
    the train questions; span_train.check_held_out_unseen). Embeddings not stored are not
    checked here: loading them says what is missing."""
    from bertvision import span_train
    from bertvision.families import get_task

    task = cfg.task
    if get_task(task).family.schema == "span":
        span_train.check_held_out_unseen(cfg)
        return
    embeddings = cfg.embeddings.rstrip("/")
    plan = load_plan(split_url(embeddings, task, "train"))
    if plan is None:
        return
    ids = np.arange(plan.num_examples)  # GLUE's train ids: the row indexes of the rows read
    held_out = glue.held_out_ids(ids, cfg.val_fraction, cfg.val_seed)
    finetuned = finetuning(embeddings, task, plan)
    check_held_out_examples(finetuned, task, embeddings, held_out, plan.num_examples, cfg)


def make_objective(cfg: TrainConfig, data=None) -> Objective:
    """The objective of `cfg`'s task family on `data` (loaded here when None:
    load_embeddings, or span_train.load_span_data for span tasks)."""
    from bertvision import span_train

    if span_train.is_span_run(cfg):
        return span_train.SpanObjective(cfg, data)
    if data is None:
        data = load_embeddings(
            cfg.task, cfg.embeddings, device=cfg.device, max_resident_gb=cfg.max_resident_gb
        )
    return GlueObjective(cfg, data)


def train_adapter(
    cfg: TrainConfig,
    data: EmbeddingData | None = None,
    progress: bool = True,
    trial_of: dict[str, str] | None = None,
) -> dict:
    """Train, select on the held-out slice of TRAIN, evaluate and write RUN; returns metrics.json.

    Every check runs before anything is written: bad input leaves RUN as it was, and so does a
    held-out slice holding examples the embeddings' encoder was fine-tuned on (ShardError, see
    the module). While it
    trains, RUN is leased (runs.Lease): a second writer gets FolderBusy. `trial_of` is the sweep
    (records.input_of its URL and key) whose trial this run is: its run record then has kind
    "trial" and the sweep among its inputs. `data`: the embeddings already loaded
    (load_embeddings; span_train.load_span_data for span tasks).
    """
    require(cfg)
    stopwatch = records.Stopwatch()
    objective = make_objective(cfg, data)
    key = cfg.run_key(objective.extraction_keys())
    if (finished := _finished(cfg, key)) is not None:
        return finished
    checkpoint = _load_checkpoint(cfg, key)
    inputs = objective.inputs() | ({"sweep": trial_of} if trial_of else {})
    record = partial(records.RunRecord, "trial" if trial_of else "train", key, asdict(cfg), inputs)
    return runs.once(
        cfg.out,
        lambda: _finished(cfg, key),
        lambda: _fit(cfg, key, objective, checkpoint, progress, stopwatch, record),
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
    objective: Objective,
    checkpoint,
    progress: bool,
    stopwatch: records.Stopwatch,
    record: Callable[[dict], records.RunRecord],
) -> dict:
    """Train from `checkpoint` (or from scratch), then write and commit RUN; `record` makes its
    run record from the timings."""
    from tqdm.auto import tqdm

    fit = Fit(cfg, key, objective, checkpoint)
    with tqdm(
        total=cfg.epochs,
        initial=fit.state["epoch"],
        desc=f"train {objective.task} {cfg.adapter}",
        unit="epoch",
        disable=not progress,
    ) as bar:  # closed on an error too, before the error is reported
        while (epoch := fit.next_epoch()) is not None:
            started, cpu_started = time.perf_counter(), time.process_time()
            train_loss = _train_epoch(objective, fit.model, fit.optimizer, cfg, epoch)
            seconds = time.perf_counter() - started
            cpu_seconds = time.process_time() - cpu_started
            fit.model.eval()
            (validated,) = objective.validate_together([(objective, fit.model, cfg)])
            val_metrics, val_loss = alone(validated)
            eval_seconds = time.perf_counter() - started - seconds
            fit.end_epoch(
                epoch, train_loss, val_metrics, val_loss, seconds, eval_seconds, cpu_seconds
            )
            bar.update(1)
            bar.set_postfix(loss=round(train_loss, 4), val=round(val_metrics[fit.primary], 4))

    fit.keep_best()
    run = record(stopwatch.timings(train_seconds=fit.train_seconds()))
    with runs.StagedRun(cfg.out) as staged:
        # Every prediction before any other write: outputs that are not finite stop it here.
        (predicted,) = objective.predict_together([(objective, fit.model, cfg)])
        predicted = alone(predicted)
        metrics = objective.write_predicted(predicted, staged.url)
        _write_run(cfg, run, objective, fit.model, fit.state, metrics, staged)
        return metrics


class Fit:
    """One run between its epochs: the adapter (built from the seed), its optimizer, and the
    state its checkpoint holds ("epoch" done, "curve", "best" weights, "bad_epochs" since).
    `_fit` drives one; `bertvision.together` drives many over shared reads."""

    def __init__(self, cfg: TrainConfig, key: str, objective: Objective, checkpoint) -> None:
        plan = objective.plan
        with rng.seeded(cfg.seed):
            model = adapters.build_adapter(cfg.adapter_config(plan.layers, plan.hidden_size))
        self.cfg, self.key, self.objective = cfg, key, objective
        self.primary = objective.primary_metric
        self.model = model.to(cfg.device)
        self.optimizer = torch.optim.AdamW(
            self.model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay
        )
        self.state = {"epoch": 0, "curve": [], "best": None, "bad_epochs": 0}
        if checkpoint is not None:
            self.model.load_state_dict(checkpoint["model"])
            self.optimizer.load_state_dict(checkpoint["optimizer"])
            self.state = checkpoint["state"]

    def next_epoch(self) -> int | None:
        """The epoch to train next; None once `epochs` are done or `patience` ran out."""
        epoch, cfg = self.state["epoch"] + 1, self.cfg
        if epoch > cfg.epochs or (cfg.patience and self.state["bad_epochs"] >= cfg.patience):
            return None
        return epoch

    def end_epoch(
        self,
        epoch: int,
        train_loss: float,
        val_metrics: dict,
        val_loss: float,
        seconds: float,
        eval_seconds: float,
        cpu_seconds: float,
    ) -> None:
        """Record the epoch in the curve, keep its weights if they are the best on the held-out
        slice (ties: the lower loss), and write the checkpoint. `seconds`: the training pass's
        wall-clock time; `cpu_seconds`: its CPU time, the process's (all its threads, runs on
        other threads included), which on a shared machine tells work from waiting;
        `eval_seconds`: the validation's wall-clock time."""
        state = self.state
        state["curve"].append(
            {
                "epoch": epoch,
                "train_loss": train_loss,
                "val_loss": val_loss,
                "val": val_metrics,
                "seconds": round(seconds, 3),
                "eval_seconds": round(eval_seconds, 3),
                "cpu_seconds": round(cpu_seconds, 3),
            }
        )
        best = state["best"]
        score = (val_metrics[self.primary], -val_loss)
        if best is None or score > (best["metric"], -best["loss"]):
            state["best"] = {
                "epoch": epoch,
                "metric": score[0],
                "loss": val_loss,
                "weights": copy.deepcopy(self.model.state_dict()),
            }
            state["bad_epochs"] = 0
        else:
            state["bad_epochs"] += 1
        state["epoch"] = epoch
        _save_checkpoint(self.cfg, self.key, self.model, self.optimizer, state)

    def keep_best(self) -> None:
        """Load the chosen epoch's weights; the model in eval mode."""
        self.model.load_state_dict(self.state["best"]["weights"])
        self.model.eval()

    def train_seconds(self) -> float:
        return sum(e["seconds"] for e in self.state["curve"])


def _check_data(cfg: TrainConfig, data: EmbeddingData) -> None:
    task = glue.get_task(cfg.task)
    check_given(cfg, data.task.name, data.embeddings, data.splits["train"])
    missing = [s for s in ("train", *task.dev_splits) if s not in data.splits]
    if missing:
        raise ShardError(f"embeddings of {task.name} lack the {', '.join(missing)} split(s)")


def _finished(cfg: TrainConfig, key: str) -> dict | None:
    """The metrics of a run committed with this key; an error for one with another key
    (other settings or other embeddings) unless `cfg.overwrite`. What a kill just after its
    commit left beside it goes (runs.tidy), with its checkpoint; a checkpoint of another key
    is an unfinished run's (with --overwrite), kept to resume from."""
    if runs.finished(cfg.out, key, cfg.overwrite, settings=cfg.keyed_settings()) is None:
        return None
    runs.tidy(cfg.out)
    with contextlib.suppress(storage.FileFormatError, ValueError, OSError):
        if _load_checkpoint(cfg, key) is not None:  # this run's own: done with
            fs, path = storage.url_to_fs(storage.join(cfg.out, runs.SCRATCH))
            fs.rm(path, recursive=True)
    return storage.read_json(storage.join(cfg.out, "metrics.json"), keys=("val", "dev"))


def _load_checkpoint(cfg: TrainConfig, key: str) -> dict | None:
    url = storage.join(cfg.out, CHECKPOINT)
    if not storage.exists(url):
        return None
    data = storage.read_bytes(url)
    try:
        # torch.save writes a zip whose members carry CRC32s that torch.load does not check
        if (damaged := zipfile.ZipFile(io.BytesIO(data)).testzip()) is not None:
            raise storage.FileFormatError(
                f"{url} is not the checkpoint training wrote (a CRC32 of {damaged} fails); "
                "delete it to start the run afresh"
            )
        checkpoint = torch.load(io.BytesIO(data), map_location=cfg.device)
        run_key = checkpoint["run_key"]
    except (
        zipfile.BadZipFile,
        pickle.UnpicklingError,
        RuntimeError,
        EOFError,
        KeyError,
        TypeError,
    ) as exc:
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


def glue_predictions(
    data: EmbeddingData, runs_: list[tuple[nn.Module, np.ndarray, int]], device: str
) -> list[dict[str, tuple[np.ndarray, np.ndarray]] | NonFiniteError]:
    """For each (model, held-out rows of train, batch size): `predict`'s ids and logits of the
    held-out slice ("val") and of every other split by name, or the NonFiniteError of a model
    with an output that is not finite. Each split is read once for all models."""
    results: list[dict | NonFiniteError] = [{} for _ in runs_]
    for name, split in data.splits.items():
        if name == "train":
            asked = list(runs_)
        else:
            asked = [(model, np.ones(split.num_examples, dtype=bool), b) for model, _, b in runs_]
        for index, predicted in enumerate(predict_many(asked, split, device)):
            if isinstance(results[index], dict):
                results[index] = (
                    predicted
                    if isinstance(predicted, NonFiniteError)
                    else results[index] | {VAL_SPLIT if name == "train" else name: predicted}
                )
    return results


def write_glue_outputs(
    data: EmbeddingData,
    predicted: dict[str, tuple[np.ndarray, np.ndarray]],
    is_val: np.ndarray,
    out: str,
) -> dict:
    """Write the predictions and outputs of every split (`glue_predictions`) under `out`;
    returns metrics.json."""
    from bertvision.predictions import read_submission, submission_name, write_predictions

    task = data.task
    train = data.splits["train"]
    val_metrics, _, val_logits = scored(task, train, *predicted[VAL_SPLIT])
    val_ids = np.sort(train.example_ids[is_val])
    val_labels = _labels_of(train, val_ids).tolist()
    write_predictions(out, task, VAL_SPLIT, val_ids, val_labels, task_outputs(task, val_logits))
    metrics = {"val": val_metrics}
    for name, split in data.splits.items():
        if name == "train":
            continue
        ids, logits = predicted[name]
        labels = [None] * len(ids) if split.labels is None else _labels_of(split, ids).tolist()
        write_predictions(out, task, name, ids, labels, task_outputs(task, logits))
        if name in task.dev_splits:
            submitted = read_submission(storage.join(out, submission_name(name)), task)
            report = "dev" if name == task.dev_splits[0] else name
            metrics[report] = compute_metrics(task, [submitted[i] for i in ids], labels)
    return metrics


def _write_run(
    cfg: TrainConfig,
    run: records.RunRecord,
    objective: Objective,
    model,
    state: dict,
    metrics: dict,
    staged: runs.StagedRun,
) -> None:
    """Write the adapter, the curve, config.json and metrics.json staged, then commit them whole
    and drop the checkpoint."""
    from bertvision.plots import plot_curve

    out = staged.url
    adapters.save_adapter(model, storage.join(out, "adapter"))
    epochs = state["curve"]
    train_seconds = sum(e["seconds"] for e in epochs)
    rows = objective.rows
    seen = objective.num_train * len(epochs)
    curve = {
        "primary_metric": objective.primary_metric,
        "best_epoch": state["best"]["epoch"],
        "epochs_run": len(epochs),
        "stopped_early": len(epochs) < cfg.epochs,
        f"train_{rows}": objective.num_train,
        f"val_{rows}": objective.num_val,
        "train_seconds": round(train_seconds, 3),
        f"train_{rows}_per_second": round(seen / max(train_seconds, 1e-9), 1),
        "epochs": epochs,
    }
    storage.write_json(storage.join(out, "curve.json"), curve)
    storage.write_bytes_atomic(
        storage.join(out, "curve.png"),
        plot_curve(curve, f"{objective.task} {cfg.adapter} seed {cfg.seed}"),
    )
    storage.write_json(
        storage.join(out, "config.json"),
        {
            "train": asdict(cfg),
            "adapter": model.config.to_dict(),
            "embeddings": objective.embeddings,
            "model": objective.plan.model,
            "model_fingerprint": objective.plan.model_fingerprint,
            "extraction_keys": objective.extraction_keys(),
            "run_key": run.key,
            "code_version": __version__,
        },
    )
    storage.write_json(storage.join(out, "metrics.json"), metrics)
    staged.commit(run, last=("config.json", "metrics.json"))  # and removes the checkpoint

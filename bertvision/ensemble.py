"""Ensembles of a sweep's best trials: the average of their probabilities (or regression scores).

    ENS/outputs/<split>.parquet    the averaged outputs (what another ensemble could average)
    ENS/<split>_predictions.tsv    GLUE submission files (dev and test splits)
    ENS/metrics.json               members (trial, val and dev metrics) and the ensemble's dev
                                   metrics, scored from the dev submission file as written (so
                                   anyone recomputes them from it and the dev labels); written
                                   last: its presence means the ensemble is whole

Members are the K best finished trials by VALIDATION metric (the held-out slice of TRAIN), so
choosing them never reads a dev label; dev only scores the result. A fine-tuned encoder's run
(`--with-finetuned`) joins the average as one more member with the same weight.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from bertvision import __version__, storage
from bertvision.finite import check_options
from bertvision.glue import get_task
from bertvision.metrics import compute_metrics
from bertvision.predictions import (
    read_outputs,
    read_submission,
    submission_name,
    write_predictions,
)
from bertvision.sweep import SWEEP_FILE, best_trials, load_sweep, load_trials


@dataclass
class EnsembleConfig:
    """Settings of `bertvision ensemble`; also the ensemble flow's parameters."""

    task: str
    runs: str  # a sweep folder (bertvision sweep --out)
    out: str
    top_k: int = 5
    with_finetuned: str | None = None  # a fine-tuning run whose outputs join the average

    def __post_init__(self) -> None:
        self.task = get_task(self.task).name
        check_options(self, flags=True)
        if self.top_k < 1:
            raise ValueError(f"--top-k must be >= 1, got {self.top_k}")


@dataclass(frozen=True)
class Member:
    run: str  # URL of the run folder holding outputs/<split>.parquet
    trial: int | None  # None for the fine-tuned encoder
    val: dict[str, float]
    dev: dict[str, Any]


def choose_members(cfg: EnsembleConfig) -> list[Member]:
    """The top-k trials by validation metric (plus the fine-tuned run when asked)."""
    task = get_task(cfg.task)
    sweep_url = storage.join(cfg.runs, SWEEP_FILE)
    if not storage.exists(sweep_url):
        raise FileNotFoundError(f"{cfg.runs} holds no sweep (no {SWEEP_FILE}); run sweep first")
    swept = load_sweep(cfg.runs)["config"]["task"]
    if swept != task.name:
        raise ValueError(f"{cfg.runs} is a sweep of {swept}, not of {task.name}")
    records = load_trials(cfg.runs)
    best = best_trials(records, task.primary_metric, cfg.top_k)
    if len(best) < cfg.top_k:
        raise ValueError(
            f"{cfg.runs} has {len(best)} finished trials, fewer than --top-k {cfg.top_k}"
        )
    members = [Member(storage.join(cfg.runs, r.run), r.trial, r.val, r.dev) for r in best]
    if cfg.with_finetuned:
        metrics_url = storage.join(cfg.with_finetuned, "metrics.json")
        if not storage.exists(metrics_url):
            raise FileNotFoundError(
                f"--with-finetuned {cfg.with_finetuned} holds no finished run (no metrics.json)"
            )
        metrics = storage.read_json(metrics_url, keys=("dev",))
        members.append(Member(cfg.with_finetuned, None, metrics.get("val", {}), metrics["dev"]))
    return members


def average_outputs(members: list[Member], split: str) -> tuple[np.ndarray, list, np.ndarray]:
    """example_ids, labels and the members' mean (N, C) outputs for one split."""
    ids, labels, total = None, None, None
    for member in members:
        member_ids, member_labels, outputs = read_outputs(member.run, split)
        if ids is None:
            ids, labels, total = member_ids, member_labels, outputs.astype(np.float64)
            continue
        if not np.array_equal(member_ids, ids) or outputs.shape != total.shape:
            raise ValueError(
                f"{member.run} has other {split} examples or outputs than {members[0].run}; "
                "members of an ensemble must share their embeddings"
            )
        total += outputs
    return ids, labels, (total / len(members)).astype(np.float32)


def build_ensemble(cfg: EnsembleConfig) -> dict[str, Any]:
    """Average the members' outputs on every dev and test split; write predictions and metrics."""
    task = get_task(cfg.task)
    members = choose_members(cfg)
    averaged = {}  # every member read and checked before anything is written
    for split in (*task.dev_splits, *task.test_splits):
        lacking = [m.run for m in members if not _has_outputs(m.run, split)]
        if lacking and split in task.dev_splits:
            raise FileNotFoundError(
                f"{lacking[0]} has no {split} outputs (outputs/{split}.parquet)"
            )
        if not lacking:  # else test embeddings were not extracted: no test submission
            averaged[split] = average_outputs(members, split)
    storage.ensure_writable(cfg.out)
    fs, metrics_path = storage.url_to_fs(storage.join(cfg.out, "metrics.json"))
    if fs.exists(metrics_path):  # an older ensemble here stops counting while files change
        fs.rm_file(metrics_path)
    scores = {}
    for split, (ids, labels, outputs) in averaged.items():
        write_predictions(cfg.out, task, split, ids, labels, outputs)
        if split in task.dev_splits:  # scored from the file as written: anyone gets the same
            submitted = read_submission(storage.join(cfg.out, submission_name(split)), task)
            scores[split] = compute_metrics(task, [submitted[i] for i in ids], labels)
    result = {
        "members": [{"trial": m.trial, "run": m.run, "val": m.val, "dev": m.dev} for m in members],
        "ensemble": scores[task.dev_splits[0]],
        **{split: scores[split] for split in task.dev_splits[1:]},
        "metric": task.primary_metric,
        "config": asdict(cfg),
        "code_version": __version__,
    }
    storage.write_json(storage.join(cfg.out, "metrics.json"), result)
    return result


def _has_outputs(run: str, split: str) -> bool:
    return storage.exists(storage.join(run, "outputs", f"{split}.parquet"))

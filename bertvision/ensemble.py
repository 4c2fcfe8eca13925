"""Ensembles of a sweep's best trials: the average of their outputs, in the task family's way
(`TaskFamily.ensemble`): GLUE averages probabilities (or regression scores), `glue_ensemble`
here; SQuAD 2.0 averages each window's start and end logits, then post-processes
(bertvision.span_ensemble).

    ENS/outputs/<split>.parquet    the averaged outputs (what another ensemble could average)
    ENS/<split>_predictions.tsv    GLUE submission files (dev and test splits); SQuAD:
                                   <split>_predictions.json, the official format (val and dev)
    ENS/metrics.json               members (trial, val and dev metrics) and the ensemble's dev
                                   metrics under "ensemble", scored from the dev predictions as
                                   written (so anyone recomputes them from the file and the
                                   labels); "val": the ensemble's metrics on the held-out
                                   slice of TRAIN (where every member has its outputs), to
                                   compare it with its trials without dev labels; SQuAD adds
                                   "no_answer_threshold"
    ENS/_commit.json               the run record (bertvision.records, kind "ensemble",
                                   inputs: the sweep and each member run with its key), the
                                   commit record (bertvision.runs) written last: the
                                   ensemble is whole; its key hashes the settings and the
                                   members' records, so an ensemble of other members (a sweep
                                   with other trials since) is refused unless `overwrite`

Members are the K best finished trials by VALIDATION metric (the held-out slice of TRAIN), so
choosing them never reads a dev label; dev only scores the result. A fine-tuned encoder's run
(`--with-finetuned`) joins the average as one more member with the same weight.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from bertvision import __version__, records, runs, storage
from bertvision.config import ConfigError, EnsembleConfig, require
from bertvision.families import get_task
from bertvision.glue import GlueTask
from bertvision.metrics import compute_metrics
from bertvision.predictions import (
    point_predictions,
    read_outputs,
    read_submission,
    submission_name,
    write_predictions,
)
from bertvision.sweep import (
    SWEEP_FILE,
    TRIAL_RECORD,
    TRIALS_DIR,
    best_trials,
    load_sweep,
    load_trials,
)


@dataclass(frozen=True)
class Member:
    run: str  # URL of the run folder holding outputs/<split>.parquet
    trial: int | None  # None for the fine-tuned encoder
    val: dict[str, float]
    dev: dict[str, Any]


def choose_members(cfg: EnsembleConfig) -> list[Member]:
    """The top-k trials by validation metric (plus the fine-tuned run when asked)."""
    task = get_task(cfg.task)
    metric = task.family.primary_metric(task.name)
    sweep_url = storage.join(cfg.runs, SWEEP_FILE)
    if not storage.exists(sweep_url):
        raise FileNotFoundError(f"{cfg.runs} holds no sweep (no {SWEEP_FILE}); run sweep first")
    swept = load_sweep(cfg.runs)["config"]["task"]
    if swept != task.name:
        raise ValueError(f"{cfg.runs} is a sweep of {swept}, not of {task.name}")
    records = load_trials(cfg.runs)
    best = best_trials(records, metric, cfg.top_k)
    if len(best) < cfg.top_k:
        raise ConfigError(
            "top_k", f"{cfg.top_k} is more than the {len(best)} finished trials of {cfg.runs}"
        )
    members = [Member(storage.join(cfg.runs, r.run), r.trial, r.val, r.dev) for r in best]
    if cfg.with_finetuned:
        metrics_url = storage.join(cfg.with_finetuned, "metrics.json")
        if not storage.exists(metrics_url):
            raise ConfigError(
                "with_finetuned", f"{cfg.with_finetuned} holds no finished run (no metrics.json)"
            )
        if (why := runs.not_whole(cfg.with_finetuned)) is not None:
            raise ConfigError(
                "with_finetuned",
                f"{cfg.with_finetuned} holds no finished run: {why}; fine-tune it again",
            )
        metrics = storage.read_json(metrics_url, keys=("dev",))
        members.append(Member(cfg.with_finetuned, None, metrics.get("val", {}), metrics["dev"]))
    return members


def content_key(
    cfg: EnsembleConfig, members: list[Member] | None = None, by_url: bool = False
) -> str:
    """What determines the ensemble: its settings and its members by content (each member's
    role, a trial's number or the fine-tuned run; its record: trial.json, or the fine-tuned
    run's metrics.json; and its run's commit key). A sweep that has other best trials since, or
    trials redone, gives another key; the same sweep or fine-tuned run at another URL (moved,
    copied) gives the same one. `by_url`: the key of ensembles built before, which named each
    member by its run's URL in place of its role."""
    members = members if members is not None else choose_members(cfg)
    identities = []
    for member in members:
        record = (
            storage.join(cfg.runs, TRIALS_DIR, f"{member.trial:04d}", TRIAL_RECORD)
            if member.trial is not None
            else storage.join(member.run, "metrics.json")
        )
        commit = runs.commit_record(member.run) or {}
        role = "finetuned" if member.trial is None else member.trial
        identities.append(
            [member.run if by_url else role, storage.read_text(record), commit.get("key")]
        )
    content = {"task": cfg.task, "top_k": cfg.top_k, "members": identities}
    return hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()[:16]


def average_outputs(runs: list[str], split: str) -> tuple[np.ndarray, list, np.ndarray]:
    """example_ids, labels and the mean (N, C) outputs of the runs for one split (GLUE)."""
    ids, labels, total = None, None, None
    for run in runs:
        member_ids, member_labels, outputs = read_outputs(run, split)
        if ids is None:
            ids, labels, total = member_ids, member_labels, outputs.astype(np.float64)
            continue
        if not np.array_equal(member_ids, ids) or outputs.shape != total.shape:
            raise ValueError(_mismatch(run, runs[0], split, (member_ids, outputs), (ids, total)))
        total += outputs
    return ids, labels, (total / len(runs)).astype(np.float32)


def _mismatch(run: str, first: str, split: str, theirs: tuple, ours: tuple) -> str:
    """Why `run`'s outputs on `split` cannot be averaged with `first`'s."""
    (their_ids, their_outputs), (our_ids, our_outputs) = theirs, ours
    name = "val (the held-out slice of TRAIN)" if split == "val" else split
    if np.array_equal(their_ids, our_ids):
        what = f"{run} has {name} outputs of shape {their_outputs.shape}, {first} of shape "
        what += f"{our_outputs.shape}"
    else:
        n, m = len(their_ids), len(our_ids)
        counts = f"{n} against {m}" if n != m else f"as many, {n}, but not the same ones"
        what = f"{run} has other {name} examples than {first} ({counts})"
    share = "their embeddings"
    if split == "val":
        share += (
            " and their held-out slice (the same val_fraction and val_seed: a fine-tuned run "
            "made with another --val-fraction or --val-seed than the sweep's holds out other "
            "examples)"
        )
    return f"{what}; members of an ensemble must share {share}"


def lacking_outputs(runs: list[str], split: str) -> list[str]:
    """The runs without outputs/<split>.parquet."""
    return [run for run in runs if not _has_outputs(run, split)]


def glue_ensemble(task: GlueTask, runs: list[str], out: str) -> dict[str, Any]:
    """GLUE's TaskFamily.ensemble: the runs' mean outputs on every dev and test split (test
    only where every member has outputs), written as submission files and outputs into `out`;
    {"ensemble": first dev split's metrics, <other dev split>: its metrics, "val": the metrics
    of the mean outputs on the held-out slice of TRAIN, where every member has them (so that
    an ensemble is compared with its trials, or with another ensemble, without dev labels)}."""
    scores = {}
    if not lacking_outputs(runs, "val"):
        _, labels, outputs = average_outputs(runs, "val")
        scores["val"] = compute_metrics(task, point_predictions(task, outputs), labels)
    for split in (*task.dev_splits, *task.test_splits):
        lacking = lacking_outputs(runs, split)
        if lacking and split in task.dev_splits:
            raise FileNotFoundError(
                f"{lacking[0]} has no {split} outputs (outputs/{split}.parquet)"
            )
        if lacking:
            continue  # test embeddings were not extracted: no test submission
        ids, labels, outputs = average_outputs(runs, split)
        write_predictions(out, task, split, ids, labels, outputs)
        if split in task.dev_splits:  # scored from the file as written: anyone gets the same
            submitted = read_submission(storage.join(out, submission_name(split)), task)
            scores[split] = compute_metrics(task, [submitted[i] for i in ids], labels)
    return {
        "ensemble": scores[task.dev_splits[0]],
        **{split: scores[split] for split in (*task.dev_splits[1:], "val") if split in scores},
    }


def build_ensemble(cfg: EnsembleConfig) -> dict[str, Any]:
    """Average the members' outputs on every dev and test split; write predictions and metrics.

    An ensemble finished at `cfg.out` with the same content key is returned as stored; one with
    another key is refused unless `cfg.overwrite`. Written staged and committed whole."""
    require(cfg)
    stopwatch = records.Stopwatch()
    members = choose_members(cfg)
    key = content_key(cfg, members)

    def build() -> dict[str, Any]:
        with runs.StagedRun(cfg.out) as staged:
            return _build(cfg, members, key, staged, stopwatch)

    return runs.once(cfg.out, lambda: _finished(cfg, members, key), build)


def _finished(cfg: EnsembleConfig, members: list[Member], key: str) -> dict[str, Any] | None:
    keyed = {"task": cfg.task, "top_k": cfg.top_k}  # with its members (content_key)
    record = runs.commit_record(cfg.out)
    if (  # built before members were keyed by role, on the same members
        record is not None
        and record["key"] != key
        and record["key"] == content_key(cfg, members, by_url=True)
    ):
        key = record["key"]
    if runs.finished(cfg.out, key, cfg.overwrite, "ensemble", keyed) is None:
        return None
    return storage.read_json(storage.join(cfg.out, "metrics.json"))


def run_inputs(cfg: EnsembleConfig, members: list[Member]) -> dict[str, dict[str, str]]:
    """The ensemble's inputs (records.RunRecord.inputs): "sweep" (its URL and key) and each
    member run, "trial-NNNN" or "finetuned", with the key of its commit record."""
    inputs = {"sweep": records.input_of(cfg.runs, load_sweep(cfg.runs).get("key", ""))}
    for member in members:
        name = "finetuned" if member.trial is None else f"trial-{member.trial:04d}"
        commit = runs.commit_record(member.run) or {}
        inputs[name] = records.input_of(member.run, commit.get("key", ""))
    return inputs


def _build(
    cfg: EnsembleConfig,
    members: list[Member],
    key: str,
    staged: runs.StagedRun,
    stopwatch: records.Stopwatch,
) -> dict[str, Any]:
    task = get_task(cfg.task)
    out = staged.url
    sweep = load_sweep(cfg.runs)["config"]
    scores = task.family.ensemble(task.name, [m.run for m in members], sweep, out)
    result = {
        "members": [{"trial": m.trial, "run": m.run, "val": m.val, "dev": m.dev} for m in members],
        **scores,
        "metric": task.family.primary_metric(task.name),
        "config": asdict(cfg),
        "code_version": __version__,
    }
    storage.write_json(storage.join(out, "metrics.json"), result)
    record = records.RunRecord(
        "ensemble", key, asdict(cfg), run_inputs(cfg, members), stopwatch.timings()
    )
    staged.commit(record, last=("metrics.json",))
    return result


def _has_outputs(run: str, split: str) -> bool:
    return storage.exists(storage.join(run, "outputs", f"{split}.parquet"))

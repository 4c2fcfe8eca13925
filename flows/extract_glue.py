"""Flows `extract-glue` (one extraction of a task), `extract-squad` (the same with SQuAD 2.0's
defaults) and `extract-shards` (some of an extraction's shards).

    extract-glue:  plan each task  ->  pending shards  ->  extract them here, one task per shard
                                                       or hand groups to N `extract-shards` runs
                   ->  table of shards; a final listing of storage; Failed naming every shard
                       that did not commit, and why, and whatever committed but is not stored

A failing shard does not stop the others; no space left on storage stops the run at once
(OutOfSpace). A rerun (a retry of the flow run or a fresh run) does only the shards that storage
does not hold committed.
"""

from __future__ import annotations

import time

from bertvision_tasks.artifacts import ExtractionProgress, failed_shards, publish_shard_table
from bertvision_tasks.attempts import crash_stale_task_runs
from bertvision_tasks.extract import (
    extract_shard,
    finish_split,
    missing_from_storage,
    pending_shards,
    plan_extraction,
    read_plan,
    run_shard_group,
)
from bertvision_tasks.names import artifact_key, flow_run_name, run_name, where
from prefect import flow
from prefect.futures import wait

from bertvision import storage
from bertvision.config import ConfigError, ExtractConfig
from bertvision.extract import is_span_task, no_space_error
from bertvision.schema import ExtractionPlan

SHARD_DEPLOYMENT = "extract-shards/extract-shards"
POLL_SECONDS = 10  # how often the coordinator recounts shards committed by child runs
# A recount reads every commit record (3.4 s for 9,500 shards on a loaded 2-core machine): the
# coordinator waits this many times as long as the last one took, so it stays a small share of
# a core that the shard workers need.
POLL_COST_FACTOR = 10


class ShardsFailed(RuntimeError):
    """Some shards did not commit, or storage lost what was committed; the message names each
    shard and why, and each file missing at the end."""

    def __init__(self, failures: dict[str, str], missing: list[str] | None = None) -> None:
        parts = []
        if failures:
            listed = "; ".join(f"{name}: {why}" for name, why in sorted(failures.items()))
            parts.append(f"{len(failures)} shard(s) failed: {listed}")
        if missing:
            parts.append(f"not stored at the end: {'; '.join(missing)}")
        super().__init__(". ".join(parts))
        self.failures = failures
        self.missing = missing or []


@flow(name="extract-glue", flow_run_name=flow_run_name("extract-{cfg.task}"), log_prints=True)
def extract_glue(
    cfg: ExtractConfig, workers: int = 0, shard_deployment: str = SHARD_DEPLOYMENT
) -> dict[str, int]:
    """Store every layer's hidden states of `cfg.task`'s splits under `cfg.out`; returns shards
    per task/split. `workers` > 0 spreads the pending shards over that many child runs of
    `shard_deployment` (one per worker); 0 extracts them in this flow run. A GLUE task stores
    one row per example, squad2 one per window."""
    crash_stale_task_runs()  # a retry: the task runs a killed attempt left Running
    return _extract(cfg, workers, shard_deployment)


@flow(name="extract-squad", flow_run_name=flow_run_name("extract-{cfg.task}"), log_prints=True)
def extract_squad(
    cfg: ExtractConfig, workers: int = 0, shard_deployment: str = SHARD_DEPLOYMENT
) -> dict[str, int]:
    """`extract-glue` for span tasks: every window of every question of the splits. Its
    deployment carries SQuAD 2.0's windowing as defaults (deployments/prefect.yaml)."""
    if not is_span_task(cfg.task):
        raise ConfigError("task", f"{cfg.task!r} is not a span task (squad2); use extract-glue")
    crash_stale_task_runs()  # a retry: the task runs a killed attempt left Running
    return _extract(cfg, workers, shard_deployment)


def _extract(cfg: ExtractConfig, workers: int, shard_deployment: str) -> dict[str, int]:
    plans = plan_extraction(cfg)  # validate, write one plan per split
    work = [(cfg, plan) for plan in plans]
    key = artifact_key("extract", cfg.task, where(cfg.out))
    progress = ExtractionProgress(work, key=f"{key}-progress")
    todo = [(cfg, plan, pending_shards(cfg, plan)) for plan in plans]  # what storage lacks
    run_errors = {}
    if workers > 0:
        run_errors = _extract_on_workers(todo, workers, shard_deployment, progress)  # child runs
    else:
        for _, plan, pending in todo:
            run_errors |= _extract_here(cfg, plan, pending, progress)  # one task run per shard
        progress.refresh()  # advance publishes at most every few seconds
    publish_shard_table(cfg, plans, f"{key}-shards", run_errors)  # committed, failed, missing
    failures, missing = {}, []
    for plan in plans:
        failed = failed_shards(cfg, plan, pending_shards(cfg, plan), run_errors)
        done = [i for i in range(plan.num_shards) if f"{plan.task}/{plan.split}/{i}" not in failed]
        failures |= failed
        missing += finish_split(cfg, plan, done)  # a final listing: lost writes show
    if failures or missing:
        raise ShardsFailed(failures, missing)
    return {f"{plan.task}/{plan.split}": plan.num_shards for plan in plans}


@flow(name="extract-shards", log_prints=True)
def extract_shards(cfg: ExtractConfig, split: str, shards: list[int]) -> list[int]:
    """Extract the given shards of one planned task/split; a worker's share of `extract-glue`.

    Shards committed meanwhile (by an earlier try or another worker) are skipped."""
    crash_stale_task_runs()
    plan = read_plan(cfg, split)
    run_errors = _extract_here(cfg, plan, shards, progress=None)
    pending = sorted(set(shards) & set(pending_shards(cfg, plan)))
    failures = failed_shards(cfg, plan, pending, run_errors)
    done = [i for i in shards if f"{plan.task}/{plan.split}/{i}" not in failures]
    missing = missing_from_storage(cfg, plan, done)  # a final listing: lost writes show
    if failures or missing:
        raise ShardsFailed(failures, missing)
    return shards


def _extract_here(
    cfg: ExtractConfig,
    plan: ExtractionPlan,
    shards: list[int],
    progress: ExtractionProgress | None,
) -> dict[str, str]:
    """One task run per shard, in order; a failed shard does not stop the others, but no space
    left on storage stops this at once (OutOfSpace): every later shard would fail the same way.

    Returns `task/split/shard` -> the final state's message, for shards whose task run failed."""
    errors = {}
    for index in shards:
        state = extract_shard(cfg, plan, index, return_state=True)
        if not state.is_completed():
            exc = state.result(raise_on_failure=False)
            if isinstance(exc, BaseException) and storage.out_of_space(exc):
                raise no_space_error(cfg, plan, index, exc) from exc
            errors[f"{plan.task}/{plan.split}/{index}"] = state.message or state.name
        elif progress is not None:
            progress.advance(plan, state.result().rows)
    return errors


def poll_seconds(refresh_seconds: float) -> float:
    """Seconds between recounts of committed shards: POLL_SECONDS, or POLL_COST_FACTOR times
    what the last recount took (`refresh_seconds`) when that is longer."""
    return max(POLL_SECONDS, POLL_COST_FACTOR * refresh_seconds)


def _extract_on_workers(
    todo: list[tuple[ExtractConfig, ExtractionPlan, list[int]]],
    workers: int,
    deployment: str,
    progress: ExtractionProgress,
) -> dict[str, str]:
    """Spread each split's pending shards round-robin over `workers` child runs; wait for all.

    Returns `task/split/shard` -> the error of its child run, for runs that failed."""
    runs = {}
    for cfg, plan, pending in todo:
        for group in range(min(workers, len(pending))):
            shards = pending[group::workers]
            work = f"{plan.task}-{plan.split}-shards-{group + 1}-of-{workers}"
            name = run_name(work, cfg.out)
            parameters = {"cfg": cfg, "split": plan.split, "shards": shards}
            future = run_shard_group.submit(deployment, parameters, name)
            runs[future] = [f"{plan.task}/{plan.split}/{i}" for i in shards]
    seconds = 0.0
    while wait(list(runs), timeout=poll_seconds(seconds)).not_done:
        started = time.monotonic()
        progress.refresh()
        seconds = time.monotonic() - started
    progress.refresh()
    errors = {}
    for future, names in runs.items():
        if not future.state.is_completed():
            errors |= dict.fromkeys(names, future.state.message or future.state.name)
    return errors

"""Flows `extract-glue` (one extraction of a task), `extract-squad` (the same with SQuAD 2.0's
defaults) and `extract-shards` (some of an extraction's shards).

    extract-glue:  plan each task  ->  pending shards  ->  extract them here, one task per shard
                                                       (or per `shards_per_task` consecutive
                                                       shards), or hand them to N
                                                       `extract-shards` runs
                   ->  table of shards; a final listing of storage; Failed naming every shard
                       that did not commit, and why, and whatever committed but is not stored

A failing shard does not stop the others; no space left on storage stops the run at once
(OutOfSpace). A rerun (a retry of the flow run or a fresh run) does only the shards that storage
does not hold committed.
"""

from __future__ import annotations

import time
from collections import Counter

from bertvision_flows.parameters import check_at_least, require_cfg
from bertvision_tasks.artifacts import ExtractionProgress, failed_shards, publish_shard_table
from bertvision_tasks.attempts import crash_stale_task_runs
from bertvision_tasks.extract import (
    SHARD_TIMEOUT_SECONDS,
    ShardGroupFailed,
    extract_shard,
    extract_shard_group,
    finish_split,
    missing_from_storage,
    pending_shards,
    plan_extraction,
    read_plan,
    run_shard_group,
    shard_groups,
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
    cfg: ExtractConfig,
    workers: int = 0,
    shards_per_task: int = 1,
    shard_deployment: str = SHARD_DEPLOYMENT,
) -> dict[str, int]:
    """Store every layer's hidden states of `cfg.task`'s splits under `cfg.out`; returns shards
    per task/split. `workers` > 0 spreads the pending shards over that many child runs of
    `shard_deployment` (one per worker); 0 extracts them in this flow run. `shards_per_task` > 1
    extracts that many consecutive pending shards per task run (`extract_shard_group`): fewer
    task runs, API calls and events when shards are many and small (a Prefect server drops
    events beyond ~100/s, benchmarks/RESULTS.md). A GLUE task stores one row per example,
    squad2 one per window."""
    _check_parameters(cfg, workers, shards_per_task)
    crash_stale_task_runs()  # a retry: the task runs a killed attempt left Running
    return _extract(cfg, workers, shard_deployment, shards_per_task)


@flow(name="extract-squad", flow_run_name=flow_run_name("extract-{cfg.task}"), log_prints=True)
def extract_squad(
    cfg: ExtractConfig,
    workers: int = 0,
    shards_per_task: int = 1,
    shard_deployment: str = SHARD_DEPLOYMENT,
) -> dict[str, int]:
    """`extract-glue` for span tasks: every window of every question of the splits. Its
    deployment carries SQuAD 2.0's windowing as defaults (deployments/prefect.yaml)."""
    _check_parameters(cfg, workers, shards_per_task)
    if not is_span_task(cfg.task):
        raise ConfigError("task", f"{cfg.task!r} is not a span task (squad2); use extract-glue")
    crash_stale_task_runs()  # a retry: the task runs a killed attempt left Running
    return _extract(cfg, workers, shard_deployment, shards_per_task)


def _check_parameters(cfg: ExtractConfig, workers: int, shards_per_task: int) -> None:
    """ConfigError naming the first of an extraction flow's parameters that it cannot use; before
    any task runs."""
    require_cfg(cfg)
    check_at_least(0, workers=workers)
    check_at_least(1, shards_per_task=shards_per_task)


def _extract(
    cfg: ExtractConfig, workers: int, shard_deployment: str, shards_per_task: int
) -> dict[str, int]:
    plans = plan_extraction(cfg)  # validate, write one plan per split
    work = [(cfg, plan) for plan in plans]
    key = artifact_key("extract", cfg.task, where(cfg.out))
    progress = ExtractionProgress(work, key=f"{key}-progress")
    todo = [(cfg, plan, pending_shards(cfg, plan)) for plan in plans]  # what storage lacks
    run_errors = {}
    if workers > 0:
        run_errors = _extract_on_workers(  # child runs
            todo, workers, shard_deployment, shards_per_task, progress
        )
    else:
        for _, plan, pending in todo:  # one task run per shard (or group)
            run_errors |= _extract_here(cfg, plan, pending, shards_per_task, progress)
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
def extract_shards(
    cfg: ExtractConfig, split: str, shards: list[int], shards_per_task: int = 1
) -> list[int]:
    """Extract the given shards of one planned task/split, `shards_per_task` consecutive ones
    of the list per task run; a worker's share of `extract-glue`.

    Shards committed meanwhile (by an earlier try or another worker) are skipped. ConfigError
    naming `shards` for an index the plan lacks or one listed twice, before any shard is
    extracted."""
    require_cfg(cfg)
    check_at_least(1, shards_per_task=shards_per_task)
    crash_stale_task_runs()
    plan = read_plan(cfg, split)  # reads only
    _check_shard_indices(shards, plan)
    run_errors = _extract_here(cfg, plan, shards, shards_per_task, progress=None)
    pending = sorted(set(shards) & set(pending_shards(cfg, plan)))
    failures = failed_shards(cfg, plan, pending, run_errors)
    done = [i for i in shards if f"{plan.task}/{plan.split}/{i}" not in failures]
    missing = missing_from_storage(cfg, plan, done)  # a final listing: lost writes show
    if failures or missing:
        raise ShardsFailed(failures, missing)
    return shards


def _check_shard_indices(shards: list[int], plan: ExtractionPlan) -> None:
    wrong = sorted({i for i in shards if not 0 <= i < plan.num_shards})
    if wrong:
        raise ConfigError(
            "shards",
            f"{wrong} not in {plan.task}/{plan.split}'s plan: shards 0 to {plan.num_shards - 1}",
        )
    twice = sorted(i for i, n in Counter(shards).items() if n > 1)
    if twice:
        raise ConfigError("shards", f"lists {twice} more than once")


def _extract_here(
    cfg: ExtractConfig,
    plan: ExtractionPlan,
    shards: list[int],
    shards_per_task: int,
    progress: ExtractionProgress | None,
) -> dict[str, str]:
    """One task run per shard, in order (or per group of `shards_per_task`); a failed shard does
    not stop the others, but no space left on storage stops this at once (OutOfSpace): every
    later shard would fail the same way.

    Returns `task/split/shard` -> the final state's message, for shards whose task run failed."""
    if shards_per_task > 1:
        return _extract_groups_here(cfg, plan, shard_groups(shards, shards_per_task), progress)
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


def _extract_groups_here(
    cfg: ExtractConfig,
    plan: ExtractionPlan,
    groups: list[list[int]],
    progress: ExtractionProgress | None,
) -> dict[str, str]:
    """`_extract_here` with one task run per group of shards (`extract_shard_group`)."""
    errors = {}
    for group in groups:
        timeout = SHARD_TIMEOUT_SECONDS * len(group)
        task = extract_shard_group.with_options(timeout_seconds=timeout)
        state = task(cfg, plan, group, return_state=True)
        if state.is_completed():
            if progress is not None:
                progress.advance(plan, sum(record.rows for record in state.result()))
            continue
        exc = state.result(raise_on_failure=False)
        if isinstance(exc, BaseException) and storage.out_of_space(exc):
            raise exc  # OutOfSpace naming the shard
        if isinstance(exc, ShardGroupFailed):
            errors |= exc.failures  # the others of the group committed
        else:  # timed out, crashed: whichever of its shards are not committed
            why = state.message or state.name
            errors |= {f"{plan.task}/{plan.split}/{i}": why for i in group}
        if progress is not None:
            progress.refresh()  # what the group committed before it failed
    return errors


def poll_seconds(refresh_seconds: float) -> float:
    """Seconds between recounts of committed shards: POLL_SECONDS, or POLL_COST_FACTOR times
    what the last recount took (`refresh_seconds`) when that is longer."""
    return max(POLL_SECONDS, POLL_COST_FACTOR * refresh_seconds)


def worker_shares(pending: list[int], workers: int, shards_per_task: int) -> list[list[int]]:
    """The shards of each of at most `workers` child runs: the groups of `shards_per_task`
    consecutive pending shards (`shard_groups`) dealt round-robin, so that each child, cutting
    its share into groups, makes the same groups. With 1: shards round-robin."""
    groups = shard_groups(pending, shards_per_task)
    return [
        [i for group in groups[child::workers] for i in group]
        for child in range(min(workers, len(groups)))
    ]


def _extract_on_workers(
    todo: list[tuple[ExtractConfig, ExtractionPlan, list[int]]],
    workers: int,
    deployment: str,
    shards_per_task: int,
    progress: ExtractionProgress,
) -> dict[str, str]:
    """Spread each split's pending shards round-robin over `workers` child runs, in groups of
    `shards_per_task` consecutive shards (each child's task runs take the same groups); wait
    for all.

    Returns `task/split/shard` -> the error of its child run, for runs that failed."""
    runs = {}
    for cfg, plan, pending in todo:
        for child, shards in enumerate(worker_shares(pending, workers, shards_per_task)):
            work = f"{plan.task}-{plan.split}-shards-{child + 1}-of-{workers}"
            name = run_name(work, cfg.out)
            parameters = {"cfg": cfg, "split": plan.split, "shards": shards}
            if shards_per_task > 1:  # so workers on code older than this parameter run the rest
                parameters["shards_per_task"] = shards_per_task
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

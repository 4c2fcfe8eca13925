"""Extraction tasks: the plan is made once, then each shard is one task (or a child flow run), or
a group of consecutive shards is one task (`extract_shard_group`) when shards are many and small.

Committed shards in storage are the record: `extract_shard` returns a committed shard as it is,
whatever Prefect's cache holds, and `pending_shards` lists only what storage lacks.
"""

from __future__ import annotations

from bertvision_tasks.names import shard_number, task_run_name
from bertvision_tasks.policy import RETRY, TRANSIENT_ERRORS, WhileStored, committed_shard
from prefect import task
from prefect.cache_policies import NO_CACHE
from prefect.deployments import run_deployment
from prefect.exceptions import ObjectNotFound
from prefect.settings import PREFECT_API_URL

from bertvision import extract, shards, storage
from bertvision.config import ExtractConfig
from bertvision.console import progress_wanted
from bertvision.schema import ExtractionPlan, ShardRecord
from bertvision.shards import ShardError, load_plan, split_url

SHARD_TIMEOUT_SECONDS = 3600  # a shard's time limit; a group's: this times its shards


@task(
    task_run_name=task_run_name("{cfg.task}-plan"),
    cache_policy=NO_CACHE,
    timeout_seconds=900,
    **RETRY,
)
def plan_extraction(cfg: ExtractConfig) -> list[ExtractionPlan]:
    """Check task, data, model and output; write one plan per split (idempotent)."""
    return extract.prepare_extraction(cfg)


@task(
    task_run_name=task_run_name("{cfg.task}-{split}-read-plan"),
    cache_policy=NO_CACHE,
    timeout_seconds=300,
    **RETRY,
)
def read_plan(cfg: ExtractConfig, split: str) -> ExtractionPlan:
    """The plan a coordinating flow run wrote for `cfg.task`/`split`. A worker's share of shards
    starts here, so this also removes the upload spool files of killed writers on this machine."""
    folder = split_url(cfg.out, cfg.task, split)
    plan = load_plan(folder)
    if plan is None:
        raise ShardError(f"{folder} holds no extraction plan; run extract-glue to make one")
    storage.remove_stale_spool()
    return plan


@task(
    task_run_name=task_run_name("{plan.task}-{plan.split}-pending"),
    cache_policy=NO_CACHE,
    timeout_seconds=300,
    **RETRY,
)
def pending_shards(cfg: ExtractConfig, plan: ExtractionPlan) -> list[int]:
    """Shards of `plan` that storage does not hold committed."""
    return extract.pending_shards(cfg, plan)


@task(
    task_run_name=task_run_name("{plan.task}-{plan.split}-listing"),
    cache_policy=NO_CACHE,
    timeout_seconds=300,
    **RETRY,
)
def missing_from_storage(cfg: ExtractConfig, plan: ExtractionPlan, indices: list[int]) -> list[str]:
    """What a final listing lacks of the plan and of shards `indices` ("URL (why)" each)."""
    return shards.missing_from_storage(split_url(cfg.out, plan.task, plan.split), plan, indices)


@task(
    task_run_name=task_run_name("{plan.task}-{plan.split}-finish"), cache_policy=NO_CACHE, **RETRY
)
def finish_split(cfg: ExtractConfig, plan: ExtractionPlan, done: list[int]) -> list[str]:
    """The final listing of one split; its run record when the extraction is complete."""
    return extract.finish_split(cfg, plan, done)


def _shard_run_name(parameters: dict) -> str:
    """`rte-train-shard-0007`; 5 digits from 10,001 shards on (`shard_number`)."""
    plan = parameters["plan"]
    return f"{plan.task}-{plan.split}-shard-{shard_number(parameters['index'], plan.num_shards)}"


@task(
    task_run_name=task_run_name(_shard_run_name),
    # No content key: the plan given holds the extraction key, which hashes the model's weights
    # and the data (plan_extraction makes it afresh each run).
    cache_policy=WhileStored(committed_shard),
    persist_result=True,
    timeout_seconds=SHARD_TIMEOUT_SECONDS,
    **RETRY,
)
def extract_shard(cfg: ExtractConfig, plan: ExtractionPlan, index: int) -> ShardRecord:
    """Compute and commit one shard; a committed one is returned as it is."""
    return extract.extract_shard(cfg, plan, index, progress=progress_wanted())


def _group_run_name(parameters: dict) -> str:
    """`rte-train-shards-0100-0109`: its first and last shard (`shard_number`)."""
    plan, indices = parameters["plan"], parameters["indices"]
    first, last = (shard_number(i, plan.num_shards) for i in (indices[0], indices[-1]))
    return f"{plan.task}-{plan.split}-shards-{first}-{last}"


class ShardGroupFailed(RuntimeError):
    """Some shards of a group did not commit (the others did); the message names each and why.

    `failures`: `task/split/shard` -> `Type: message`. `transient`: whether one of them failed
    in a way worth another try (policy.TRANSIENT_ERRORS): a retry of the group redoes only its
    shards that storage does not hold committed."""

    def __init__(self, failures: dict[str, str], transient: bool = False) -> None:
        listed = "; ".join(f"{name}: {why}" for name, why in failures.items())
        super().__init__(f"{len(failures)} shard(s) failed: {listed}")
        self.failures = failures
        self.transient = transient

    def __reduce__(self):  # pickled with its fields (Prefect persists failed states' errors)
        return type(self), (self.failures, self.transient)


@task(task_run_name=task_run_name(_group_run_name), cache_policy=NO_CACHE, **RETRY)
def extract_shard_group(
    cfg: ExtractConfig, plan: ExtractionPlan, indices: list[int]
) -> list[ShardRecord]:
    """Compute and commit shards `indices` of `plan` in order, each committed on its own as
    `extract_shard` commits one (a committed one is returned as it is): one task run for many
    small shards, a fraction of the API calls and events of one task run per shard.

    A failing shard does not stop the others; then ShardGroupFailed names each failed shard.
    No space left on storage stops the group at once (OutOfSpace naming the shard).

    Not cached (NO_CACHE): storage is the record, and the core already returns a committed shard
    from its commit record, the same read a cache key of the group would need; a group's cache
    entry would also name a set of shards that a rerun, which groups only the pending ones,
    rarely forms again."""
    records, failures = extract.extract_shards(cfg, plan, indices, progress_wanted())
    if failures:
        named = {f"{plan.task}/{plan.split}/{i}": exc for i, exc in failures.items()}
        raise ShardGroupFailed(
            {name: f"{type(exc).__name__}: {exc}" for name, exc in named.items()},
            transient=any(isinstance(exc, TRANSIENT_ERRORS) for exc in failures.values()),
        )
    return records


def shard_groups(indices: list[int], shards_per_task: int) -> list[list[int]]:
    """`indices` in order, cut into groups of `shards_per_task` (the last one may be smaller)."""
    return [indices[i : i + shards_per_task] for i in range(0, len(indices), shards_per_task)]


@task(task_run_name="{flow_run_name}", cache_policy=NO_CACHE)
def run_shard_group(deployment: str, parameters: dict, flow_run_name: str) -> str:
    """Run a group of shards as a child flow run of the shard deployment; wait for it."""
    try:
        flow_run = run_deployment(
            deployment, parameters=parameters, flow_run_name=flow_run_name, timeout=None
        )
    except ObjectNotFound:
        raise RuntimeError(
            f"deployment {deployment} is not on the Prefect server at {PREFECT_API_URL.value()}: "
            "deploy it (cd deployments && prefect deploy --all)"
        ) from None
    if not flow_run.state.is_completed():
        raise RuntimeError(f"{flow_run_name} ended {flow_run.state.name}: {flow_run.state.message}")
    return str(flow_run.id)

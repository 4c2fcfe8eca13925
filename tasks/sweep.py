"""Sweep tasks: plan, suggest a batch, run one trial, record. Storage is the record: a finished
trial's trial.json makes `run_trial` return it unrun, whatever Prefect's cache holds."""

from __future__ import annotations

from bertvision_tasks.names import run_name, task_run_name
from bertvision_tasks.policy import RETRY, WhileStored
from prefect import task
from prefect.cache_policies import NO_CACHE

from bertvision import sweep as core
from bertvision import together
from bertvision.config import SweepConfig
from bertvision.sweep import SweepSummary, TrialRecord, TrialSpec


def _stored_trial(inputs: dict) -> str | None:
    """The trial's record while its run is stored whole (sweep.stored_trial), else None."""
    record = core.stored_trial(inputs["cfg"].out, inputs["spec"].trial)
    return None if record is None else record.to_json()


@task(
    task_run_name=task_run_name("extracted-tasks", out=lambda p: p["embeddings"]),
    cache_policy=NO_CACHE,
    timeout_seconds=300,
    **RETRY,
)
def extracted_tasks(embeddings: str, adapter: str = "") -> list[str]:
    """The tasks of every family whose train and dev embeddings under `embeddings` are complete
    (with `adapter`, those it fits)."""
    return core.extracted_tasks(embeddings, adapter)


@task(
    task_run_name=task_run_name("{cfg.task}-sweep-finished"),
    cache_policy=NO_CACHE,
    timeout_seconds=300,
    **RETRY,
)
def finished_sweep(cfg: SweepConfig) -> SweepSummary | None:
    """The summary of the sweep finished at `cfg.out` with these settings, read from storage
    (nothing written); None when something is left to do."""
    return core.finished_sweep(cfg)


@task(
    task_run_name=task_run_name("{cfg.task}-sweep-plan"),
    cache_policy=NO_CACHE,
    timeout_seconds=300,
    **RETRY,
)
def prepare_sweep(cfg: SweepConfig) -> dict:
    """Check the embeddings; write sweep.json, or check it is this sweep's."""
    return core.prepare_sweep(cfg)


@task(
    task_run_name=task_run_name("{cfg.task}-suggest"),
    cache_policy=NO_CACHE,
    timeout_seconds=600,
    **RETRY,
)
def suggest_trials(cfg: SweepConfig) -> list[TrialSpec]:
    """TPE's points for the unfinished trials of the next batch of `cfg.parallel`."""
    return core.suggest_trials(cfg)


@task(
    task_run_name=task_run_name("{cfg.task}-{cfg.adapter}-trial-{spec.trial:04d}"),
    cache_policy=WhileStored(_stored_trial, lambda inputs: core.content_key(inputs["cfg"])),
    persist_result=True,
    timeout_seconds=12 * 3600,
    **RETRY,
)
def run_trial(cfg: SweepConfig, spec: TrialSpec) -> TrialRecord:
    """Train one trial (embeddings loaded once per worker process) and commit its record."""
    return core.run_trial(cfg, spec)


def _batch_name(parameters: dict) -> str:
    """<task>-<adapter>-trials-0004-0007@<where the sweep goes>: the batch's first and last."""
    cfg, batch = parameters["cfg"], parameters["batch"]
    first, last = batch[0].trial, batch[-1].trial
    return run_name(f"{cfg.task}-{cfg.adapter}-trials-{first:04d}-{last:04d}", cfg.out)


@task(
    task_run_name=_batch_name,
    cache_policy=NO_CACHE,  # the core returns the batch's finished trials as recorded, unrun
    timeout_seconds=12 * 3600,
    **RETRY,
)
def run_trials_together(cfg: SweepConfig, batch: list[TrialSpec]) -> list[TrialRecord]:
    """Train the trials of `batch` together over one read of the embeddings (loaded once per
    worker process) and commit each one's record, as `run_trial` commits one; a retry trains
    only the trials not yet recorded, each from its last checkpoint."""
    return together.run_trials_together(cfg, batch)


@task(
    task_run_name=task_run_name("{cfg.task}-record"),
    cache_policy=NO_CACHE,
    timeout_seconds=600,
    **RETRY,
)
def record_trials(cfg: SweepConfig) -> list[TrialRecord]:
    """Rewrite trials.jsonl from the committed trial records."""
    return core.record_trials(cfg)


@task(
    task_run_name=task_run_name("{cfg.task}-summary"),
    cache_policy=NO_CACHE,
    timeout_seconds=600,
    **RETRY,
)
def summarize(cfg: SweepConfig, done_before: int) -> SweepSummary:
    """Trials finished, failed and the best one by validation metric."""
    return core.summarize(cfg, done_before)

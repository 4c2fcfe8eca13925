"""The ensemble task: average the best trials of a sweep (and optionally the fine-tuned model)."""

from __future__ import annotations

from bertvision_tasks.names import task_run_name
from bertvision_tasks.policy import RETRY, WhileStored, committed_run
from prefect import task

from bertvision import ensemble as core
from bertvision.config import EnsembleConfig


@task(
    task_run_name=task_run_name("{cfg.task}-ensemble-top-{cfg.top_k}"),
    cache_policy=WhileStored(committed_run, lambda inputs: core.content_key(inputs["cfg"])),
    persist_result=True,
    timeout_seconds=3600,
    **RETRY,
)
def ensemble(cfg: EnsembleConfig) -> dict:
    """Average the members' outputs; write predictions and metrics.json."""
    return core.build_ensemble(cfg)

"""The adapter training task: one adapter trained on stored embeddings."""

from __future__ import annotations

from bertvision_tasks.names import task_run_name
from bertvision_tasks.policy import RETRY, WhileStored, committed_run
from prefect import task

from bertvision import train as core
from bertvision.config import TrainConfig
from bertvision.console import progress_wanted


@task(
    task_run_name=task_run_name("{cfg.task}-train-{cfg.adapter}"),
    cache_policy=WhileStored(committed_run, lambda inputs: core.content_key(inputs["cfg"])),
    persist_result=True,
    timeout_seconds=12 * 3600,
    **RETRY,
)
def train_adapter(cfg: TrainConfig) -> dict:
    """Train, select on held-out train, evaluate; a finished run is returned as it is."""
    return core.train_adapter(cfg, progress=progress_wanted())

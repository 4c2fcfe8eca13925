"""The fine-tuning task: one brief fine-tuning run of the encoder on one task."""

from __future__ import annotations

from bertvision_tasks.names import task_run_name
from bertvision_tasks.policy import RETRY, WhileStored, committed_run
from prefect import task

from bertvision import finetune as core
from bertvision.config import FinetuneConfig
from bertvision.console import progress_wanted


@task(
    task_run_name=task_run_name("{cfg.task}-finetune"),
    cache_policy=WhileStored(committed_run, lambda inputs: core.content_key(inputs["cfg"])),
    persist_result=True,
    timeout_seconds=24 * 3600,
    **RETRY,
)
def finetune(cfg: FinetuneConfig) -> dict:
    """Fine-tune and evaluate; a run already stored with this content key is returned as it is
    (by the core, as `bertvision finetune` does)."""
    return core.finetune_encoder(cfg, progress=progress_wanted())

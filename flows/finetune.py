"""Flow `finetune`: a brief fine-tuning of the encoder on one task, with its dev metrics."""

from __future__ import annotations

from bertvision_flows.parameters import require_cfg
from bertvision_tasks.artifacts import evaluation, publish_metrics
from bertvision_tasks.attempts import crash_stale_task_runs
from bertvision_tasks.finetune import finetune as finetune_task
from bertvision_tasks.names import artifact_key, flow_run_name, where
from prefect import flow

from bertvision.config import FinetuneConfig


@flow(name="finetune", flow_run_name=flow_run_name("finetune-{cfg.task}"), log_prints=True)
def finetune(cfg: FinetuneConfig) -> dict:
    """Fine-tune `cfg.model` on `cfg.task` for `cfg.epochs` (may be a fraction) into `cfg.out`;
    returns metrics.json of the run. A run finished there with the same settings and inputs is
    returned as stored; one with others is refused unless `cfg.overwrite`."""
    require_cfg(cfg)  # before any task: a bad parameter fails the run at once
    crash_stale_task_runs()  # a retry: the task runs a killed attempt left Running
    metrics = finetune_task(cfg)  # partial fine-tune of the encoder
    publish_metrics(
        f"{cfg.task}: fine-tuned encoder ({cfg.epochs} epochs)",
        {"finetune": evaluation(metrics)},
        key=artifact_key("finetune", cfg.task, where(cfg.out), "metrics"),
    )
    return metrics
